"""RAG: token chunks of the document in a LanceDB table; each question is asked over its top-k chunks.

prepare: document -> LM token ids -> chunks of `chunk_tokens` ids, consecutive chunks sharing `overlap` ids
         -> embeddings (embedder dim, float32) -> LanceDB table `<index_dir>/<table_name>.lance`.
answer:  embed question -> exact cosine search (no ANN index: a document has few chunks) -> top-k chunks
         -> their token spans in document order, overlapping or touching spans merged -> with_context_ids.
The table is keyed by the document's sha256, the chunking settings and tokenizer, and the embedder, so a
second prepare of the same document in the same `index_dir` reuses it without embedding anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from gistctl import prompt
from gistctl.errors import ConfigError, DataError
from gistctl.generation import greedy_generate
from gistctl.methods.base import Answer, register
from gistctl.models import LoadedModel, load_embedder, peak_memory_bytes

TABLE_FORMAT = 1  # bump when the table's columns change: old tables are then not reused


@dataclass
class Chunk:
    """Token ids `[start, end)` of the document (LM tokenizer) and their decoded text."""

    start: int
    end: int
    text: str


@dataclass
class RagState:
    index_dir: Path
    table_name: str
    table: object = field(repr=False)  # lancedb Table with columns chunk, start, end, vector
    chunks: list[Chunk]
    document_ids: list[int] = field(repr=False)  # the whole document, LM tokenizer, no special tokens
    reused: bool  # True when the table already existed and nothing was embedded

    @property
    def table_path(self) -> Path:
        return self.index_dir / f"{self.table_name}.lance"


def chunk_spans(n_tokens: int, chunk_tokens: int, overlap: int) -> list[tuple[int, int]]:
    """`[start, end)` spans covering `n_tokens`: starts every `chunk_tokens - overlap`, the last ends at n."""
    spans, start = [], 0
    while True:
        end = min(start + chunk_tokens, n_tokens)
        spans.append((start, end))
        if end >= n_tokens:
            return spans
        start += chunk_tokens - overlap


def embedder_identity(embedder) -> str:
    """sha256 over the embedder's module stack (pooling, normalization, max length) and a weight sample."""
    import torch

    h = hashlib.sha256(repr(embedder).encode())
    h.update(str(getattr(embedder, "max_seq_length", None)).encode())
    with torch.no_grad():
        for name, param in embedder.named_parameters():
            h.update(name.encode())
            h.update(str(tuple(param.shape)).encode())
            h.update(param.detach().flatten()[:64].to(device="cpu", dtype=torch.float32).numpy().tobytes())
    return h.hexdigest()


