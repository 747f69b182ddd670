"""Training-free, query-agnostic KV presses: one small dataclass per file, each scoring every cached entry.

    press = get_press("kvzip")
    scores = press.score(doc)          # (layers, kv_heads, N), doc: a PrefilledDocument
    keep = select_kept(scores, 0.9375) # (layers, kv_heads, N) bool, one global threshold
"""

from __future__ import annotations

from gistctl.errors import ConfigError
from gistctl.kv.presses.base import BUDGETS, GLOBAL, UNIFORM, PrefilledDocument, Press, check_budget, check_ratio, select_kept
from gistctl.kv.presses.knorm import KnormPress
from gistctl.kv.presses.kvzip import KVzipPress
from gistctl.kv.presses.none import NoPress
from gistctl.kv.presses.snapkv import SnapKVPress
from gistctl.kv.presses.streaming import StreamingPress

PRESSES = {"kvzip": KVzipPress, "snapkv": SnapKVPress, "streaming": StreamingPress, "knorm": KnormPress,
           "none": NoPress}


def get_press(name: str) -> Press:
    if name not in PRESSES:
        raise ConfigError(f"unknown press '{name}'; choose from {', '.join(PRESSES)}")
    return PRESSES[name]()


__all__ = ["BUDGETS", "GLOBAL", "PRESSES", "UNIFORM", "PrefilledDocument", "Press", "check_budget", "check_ratio",
           "get_press", "select_kept"]
