"""The public Python API: load a model + gist adapter once, compress documents into blobs, ask blobs questions.

    import gistctl
    gc = gistctl.load()                         # embedded model + shipped default adapter
    blob = gc.compress(open("doc.txt").read())  # a Blob: keys/values (layers, kv_heads, K x chunks, head_dim)
    blob.save("doc.kv")                         # atomic write; returns the file size in bytes
    ans = gc.ask("doc.kv", "Who keeps the lighthouse?")   # a path or a Blob; a list of questions -> a list
    print(ans.text, ans.ttft_ms)
    blob = gc.compress(text, press="kvzip", ratio=0.9375)  # a press blob: 1 in 16 of the reader's own KV entries

Press blobs are read and asked by the shipped `full-reader` (`load(reader=...)` for another, "none" for the base
model), gist blobs by the gist adapter; `ask` picks the one the blob was made with.

The CLI (`compress`, `ask`, `demo`) and the bench's gist column go through `Gistctl`; full context and RAG
over the base model through `open_text_method`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

from gistctl import prompt
from gistctl.errors import DataError
from gistctl.gist.adapter import adapter_reader, read_adapter_meta, resolve_adapter, shipped_adapter_dir
from gistctl.gist.chunks import check_chunking
from gistctl.gist.model import GistModel, load_gist_model
from gistctl.gist.positions import check_layout
from gistctl.kv.answer import answer_from_blobs, check_blobs_for_model
from gistctl.kv.blob import BlobMeta, GistBlob, read_blob, read_blob_meta
from gistctl.kv.compress import compress_document
from gistctl.methods.base import Answer
from gistctl.models import load_model, peak_memory_bytes

Blob = GistBlob


DEFAULT_READER = "full-reader"  # the shipped full-context reader: presses, full and rag read with it by default


class Gistctl:
    """A loaded base model + gist adapter: `compress` documents, `ask` their blobs. Press blobs go through the
    reader (`reader_model`, opened on first use from `reader`, a shipped name, a directory or "none")."""

    def __init__(self, gist_model: GistModel, reader_model: GistModel | None = None, reader: str = DEFAULT_READER):
        self.gist_model = gist_model
        self.reader_model = reader_model
        self.reader = reader

    def _reader(self) -> GistModel:
        if self.reader_model is None:
            loaded = self.gist_model.loaded
            self.reader_model = open_reader_model(loaded.name, self.reader, device=str(loaded.device))
        return self.reader_model

    @property
    def num_gist(self) -> int:
        """K: gist tokens kept per chunk."""
        return self.gist_model.num_gist

    @property
    def chunk_tokens(self) -> int:
        """Longest chunk (in tokens) read before each K gists."""
        return self.gist_model.chunk_tokens

    def compress(self, text: str, *, dtype: str = "fp16", on_chunk: Callable[[int, int], None] | None = None,
                 press: str | None = None, ratio: float | None = None, budget: str = "global") -> Blob:
        """Read `text` once; keep only its gists' KV. `dtype`: fp16, bf16, fp32 or int8 (the stored tensors).
        `on_chunk(done, total)` is called after each chunk. `blob.stats` has tokens, chunks and seconds.

        `press` (kvzip, snapkv, streaming, knorm, none): instead of gists, the reader's own cache of the document
        with a fraction `ratio` of its entries removed (0.9375 keeps 1 in 16; default 0.9375, 0 for none), under a
        `budget`: global (one threshold over every head) or uniform (the same count per head)."""
        if press is None:
            if ratio is not None:
                raise DataError("ratio is a press setting; give press= too (kvzip, snapkv, streaming, knorm, none)")
            if adapter_reader_kind(self.gist_model) != "gist":
                raise DataError("this model reads whole documents, not gists; compress with a press "
                                "(press='kvzip', ratio=0.9375)")
            blob, stats = compress_document(self.gist_model, text, dtype=dtype, on_chunk=on_chunk)
        else:
            from gistctl.kv.press import check_press_ratio, compress_with_press

            ratio = (0.0 if press == "none" else 0.9375) if ratio is None else ratio
            check_press_ratio(press, ratio)
            model = self.gist_model if adapter_reader_kind(self.gist_model) != "gist" else self._reader()
            blob, stats = compress_with_press(model, text, press=press, ratio=ratio, budget=budget, dtype=dtype)
        blob.stats = stats
        return blob

    def ask(self, blob: Blob | str | Path | Sequence[Blob | str | Path], question: str | Sequence[str], *,
            max_new_tokens: int = prompt.MAX_NEW_TOKENS) -> Answer | list[Answer]:
        """Answer from the blob alone (greedy). `blob`: a Blob or the path of a blob file (read and validated), or
        a list of them: the question then reads every document's gists side by side (`answer_from_blobs`).
        One question -> one `Answer` (`.text`, `.ttft_ms` in milliseconds, ...); a list -> a list."""
        given = list(blob) if isinstance(blob, (list, tuple)) else [blob]
        blobs = [item if isinstance(item, GistBlob) else read_blob(item) for item in given]
        model = self.model_for(blobs)
        check_blobs_for_model(blobs, model,
                              [f"blob '{item}'" if not isinstance(item, GistBlob) else "blob" for item in given])
        questions = [question] if isinstance(question, str) else list(question)
        if not questions:
            raise DataError("give at least one question")
        for q in questions:  # all refused before any is answered
            prompt.check_question(q)
        answers = [self._answer(model, blobs, q, max_new_tokens) for q in questions]
        return answers[0] if isinstance(question, str) else answers

    def model_for(self, blobs: list[Blob]) -> GistModel:
        """The gist model, unless the blobs are press blobs made by the reader (then the reader, opened once)."""
        if not blobs or blobs[0].meta.press is None or \
                blobs[0].meta.adapter_fingerprint == self.gist_model.adapter_fingerprint:
            return self.gist_model
        return self._reader()

    def _answer(self, model: GistModel, blobs: list[Blob], question: str, max_new_tokens: int) -> Answer:
        gen = answer_from_blobs(model, blobs, question, max_new_tokens=max_new_tokens)
        return Answer(gen.text, gen.ttft_s * 1000, gen.decode_tokens_per_s, gen.prompt_tokens,
                      peak_memory_bytes(model.loaded.device))


def reader_for(adapter: str | None, model: str | None) -> str:
    """The reader a user gets without naming one: the shipped full-reader on the embedded model it was trained on;
    with another --model, the base model as it is ("none"), since the shipped reader does not fit it."""
    if adapter is not None:
        return adapter
    return DEFAULT_READER if model is None else "none"


def adapter_reader_kind(gm: GistModel) -> str:
    """gist (a gist adapter or untrained gists) or full (a reader adapter, or the base model with no gists)."""
    if gm.adapter_dir is None:
        return "gist" if gm.gist_ids else "full"
    return adapter_reader(read_adapter_meta(gm.adapter_dir))


def open_reader_model(model: str | None, reader: str | None = DEFAULT_READER, *, device: str | None = None,
                      dtype: str | None = None, load_in_4bit: bool = False) -> GistModel:
    """The model presses read with: the base model with a full-context reader merged in (default: the shipped
    `full-reader`), or the base model as it is (`reader` "none")."""
    adapter_dir = resolve_adapter(reader or DEFAULT_READER)
    if adapter_dir is not None and adapter_reader(read_adapter_meta(adapter_dir)) != "full":
        raise DataError(f"adapter '{reader}' is a gist adapter; presses read with a full-context reader "
                        f"(`gistctl train --reader full`; the shipped one is {DEFAULT_READER}) or none")
    if model is None and adapter_dir is not None:
        model = read_adapter_meta(adapter_dir).base_model
    loaded = load_model(model, device=device, dtype=dtype, load_in_4bit=load_in_4bit)
    if adapter_dir is None:
        return load_gist_model(loaded, None, num_gist=0)
    return load_gist_model(loaded, adapter_dir)


def load(model: str | None = None, adapter: str | None = None, *, device: str | None = None,
         dtype: str | None = None, load_in_4bit: bool = False, num_gist: int | None = None,
         chunk_tokens: int | None = None, positions: str | None = None, chunking: str | None = None,
         reader: str | None = None) -> Gistctl:
    """Load a base model and gist adapter once.

    `model`: a Hugging Face id or local directory; default: the adapter's base (the embedded
    SmolLM2-135M-Instruct for the shipped adapters). `adapter`: a directory or a shipped adapter's name;
    default: the shipped `default`; "none": untrained gist tokens (needs `num_gist`). `chunk_tokens`,
    `positions`, `chunking` override how the adapter reads documents. `reader`: what press blobs read with
    (opened when a press is first used); default: the shipped full-reader on the embedded model, none on another."""
    return Gistctl(open_gist_model(model, adapter, num_gist=num_gist, chunk_tokens=chunk_tokens, device=device,
                                   dtype=dtype, load_in_4bit=load_in_4bit, positions=positions, chunking=chunking),
                   reader=reader_for(reader, model))


def load_for_blob(blob: str | Path | BlobMeta, *, model: str | None = None, adapter: str | None = None,
                  device: str | None = None) -> Gistctl:
    """The model + adapter a blob was made with (its metadata), unless overridden."""
    meta = blob if isinstance(blob, BlobMeta) else read_blob_meta(blob)
    if meta.press is not None:  # the reader that prefilled it
        if adapter is None and meta.adapter and shipped_adapter_dir(meta.adapter):
            adapter = str(shipped_adapter_dir(meta.adapter))
        gm = open_reader_model(model or meta.model_id, adapter or meta.adapter or "none", device=device)
        return Gistctl(gm, gm)
    if adapter is None and meta.adapter and shipped_adapter_dir(meta.adapter):
        adapter = str(shipped_adapter_dir(meta.adapter))  # a recorded shipped name, never a folder of that name here
    return Gistctl(open_gist_model(model or meta.model_id, adapter or meta.adapter or "none",
                                   num_gist=meta.num_gist, chunk_tokens=meta.chunk_tokens, device=device,
                                   chunking=meta.chunking))


def open_gist_model(model: str | None, adapter: str | None, *, num_gist: int | None = None,
                    chunk_tokens: int | None = None, device: str | None = None, dtype: str | None = None,
                    load_in_4bit: bool = False, positions: str | None = None,
                    chunking: str | None = None) -> GistModel:
    """Base model (default: the adapter's base, else the embedded default) + gist adapter, ready to compress/ask.

    `chunk_tokens` / `positions` / `chunking` override the adapter's chunk length, gist position layout and
    chunk split."""
    if positions:
        check_layout(positions, allow_auto=True)  # before the slow model load
    if chunking:
        check_chunking(chunking)
    adapter_dir = resolve_adapter(adapter)
    if adapter_dir is None and num_gist is None:
        raise DataError("--adapter none needs --num-gist K (how many untrained gist tokens per chunk to use)")
    if adapter_dir is not None and adapter_reader(read_adapter_meta(adapter_dir)) != "gist":
        raise DataError(f"adapter '{adapter}' reads whole documents (trained with --reader full), not gists; use it "
                        f"with `ask --method full --adapter {adapter}`, and a gist adapter to compress")
    if model is None and adapter_dir is not None:
        model = read_adapter_meta(adapter_dir).base_model  # load_model maps the default's name itself
    loaded = load_model(model, device=device, dtype=dtype, load_in_4bit=load_in_4bit)
    gm = load_gist_model(loaded, adapter_dir, num_gist=num_gist, chunk_tokens=chunk_tokens or 1024)
    if chunk_tokens:
        gm.chunk_tokens = chunk_tokens
    if positions:
        gm.positions = positions
    if chunking:
        gm.chunking = chunking
    return gm


def read_document(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"document '{path}' does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read '{path}' as UTF-8 text: {err}") from err
    prompt.check_text(text, f"document '{path}'")
    return text


def read_questions(path: str | Path) -> list[str]:
    """One question per non-empty line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"questions file '{path}' does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read questions file '{path}' as UTF-8 text: {err}") from err
    return [line.strip() for line in text.splitlines() if line.strip()]


