"""`gistctl analyze`: read a finished bench run again (`misses`, `lists`, `itemized`)."""

from __future__ import annotations

from pathlib import Path

import typer

from gistctl.cli.common import user_errors

app = typer.Typer(help="Read a finished bench run again: where gist answers went wrong, list recall, itemized counts.",
                  no_args_is_help=True)

RUN = typer.Argument(..., help="A bench run directory (it holds predictions.jsonl).")


@app.command("misses")
@user_errors
def misses(run_dir: Path = RUN,
           spell_codes: bool = typer.Option(False, help="Score codes one character per token.")) -> None:
    """Teacher-force the right answer on each gist blob of the run: its NLL and the first token missed."""
    from gistctl.bench.misses import report_lines

    for line in report_lines(run_dir, spell_codes=spell_codes):
        typer.echo(line)


@app.command("lists")
@user_errors
def lists(run_dir: Path = RUN) -> None:
    """List recall split by how often the document mentions each value, and values named that it lacks."""
    from gistctl.bench.lists import report_lines

    for line in report_lines(run_dir):
        typer.echo(line)


@app.command("itemized")
@user_errors
def itemized(run_dir: Path = RUN) -> None:
    """For itemized count answers: recall of the items said vs counting them."""
    from gistctl.bench.itemized import report_lines

    for line in report_lines(run_dir):
        typer.echo(line)
