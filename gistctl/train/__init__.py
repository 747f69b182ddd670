"""Training gist adapters: the loop, checkpoints, and evaluation from the compressed KV."""
