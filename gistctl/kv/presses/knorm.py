"""Knorm (Devoto et al., 2024, arXiv:2406.11430): keys with a small L2 norm draw attention; keep those.

RoPE is a rotation, so the norm of a stored (rotated) key is the norm before RoPE. As kvpress's KnormPress.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gistctl.kv.presses.base import PrefilledDocument


@dataclass
class KnormPress:
    """scores (layers, kv_heads, N): minus the key's L2 norm."""

    name: str = "knorm"

    def score(self, doc: PrefilledDocument) -> torch.Tensor:
        return -doc.stacked_keys().float().norm(dim=-1).cpu()
