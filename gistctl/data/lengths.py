"""Token lengths: the tokenizer that measures them, target-length specs, and the per-task summary."""

from __future__ import annotations

import random
import re
import statistics
from dataclasses import dataclass

from gistctl.errors import ConfigError, ModelLoadError

_LENGTH_ITEM = re.compile(r"^\s*(\d+)(k?)\s*(?:\.\.\s*(\d+)(k?)\s*)?$", re.IGNORECASE)


def load_tokenizer(spec: str | None = None):
    """Only the tokenizer of a model spec (default, hub id or directory), without loading weights."""
    from transformers import AutoTokenizer

    from gistctl.models import resolve_model_path

    path = resolve_model_path(spec)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load the tokenizer of '{spec}': {err}".splitlines()[0]) from err


def count_tokens(tokenizer, text: str) -> int:
    """Tokens of `text` as a document (no special tokens)."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def count_tokens_batch(tokenizer, texts: list[str]) -> list[int]:
    if not texts:
        return []
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


@dataclass(frozen=True)
class LengthSpec:
    """Target context lengths in tokens: example i uses item i % len(items); an item is a length or a range."""

    items: tuple[tuple[int, int], ...]  # (lo, hi) inclusive; lo == hi for a fixed length

    def target(self, index: int, rng: random.Random) -> int:
        lo, hi = self.items[index % len(self.items)]
        return lo if lo == hi else rng.randint(lo, hi)

    def __str__(self) -> str:
        return ",".join(str(lo) if lo == hi else f"{lo}..{hi}" for lo, hi in self.items)


def parse_lengths(spec: str | int | list | None, default: str = "1000") -> LengthSpec:
    """`"2000"`, `"1k,2k,4k"`, `"2k..8k"` (uniform per example) or a YAML list of those -> LengthSpec."""
    if spec is None:
        spec = default
    if isinstance(spec, int):
        spec = str(spec)
    parts = [str(p) for p in spec] if isinstance(spec, list) else str(spec).split(",")
    items = []
    for part in parts:
        match = _LENGTH_ITEM.match(part)
        if not match:
            raise ConfigError(f"bad token length '{part}'; use e.g. 2000, 1k,2k,4k or 2k..8k")
        lo = int(match.group(1)) * (1000 if match.group(2) else 1)
        hi = int(match.group(3)) * (1000 if match.group(4) else 1) if match.group(3) else lo
        if lo < 16 or hi < lo:
            raise ConfigError(f"bad token length '{part}': lengths are at least 16 and ranges go low..high")
        items.append((lo, hi))
    return LengthSpec(tuple(items))


def parse_range(spec: str | int, name: str, lo_limit: int, hi_limit: int) -> tuple[int, int]:
    """`"2..30"` or `"5"` -> (lo, hi) within [lo_limit, hi_limit]."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:\.\.\s*(\d+)\s*)?", str(spec))
    if not match:
        raise ConfigError(f"bad {name} '{spec}'; use a number or a range such as {lo_limit}..{hi_limit}")
    lo = int(match.group(1))
    hi = int(match.group(2)) if match.group(2) else lo
    if not lo_limit <= lo <= hi <= hi_limit:
        raise ConfigError(f"{name} '{spec}' must lie within {lo_limit}..{hi_limit}, low..high")
    return lo, hi


def summarize(records: list[dict]) -> list[dict]:
    """Per task: count and context token length min/median/max (from `meta.context_tokens`)."""
    by_task: dict[str, list[int]] = {}
    for record in records:
        by_task.setdefault(record["task"], []).append(int(record["meta"].get("context_tokens", 0)))
    return [{"task": task, "count": len(lengths), "min": min(lengths), "median": int(statistics.median(lengths)),
             "max": max(lengths)} for task, lengths in sorted(by_task.items())]
