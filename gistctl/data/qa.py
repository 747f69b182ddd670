"""`qa`: map local LongBench-style JSONL files into our schema (through the `datasets` JSON loader).

LongBench lines look like `{"input": question, "context": ..., "answers": [..], "dataset": ..., "_id": ...}`;
other field names can be given. Nothing is downloaded: `source` is a local file.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterator

from gistctl.data.builders import tokenizer_name
from gistctl.data.lengths import LengthSpec, count_tokens_batch
from gistctl.errors import DataError


def load_json_rows(path: str | Path) -> list[dict]:
    """Rows of a local JSON/JSONL file via `datasets.load_dataset("json")`, cached under gistctl's cache."""
    import datasets

    from gistctl.models import cache_dir

    path = Path(path)
    if not path.is_file():
        raise DataError(f"QA file '{path}' does not exist")
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        table = datasets.load_dataset("json", data_files=str(path), split="train",
                                      cache_dir=str(cache_dir() / "hf-datasets"))
    except Exception as err:  # the loader raises several types (ArrowInvalid, DatasetGenerationError, ...)
        raise DataError(f"could not read '{path}' as JSON lines: {err}".splitlines()[0]) from err
    return table.to_list()


def build_qa(tokenizer, *, n: int | None, seed: int, tokens: LengthSpec | None, source: str | Path,
             context_field: str = "context", question_field: str = "input", answers_field: str = "answers",
             id_field: str = "_id") -> Iterator[dict]:
    """Up to `n` rows (shuffled by `seed`; all rows when n is None) whose context fits the longest target."""
    rows = load_json_rows(source)
    if not rows:
        raise DataError(f"QA file '{source}' has no rows")
    missing = [f for f in (context_field, question_field, answers_field) if f not in rows[0]]
    if missing:
        raise DataError(f"QA file '{source}' has no field(s) {', '.join(missing)} (fields: {', '.join(rows[0])}); "
                        "pass --context-field/--question-field/--answers-field")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    limit = max(hi for _, hi in tokens.items) if tokens else None
    contexts = [str(rows[j][context_field] or "") for j in order]
    lengths = count_tokens_batch(tokenizer, contexts)
    produced = 0
    for j, context, length in zip(order, contexts, lengths):
        if n is not None and produced >= n:
            break
        row = rows[j]
        answers = row[answers_field]
        answers = [answers] if isinstance(answers, str) else [str(a) for a in (answers or [])]
        answers = [a for a in answers if a.strip()]
        question = str(row[question_field] or "")
        if not context.strip() or not question.strip() or not answers or (limit and length > limit):
            continue
        row_id = row.get(id_field)
        extra = {k: v for k, v in row.items() if k not in (context_field, question_field, answers_field, id_field)
                 and isinstance(v, (str, int, float, bool)) and not (isinstance(v, str) and len(v) > 200)}
        meta = {"target_tokens": limit, "context_tokens": length, "row": j, "seed": seed,
                "source": {"name": Path(source).name, "license": "as the source file's"}, "fields": extra,
                "tokenizer": tokenizer_name(tokenizer)}
        yield {"id": f"qa-{row_id}" if row_id not in (None, "") else f"qa-{Path(source).stem}-{j:06d}",
               "task": "qa", "context": context, "question": question, "answers": answers, "meta": meta}
        produced += 1
