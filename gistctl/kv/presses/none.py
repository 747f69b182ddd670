"""No press: every entry is kept (ratio 0). The whole cache on disk, so full-context answers need no re-prefill."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gistctl.kv.presses.base import PrefilledDocument


@dataclass
class NoPress:
    """scores (layers, kv_heads, N): zeros; only ratio 0 is allowed (`gistctl.kv.press.check_press_ratio`)."""

    name: str = "none"

    def score(self, doc: PrefilledDocument) -> torch.Tensor:
        layers, kv_heads = len(doc.keys), doc.keys[0].shape[1]
        return torch.zeros(layers, kv_heads, doc.length)
