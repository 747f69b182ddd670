"""The KV blob: a safetensors file with the kept keys/values and self-describing metadata.

Gist blobs: `keys`, `values`, each (layers, kv_heads, K_total, head_dim) with K_total = K x chunks
(GQA models store KV heads, not attention heads). Press blobs (`meta.press` set): the entries a press kept,
ragged: `keys`, `values` each (sum of kept_counts, head_dim), layer by layer and head by head in position order,
`meta.kept_counts` (layers x kv_heads) saying how many each head kept; no padding on disk. Metadata: one JSON string under the key `gistctl`
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
from gistctl.gist.positions import COMPACT, LAYOUTS, SEQUENTIAL
from gistctl.kv.sizes import kv_bytes
from gistctl.runs import atomic_write_bytes, utc_now

if TYPE_CHECKING:
    from gistctl.kv.compress import CompressStats

FORMAT_VERSION = 3  # 3: press blobs (press, ratio, budget, prefix_tokens, kept_counts); 2: gist blobs only;
# 1 (gistctl < 0.2): the checksum covered the tensors only
ADDED_IN_3 = ("press", "ratio", "budget", "prefix_tokens", "kept_counts")
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
    press: str | None = None  # the press that chose the entries (gistctl.kv.presses); None: a gist blob
    ratio: float = 0.0  # press blobs: the fraction of the prefilled entries removed
    budget: str | None = None  # press blobs: global (one threshold over all heads) or uniform (a count per head)
    prefix_tokens: int = 0  # press blobs: entries per head before the press (the template's head + the document)
    kept_counts: list[list[int]] | None = None  # press blobs: entries kept per (layer, KV head)
    checksum: str = ""  # sha256 of the tensors' bytes and of every other metadata field (`blob_checksum`)
    format_version: int = FORMAT_VERSION
    gistctl_version: str = __version__
    created_at: str = field(default_factory=utc_now)

    @property
    def total_gists(self) -> int:
        return self.num_gist * self.num_chunks

    @property
    def kept_entries(self) -> int:
        """Entries stored over all layers and heads (a gist blob: gists x layers x kv_heads)."""
        if self.press is not None:
            return sum(map(sum, self.kept_counts))
        return self.total_gists * self.layers * self.kv_heads

    @property
    def kept_fraction(self) -> float:
        """Stored entries / the entries of the document's full cache (layers x kv_heads x document tokens)."""
        return self.kept_entries / (self.layers * self.kv_heads * self.document_tokens)

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

    def shape(self) -> tuple[int, ...]:
        return stored_shape(self.meta)

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
        """(keys, values) as stored (see `shape`) as floats of `dtype`, dequantized when the blob is int8."""
        if self.key_scales is None:
            return self.keys.to(dtype), self.values.to(dtype)
        key_scales = self.key_scales.float()
        if self.meta.press is not None:  # one scale row per (layer, head), repeated over that head's entries
            key_scales = key_scales.flatten(0, 1).repeat_interleave(_counts(self.meta), dim=0)
        return ((self.keys.float() * key_scales).to(dtype), (self.values.float() * self.value_scales.float()).to(dtype))

    def padded_kv(self, dtype: torch.dtype = torch.float32):
        """(keys, values, keep) for a cache: keys/values (layers, kv_heads, entries, head_dim); keep (layers, kv_heads,
        entries) bool marks real entries, None when every entry is real (gist blobs). A press blob's heads are
        padded to the longest head's count (memory only; the file holds no padding)."""
        keys, values = self.float_kv(dtype)
        if self.meta.press is None:
            return keys, values, None
        m = self.meta
        counts = _counts(m)
        longest = int(counts.max())
        keep = torch.arange(longest)[None] < counts[:, None]  # (layers x kv_heads, longest)
        padded_k = keys.new_zeros(m.layers * m.kv_heads, longest, m.head_dim)
        padded_v = values.new_zeros(m.layers * m.kv_heads, longest, m.head_dim)
        padded_k[keep], padded_v[keep] = keys, values
        shape = (m.layers, m.kv_heads, longest)
        return padded_k.view(*shape, m.head_dim), padded_v.view(*shape, m.head_dim), keep.view(shape)

    def save(self, path: str | Path) -> int:
        """Write the blob to `path` atomically (safetensors + metadata); returns the file size in bytes."""
        return write_blob(self, path)

    @classmethod
    def load(cls, path: str | Path) -> "GistBlob":
        """Read and validate a blob file (format, shapes, checksum)."""
        return read_blob(path)


