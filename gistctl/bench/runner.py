"""The bench runner: method columns x examples, one fresh worker process per column, resumable.

A *column* is one method as configured: `full`, `rag`, or one gist adapter (`gist[default]`, `gist[K=25]`,
`gist[none,K=4]`), so several adapters give the accuracy-vs-compression curve from one run. Each column runs
in its own `python -m gistctl.bench.worker` process, so the process peak RSS it reports on CPU is its own.
Rows go to `<run>/predictions.jsonl` (one per column x example, appended and flushed by the worker);
a row already there (same `method` and `id`) is never run again.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

from gistctl import errors
from gistctl.scoring import question_type
from gistctl.errors import ConfigError, DataError, GistctlError
from gistctl.gist.chunks import FIXED, check_chunking
from gistctl.gist.positions import SEQUENTIAL, check_layout
from gistctl.runs import RunDir, atomic_write_text

PRESS_KINDS = ("kvzip", "snapkv", "streaming", "knorm")  # columns of press blobs, one per ratio (`--ratios`)
METHOD_KINDS = ("gist", "rag", "full", "full+lora", "rag+lora", *PRESS_KINDS)
DEFAULT_RATIOS = (0.75, 0.875, 0.9375, 0.97)
# columns that read the document with a trained reader adapter (`--reader-adapter`, from `train --reader full`)
READER_KINDS = {"full+lora": "full", "rag+lora": "rag"}
PREDICTIONS = "predictions.jsonl"
EVENT_PREFIX = "@@gistctl-bench "  # worker stdout lines carrying a JSON event; anything else is library noise


class BenchWorkerError(GistctlError):
    """A worker process died without a user error to report (its log says why)."""


@dataclass(frozen=True)
class MethodSpec:
    """One bench column. adapter: a gist column's adapter (a directory, a shipped name, "none" (untrained) or None
    (the default)), or the reader adapter of a full+lora / rag+lora column (kind full / rag)."""

    column: str
    kind: str
    adapter: str | None = None
    num_gist: int | None = None
    chunk_tokens: int | None = None  # gist: compress in chunks of this many tokens (an adapter's own by default)
    adapter_fingerprint: str | None = None  # gist: rows made with another adapter or chunk length are stale
    positions: str | None = None  # gist: position layout (an adapter's own by default)
    chunking: str | None = None  # gist: how documents are split into chunks (an adapter's own by default)
    dtype: str = "fp16"  # gist and press: the blob dtype (fp16, bf16, fp32 or int8)
    press: str | None = None  # press columns (kind "press"): the press, its ratio and budget; adapter = the reader
    ratio: float | None = None
    budget: str | None = None

    @property
    def blob_kind(self) -> bool:
        """Whether the column answers from blobs it writes (gist and press columns)."""
        return self.kind in ("gist", "press")

    @property
    def slug(self) -> str:
        """The column as a file name: `gist[K=8]` -> `gist_K=8`."""
        return re.sub(r"[^A-Za-z0-9_.=-]+", "_", self.column).strip("_")


@dataclass
class BenchSettings:
    data: str  # JSONL dataset the workers read
    model: str | None = None
    device: str | None = None
    max_new_tokens: int = 32
    seed: int = 0


@dataclass
class Progress:
    """What the runner reports after each row (and once per column at start): counts and running accuracy."""

    column: str
    done: int
    total: int
    accuracy: float | None  # mean primary score over this column's selected rows so far
    errors: int
    event: str  # "start", "loading", "row" or "end"


def _split(spec: str | None) -> list[str]:
    return [part.strip() for part in (spec or "").split(",") if part.strip()]


def parse_gist_sizes(spec: str | None, what: str = "--num-gist") -> list[int]:
    """"10,25,50" -> [10, 25, 50] (distinct positive integers, in order)."""
    sizes = []
    for part in _split(spec):
        if not part.isdigit() or int(part) < 1:
            raise ConfigError(f"bad value '{part}' in {what}; use positive integers like 10,25,50")
        sizes.append(int(part))
    return list(dict.fromkeys(sizes))


def shipped_size_adapter(k: int) -> str:
    """The shipped adapter that `--num-gist k` means: `gistctl/adapters/gist_<k>/`."""
    from gistctl.gist.adapter import GIST_META, SHIPPED_ADAPTERS

    path = SHIPPED_ADAPTERS / f"gist_{k}"
    if not (path / GIST_META).is_file():
        raise errors.ModelLoadError(
            f"no shipped adapter for --num-gist {k} ({path} is missing); train one with `gistctl train` and "
            f"pass --adapter DIR, or use --adapter none --num-gist {k} for untrained gist tokens")
    return str(path)


def _adapter_spec(column: str, adapter: str | None, path: str | None = None) -> MethodSpec:
    """A gist column over a trained adapter, with what identifies its rows: the adapter's fingerprint and the
    chunk length in its gist.json (re-shipping either changes what the column measures)."""
    from gistctl.gist.adapter import adapter_fingerprint, read_adapter_meta

    path = path or adapter
    meta = read_adapter_meta(path)
    return MethodSpec(column, "gist", adapter, chunk_tokens=meta.chunk_tokens,
                      adapter_fingerprint=adapter_fingerprint(path), positions=meta.positions,
                      chunking=meta.chunking)


def parse_ratios(spec: str | None) -> list[float]:
    """"0.75,0.9375" -> [0.75, 0.9375] (distinct, each in [0, 1)); None -> DEFAULT_RATIOS."""
    from gistctl.kv.presses import check_ratio

    if spec is None:
        return list(DEFAULT_RATIOS)
    ratios = []
    for part in _split(spec):
        try:
            value = float(part)
        except ValueError:
            raise ConfigError(f"bad value '{part}' in --ratios; use fractions removed like 0.75,0.9375") from None
        ratios.append(check_ratio(value))
    if not ratios:
        raise ConfigError("--ratios is empty; give fractions removed like 0.75,0.9375")
    return list(dict.fromkeys(ratios))


def press_column(press: str, ratio: float, budget: str) -> str:
    """`kvzip[0.9375]`, `kvzip[uniform,0.9375]`."""
    return f"{press}[{'uniform,' if budget == 'uniform' else ''}{ratio:g}]"


def parse_methods(methods: str, adapters: str | None = None, gist_sizes: str | None = None,
                  chunk_tokens: str | None = None, positions: str | None = None,
                  chunking: str | None = None, dtypes: str | None = None,
                  reader_adapter: str | None = None, ratios: str | None = None,
                  uniform: bool = False) -> list[MethodSpec]:
    """`gist,rag,full` + adapter choices -> columns, gist columns first. Adapters are resolved here, so a
    missing one fails before any model loads. `chunk_tokens` ("256,512"): every gist column once per chunk
    length (K gists per chunk, so shorter chunks keep more gists: the accuracy-vs-compression curve of one
    adapter). `positions` ("sequential,compact") and `chunking` ("fixed,even"): likewise once per gist position
    layout and per way of splitting a document into chunks. `reader_adapter`: the adapter of the full+lora and
    rag+lora columns (the trained ceiling, `gistctl train --reader full`)."""
    from gistctl.gist.adapter import NO_ADAPTER, resolve_adapter

    kinds = list(dict.fromkeys(_split(methods)))
    if not kinds:
        raise ConfigError("--methods is empty; choose from " + ", ".join(METHOD_KINDS))
    unknown = [k for k in kinds if k not in METHOD_KINDS]
    if unknown:
        raise ConfigError(f"unknown method '{unknown[0]}'; choose from {', '.join(METHOD_KINDS)}")
    specs: list[MethodSpec] = []
    adapter_list, sizes = _split(adapters), parse_gist_sizes(gist_sizes)
    if "gist" in kinds:
        if NO_ADAPTER in adapter_list:
            if len(adapter_list) > 1:
                raise ConfigError("--adapter none cannot be mixed with adapter directories; run them separately")
            if not sizes:
                raise ConfigError("--adapter none needs --num-gist K (how many untrained gist tokens to use)")
            specs += [MethodSpec(f"gist[none,K={k}]", "gist", NO_ADAPTER, k, positions=SEQUENTIAL, chunking=FIXED)
                      for k in sizes]
        elif sizes:
            if adapter_list:
                raise ConfigError("give either --adapter DIRS or --num-gist K (shipped adapters gist_K), not both")
            specs += [_adapter_spec(f"gist[K={k}]", shipped_size_adapter(k)) for k in sizes]
        else:
            paths = {spec: resolve_adapter(spec) for spec in adapter_list or [None]}  # clear error when missing
            names = {spec: "default" if spec is None else Path(path).name for spec, path in paths.items()}
            shared = {name for name, n in Counter(names.values()).items() if n > 1}
            for spec, path in paths.items():
                # directories of one name (two runs' final/) are all labelled by the path given
                name = spec if names[spec] in shared else names[spec]
                specs.append(_adapter_spec(f"gist[{name}]", spec, path))
    chunks = parse_gist_sizes(chunk_tokens, what="--chunk-tokens")
    if chunks:
        specs = [replace(s, column=f"{s.column[:-1]},chunk={c}]", chunk_tokens=c) for s in specs for c in chunks]
    layouts = list(dict.fromkeys(check_layout(p, allow_auto=True) for p in _split(positions)))
    if layouts:
        specs = [replace(s, column=f"{s.column[:-1]},pos={p}]", positions=p) for s in specs for p in layouts]
    splits = list(dict.fromkeys(check_chunking(c) for c in _split(chunking)))
    if splits:
        specs = [replace(s, column=f"{s.column[:-1]},split={c}]", chunking=c) for s in specs for c in splits]
    presses = [kind for kind in kinds if kind in PRESS_KINDS]
    if not presses and (ratios is not None or uniform):
        raise ConfigError("--ratios and --uniform are press settings; add a press to --methods "
                          f"({', '.join(PRESS_KINDS)})")
    readers = [kind for kind in kinds if kind in READER_KINDS]
    if reader_adapter and not readers and not presses:
        raise ConfigError("--reader-adapter is used by the full+lora and rag+lora columns and the presses; add one "
                          "to --methods")
    if readers or presses:
        from gistctl.engine import DEFAULT_READER
        from gistctl.gist.adapter import adapter_fingerprint

        reader_adapter = reader_adapter or DEFAULT_READER
        reader_fingerprint = adapter_fingerprint(resolve_adapter(reader_adapter))
    budget = "uniform" if uniform else "global"
    for press in presses:
        specs += [MethodSpec(press_column(press, r, budget), "press", reader_adapter,
                             adapter_fingerprint=reader_fingerprint, press=press, ratio=r, budget=budget)
                  for r in parse_ratios(ratios)]
    from gistctl.kv.blob import BLOB_DTYPES

    blob_dtypes = list(dict.fromkeys(_split(dtypes)))
    unknown_dtypes = [d for d in blob_dtypes if d not in BLOB_DTYPES]
    if unknown_dtypes:
        raise ConfigError(f"unknown blob dtype '{unknown_dtypes[0]}'; choose from {', '.join(BLOB_DTYPES)}")
    if blob_dtypes:
        specs = [replace(s, column=f"{s.column[:-1]},{d}]", dtype=d) for s in specs for d in blob_dtypes]
    for kind in kinds:
        if kind in READER_KINDS:
            specs.append(MethodSpec(kind, READER_KINDS[kind], reader_adapter, adapter_fingerprint=reader_fingerprint))
        elif kind not in ("gist", *PRESS_KINDS):
            specs.append(MethodSpec(kind, kind))
    return specs


def select_examples(records: list[dict], limit: int | None, seed: int) -> list[dict]:
    """All records, or `limit` of them drawn with `seed` (file order kept), so a resume selects the same ones."""
    if limit is None or limit >= len(records):
        return list(records)
    if limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}")
    keep = set(random.Random(seed).sample(range(len(records)), limit))
    return [r for i, r in enumerate(records) if i in keep]


def load_predictions(path: str | Path) -> list[dict]:
    """Rows of predictions.jsonl. A last line cut short by a crash is dropped (and the file rewritten without
    it); a bad line anywhere else is an error."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):
                atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
                break
            raise DataError(f"{path}:{number}: not valid JSON ({err.msg}); remove the line or use a new --run-dir") from err
    return rows


