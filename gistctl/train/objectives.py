"""The two readers training can teach, and context distillation between them.

- `gist` (gistctl.gist.forward): the question reads only the gists of the document.
- `full`: the question reads the whole document, in the prompt `ask --method full` builds
  (`prompt.with_context_ids`), with no gist tokens and a plain causal mask. The same LoRA trained this way, on the
  same data and steps, is the *trained ceiling*: what compression is measured against (retention = gist / full).

Context distillation: a teacher reads the whole document (the base model with the adapter off, or a trained full
reader) and the student (the gist reader) is pulled towards the teacher's next-token distributions on the
answer tokens, KL(teacher || student), beside the answer cross-entropy. On a continuation example (the answer
is the text that follows the document) this is the teacher's language model over what comes next.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from gistctl import prompt
from gistctl.config import READERS
from gistctl.errors import ConfigError, DataError
from gistctl.gist.collate import trained_answer

GIST, FULL = READERS
BASE_TEACHER = "base"  # the base model with the LoRA switched off


@dataclass
class FullExample:
    """One example as the full reader reads it: [chat(document + question)][answer + end-of-turn]."""

    input_ids: list[int]
    answer: int  # answer tokens at the end (with the end-of-turn token)
    truncated_tokens: int  # document tokens cut from its end to fit


def encode_full(tokenizer, example: dict, max_length: int, *, spell_codes: bool = False,
                cut: int = 0) -> FullExample:
    """`example` in the full reader's prompt. The document is cut at its end to fit `max_length` or, when given,
    without its last `cut` tokens (what a gist student's max_length cut, so teacher and student read one text)."""
    answer_ids = prompt.answer_ids(tokenizer, trained_answer(example), spell_codes=spell_codes)
    question = example["question"]
    context = prompt.context_ids(tokenizer, example["context"])
    overhead = len(prompt.with_context_ids(tokenizer, "", question)) + len(answer_ids)
    keep = max(0, len(context) - cut)
    keep = min(keep, max_length - overhead)
    if keep <= 0:
        raise DataError(f"example {example.get('id', '?')}: question + answer alone take {overhead} tokens, "
                        f"more than max_length {max_length}")
    text = example["context"] if keep == len(context) else tokenizer.decode(context[:keep])
    ids = prompt.with_context_ids(tokenizer, text, question)
    while len(ids) + len(answer_ids) > max_length and keep > 1:  # decode + re-tokenise can add a token or two
        keep -= 8
        text = tokenizer.decode(context[: max(1, keep)])
        ids = prompt.with_context_ids(tokenizer, text, question)
    return FullExample(ids + answer_ids, len(answer_ids), len(context) - keep)


def full_answer_logits(model, examples: list[FullExample]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per example: (logits that predict its answer tokens (A, vocab), those tokens (A,)), one forward each
    (no padding), logits kept for the answer positions only."""
    device = next(model.parameters()).device
    out = []
    for example in examples:
        ids = torch.tensor([example.input_ids], device=device)
        logits = model(input_ids=ids, logits_to_keep=example.answer + 1).logits[0, :-1]
        out.append((logits, ids[0, -example.answer :]))
    return out


def kl_sum(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """sum over positions of KL(teacher || student), both (A, vocab) logits, at temperature 1."""
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                         f"{tuple(student_logits.shape)} cover different answer tokens")
    teacher = torch.log_softmax(teacher_logits.float(), dim=-1)
    student = torch.log_softmax(student_logits.float(), dim=-1)
    return torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="sum")


class Teacher:
    """What a distilling student is pulled towards: `base` (the student's own base weights, its LoRA switched
    off: no second copy in memory) or the directory of a trained full-reader adapter (a second model)."""

    def __init__(self, spec: str, peft_model, loaded, *, model_name: str | None, device: str, dtype: str):
        self.spec = spec
        self.peft_model = peft_model
        self.model = None
        if spec != BASE_TEACHER:
            from gistctl.gist.adapter import read_adapter_meta
            from gistctl.gist.model import load_gist_model
            from gistctl.models import load_model

            if read_adapter_meta(spec).extra.get("reader", GIST) != FULL:
                raise ConfigError(f"train.teacher: '{spec}' is a gist reader; a teacher reads whole documents "
                                  "(train one with --reader full, or use 'base')")
            base = load_model(model_name, device=device, dtype=dtype)
            if base.fingerprint != loaded.fingerprint:
                raise ConfigError(f"train.teacher: '{spec}' must be loaded on the student's base model")
            self.model = load_gist_model(base, spec).model
            self.model.requires_grad_(False)

    @contextmanager
    def _active(self):
        if self.model is not None:
            yield self.model
        else:
            with self.peft_model.disable_adapter():
                yield self.peft_model

    @torch.no_grad()
    def answer_logits(self, examples: list[FullExample]) -> list[torch.Tensor]:
        with self._active() as model:
            was_training = model.training
            model.eval()
            try:
                return [logits for logits, _ in full_answer_logits(model, examples)]
            finally:
                model.train(was_training)
