"""What every subcommand shares: consoles and the one-line error exit."""

from __future__ import annotations

import functools
from typing import Callable, NoReturn

import typer
from rich.console import Console

from gistctl.errors import GistctlError

console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def user_errors(command: Callable) -> Callable:
    """Turn a `GistctlError` into one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except GistctlError as err:
            fail(str(err))

    return wrapper
