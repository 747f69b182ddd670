"""KVzip (Kim et al., 2025, arXiv:2505.23416): an entry is worth what the model needs it for to repeat the document.

After the prefill, the reader is teacher-forced a new user turn asking it to repeat the context, followed by the
document itself, chunk by chunk over the cached document; each cached entry scores the largest attention any repeat
query of its KV group gives it. Per chunk the softmax runs over the protected head, the chunk's own cached entries
and the repeat's tokens (as kvpress's KVzipPress does), so scoring memory is O(chunk x chunk), whatever the length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gistctl import prompt
from gistctl.gist.mask import mask_for_model, prefix_mask
from gistctl.kv.attention import observe_attention
from gistctl.kv.presses.base import PrefilledDocument

FIRST = "Repeat the previous context exactly."
LATER = "Repeat the part of the previous context exactly, starting with"


def repeat_turn_ids(tokenizer, request: str) -> list[int]:
    """End the document's user turn and open a new one holding `request`, then the assistant's turn: what follows
    the document in the repeat pass. Templates that refuse two user turns in a row get the request inside the
    document's turn instead."""
    slot = "\x00gistctl-document\x00"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": slot}, {"role": "user", "content": request}],
                                             add_generation_prompt=True, tokenize=False)
        tail = text.split(slot, 1)[1]
    except Exception:  # a template that insists on alternating roles raises its own error type
        tail = f"\n\n{request}" + prompt.chat_parts(tokenizer)[1]
    return tokenizer(tail, add_special_tokens=False)["input_ids"]


@dataclass
class KVzipPress:
    """scores (layers, kv_heads, N): max over repeat queries (and the query heads of each KV group) of the softmax
    attention they give the entry. `chunk`: document tokens repeated per forward; `overlap`: tokens of the previous
    chunk quoted in the next chunk's request."""

    chunk: int = 512
    overlap: int = 8
    name: str = "kvzip"
    largest_scored: int = field(default=0, init=False)  # the widest score matrix formed, in keys (memory check)

    @torch.no_grad()
    def score(self, doc: PrefilledDocument) -> torch.Tensor:
        model, tokenizer = doc.model, doc.tokenizer
        n, head = doc.length, doc.head  # the template's head is not repeated: it scores 0 (only the sinks stay)
        layers, kv_heads = len(doc.keys), doc.keys[0].shape[1]
        scores = torch.zeros(layers, kv_heads, n)
        window = getattr(model.config, "max_position_embeddings", None) or n + 4 * self.chunk
        device = doc.keys[0].device
        start = head
        previous: list[int] = []
        self.largest_scored = 0
        while start < n:
            request = repeat_turn_ids(tokenizer, FIRST if not previous else
                                      f"{LATER} {tokenizer.decode(previous[-self.overlap:])}")
            size = max(16, min(self.chunk, window - n - len(request)))
            end = min(n, start + size)
            span = doc.ids[start:end]
            ids = request + span
            q_len = len(ids)

            def observe(layer: int, query: torch.Tensor, key: torch.Tensor, start=start, end=end, q_len=q_len):
                groups = query.shape[1] // key.shape[1]
                sub = torch.cat([key[:, :, :head], key[:, :, start:end], key[:, :, -q_len:]], dim=2).float()
                self.largest_scored = max(self.largest_scored, sub.shape[2])
                q = query.float().view(1, key.shape[1], groups, q_len, -1)
                logits = q @ sub[:, :, None].transpose(-1, -2) * (query.shape[-1] ** -0.5)
                causal = torch.ones(q_len, q_len, dtype=torch.bool, device=logits.device).tril()
                logits[..., -q_len:].masked_fill_(~causal, float("-inf"))
                weights = logits.softmax(dim=-1)[..., head : head + (end - start)]
                scores[layer, :, start:end] = weights.amax(dim=(2, 3))[0].cpu()

            with observe_attention(model, observe):
                model(input_ids=torch.tensor([ids], device=device),
                      position_ids=torch.arange(n, n + q_len, device=device)[None],
                      attention_mask=mask_for_model(prefix_mask(n, q_len), model), cache=doc.cache(),
                      use_cache=True, logits_to_keep=1)
            previous = span
            start = end
        return scores