def _counts(meta: BlobMeta) -> torch.Tensor:
    """(layers x kv_heads,) kept entries per head, layer-major."""
    return torch.tensor(meta.kept_counts, dtype=torch.long).flatten()


def stored_shape(meta: BlobMeta) -> tuple[int, ...]:
    """Shape of the stored keys and values: (layers, kv_heads, K x chunks, head_dim), or (kept entries, head_dim)
    for a press blob."""
    if meta.press is not None:
        return (meta.kept_entries, meta.head_dim)
    return (meta.layers, meta.kv_heads, meta.total_gists, meta.head_dim)


def quantize_ragged_int8(keys: torch.Tensor, values: torch.Tensor, counts: list[list[int]]):
    """int8 for a press blob's ragged (entries, head_dim) keys/values: keys per channel within each (layer, head)
    -> key_scales (layers, kv_heads, head_dim); values per entry -> value_scales (entries, 1)."""
    flat = [c for row in counts for c in row]
    parts = torch.split(keys.float(), flat)
    key_scales = torch.stack([(p.abs().amax(dim=0) if len(p) else torch.zeros(keys.shape[-1])) / 127
                              for p in parts]).clamp(min=1e-8).to(SCALE_DTYPE)
    scale_rows = key_scales.float().repeat_interleave(torch.tensor(flat), dim=0)
    qk = (keys.float() / scale_rows).round().clamp(-127, 127).to(torch.int8)
    value_scales = (values.float().abs().amax(dim=-1, keepdim=True) / 127).clamp(min=1e-8).to(SCALE_DTYPE)
    qv = (values.float() / value_scales.float()).round().clamp(-127, 127).to(torch.int8)
    return qk, qv, key_scales.view(len(counts), len(counts[0]), -1), value_scales


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
    expected = stored_shape(meta)
    if meta.press is not None:
        scales = {"key_scales": (meta.layers, meta.kv_heads, meta.head_dim), "value_scales": (meta.kept_entries, 1)}
    else:
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
            layout = ("(kept entries, head_dim)" if meta.press is not None
                      else "(layers, kv_heads, K x chunks, head_dim)")
            raise BlobError(f"{where}: shape mismatch: {name} is {tuple(tensor.shape)} but the metadata says "
                            f"{expected} {layout}")
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
    def one_of(name: str, choices) -> None:
        if data[name] not in choices:
            bad(name, f"must be one of {', '.join(choices)}, got {data[name]!r}")

    one_of("dtype", BLOB_DTYPES)
    if not isinstance(data["rope"], dict):
        bad("rope", "must be an object")
    if data["press"] is not None:
        _validate_press(data, bad, one_of)
        return
    for name in ("num_gist", "num_chunks", "document_tokens", "chunk_tokens", "layers", "kv_heads", "head_dim"):
        if not _is_int(data[name], 1):
            bad(name, f"must be a positive integer, got {data[name]!r}")
    one_of("positions", LAYOUTS)
    one_of("chunking", CHUNKINGS)
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
    expected, question_at = layout_positions(data["document_tokens"], data["chunk_tokens"], data["chunking"],
                                             data["num_gist"], data["positions"])
    if positions != expected:
        bad("gist_positions", f"disagree with the {data['positions']} layout of {data['document_tokens']} tokens in "
                              f"chunks of {data['chunk_tokens']}")
    if data["next_position"] != question_at:
        bad("next_position", f"is {data['next_position']} but the {data['positions']} layout puts the question at "
                             f"{question_at}")


