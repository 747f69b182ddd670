"""What every press shares: the prefilled document it scores, the registry, and the choice of entries to keep.

The design follows NVIDIA kvpress (github.com/NVIDIA/kvpress, Apache-2.0): one small dataclass per press whose
`score` returns one number per cached entry, higher = keep; `compression_ratio` there is `ratio` here, the fraction
of the document's entries removed. kvpress pins transformers < 5.3, so gistctl writes its own presses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import DynamicCache

from gistctl.errors import ConfigError

GLOBAL, UNIFORM = "global", "uniform"
WINDOW_SCORE = 1e4  # a press's "always keep" (SnapKV's window): above any real score, below the protected sinks
BUDGETS = (GLOBAL, UNIFORM)


@dataclass
class PrefilledDocument:
    """The reader's cache of `ids` (the chat template's head, then the document), as one prefill left it.

    keys/values: one (1, kv_heads, N, head_dim) tensor per layer, keys after RoPE; `protected`: the first entries
    (attention sinks), always kept whatever their score; `head`: where the document starts (after the chat
    template's head)."""

    model: torch.nn.Module
    tokenizer: object
    ids: list[int]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    protected: int
    head: int = 0

    @property
    def length(self) -> int:
        return len(self.ids)

    def cache(self, entries: int | None = None) -> DynamicCache:
        """A fresh cache of the first `entries` entries (all by default); the prefill's tensors are not changed."""
        n = self.length if entries is None else entries
        data = [(k[:, :, :n], v[:, :, :n]) for k, v in zip(self.keys, self.values)]
        return DynamicCache(ddp_cache_data=data, config=self.model.config)

    def stacked_keys(self) -> torch.Tensor:
        """(layers, kv_heads, N, head_dim)."""
        return torch.cat(self.keys, dim=0)


class Press(Protocol):
    name: str

    def score(self, doc: PrefilledDocument) -> torch.Tensor:
        """(layers, kv_heads, N) float32: how much each cached entry is worth keeping (higher = keep)."""
        ...


def check_ratio(ratio: float) -> float:
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 <= ratio < 1:
        raise ConfigError(f"--ratio must be in [0, 1) (the fraction of the document's entries removed; 0.9375 keeps "
                          f"1 in 16), got {ratio!r}")
    return float(ratio)


def check_budget(budget: str) -> str:
    if budget not in BUDGETS:
        raise ConfigError(f"unknown budget '{budget}'; choose {' or '.join(BUDGETS)}")
    return budget


def kept_per_head(length: int, ratio: float, protected: int = 0) -> int:
    """Entries one head keeps at `ratio` (at least the protected ones)."""
    return min(length, max(protected, int(round((1 - ratio) * length))))


def select_kept(scores: torch.Tensor, ratio: float, budget: str = GLOBAL, protected: int = 0) -> torch.Tensor:
    """scores (layers, kv_heads, N) -> keep (layers, kv_heads, N) bool.

    `global`: one threshold over every (layer, head, entry), so heads that matter keep more; `uniform`: the same
    count in every head. Both keep the same total, (1 - ratio) x layers x kv_heads x N rounded (at least the
    `protected` first entries of every head, which are always kept)."""
    check_ratio(ratio)
    layers, heads, n = scores.shape
    scores = scores.float().clone().nan_to_num(posinf=WINDOW_SCORE)
    scores[..., :protected] = float("inf")
    per_head = kept_per_head(n, ratio, protected)
    keep = torch.zeros(layers, heads, n, dtype=torch.bool)
    if check_budget(budget) == UNIFORM:
        top = scores.topk(per_head, dim=-1).indices
        keep.scatter_(-1, top.cpu(), True)
    else:
        top = scores.flatten().topk(per_head * layers * heads).indices
        keep.view(-1)[top.cpu()] = True
    return keep
