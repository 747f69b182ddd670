"""`gistctl compress`: document -> gist KV blob."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import Progress

from gistctl.cli.common import console, err_console, user_errors
from gistctl.engine import open_gist_model, read_document
from gistctl.kv.blob import write_blob
from gistctl.kv.compress import compress_document


@user_errors
def compress(
    document: Path = typer.Argument(..., help="UTF-8 text file to compress."),
    output: Path = typer.Option(None, "-o", "--output", help="Blob path; default: <document name>.kv beside it."),
    adapter: str = typer.Option(None, help="Gist adapter directory; default: the shipped adapter. 'none': untrained gists."),
    gist: int = typer.Option(None, help="K gist tokens per chunk (only with --adapter none)."),
    chunk_tokens: int = typer.Option(None, help="Longest chunk in tokens (default: the adapter's)."),
    positions: str = typer.Option(None, help="Gist position layout: compact (the kept gists at positions 0..n*K-1, "
                                  "however long the document), sequential, or auto (sequential up to 2 chunks, "
                                  "compact beyond); default: the adapter's."),
    chunking: str = typer.Option(None, help="How a document longer than one chunk is split: fixed (full chunks, "
                                 "then the rest) or even (equal chunks); default: the adapter's."),
    model: str = typer.Option(None, help="HF model id or local directory; default: embedded SmolLM2-135M-Instruct."),
    dtype: str = typer.Option("fp16", help="Blob dtype: fp16, bf16 or fp32."),
    device: str = typer.Option(None, help="cpu or cuda; default: cuda if available."),
) -> None:
    """Read a document once and keep only its gist tokens' KV cache."""
    text = read_document(document)
    gm = open_gist_model(model, adapter, num_gist=gist, chunk_tokens=chunk_tokens, device=device,
                         positions=positions, chunking=chunking)
    with Progress(console=err_console, transient=True) as progress:
        task = progress.add_task("compressing", total=None)
        blob, stats = compress_document(gm, text, dtype=dtype,
                                        on_chunk=lambda done, total: progress.update(task, completed=done, total=total))
    output = output or document.with_suffix(".kv")
    size = write_blob(blob, output)
    console.print(f"wrote {output}")
    chosen = f" ({gm.positions})" if gm.positions != blob.meta.positions else ""  # auto: which one it chose
    console.print(f"document tokens  {stats.document_tokens:,}   chunks {stats.chunks}   K {gm.num_gist}   "
                  f"positions {blob.meta.positions}{chosen}"
                  + (f"   split {blob.meta.chunking}" if stats.chunks > 1 else ""))  # the split matters past one chunk
    console.print(f"blob bytes       {size:,}")
    console.print(f"full KV bytes    {stats.full_kv_bytes:,}  ({blob.meta.dtype}, "
                  f"{blob.meta.layers} layers x {blob.meta.kv_heads} KV heads x {stats.document_tokens} tokens x "
                  f"{blob.meta.head_dim})")
    console.print(f"ratio            {stats.full_kv_bytes / size:.1f}x smaller")
    console.print(f"compress time    {stats.seconds:.2f} s")
