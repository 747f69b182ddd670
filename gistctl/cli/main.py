"""`gistctl`: the Typer app that wires one module per subcommand."""

from __future__ import annotations

import typer

from gistctl import __version__
from gistctl.cli import adapter, analyze, ask, bench, compress, data, demo, serve, train, viz_mask

app = typer.Typer(name="gistctl", help="Learned context compression with gist tokens.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gistctl {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """Compress long documents into a few gist tokens' KV cache, then ask questions from it."""


app.add_typer(data.app, name="data")
app.command("train")(train.train)
app.command("compress")(compress.compress)
app.command("ask")(ask.ask)
app.command("bench")(bench.bench)
app.command("viz-mask")(viz_mask.viz_mask)
app.command("demo")(demo.demo)
app.command("serve")(serve.serve)
app.add_typer(analyze.app, name="analyze")
app.add_typer(adapter.app, name="adapter")
