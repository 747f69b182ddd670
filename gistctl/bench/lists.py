"""Which items of an aggregate list a bench run recalled, by how often the document mentions each:

    gistctl analyze lists runs/bench-p9-agg50

A list question ("Which birds did the observer count?") is scored by recall of its distinct values. This splits
that recall by how many times the document mentions each value (once, twice, three times or more), so a run shows
whether what it misses are the values mentioned once. It also counts the answers that say one value more than
once ("plover, plover"), which the question asks the model not to do, and the values of the question's family
("birds") an answer names that the document does not have: recall alone does not count those, so an answer that
names more values can gain recall with them.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

from gistctl.bench.analysis import check_run_dir, rows_with_examples
from gistctl.scoring import list_recall, normalize
from gistctl.data.needles import AGGREGATE_FAMILIES

MENTIONS = ("1", "2", "3+")  # how many times the document mentions a value


def _mentions_bucket(times: int) -> str:
    return MENTIONS[min(times, len(MENTIONS)) - 1]


def recall_by_mentions(prediction: str, meta: dict) -> dict[str, tuple[int, int]]:
    """Per mentions bucket: (values recalled, values) for one list answer; `meta.items` is [[id, value], ...]."""
    counts = Counter(value for _, value in meta["items"])
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for value, times in counts.items():
        bucket = out[_mentions_bucket(times)]
        bucket[0] += list_recall(prediction, [value]) == 1.0
        bucket[1] += 1
    return {name: (hit, n) for name, (hit, n) in out.items()}


def repeats_an_item(prediction: str) -> bool:
    """Whether a comma-separated answer says one item more than once."""
    said = [normalize(part) for part in prediction.split(",")]
    said = [item for item in said if item]
    return len(said) != len(set(said))


def named_values(prediction: str, meta: dict) -> tuple[int, int]:
    """(values of the question's family the answer names, of them not in the document) for one list answer."""
    named = {value for value in AGGREGATE_FAMILIES[meta["family"]]["values"] if list_recall(prediction, [value]) == 1.0}
    return len(named), len(named - {value for _, value in meta["items"]})


def check_run(run_dir: str | Path) -> dict[str, dict[str, int]]:
    """Per bench column: list answers, answers repeating an item, family values named and of them wrong, and per
    mentions bucket values recalled / values."""
    table: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for row, example in rows_with_examples(run_dir):
        meta = example["meta"]
        if row["task"] != "aggregate" or meta.get("question_type") != "list":
            continue
        prediction = row["prediction"] or ""
        counts = table[row["method"]]
        counts["answers"] += 1
        counts["repeats"] += repeats_an_item(prediction)
        named, wrong = named_values(prediction, meta)
        counts["named"] += named
        counts["named_wrong"] += wrong
        for name, (hit, n) in recall_by_mentions(prediction, meta).items():
            counts[f"recalled_{name}"] += hit
            counts[f"values_{name}"] += n
    return {method: dict(counts) for method, counts in table.items()}


def report_lines(run_dir: str | Path) -> list[str]:
    """`gistctl analyze lists RUN`: a header, then one tab-separated line per bench column."""
    lines = ["method\tlist answers\trepeating an item\tvalues named\tnot in the document\t"
             + "\t".join(f"recalled, mentioned {m}" for m in MENTIONS)]
    for method, counts in check_run(check_run_dir(run_dir)).items():
        cells = [f"{counts.get(f'recalled_{m}', 0)}/{counts.get(f'values_{m}', 0)}" for m in MENTIONS]
        lines.append(f"{method}\t{counts['answers']}\t{counts['repeats']}\t{counts['named']}\t{counts['named_wrong']}\t"
                     + "\t".join(cells))
    return lines
