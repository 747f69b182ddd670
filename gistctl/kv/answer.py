"""Answer a question from a gist blob alone: the one function `ask`, training evaluation and `bench` use."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from gistctl import prompt
from gistctl.errors import DataError
from gistctl.generation import Generation, greedy_generate
from gistctl.gist.model import GistModel
from gistctl.gist.mask import mask_for_model, prefix_mask
from gistctl.kv.blob import GistBlob, check_blob_matches


def blob_cache(blob: GistBlob, model) -> DynamicCache:
    """A fresh cache holding the blob's gists (decoding extends a cache in place, so never reuse one)."""
    param = next(model.parameters())
    dtype = param.dtype if param.dtype.is_floating_point else torch.float32
    keys = blob.keys.to(param.device, dtype)
    values = blob.values.to(param.device, dtype)
    data = [(keys[i : i + 1], values[i : i + 1]) for i in range(keys.shape[0])]  # (1, kv_heads, K_total, head_dim)
    return DynamicCache(ddp_cache_data=data, config=model.config)


def check_window(config, next_position: int, question_tokens: int, max_new_tokens: int) -> None:
    """Refuse a question that would run past the model's positions (RoPE beyond the window: garbage)."""
    window = getattr(config, "max_position_embeddings", None)
    needed = next_position + question_tokens + max_new_tokens
    if window and needed > window:
        raise DataError(f"the gists end at position {next_position}; with the question ({question_tokens} tokens) and "
                        f"up to {max_new_tokens} answer tokens it needs {needed} positions but the model's window "
                        f"allows {window}; ask a shorter question")


def check_blob_for_model(blob: GistBlob, gm: GistModel, where: str = "blob") -> None:
    check_blob_matches(blob.meta, gm.loaded.fingerprint, gm.adapter_fingerprint, gm.loaded.name, gm.adapter_dir, where)


def answer_from_blob(gm: GistModel, blob: GistBlob, question: str, *,
                     max_new_tokens: int = prompt.MAX_NEW_TOKENS) -> Generation:
    """Greedy answer; the question continues at the position after the gists in the original sequence. The
    question and the longest answer must fit in the model's window after the gists, as for full context."""
    ids = prompt.question_ids(gm.tokenizer, question)
    check_window(gm.model.config, blob.meta.next_position, len(ids), max_new_tokens)
    return greedy_generate(
        gm.model, gm.tokenizer, ids,
        cache=blob_cache(blob, gm.model), cache_length=blob.meta.total_gists,
        first_position=blob.meta.next_position, max_new_tokens=max_new_tokens,
        stop_ids=prompt.stop_ids(gm.model, gm.tokenizer), suppress_ids=gm.gist_ids)


@torch.no_grad()
def answer_ranks(gm: GistModel, blob: GistBlob, question: str,
                 answer_ids: list[int]) -> list[tuple[int, int, float]]:
    """Teacher-force `answer_ids` after the question on the blob: per answer token (its rank among the
    tokens greedy decoding may choose, 0 = the greedy choice; the greedy choice's id; the token's log-probability
    among those tokens). The tokens are scored at the positions `answer_from_blob` decodes them at."""
    q = prompt.question_ids(gm.tokenizer, question)
    ids = q + list(answer_ids)
    device = next(gm.model.parameters()).device
    first = blob.meta.next_position
    out = gm.model(input_ids=torch.tensor([ids], device=device),
                   position_ids=torch.arange(first, first + len(ids), device=device)[None],
                   attention_mask=mask_for_model(prefix_mask(blob.meta.total_gists, len(ids)), gm.model),
                   cache=blob_cache(blob, gm.model), use_cache=True)
    logits = out.logits[0, len(q) - 1 : len(ids) - 1].float()
    logits[:, gm.gist_ids] = float("-inf")  # never chosen (suppressed in decoding)
    logprobs = logits.log_softmax(-1)
    return [(int((row > row[token]).sum()), int(row.argmax()), float(lp[token]))
            for row, lp, token in zip(logits, logprobs, answer_ids)]
