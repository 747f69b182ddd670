"""Answer scoring, shared by `gistctl bench` and training's in-run evaluation: one number in [0, 1] per (prediction, gold answers).

Rules, shared by every metric:
- `normalize` is SQuAD's: lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace.
- A list of gold answers is a set of alternatives; a metric takes its best gold. No gold (or only golds that
  normalize to nothing, like "the") scores 0.0, as does an empty prediction.
- The *first answer span* of a prediction is its first non-empty line, with a leading "Answer:" label
  removed. `exact_match` and `token_f1` compare golds with that line and with each prefix of it that ends at a
  sentence end (`.`, `!`, `?` or `;` followed by whitespace or the end of the line), so "Paris. It is the
  capital." matches "Paris" and "Dr. Smith" still matches "Dr. Smith". Text after the first line is ignored.
- `contains` and `list_recall` search the whole prediction for a gold as whole words: "cat" is not in
  "category".
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter

from gistctl.data.needles import AGGREGATE_SCORING
from gistctl.errors import DataError

TASKS = ("passkey", "niah", "facts", "aggregate", "qa")
AGGREGATE_KINDS = tuple(dict.fromkeys(AGGREGATE_SCORING.values()))  # ("list", "count")

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_ANSWER_LABEL = re.compile(r"^\W*(?:final\s+)?answer\W*?:\W*", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.!?;](?=\s|$)")
_ALNUM_RUN = re.compile(r"[A-Za-z0-9]+")
# A number token: digits with optional thousands commas and decimals, not glued to letters ("1st" is no count).
_NUMBER_OR_WORD = re.compile(
    r"(?<![\w.])\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\w])"  # 1,024
    r"|(?<![\w.])\d+(?:\.\d+)?(?![\w])"  # 7, 3.5
    r"|[A-Za-z]+"  # words, for "twenty-one"
)

_UNITS = {
    "zero": 0, "none": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14,
    "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19,
}
_TENS = {
    "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80,
    "ninety": 90,
}
_SCALES = {"hundred": 100, "thousand": 1_000, "million": 1_000_000}


def normalize(text: str) -> str:
    """SQuAD normalization: lowercase, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _golds(answers: list[str] | str) -> list[str]:
    """Normalized, non-empty, de-duplicated gold answers (order kept)."""
    if isinstance(answers, str):
        answers = [answers]
    seen: dict[str, None] = {}
    for answer in answers:
        norm = normalize(str(answer))
        if norm:
            seen.setdefault(norm, None)
    return list(seen)


def first_answer_spans(prediction: str) -> list[str]:
    """Candidate first answer spans, shortest first: the first line cut at each sentence end, then whole."""
    line = next((ln.strip() for ln in prediction.splitlines() if ln.strip()), "")
    line = _ANSWER_LABEL.sub("", line, count=1).strip()
    if not line:
        return []
    spans = [line[: m.start()] for m in _SENTENCE_END.finditer(line)]
    spans.append(line)
    return spans


def _contains_phrase(haystack: str, needle: str) -> bool:
    """Whole-word containment on normalized text (both already normalized)."""
    return f" {needle} " in f" {haystack} "


def exact_match(prediction: str, answers: list[str]) -> float:
    """1.0 if the normalized first answer span equals a normalized gold, else 0.0."""
    golds = set(_golds(answers))
    return float(any(normalize(span) in golds for span in first_answer_spans(prediction)))


def contains(prediction: str, answers: list[str]) -> float:
    """1.0 if a normalized gold occurs as whole words anywhere in the normalized prediction."""
    pred = normalize(prediction)
    return float(bool(pred) and any(_contains_phrase(pred, gold) for gold in _golds(answers)))


def _f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(pred_tokens)
    recall = common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, answers: list[str]) -> float:
    """SQuAD token F1 between the first answer span and the golds; best span x gold pair."""
    golds = [gold.split() for gold in _golds(answers)]
    spans = [normalize(span).split() for span in first_answer_spans(prediction)]
    return max((_f1(span, gold) for span in spans if span for gold in golds), default=0.0)


def list_recall(prediction: str, items: list[str]) -> float:
    """Fraction of distinct gold items found as whole words/phrases in the prediction; order-free."""
    golds = _golds(items)
    if not golds:
        return 0.0
    pred = normalize(prediction)
    return sum(_contains_phrase(pred, gold) for gold in golds) / len(golds)


def _is_key_like(token: str, key: str) -> bool:
    """Whether an alphanumeric run could be the model's stab at a key shaped like `key`."""
    if len(token) < max(2, len(key) - 2):
        return False
    if any(ch.isdigit() for ch in key):
        return any(ch.isdigit() for ch in token)
    # Letter-only keys: only all-caps runs count, so ordinary words ("The", "passkey") are not candidates.
    return token.isupper()


