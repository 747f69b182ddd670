"""Gist compression: prepare = compress the document into a blob on disk; answer from the blob alone."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from gistctl import prompt
from gistctl.gist.model import GistModel
from gistctl.kv.blob import GistBlob, read_blob
from gistctl.methods.base import Answer, register


@dataclass
class GistState:
    blob: GistBlob
    path: Path  # where the blob lives on disk
    bytes_on_disk: int


@register("gist")
@dataclass
class Gist:
    """Reads the document once; keeps K gist positions' KV per chunk (through `gistctl.engine.Gistctl`)."""

    gist_model: GistModel
    blob_dir: str | None = None  # where blobs are written (a temp dir when None)
    dtype: str = "fp16"
    max_new_tokens: int = prompt.MAX_NEW_TOKENS
    name: str = "gist"
    warnings: list[str] | None = None
    _count: int = field(default=0, repr=False)

    def __post_init__(self):
        from gistctl.engine import Gistctl

        self.api = Gistctl(self.gist_model)

    def prepare(self, document: str) -> GistState:
        blob = self.api.compress(document, dtype=self.dtype)
        directory = Path(self.blob_dir or tempfile.mkdtemp(prefix="gistctl-blobs-"))
        self._count += 1
        path = directory / f"{blob.meta.document_sha256[:16]}-{self._count}.kv"
        size = blob.save(path)
        return GistState(read_blob(path), path, size)  # answer from what is on disk, exactly

    def answer(self, state: GistState, question: str) -> Answer:
        return self.api.ask(state.blob, question, max_new_tokens=self.max_new_tokens)

    def state_bytes(self, state: GistState) -> int:
        """The blob file's size on disk."""
        return state.bytes_on_disk
