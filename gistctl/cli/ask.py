"""`gistctl ask`: answer questions about a document."""

from __future__ import annotations

from pathlib import Path

import typer

from gistctl.cli.common import err_console, not_implemented, user_errors
from gistctl.errors import DataError
from gistctl.methods import get_method
from gistctl.models import load_model


def read_document(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"document '{path}' does not exist")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read '{path}' as UTF-8 text: {err}") from err


@user_errors
def ask(
    source: Path = typer.Argument(..., help="A gist blob (.kv) or, with --method full|rag, a text document."),
    questions: list[str] = typer.Argument(None, help="One or more questions."),
    method: str = typer.Option("gist", help="gist (answer from a blob), full or rag (answer from the document)."),
    model: str = typer.Option(None, help="HF model id or local directory; default: embedded SmolLM2-135M-Instruct."),
    truncate: bool = typer.Option(False, help="full: cut the document to fit the window instead of failing."),
    max_new_tokens: int = typer.Option(32, help="Longest answer in tokens."),
) -> None:
    """Answer questions from a gist blob (default) or from the document itself (--method full|rag)."""
    if not questions:
        raise DataError("give at least one question")
    if method == "gist":
        not_implemented("ask (gist blobs)")
    document = read_document(source)
    loaded = load_model(model)
    runner = get_method(method, loaded=loaded, truncate=truncate, max_new_tokens=max_new_tokens)
    state = runner.prepare(document)
    for question in questions:
        answer = runner.answer(state, question)
        for warning in runner.warnings or []:
            err_console.print(f"[yellow]warning:[/] {warning}", highlight=False)
        runner.warnings = None
        typer.echo(answer.text)
