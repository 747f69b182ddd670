"""`squad`: RULER-style natural QA from a SQuAD v2.0 file: a question's gold paragraph among distractor paragraphs
from *other* articles, at a target length.

The file is read as JSON (`{"data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]}`), never imported from
a package. Articles are split by a hash of their title into `eval` (`EVAL_SHARE` percent: held out for the bench),
`dev` (`DEV_SHARE` percent: a mixture's in-run evaluation) and `train` (the rest), so no two splits share an
article: not a question, not a paragraph, not a distractor. SQuAD v2.0 is
CC BY-SA 4.0. Unanswerable questions (`--unanswerable SHARE`) are asked with their own paragraph among the
distractors and answered with `NOT_IN_DOCUMENT`, so a model can learn to say so instead of inventing a value.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from gistctl.data.builders import example_seed, tokenizer_name
from gistctl.data.lengths import LengthSpec, count_tokens_batch
from gistctl.errors import DataError

SPLITS = ("train", "dev", "eval")
EVAL_SHARE = 20  # percent of articles held out for the bench, by title hash
DEV_SHARE = 10  # percent for a training mixture's in-run evaluation
NOT_IN_DOCUMENT = "not in the document"
SOURCE = {"name": "SQuAD v2.0", "license": "CC-BY-SA-4.0"}


@dataclass
class Paragraph:
    article: str
    text: str
    qas: list[dict]
    tokens: int = 0


def article_split(title: str) -> str:
    """`eval` for EVAL_SHARE percent of titles (a stable hash), `dev` for the next DEV_SHARE, else `train`."""
    bucket = int(hashlib.sha256(title.encode("utf-8")).hexdigest(), 16) % 100
    return "eval" if bucket < EVAL_SHARE else "dev" if bucket < EVAL_SHARE + DEV_SHARE else "train"


def load_squad(path: str | Path) -> list[Paragraph]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"SQuAD file '{path}' does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        paragraphs = [Paragraph(article["title"], p["context"], list(p["qas"]))
                      for article in data["data"] for p in article["paragraphs"]]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(f"'{path}' is not a SQuAD v2.0 JSON file ({type(err).__name__}: {err})") from err
    if not paragraphs:
        raise DataError(f"'{path}' has no paragraphs")
    return paragraphs


def distractors(paragraphs: list[Paragraph], gold: Paragraph, target: int, rng: random.Random) -> list[Paragraph]:
    """Whole paragraphs of other articles than `gold`'s, drawn with `rng`, until they and `gold` reach about
    `target` tokens (a paragraph that would pass 110% of it is skipped once one is chosen)."""
    others = [p for p in paragraphs if p.article != gold.article]
    rng.shuffle(others)
    chosen, total = [], gold.tokens
    for p in others:
        if total >= target:
            break
        if total + p.tokens > target * 1.1 and chosen:
            continue
        chosen.append(p)
        total += p.tokens
    return chosen


def build_squad(tokenizer, *, source: str | Path, n: int, seed: int, tokens: LengthSpec, split: str = "train",
                unanswerable: float = 0.0) -> Iterator[dict]:
    """`n` questions of the split's articles, each in a context of about its target tokens: the gold paragraph at a
    random place among whole paragraphs of the split's other articles."""
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}'; use train, dev or eval")
    if not 0.0 <= unanswerable < 1.0:
        raise DataError(f"--unanswerable must be a share in [0, 1), got {unanswerable}")
    paragraphs = [p for p in load_squad(source) if article_split(p.article) == split]
    articles = sorted({p.article for p in paragraphs})
    if len(articles) < 2:
        raise DataError(f"the {split} split of '{source}' has {len(articles)} article(s); distractors need two or more")
    for p, count in zip(paragraphs, count_tokens_batch(tokenizer, [p.text for p in paragraphs])):
        p.tokens = count
    answerable = [(p, qa) for p in paragraphs for qa in p.qas
                  if not qa.get("is_impossible") and any(a["text"].strip() for a in qa["answers"])]
    impossible = [(p, qa) for p in paragraphs for qa in p.qas if qa.get("is_impossible")]
    order = random.Random(seed)
    order.shuffle(answerable)
    order.shuffle(impossible)
    picks = {"answerable": iter(answerable), "impossible": iter(impossible)}
    for i in range(n):
        rng = random.Random(example_seed(seed, i))
        kind = "impossible" if impossible and rng.random() < unanswerable else "answerable"
        try:
            gold, qa = next(picks[kind])
        except StopIteration:
            raise DataError(f"the {split} split has only {len(answerable)} answerable and {len(impossible)} "
                            f"unanswerable questions; ask for fewer") from None
        target = tokens.target(i, rng)
        chosen = distractors(paragraphs, gold, target, rng)
        at = rng.randint(0, len(chosen))
        parts = [p.text for p in chosen[:at]] + [gold.text] + [p.text for p in chosen[at:]]
        context = "\n\n".join(parts)
        if kind == "answerable":
            answers = list(dict.fromkeys(a["text"].strip() for a in qa["answers"] if a["text"].strip()))
        else:
            answers = [NOT_IN_DOCUMENT]
        measured = count_tokens_batch(tokenizer, [context])[0]
        meta = {"target_tokens": target, "context_tokens": measured, "split": split, "article": gold.article,
                "squad_id": qa["id"], "answerable": kind == "answerable", "gold_paragraph": at,
                "paragraphs": len(parts), "depth": round(at / max(1, len(parts) - 1), 4),
                "distractor_articles": sorted({p.article for p in chosen}), "seed": example_seed(seed, i),
                "source": SOURCE, "tokenizer": tokenizer_name(tokenizer)}
        yield {"id": f"squad-{split}-{seed}-{i:06d}", "task": "qa", "context": context, "question": qa["question"],
               "answers": answers, "meta": meta}