def layout_positions(document_tokens: int, chunk_tokens: int, chunking: str, num_gist: int,
                     layout: str) -> tuple[list[int], int]:
    """(every gist's position, the question's first position) that compress gives a document of this length:
    sequential after each chunk in one long sequence; compact at 0 .. chunks x K - 1 (gistctl.gist.positions)."""
    from gistctl.gist.chunks import split_chunks

    lengths = [len(c) for c in split_chunks(list(range(document_tokens)), chunk_tokens, chunking)]
    if layout == COMPACT:
        total = num_gist * len(lengths)
        return list(range(total)), total
    positions, at = [], 0
    for length in lengths:
        at += length
        positions += range(at, at + num_gist)
        at += num_gist
    return positions, at


def _validate_press(data: dict, bad, one_of) -> None:
    """A press blob's fields against each other: the question continues right after the prefilled entries, every
    head keeps between 1 and prefix_tokens entries, and the total agrees with the ratio under its budget."""
    from gistctl.kv.presses import BUDGETS, PRESSES

    for name in ("document_tokens", "prefix_tokens", "chunk_tokens", "layers", "kv_heads", "head_dim"):
        if not _is_int(data[name], 1):
            bad(name, f"must be a positive integer, got {data[name]!r}")
    one_of("press", PRESSES)
    ratio = data["ratio"]
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        bad("ratio", f"must be in [0, 1), got {ratio!r}")
    if data["press"] == "none" and ratio != 0:
        bad("ratio", "must be 0 for press none")
    one_of("budget", BUDGETS)
    n = data["prefix_tokens"]
    if n < data["document_tokens"]:
        bad("prefix_tokens", f"is {n}, fewer than the document's {data['document_tokens']} tokens")
    if data["num_gist"] != 0 or data["gist_ids"] != [] or data["gist_positions"] != [] or data["num_chunks"] != 1:
        bad("num_gist", "must be 0 with no gist ids or positions and one chunk in a press blob")
    if data["next_position"] != n:
        bad("next_position", f"is {data['next_position']!r} but the question continues after the {n} prefilled "
                             "entries")
    counts = data["kept_counts"]
    if (not isinstance(counts, list) or len(counts) != data["layers"]
            or not all(isinstance(row, list) and len(row) == data["kv_heads"] for row in counts)
            or not all(_is_int(c, 1) and c <= n for row in counts for c in row)):
        bad("kept_counts", f"must be {data['layers']} x {data['kv_heads']} counts between 1 and {n}")
    from gistctl.kv.presses.base import kept_per_head

    expected = kept_per_head(n, ratio) if data["budget"] == "uniform" else None
    total = sum(map(sum, counts))
    if expected is not None and any(c != expected for row in counts for c in row):
        bad("kept_counts", f"must all be {expected} under a uniform budget at ratio {ratio}")
    if total > data["layers"] * data["kv_heads"] * n:
        bad("kept_counts", "hold more entries than the document has")


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
    if version < 2:
        raise BlobError(f"'{path}' uses blob format {version} (gistctl < 0.2), whose checksum does not cover its "
                        f"metadata; compress the document again")
    known = {f.name for f in dataclasses.fields(BlobMeta)}
    missing = sorted(known - set(data) - (set(ADDED_IN_3) if version == 2 else set()))
    if missing:
        raise BlobError(f"'{path}': corrupt metadata (missing {', '.join(missing)})")
    defaults = {f.name: f.default for f in dataclasses.fields(BlobMeta) if f.name in ADDED_IN_3}
    filled = {**defaults, **data}  # a format-2 blob is a gist blob; its checksum covers the fields it has
    _validate(filled, f"'{path}'")
    return BlobMeta(**{k: v for k, v in filled.items() if k in known}), data


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
