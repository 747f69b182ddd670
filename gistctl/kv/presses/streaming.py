"""StreamingLLM (Xiao et al., 2023, arXiv:2309.17453): keep the attention sinks and the most recent entries.

The sinks are the protected head (the chat template's start, first in the cache); every head keeps the same
entries, so `global` and `uniform` budgets agree. As kvpress's StreamingLLMPress.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gistctl.kv.presses.base import PrefilledDocument


@dataclass
class StreamingPress:
    """scores (layers, kv_heads, N): the entry's position (later = keep)."""

    name: str = "streaming"

    def score(self, doc: PrefilledDocument) -> torch.Tensor:
        layers, kv_heads = len(doc.keys), doc.keys[0].shape[1]
        return torch.arange(doc.length, dtype=torch.float32).expand(layers, kv_heads, -1).clone()
