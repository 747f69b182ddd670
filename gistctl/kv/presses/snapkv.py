"""SnapKV (Li et al., 2024, arXiv:2404.14469), query-agnostic: the document's own last tokens are the window.

The last `window` tokens of the document attend to everything before them; an entry scores the mean attention the
window gives it (averaged over the query heads of its KV group), smoothed by average pooling over `kernel`
neighbouring entries. The window itself is always kept. As kvpress's SnapKVPress, without a question.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gistctl.gist.mask import mask_for_model, prefix_mask
from gistctl.kv.attention import observe_attention
from gistctl.kv.presses.base import WINDOW_SCORE, PrefilledDocument


@dataclass
class SnapKVPress:
    """scores (layers, kv_heads, N): pooled mean window attention; WINDOW_SCORE on the window."""

    window: int = 64
    kernel: int = 5
    name: str = "snapkv"

    @torch.no_grad()
    def score(self, doc: PrefilledDocument) -> torch.Tensor:
        model, n = doc.model, doc.length
        w = max(1, min(self.window, n - doc.protected))
        layers, kv_heads = len(doc.keys), doc.keys[0].shape[1]
        scores = torch.zeros(layers, kv_heads, n)

        def observe(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float):
            layer = module.layer_idx
            groups = query.shape[1] // key.shape[1]
            q = query.float().view(1, key.shape[1], groups, w, -1)
            logits = q @ key.float()[:, :, None].transpose(-1, -2) * scaling
            causal = torch.ones(w, w, dtype=torch.bool, device=logits.device).tril()
            logits[..., -w:] = logits[..., -w:].masked_fill(~causal, float("-inf"))
            mean = logits.softmax(dim=-1).mean(dim=(2, 3))  # (1, kv_heads, N)
            pooled = torch.nn.functional.avg_pool1d(mean, self.kernel, stride=1, padding=self.kernel // 2,
                                                    count_include_pad=False)
            scores[layer] = pooled[0, :, :n].cpu()

        device = doc.keys[0].device
        with observe_attention(model, observe):
            model(input_ids=torch.tensor([doc.ids[n - w:]], device=device),
                  position_ids=torch.arange(n - w, n, device=device)[None],
                  attention_mask=mask_for_model(prefix_mask(n - w, w), model), cache=doc.cache(n - w),
                  use_cache=True, logits_to_keep=1)
        scores[..., n - w:] = WINDOW_SCORE
        return scores
