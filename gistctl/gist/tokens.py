"""Gist tokens `<gist_0>`..`<gist_{K-1}>` in the tokenizer and the model's embedding."""

from __future__ import annotations

import torch


def gist_token_names(num_gist: int) -> list[str]:
    return [f"<gist_{i}>" for i in range(num_gist)]


def add_gist_tokens(model: torch.nn.Module, tokenizer, num_gist: int) -> list[int]:
    """Add K gist tokens (idempotent) and return their ids.

    New embedding rows start at the mean of the existing rows (works with tied embeddings: the output
    head shares the same matrix). Rows of tokens that already existed are left untouched.
    """
    if num_gist < 1:
        raise ValueError(f"num_gist must be >= 1, got {num_gist}")
    names = gist_token_names(num_gist)
    vocab = tokenizer.get_vocab()
    missing = [name for name in names if name not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(names)
    embedding = model.get_input_embeddings()
    old_rows = embedding.weight.shape[0]
    if max(ids) >= old_rows:
        model.resize_token_embeddings(max(ids) + 1, mean_resizing=False)
        embedding = model.get_input_embeddings()
        with torch.no_grad():
            mean = embedding.weight[:old_rows].float().mean(dim=0)
            new_ids = [i for i in ids if i >= old_rows]
            embedding.weight[new_ids] = mean.to(embedding.weight.dtype)
            output = model.get_output_embeddings()
            if output is not None and output.weight is not embedding.weight:
                output.weight[new_ids] = output.weight[:old_rows].float().mean(dim=0).to(output.weight.dtype)
    return ids
