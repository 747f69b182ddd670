"""Opening documents and models the way every command does (shared by the CLI and bench)."""

from __future__ import annotations

from pathlib import Path

from gistctl.errors import DataError
from gistctl.gist.lora import GistModel, load_gist_model, read_gist_meta, resolve_adapter
from gistctl.gist.chunks import check_chunking
from gistctl.kv.positions import check_layout
from gistctl.models import load_model


def read_document(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"document '{path}' does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read '{path}' as UTF-8 text: {err}") from err
    if not text.strip():
        raise DataError(f"document '{path}' is empty")
    return text


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
        raise DataError("--adapter none needs --gist K (how many untrained gist tokens to use)")
    if model is None and adapter_dir is not None:
        model = read_gist_meta(adapter_dir).get("base_model")  # load_model maps the default's name itself
    loaded = load_model(model, device=device, dtype=dtype, load_in_4bit=load_in_4bit)
    gm = load_gist_model(loaded, adapter_dir, num_gist=num_gist, chunk_tokens=chunk_tokens or 1024)
    if chunk_tokens:
        gm.chunk_tokens = chunk_tokens
    if positions:
        gm.positions = positions
    if chunking:
        gm.chunking = chunking
    return gm


def read_questions(path: str | Path) -> list[str]:
    """One question per non-empty line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"questions file '{path}' does not exist")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def open_gist_model_for_blob(meta, *, model: str | None = None, adapter: str | None = None,
                             device: str | None = None) -> GistModel:
    """The model + adapter a blob was made with (its `BlobMeta`), unless overridden, with its K and chunk length."""
    if model is None:
        model = meta.model_id
    if adapter is None:
        adapter = meta.adapter or "none"
    return open_gist_model(model, adapter, num_gist=meta.num_gist, chunk_tokens=meta.chunk_tokens, device=device,
                           chunking=meta.chunking)


def open_blob_method(blob_path: str | Path, *, model: str | None = None, adapter: str | None = None,
                     device: str | None = None, max_new_tokens: int = 32):
    """The gist method and its state for an existing blob, with the blob's model + adapter unless overridden."""
    from gistctl.kv.answer import check_blob_for_model
    from gistctl.kv.blob import read_blob, read_blob_meta
    from gistctl.methods.gist import Gist, GistState

    meta = read_blob_meta(blob_path)
    gm = open_gist_model_for_blob(meta, model=model, adapter=adapter, device=device)
    blob = read_blob(blob_path)
    check_blob_for_model(blob, gm, where=f"blob '{blob_path}'")
    return Gist(gm, max_new_tokens=max_new_tokens), GistState(blob, Path(blob_path), Path(blob_path).stat().st_size)


def open_text_method(name: str, *, model: str | None = None, device: str | None = None, truncate: bool = False,
                     rag: dict | None = None, max_new_tokens: int = 32):
    """full or rag over the base model. `rag`: Rag settings (index_dir, chunk_tokens, overlap, top_k,
    embedder as a path or id)."""
    from gistctl.methods import get_method

    if name not in ("full", "rag"):
        from gistctl.errors import ConfigError

        raise ConfigError(f"unknown method '{name}' for a text document; choose full or rag (gist needs a blob)")
    loaded = load_model(model, device=device)
    kwargs = {"loaded": loaded, "truncate": truncate, "max_new_tokens": max_new_tokens}
    if name == "rag":
        from gistctl.models import load_embedder

        settings = dict(rag or {})
        settings["embedder"] = load_embedder(settings.get("embedder"), device=device)
        kwargs.update(settings)
    return get_method(name, **kwargs)
