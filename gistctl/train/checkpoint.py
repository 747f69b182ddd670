"""Self-describing checkpoints: `step-%06d/`, `best/`, `final/`.

Each holds the adapter directory files (PEFT adapter, tokenizer with gist tokens, gist.json), the
resolved `config.yaml`, `meta.json` (step, seed, data fingerprints, metrics so far) and, for resumable
step checkpoints, the training state (optimizer, scheduler, RNG states) as `training_state.safetensors` +
`training_state.json`, never a pickle (`gistctl.train.state`). A checkpoint is written in a
hidden temp directory and renamed into place, so one that exists under its final name is complete.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from gistctl.gist.adapter import save_adapter
from gistctl.gist.chunks import FIXED
from gistctl.gist.positions import SEQUENTIAL
from gistctl.runs import atomic_write_json, atomic_write_yaml, replace_dir
from gistctl.train.state import LEGACY_STATE, STATE_JSON, has_training_state, save_training_state

STEP_DIR = re.compile(r"^step-(\d{6})$")
CHECKPOINT_FILES = ("adapter_config.json", "adapter_model.safetensors", "gist.json", "config.yaml", "meta.json",
                    "tokenizer.json", "tokenizer_config.json")
STATE_FILE = STATE_JSON  # what marks a step checkpoint as resumable (beside STATE_TENSORS)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: Path, *, peft_model, loaded, gist_ids: list[int], chunk_tokens: int,
                    config: dict, meta: dict, training_state: dict | None = None, positions: str = SEQUENTIAL,
                    chunking: str = FIXED, reader: str = "gist") -> Path:
    """Write a complete checkpoint at `directory` (replacing an older one of that name)."""
    directory = Path(directory)
    tmp = directory.parent / f".{directory.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = dict(meta)
    meta["adapter_fingerprint"] = save_adapter(peft_model, loaded, gist_ids, chunk_tokens, tmp,
                                               extra_meta={"trained_steps": meta.get("step"),
                                                           **({"reader": reader} if reader != "gist" else {})},
                                               positions=positions,
                                               chunking=chunking)
    atomic_write_yaml(tmp / "config.yaml", config)
    atomic_write_json(tmp / "meta.json", meta)
    if training_state is not None:
        save_training_state(tmp, training_state)
    return replace_dir(tmp, directory)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The highest complete `step-NNNNNN/` in `run_dir` (temp directories are never matched)."""
    # a pickled legacy state still counts, so that resuming refuses it in one line instead of starting over
    steps = [p for p in Path(run_dir).iterdir()
             if STEP_DIR.match(p.name) and (has_training_state(p) or (p / LEGACY_STATE).is_file())]
    return max(steps, key=lambda p: p.name) if steps else None


def prune_step_checkpoints(run_dir: Path, keep: int) -> None:
    steps = sorted(p for p in Path(run_dir).iterdir() if STEP_DIR.match(p.name))
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
