"""Evaluation during training: a gist reader's answers come from the compressed KV via `answer_from_blob`; a full
reader's (`train --reader full`) from the whole document in the prompt."""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import torch

from gistctl.scoring import score
from gistctl.gist.model import GistModel
from gistctl.kv.answer import answer_from_blob
from gistctl.kv.compress import compress_document
from gistctl.models import LoadedModel


def answer_budget(tokenizer, example: dict, max_new_tokens: int) -> int:
    """New tokens an example may take: `max_new_tokens`, or room for all of a longer `meta.completion` (+4)."""
    completion = (example.get("meta") or {}).get("completion")
    if completion is None:
        return max_new_tokens
    return max(max_new_tokens, len(tokenizer(completion, add_special_tokens=False)["input_ids"]) + 4)


@torch.no_grad()
def evaluate_from_blobs(gm: GistModel, examples: list[dict], *, dtype: str = "fp16",
                        max_new_tokens: int = 16) -> dict:
    """Compress each context, answer its question from the blob, score. Returns mean primary score per task
    and overall (`{"overall": x, "per_task": {...}, "n": n, "samples": [...first 3...]}`). An example trained
    on a longer `meta.completion` gets room to say all of it (its tokens + 4) before it is scored."""

    def answer(example: dict, budget: int) -> str:
        blob, _ = compress_document(gm, example["context"], dtype=dtype)
        return answer_from_blob(gm, blob, example["question"], max_new_tokens=budget).text

    return _evaluate(gm.model, gm.tokenizer, examples, answer, max_new_tokens)


@torch.no_grad()
def evaluate_full_context(loaded: LoadedModel, model, examples: list[dict], *, max_new_tokens: int = 16) -> dict:
    """The full reader's evaluation (`train --reader full`): each question asked with its whole document in the
    prompt, as `ask --method full --adapter` asks it (documents longer than the window are cut at their end).
    Returns what `evaluate_from_blobs` returns."""
    from gistctl.methods.full import FullContext

    method = FullContext(dataclasses.replace(loaded, model=model), truncate=True)

    def answer(example: dict, budget: int) -> str:
        method.max_new_tokens = budget
        return method.answer(method.prepare(example["context"]), example["question"]).text

    return _evaluate(model, loaded.tokenizer, examples, answer, max_new_tokens)


def _evaluate(model, tokenizer, examples: list[dict], answer, max_new_tokens: int) -> dict:
    was_training = model.training
    model.eval()
    per_task: dict[str, list[float]] = defaultdict(list)
    samples = []
    try:
        for example in examples:
            text = answer(example, answer_budget(tokenizer, example, max_new_tokens))
            result = score(example["task"], text, example["answers"], example.get("meta"))
            per_task[example["task"]].append(result["primary"])
            if len(samples) < 3:
                samples.append({"id": example.get("id"), "prediction": text, "answers": example["answers"]})
    finally:
        model.train(was_training)
    flat = [v for values in per_task.values() for v in values]
    return {"overall": sum(flat) / len(flat) if flat else 0.0,
            "per_task": {task: sum(v) / len(v) for task, v in sorted(per_task.items())},
            "n": len(flat), "samples": samples}