CONTINUE_QUESTION = "Continue the text from where it stops."
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
CONTINUATION_WORDS = 40  # the longest continuation (words); the next sentence, cut at this many words


def build_squad_continuation(tokenizer, *, source: str | Path, n: int, seed: int, tokens: LengthSpec,
                             split: str = "train") -> Iterator[dict]:
    """`n` continuation examples of the split's articles: a document of about its target tokens that stops after
    a sentence of one article's paragraph, answered with that paragraph's next sentence (at most
    `CONTINUATION_WORDS` words). Before the article's paragraphs come whole paragraphs of the split's other
    articles, so the text runs to the target length. Records are `qa` (scored by token F1) with
    `meta.kind: continuation`: what a reader keeps of prose itself, and what context distillation pulls the gists
    towards (the teacher's next-token distributions over the text that follows)."""
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}'; use train, dev or eval")
    paragraphs = [p for p in load_squad(source) if article_split(p.article) == split]
    if len({p.article for p in paragraphs}) < 2:
        raise DataError(f"the {split} split of '{source}' has too few articles for continuation examples")
    for p, count in zip(paragraphs, count_tokens_batch(tokenizer, [p.text for p in paragraphs])):
        p.tokens = count
    # a paragraph with two sentences or more can stop after one of them (not the last)
    cuttable = [p for p in paragraphs if len(SENTENCE_END.split(p.text.strip())) >= 2]
    order = random.Random(seed)
    order.shuffle(cuttable)
    if n > len(cuttable):
        raise DataError(f"the {split} split has {len(cuttable)} paragraphs to continue; ask for fewer")
    for i in range(n):
        rng = random.Random(example_seed(seed, i))
        gold = cuttable[i]
        sentences = SENTENCE_END.split(gold.text.strip())
        stop = rng.randint(1, len(sentences) - 1)
        head = " ".join(sentences[:stop])
        words = sentences[stop].split()
        answer = " ".join(words[:CONTINUATION_WORDS])
        target = tokens.target(i, rng)
        chosen = distractors(paragraphs, gold, target, rng)
        context = "\n\n".join([p.text for p in chosen] + [head])
        measured = count_tokens_batch(tokenizer, [context])[0]
        meta = {"target_tokens": target, "context_tokens": measured, "split": split, "article": gold.article,
                "kind": "continuation", "sentence": stop, "truncated_words": max(0, len(words) - CONTINUATION_WORDS),
                "distractor_articles": sorted({p.article for p in chosen}), "seed": example_seed(seed, i),
                "source": SOURCE, "tokenizer": tokenizer_name(tokenizer)}
        yield {"id": f"squad-continue-{split}-{seed}-{i:06d}", "task": "qa", "context": context,
               "question": CONTINUE_QUESTION, "answers": [answer], "meta": meta}
