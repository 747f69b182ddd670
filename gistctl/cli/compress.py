"""`gistctl compress`: document -> gist KV blob, or with --press the reader's own KV cache, pressed."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import Progress

from gistctl.cli.common import console, err_console, user_errors
from gistctl.engine import DEFAULT_READER, Gistctl, load, open_reader_model, read_document, reader_for
from gistctl.errors import DataError
from gistctl.kv.blob import check_output_path
from gistctl.store import BlobStore, check_store_dir, default_store_dir


@user_errors
def compress(
    document: Path = typer.Argument(..., help="UTF-8 text file to compress."),
    output: Path = typer.Option(None, "-o", "--output", help="Blob path; default: <document name>.kv beside it."),
    adapter: str = typer.Option(None, help="Gist adapter directory; default: the shipped adapter. 'none': untrained gists. "
                                "With --press: the reader that prefills the document; default: the shipped "
                                f"{DEFAULT_READER}; 'none': the base model."),
    press: str = typer.Option(None, help="Keep the reader's own KV cache, pressed: kvzip, snapkv, streaming, knorm, "
                              "or none (the whole cache)."),
    ratio: float = typer.Option(None, help="With --press: the fraction of the document's KV entries removed, in "
                                "[0, 1); 0.9375 keeps 1 in 16 (the default; none: 0)."),
    uniform: bool = typer.Option(False, "--uniform", help="With --press: the same count in every head instead of one "
                                 "threshold over all heads."),
    num_gist: int = typer.Option(None, "--num-gist", "--gist", help="K: gist tokens per chunk (only with --adapter none)."),
    chunk_tokens: int = typer.Option(None, help="Longest chunk in tokens (default: the adapter's)."),
    positions: str = typer.Option(None, help="Gist position layout: compact (the kept gists at positions 0..n*K-1, "
                                  "however long the document), sequential, or auto (sequential up to 2 chunks, "
                                  "compact beyond); default: the adapter's."),
    chunking: str = typer.Option(None, help="How a document longer than one chunk is split: fixed (full chunks, "
                                 "then the rest) or even (equal chunks); default: the adapter's."),
    model: str = typer.Option(None, help="HF model id or local directory; default: embedded SmolLM2-135M-Instruct."),
    dtype: str = typer.Option("fp16", help="Blob dtype: fp16, bf16, fp32, or int8 (per-channel scales, dequantized on read)."),
    device: str = typer.Option(None, help="cpu or cuda; default: cuda if available."),
    store: str = typer.Option(None, help="Put the blob in this blob store (a directory, or 'default' for the one "
                              "`gistctl serve` uses) under its document id instead of -o; a document already there "
                              "is not compressed again."),
) -> None:
    """Read a document once and keep only its gist tokens' KV cache (or, with --press, the entries a press keeps)."""
    text = read_document(document)
    if store is not None and output is not None:
        raise DataError("give -o or --store, not both")
    if store is None:
        output = check_output_path(output or document.with_suffix(".kv"))  # before the work, not after it
    else:
        check_store_dir(default_store_dir() if store == "default" else store)  # before the model loads
    if press is not None:
        _compress_press(text, output, press, ratio, uniform, adapter, model, dtype, device, store, document.name,
                        gist_options=num_gist or chunk_tokens or positions or chunking)
        return
    if ratio is not None or uniform:
        raise DataError("--ratio and --uniform are press settings; add --press kvzip (or snapkv, streaming, knorm)")
    gc = load(model, adapter, num_gist=num_gist, chunk_tokens=chunk_tokens, device=device, positions=positions,
              chunking=chunking)
    if store is not None:
        blobs = BlobStore(None if store == "default" else store)
        entry, compressed = blobs.compress(gc, text, name=document.name, dtype=dtype)
        console.print(f"{'stored' if compressed else 'already stored'} {entry.id}  ({blobs.blob_path(entry.id)})")
        console.print(f"document tokens  {entry.tokens:,}   chunks {entry.chunks}   blob bytes {entry.blob_bytes:,}   "
                      f"ratio {entry.ratio:.1f}x smaller (full KV at {entry.dtype} / blob file)")
        return
    with Progress(console=err_console, transient=True) as progress:
        task = progress.add_task("compressing", total=None)
        blob = gc.compress(text, dtype=dtype,
                           on_chunk=lambda done, total: progress.update(task, completed=done, total=total))
    size = blob.save(output)
    stats = blob.stats
    console.print(f"wrote {output}")
    layout = gc.gist_model.positions
    chosen = f" ({layout})" if layout != blob.meta.positions else ""  # auto: which one it chose
    console.print(f"document tokens  {stats.document_tokens:,}   chunks {stats.chunks}   K {gc.num_gist}   "
                  f"positions {blob.meta.positions}{chosen}"
                  + (f"   split {blob.meta.chunking}" if stats.chunks > 1 else ""))  # the split matters past one chunk
    console.print(f"blob bytes       {size:,}")
    console.print(f"full KV bytes    {blob.meta.full_kv_bytes:,}  ({blob.meta.dtype}, "
                  f"{blob.meta.layers} layers x {blob.meta.kv_heads} KV heads x {stats.document_tokens} tokens x "
                  f"{blob.meta.head_dim})")
    console.print(f"ratio            {blob.meta.full_kv_bytes / size:.1f}x smaller (full KV at {blob.meta.dtype} / blob file)")
    console.print(f"compress time    {stats.seconds:.2f} s")


