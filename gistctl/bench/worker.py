"""One bench column in its own process: `python -m gistctl.bench.worker JOB.json`.

Loads the column's method once, then for each example id: prepare (timed), answer the question, score,
and append one row to predictions.jsonl (flushed and fsynced, so a crash loses at most the row in flight).
Its own process, so on CPU `peak_memory_bytes` (ru_maxrss) is this column's alone; on CUDA the peak
counter is reset before prepare and again before answer.
Events go to stdout as `@@gistctl-bench {json}` lines; a user error is one `error` event and exit code 2.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import torch

from gistctl.scoring import question_type, score
from gistctl.bench.runner import EVENT_PREFIX, MethodSpec
from gistctl.data.schema import read_jsonl
from gistctl.errors import GistctlError
from gistctl.kv.sizes import kv_cache_bytes
from gistctl.models import peak_memory_bytes
from gistctl.runs import utc_now

REFERENCE_KV_BYTES_PER_VALUE = 2  # the full-KV reference of the compression ratio is fp16 (the blobs' default)


def emit(event: dict) -> None:
    print(EVENT_PREFIX + json.dumps(event, ensure_ascii=False), flush=True)


def open_method(spec: MethodSpec, job: dict):
    """(method, loaded model) for the column; blobs go to the job's blob_dir, RAG tables to rag_index_dir."""
    from gistctl.engine import open_gist_model, open_text_method
    from gistctl.methods.gist import Gist

    settings = job["settings"]
    if spec.kind == "gist":
        gm = open_gist_model(settings["model"], spec.adapter, num_gist=spec.num_gist,
                             chunk_tokens=spec.chunk_tokens, device=settings["device"], positions=spec.positions,
                             chunking=spec.chunking)
        Path(job["blob_dir"]).mkdir(parents=True, exist_ok=True)
        return (Gist(gm, blob_dir=job["blob_dir"], dtype=spec.dtype, max_new_tokens=settings["max_new_tokens"]),
                gm.loaded)
    method = open_text_method(spec.kind, model=settings["model"], device=settings["device"],
                              rag={"index_dir": job["rag_index_dir"]} if spec.kind == "rag" else None,
                              max_new_tokens=settings["max_new_tokens"], adapter=spec.adapter)
    return method, method.loaded


