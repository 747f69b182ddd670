"""Document -> press blob: prefill the reader once, score every cached entry with a press, keep the best.

The prefill is the chat prompt up to the document's end (`prompt.document_turn_ids`); a question asked of the blob
continues it at `next_position` with `prompt.question_turn_ids`, exactly as full context reads the two together.
Kept keys keep their RoPE rotation. The first `SINKS` entries (the template's start: attention sinks) are always
kept; they count in the budget, and the rest of the template's head competes with the document for it.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import torch

from gistctl import prompt
from gistctl.errors import ConfigError, DataError
from gistctl.gist.model import GistModel
from gistctl.kv.blob import BLOB_DTYPES, BlobMeta, GistBlob, quantize_ragged_int8
from gistctl.kv.compress import ANSWER_ROOM, CompressStats, adapter_record, rope_settings
from gistctl.kv.presses import GLOBAL, PrefilledDocument, check_budget, check_ratio, get_press, select_kept
from gistctl.kv.sizes import kv_geometry

SINKS = 4  # first entries every head keeps, as kvpress's KVzipPress (n_sink) and StreamingLLM


def check_press_ratio(press: str, ratio: float) -> None:
    """Refuse an unknown press, a ratio outside [0, 1), and press none at a ratio above 0 (before any model work)."""
    get_press(press)
    check_ratio(ratio)
    if press == "none" and ratio != 0:
        raise ConfigError(f"press none keeps every entry: its ratio is 0, got {ratio}")


@torch.no_grad()
def prefill_document(gm: GistModel, text: str) -> PrefilledDocument:
    """One prefill of the template's head and the document; refuses a document that leaves no room to answer."""
    prompt.check_text(text)
    tokenizer, model = gm.tokenizer, gm.model
    ids = prompt.document_turn_ids(tokenizer, text)
    window = getattr(model.config, "max_position_embeddings", None)
    if window and len(ids) + ANSWER_ROOM > window:
        raise DataError(f"the document takes {len(ids)} positions with the chat template; with room to answer it needs "
                        f"{len(ids) + ANSWER_ROOM} but the model's window is {window}; split the document")
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([ids], device=device), use_cache=True, logits_to_keep=1)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    keys = [layer.keys for layer in cache.layers]
    values = [layer.values for layer in cache.layers]
    return PrefilledDocument(model, tokenizer, ids, keys, values, protected=min(SINKS, len(ids)),
                             head=len(prompt.document_turn_ids(tokenizer, "")))


def press_blob(gm: GistModel, doc: PrefilledDocument, text: str, keep: torch.Tensor, *, press: str, ratio: float,
               budget: str, dtype: str = "fp16") -> GistBlob:
    """The kept entries (keep: (layers, kv_heads, N) bool) as a ragged blob at `dtype`."""
    if dtype not in BLOB_DTYPES:
        raise DataError(f"blob dtype must be one of {', '.join(BLOB_DTYPES)}, got '{dtype}'")
    config = gm.model.config
    layers, kv_heads, head_dim = kv_geometry(config)
    keys = torch.cat(doc.keys, dim=0).to("cpu")  # (layers, kv_heads, N, head_dim)
    values = torch.cat(doc.values, dim=0).to("cpu")
    kept_k, kept_v = keys[keep], values[keep]  # (entries, head_dim), layer-major, head-major, position order
    counts = keep.sum(dim=-1).tolist()
    document_tokens = len(prompt.context_ids(gm.tokenizer, text.rstrip())) or 1
    meta = BlobMeta(
        model_id=gm.loaded.name, model_fingerprint=gm.loaded.fingerprint, adapter=adapter_record(gm.adapter_dir),
        adapter_fingerprint=gm.adapter_fingerprint, gist_ids=[], num_gist=0, num_chunks=1, gist_positions=[],
        next_position=doc.length, rope=rope_settings(config),
        document_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(), document_tokens=document_tokens,
        chunk_tokens=doc.length, dtype=dtype, layers=layers, kv_heads=kv_heads, head_dim=head_dim, press=press,
        ratio=float(ratio), budget=budget, prefix_tokens=doc.length, kept_counts=counts)
    if dtype == "int8":
        qk, qv, key_scales, value_scales = quantize_ragged_int8(kept_k, kept_v, counts)
        return GistBlob(qk, qv, meta, key_scales, value_scales)
    torch_dtype = BLOB_DTYPES[dtype]
    return GistBlob(kept_k.to(torch_dtype), kept_v.to(torch_dtype), meta)


@dataclass
class ScoredDocument:
    """A document prefilled once and scored by one or more presses: what every blob of it at any ratio needs."""

    gm: GistModel
    text: str
    doc: PrefilledDocument
    scores: dict[str, torch.Tensor]  # press -> (layers, kv_heads, N)
    prefill_seconds: float
    score_seconds: dict[str, float]

    def blob(self, press: str, ratio: float, budget: str = GLOBAL, dtype: str = "fp16") -> GistBlob:
        keep = select_kept(self.scores[press], ratio, budget, self.doc.protected)
        return press_blob(self.gm, self.doc, self.text, keep, press=press, ratio=ratio, budget=budget, dtype=dtype)


def score_document(gm: GistModel, text: str, presses) -> ScoredDocument:
    """Prefill `text` once and score it with every press named (each timed)."""
    start = time.perf_counter()
    doc = prefill_document(gm, text)
    prefill_seconds = time.perf_counter() - start
    scores, seconds = {}, {}
    for press in dict.fromkeys(presses):
        begin = time.perf_counter()
        scores[press] = get_press(press).score(doc)
        seconds[press] = time.perf_counter() - begin
    return ScoredDocument(gm, text, doc, scores, prefill_seconds, seconds)


def compress_with_press(gm: GistModel, text: str, *, press: str = "kvzip", ratio: float = 0.9375,
                        budget: str = GLOBAL, dtype: str = "fp16") -> tuple[GistBlob, CompressStats]:
    """Prefill, score with `press`, keep (1 - ratio) of the entries under `budget`; the blob held in memory."""
    check_press_ratio(press, ratio)
    check_budget(budget)
    if dtype not in BLOB_DTYPES:
        raise DataError(f"blob dtype must be one of {', '.join(BLOB_DTYPES)}, got '{dtype}'")
    start = time.perf_counter()
    scored = score_document(gm, text, [press])
    blob = scored.blob(press, ratio, budget, dtype)
    stats = CompressStats(blob.meta.document_tokens, 1, time.perf_counter() - start, blob.meta.full_kv_bytes,
                          prefill_seconds=scored.prefill_seconds, score_seconds=scored.score_seconds[press])
    return blob, stats
