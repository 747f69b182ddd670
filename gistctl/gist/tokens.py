"""Gist tokens `<gist_0>`..`<gist_{K-1}>` in the tokenizer and the model's embedding."""

from __future__ import annotations

import torch


def gist_token_names(num_gist: int) -> list[str]:
    return [f"<gist_{i}>" for i in range(num_gist)]


def add_gist_tokens(model: torch.nn.Module, tokenizer, num_gist: int) -> list[int]:
    """Add K gist tokens (idempotent) and return their ids.

    New embedding rows start like typical tokens: the mean of the existing rows plus per-dimension noise of
    their standard deviation, from a fixed seed (so untrained gists are the same in every process). Equal
    rows would leave the K gists symmetric, and on SmolLM2 the mean-initialised gists sometimes never
    left chance (README, "Training"). Works with tied embeddings (the output head shares the matrix). Rows
    of tokens that already existed are left untouched.
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
        new_ids = [i for i in ids if i >= old_rows]
        with torch.no_grad():
            embedding.weight[new_ids] = _typical_rows(embedding.weight[:old_rows], len(new_ids))
            output = model.get_output_embeddings()
            if output is not None and output.weight is not embedding.weight:
                output.weight[new_ids] = _typical_rows(output.weight[:old_rows], len(new_ids))
    return ids


GIST_INIT_SEED = 0


def _typical_rows(rows: torch.Tensor, n: int) -> torch.Tensor:
    """n rows drawn from N(mean, std) of `rows`, per dimension, with a fixed seed."""
    rows32 = rows.float()
    noise = torch.randn(n, rows.shape[1], generator=torch.Generator().manual_seed(GIST_INIT_SEED))
    return (rows32.mean(dim=0) + rows32.std(dim=0) * noise.to(rows.device)).to(rows.dtype)
