"""The gist KV blob: a safetensors file with the gist positions' keys/values and self-describing metadata.

Tensors: `keys`, `values`, each (layers, kv_heads, K_total, head_dim) with K_total = K x chunks
(GQA models store KV heads, not attention heads). Metadata: one JSON string under the key `gistctl`
(safetensors metadata is str -> str), see `BlobMeta`. Written atomically; read back with full validation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from gistctl import __version__
from gistctl.errors import BlobError
from gistctl.gist.chunks import FIXED
from gistctl.kv.positions import SEQUENTIAL
from gistctl.runs import atomic_path, utc_now

FORMAT_VERSION = 1
META_KEY = "gistctl"
BLOB_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class BlobMeta:
    model_id: str
    model_fingerprint: str
    adapter: str | None  # adapter directory it was made with (None: untrained gist tokens)
    adapter_fingerprint: str
    gist_ids: list[int]
    num_gist: int  # K per chunk
    num_chunks: int
    gist_positions: list[int]  # RoPE position of every stored gist, in order
    next_position: int  # position of the first question token
    rope: dict
    document_sha256: str
    document_tokens: int
    chunk_tokens: int
    dtype: str
    layers: int
    kv_heads: int
    head_dim: int
    positions: str = SEQUENTIAL  # the gist layout (gistctl.kv.positions); blobs before it were sequential
    chunking: str = FIXED  # how the document was split into chunks (gistctl.gist.chunks); blobs before it: fixed
    tensor_sha256: str = ""
    format_version: int = FORMAT_VERSION
    gistctl_version: str = __version__
    created_at: str = field(default_factory=utc_now)

    @property
    def total_gists(self) -> int:
        return self.num_gist * self.num_chunks


@dataclass
class GistBlob:
    """keys, values: (layers, kv_heads, K_total, head_dim)."""

    keys: torch.Tensor
    values: torch.Tensor
    meta: BlobMeta

    def shape(self) -> tuple[int, int, int, int]:
        m = self.meta
        return (m.layers, m.kv_heads, m.total_gists, m.head_dim)


def _tensor_digest(keys: torch.Tensor, values: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for tensor in (keys, values):
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def write_blob(blob: GistBlob, path: str | Path) -> int:
    """Write atomically; returns the file size in bytes."""
    keys = blob.keys.detach().to("cpu").contiguous()
    values = blob.values.detach().to("cpu").contiguous()
    blob.meta.tensor_sha256 = _tensor_digest(keys, values)
    _check_shapes(blob.meta, keys, values, str(path))
    with atomic_path(path) as tmp:
        save_file({"keys": keys, "values": values}, str(tmp),
                  metadata={META_KEY: json.dumps(dataclasses.asdict(blob.meta), sort_keys=True)})
    return Path(path).stat().st_size


def _check_shapes(meta: BlobMeta, keys: torch.Tensor, values: torch.Tensor, where: str) -> None:
    expected = (meta.layers, meta.kv_heads, meta.total_gists, meta.head_dim)
    for name, tensor in (("keys", keys), ("values", values)):
        if tuple(tensor.shape) != expected:
            raise BlobError(f"{where}: shape mismatch: {name} is {tuple(tensor.shape)} but the metadata says "
                            f"{expected} (layers, kv_heads, K x chunks, head_dim)")
    if len(meta.gist_positions) != meta.total_gists:
        raise BlobError(f"{where}: shape mismatch: {len(meta.gist_positions)} gist positions for "
                        f"{meta.total_gists} stored gists")


def read_blob_meta(path: str | Path) -> BlobMeta:
    """Metadata only (cheap): the header of the safetensors file, validated."""
    path = Path(path)
    if not path.is_file():
        raise BlobError(f"blob '{path}' does not exist; make one with `gistctl compress DOC -o {path.name}`")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(META_KEY)
    except (SafetensorError, OSError, ValueError) as err:
        raise BlobError(f"'{path}' is not a gistctl blob (not a readable safetensors file: {err})") from err
    if raw is None:
        raise BlobError(f"'{path}' is not a gistctl blob (a safetensors file without gistctl metadata)")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as err:
        raise BlobError(f"'{path}': corrupt metadata (not valid JSON: {err})") from err
    version = data.get("format_version") if isinstance(data, dict) else None
    if not isinstance(version, int):
        raise BlobError(f"'{path}': corrupt metadata (no format_version)")
    if version > FORMAT_VERSION:
        raise BlobError(f"'{path}' uses blob format {version}, newer than this gistctl understands "
                        f"({FORMAT_VERSION}); upgrade gistctl")
    known = {f.name for f in dataclasses.fields(BlobMeta)}
    missing = [f.name for f in dataclasses.fields(BlobMeta)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in data]
    if missing:
        raise BlobError(f"'{path}': corrupt metadata (missing {', '.join(missing)})")
    return BlobMeta(**{k: v for k, v in data.items() if k in known})


def read_blob(path: str | Path) -> GistBlob:
    """Read and validate: readable file, gistctl metadata, known format, shapes, content checksum."""
    meta = read_blob_meta(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys, values = handle.get_tensor("keys"), handle.get_tensor("values")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise BlobError(f"'{path}' is truncated or corrupt ({err}); compress the document again") from err
    _check_shapes(meta, keys, values, str(path))
    if meta.tensor_sha256 and _tensor_digest(keys, values) != meta.tensor_sha256:
        raise BlobError(f"'{path}': content checksum mismatch: the KV data was modified after it was written")
    return GistBlob(keys, values, meta)


def check_blob_matches(meta: BlobMeta, model_fingerprint: str, adapter_fingerprint: str, model_id: str,
                       adapter: str | None, where: str = "blob") -> None:
    """Refuse a blob made with another base model or adapter, saying which is which."""
    if meta.model_fingerprint != model_fingerprint or meta.adapter_fingerprint != adapter_fingerprint:
        raise BlobError(
            f"{where} was made with {meta.model_id} + adapter {meta.adapter or 'none'} "
            f"({meta.model_fingerprint[:12]}/{meta.adapter_fingerprint[:12]}), you loaded {model_id} + adapter "
            f"{adapter or 'none'} ({model_fingerprint[:12]}/{adapter_fingerprint[:12]}); "
            f"ask with the matching --model/--adapter or compress again")
