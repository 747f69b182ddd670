"""A curriculum: several training phases in one run directory, each starting from the previous one's adapter.

A config with a `phases` list (configs/default.yaml) trains them in order:

    run_dir/data/<phase>/{train,eval}.jsonl, recipe.yaml   built once from the phase's recipe
    run_dir/<phase>/                                        a plain training run (config, metrics, checkpoints)
    run_dir/final/                                          the last phase's adapter, with every phase's meta

Running the same command again, or `--resume`, skips finished phases (those with `final/`), resumes an
interrupted one from its latest checkpoint and starts the others, so a CPU run can take several sittings.
`stop_after` counts the optimizer steps of this sitting across phases.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from gistctl.config import GistctlConfig
from gistctl.data.mix import load_recipe, write_mix
from gistctl.runs import RunDir, atomic_write_json, atomic_write_yaml, replace_dir
from gistctl.train.checkpoint import latest_checkpoint


def phase_data(config: GistctlConfig, index: int, run_dir: Path) -> Path:
    """The folder with phase `index`'s train/eval JSONL, built from its recipe unless already complete."""
    from gistctl.data.lengths import load_tokenizer

    folder = run_dir / "data" / config.phases[index].name
    if not (folder / "recipe.yaml").is_file():  # written last: present means complete
        write_mix(load_tokenizer(config.model.name), load_recipe(config.phases[index].recipe), folder)
    return folder


def train_curriculum(config: GistctlConfig, run_dir: str | Path, *, stop_after: int | None = None,
                     on_log: Callable[[dict], None] | None = None):
    """Train every phase of `config.phases` into `run_dir`; returns the last phase's TrainResult (final_dir is
    `run_dir/final` once every phase is done). Log records get `phase` and a curriculum-wide `step`."""
    from gistctl.train.loop import TrainResult, train

    run_dir = Path(run_dir)
    init_adapter = config.train.init_adapter
    offset, result, left = 0, None, stop_after
    for index, phase in enumerate(config.phases):
        phase_dir = run_dir / phase.name
        folder = phase_data(config, index, run_dir)
        eval_path = folder / "eval.jsonl"
        plain = config.phase_config(index, data=str(folder / "train.jsonl"),
                                    eval_data=str(eval_path) if eval_path.stat().st_size else None,
                                    init_adapter=init_adapter)
        if (phase_dir / "final" / "adapter_model.safetensors").is_file():
            result = TrainResult(phase_dir, phase_dir / "final", 0, float("nan"))
        else:
            if left is not None and left <= 0:
                return TrainResult(phase_dir, None, 0, float("nan"))
            resume = phase_dir.is_dir() and latest_checkpoint(phase_dir) is not None
            if not resume:
                shutil.rmtree(phase_dir, ignore_errors=True)  # a phase that died before its first checkpoint
                RunDir.create("train", plain.to_dict(), seed=plain.train.seed, run_dir=phase_dir)

            def phase_log(record: dict, _offset=offset, _name=phase.name) -> None:
                if on_log:
                    on_log({**record, "phase": _name, "phase_step": record["step"], "step": _offset + record["step"]})

            result = train(plain, phase_dir, resume=resume, stop_after=left, on_log=phase_log)
            if left is not None:
                left -= len(result.losses)
            if result.final_dir is None:
                return result
        init_adapter = str(phase_dir / "final")
        offset += json.loads((phase_dir / "final" / "meta.json").read_text())["step"]  # < max_steps if it stopped early
    final = _assemble_final(config, run_dir)
    return TrainResult(run_dir, final, offset, result.last_loss, result.losses, result.best_eval)


def _assemble_final(config: GistctlConfig, run_dir: Path) -> Path:
    """Copy the last phase's final adapter to `run_dir/final`, with the curriculum's config and a meta.json
    that records every phase (recipe, data fingerprints, steps, evals)."""
    last = run_dir / config.phases[-1].name / "final"
    phases = []
    for phase in config.phases:
        meta = json.loads((run_dir / phase.name / "final" / "meta.json").read_text())
        phases.append({"name": phase.name, "recipe": load_recipe(run_dir / "data" / phase.name / "recipe.yaml"),
                       "train": phase.train, "gist": phase.gist, "steps": meta["step"], "data": meta["data"],
                       "evals": meta["evals"], "best_eval": meta.get("best_eval")})
    last_meta = json.loads((last / "meta.json").read_text())
    target, tmp = run_dir / "final", run_dir / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(last, tmp)
    atomic_write_yaml(tmp / "config.yaml", config.to_dict())
    atomic_write_json(tmp / "meta.json", {**last_meta, "step": sum(p["steps"] for p in phases), "phases": phases})
    return replace_dir(tmp, target)
