"""What the modules that read a finished bench run share (`itemized`, `lists`, `misses`): its command line and
its prediction rows beside the examples they answered."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from pathlib import Path

import yaml

from gistctl.bench.runner import PREDICTIONS, load_predictions
from gistctl.data.schema import read_jsonl


def parse_run_dir(doc: str, argv: list[str] | None = None,
                  add_options: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """`python -m gistctl.bench.<module> RUN_DIR [options]`: the module docstring's first paragraph is the help;
    a folder without predictions.jsonl is a usage error (exit 2)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("run_dir")
    if add_options:
        add_options(parser)
    args = parser.parse_args(argv)
    if not (Path(args.run_dir) / PREDICTIONS).is_file():
        parser.error(f"'{args.run_dir}' is not a bench run directory (no {PREDICTIONS})")
    return args


def rows_with_examples(run_dir: str | Path) -> Iterator[tuple[dict, dict]]:
    """(prediction row, its example) for every row of the bench run, the examples read from the dataset its
    config.yaml names."""
    run_dir = Path(run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    records = {r["id"]: r for r in read_jsonl(config["data"])}
    for row in load_predictions(run_dir / PREDICTIONS):
        yield row, records[row["id"]]