def _running_accuracy(rows: list[dict]) -> float | None:
    return sum(r["primary"] for r in rows) / len(rows) if rows else None


def _raise_worker_error(event: dict) -> None:
    cls = getattr(errors, event.get("type", ""), None)
    if not (isinstance(cls, type) and issubclass(cls, GistctlError)):
        cls = BenchWorkerError
    raise cls(event.get("message", "the worker failed"))


def _die_with_parent() -> None:
    """In the worker, before it runs (Linux): the kernel kills it when the bench process dies, so a killed bench
    never leaves a worker writing rows behind it. Elsewhere the worker checks its parent before each row."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def dedupe_predictions(path: str | Path) -> int:
    """Rewrite predictions.jsonl keeping the first row of each (column, example, what made it); returns how many
    rows were dropped. Rows of a bench killed mid-write by an older gistctl could repeat an example."""
    rows = load_predictions(path)
    seen, kept = set(), []
    for row in rows:
        key = (row.get("method"), row.get("id"), row.get("adapter_fingerprint"), row.get("chunk_tokens"),
               row.get("positions"), row.get("chunking"))
        if key not in seen:
            seen.add(key)
            kept.append(row)
    if len(kept) != len(rows):
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    return len(rows) - len(kept)


def run_worker(run: RunDir, spec: MethodSpec, settings: BenchSettings, ids: list[str],
               on_row: Callable[[dict], None], group: list[MethodSpec] | None = None,
               todo: dict[str, list[str]] | None = None) -> None:
    """Run one column's pending examples in a fresh `python -m gistctl.bench.worker` process; `group`: press
    columns of one press and reader, which score each document once and answer at every ratio and dtype."""
    job = {"spec": asdict(spec), "specs": [asdict(s) for s in group or [spec]], "todo": todo or {spec.column: ids},
           "settings": asdict(settings), "ids": ids,
           "predictions": str(run.file(PREDICTIONS)), "blob_dir": str(run.file("blobs") / spec.slug),
           "rag_index_dir": str(run.file("rag-index")), "run_dir": str(run.path), "parent_pid": os.getpid()}
    job_path = run.write_json(f"workers/{spec.slug}.json", job)
    log_path = run.file(f"workers/{spec.slug}.log")
    user_error = None
    with open(log_path, "a", encoding="utf-8") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gistctl.bench.worker", str(job_path)],
                                stdout=subprocess.PIPE, stderr=log, text=True, env={**os.environ},
                                preexec_fn=_die_with_parent)
        assert proc.stdout is not None
        for line in proc.stdout:
            if not line.startswith(EVENT_PREFIX):
                log.write(line)
                continue
            event = json.loads(line[len(EVENT_PREFIX):])
            if event["event"] == "error":
                user_error = event
            else:
                on_row(event)
        rc = proc.wait()
    if user_error is not None:
        _raise_worker_error(user_error)
    if rc != 0:
        tail = " | ".join(log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:])
        raise BenchWorkerError(f"the {spec.column} worker exited with code {rc}; see {log_path}: {tail}")


def worker_groups(specs: list[MethodSpec]) -> list[list[MethodSpec]]:
    """Columns in the order given, one worker each, except press columns of one reader: one worker for them all
    (the document is prefilled once and scored once per press, then pressed at every ratio, budget and dtype)."""
    groups: list[list[MethodSpec]] = []
    by_press: dict[tuple, list[MethodSpec]] = {}
    for spec in specs:
        if spec.kind != "press":
            groups.append([spec])
            continue
        key = spec.adapter_fingerprint
        if key not in by_press:
            by_press[key] = []
            groups.append(by_press[key])
        by_press[key].append(spec)
    return groups


def run_bench(run: RunDir, specs: list[MethodSpec], examples: list[dict], settings: BenchSettings,
              on_progress: Callable[[Progress], None] | None = None) -> list[dict]:
    """Every column x example not yet in predictions.jsonl; returns the rows of these columns and examples
    (each with its `question_type`)."""
    notify = on_progress or (lambda _: None)
    ids = [e["id"] for e in examples]
    wanted = set(ids)
    dedupe_predictions(run.file(PREDICTIONS))
    existing = load_predictions(run.file(PREDICTIONS))
    by_column = {s.column: s for s in specs}

    def current(row: dict) -> bool:
        """A row of one of these columns and examples, made with the column's adapter, chunk length, layout and
        chunk split (rows from before gist rows recorded chunking were all fixed)."""
        spec = by_column.get(row.get("method"))
        chunking = row.get("chunking", FIXED if row.get("kind") == "gist" else None)
        dtype = row.get("dtype", "fp16" if row.get("kind") == "gist" else None)  # rows before dtypes: fp16 blobs
        return (spec is not None and row.get("id") in wanted
                and (row.get("adapter_fingerprint"), row.get("chunk_tokens"), row.get("positions"), chunking, dtype)
                == (spec.adapter_fingerprint, spec.chunk_tokens, spec.positions, spec.chunking,
                    spec.dtype if spec.blob_kind else None))

    for group in worker_groups(specs):
        rows = {s.column: [r for r in existing if r.get("method") == s.column and current(r)] for s in group}
        pending = [i for i in ids if any(i not in {r["id"] for r in rows[s.column]} for s in group)]

        def report(column: str, event: str) -> None:
            mine = rows[column]
            notify(Progress(column, len(mine), len(ids), _running_accuracy(mine),
                            sum(1 for r in mine if r.get("error")), event))

        for s in group:
            report(s.column, "start")
        if pending:
            for s in group:
                report(s.column, "loading")

            def on_row(event: dict) -> None:
                if event["event"] == "row" and event["row"]["method"] in rows:
                    rows[event["row"]["method"]].append(event["row"])
                    report(event["row"]["method"], "row")

            todo = {s.column: [i for i in ids if i not in {r["id"] for r in rows[s.column]}] for s in group}
            columns = [s for s in group if todo[s.column]]
            run_worker(run, columns[0], settings, pending, on_row, group=columns,
                       todo={s.column: todo[s.column] for s in columns})
        for s in group:
            report(s.column, "end")
    # rows written before the worker recorded question_type get it from their example
    types = {e["id"]: question_type(e["task"], e.get("meta") or {}) for e in examples}
    seen: set[tuple[str, str]] = set()
    out = []
    for row in load_predictions(run.file(PREDICTIONS)):
        key = (row.get("method"), row.get("id"))
        if current(row) and key not in seen:
            seen.add(key)
            out.append(row if "question_type" in row else {**row, "question_type": types[row["id"]]})
    return out
