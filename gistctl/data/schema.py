"""The one JSONL schema every dataset uses, a validating reader and an atomic writer.

A record is one line: `{"id", "task", "context", "question", "answers": [..], "meta": {..}}`.
`meta` holds at least `target_tokens` and `context_tokens` (measured with the model's tokenizer),
`seed` (the example's own seed) and `source`; builders with needles add `depth` (0..1). `meta.completion`,
when present, is what training teaches the model to say instead of `answers[0]` (aggregate `--counts itemized`);
`answers` are still what is scored.
A prediction is correct when it contains one of `answers` exactly (they are short, checkable spans).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from gistctl.errors import DataError
from gistctl.runs import atomic_write_text

TASKS = ("passkey", "niah", "facts", "aggregate", "qa")
COPIED_TASKS = ("passkey", "niah", "facts", "qa")  # answers are spans of the context (aggregate: computed)
FIELDS = ("id", "task", "context", "question", "answers", "meta")


def validate_record(record: Any) -> None:
    """Raise DataError (without location) when `record` does not follow the schema."""
    if not isinstance(record, dict):
        raise DataError(f"a record must be a JSON object, got {type(record).__name__}")
    keys = set(record)
    if keys != set(FIELDS):
        missing, extra = sorted(set(FIELDS) - keys), sorted(keys - set(FIELDS))
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unexpected {', '.join(extra)}"] if extra else [])
        raise DataError(f"fields must be exactly {', '.join(FIELDS)} ({'; '.join(parts)})")
    if not isinstance(record["id"], str) or not record["id"]:
        raise DataError("'id' must be a non-empty string")
    if record["task"] not in TASKS:
        raise DataError(f"unknown task {record['task']!r}; use one of {', '.join(TASKS)}")
    for field in ("context", "question"):
        if not isinstance(record[field], str) or not record[field].strip():
            raise DataError(f"'{field}' must be a non-empty string")
    answers = record["answers"]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise DataError("'answers' must be a non-empty list of non-empty strings")
    if not isinstance(record["meta"], dict):
        raise DataError("'meta' must be an object")


def read_jsonl(path: str | Path) -> list[dict]:
    """All records of a JSONL file, validated; errors name the file and the 1-based line number."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset '{path}' does not exist")
    records, seen = [], {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
            try:
                validate_record(record)
            except DataError as err:
                raise DataError(f"{path}:{lineno}: {err}") from err
            if record["id"] in seen:
                raise DataError(f"{path}:{lineno}: duplicate id {record['id']!r} (first on line {seen[record['id']]})")
            seen[record["id"]] = lineno
            records.append(record)
    if not records:
        raise DataError(f"dataset '{path}' has no records")
    return records


def dumps_record(record: dict) -> str:
    """One record as one JSON line (keys in schema order, UTF-8 kept, no trailing newline)."""
    return json.dumps({k: record[k] for k in FIELDS}, ensure_ascii=False)


def write_jsonl(path: str | Path, records: Iterable[dict]) -> int:
    """Validate and write records atomically, one per line; returns how many were written."""
    lines, seen = [], set()
    for index, record in enumerate(records):
        try:
            validate_record(record)
        except DataError as err:
            raise DataError(f"record {index} ({record.get('id') if isinstance(record, dict) else '?'}): {err}") from err
        if record["id"] in seen:
            raise DataError(f"record {index}: duplicate id {record['id']!r}")
        seen.add(record["id"])
        lines.append(dumps_record(record))
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)
