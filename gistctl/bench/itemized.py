"""How itemized counts went: did the model recall the items, and did it count what it said?

    gistctl analyze itemized runs/bench-p8-agg50

An adapter trained with `data aggregate --counts itemized` answers a count or total question with every item's
value in the order of the text, then the number ("red, blue, red; red: 2"). For each such answer of a bench run
this splits a wrong count into its two possible causes: the items said are not the document's (recall, from the
blob), or the number does not count the items it said (counting, from its own words). Answers that are not
itemized (other adapters, RAG, full context) are counted as such and left out of the rest.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, fields
from pathlib import Path

from gistctl.bench.analysis import check_run_dir, rows_with_examples
from gistctl.scoring import first_number
from gistctl.data.needles import AGGREGATE_SCORING

_ITEMIZED = re.compile(r"^\s*(?P<items>[^;]*);[^:]+:\s*(?P<number>\S+)")  # "a, b, c; label: n"


@dataclass
class ItemizedCheck:
    itemized: bool  # the answer has the shape "a, b, c; label: n"
    items_right: bool = False  # the items said are the document's values, in order
    length_right: bool = False  # as many items said as the document has (for `count`: of the asked value)
    self_consistent: bool = False  # the number counts the items it said (of the asked value, or all)
    number_right: bool = False  # the number is the right count


def check_itemized(prediction: str, meta: dict) -> ItemizedCheck:
    """Check one answer to a count/total question against the items planted (`meta.items`: [[id, value], ...])."""
    match = _ITEMIZED.match(prediction)
    if not match:
        return ItemizedCheck(itemized=False)
    said = [item.strip() for item in match["items"].split(",") if item.strip()]
    values = [value for _, value in meta["items"]]
    asked = meta.get("asked_value")
    number = first_number(match["number"])
    if meta["question_type"] == "count":
        said_count, true_count = said.count(asked), values.count(asked)
    else:
        said_count, true_count = len(said), len(values)
    return ItemizedCheck(itemized=True, items_right=said == values, length_right=len(said) == len(values),
                         self_consistent=number == said_count, number_right=number == true_count)


def check_run(run_dir: str | Path) -> dict[str, dict[str, dict[str, int]]]:
    """Per bench column and question type (count, total): how many answers, itemized, and each check passed."""
    table: dict[str, dict[str, dict[str, int]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(int)))
    for row, example in rows_with_examples(run_dir):
        meta = example["meta"]
        if row["task"] != "aggregate" or AGGREGATE_SCORING.get(meta.get("question_type")) != "count":
            continue
        check = check_itemized(row["prediction"] or "", meta)
        counts = table[row["method"]][meta["question_type"]]
        counts["n"] += 1
        for name, passed in vars(check).items():
            counts[name] += passed
    return {method: {qt: dict(c) for qt, c in by_type.items()} for method, by_type in table.items()}


def report_lines(run_dir: str | Path) -> list[str]:
    """`gistctl analyze itemized RUN`: a header, then one tab-separated line per column and question type."""
    names = [f.name for f in fields(ItemizedCheck)]
    lines = ["method\tquestion\tn\t" + "\t".join(names)]
    for method, by_type in check_run(check_run_dir(run_dir)).items():
        for question_type, counts in sorted(by_type.items()):
            lines.append(f"{method}\t{question_type}\t{counts['n']}\t" + "\t".join(str(counts.get(name, 0)) for name in names))
    return lines