def _compress_press(text: str, output, press: str, ratio, uniform: bool, adapter, model, dtype: str, device, store,
                    name: str, gist_options) -> None:
    from gistctl.kv.press import check_press_ratio

    if gist_options:
        raise DataError("--num-gist, --chunk-tokens, --positions and --chunking are gist settings; a press keeps the "
                        "reader's own cache")
    ratio = (0.0 if press == "none" else 0.9375) if ratio is None else ratio
    check_press_ratio(press, ratio)  # before the model loads
    budget = "uniform" if uniform else "global"
    reader = open_reader_model(model, reader_for(adapter, model), device=device)
    gc = Gistctl(reader, reader)
    if store is not None:
        blobs = BlobStore(None if store == "default" else store)
        entry, compressed = blobs.compress(gc, text, name=name, dtype=dtype, press=press, ratio=ratio, budget=budget)
        console.print(f"{'stored' if compressed else 'already stored'} {entry.id}  ({blobs.blob_path(entry.id)})")
        console.print(f"document tokens  {entry.tokens:,}   press {press} {ratio}   blob bytes {entry.blob_bytes:,}   "
                      f"ratio {entry.ratio:.1f}x smaller (full KV at {entry.dtype} / blob file)")
        return
    with err_console.status(f"prefilling and scoring with {press}"):
        blob = gc.compress(text, dtype=dtype, press=press, ratio=ratio, budget=budget)
    size = blob.save(output)
    stats, meta = blob.stats, blob.meta
    console.print(f"wrote {output}")
    console.print(f"document tokens  {stats.document_tokens:,}   press {press}   ratio {ratio}   budget {budget}   "
                  f"reader {meta.adapter or 'none'}")
    console.print(f"entries kept     {meta.kept_entries:,} of {meta.layers * meta.kv_heads * meta.prefix_tokens:,} "
                  f"({meta.layers} layers x {meta.kv_heads} KV heads x {meta.prefix_tokens} prefilled positions)")
    console.print(f"blob bytes       {size:,}")
    console.print(f"full KV bytes    {meta.full_kv_bytes:,}  ({meta.dtype}, {meta.layers} layers x {meta.kv_heads} KV "
                  f"heads x {stats.document_tokens} tokens x {meta.head_dim})")
    console.print(f"ratio            {meta.full_kv_bytes / size:.1f}x smaller (full KV at {meta.dtype} / blob file)")
    console.print(f"compress time    {stats.seconds:.2f} s  (prefill {stats.prefill_seconds:.2f} s, "
                  f"scoring {stats.score_seconds:.2f} s)")
