"""Where examples and documents meet the model: a masked forward over a collated batch, and the
chunk-by-chunk read that compress (and compact- or auto-layout training) use."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Collection

import torch
from transformers import DynamicCache

from gistctl.gist.collate import IGNORE_INDEX, EncodedExample
from gistctl.gist.mask import mask_for_model, prefix_mask
from gistctl.gist.positions import COMPACT, SEQUENTIAL, check_layout, layout_for, rope_inv_freq, rotate_keys


def gist_forward(model, batch: dict[str, torch.Tensor], **kwargs):
    """`model(...)` on a collated batch (input_ids, position_ids, attend) with the mask converted for its backend."""
    device = next(model.parameters()).device
    return model(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                 attention_mask=mask_for_model(batch["attend"], model), **kwargs)


@dataclass
class ReadChunks:
    """The kept gists after reading a document chunk by chunk.

    keys/values: one (batch 1, kv_heads, K x chunks, head_dim) tensor per layer; positions: the RoPE
    position of every kept gist; next_position: where the question starts.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    positions: list[int]
    next_position: int

    def cache(self, model) -> DynamicCache:
        """A fresh cache holding the kept gists (decoding extends a cache in place)."""
        return DynamicCache(ddp_cache_data=list(zip(self.keys, self.values)), config=model.config)


def read_chunks(model, chunks: list[list[int]], gist_ids: list[int], layout: str = SEQUENTIAL, *,
                on_chunk: Callable[[int, int], None] | None = None,
                grad_chunks: Collection[int] | None = None) -> ReadChunks:
    """Run [chunk_i][gists] for each chunk with the gists kept so far in the cache; keep only the gists.

    Compress runs it under no_grad; training under the compact layout backpropagates through it, so
    training reads a document exactly as compress does. Positions follow `layout` (gistctl.gist.positions).
    `grad_chunks`: when given, only those chunks are read with gradients; the others run under no_grad
    (same values, no backward through them: the cost of a long document drops to one chunk's backward).
    """
    k = len(gist_ids)
    device = next(model.parameters()).device
    compact = check_layout(layout) == COMPACT
    inv_freq = rope_inv_freq(model) if compact else None
    read = ReadChunks([], [], [], 0)
    for index, chunk in enumerate(chunks):
        segment = chunk + list(gist_ids)
        cached = len(read.positions)
        start = cached if compact else read.next_position
        with_grad = grad_chunks is None or index in grad_chunks
        with nullcontext() if with_grad else torch.no_grad():
            out = model(input_ids=torch.tensor([segment], device=device),
                        position_ids=torch.arange(start, start + len(segment), device=device)[None],
                        attention_mask=mask_for_model(prefix_mask(cached, len(segment)), model),
                        cache=read.cache(model) if cached else None, use_cache=True, logits_to_keep=1)
        layers = out.cache.layers
        new_keys = [layer.keys[:, :, -k:] for layer in layers]
        if compact:  # the new gists move back over their chunk, right after the earlier gists
            new_keys = [rotate_keys(keys, -len(chunk), inv_freq) for keys in new_keys]
            read.positions += list(range(cached, cached + k))
            read.next_position = cached + k
        else:
            read.positions += list(range(start + len(chunk), start + len(segment)))
            read.next_position = start + len(segment)
        read.keys = [torch.cat([layer.keys[:, :, :cached], new], dim=2) for layer, new in zip(layers, new_keys)]
        read.values = [torch.cat([layer.values[:, :, :cached], layer.values[:, :, -k:]], dim=2) for layer in layers]
        if on_chunk:
            on_chunk(index + 1, len(chunks))
    return read


def chunked_answer_loss_sum(model, examples: list[EncodedExample], gist_ids: list[int],
                            layout: str, *, answer_chunks_only: bool = False) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over answer tokens, each example read as compress reads it: `read_chunks`
    (with gradients), then [question][answer] on the kept gists alone. Returns (loss sum, answer tokens).
    `layout` may be auto: each example is then read in the layout compress chooses for its chunk count.

    `answer_chunks_only`: backpropagate only through the chunks that hold the answer (an example's
    `answer_chunks`; all chunks when the answer is not in the text verbatim). The loss is the same; the
    gradient leaves out how the other chunks' gists would change."""
    return logits_loss_sum(chunked_answer_logits(model, examples, gist_ids, layout,
                                                 answer_chunks_only=answer_chunks_only))


def logits_loss_sum(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy, token count) over (logits (A, vocab), targets (A,)) pairs."""
    total = sum(torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
                for logits, targets in pairs)
    return total, sum(len(targets) for _, targets in pairs)


def batch_answer_logits(model, batch: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per example of a collated batch: (logits that predict its answer tokens (A, vocab), those tokens (A,)),
    computing logits only for the answer positions (left padding puts every answer at the end)."""
    keep = int(batch["answer_lengths"].max()) + 1
    logits = gist_forward(model, batch, logits_to_keep=keep).logits  # (B, keep, vocab)
    labels = batch["labels"][:, -keep + 1 :].to(logits.device)  # tokens at the last keep-1 positions
    out = []
    for row in range(labels.shape[0]):
        valid = labels[row] != IGNORE_INDEX
        out.append((logits[row, :-1][valid], labels[row][valid]))
    return out


def chunked_answer_logits(model, examples: list[EncodedExample], gist_ids: list[int], layout: str, *,
                          answer_chunks_only: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per example, read as compress reads it (see `chunked_answer_loss_sum`): (answer logits (A, vocab), answer
    tokens (A,))."""
    k = len(gist_ids)
    device = next(model.parameters()).device
    out = []
    for example in examples:
        chunks, at = [], 0
        for length in example.layout.chunks:
            chunks.append(example.input_ids[at : at + length])
            at += length + k
        tail, labels = example.input_ids[at:], example.labels[at:]
        grad_chunks = example.answer_chunks if answer_chunks_only and example.answer_chunks else None
        read = read_chunks(model, chunks, gist_ids, layout_for(layout, len(chunks)), grad_chunks=grad_chunks)
        answer = example.layout.answer
        logits = model(input_ids=torch.tensor([tail], device=device),
                       position_ids=torch.arange(read.next_position, read.next_position + len(tail),
                                                 device=device)[None],
                       attention_mask=mask_for_model(prefix_mask(len(read.positions), len(tail)), model),
                       cache=read.cache(model), use_cache=True, logits_to_keep=answer + 1).logits[0]
        targets = torch.tensor(labels[-answer:], device=device)
        valid = targets != IGNORE_INDEX
        out.append((logits[:-1][valid], targets[valid]))
    return out