def document_tokens(state, loaded, document: str) -> int:
    """The document's length in the model's tokens, from the state when it records it (the blob's meta)."""
    if hasattr(state, "blob"):
        return int(state.blob.meta.document_tokens)
    if hasattr(state, "document_tokens"):
        return int(state.document_tokens)
    if hasattr(state, "document_ids"):
        return len(state.document_ids)
    from gistctl import prompt

    return len(prompt.context_ids(loaded.tokenizer, document))


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _file_name(example_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", example_id)


def run_example(method, loaded, spec: MethodSpec, record: dict, job: dict) -> dict:
    """One prediction row; a user error in prepare or answer (document too long for full context, ...) is
    recorded in `error` with `primary` 0.0 instead of stopping the bench."""
    row = {"method": spec.column, "kind": spec.kind, "adapter": spec.adapter, "num_gist": spec.num_gist,
           "chunk_tokens": spec.chunk_tokens, "positions": spec.positions, "chunking": spec.chunking,
           "dtype": spec.dtype if spec.kind == "gist" else None,
           "adapter_fingerprint": spec.adapter_fingerprint, "id": record["id"], "task": record["task"],
           "question": record["question"], "answers": record["answers"],
           "question_type": question_type(record["task"], record["meta"]),
           "context_tokens": record["meta"].get("context_tokens"), "document_tokens": None,
           "prediction": None, "scores": None, "primary": 0.0, "error": None, "error_stage": None,
           "prepare_s": None, "ttft_ms": None, "decode_tokens_per_s": None, "prompt_tokens": None,
           "peak_memory_bytes": None, "prepare_peak_memory_bytes": None, "state_bytes": None,
           "full_kv_bytes": None, "compression_ratio": None, "blob": None, "blob_positions": None, "warnings": None,
           "device": str(loaded.device), "created_at": utc_now()}
    device = loaded.device
    _reset_peak(device)
    start = time.perf_counter()
    try:
        state = method.prepare(record["context"])
    except (GistctlError, torch.cuda.OutOfMemoryError) as err:
        row.update(error=str(err).splitlines()[0] if str(err) else type(err).__name__, error_stage="prepare")
        return row
    row["prepare_s"] = time.perf_counter() - start
    row["prepare_peak_memory_bytes"] = peak_memory_bytes(device)
    if spec.kind == "gist":  # one blob per example, named by its id, so the run dir maps rows to files
        target = Path(job["blob_dir"]) / f"{_file_name(record['id'])}.kv"
        os.replace(state.path, target)
        state.path = target
        row["blob"] = os.path.relpath(target, job["run_dir"])
        row["blob_positions"] = state.blob.meta.positions  # the concrete layout (auto chooses per document)
    tokens = document_tokens(state, loaded, record["context"])
    row["document_tokens"] = tokens
    if row["context_tokens"] is None:
        row["context_tokens"] = tokens
    row["state_bytes"] = int(method.state_bytes(state))
    if spec.kind == "gist":  # like for like: the full KV at the blob's own dtype
        row["full_kv_bytes"] = state.blob.meta.full_kv_bytes
    else:
        row["full_kv_bytes"] = kv_cache_bytes(loaded.model.config, tokens, REFERENCE_KV_BYTES_PER_VALUE)
    row["compression_ratio"] = row["full_kv_bytes"] / row["state_bytes"] if row["state_bytes"] else None
    _reset_peak(device)
    try:
        answer = method.answer(state, record["question"])
    except (GistctlError, torch.cuda.OutOfMemoryError) as err:
        row.update(error=str(err).splitlines()[0] if str(err) else type(err).__name__, error_stage="answer")
        return row
    finally:
        row["warnings"] = getattr(method, "warnings", None)
        method.warnings = None
    scores = score(record["task"], answer.text, record["answers"], record["meta"])
    row.update(prediction=answer.text, scores=scores, primary=scores["primary"], ttft_ms=answer.ttft_ms,
               decode_tokens_per_s=answer.decode_tokens_per_s, prompt_tokens=answer.prompt_tokens,
               peak_memory_bytes=answer.peak_memory_bytes)
    return row


def _base_row(spec: MethodSpec, record: dict, device) -> dict:
    return {"method": spec.column, "kind": spec.kind, "adapter": spec.adapter, "num_gist": None, "chunk_tokens": None,
            "positions": None, "chunking": None, "dtype": spec.dtype, "press": spec.press, "ratio": spec.ratio,
            "budget": spec.budget, "adapter_fingerprint": spec.adapter_fingerprint, "id": record["id"],
            "task": record["task"], "question": record["question"], "answers": record["answers"],
            "question_type": question_type(record["task"], record["meta"]),
            "context_tokens": record["meta"].get("context_tokens"), "document_tokens": None, "prediction": None,
            "scores": None, "primary": 0.0, "error": None, "error_stage": None, "prepare_s": None, "prefill_s": None,
            "score_s": None, "ttft_ms": None, "decode_tokens_per_s": None, "prompt_tokens": None,
            "peak_memory_bytes": None, "prepare_peak_memory_bytes": None, "state_bytes": None, "full_kv_bytes": None,
            "compression_ratio": None, "kept_fraction": None, "blob": None, "blob_positions": None, "warnings": None,
            "device": str(device), "created_at": utc_now()}


def run_press_example(gm, specs: list[MethodSpec], record: dict, job: dict):
    """Rows for every press column of one reader: the document prefilled once and scored once per press (timed,
    shared), then per column the kept entries written as a blob, read back and asked. A column's prepare_s is the
    prefill, its press's scoring and its own blob: what `gistctl compress --press` would take."""
    from gistctl.engine import Gistctl
    from gistctl.kv.blob import read_blob
    from gistctl.kv.press import score_document

    device = gm.loaded.device
    _reset_peak(device)
    try:
        scored = score_document(gm, record["context"], [s.press for s in specs])
    except (GistctlError, torch.cuda.OutOfMemoryError) as err:
        for spec in specs:
            row = _base_row(spec, record, device)
            row.update(error=str(err).splitlines()[0] or type(err).__name__, error_stage="prepare")
            yield row
        return
    shared_peak = peak_memory_bytes(device)
    prefill_s = scored.prefill_seconds
    api = Gistctl(gm, gm)
    for spec in specs:
        row = _base_row(spec, record, device)
        begin = time.perf_counter()
        score_s = scored.score_seconds[spec.press]
        blob = scored.blob(spec.press, spec.ratio, spec.budget, spec.dtype)
        target = Path(job["blob_dir"]).parent / spec.slug / f"{_file_name(record['id'])}.kv"
        target.parent.mkdir(parents=True, exist_ok=True)
        size = blob.save(target)
        blob = read_blob(target)  # answer from what is on disk, exactly
        meta = blob.meta
        row.update(prefill_s=prefill_s, score_s=score_s, prepare_s=prefill_s + score_s + (time.perf_counter() - begin),
                   prepare_peak_memory_bytes=shared_peak, document_tokens=meta.document_tokens,
                   state_bytes=size, full_kv_bytes=meta.full_kv_bytes, compression_ratio=meta.full_kv_bytes / size,
                   kept_fraction=meta.kept_fraction, blob=os.path.relpath(target, job["run_dir"]))
        if row["context_tokens"] is None:
            row["context_tokens"] = meta.document_tokens
        _reset_peak(device)
        try:
            answer = api.ask(blob, record["question"], max_new_tokens=job["settings"]["max_new_tokens"])
        except (GistctlError, torch.cuda.OutOfMemoryError) as err:
            row.update(error=str(err).splitlines()[0] or type(err).__name__, error_stage="answer")
            yield row
            continue
        scores_ = score(record["task"], answer.text, record["answers"], record["meta"])
        row.update(prediction=answer.text, scores=scores_, primary=scores_["primary"], ttft_ms=answer.ttft_ms,
                   decode_tokens_per_s=answer.decode_tokens_per_s, prompt_tokens=answer.prompt_tokens,
                   peak_memory_bytes=answer.peak_memory_bytes)
        yield row


def run_press_job(job: dict, records: dict) -> None:
    from gistctl.engine import open_reader_model

    specs = [MethodSpec(**s) for s in job["specs"]]
    settings = job["settings"]
    gm = open_reader_model(settings["model"], specs[0].adapter, device=settings["device"])
    todo = {column: set(ids) for column, ids in job["todo"].items()}
    parent = job.get("parent_pid")
    with open(job["predictions"], "a", encoding="utf-8") as out:
        for example_id in job["ids"]:
            wanted = [s for s in specs if example_id in todo.get(s.column, ())]
            for row in run_press_example(gm, wanted, records[example_id], job):
                if parent is not None and os.getppid() != parent:
                    return
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
                out.flush()
                os.fsync(out.fileno())
                emit({"event": "row", "row": row})


def run_job(job: dict) -> None:
    spec = MethodSpec(**job["spec"])
    torch.manual_seed(job["settings"]["seed"])
    records = {r["id"]: r for r in read_jsonl(job["settings"]["data"])}
    missing = [i for i in job["ids"] if i not in records]
    if missing:
        from gistctl.errors import DataError

        raise DataError(f"example id {missing[0]!r} is not in {job['settings']['data']}")
    if spec.kind == "press":
        run_press_job(job, records)
        return
    method, loaded = open_method(spec, job)
    parent = job.get("parent_pid")
    with open(job["predictions"], "a", encoding="utf-8") as out:
        for example_id in job["ids"]:
            row = run_example(method, loaded, spec, records[example_id], job)
            if parent is not None and os.getppid() != parent:  # the bench is gone: its rerun owns the file now
                return
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            out.flush()
            os.fsync(out.fileno())
            emit({"event": "row", "row": row})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m gistctl.bench.worker JOB.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    try:
        run_job(job)
    except GistctlError as err:
        emit({"event": "error", "type": type(err).__name__, "message": str(err)})
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
