"""Benchmark gist vs RAG vs full context: runner, metrics, report."""
