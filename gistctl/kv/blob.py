"""The gist KV blob: a safetensors file with the gist positions' keys/values and self-describing metadata.

Tensors: `keys`, `values`, each (layers, kv_heads, K_total, head_dim) with K_total = K x chunks
(GQA models store KV heads, not attention heads). Metadata: one JSON string under the key `gistctl`
(safetensors metadata is str -> str), see `BlobMeta`. Written atomically; read back with full validation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from gistctl import __version__
from gistctl.errors import BlobError
from gistctl.gist.chunks import CHUNKINGS, FIXED
from gistctl.gist.positions import LAYOUTS, SEQUENTIAL
from gistctl.kv.sizes import kv_bytes
from gistctl.runs import atomic_write_bytes, utc_now

if TYPE_CHECKING:
    from gistctl.kv.compress import CompressStats

FORMAT_VERSION = 2  # 2: `checksum` covers the metadata and the tensors; 1 (gistctl < 0.2): the tensors only
META_KEY = "gistctl"
BLOB_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "int8": torch.int8}
SCALE_DTYPE = torch.float16  # int8 blobs: keys scaled per channel, values per gist (KIVI's split), scales in fp16
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class BlobMeta:
    model_id: str
    model_fingerprint: str
    adapter: str | None  # a shipped adapter's name, or the directory of another (None: untrained gist tokens)
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
    positions: str = SEQUENTIAL  # the gist layout (gistctl.gist.positions); blobs before it were sequential
    chunking: str = FIXED  # how the document was split into chunks (gistctl.gist.chunks); blobs before it: fixed
    checksum: str = ""  # sha256 of the tensors' bytes and of every other metadata field (`blob_checksum`)
    format_version: int = FORMAT_VERSION
    gistctl_version: str = __version__
    created_at: str = field(default_factory=utc_now)

    @property
    def total_gists(self) -> int:
        return self.num_gist * self.num_chunks

    @property
    def full_kv_bytes(self) -> int:
        """Bytes of the document's full KV cache at this blob's dtype (like for like with the blob):
        2 (keys, values) x layers x kv_heads x document tokens x head_dim x bytes per value."""
        return kv_bytes(self.layers, self.kv_heads, self.head_dim, self.document_tokens,
                        BLOB_DTYPES[self.dtype].itemsize)


@dataclass
class GistBlob:
    """A compressed document: the gists' keys and values, each (layers, kv_heads, K x chunks, head_dim) in
    `meta.dtype`, and the metadata that says how to ask it (`BlobMeta`). `gistctl.Blob` is this class."""

    keys: torch.Tensor
    values: torch.Tensor
    meta: BlobMeta
    # int8 blobs only: keys = int8 x key_scales (layers, kv_heads, 1, head_dim: one per channel over the gists),
    # values = int8 x value_scales (layers, kv_heads, K x chunks, 1: one per gist)
    key_scales: torch.Tensor | None = None
    value_scales: torch.Tensor | None = None
    stats: CompressStats | None = field(default=None, compare=False, repr=False)  # set by compress, not stored

    def shape(self) -> tuple[int, int, int, int]:
        m = self.meta
        return (m.layers, m.kv_heads, m.total_gists, m.head_dim)

    def tensors(self) -> dict[str, torch.Tensor]:
        """What the file stores, in checksum order."""
        stored = {"keys": self.keys, "values": self.values}
        if self.key_scales is not None:
            stored.update(key_scales=self.key_scales, value_scales=self.value_scales)
        return stored

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors (the file adds a small header: `save` returns the file's size)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def float_kv(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) as floats of `dtype`, dequantized when the blob is int8."""
        if self.key_scales is None:
            return self.keys.to(dtype), self.values.to(dtype)
        return ((self.keys.float() * self.key_scales.float()).to(dtype),
                (self.values.float() * self.value_scales.float()).to(dtype))

    def save(self, path: str | Path) -> int:
        """Write the blob to `path` atomically (safetensors + metadata); returns the file size in bytes."""
        return write_blob(self, path)

    @classmethod
    def load(cls, path: str | Path) -> "GistBlob":
        """Read and validate a blob file (format, shapes, checksum)."""
        return read_blob(path)


def quantize_int8(keys: torch.Tensor, values: torch.Tensor):
    """(int8 keys, int8 values, key_scales, value_scales): symmetric, keys per channel (layers, kv_heads, 1,
    head_dim), values per gist (layers, kv_heads, K_total, 1); keys carry RoPE's outlier channels, so one scale
    per channel keeps the small ones, as in KIVI. Scales are rounded to fp16 before quantizing, so x ~ q x scale
    with the scales as stored."""
    def one(x: torch.Tensor, dim: int):
        x = x.float()
        scale = (x.abs().amax(dim=dim, keepdim=True) / 127).clamp(min=1e-8).to(SCALE_DTYPE)
        return (x / scale.float()).round().clamp(-127, 127).to(torch.int8), scale

    qk, key_scales = one(keys, 2)
    qv, value_scales = one(values, 3)
    return qk, qv, key_scales, value_scales


