"""The demo: compress one document, answer questions from the blob, and compare with full context and RAG."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from gistctl.engine import load, open_text_method, read_document

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
    state_bytes: dict[str, int]  # per method: what is kept per document (full: its KV in the model's dtype)
    full_kv_bytes: int  # the document's full KV cache at the blob's dtype: what "x smaller" compares with
    blob_dtype: str
    answers: dict[str, list[str]] = field(default_factory=dict)  # method -> answer per question
    ttft_ms: dict[str, list[float]] = field(default_factory=dict)


def run_demo(document: str | Path = EXAMPLE_DOCUMENT, questions: tuple[str, ...] = EXAMPLE_QUESTIONS, *,
             out_dir: Path, model: str | None = None, adapter: str | None = None, num_gist: int | None = None,
             device: str | None = None, max_new_tokens: int = 24) -> DemoResult:
    """Compress `document` into `out_dir/document.kv`, then ask every question with gist, full and rag."""
    text = read_document(document)
    gc = load(model, adapter, num_gist=num_gist, device=device)
    start = time.perf_counter()
    blob = gc.compress(text)
    blob_path = Path(out_dir) / "document.kv"
    size = blob.save(blob_path)
    compress_seconds = time.perf_counter() - start
    base = model if model is not None else gc.gist_model.loaded.name  # a clean base: the gist model is merged
    full = open_text_method("full", model=base, device=device, truncate=True, max_new_tokens=max_new_tokens)
    rag = open_text_method("rag", device=device, rag={"index_dir": str(Path(out_dir) / "rag-index")},
                           max_new_tokens=max_new_tokens, loaded=full.loaded)
    states = {"full": full.prepare(text), "rag": rag.prepare(text)}
    result = DemoResult(blob.meta.document_tokens, blob.meta.num_chunks, blob_path, compress_seconds,
                        {"gist": size, "full": full.state_bytes(states["full"]), "rag": rag.state_bytes(states["rag"])},
                        blob.meta.full_kv_bytes, blob.meta.dtype)
    asked = {"gist": gc.ask(blob, list(questions), max_new_tokens=max_new_tokens),
             "full": [full.answer(states["full"], q) for q in questions],
             "rag": [rag.answer(states["rag"], q) for q in questions]}
    for name in METHODS:
        result.answers[name] = [a.text for a in asked[name]]
        result.ttft_ms[name] = [a.ttft_ms for a in asked[name]]
    return result
