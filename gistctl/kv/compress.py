"""Document -> gist KV blob: read the document once, keep only the gists' keys and values.

Documents longer than the adapter's chunk length are split on token boundaries (`fixed` or `even` chunks,
gistctl.gist.chunks); chunk i is read with
the gists of chunks 1..i-1 in the cache (the multi-chunk gist layout), so memory stays at one chunk.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Callable

import torch

from gistctl import prompt
from gistctl.errors import DataError
from gistctl.prompt import check_text
from gistctl.gist.adapter import shipped_adapter_name
from gistctl.gist.chunks import split_chunks
from gistctl.gist.forward import read_chunks
from gistctl.gist.model import GistModel
from gistctl.kv.blob import BLOB_DTYPES, BlobMeta, GistBlob, quantize_int8
from gistctl.gist.positions import COMPACT, SEQUENTIAL, layout_for
from gistctl.kv.sizes import kv_geometry

ANSWER_ROOM = 256  # positions kept free after the gists for the question and its answer


@dataclass
class CompressStats:
    document_tokens: int
    chunks: int
    seconds: float
    full_kv_bytes: int  # the document's full KV cache at the blob's dtype
    prefill_seconds: float | None = None  # press blobs: the one prefill of the document
    score_seconds: float | None = None  # press blobs: the press's scoring after it


def adapter_record(adapter_dir: str | None) -> str | None:
    """What a blob records of its adapter: a shipped adapter by name (so the blob outlives a moved install),
    any other by its directory."""
    if adapter_dir is None:
        return None
    return shipped_adapter_name(adapter_dir) or str(adapter_dir)


def rope_settings(config) -> dict:
    return {"rope_theta": getattr(config, "rope_theta", None),
            "rope_parameters": getattr(config, "rope_parameters", None),
            "max_position_embeddings": getattr(config, "max_position_embeddings", None)}


def num_chunks(gm: GistModel, document_tokens: int) -> int:
    return max(1, -(-document_tokens // gm.chunk_tokens))  # split_chunks gives one (empty) chunk for no tokens


def document_layout(gm: GistModel, document_tokens: int) -> str:
    """The concrete layout this document is read with: the model's, or per document under `auto`."""
    return layout_for(gm.positions, num_chunks(gm, document_tokens))


@torch.no_grad()
def compress_ids(gm: GistModel, ids: list[int], *, on_chunk: Callable[[int, int], None] | None = None):
    """Run [chunk_i][gists] chunk by chunk. Returns (keys, values, gist_positions, next_position, chunks).

    keys/values: (layers, kv_heads, K x chunks, head_dim) in the model's dtype. Positions follow the
    document's layout (`document_layout`, see gistctl.gist.positions).
    """
    chunks = split_chunks(ids, gm.chunk_tokens, gm.chunking)
    read = read_chunks(gm.model, chunks, gm.gist_ids, document_layout(gm, len(ids)), on_chunk=on_chunk)
    keys = torch.cat(read.keys, dim=0)  # (layers, kv_heads, K x chunks, head_dim): batch 1 -> layer axis
    values = torch.cat(read.values, dim=0)
    return keys, values, read.positions, read.next_position, len(chunks)


def positions_needed(gm: GistModel, document_tokens: int) -> int:
    """RoPE positions a document of this length takes under its layout, with room to answer."""
    gists = num_chunks(gm, document_tokens) * gm.num_gist
    if document_layout(gm, document_tokens) == COMPACT:  # the last chunk is read after all earlier gists
        return gists + max(min(document_tokens, gm.chunk_tokens), ANSWER_ROOM)
    return document_tokens + gists + ANSWER_ROOM


def compress_document(gm: GistModel, text: str, *, dtype: str = "fp16",
                      on_chunk: Callable[[int, int], None] | None = None) -> tuple[GistBlob, CompressStats]:
    """Compress `text` into a blob held in memory (write it with `write_blob`)."""
    if dtype not in BLOB_DTYPES:
        raise DataError(f"blob dtype must be one of {', '.join(BLOB_DTYPES)}, got '{dtype}'")
    check_text(text)
    start = time.perf_counter()
    config = gm.model.config
    ids = prompt.context_ids(gm.tokenizer, text)
    layout, needed = document_layout(gm, len(ids)), positions_needed(gm, len(ids))
    window = getattr(config, "max_position_embeddings", None)
    if window and needed > window:
        raise DataError(f"the document has {len(ids)} tokens; with gists and room to answer it needs {needed} "
                        f"positions but the model's window is {window}; split the document"
                        + (" or compress with --positions compact" if layout == SEQUENTIAL else ""))
    keys, values, positions, next_position, chunks = compress_ids(gm, ids, on_chunk=on_chunk)
    layers, kv_heads, head_dim = kv_geometry(config)
    torch_dtype = BLOB_DTYPES[dtype]
    meta = BlobMeta(
        model_id=gm.loaded.name, model_fingerprint=gm.loaded.fingerprint, adapter=adapter_record(gm.adapter_dir),
        adapter_fingerprint=gm.adapter_fingerprint, gist_ids=list(gm.gist_ids), num_gist=gm.num_gist,
        num_chunks=chunks, gist_positions=positions, next_position=next_position, rope=rope_settings(config),
        document_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(), document_tokens=len(ids),
        chunk_tokens=gm.chunk_tokens, chunking=gm.chunking, positions=layout, dtype=dtype, layers=layers,
        kv_heads=kv_heads, head_dim=head_dim)
    if dtype == "int8":
        qk, qv, key_scales, value_scales = quantize_int8(keys.to("cpu"), values.to("cpu"))
        blob = GistBlob(qk, qv, meta, key_scales, value_scales)
    else:
        blob = GistBlob(keys.to("cpu", torch_dtype), values.to("cpu", torch_dtype), meta)
    stats = CompressStats(len(ids), chunks, time.perf_counter() - start, meta.full_kv_bytes)
    return blob, stats
