"""Evaluation during training: every answer comes from the compressed KV via `answer_from_blob`."""

from __future__ import annotations

from collections import defaultdict

import torch

from gistctl.scoring import score
from gistctl.gist.model import GistModel
from gistctl.kv.answer import answer_from_blob
from gistctl.kv.compress import compress_document


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
    was_training = gm.model.training
    gm.model.eval()
    per_task: dict[str, list[float]] = defaultdict(list)
    samples = []
    for example in examples:
        blob, _ = compress_document(gm, example["context"], dtype=dtype)
        gen = answer_from_blob(gm, blob, example["question"],
                               max_new_tokens=answer_budget(gm.tokenizer, example, max_new_tokens))
        result = score(example["task"], gen.text, example["answers"], example.get("meta"))
        per_task[example["task"]].append(result["primary"])
        if len(samples) < 3:
            samples.append({"id": example.get("id"), "prediction": gen.text, "answers": example["answers"]})
    if was_training:
        gm.model.train()
    flat = [v for values in per_task.values() for v in values]
    return {"overall": sum(flat) / len(flat) if flat else 0.0,
            "per_task": {task: sum(v) / len(v) for task, v in sorted(per_task.items())},
            "n": len(flat), "samples": samples}
