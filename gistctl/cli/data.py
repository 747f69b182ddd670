"""`gistctl data`: dataset builders."""

import typer

from gistctl.cli.common import not_implemented

app = typer.Typer(help="Build datasets (passkey, niah, facts, aggregate, qa, mix) as JSONL.", no_args_is_help=False)


@app.callback(invoke_without_command=True)
def data(ctx: typer.Context) -> None:
    """Build datasets as JSONL."""
    if ctx.invoked_subcommand is None:
        not_implemented("data")
