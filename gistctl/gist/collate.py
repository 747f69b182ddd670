"""Examples -> token ids under the gist layout, with labels on answer tokens only.

One example `{context, question, answer}` (or `answers: [...]`, the first is trained) becomes
`[context chunks with K gists after each][chat(question)][answer + end-of-turn]`, tokenised by the same
functions `ask` uses (gistctl.prompt). When an example is longer than `max_length`, only the context
is cut (its end); gists, question and answer always stay whole.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from itertools import accumulate

import torch

from gistctl import prompt
from gistctl.errors import DataError
from gistctl.gist.chunks import FIXED, check_chunking, split_chunks
from gistctl.gist.mask import ANSWER, GistBatch, GistLayout, build_gist_mask

IGNORE_INDEX = -100


def interleave_gists(chunks: list[list[int]], gist_ids: list[int]) -> list[int]:
    """[chunk_1][gists][chunk_2][gists]... as one id list."""
    out: list[int] = []
    for chunk in chunks:
        out += chunk + list(gist_ids)
    return out


def answer_chunks(tokenizer, chunks: list[list[int]], answer: str) -> tuple[int, ...]:
    """Indices of the chunks whose text holds an occurrence of `answer` (both chunks when one straddles
    their boundary); () when the answer is not in the document verbatim (a list, a count, a paraphrase)."""
    answer = answer.strip()
    if not answer:
        return ()
    texts = [tokenizer.decode(chunk) for chunk in chunks]
    ends = list(accumulate(len(text) for text in texts))  # where each chunk's text ends in the whole
    full, found, start = "".join(texts), set(), 0
    while (hit := full.find(answer, start)) >= 0:
        first = next(i for i, end in enumerate(ends) if hit < end)
        last = next(i for i, end in enumerate(ends) if hit + len(answer) <= end)
        found.update(range(first, last + 1))
        start = hit + 1
    return tuple(sorted(found))


def trained_answer(example: dict) -> str:
    """What training teaches the model to say: `answer`, else meta.completion where a builder set one, else
    the first of `answers`."""
    answer = example.get("answer")
    if answer is None:
        answer = (example.get("meta") or {}).get("completion")
    if answer is None:
        answers = example.get("answers") or []
        if not answers:
            raise DataError(f"example {example.get('id', '?')} has no answer")
        answer = answers[0]
    return str(answer)


@dataclass
class EncodedExample:
    input_ids: list[int]
    labels: list[int]
    layout: GistLayout
    truncated_tokens: int  # context tokens cut to fit max_length
    answer_chunks: tuple[int, ...] = ()  # chunks whose text holds the answer (`answer_chunks`)


class GistCollator:
    """Callable on a list of examples -> a left-padded batch dict of tensors.

    Batch keys: input_ids, labels, position_ids (B, L) long; attend (B, L, L) bool (convert with
    `mask_for_model` at forward time); answer_lengths (B,) long.
    """

    def __init__(self, tokenizer, gist_ids: list[int], max_length: int, chunk_tokens: int | None = None,
                 spell_codes: bool = False, chunking: str = FIXED, answer_chunks_for: Collection[str] | None = None):
        self.tokenizer = tokenizer
        self.spell_codes = spell_codes  # prompt.answer_ids: codes trained one character per token
        self.gist_ids = list(gist_ids)
        self.max_length = max_length
        self.chunk_tokens = chunk_tokens
        self.chunking = check_chunking(chunking)
        self.answer_chunks_for = answer_chunks_for  # tasks whose answer chunks are looked up (None: every task)
        self.examples_seen = 0
        self.examples_truncated = 0

    def encode(self, example: dict) -> EncodedExample:
        answer = trained_answer(example)
        context = prompt.context_ids(self.tokenizer, example["context"])
        question = prompt.question_ids(self.tokenizer, example["question"])
        answer_ids = prompt.answer_ids(self.tokenizer, str(answer), spell_codes=self.spell_codes)
        k = len(self.gist_ids)
        chunk = self.chunk_tokens or max(len(context), 1)
        fixed = len(question) + len(answer_ids)

        def total(n_context: int) -> int:
            return n_context + k * max(1, -(-n_context // chunk)) + fixed

        cut = 0
        if total(len(context)) > self.max_length:
            if total(0) > self.max_length:
                raise DataError(f"example {example.get('id', '?')}: gists + question + answer alone take "
                                f"{total(0)} tokens, more than max_length {self.max_length}")
            low, high = 0, len(context)  # total() is monotone: find the longest context that fits
            while low < high:
                mid = (low + high + 1) // 2
                low, high = (mid, high) if total(mid) <= self.max_length else (low, mid - 1)
            cut = len(context) - low
            context = context[:low]
        chunks = split_chunks(context, chunk, self.chunking)
        self.examples_seen += 1
        self.examples_truncated += cut > 0
        layout = GistLayout(tuple(len(c) for c in chunks), k, len(question), len(answer_ids))
        ids = interleave_gists(chunks, self.gist_ids) + question + answer_ids
        labels = [IGNORE_INDEX] * (len(ids) - len(answer_ids)) + answer_ids
        look_up = self.answer_chunks_for is None or example.get("task") in self.answer_chunks_for
        found = answer_chunks(self.tokenizer, chunks, str(answer)) if look_up else ()
        return EncodedExample(ids, labels, layout, cut, found)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        return collate_encoded([self.encode(e) for e in examples], self.tokenizer.pad_token_id)


def collate_encoded(encoded: list[EncodedExample], pad_id: int) -> dict[str, torch.Tensor]:
    gist_batch: GistBatch = build_gist_mask([e.layout for e in encoded])
    length = gist_batch.kinds.shape[1]
    input_ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), length), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(encoded):
        n = len(example.input_ids)
        input_ids[row, length - n :] = torch.tensor(example.input_ids)
        labels[row, length - n :] = torch.tensor(example.labels)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": gist_batch.position_ids,
        "attend": gist_batch.attend,
        "answer_lengths": (gist_batch.kinds == ANSWER).sum(dim=1),
    }
