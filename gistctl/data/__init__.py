"""Deterministic dataset builders (passkey, niah, facts, aggregate, qa, mix) and the one JSONL schema."""

from gistctl.data.schema import TASKS, read_jsonl, validate_record, write_jsonl

__all__ = ["TASKS", "read_jsonl", "validate_record", "write_jsonl"]
