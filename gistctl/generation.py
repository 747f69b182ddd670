"""Greedy decoding with explicit positions and masks, timed: the one loop every method answers through.

transformers' `generate` infers positions from the cache length, which is wrong after a gist cache
(the question continues at the position after the gists in the original sequence). This loop passes
`position_ids` and a 4D mask at every step, so nothing is inferred.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from gistctl.gist.mask import mask_for_model, prefix_mask


@dataclass
class Generation:
    """Greedy output and its timing. ttft_s: prompt submitted -> first token chosen (seconds)."""

    token_ids: list[int]
    text: str
    ttft_s: float
    decode_tokens_per_s: float
    prompt_tokens: int
    first_logits: torch.Tensor  # (vocab,) next-token logits after the prompt, float32 on CPU


@torch.no_grad()
def greedy_generate(
    model,
    tokenizer,
    prompt_ids: list[int],
    *,
    cache=None,
    cache_length: int = 0,
    first_position: int = 0,
    max_new_tokens: int = 32,
    stop_ids: set[int] = frozenset(),
    suppress_ids: list[int] = (),
    on_text: Callable[[str], None] | None = None,
) -> Generation:
    """Decode greedily from `prompt_ids`, attending to all `cache_length` cached entries.

    `first_position` is the RoPE position of the first prompt token. The cache is mutated (extended).
    `on_text(piece)` is called with each newly decoded piece of the answer's text as it is chosen (streaming).
    """
    device = next(model.parameters()).device
    start = time.perf_counter()
    ids = torch.tensor([prompt_ids], device=device)
    positions = torch.arange(first_position, first_position + len(prompt_ids), device=device)[None]
    attend = prefix_mask(cache_length, len(prompt_ids))
    out_ids: list[int] = []
    first_logits = None
    ttft = 0.0
    seen = cache_length
    streamed = 0
    for step in range(max_new_tokens):
        out = model(input_ids=ids, position_ids=positions, attention_mask=mask_for_model(attend, model),
                    cache=cache, use_cache=True, logits_to_keep=1)
        cache = out.cache
        logits = out.logits[0, -1].float()
        if step == 0:
            first_logits = logits.detach().to("cpu", copy=True)
        if suppress_ids:
            logits[list(suppress_ids)] = float("-inf")
        token = int(logits.argmax())
        if step == 0:
            ttft = time.perf_counter() - start
        if token in stop_ids:
            break
        out_ids.append(token)
        if on_text is not None:
            text_so_far = tokenizer.decode(out_ids, skip_special_tokens=True)
            if len(text_so_far) > streamed and not text_so_far.endswith("\ufffd"):  # whole characters only
                on_text(text_so_far[streamed:])
                streamed = len(text_so_far)
        seen += ids.shape[1]
        next_position = int(positions[0, -1]) + 1
        ids = torch.tensor([[token]], device=device)
        positions = torch.tensor([[next_position]], device=device)
        attend = prefix_mask(seen, 1)
    total = time.perf_counter() - start
    decode_time = total - ttft
    rate = (len(out_ids) - 1) / decode_time if len(out_ids) > 1 and decode_time > 0 else 0.0
    text = tokenizer.decode(out_ids, skip_special_tokens=True).strip()
    return Generation(out_ids, text, ttft, rate, len(prompt_ids), first_logits)
