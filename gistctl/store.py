"""A content-addressed blob store: a directory of blobs named by what they are, shared by the CLI, the Python
API and `gistctl serve` (several servers may share one directory).

A document's id is a hash of everything that decides its blob: the document's sha256, the base model's and the
adapter's fingerprints, K, the chunk length, the chunk split, the position layout and the blob dtype. So the same
document read the same way is compressed once, and a blob is never answered by a model that did not make it.
Each entry is `<id>.kv` (the blob, validated on every read) and `<id>.json` (its name and sizes), both written
atomically; the directory itself is the index, so it survives restarts and needs no lock.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from gistctl.errors import GistctlError
from gistctl.kv.blob import FORMAT_VERSION, GistBlob, read_blob
from gistctl.runs import atomic_write_json, utc_now

ID_PATTERN = re.compile(r"[0-9a-f]{32}")  # use fullmatch: `$` would let a trailing newline through


class StoreError(GistctlError):
    """A document id that is malformed or not in the store."""


class UnknownDocument(StoreError):
    """No blob in the store under this id."""


def default_store_dir() -> Path:
    """`$GISTCTL_STORE`, default `<gistctl cache>/store`."""
    from gistctl.models import cache_dir

    return Path(os.environ.get("GISTCTL_STORE") or cache_dir() / "store")


def document_id(text: str, gist_model, dtype: str = "fp16", press: dict | None = None) -> str:
    """32 hex digits: sha256 of the document and of how it is read (model, adapter, K, chunks, layout, dtype; a
    press blob: the press, ratio and budget)."""
    payload = {**({"press": press} if press else {}),"document_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
               "model_fingerprint": gist_model.loaded.fingerprint,
               "adapter_fingerprint": gist_model.adapter_fingerprint, "num_gist": gist_model.num_gist,
               "chunk_tokens": gist_model.chunk_tokens, "chunking": gist_model.chunking,
               "positions": gist_model.positions, "dtype": dtype, "blob_format": FORMAT_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def check_store_dir(root: str | Path) -> Path:
    """Refuse, before any model loads, a store path that is a file or lies under one."""
    root = Path(root)
    for place in (root, *root.parents):
        if place.exists():
            if not place.is_dir():
                raise StoreError(f"store '{root}': '{place}' is a file, not a directory; give a directory for --store")
            break
    return root


@dataclass
class StoreEntry:
    """What the store knows of a document without reading its blob."""

    id: str
    name: str | None
    tokens: int  # document tokens
    chunks: int
    blob_bytes: int  # the blob file's size
    full_kv_bytes: int  # the document's full KV cache at the blob's dtype
    ratio: float  # full_kv_bytes / blob_bytes
    dtype: str
    model_id: str
    adapter: str | None
    created_at: str

    def to_json(self) -> dict:
        return asdict(self)


class BlobStore:
    """Blobs under `root`, named by document id."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_store_dir()
        check_store_dir(self.root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(f"cannot use '{self.root}' as a blob store: {err.strerror or err}") from err

    def _checked(self, doc_id: str) -> str:
        if not isinstance(doc_id, str) or not ID_PATTERN.fullmatch(doc_id):
            raise StoreError(f"'{doc_id}' is not a document id (32 hex digits)")
        return doc_id

    def blob_path(self, doc_id: str) -> Path:
        return self.root / f"{self._checked(doc_id)}.kv"

    def _info_path(self, doc_id: str) -> Path:
        return self.root / f"{self._checked(doc_id)}.json"

    def __contains__(self, doc_id: str) -> bool:
        return self.blob_path(doc_id).is_file()

    def put(self, doc_id: str, blob: GistBlob, name: str | None = None) -> StoreEntry:
        """Write the blob under `doc_id` (atomically), then its entry."""
        size = blob.save(self.blob_path(doc_id))
        entry = self._entry_from(doc_id, blob, size, name)
        atomic_write_json(self._info_path(doc_id), entry.to_json())
        return entry

    def _entry_from(self, doc_id: str, blob: GistBlob, size: int, name: str | None) -> StoreEntry:
        m = blob.meta
        return StoreEntry(doc_id, name, m.document_tokens, m.num_chunks, size, m.full_kv_bytes,
                          round(m.full_kv_bytes / size, 2), m.dtype, m.model_id, m.adapter, utc_now())

    def get(self, doc_id: str) -> GistBlob:
        """The blob, read and validated (format, fields, shapes, checksum)."""
        path = self.blob_path(doc_id)
        if not path.is_file():
            raise UnknownDocument(f"no document '{doc_id}' in the store {self.root}")
        return read_blob(path)

    def entry(self, doc_id: str) -> StoreEntry:
        path = self.blob_path(doc_id)
        if not path.is_file():
            raise UnknownDocument(f"no document '{doc_id}' in the store {self.root}")
        try:
            return StoreEntry(**json.loads(self._info_path(doc_id).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):  # the entry was lost: rebuild it from the blob itself
            blob = self.get(doc_id)
            entry = self._entry_from(doc_id, blob, path.stat().st_size, None)
            atomic_write_json(self._info_path(doc_id), entry.to_json())
            return entry

    def entries(self) -> list[StoreEntry]:
        found = []
        for path in sorted(self.root.glob("*.kv")):
            if ID_PATTERN.fullmatch(path.stem):
                try:
                    found.append(self.entry(path.stem))
                except GistctlError:
                    continue  # deleted meanwhile, or not a readable blob: not listed
        return found

    def delete(self, doc_id: str) -> bool:
        removed = False
        for path in (self.blob_path(doc_id), self._info_path(doc_id)):
            try:
                path.unlink()
                removed = True
            except FileNotFoundError:
                pass
        return removed

    def compress(self, gc, text: str, *, name: str | None = None, dtype: str = "fp16", press: str | None = None,
                 ratio: float | None = None, budget: str = "global") -> tuple[StoreEntry, bool]:
        """(entry, whether it was compressed now): a document already in the store is not compressed again.
        `press`/`ratio`/`budget`: a press blob (`Gistctl.compress`)."""
        settings = {"press": press, "ratio": ratio, "budget": budget} if press else None
        doc_id = document_id(text, gc.gist_model, dtype, settings)
        if doc_id in self:
            return self.entry(doc_id), False
        blob = gc.compress(text, dtype=dtype, press=press, ratio=ratio, budget=budget) if press else \
            gc.compress(text, dtype=dtype)
        return self.put(doc_id, blob, name), True