@register("rag")
@dataclass
class Rag:
    """Cheap per question, but sees only the `top_k` chunks most similar to the question."""

    loaded: LoadedModel
    embedder: object = None  # a SentenceTransformer; None loads the default (all-MiniLM-L6-v2)
    chunk_tokens: int = 500  # LM tokens per chunk
    overlap: int = 50  # LM tokens shared by consecutive chunks
    top_k: int = 3
    index_dir: str | None = None  # None: a fresh temporary directory per prepare, removed with its state
    max_new_tokens: int = prompt.MAX_NEW_TOKENS
    truncate: bool = False  # drop the lowest-ranked chunks (then cut the end) to fit the window instead of failing
    name: str = "rag"
    warnings: list[str] | None = None

    def __post_init__(self):
        if self.chunk_tokens < 1:
            raise ConfigError(f"chunk_tokens must be at least 1, got {self.chunk_tokens}")
        if not 0 <= self.overlap < self.chunk_tokens:
            raise ConfigError(f"overlap must be >= 0 and smaller than chunk_tokens ({self.chunk_tokens}), "
                              f"got {self.overlap}; lower --overlap or raise --chunk-tokens")
        if self.top_k < 1:
            raise ConfigError(f"top_k must be at least 1, got {self.top_k}")
        if self.embedder is None:
            self.embedder = load_embedder()
        self._embedder_id: str | None = None

    # -- prepare --------------------------------------------------------------------------------------

    def chunk(self, document_ids: list[int]) -> list[Chunk]:
        tokenizer = self.loaded.tokenizer
        return [Chunk(s, e, tokenizer.decode(document_ids[s:e]))
                for s, e in chunk_spans(len(document_ids), self.chunk_tokens, self.overlap)]

    def table_name(self, document: str) -> str:
        """`rag_<sha256 of (document sha256, chunking, tokenizer, embedder, table format)>` (32 hex)."""
        if self._embedder_id is None:
            self._embedder_id = embedder_identity(self.embedder)
        tokenizer = self.loaded.tokenizer
        key = {
            "document_sha256": hashlib.sha256(document.encode("utf-8")).hexdigest(),
            "chunk_tokens": self.chunk_tokens,
            "overlap": self.overlap,
            # chunk boundaries are LM token ids, so the tokenizer is part of the key
            "tokenizer": [type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer)],
            "embedder": self._embedder_id,
            "format": TABLE_FORMAT,
        }
        return "rag_" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]

    def embed(self, texts: list[str]):
        """(len(texts), dim) float32, L2-normalized."""
        return self.embedder.encode(texts, batch_size=32, convert_to_numpy=True, normalize_embeddings=True,
                                    show_progress_bar=False).astype("float32")

    def prepare(self, document: str) -> RagState:
        import lancedb
        import pyarrow as pa

        if not document.strip():
            raise DataError("the document is empty")
        document_ids = prompt.context_ids(self.loaded.tokenizer, document)
        chunks = self.chunk(document_ids)
        self._warn_long_chunks(chunks)
        if self.index_dir is None:
            index_dir = Path(tempfile.mkdtemp(prefix="gistctl-rag-"))
        else:
            index_dir = Path(self.index_dir).expanduser()
            index_dir.mkdir(parents=True, exist_ok=True)
        db = lancedb.connect(str(index_dir))
        name = self.table_name(document)
        reused = name in self._table_names(db)
        if reused:
            table = db.open_table(name)
        else:
            vectors = self.embed([c.text for c in chunks])
            data = pa.table({
                "chunk": pa.array(range(len(chunks)), pa.int32()),
                "start": pa.array([c.start for c in chunks], pa.int32()),
                "end": pa.array([c.end for c in chunks], pa.int32()),
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1]),
            })
            try:
                table = db.create_table(name, data)
            except ValueError:  # another process created it meanwhile (LanceDB commits atomically)
                table, reused = db.open_table(name), True
        state = RagState(index_dir, name, table, chunks, document_ids, reused)
        if self.index_dir is None:
            weakref.finalize(state, shutil.rmtree, str(index_dir), True)
        return state

    @staticmethod
    def _table_names(db) -> set[str]:
        names, token = set(), None
        while True:
            page = db.list_tables(page_token=token)
            names.update(page.tables)
            token = page.page_token
            if not token:
                return names

    def _warn_long_chunks(self, chunks: list[Chunk]) -> None:
        limit = getattr(self.embedder, "max_seq_length", None)
        tokenizer = getattr(self.embedder, "tokenizer", None)
        if not limit or tokenizer is None:
            return
        long = sum(len(tokenizer(c.text, verbose=False)["input_ids"]) > limit for c in chunks)
        if long:
            self.warnings = (self.warnings or []) + [
                f"{long} of {len(chunks)} chunks exceed the embedder's {limit}-token input; only their "
                f"beginnings are embedded (lower --chunk-tokens to embed whole chunks)"]

    # -- answer ---------------------------------------------------------------------------------------

    def retrieve(self, state: RagState, question: str) -> list[int]:
        """Indices into `state.chunks` of the top-k chunks by cosine similarity to the question, best first."""
        query = self.embed([question])[0]
        k = min(self.top_k, len(state.chunks))
        rows = (state.table.search(query).distance_type("cosine").limit(k)
                .select(["chunk", "_distance"]).to_list())
        rows.sort(key=lambda row: (row["_distance"], row["chunk"]))  # ties -> earlier chunk first
        return [int(row["chunk"]) for row in rows]

    def context(self, state: RagState, ranked: list[int]) -> str:
        """The ranked chunks' token spans in document order, overlapping or touching spans merged
        (so overlap tokens appear once), decoded and joined by blank lines."""
        spans: list[list[int]] = []
        for i in sorted(ranked):
            start, end = state.chunks[i].start, state.chunks[i].end
            if spans and start <= spans[-1][1]:
                spans[-1][1] = max(spans[-1][1], end)
            else:
                spans.append([start, end])
        tokenizer = self.loaded.tokenizer
        return "\n\n".join(tokenizer.decode(state.document_ids[s:e]) for s, e in spans)

    def window(self) -> int:
        return int(getattr(self.loaded.model.config, "max_position_embeddings", 2048))

    def prompt_ids(self, state: RagState, question: str, ranked: list[int]) -> list[int]:
        tokenizer = self.loaded.tokenizer
        budget = self.window() - self.max_new_tokens
        ids = prompt.with_context_ids(tokenizer, self.context(state, ranked), question)
        if len(ids) <= budget:
            return ids
        if not self.truncate:
            raise DataError(f"{len(ranked)} retrieved chunks + question take {len(ids)} tokens but the model's "
                            f"window allows {budget} (plus {self.max_new_tokens} to answer); "
                            f"lower --top-k or --chunk-tokens, or use --truncate")
        first_len, kept = len(ids), list(ranked)
        while len(ids) > budget and len(kept) > 1:
            kept.pop()  # the lowest-ranked chunk goes first
            ids = prompt.with_context_ids(tokenizer, self.context(state, kept), question)
        if len(ids) > budget:
            context_ids = prompt.context_ids(tokenizer, self.context(state, kept))
            context_ids = context_ids[: max(0, len(context_ids) - (len(ids) - budget))]
            ids = prompt.with_context_ids(tokenizer, tokenizer.decode(context_ids), question)
        self.warnings = (self.warnings or []) + [
            f"retrieved context truncated: {first_len - len(ids)} prompt tokens cut, "
            f"{len(ranked) - len(kept)} of {len(ranked)} chunks dropped"]
        return ids

    def answer(self, state: RagState, question: str) -> Answer:
        """TTFT covers question embedding, search, prompt building and prefill; prompt_tokens is the
        whole prompt the LM processed (chat template + retrieved chunks + question)."""
        start = time.perf_counter()
        ids = self.prompt_ids(state, question, self.retrieve(state, question))
        retrieval_s = time.perf_counter() - start
        gen = greedy_generate(self.loaded.model, self.loaded.tokenizer, ids, max_new_tokens=self.max_new_tokens,
                              stop_ids=prompt.stop_ids(self.loaded.model, self.loaded.tokenizer))
        return Answer(gen.text, (retrieval_s + gen.ttft_s) * 1000, gen.decode_tokens_per_s, gen.prompt_tokens,
                      peak_memory_bytes(self.loaded.device))

    def state_bytes(self, state: RagState) -> int:
        """Sizes of all files under the table's directory `<index_dir>/<table_name>.lance` (vectors, token
        spans, manifests) + UTF-8 bytes of every chunk's text (the table holds no text; it is kept with
        the state and re-derived from the document on reuse)."""
        index = sum(p.stat().st_size for p in state.table_path.rglob("*") if p.is_file())
        return index + sum(len(c.text.encode("utf-8")) for c in state.chunks)
