"""What the modules that read a finished bench run share (`itemized`, `lists`, `misses`, behind
`gistctl analyze`): the run folder check and its prediction rows beside the examples they answered."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import yaml

from gistctl.bench.runner import PREDICTIONS, load_predictions
from gistctl.data.schema import read_jsonl
from gistctl.errors import DataError


def check_run_dir(run_dir: str | Path) -> Path:
    """`run_dir` as a Path, or a DataError when it is not a finished bench run (no predictions.jsonl)."""
    run_dir = Path(run_dir)
    if not (run_dir / PREDICTIONS).is_file():
        raise DataError(f"'{run_dir}' is not a bench run directory (no {PREDICTIONS})")
    return run_dir


def rows_with_examples(run_dir: str | Path) -> Iterator[tuple[dict, dict]]:
    """(prediction row, its example) for every row of the bench run, the examples read from the dataset its
    config.yaml names."""
    run_dir = Path(run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    records = {r["id"]: r for r in read_jsonl(config["data"])}
    for row in load_predictions(run_dir / PREDICTIONS):
        yield row, records[row["id"]]
