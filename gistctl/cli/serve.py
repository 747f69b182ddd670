"""`gistctl serve`: load the model and adapter once and answer over HTTP from a shared blob store."""

from __future__ import annotations

from pathlib import Path

import typer

from gistctl.cli.common import err_console, user_errors


@user_errors
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to listen on; anything but loopback needs --token."),
    port: int = typer.Option(8321, min=1, max=65535, help="TCP port."),
    token: str = typer.Option(None, envvar="GISTCTL_TOKEN", help="Bearer token clients must send "
                              "('Authorization: Bearer TOKEN'); also read from $GISTCTL_TOKEN."),
    store: Path = typer.Option(None, help="Blob store directory; default $GISTCTL_STORE or <cache>/store."),
    documents_dir: Path = typer.Option(None, help="A folder whose files POST /v1/documents {path} may read "
                                       "(default: posting paths is off)."),
    model: str = typer.Option(None, help="HF model id or local directory; default: the adapter's base model."),
    adapter: str = typer.Option(None, help="Gist adapter directory or shipped name; default: the shipped one."),
    num_gist: int = typer.Option(None, "--num-gist", help="K: untrained gist tokens per chunk (only with --adapter none)."),
    device: str = typer.Option(None, help="cpu or cuda; default: cuda if available."),
    max_document_bytes: int = typer.Option(2_000_000, min=1, help="Largest document a client may post."),
    max_question_tokens: int = typer.Option(512, min=1, help="Longest question, in tokens."),
    max_new_tokens: int = typer.Option(128, min=1, help="Most answer tokens a client may ask for."),
    log_level: str = typer.Option("warning", help="uvicorn log level."),
) -> None:
    """Serve compress and ask over HTTP: POST /v1/documents, POST /v1/ask (stream: true for server-sent events),
    GET /v1/documents, GET or DELETE /v1/documents/ID, GET /healthz."""
    from gistctl.engine import load
    from gistctl.serve import Limits, check_bind, check_port, run_server
    from gistctl.store import BlobStore

    check_bind(host, token)  # before the model loads
    blobs = BlobStore(store)  # a store path that is a file fails here, in one line
    check_port(host, port)
    limits = Limits(document_bytes=max_document_bytes, request_bytes=max_document_bytes + 100_000,
                    question_tokens=max_question_tokens, max_new_tokens=max_new_tokens)
    with err_console.status("loading the model and adapter"):
        gc = load(model, adapter, num_gist=num_gist, device=device)
    err_console.print(f"gistctl serving on http://{host}:{port} (store {blobs.root}, K {gc.num_gist})",
                      highlight=False)
    run_server(gc, blobs, host=host, port=port, token=token, limits=limits,
               documents_dir=str(documents_dir) if documents_dir else None, log_level=log_level)
