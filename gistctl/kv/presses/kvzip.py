"""KVzip (Kim et al., 2025, arXiv:2505.23416): an entry is worth what the model needs it for to repeat the document.

After the prefill, the reader is teacher-forced a new user turn asking it to repeat the context, followed by the
document itself, chunk by chunk over the cached document; each cached entry scores the largest attention any repeat
query of its KV group gives it. Per chunk the softmax runs over the protected head, the chunk's own cached entries
and the repeat's tokens (as kvpress's KVzipPress does), so scoring memory is O(chunk x chunk), whatever the length.

`normalize` is kvpress's KVzip+ normalization: each attention weight is divided by the norm of the query token's
hidden state and multiplied by the norm of what the entry's value adds to the residual stream through the output
projection (||W_o v||, per query head), so an entry attended to but contributing little scores less.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from gistctl import prompt
from gistctl.gist.mask import mask_for_model, prefix_mask
from gistctl.kv.attention import attention_modules, observe_attention
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
    chunk quoted in the next chunk's request; `normalize`: KVzip+ (see the module docstring)."""

    chunk: int = 512
    overlap: int = 8
    normalize: bool = False
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
        norms: dict[int, torch.Tensor] = {}  # layer -> (Q,) norms of the attention input (KVzip+)
        self.largest_scored = 0
        while start < n:
            request = repeat_turn_ids(tokenizer, FIRST if not previous else
                                      f"{LATER} {tokenizer.decode(previous[-self.overlap:])}")
            size = max(16, min(self.chunk, window - n - len(request)))
            end = min(n, start + size)
            span = doc.ids[start:end]
            ids = request + span
            q_len = len(ids)

            def observe(module, query, key, value, scaling, start=start, end=end, q_len=q_len):
                groups = query.shape[1] // key.shape[1]
                parts = (slice(0, head), slice(start, end), slice(key.shape[2] - q_len, key.shape[2]))
                sub = torch.cat([key[:, :, p] for p in parts], dim=2).float()
                self.largest_scored = max(self.largest_scored, sub.shape[2])
                q = query.float().view(1, key.shape[1], groups, q_len, -1)
                logits = q @ sub[:, :, None].transpose(-1, -2) * scaling  # (1, kv_heads, groups, Q, keys)
                causal = torch.ones(q_len, q_len, dtype=torch.bool, device=logits.device).tril()
                logits[..., -q_len:].masked_fill_(~causal, float("-inf"))
                weights = logits.softmax(dim=-1)[..., head : head + (end - start)]
                if self.normalize:
                    weights = weights / norms[module.layer_idx].float()[None, None, None, :, None]
                    weights = weights * _output_norms(module, value[:, :, start:end])[None, :, :, None, :]
                scores[module.layer_idx, :, start:end] = weights.amax(dim=(2, 3))[0].cpu()

            with observe_attention(model, observe), \
                    (_hidden_norms(model, norms) if self.normalize else contextlib.nullcontext()):
                model(input_ids=torch.tensor([ids], device=device),
                      position_ids=torch.arange(n, n + q_len, device=device)[None],
                      attention_mask=mask_for_model(prefix_mask(n, q_len), model), cache=doc.cache(),
                      use_cache=True, logits_to_keep=1)
            previous = span
            start = end
        return scores


def _output_norms(module, values: torch.Tensor) -> torch.Tensor:
    """values (1, kv_heads, T, head_dim) -> (kv_heads, groups, T): ||W_o,h v|| for every query head h of the group."""
    kv_heads, dim = values.shape[1], values.shape[-1]
    groups = module.num_key_value_groups
    wo = module.o_proj.weight.float().view(-1, kv_heads, groups, dim)  # (hidden, kv_heads, groups, head_dim)
    return torch.einsum("okgd,ktd->kgto", wo, values[0].float()).norm(dim=-1)


@contextlib.contextmanager
def _hidden_norms(model, norms: dict):
    """Inside, norms[layer] = (Q,) norms of each attention module's input hidden states."""

    def hook(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        norms[module.layer_idx] = hidden[0].norm(dim=-1)

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in attention_modules(model)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
