"""Synthetic builders: passkey, niah, facts, aggregate. Each yields schema records, one per example.

Every builder takes the tokenizer that measures lengths, `n`, `seed` and a `LengthSpec`. Example i is
built from its own `random.Random(example_seed(seed, i))` only, so a file is byte-identical for one seed
and any example can be rebuilt alone. Filler is tokenized once per sentence; each context is measured
once when assembled (again only if it missed the target by more than 2%).
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Iterator

from gistctl.data.haystack import CLASSIC_FILLER, FillerPool, Haystack, compose, load_haystack
from gistctl.data.lengths import LengthSpec, count_tokens, count_tokens_batch, parse_range
from gistctl.data.needles import (AGGREGATE_FAMILIES, AGGREGATE_QUESTIONS, KINDS, TEMPLATES, draw_passkey,
                                  draw_subjects, draw_value)
from gistctl.errors import ConfigError, DataError

SEED_STRIDE = 1_000_000  # examples per seed; example seeds of different build seeds never collide
TOLERANCE = 0.02  # re-assemble when the measured context misses the target by more than this
MAX_TRIES = 20  # value redraws when a needle value happens to occur in the filler
COUNT_FORMATS = ("number", "itemized")  # how aggregate count/total answers are trained (build_aggregate `counts`)


def example_seed(seed: int, index: int) -> int:
    if not 0 <= index < SEED_STRIDE:
        raise ConfigError(f"at most {SEED_STRIDE} examples per seed")
    return seed * SEED_STRIDE + index


def parse_depths(spec: str | float | None) -> list[float] | None:
    """`"0,0.5,1"` -> [0.0, 0.5, 1.0] (cycled over examples); None -> a random depth per example."""
    if spec is None or spec == "":
        return None
    try:
        depths = [float(part) for part in str(spec).split(",")]
    except ValueError as err:
        raise ConfigError(f"bad depth '{spec}'; use fractions 0..1, e.g. 0.5 or 0,0.25,0.5,0.75,1") from err
    if not all(0.0 <= d <= 1.0 for d in depths):
        raise ConfigError(f"depth '{spec}' must lie within 0..1 (a fraction of the context)")
    return depths


def fit_context(tokenizer, pool: FillerPool, rng: random.Random, target: int,
                needles: list[tuple[float, str]]) -> tuple[str, int, list[int]]:
    """Context of about `target` tokens: filler from a random place in `pool` with `needles` inserted.

    Returns (context, measured tokens, needle character offsets).
    """
    needle_tokens = sum(count_tokens_batch(tokenizer, [" " + s for _, s in needles]))
    if needle_tokens > 0.8 * target:
        raise DataError(f"the needles alone take {needle_tokens} tokens, too many for a {target}-token context; "
                        "raise --tokens or plant fewer")
    budget = target - needle_tokens
    if pool.total_tokens < budget:
        raise DataError(f"the haystack '{pool.name}' has {pool.total_tokens} tokens, fewer than the {budget} a "
                        f"{target}-token context needs; add text to the haystack or lower --tokens")
    first_budget = budget
    for _ in range(3):  # a start whose first or last sentence is very long can miss; try elsewhere
        start, budget = pool.start_for(rng, min(int(first_budget * 1.1), pool.total_tokens)), first_budget
        for _ in range(4):
            context, offsets = compose(pool, pool.take(start, budget, int(0.01 * target)), needles)
            measured = count_tokens(tokenizer, context)
            if abs(target - measured) <= TOLERANCE * target:
                break
            budget += target - measured
        if abs(target - measured) <= 0.05 * target:
            break
    else:
        raise DataError(f"could not fit the haystack '{pool.name}' to {target} tokens (got {measured}); "
                        "add text to the haystack or raise --tokens")
    return context, measured, offsets


def _record(task: str, seed: int, index: int, context: str, question: str, answers: list[str], meta: dict) -> dict:
    return {"id": f"{task}-{seed}-{index:06d}", "task": task, "context": context, "question": question,
            "answers": answers, "meta": meta}


def _occurs_once(context: str, texts: list[str]) -> bool:
    return all(context.count(t) == 1 for t in texts)


def tokenizer_name(tokenizer) -> str:
    """The tokenizer's name without this machine's directories, so files stay identical across machines."""
    name = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
    return Path(name).name if Path(name).is_absolute() else name


def build_passkey(tokenizer, *, n: int, seed: int, tokens: LengthSpec, key_format: str = "digits5",
                  depth: str | float | None = None, protocol: str = "classic",
                  haystack: Haystack | None = None) -> Iterator[dict]:
    """The passkey test.

    classic: the five repeated filler sentences, "The pass key is K. Remember it.", "What is the pass key?".
    seed:    the study's protocol: a 6-character [A-Z0-9] key inside prose filler paragraphs, 2k-8k-token
             contexts (when `tokens` is not given explicitly), "What is the passkey?".
    """
    if protocol not in ("classic", "seed"):
        raise ConfigError(f"unknown passkey protocol '{protocol}'; use classic or seed")
    if key_format not in ("digits5", "alnum6"):
        raise ConfigError(f"unknown key format '{key_format}'; use digits5 or alnum6")
    depths = parse_depths(depth)
    if protocol == "seed":
        key_format = "alnum6"
        haystack = haystack or load_haystack(None)
        pool = FillerPool.from_haystack(tokenizer, haystack)
        source = haystack.source
    else:
        longest = max(hi for _, hi in tokens.items)
        pool = FillerPool.repeated(tokenizer, CLASSIC_FILLER, int(longest * 1.2))
        source = {"name": "classic-passkey-filler", "license": "Apache-2.0"}
    for i in range(n):
        rng = random.Random(example_seed(seed, i))
        target = tokens.target(i, rng)
        at = depths[i % len(depths)] if depths else rng.random()
        for _ in range(MAX_TRIES):
            key = draw_passkey(rng, key_format)
            needle = f"The passkey is {key}." if protocol == "seed" else f"The pass key is {key}. Remember it."
            context, measured, (offset,) = fit_context(tokenizer, pool, rng, target, [(at, needle)])
            if _occurs_once(context, [key]):
                break
        else:
            raise DataError(f"could not draw a passkey absent from the filler in {MAX_TRIES} tries")
        question = "What is the passkey?" if protocol == "seed" else "What is the pass key?"
        meta = {"target_tokens": target, "context_tokens": measured, "depth": round(at, 4), "needle": needle,
                "needle_offset": offset, "key_format": key_format, "protocol": protocol,
                "seed": example_seed(seed, i), "source": source, "tokenizer": tokenizer_name(tokenizer)}
        yield _record("passkey", seed, i, context, question, [key], meta)


def build_niah(tokenizer, *, n: int, seed: int, tokens: LengthSpec, haystack: Haystack | None = None,
               depth: str | float | None = None, kinds: tuple[str, ...] = KINDS) -> Iterator[dict]:
    """One needle sentence (a code, number, name, place or date about a named subject) at a sentence
    boundary at depth 0..1 of a haystack (the user's folder of .txt files, or the built-in prose)."""
    unknown = set(kinds) - set(KINDS)
    if unknown or not kinds:
        raise ConfigError(f"unknown needle kind(s) {', '.join(sorted(unknown)) or '(none)'}; use {', '.join(KINDS)}")
    haystack = haystack or load_haystack(None)
    pool = FillerPool.from_haystack(tokenizer, haystack)
    depths = parse_depths(depth)
    for i in range(n):
        rng = random.Random(example_seed(seed, i))
        target = tokens.target(i, rng)
        at = depths[i % len(depths)] if depths else rng.random()
        kind = kinds[i % len(kinds)] if len(kinds) > 1 else kinds[0]
        for _ in range(MAX_TRIES):
            (subject,) = draw_subjects(rng, 1)
            value = draw_value(rng, kind)
            statement, question = (t.format(s=subject, v=value) for t in TEMPLATES[kind])
            context, measured, (offset,) = fit_context(tokenizer, pool, rng, target, [(at, statement)])
            if _occurs_once(context, [value, statement]):
                break
        else:
            raise DataError(f"could not draw a needle absent from the haystack in {MAX_TRIES} tries")
        meta = {"target_tokens": target, "context_tokens": measured, "depth": round(at, 4), "needle": statement,
                "needle_offset": offset, "kind": kind, "seed": example_seed(seed, i), "source": haystack.source,
                "tokenizer": tokenizer_name(tokenizer)}
        yield _record("niah", seed, i, context, question, [value], meta)


def build_facts(tokenizer, *, n: int, seed: int, tokens: LengthSpec, haystack: Haystack | None = None,
                facts: str | int = "2..10") -> Iterator[dict]:
    """Several facts (distinct subjects, distinct values, mixed kinds) spread through the text at random
    depths; the question asks for one of them (multi-needle retrieval)."""
    lo, hi = parse_range(facts, "--facts", 2, 30)
    haystack = haystack or load_haystack(None)
    pool = FillerPool.from_haystack(tokenizer, haystack)
    for i in range(n):
        rng = random.Random(example_seed(seed, i))
        target = tokens.target(i, rng)
        k = rng.randint(lo, hi)
        for _ in range(MAX_TRIES):
            subjects = draw_subjects(rng, k)
            kinds = [rng.choice(KINDS) for _ in range(k)]
            values = [draw_value(rng, kind) for kind in kinds]
            if len(set(values)) < k or any(a in b for a in values for b in values if a != b):
                continue  # every value must be unambiguous on its own
            statements = [TEMPLATES[kind][0].format(s=s, v=v) for kind, s, v in zip(kinds, subjects, values)]
            depths = sorted(rng.random() for _ in range(k))
            context, measured, offsets = fit_context(tokenizer, pool, rng, target, list(zip(depths, statements)))
            if _occurs_once(context, values + statements):
                break
        else:
            raise DataError(f"could not draw {k} facts absent from the haystack in {MAX_TRIES} tries")
        asked = rng.randrange(k)
        question = TEMPLATES[kinds[asked]][1].format(s=subjects[asked], v=values[asked])
        meta = {"target_tokens": target, "context_tokens": measured, "depth": round(depths[asked], 4),
                "needle": statements[asked], "needle_offset": offsets[asked], "kind": kinds[asked],
                "facts": [{"subject": sub, "statement": s, "value": v, "depth": round(d, 4), "offset": o}
                          for sub, s, v, d, o in zip(subjects, statements, values, depths, offsets)],
                "asked": asked, "seed": example_seed(seed, i), "source": haystack.source,
                "tokenizer": tokenizer_name(tokenizer)}
        yield _record("facts", seed, i, context, question, [values[asked]], meta)


def aggregate_answer(family: str, question_type: str, items: list[tuple[str, str]], asked_value: str | None) -> str:
    """The exact answer from the planted (id, value) items: `list` -> sorted distinct values joined by ", ";
    `count` -> how many items have `asked_value`; `total` -> how many items."""
    values = [v for _, v in items]
    if question_type == "list":
        return ", ".join(sorted(set(values)))
    if question_type == "count":
        return str(Counter(values)[asked_value])
    if question_type == "total":
        return str(len(items))
    raise ValueError(f"unknown aggregate question type {question_type!r}")


def itemized_completion(question_type: str, items: list[tuple[str, str]], asked_value: str | None,
                        answer: str) -> str | None:
    """The answer a model is trained to give with `counts="itemized"`: every item's value in the order of the
    text, then the count `answer` (`count`: "blue, grey, grey, red; grey: 2"; `total`: "blue, grey, grey, red;
    all: 4"). The number is the first one in it, so it scores as the plain count does. None for `list`."""
    if question_type == "list":
        return None
    label = asked_value if question_type == "count" else "all"
    return f"{', '.join(v for _, v in items)}; {label}: {answer}"


def build_aggregate(tokenizer, *, n: int, seed: int, tokens: LengthSpec, haystack: Haystack | None = None,
                    items: str | int = "4..12", questions: tuple[str, ...] = AGGREGATE_QUESTIONS,
                    counts: str = "number", values: str | int | None = None) -> Iterator[dict]:
    """Items planted throughout the text (door colours, ship cargoes, bird sightings); the question is about
    all of them (list the distinct values, count one value, count all), so no single chunk answers it.
    `questions`: the question types asked, cycled (each family in turn gets each type). `counts`: "number"
    trains count and total questions on the bare number; "itemized" adds `meta.completion` (see
    `itemized_completion`), what training then teaches the model to say. The answers scored are the same.
    `values`: how many distinct values a context has (a number or a range, capped at its item count and its
    family's values), each planted at least once, so most are mentioned once when it is near `items`; None (the
    default) draws a palette of 2..5 values and each item's value from it, as every recipe so far was built."""
    if counts not in COUNT_FORMATS:
        raise ConfigError(f"unknown count format {counts!r}; use {', '.join(COUNT_FORMATS)}")
    lo, hi = parse_range(items, "--items", 2, 40)
    distinct = None if values is None else parse_range(values, "--values", 1, 40)
    unknown = set(questions) - set(AGGREGATE_QUESTIONS)
    if unknown or not questions:
        raise ConfigError(f"unknown aggregate question type(s) {', '.join(sorted(unknown)) or '(none)'}; "
                          f"use {', '.join(AGGREGATE_QUESTIONS)}")
    haystack = haystack or load_haystack(None)
    pool = FillerPool.from_haystack(tokenizer, haystack)
    families = sorted(AGGREGATE_FAMILIES)
    for i in range(n):
        rng = random.Random(example_seed(seed, i))
        target = tokens.target(i, rng)
        family = families[i % len(families)]
        spec = AGGREGATE_FAMILIES[family]
        question_type = questions[(i // len(families)) % len(questions)]
        k = rng.randint(lo, hi)
        ids = spec["ids"](rng, k)
        if distinct is None:
            palette = rng.sample(spec["values"], rng.randint(2, min(5, k)))
            planted = [(item_id, rng.choice(palette)) for item_id in ids]
        else:
            cap = min(k, len(spec["values"]))
            palette = rng.sample(spec["values"], rng.randint(min(distinct[0], cap), min(distinct[1], cap)))
            drawn = palette + [rng.choice(palette) for _ in range(k - len(palette))]
            rng.shuffle(drawn)
            planted = list(zip(ids, drawn))
        statements = [spec["statement"].format(id=item_id, v=v) for item_id, v in planted]
        depths = sorted(rng.random() for _ in range(k))
        context, measured, offsets = fit_context(tokenizer, pool, rng, target, list(zip(depths, statements)))
        if not _occurs_once(context, statements):
            raise DataError(f"a planted '{family}' sentence also occurs in the haystack '{pool.name}'")
        asked_value = rng.choice(sorted({v for _, v in planted})) if question_type == "count" else None
        question = spec[question_type].format(v=asked_value)
        answer = aggregate_answer(family, question_type, planted, asked_value)
        meta = {"target_tokens": target, "context_tokens": measured, "family": family, "question_type": question_type,
                "asked_value": asked_value, "items": [[item_id, v] for item_id, v in planted],
                "offsets": offsets, "seed": example_seed(seed, i), "source": haystack.source,
                "tokenizer": tokenizer_name(tokenizer)}
        completion = itemized_completion(question_type, planted, asked_value, answer) if counts == "itemized" else None
        if completion is not None:
            meta["completion"] = completion
        yield _record("aggregate", seed, i, context, question, [answer], meta)
