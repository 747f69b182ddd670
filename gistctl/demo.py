"""The demo: compress one document, answer questions from the blob, and compare with a press blob, full context and
RAG (the press, full and rag read with the shipped full-reader on the embedded model)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import dataclasses

from gistctl.engine import load, open_text_method, read_document, reader_for

EXAMPLE_DOCUMENT = Path(__file__).resolve().parents[1] / "examples" / "lighthouse.txt"
EXAMPLE_QUESTIONS = (
    "Who keeps the lighthouse on Marrow Island?",
    "What is the call sign of the radio room?",
    "In what year was the tower built?",
)
METHODS = ("gist", "press", "full", "rag")
# The press the demo shows, at the ratio the frontier bench picked on SQuAD-in-distractors (docs/results.md,
# "The compression frontier"): the highest ratio whose F1 kept at least 85% of full+lora's.
DEMO_PRESS, DEMO_RATIO = "kvzip", 0.75


@dataclass
class DemoResult:
    document_tokens: int
    chunks: int
    blob_path: Path
    compress_seconds: float
    state_bytes: dict[str, int]  # per method: what is kept per document (full: its KV in the model's dtype)
    full_kv_bytes: int  # the document's full KV cache at the blob's dtype: what "x smaller" compares with
    blob_dtype: str
    press_kept_fraction: float = 0.0  # the press blob's share of the document's KV entries
    reader: str = "none"  # what the press, full and rag read with
    answers: dict[str, list[str]] = field(default_factory=dict)  # method -> answer per question
    ttft_ms: dict[str, list[float]] = field(default_factory=dict)


def run_demo(document: str | Path = EXAMPLE_DOCUMENT, questions: tuple[str, ...] = EXAMPLE_QUESTIONS, *,
             out_dir: Path, model: str | None = None, adapter: str | None = None, num_gist: int | None = None,
             device: str | None = None, max_new_tokens: int = 24) -> DemoResult:
    """Compress `document` into `out_dir/document.kv` (gists) and `out_dir/document-<press>.kv` (a press blob), then
    ask every question with gist, the press, full and rag."""
    text = read_document(document)
    reader = reader_for(None, model)
    gc = load(model, adapter, num_gist=num_gist, device=device, reader=reader)
    start = time.perf_counter()
    blob = gc.compress(text)
    blob_path = Path(out_dir) / "document.kv"
    size = blob.save(blob_path)
    compress_seconds = time.perf_counter() - start
    pressed = gc.compress(text, press=DEMO_PRESS, ratio=DEMO_RATIO)
    press_size = pressed.save(Path(out_dir) / f"document-{DEMO_PRESS}.kv")
    read_with = gc.reader_model  # the reader the press opened: full and rag read with the same weights
    loaded = dataclasses.replace(read_with.loaded, model=read_with.model)
    full = open_text_method("full", device=device, truncate=True, max_new_tokens=max_new_tokens, loaded=loaded)
    rag = open_text_method("rag", device=device, rag={"index_dir": str(Path(out_dir) / "rag-index")},
                           max_new_tokens=max_new_tokens, loaded=loaded)
    states = {"full": full.prepare(text), "rag": rag.prepare(text)}
    result = DemoResult(blob.meta.document_tokens, blob.meta.num_chunks, blob_path, compress_seconds,
                        {"gist": size, "press": press_size, "full": full.state_bytes(states["full"]),
                         "rag": rag.state_bytes(states["rag"])},
                        blob.meta.full_kv_bytes, blob.meta.dtype, pressed.meta.kept_fraction, reader)
    asked = {"gist": gc.ask(blob, list(questions), max_new_tokens=max_new_tokens),
             "press": gc.ask(pressed, list(questions), max_new_tokens=max_new_tokens),
             "full": [full.answer(states["full"], q) for q in questions],
             "rag": [rag.answer(states["rag"], q) for q in questions]}
    for name in METHODS:
        result.answers[name] = [a.text for a in asked[name]]
        result.ttft_ms[name] = [a.ttft_ms for a in asked[name]]
    return result
