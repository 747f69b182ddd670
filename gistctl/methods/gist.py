"""Gist compression: prepare = compress the document into a blob on disk; answer from the blob alone."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from gistctl import prompt
from gistctl.gist.lora import GistModel
from gistctl.kv.answer import answer_from_blob
from gistctl.kv.blob import GistBlob, read_blob, write_blob
from gistctl.kv.compress import compress_document
from gistctl.methods.base import Answer, peak_memory_bytes, register


@dataclass
class GistState:
    blob: GistBlob
    path: Path  # where the blob lives on disk
    bytes_on_disk: int


@register("gist")
@dataclass
class Gist:
    """Reads the document once; keeps K gist positions' KV per chunk."""

    gist_model: GistModel
    blob_dir: str | None = None  # where blobs are written (a temp dir when None)
    dtype: str = "fp16"
    max_new_tokens: int = prompt.MAX_NEW_TOKENS
    name: str = "gist"
    warnings: list[str] | None = None
    _count: int = field(default=0, repr=False)

    def prepare(self, document: str) -> GistState:
        blob, _ = compress_document(self.gist_model, document, dtype=self.dtype)
        directory = Path(self.blob_dir or tempfile.mkdtemp(prefix="gistctl-blobs-"))
        self._count += 1
        path = directory / f"{blob.meta.document_sha256[:16]}-{self._count}.kv"
        size = write_blob(blob, path)
        return GistState(read_blob(path), path, size)  # answer from what is on disk, exactly

    def answer(self, state: GistState, question: str) -> Answer:
        gen = answer_from_blob(self.gist_model, state.blob, question, max_new_tokens=self.max_new_tokens)
        return Answer(gen.text, gen.ttft_s * 1000, gen.decode_tokens_per_s, gen.prompt_tokens,
                      peak_memory_bytes(self.gist_model.loaded.device))

    def state_bytes(self, state: GistState) -> int:
        """The blob file's size on disk."""
        return state.bytes_on_disk