def blob_checksum(tensors, metadata: dict) -> str:
    """sha256 over the stored tensors' bytes (keys, values, then any scales), then the metadata (every field but
    `checksum`) as sorted JSON."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    digest.update(json.dumps({k: v for k, v in metadata.items() if k != "checksum"}, sort_keys=True).encode())
    return digest.hexdigest()


def write_blob(blob: GistBlob, path: str | Path) -> int:
    """Write atomically; returns the file size in bytes. Write errors are a BlobError (one line)."""
    stored = {name: t.detach().to("cpu").contiguous() for name, t in blob.tensors().items()}
    blob.meta.checksum = ""
    blob.meta.checksum = blob_checksum(stored.values(), dataclasses.asdict(blob.meta))
    _check_shapes(blob.meta, stored, str(path))
    check_output_path(path)
    data = save(stored,
                metadata={META_KEY: json.dumps(dataclasses.asdict(blob.meta), sort_keys=True)})
    try:
        atomic_write_bytes(path, data)
    except OSError as err:
        raise BlobError(f"cannot write blob '{path}': {err.strerror or err}") from err
    return Path(path).stat().st_size


def check_output_path(path: str | Path) -> Path:
    """Refuse, before any work, an output path that cannot take a file: a directory, or a folder that is
    missing its parent chain under a file or that this user cannot write to."""
    path = Path(path)
    if path.is_dir():
        raise BlobError(f"output '{path}' is a directory; give a file name such as {path / 'doc.kv'}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise BlobError(f"output '{path}': '{parent}' is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BlobError(f"output '{path}': no permission to write in '{parent}'")
    return path


def _check_shapes(meta: BlobMeta, stored: dict[str, torch.Tensor], where: str) -> None:
    expected = (meta.layers, meta.kv_heads, meta.total_gists, meta.head_dim)
    scales = {"key_scales": (meta.layers, meta.kv_heads, 1, meta.head_dim),
              "value_scales": (meta.layers, meta.kv_heads, meta.total_gists, 1)}
    wanted = {"keys", "values", *(scales if meta.dtype == "int8" else ())}
    if set(stored) != wanted:
        raise BlobError(f"{where}: holds tensors {', '.join(sorted(stored))}; a {meta.dtype} blob holds "
                        f"{', '.join(sorted(wanted))}")
    for name, shape in scales.items():
        if name in stored and (tuple(stored[name].shape) != shape or stored[name].dtype != SCALE_DTYPE):
            raise BlobError(f"{where}: {name} must be {shape} {SCALE_DTYPE}")
    keys, values = stored["keys"], stored["values"]
    for name, tensor in (("keys", keys), ("values", values)):
        if tuple(tensor.shape) != expected:
            raise BlobError(f"{where}: shape mismatch: {name} is {tuple(tensor.shape)} but the metadata says "
                            f"{expected} (layers, kv_heads, K x chunks, head_dim)")
        if tensor.dtype != BLOB_DTYPES[meta.dtype]:
            raise BlobError(f"{where}: {name} are {tensor.dtype} but the metadata says {meta.dtype}")
    if len(meta.gist_positions) != meta.total_gists:
        raise BlobError(f"{where}: shape mismatch: {len(meta.gist_positions)} gist positions for "
                        f"{meta.total_gists} stored gists")


def _is_int(value, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _validate(data: dict, where: str) -> None:
    """Every field's type, and the fields' agreement with each other; one line naming the first bad field."""
    def bad(field_name: str, why: str):
        raise BlobError(f"{where}: corrupt metadata: {field_name} {why}")

    for name in ("model_id", "gistctl_version", "created_at"):
        if not isinstance(data[name], str) or not data[name]:
            bad(name, "must be a non-empty string")
    for name in ("model_fingerprint", "document_sha256", "checksum"):
        if not isinstance(data[name], str) or not _HEX64.match(data[name]):
            bad(name, "must be a sha256 (64 hex digits)")
    if data["adapter"] is not None and (not isinstance(data["adapter"], str) or not data["adapter"]):
        bad("adapter", "must be a name, a directory or null")
    fingerprint = data["adapter_fingerprint"]
    if not isinstance(fingerprint, str) or not (fingerprint == "none" or _HEX64.match(fingerprint)):
        bad("adapter_fingerprint", "must be a sha256 or 'none'")
    for name in ("num_gist", "num_chunks", "document_tokens", "chunk_tokens", "layers", "kv_heads", "head_dim"):
        if not _is_int(data[name], 1):
            bad(name, f"must be a positive integer, got {data[name]!r}")
    if data["dtype"] not in BLOB_DTYPES:
        bad("dtype", f"must be one of {', '.join(BLOB_DTYPES)}, got {data['dtype']!r}")
    if data["positions"] not in LAYOUTS:
        bad("positions", f"must be one of {', '.join(LAYOUTS)}, got {data['positions']!r}")
    if data["chunking"] not in CHUNKINGS:
        bad("chunking", f"must be one of {', '.join(CHUNKINGS)}, got {data['chunking']!r}")
    if not isinstance(data["rope"], dict):
        bad("rope", "must be an object")
    ids = data["gist_ids"]
    if not isinstance(ids, list) or len(ids) != data["num_gist"] or not all(_is_int(i) for i in ids):
        bad("gist_ids", f"must be {data['num_gist']} token ids (num_gist)")
    expected_chunks = max(1, -(-data["document_tokens"] // data["chunk_tokens"]))
    if data["num_chunks"] != expected_chunks:
        bad("num_chunks", f"is {data['num_chunks']} but {data['document_tokens']} tokens in chunks of "
                          f"{data['chunk_tokens']} make {expected_chunks}")
    positions = data["gist_positions"]
    total = data["num_gist"] * data["num_chunks"]
    if not isinstance(positions, list) or len(positions) != total or not all(_is_int(p) for p in positions):
        bad("gist_positions", f"must be {total} positions (K x chunks)")
    if not _is_int(data["next_position"], max(positions) + 1):
        bad("next_position", "must be an integer past every gist position")


def read_blob_meta(path: str | Path) -> BlobMeta:
    """Metadata only (cheap): the header of the safetensors file, validated field by field."""
    meta, _ = _read_header(Path(path))
    return meta


def _read_header(path: Path) -> tuple[BlobMeta, dict]:
    if not path.is_file():
        if path.is_dir():
            raise BlobError(f"'{path}' is a directory, not a blob")
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
    if not _is_int(version):
        raise BlobError(f"'{path}': corrupt metadata (no format_version)")
    if version > FORMAT_VERSION:
        raise BlobError(f"'{path}' uses blob format {version}, newer than this gistctl understands "
                        f"({FORMAT_VERSION}); upgrade gistctl")
    if version < FORMAT_VERSION:
        raise BlobError(f"'{path}' uses blob format {version} (gistctl < 0.2), whose checksum does not cover its "
                        f"metadata; compress the document again")
    known = {f.name for f in dataclasses.fields(BlobMeta)}
    missing = sorted(known - set(data))
    if missing:
        raise BlobError(f"'{path}': corrupt metadata (missing {', '.join(missing)})")
    _validate(data, f"'{path}'")
    return BlobMeta(**{k: v for k, v in data.items() if k in known}), data


def read_blob(path: str | Path) -> GistBlob:
    """Read and validate: readable file, gistctl metadata, known format, every field, shapes, dtype, and the
    checksum over the tensors and the metadata."""
    path = Path(path)
    meta, data = _read_header(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            stored = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise BlobError(f"'{path}' is truncated or corrupt ({err}); compress the document again") from err
    _check_shapes(meta, stored, str(path))
    order = ["keys", "values", "key_scales", "value_scales"]
    if blob_checksum([stored[n] for n in order if n in stored], data) != meta.checksum:
        raise BlobError(f"'{path}': checksum mismatch: the blob was modified after it was written; compress the "
                        "document again")
    return GistBlob(stored["keys"], stored["values"], meta, stored.get("key_scales"), stored.get("value_scales"))


def check_blob_matches(meta: BlobMeta, model_fingerprint: str, adapter_fingerprint: str, model_id: str,
                       adapter: str | None, where: str = "blob") -> None:
    """Refuse a blob made with another base model or adapter, saying which is which."""
    if meta.model_fingerprint != model_fingerprint or meta.adapter_fingerprint != adapter_fingerprint:
        raise BlobError(
            f"{where} was made with {meta.model_id} + adapter {meta.adapter or 'none'} "
            f"({meta.model_fingerprint[:12]}/{meta.adapter_fingerprint[:12]}), you loaded {model_id} + adapter "
            f"{adapter or 'none'} ({model_fingerprint[:12]}/{adapter_fingerprint[:12]}); "
            f"ask with the matching --model/--adapter or compress again")
