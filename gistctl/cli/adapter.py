"""`gistctl adapter`: ship a trained checkpoint as a named adapter inside the package."""

from __future__ import annotations

from pathlib import Path

import typer

from gistctl.cli.common import console, user_errors

app = typer.Typer(help="Ship trained adapters (gistctl/adapters/<name>/).", no_args_is_help=True)


@app.command("ship")
@user_errors
def ship(
    checkpoint: Path = typer.Argument(..., help="A run's final/ (or best/, step-NNNNNN/), or a shipped adapter to re-ship."),
    name: str = typer.Argument(..., help="Name of the shipped adapter (gistctl/adapters/<name>/)."),
    note: str = typer.Option(None, help="A note recorded in meta.json."),
    chunk_tokens: int = typer.Option(None, help="Chunk length compress uses (default: the trained one)."),
    positions: str = typer.Option(None, help="Gist position layout: sequential, compact or auto (default: the trained one)."),
    chunking: str = typer.Option(None, help="Chunk split: fixed or even (default: the trained one)."),
    after: Path = typer.Option(None, help="The shipped adapter the run started from (train.init_adapter): meta.json "
                                          "records its phases, then the run's."),
) -> None:
    """Copy the adapter files (not the optimizer state) with a meta.json recipe, atomically."""
    from gistctl.errors import ConfigError
    from gistctl.train.ship import ship_adapter

    if not (checkpoint / "meta.json").is_file() or not (checkpoint / "adapter_model.safetensors").is_file():
        raise ConfigError(f"'{checkpoint}' is not a checkpoint or adapter directory (no meta.json and adapter weights)")
    if "/" in name or name in (".", "..") or not name.strip():
        raise ConfigError(f"adapter name '{name}' must be a plain folder name")
    console.print(str(ship_adapter(checkpoint, name, note=note, chunk_tokens=chunk_tokens, positions=positions,
                                   chunking=chunking, after=after)))
