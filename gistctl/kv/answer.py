"""Answer a question from a gist blob alone: the one function `ask`, training evaluation and `bench` use."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import DynamicCache

from gistctl import prompt
from gistctl.errors import DataError
from gistctl.generation import Generation, greedy_generate
from gistctl.gist.model import GistModel
from gistctl.gist.mask import mask_for_model, prefix_mask
from gistctl.gist.positions import rope_inv_freq, rotate_keys
from gistctl.kv.attention import entry_masks
from gistctl.kv.blob import GistBlob, check_blob_matches


def blob_cache(blob: GistBlob, model) -> DynamicCache:
    """A fresh cache holding the blob's gists (decoding extends a cache in place, so never reuse one)."""
    return blobs_cache([blob], model)[0]


def blobs_cache(blobs: list[GistBlob], model) -> tuple[DynamicCache, int, int, torch.Tensor | None]:
    """(cache, entries, first question position, keep) for the entries of several blobs read side by side.

    keep (layers, kv_heads, entries) bool marks real entries where a press blob's heads were padded to one length
    (None: every entry is real); ask under `gistctl.kv.attention.entry_masks(model, keep)`.

    Each blob's keys are re-rotated so that its gists sit where they sat before its own question: a blob whose
    question would start at `next_position` n is moved by P - n, P being the latest such position, and the
    question starts at P. Every document is then seen at the distances it is seen alone (one blob: unchanged,
    no rotation). keys/values are concatenated along the gist axis: (1, kv_heads, sum of K_total, head_dim)."""
    param = next(model.parameters())
    dtype = param.dtype if param.dtype.is_floating_point else torch.float32
    first = max(b.meta.next_position for b in blobs)
    keys, values, keeps = [], [], []
    inv_freq = None
    for blob in blobs:
        k, v, keep = blob.padded_kv(dtype)
        keeps.append(keep if keep is not None else torch.ones(k.shape[:3], dtype=torch.bool))
        k = k.to(param.device)
        shift = first - blob.meta.next_position
        if shift:
            if inv_freq is None:
                inv_freq = rope_inv_freq(model)
            k = rotate_keys(k.double(), shift, inv_freq).to(dtype)
        keys.append(k)
        values.append(v.to(param.device))
    keys_all, values_all = torch.cat(keys, dim=2), torch.cat(values, dim=2)
    keep_all = torch.cat(keeps, dim=2)
    data = [(keys_all[i : i + 1], values_all[i : i + 1]) for i in range(keys_all.shape[0])]
    cache = DynamicCache(ddp_cache_data=data, config=model.config)
    return cache, keys_all.shape[2], first, (None if bool(keep_all.all()) else keep_all)


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


def check_blobs_for_model(blobs: list[GistBlob], gm: GistModel, names: list[str] | None = None) -> None:
    """Refuse none given, or any blob made with another model or adapter (named by `names`, else by place)."""
    if not blobs:
        raise DataError("give at least one blob")
    for i, blob in enumerate(blobs):
        where = names[i] if names else ("blob" if len(blobs) == 1 else f"blob {i + 1} of {len(blobs)}")
        check_blob_for_model(blob, gm, where=where)


def answer_from_blobs(gm: GistModel, blobs: list[GistBlob], question: str, *,
                      max_new_tokens: int = prompt.MAX_NEW_TOKENS,
                      on_text: Callable[[str], None] | None = None) -> Generation:
    """Greedy answer from the gists of several documents side by side (`blobs_cache`); one blob answers exactly
    as `answer_from_blob`. `on_text` receives the answer as it is decoded."""
    ids = question_prompt_ids(gm.tokenizer, blobs, question)
    cache, entries, first, keep = blobs_cache(blobs, gm.model)
    check_window(gm.model.config, first, len(ids), max_new_tokens)
    with entry_masks(gm.model, keep):
        return greedy_generate(gm.model, gm.tokenizer, ids, cache=cache, cache_length=entries, first_position=first,
                               max_new_tokens=max_new_tokens, stop_ids=prompt.stop_ids(gm.model, gm.tokenizer),
                               suppress_ids=gm.gist_ids, on_text=on_text)


def question_prompt_ids(tokenizer, blobs: list[GistBlob], question: str) -> list[int]:
    """What the question reads after the blobs' entries: a gist blob's own chat turn, or, after press blobs (which
    end inside the document's user turn), the rest of that turn as full context reads it."""
    presses = {b.meta.press is not None for b in blobs}
    if len(presses) > 1:
        raise DataError("gist blobs and press blobs cannot be asked together (their prompts differ); ask them apart")
    if presses == {True}:
        return prompt.question_turn_ids(tokenizer, question)
    return prompt.question_ids(tokenizer, question)



def answer_from_blob(gm: GistModel, blob: GistBlob, question: str, *,
                     max_new_tokens: int = prompt.MAX_NEW_TOKENS) -> Generation:
    """Greedy answer; the question continues at the position after the gists in the original sequence. The
    question and the longest answer must fit in the model's window after the gists, as for full context."""
    return answer_from_blobs(gm, [blob], question, max_new_tokens=max_new_tokens)


@torch.no_grad()
def answer_ranks(gm: GistModel, blob: GistBlob, question: str,
                 answer_ids: list[int]) -> list[tuple[int, int, float]]:
    """Teacher-force `answer_ids` after the question on the blob: per answer token (its rank among the
    tokens greedy decoding may choose, 0 = the greedy choice; the greedy choice's id; the token's log-probability
    among those tokens). The tokens are scored at the positions `answer_from_blob` decodes them at."""
    q = question_prompt_ids(gm.tokenizer, [blob], question)
    ids = q + list(answer_ids)
    device = next(gm.model.parameters()).device
    cache, entries, first, keep = blobs_cache([blob], gm.model)
    with entry_masks(gm.model, keep):
        out = gm.model(input_ids=torch.tensor([ids], device=device),
                       position_ids=torch.arange(first, first + len(ids), device=device)[None],
                       attention_mask=mask_for_model(prefix_mask(entries, len(ids)), gm.model),
                       cache=cache, use_cache=True)
    logits = out.logits[0, len(q) - 1 : len(ids) - 1].float()
    logits[:, gm.gist_ids] = float("-inf")  # never chosen (suppressed in decoding)
    logprobs = logits.log_softmax(-1)
    return [(int((row > row[token]).sum()), int(row.argmax()), float(lp[token]))
            for row, lp, token in zip(logits, logprobs, answer_ids)]