def passkey_match(prediction: str, key: str) -> float:
    """1.0 if the prediction states `key` and no other key-like token; case and punctuation around it ignored.

    The prediction is split into alphanumeric runs ("**7K2P9A**." -> "7K2P9A"), so formatting is ignored but
    a run with an extra or missing character ("7K2P9AB", "K2P9A") is a different token. Score 1.0 iff some
    run equals the key case-insensitively and every *key-like* run does too. Key-like: at least
    max(2, len(key) - 2) characters and, for a key with digits, containing a digit (for a letter-only key,
    written in capitals). So "7K2P9A or 7K2P9B" scores 0 (hedging between keys is not an answer), while
    "7K2P9A (7k2p9a)", "1st" or "page 3" next to the right key do not hurt.
    """
    key = key.strip()
    if not key or not key.isascii() or not key.isalnum():
        raise DataError(
            f"passkey {key!r} must be a non-empty ASCII alphanumeric string; fix the dataset's answers"
        )
    target = key.upper()
    runs = _ALNUM_RUN.findall(prediction)
    if not any(run.upper() == target for run in runs):
        return 0.0
    return float(all(run.upper() == target for run in runs if _is_key_like(run, key)))


def _parse_number_words(words: list[str]) -> int | None:
    """Value of a leading run of English number words ("twenty one", "two hundred and five"), or None."""
    total = current = 0
    seen = False
    for i, word in enumerate(words):
        if word in _UNITS:
            current += _UNITS[word]
        elif word in _TENS:
            current += _TENS[word]
        elif word in _SCALES and seen:
            if _SCALES[word] == 100:
                current *= 100
            else:
                total += current * _SCALES[word]
                current = 0
        elif word == "and" and i > 0 and words[i - 1] in _SCALES and i + 1 < len(words) and (
            words[i + 1] in _UNITS or words[i + 1] in _TENS
        ):
            continue  # "two hundred and five", but "three and four" is two numbers
        else:
            break
        seen = True
    return total + current if seen else None


def first_number(prediction: str) -> float | None:
    """The first number in the text: digits ("1,024", "3.5") or words ("twenty-one", "none" = 0); else None."""
    tokens = _NUMBER_OR_WORD.findall(prediction)
    for i, token in enumerate(tokens):
        if token[0].isdigit():
            return float(token.replace(",", ""))
        value = _parse_number_words([t.lower() for t in tokens[i:]])
        if value is not None:
            return float(value)
    return None


def count_match(prediction: str, number: int | str) -> float:
    """1.0 if the first number in the prediction (digits or words) equals the gold count."""
    gold = first_number(str(number))
    if gold is None:
        raise DataError(f"count answer {number!r} is not a number; fix the dataset's answers")
    found = first_number(prediction)
    return float(found is not None and found == gold)


def score(task: str, prediction: str, answers: list[str], meta: dict | None = None) -> dict[str, float]:
    """Scores for one prediction: em, contains, f1, the task's own metric, and `primary`.

    primary: passkey -> passkey_match; niah, facts -> exact_match; aggregate with meta["kind"] == "list" ->
    list_recall, == "count" -> count_match; qa -> token_f1.
    """
    scores = {
        "em": exact_match(prediction, answers),
        "contains": contains(prediction, answers),
        "f1": token_f1(prediction, answers),
    }
    if task == "passkey":
        scores["passkey"] = max((passkey_match(prediction, key) for key in answers), default=0.0)
        scores["primary"] = scores["passkey"]
    elif task in ("niah", "facts"):
        scores["primary"] = scores["em"]
    elif task == "qa":
        scores["primary"] = scores["f1"]
    elif task == "aggregate":
        kind, answers = _aggregate_kind(answers, meta or {})
        if kind == "list":
            scores["list_recall"] = list_recall(prediction, answers)
            scores["primary"] = scores["list_recall"]
        elif kind == "count":
            scores["count"] = max((count_match(prediction, n) for n in answers), default=0.0)
            scores["primary"] = scores["count"]
        else:
            raise DataError(f"aggregate example needs meta['kind'] in {AGGREGATE_KINDS}, got {kind!r}")
    else:
        raise DataError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    return scores


def question_type(task: str, meta: dict) -> str | None:
    """What a row is grouped under within its task in the bench's per-type breakdown: an aggregate question's
    type (list, count, total), the kind of value a niah/facts question asks for (code, date, name, number,
    place), a passkey's key format; None when the dataset does not say."""
    if task == "aggregate":
        return meta.get("question_type") or meta.get("kind")
    if task in ("niah", "facts"):
        return meta.get("kind")
    if task == "passkey":
        return meta.get("key_format")
    return None


def _aggregate_kind(answers: list[str], meta: dict) -> tuple[str | None, list[str]]:
    """(kind, gold answers) of an aggregate example. The aggregate builder writes `question_type`
    (list / count / total) and a list answer as one "a, b, c" string; list items are scored one by one."""
    kind = meta.get("kind") or AGGREGATE_SCORING.get(meta.get("question_type"))
    if kind == "list":
        answers = [item.strip() for answer in answers for item in answer.split(",") if item.strip()]
    return kind, answers
