"""Training state (optimizer, scheduler, RNG, history) on disk without pickle: tensors in safetensors, the rest
in JSON. Nothing gistctl reads back is unpickled, so a crafted checkpoint cannot run code.

`training_state.safetensors` holds every tensor under a numbered key; `training_state.json` holds the nested
structure with each tensor replaced by {"__tensor__": key}, tuples by {"__tuple__": [...]}, and dicts whose keys
are not all strings (the optimizer's per-parameter state) by {"__items__": [[key, value], ...]}.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from gistctl.errors import ConfigError
from gistctl.runs import atomic_write_bytes, atomic_write_text

STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"
LEGACY_STATE = "training_state.pt"  # gistctl < 0.2 pickled it: never read
FORMAT_VERSION = 1


def _encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, tensors) for k, v in value.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    raise TypeError(f"training state holds a {type(value).__name__}, which has no safe encoding")


def _decode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors, where) for v in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {"__tensor__"}:
        if value["__tensor__"] not in tensors:
            raise ConfigError(f"{where}: tensor {value['__tensor__']!r} is missing from {STATE_TENSORS}")
        return tensors[value["__tensor__"]]
    if set(value) == {"__tuple__"}:
        return tuple(_decode(v, tensors, where) for v in value["__tuple__"])
    if set(value) == {"__items__"}:
        return {_decode(k, tensors, where): _decode(v, tensors, where) for k, v in value["__items__"]}
    if set(value) == {"__float__"}:
        return float(value["__float__"])
    return {k: _decode(v, tensors, where) for k, v in value.items()}


def save_training_state(directory: str | Path, state: dict[str, Any]) -> None:
    """Write `state` (nested dicts, lists, tuples, numbers, strings, tensors) as safetensors + JSON."""
    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    encoded = {"format_version": FORMAT_VERSION, "state": _encode(state, tensors)}
    atomic_write_bytes(directory / STATE_TENSORS, save(tensors))
    atomic_write_text(directory / STATE_JSON, json.dumps(encoded) + "\n")


def has_training_state(directory: str | Path) -> bool:
    directory = Path(directory)
    return (directory / STATE_JSON).is_file() and (directory / STATE_TENSORS).is_file()


def load_training_state(directory: str | Path) -> dict[str, Any]:
    """Read what `save_training_state` wrote; a checkpoint with only a pickled state is refused, unread."""
    directory = Path(directory)
    if not has_training_state(directory):
        if (directory / LEGACY_STATE).exists():
            raise ConfigError(f"'{directory}' holds a pickled {LEGACY_STATE} (gistctl < 0.2); gistctl never unpickles "
                              "files it reads back: start the run again, or train from its adapter with "
                              "--init-adapter")
        raise ConfigError(f"'{directory}' has no training state ({STATE_JSON} + {STATE_TENSORS}) to resume from")
    where = str(directory)
    try:
        data = json.loads((directory / STATE_JSON).read_text(encoding="utf-8"))
        tensors = load_file(str(directory / STATE_TENSORS))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, SafetensorError) as err:
        raise ConfigError(f"{where}: training state is unreadable ({err}); resume from an earlier step") from err
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION or "state" not in data:
        raise ConfigError(f"{where}: training state of an unknown format")
    return _decode(data["state"], tensors, where)
