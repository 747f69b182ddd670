"""`gistctl demo`: the main job on the bundled example, side by side with full context and RAG."""

from __future__ import annotations

import statistics
from pathlib import Path

import typer
from rich.table import Table

from gistctl.cli.common import console, user_errors
from gistctl.runs import RunDir


@user_errors
def demo(
    document: Path = typer.Option(None, help="Text document; default: the bundled examples/lighthouse.txt."),
    question: list[str] = typer.Option(None, "--question", "-q", help="Question (repeatable); default: three."),
    model: str = typer.Option(None, help="HF model id or local directory; default: embedded SmolLM2-135M-Instruct."),
    adapter: str = typer.Option(None, help="Gist adapter; default: the shipped one. 'none': untrained gists."),
    num_gist: int = typer.Option(None, "--num-gist", "--gist", help="K: untrained gist tokens per chunk (only with --adapter none)."),
    device: str = typer.Option(None, help="cpu or cuda; default: cuda if available."),
    run_dir: Path = typer.Option(None, help="Run directory; default: runs/demo-<time>-<id>/."),
) -> None:
    """Compress a document once, answer from the blob, and compare with full context and RAG."""
    from gistctl.demo import DEMO_PRESS, DEMO_RATIO, EXAMPLE_DOCUMENT, EXAMPLE_QUESTIONS, METHODS, run_demo

    document = document or EXAMPLE_DOCUMENT
    questions = tuple(question) if question else EXAMPLE_QUESTIONS
    run = RunDir.create("demo", {"document": str(document), "questions": list(questions), "model": model,
                                 "adapter": adapter}, run_dir=run_dir)
    with console.status("loading models, compressing, answering..."):
        result = run_demo(document, questions, out_dir=run.path, model=model, adapter=adapter, num_gist=num_gist,
                          device=device)
    console.print(f"[bold]Document[/] {document}: {result.document_tokens:,} tokens, {result.chunks} chunk(s), "
                  f"compressed in {result.compress_seconds:.2f} s -> {result.blob_path}")
    answers = Table(title="Answers", show_lines=True)
    answers.add_column("question")
    headers = {"press": f"{DEMO_PRESS} {DEMO_RATIO:g}"}
    for name in METHODS:
        answers.add_column(headers.get(name, name))
    for i, q in enumerate(questions):
        answers.add_row(q, *(result.answers[name][i] for name in METHODS))
    console.print(answers)
    console.print(f"gist answers from the gist blob alone; {DEMO_PRESS} from the press blob alone (the reader's own KV "
                  f"cache, {100 * result.press_kept_fraction:.1f}% of its entries kept); full reads the whole "
                  f"document; rag reads its top chunks. The press, full and rag read with: {result.reader}.",
                  highlight=False)
    costs = Table(title="What each method keeps and how fast it answers")
    vs_full = f"vs full KV at {result.blob_dtype}"
    for column in ("method", "kept per document", "bytes", vs_full, "mean TTFT"):
        costs.add_column(column, justify="right" if column not in ("method", "kept per document") else "left")
    kept = {"gist": f"gist KV blob on disk ({result.blob_dtype})",
            "press": f"{DEMO_PRESS} press blob on disk ({result.blob_dtype})",
            "full": "the whole KV cache (model dtype)", "rag": "vector index + chunk text"}
    for name in METHODS:
        size = result.state_bytes[name]
        ratio = "-" if name == "full" else f"{result.full_kv_bytes / size:.1f}x smaller"
        costs.add_row(name, kept[name], f"{size:,}", ratio, f"{statistics.mean(result.ttft_ms[name]):.0f} ms")
    console.print(costs)
    console.print(f"full KV of the document at {result.blob_dtype}: {result.full_kv_bytes:,} bytes (the blob's dtype, "
                  "as `gistctl compress` compares).", highlight=False)
    run.write_json("demo.json", {"document_tokens": result.document_tokens, "chunks": result.chunks,
                                 "state_bytes": result.state_bytes, "full_kv_bytes": result.full_kv_bytes,
                                 "full_kv_dtype": result.blob_dtype, "press": DEMO_PRESS, "ratio": DEMO_RATIO,
                                 "press_kept_fraction": result.press_kept_fraction, "reader": result.reader,
                                 "answers": result.answers, "ttft_ms": result.ttft_ms, "questions": list(questions)})
