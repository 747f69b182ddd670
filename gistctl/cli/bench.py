"""`gistctl bench`: gist vs RAG vs full on one dataset; accuracy, latency, memory and compression in one run."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from gistctl.cli.common import console, err_console, user_errors
from gistctl.errors import ConfigError, DataError
from gistctl.runs import lock_dir

RESUME_KEYS = ("data", "model", "max_new_tokens")  # settings a resumed run must share with the rows it has


def _open_run(run_dir: Optional[Path], config: dict, seed: int):
    """A new run dir, or the given one; resuming one with rows made under other settings is refused."""
    import yaml

    from gistctl.bench.runner import PREDICTIONS
    from gistctl.runs import RunDir

    if run_dir is not None and (run_dir / PREDICTIONS).is_file() and (run_dir / "config.yaml").is_file():
        old = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
        for key in RESUME_KEYS:
            if old.get(key) != config[key]:
                raise ConfigError(f"run dir '{run_dir}' holds rows made with {key}={old.get(key)!r}, not "
                                  f"{config[key]!r}; use a new --run-dir")
        return RunDir(run_dir)
    return RunDir.create("bench", config, seed=seed, run_dir=run_dir)


def _seed_data(run, model: Optional[str], n: int, seed: int) -> Path:
    """The seed-protocol set in the run dir (built once; a resumed run reuses it)."""
    from gistctl.bench.protocol import build_seed_records
    from gistctl.data.lengths import load_tokenizer
    from gistctl.data.schema import write_jsonl

    path = run.file("seed.jsonl")
    if not path.is_file():
        with err_console.status("building the seed-protocol passkey and aggregate sets"):
            write_jsonl(path, build_seed_records(load_tokenizer(model), n, seed))
    return path


def _print_summary(metrics: dict, criteria) -> None:
    """Two tables (quality, then cost) so each fits an 80-column terminal; report.md has them as one."""
    from gistctl.bench.report import SUMMARY_HEADERS, summary_rows

    rows = summary_rows(metrics)
    for title, columns in ((f"gistctl bench · {metrics['n_examples']} examples · accuracy", range(0, 4)),
                           ("cost per method (means; peak memory = max)", [0, *range(4, len(SUMMARY_HEADERS))])):
        table = Table(title=title)
        for i in columns:
            table.add_column(SUMMARY_HEADERS[i], justify="left" if i == 0 else "right", no_wrap=i <= 1)
        for row in rows:
            table.add_row(*(escape(row[i]) for i in columns))
        console.print(table)
    kept = metrics.get("retention")
    for column, r in (kept["columns"] if kept else {}).items():
        value = "-" if r["accuracy"] is None else f"{r['accuracy']:.2f}"
        console.print(f"retention {escape(column)} / {escape(kept['ceiling'])}: {value}", highlight=False)
    if criteria:
        checks = Table(title="seed protocol criteria")
        for header in ("criterion", "target", "measured", "result"):
            checks.add_column(header)
        colours = {"PASS": "green", "FAIL": "red", "n/a": "yellow"}
        for c in criteria:
            checks.add_row(escape(c.name), c.target, c.measured, f"[{colours[c.verdict]}]{c.verdict}[/]")
        console.print(checks)


@user_errors
def bench(
    methods: str = typer.Option("gist,rag,full", help="Comma-separated methods: gist, rag, full; full+lora and "
                                "rag+lora read with --reader-adapter (the trained ceiling); presses kvzip, snapkv, "
                                "streaming, knorm, one column per --ratios."),
    ratios: Optional[str] = typer.Option(None, "--ratios", help="Press columns: fractions of the KV entries removed, "
                                         "e.g. 0.75,0.875,0.9375,0.97 (the default)."),
    uniform: bool = typer.Option(False, "--uniform", help="Presses keep the same count per head (default: one "
                                 "threshold over all heads)."),
    data: Optional[Path] = typer.Option(None, "--data", help="JSONL dataset (see `gistctl data`)."),
    adapter: Optional[str] = typer.Option(None, help="Gist adapter(s), comma-separated: directories or shipped "
                                          "names, one column each; 'none' = untrained gists (needs --num-gist). "
                                          "Default: the shipped default adapter."),
    gist_sizes: Optional[str] = typer.Option(None, "--num-gist", "--gist-sizes", help="K values (gist tokens per chunk), e.g. 10,25,50: the shipped "
                                             "adapters gist_K (or untrained K gists with --adapter none)."),
    chunk_tokens: Optional[str] = typer.Option(None, "--chunk-tokens", help="Chunk lengths, e.g. 256,512,1024: "
                                               "every gist column once per length (K gists per chunk)."),
    positions: Optional[str] = typer.Option(None, "--positions", help="Gist position layouts, e.g. "
                                            "sequential,compact,auto: every gist column once per layout "
                                            "(default: each adapter's own)."),
    chunking: Optional[str] = typer.Option(None, "--chunking", help="Chunk splits, e.g. fixed,even: every gist "
                                           "column once per way of splitting documents (default: each adapter's own)."),
    dtypes: Optional[str] = typer.Option(None, "--dtypes", help="Blob dtypes, e.g. fp16,int8: every gist column "
                                         "once per dtype (default: fp16)."),
    reader_adapter: Optional[str] = typer.Option(None, "--reader-adapter", help="Adapter of the full+lora and "
                                                 "rag+lora columns and the presses' reader (`gistctl train --reader "
                                                 "full`; default: the shipped full-reader); the report shows each "
                                                 "compressed column's retention = its accuracy / full+lora's."),
    model: Optional[str] = typer.Option(None, help="HF model id or local directory (default: the embedded default)."),
    limit: Optional[int] = typer.Option(None, min=1, help="Run this many examples, drawn with --seed "
                                        f"(--protocol seed: examples per set, default 20)."),
    seed: int = typer.Option(0, min=0, help="Seed for --limit's draw (and the seed-protocol data)."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Run directory; an existing one is resumed."),
    max_new_tokens: int = typer.Option(32, min=1, help="Longest answer in tokens."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda; default: cuda if available."),
    protocol: Optional[str] = typer.Option(None, help="seed: build the study's passkey + aggregate sets, run "
                                           "gist,rag,full and check its success criteria."),
) -> None:
    """Run each method on each example, each method in its own worker process; write predictions.jsonl,
    metrics.json, report.md and plots to the run dir and print the summary table."""
    from gistctl.bench.protocol import DEFAULT_N, seed_criteria
    from gistctl.bench.report import summarize, write_outputs
    from gistctl.bench.runner import BenchSettings, parse_methods, run_bench, select_examples
    from gistctl.data.schema import read_jsonl

    if protocol not in (None, "seed"):
        raise ConfigError(f"unknown protocol '{protocol}'; the only one is seed")
    if protocol and data is not None:
        raise ConfigError("--protocol seed builds its own data; drop --data")
    if protocol is None and data is None:
        raise DataError("give --data FILE (build one with `gistctl data`) or --protocol seed")
    records = read_jsonl(data) if data is not None else None
    specs = parse_methods(methods, adapter, gist_sizes, chunk_tokens, positions, chunking, dtypes, reader_adapter,
                          ratios, uniform)
    if protocol == "seed" and not {"gist", "rag"} <= {s.kind for s in specs}:
        raise ConfigError("--protocol seed compares gist with rag; keep both in --methods")

    config = {"data": str(Path(data).resolve()) if data is not None else "seed.jsonl", "model": model,
              "max_new_tokens": max_new_tokens, "methods": [s.column for s in specs], "adapter": adapter, "reader_adapter": reader_adapter,
              "gist_sizes": gist_sizes, "chunk_tokens": chunk_tokens, "positions": positions, "chunking": chunking,
              "dtypes": dtypes, "ratios": ratios, "uniform": uniform,
              "limit": limit, "seed": seed, "device": device, "protocol": protocol}
    with contextlib.ExitStack() as stack:  # one bench at a time per run directory
        if run_dir is not None:
            stack.enter_context(lock_dir(run_dir))
        run = _open_run(run_dir, config, seed)
        if run_dir is None:
            stack.enter_context(lock_dir(run.path))
        if protocol == "seed":
            data = _seed_data(run, model, limit or DEFAULT_N, seed)
            examples = read_jsonl(data)
        else:
            examples = select_examples(records, limit, seed)
        settings = BenchSettings(str(Path(data).resolve()), model, device, max_new_tokens, seed)
        err_console.print(f"run dir: {run.path}", highlight=False)

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err_console, transient=False) as progress:
            bars: dict[str, int] = {}

            def on_progress(p) -> None:
                if p.column not in bars:
                    bars[p.column] = progress.add_task(escape(p.column), total=p.total)
                accuracy = "-" if p.accuracy is None else f"{p.accuracy:.0%}"
                state = " (loading)" if p.event == "loading" else ""
                errors = f" errors {p.errors}" if p.errors else ""
                progress.update(bars[p.column], completed=p.done,
                                description=f"{escape(p.column)} acc {accuracy}{errors}{state}")

            rows = run_bench(run, specs, examples, settings, on_progress)

        info = {"data": str(data), "model": model or "default", "device": rows[0]["device"] if rows else device,
                "protocol": protocol}
        metrics = summarize(rows, [s.column for s in specs], info)
        criteria = None
        if protocol == "seed":
            criteria = [c for s in specs if s.kind == "gist" for c in seed_criteria(metrics["methods"], s.column)]
        write_outputs(run, metrics, criteria)
        _print_summary(metrics, criteria)
        console.print(f"wrote predictions.jsonl, metrics.json, report.md and plots to {run.path}", highlight=False)
