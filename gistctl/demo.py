"""The demo: compress one document, answer questions from the blob, and compare with full context and RAG."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from gistctl.engine import open_gist_model, read_document
from gistctl.kv.blob import write_blob
from gistctl.kv.compress import compress_document
from gistctl.methods import get_method
from gistctl.methods.gist import GistState
from gistctl.models import load_embedder, load_model

EXAMPLE_DOCUMENT = Path(__file__).resolve().parents[1] / "examples" / "lighthouse.txt"
EXAMPLE_QUESTIONS = (
    "Who keeps the lighthouse on Marrow Island?",
    "What is the call sign of the radio room?",
    "In what year was the tower built?",
)
METHODS = ("gist", "full", "rag")


@dataclass
class DemoResult:
    document_tokens: int
    chunks: int
    blob_path: Path
    compress_seconds: float
    state_bytes: dict[str, int]  # per method: what is kept per document
    full_kv_bytes: int  # the document's full KV cache at fp16, as the blob
    answers: dict[str, list[str]] = field(default_factory=dict)  # method -> answer per question
    ttft_ms: dict[str, list[float]] = field(default_factory=dict)


def run_demo(document: str | Path = EXAMPLE_DOCUMENT, questions: tuple[str, ...] = EXAMPLE_QUESTIONS, *,
             out_dir: Path, model: str | None = None, adapter: str | None = None, num_gist: int | None = None,
             device: str | None = None, max_new_tokens: int = 24) -> DemoResult:
    """Compress `document` into `out_dir/document.kv`, then ask every question with gist, full and rag."""
    text = read_document(document)
    gm = open_gist_model(model, adapter, num_gist=num_gist, device=device)
    start = time.perf_counter()
    blob, stats = compress_document(gm, text)
    blob_path = Path(out_dir) / "document.kv"
    size = write_blob(blob, blob_path)
    compress_seconds = time.perf_counter() - start
    loaded = load_model(model if model is not None else gm.loaded.name, device=device)
    runners = {
        "gist": get_method("gist", gist_model=gm, max_new_tokens=max_new_tokens),
        "full": get_method("full", loaded=loaded, max_new_tokens=max_new_tokens, truncate=True),
        "rag": get_method("rag", loaded=loaded, embedder=load_embedder(device=device),
                          index_dir=str(Path(out_dir) / "rag-index"), max_new_tokens=max_new_tokens),
    }
    states = {"gist": GistState(blob, blob_path, size), "full": runners["full"].prepare(text),
              "rag": runners["rag"].prepare(text)}
    result = DemoResult(stats.document_tokens, stats.chunks, blob_path, compress_seconds,
                        {name: runners[name].state_bytes(states[name]) for name in METHODS}, stats.full_kv_bytes)
    for name in METHODS:
        answers = [runners[name].answer(states[name], q) for q in questions]
        result.answers[name] = [a.text for a in answers]
        result.ttft_ms[name] = [a.ttft_ms for a in answers]
    return result
