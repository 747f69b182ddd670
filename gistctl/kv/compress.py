"""Document -> gist KV blob: read the document once, keep only the gists' keys and values.

Documents longer than the adapter's chunk length are split on token boundaries; chunk i is read with
the gists of chunks 1..i-1 in the cache (the multi-chunk gist layout), so memory stays at one chunk.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import DynamicCache

from gistctl import prompt
from gistctl.errors import DataError
from gistctl.gist.collate import split_chunks
from gistctl.gist.lora import GistModel
from gistctl.gist.mask import mask_for_model, prefix_mask
from gistctl.kv.blob import BLOB_DTYPES, BlobMeta, GistBlob
from gistctl.kv.sizes import kv_cache_bytes, kv_geometry

ANSWER_ROOM = 256  # positions kept free after the gists for the question and its answer


@dataclass
class CompressStats:
    document_tokens: int
    chunks: int
    seconds: float
    full_kv_bytes: int  # the document's full KV cache at the blob's dtype


def rope_settings(config) -> dict:
    return {"rope_theta": getattr(config, "rope_theta", None),
            "rope_parameters": getattr(config, "rope_parameters", None),
            "max_position_embeddings": getattr(config, "max_position_embeddings", None)}


@torch.no_grad()
def compress_ids(gm: GistModel, ids: list[int], *, on_chunk: Callable[[int, int], None] | None = None):
    """Run [chunk_i][gists] chunk by chunk. Returns (keys, values, gist_positions, next_position, chunks).

    keys/values: (layers, kv_heads, K x chunks, head_dim) in the model's dtype.
    """
    model, k = gm.model, gm.num_gist
    device = next(model.parameters()).device
    chunks = split_chunks(ids, gm.chunk_tokens)
    layer_keys: list[torch.Tensor] = []
    layer_values: list[torch.Tensor] = []
    positions: list[int] = []
    position = 0
    for index, chunk in enumerate(chunks):
        segment = chunk + gm.gist_ids
        cached = len(positions)
        cache = DynamicCache(ddp_cache_data=list(zip(layer_keys, layer_values)), config=model.config) if cached else None
        out = model(input_ids=torch.tensor([segment], device=device),
                    position_ids=torch.arange(position, position + len(segment), device=device)[None],
                    attention_mask=mask_for_model(prefix_mask(cached, len(segment)), model),
                    cache=cache, use_cache=True, logits_to_keep=1)
        layers = out.cache.layers
        layer_keys = [layer.keys[:, :, list(range(cached)) + list(range(-k, 0))] for layer in layers]
        layer_values = [layer.values[:, :, list(range(cached)) + list(range(-k, 0))] for layer in layers]
        positions += list(range(position + len(chunk), position + len(segment)))
        position += len(segment)
        if on_chunk:
            on_chunk(index + 1, len(chunks))
    keys = torch.cat(layer_keys, dim=0)  # (layers, kv_heads, K x chunks, head_dim): batch 1 -> layer axis
    values = torch.cat(layer_values, dim=0)
    return keys, values, positions, position, len(chunks)


def compress_document(gm: GistModel, text: str, *, dtype: str = "fp16",
                      on_chunk: Callable[[int, int], None] | None = None) -> tuple[GistBlob, CompressStats]:
    """Compress `text` into a blob held in memory (write it with `write_blob`)."""
    if dtype not in BLOB_DTYPES:
        raise DataError(f"blob dtype must be one of {', '.join(BLOB_DTYPES)}, got '{dtype}'")
    if not text.strip():
        raise DataError("the document is empty")
    start = time.perf_counter()
    config = gm.model.config
    ids = prompt.context_ids(gm.tokenizer, text)
    n_chunks = -(-len(ids) // gm.chunk_tokens)
    needed = len(ids) + n_chunks * gm.num_gist + ANSWER_ROOM
    window = getattr(config, "max_position_embeddings", None)
    if window and needed > window:
        raise DataError(f"the document has {len(ids)} tokens; with gists and room to answer it needs {needed} "
                        f"positions but the model's window is {window}; split the document")
    keys, values, positions, next_position, chunks = compress_ids(gm, ids, on_chunk=on_chunk)
    layers, kv_heads, head_dim = kv_geometry(config)
    torch_dtype = BLOB_DTYPES[dtype]
    meta = BlobMeta(
        model_id=gm.loaded.name, model_fingerprint=gm.loaded.fingerprint, adapter=gm.adapter_dir,
        adapter_fingerprint=gm.adapter_fingerprint, gist_ids=list(gm.gist_ids), num_gist=gm.num_gist,
        num_chunks=chunks, gist_positions=positions, next_position=next_position, rope=rope_settings(config),
        document_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(), document_tokens=len(ids),
        chunk_tokens=gm.chunk_tokens, dtype=dtype, layers=layers, kv_heads=kv_heads, head_dim=head_dim)
    blob = GistBlob(keys.to("cpu", torch_dtype), values.to("cpu", torch_dtype), meta)
    stats = CompressStats(len(ids), chunks, time.perf_counter() - start,
                          kv_cache_bytes(config, len(ids), torch_dtype.itemsize))
    return blob, stats