def open_text_method(name: str, *, model: str | None = None, device: str | None = None, truncate: bool = False,
                     rag: dict | None = None, max_new_tokens: int = 32, loaded=None, adapter: str | None = None):
    """full or rag over the base model. `rag`: Rag settings (index_dir, chunk_tokens, overlap, top_k,
    embedder as a path or id). `loaded`: an already loaded base model to reuse. `adapter`: a LoRA reader merged
    into the base model first (a directory or shipped name; `gistctl train --reader full` trains one: the
    trained full-context ceiling)."""
    from gistctl.methods import get_method

    if name not in ("full", "rag"):
        from gistctl.errors import ConfigError

        raise ConfigError(f"unknown method '{name}' for a text document; choose full or rag (gist needs a blob)")
    if loaded is not None and adapter:
        raise ValueError("an adapter is merged into the weights: load a model of its own instead of passing `loaded`")
    adapter_dir = resolve_adapter(adapter) if adapter else None
    if model is None and adapter_dir is not None:
        model = read_adapter_meta(adapter_dir).base_model
    loaded = loaded or load_model(model, device=device)
    if adapter_dir is not None:
        loaded = dataclasses.replace(loaded, model=load_gist_model(loaded, adapter_dir).model)
    kwargs = {"loaded": loaded, "truncate": truncate, "max_new_tokens": max_new_tokens}
    if name == "rag":
        from gistctl.models import load_embedder

        settings = dict(rag or {})
        settings["embedder"] = load_embedder(settings.get("embedder"), device=device)
        kwargs.update(settings)
    return get_method(name, **kwargs)
