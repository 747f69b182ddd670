"""The gist attention mask: one boolean source, converted per attention backend.

Layout of one example (left-padded in a batch):

    [pad][chunk_1][gists_1][chunk_2][gists_2]...[chunk_n][gists_n][question][answer]

Each token belongs to a *block*: chunk i and its gists are block i, question + answer are block n.
A query attends to a key iff the key is not later (causal), neither is padding, and either both are
in the same block or the key is a gist of an earlier block. So a chunk sees itself and all earlier
gists, its gists see the chunk and all earlier gists, and the question/answer see every gist but no
context. With one chunk this is the classic `[context][gists][question][answer]` gist mask.

In transformers 5.x a 4D mask passed as `attention_mask` goes to attention unchanged, so it must carry
causality and padding itself; eager attention needs it additive (0 / dtype min), sdpa takes bool.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CONTEXT, GIST, QUESTION, ANSWER, PAD = 0, 1, 2, 3, 4
KIND_NAMES = {CONTEXT: "context", GIST: "gist", QUESTION: "question", ANSWER: "answer", PAD: "padding"}


@dataclass(frozen=True)
class GistLayout:
    """Segment lengths of one example: context chunks, K gists after each, question, answer."""

    chunks: tuple[int, ...]
    num_gist: int
    question: int = 0
    answer: int = 0

    def __post_init__(self):
        if self.num_gist < 1:
            raise ValueError(f"num_gist must be >= 1, got {self.num_gist}")
        if not self.chunks or min(self.chunks) < 0:
            raise ValueError(f"chunks must be one or more non-negative lengths, got {self.chunks}")
        if self.question < 0 or self.answer < 0:
            raise ValueError("question and answer lengths must be >= 0")

    @property
    def prefix_length(self) -> int:
        """Tokens of [chunk_1][gists_1]...[chunk_n][gists_n]."""
        return sum(self.chunks) + self.num_gist * len(self.chunks)

    @property
    def length(self) -> int:
        return self.prefix_length + self.question + self.answer

    def kinds(self) -> torch.Tensor:
        """(length,) segment kind of every token (CONTEXT, GIST, QUESTION, ANSWER)."""
        parts = []
        for chunk in self.chunks:
            parts += [torch.full((chunk,), CONTEXT), torch.full((self.num_gist,), GIST)]
        parts += [torch.full((self.question,), QUESTION), torch.full((self.answer,), ANSWER)]
        return torch.cat(parts).long()

    def blocks(self) -> torch.Tensor:
        """(length,) block index of every token: chunk i and its gists are i, question/answer are n."""
        sizes = [c + self.num_gist for c in self.chunks] + [self.question + self.answer]
        return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))

    def gist_positions(self) -> torch.Tensor:
        """(n * K,) position ids of every gist token, in order."""
        return torch.nonzero(self.kinds() == GIST).flatten()


@dataclass
class GistBatch:
    """Left-padded batch metadata. Shapes: kinds/blocks/position_ids (B, L); attend (B, L, L) bool."""

    kinds: torch.Tensor
    blocks: torch.Tensor
    position_ids: torch.Tensor
    attend: torch.Tensor


def build_gist_mask(layouts: list[GistLayout], length: int | None = None) -> GistBatch:
    """Boolean attend-matrix (True = may attend) and position ids for a left-padded batch.

    Position ids count real tokens from 0 in each example (padding gets 0), so an example's ids do not
    depend on how much padding the batch needs.
    """
    longest = max(layout.length for layout in layouts)
    length = longest if length is None else length
    if length < longest:
        raise ValueError(f"length {length} is shorter than the longest example ({longest})")
    batch = len(layouts)
    kinds = torch.full((batch, length), PAD, dtype=torch.long)
    blocks = torch.full((batch, length), -1, dtype=torch.long)
    position_ids = torch.zeros((batch, length), dtype=torch.long)
    for row, layout in enumerate(layouts):
        start = length - layout.length
        kinds[row, start:] = layout.kinds()
        blocks[row, start:] = layout.blocks()
        position_ids[row, start:] = torch.arange(layout.length)
    real = kinds != PAD
    q_block, k_block = blocks[:, :, None], blocks[:, None, :]
    key_is_gist = (kinds == GIST)[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    attend = causal & real[:, :, None] & real[:, None, :] & ((q_block == k_block) | (key_is_gist & (k_block < q_block)))
    return GistBatch(kinds, blocks, position_ids, attend)


def prefix_mask(prefix_length: int, query_length: int, batch: int = 1) -> torch.Tensor:
    """(B, Lq, prefix + Lq) bool: queries see the whole cached prefix and are causal among themselves.

    The mask for answering from a gist cache (the prefix holds gists only) and for plain causal
    decoding (prefix 0).
    """
    query_part = torch.ones(query_length, query_length, dtype=torch.bool).tril()
    prefix_part = torch.ones(query_length, prefix_length, dtype=torch.bool)
    return torch.cat([prefix_part, query_part], dim=1).expand(batch, -1, -1)


def _never_empty(attend: torch.Tensor) -> torch.Tensor:
    # A query row with no allowed key (padding) would softmax to NaN; let it see itself instead.
    # Only padding rows are affected, and padding is seen by no real token, so nothing real changes.
    q_len, k_len = attend.shape[-2:]
    diagonal = torch.eye(q_len, k_len, dtype=torch.bool, device=attend.device).roll(k_len - q_len, dims=1)
    empty = ~attend.any(dim=-1, keepdim=True)
    return attend | (empty & diagonal)


def to_additive(attend: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, Lq, Lk) bool -> (B, 1, Lq, Lk) additive float mask for eager attention (0 or dtype min)."""
    attend = _never_empty(attend)
    mask = torch.zeros(attend.shape, dtype=dtype, device=attend.device)
    return mask.masked_fill(~attend, torch.finfo(dtype).min)[:, None]


def to_sdpa(attend: torch.Tensor) -> torch.Tensor:
    """(B, Lq, Lk) bool -> (B, 1, Lq, Lk) bool mask for sdpa (True = attend)."""
    return _never_empty(attend)[:, None]


def mask_for_model(attend: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """Convert for the model's attention backend (`config._attn_implementation`) and move to its device."""
    implementation = model.config._attn_implementation
    device = next(model.parameters()).device
    if implementation == "eager":
        return to_additive(attend, _compute_dtype(model)).to(device)
    if implementation == "sdpa":
        return to_sdpa(attend).to(device)
    raise ValueError(f"attention implementation '{implementation}' is not supported; load the model with 'eager' or 'sdpa'")


def _compute_dtype(model: torch.nn.Module) -> torch.dtype:
    dtype = getattr(model, "dtype", None) or next(model.parameters()).dtype
    return dtype if dtype.is_floating_point else torch.float32
