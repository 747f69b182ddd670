"""Bench outputs from prediction rows: metrics.json, report.md and PNG plots, all written atomically.

metrics.json, per column (method): `accuracy`, `tasks.<task>`, `buckets.<length bucket>`,
`question_types.<task>/<type>` (aggregate list / count / total, the value kind of niah and facts; see
`gistctl.scoring.question_type`), each
`{mean, low, high, n}` (mean primary score and its 95% CI; NaN -> null), plus `n`, `errors` and the profile:
means over rows without error of `ttft_ms`, `prepare_s`, `decode_tokens_per_s`, `prompt_tokens`,
`state_bytes`, `full_kv_bytes`, `compression_ratio`; `peak_memory_bytes` is the max over rows.
A row with an error (e.g. a document longer than the model's window for full context) scores 0.
"""

from __future__ import annotations

import io
import math
import statistics
from typing import Any

from gistctl.runs import RunDir, atomic_write_bytes

_Z95 = 1.959963984540054


def mean_ci95(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high) of a 95% confidence interval for the mean.

    Values all 0/1 (proportions): Wilson score interval, which stays inside [0, 1] and is not zero-width at
    0% or 100%. Otherwise: normal approximation, mean +- 1.96 * sample std / sqrt(n), clipped to [0, 1] when
    every value lies there. n == 0 gives (nan, nan, nan); n == 1 of a non-binary value gives (x, nan, nan)
    since one sample has no spread.
    """
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return (math.nan, math.nan, math.nan)
    mean = sum(values) / n
    if all(v in (0.0, 1.0) for v in values):
        z2 = _Z95 * _Z95
        centre = (mean + z2 / (2 * n)) / (1 + z2 / n)
        half = _Z95 * math.sqrt(mean * (1 - mean) / n + z2 / (4 * n * n)) / (1 + z2 / n)
        return (mean, max(0.0, centre - half), min(1.0, centre + half))
    if n == 1:
        return (mean, math.nan, math.nan)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = _Z95 * std / math.sqrt(n)
    low, high = mean - half, mean + half
    if all(0.0 <= v <= 1.0 for v in values):
        low, high = max(0.0, low), min(1.0, high)
    return (mean, low, high)

FORMAT_VERSION = 1
# Context-length buckets by meta.context_tokens: [low, high) in tokens.
BUCKETS = ((0, 1000, "<1k"), (1000, 2000, "1k-2k"), (2000, 4000, "2k-4k"), (4000, 8000, "4k-8k"),
           (8000, math.inf, ">=8k"))
PLOTS = ("frontier.png", "accuracy_vs_compression.png", "ttft.png", "peak_memory.png", "accuracy_by_length.png")
COMPRESSED_KINDS = ("gist", "press")
PROFILE_MEANS = ("ttft_ms", "prepare_s", "decode_tokens_per_s", "prompt_tokens", "state_bytes", "full_kv_bytes",
                 "compression_ratio", "kept_fraction", "prefill_s", "score_s", "document_tokens")


def length_bucket(tokens: int | None) -> str | None:
    if tokens is None:
        return None
    return next(label for low, high, label in BUCKETS if low <= tokens < high)


def _finite(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def ci(values: list[float]) -> dict[str, Any]:
    mean, low, high = mean_ci95(values)
    return {"mean": _finite(mean), "low": _finite(low), "high": _finite(high), "n": len(values)}


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _spread(values: list[float]) -> dict[str, float] | None:
    """Median, min and max, or None for no values."""
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarize_column(rows: list[dict]) -> dict[str, Any]:
    ok = [r for r in rows if not r.get("error")]
    tasks: dict[str, list[float]] = {}
    buckets: dict[str, list[float]] = {}
    types: dict[str, list[float]] = {}
    for row in rows:
        tasks.setdefault(row["task"], []).append(row["primary"])
        if row.get("question_type"):
            types.setdefault(f"{row['task']}/{row['question_type']}", []).append(row["primary"])
        label = length_bucket(row.get("context_tokens"))
        if label:
            buckets.setdefault(label, []).append(row["primary"])
    order = [label for _, _, label in BUCKETS]
    first = rows[0] if rows else {}
    tokens = sum(r.get("document_tokens") or 0 for r in ok)
    summary = {
        "kind": first.get("kind"), "adapter": first.get("adapter"), "num_gist": first.get("num_gist"),
        "press": first.get("press"), "ratio": first.get("ratio"), "budget": first.get("budget"),
        "dtype": first.get("dtype"),
        # compress (prepare) seconds per 1,000 document tokens, over every row that prepared
        "prepare_s_per_1k": (sum(r["prepare_s"] for r in ok if r.get("prepare_s") is not None) * 1000 / tokens
                             if tokens else None),
        # compress seconds over the prefill's alone, per document (press columns: prefill_s is timed apart)
        "prepare_x_prefill": _spread([r["prepare_s"] / r["prefill_s"] for r in ok
                                      if r.get("prepare_s") is not None and r.get("prefill_s")]),
        "n": len(rows), "errors": len(rows) - len(ok),
        "accuracy": ci([r["primary"] for r in rows]),
        "tasks": {task: ci(values) for task, values in sorted(tasks.items())},
        "buckets": {label: ci(buckets[label]) for label in order if label in buckets},
        "question_types": {label: ci(values) for label, values in sorted(types.items())},
        "peak_memory_bytes": max((max(r.get("peak_memory_bytes") or 0, r.get("prepare_peak_memory_bytes") or 0)
                                  for r in rows), default=None) or None,
    }
    for key in PROFILE_MEANS:
        summary[key] = _mean([r.get(key) for r in ok])
    return summary


def ceiling_column(methods: dict[str, dict], columns: list[str]) -> str | None:
    """The trained ceiling: the first full-context column that reads with an adapter (full+lora), if any."""
    return next((c for c in columns if methods[c]["kind"] == "full" and methods[c].get("adapter")), None)


def retention(methods: dict[str, dict], columns: list[str]) -> dict[str, Any] | None:
    """Per gist or press column, its accuracy over the trained ceiling's, overall and per task (None where the ceiling
    scored 0): what compression keeps of what the same LoRA reads from the whole document."""
    ceiling = ceiling_column(methods, columns)
    if ceiling is None:
        return None

    def ratio(gist: dict | None, full: dict | None) -> float | None:
        if not gist or not full or gist["mean"] is None or not full["mean"]:
            return None
        return gist["mean"] / full["mean"]

    top = methods[ceiling]
    per_column = {}
    for column in columns:
        m = methods[column]
        if m["kind"] not in COMPRESSED_KINDS:
            continue
        per_column[column] = {"accuracy": ratio(m["accuracy"], top["accuracy"]),
                              "tasks": {t: ratio(m["tasks"].get(t), c) for t, c in top["tasks"].items()}}
    return {"ceiling": ceiling, "columns": per_column}


def summarize(rows: list[dict], columns: list[str], info: dict[str, Any] | None = None) -> dict[str, Any]:
    """metrics.json content for `columns` (in that order) from their prediction rows; with a full+lora column,
    `retention` (gist / full+lora, per gist column)."""
    by_column = {column: [r for r in rows if r["method"] == column] for column in columns}
    methods = {column: summarize_column(by_column[column]) for column in columns}
    return {
        "format_version": FORMAT_VERSION,
        **(info or {}),
        "full_kv_reference": "fp16 KV cache of the whole document (kv_cache_bytes(config, document_tokens, 2))",
        "buckets": [label for _, _, label in BUCKETS],
        "n_examples": len({r["id"] for r in rows}),
        "columns": list(columns),  # the methods' order (metrics.json sorts keys)
        "methods": methods,
        "retention": retention(methods, list(columns)),
    }


def ordered(metrics: dict) -> list[tuple[str, dict]]:
    """(column, its metrics) in the run's column order."""
    methods = metrics["methods"]
    return [(column, methods[column]) for column in metrics.get("columns", list(methods))]


# -- formatting, shared by report.md and the terminal table ---------------------------------------------------

SUMMARY_HEADERS = ("method", "accuracy (95% CI)", "n", "errors", "TTFT ms", "prep s", "decode tok/s",
                   "peak mem MiB", "state KiB", "ratio x", "prompt tokens")


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def fmt_ci(c: dict) -> str:
    if c["mean"] is None:
        return "-"
    interval = "" if c["low"] is None else f" [{c['low']:.2f}, {c['high']:.2f}]"
    return f"{c['mean']:.2f}{interval}"


def summary_rows(metrics: dict) -> list[list[str]]:
    rows = []
    for column, m in ordered(metrics):
        rows.append([column, fmt_ci(m["accuracy"]), str(m["n"]), str(m["errors"]), _fmt(m["ttft_ms"], ".1f"),
                     _fmt(m["prepare_s"], ".3f"), _fmt(m["decode_tokens_per_s"], ".1f"),
                     _fmt(m["peak_memory_bytes"] and m["peak_memory_bytes"] / 2**20, ".1f"),
                     _fmt(m["state_bytes"] and m["state_bytes"] / 1024, ".1f"),
                     _fmt(m["compression_ratio"], ".1f"), _fmt(m["prompt_tokens"], ".0f")])
    return rows


def _md_table(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _breakdown(metrics: dict, key: str, labels: list[str]) -> list[list[str]]:
    rows = []
    for column, m in ordered(metrics):
        cells = [column]
        for label in labels:
            c = m[key].get(label)
            cells.append("-" if c is None else f"{fmt_ci(c)} (n={c['n']})")
        rows.append(cells)
    return rows


def _by_question_type(metrics: dict) -> tuple[list[str], list[list[str]]]:
    """The per-type table, one row per `task/type` and one column per method (types outnumber methods)."""
    columns = ordered(metrics)
    labels = sorted({label for _, m in columns for label in m.get("question_types", {})})
    rows = []
    for label in labels:
        cells = [label]
        for _, m in columns:
            c = m.get("question_types", {}).get(label)
            cells.append("-" if c is None else f"{fmt_ci(c)} (n={c['n']})")
        rows.append(cells)
    return ["task / type", *(column for column, _ in columns)], rows


def _fmt_spread(spread: dict | None) -> str:
    return "-" if not spread else f"{spread['median']:.2f} ({spread['min']:.2f}–{spread['max']:.2f})"


def frontier_rows(metrics: dict) -> list[list[str]]:
    kept = (metrics.get("retention") or {}).get("columns", {})
    rows = []
    for column, m in ordered(metrics):
        if m["kind"] not in COMPRESSED_KINDS:
            continue
        r = kept.get(column, {}).get("accuracy")
        share = m.get("kept_fraction")
        rows.append([column, m.get("dtype") or "-", f"{100 * share:.2f}%" if share else "-",
                     _fmt(m["state_bytes"] and m["state_bytes"] / 1024, ".1f"),
                     _fmt(m["compression_ratio"], ".1f"), fmt_ci(m["accuracy"]), _fmt(r, ".2f"),
                     _fmt(m.get("prepare_s_per_1k"), ".2f"), _fmt_spread(m.get("prepare_x_prefill")),
                     _fmt(m["ttft_ms"], ".0f")])
    return rows


def render_markdown(metrics: dict, criteria: list | None = None) -> str:
    tasks = sorted({t for m in metrics["methods"].values() for t in m["tasks"]})
    buckets = [b for b in metrics["buckets"] if any(b in m["buckets"] for m in metrics["methods"].values())]
    parts = [
        "# gistctl bench", "",
        f"Data: `{metrics.get('data')}` ({metrics['n_examples']} examples) · model: `{metrics.get('model')}` · "
        f"device: {metrics.get('device')}", "",
        "## Summary", "", _md_table(SUMMARY_HEADERS, summary_rows(metrics)), "",
        "Accuracy is the mean primary score (see `gistctl/scoring.py`) with a 95% CI; a row that failed "
        "(e.g. a document longer than the model's window for full context) scores 0 and counts under errors. "
        "TTFT is question time only. Peak memory is CUDA max allocated, or on CPU the peak RSS of the column's "
        "own worker process (model weights included). Ratio x (compression) = full KV cache of the document at fp16 / "
        "state bytes (gist: blob size on disk; rag: index + chunk text; full: its KV cache at the model's "
        "dtype, so fp32 on CPU gives 0.5x).", "",
        "## Accuracy per task", "", _md_table(["method", *tasks], _breakdown(metrics, "tasks", tasks)), "",
        "## Accuracy per context length (meta.context_tokens)", "",
        _md_table(["method", *buckets], _breakdown(metrics, "buckets", buckets)), "",
    ]
    kept = metrics.get("retention")
    if kept and kept["columns"]:
        task_names = sorted(next(iter(kept["columns"].values()))["tasks"])
        parts += [f"## Retention (gist / {kept['ceiling']})", "",
                  f"Accuracy of each gist column over that of `{kept['ceiling']}`, the same data read whole by a "
                  "LoRA trained to (`gistctl train --reader full`): what compression keeps.", "",
                  _md_table(["method", "overall", *task_names],
                            [[column, *(_fmt(v, ".2f") for v in (r["accuracy"], *(r["tasks"][t] for t in task_names)))]
                             for column, r in kept["columns"].items()]), ""]
    frontier = frontier_rows(metrics)
    if frontier:
        parts += ["## Frontier (compressed columns)", "",
                  "Entries kept: the blob's entries over the document's KV entries (layers x KV heads x document tokens); "
                  "a press blob also holds the chat template's head, so ratio 0 shows a little over 100%. "
                  "Blob KiB: mean file size per document. Compress s / 1k: prepare seconds (prefill, scoring, "
                  "writing) per 1,000 document tokens. x prefill: a press's prepare seconds over its prefill's "
                  "alone, median (min–max) per document. Retention: accuracy over the trained ceiling's.", "",
                  _md_table(["method", "dtype", "entries kept", "blob KiB", "x vs full KV (same dtype)",
                             "accuracy (95% CI)", "retention", "compress s / 1k", "x prefill", "TTFT ms"], frontier), ""]
    headers, type_rows = _by_question_type(metrics)
    if type_rows:
        parts += ["## Accuracy per question type", "",
                  "Aggregate questions by type (list the kinds, count one kind, count all), niah and facts by "
                  "the kind of value asked for, passkeys by key format (the dataset's meta).", "",
                  _md_table(headers, type_rows), ""]
    if criteria:
        parts += ["## Seed protocol criteria", "",
                  _md_table(["criterion", "target", "measured", "result"],
                            [[c.name, c.target, c.measured, c.verdict] for c in criteria]), ""]
    parts += ["## Plots", ""] + [f"![{name}]({name})" for name in PLOTS] + [""]
    return "\n".join(parts)


# -- plots ----------------------------------------------------------------------------------------------------

def _save(fig, run: RunDir, name: str) -> None:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})  # labels past the axes
    plt.close(fig)
    atomic_write_bytes(run.file(name), buffer.getvalue())


def write_plots(run: RunDir, metrics: dict) -> list[str]:
    """The four PNGs in PLOTS; returns their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    methods = metrics["methods"]
    columns = [column for column, _ in ordered(metrics)]
    _frontier_plot(run, metrics)

    fig, ax = plt.subplots(figsize=(6, 4))
    gist = [(m["compression_ratio"], m["accuracy"], c) for c, m in ordered(metrics)
            if m["kind"] == "gist" and m["compression_ratio"] and m["accuracy"]["mean"] is not None]
    gist.sort(key=lambda point: point[0])
    if gist:
        ax.plot([p[0] for p in gist], [p[1]["mean"] for p in gist], "-o", color="C0", label="gist")
        for x, acc, column in gist:
            ax.annotate(column, (x, acc["mean"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    for kind, marker, colour in (("rag", "s", "C1"), ("full", "D", "C2")):
        for column, m in ordered(metrics):
            if m["kind"] == kind and m["compression_ratio"] and m["accuracy"]["mean"] is not None:
                ax.plot([m["compression_ratio"]], [m["accuracy"]["mean"]], marker, color=colour, label=column)
    for column, m in ordered(metrics):
        a = m["accuracy"]
        if m["compression_ratio"] and a["low"] is not None:
            ax.errorbar([m["compression_ratio"]], [a["mean"]], yerr=[[max(0.0, a["mean"] - a["low"])], [max(0.0, a["high"] - a["mean"])]],
                        color="grey", alpha=0.5, capsize=3)
    ax.set_xscale("log")  # ticks read as ratios ("50x"): at 1, 2, 5 x 10^k, or 10^k over more than 2 decades
    low, high = ax.get_xlim()
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0) if high / low <= 100 else (1.0,)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}x"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("compression ratio (full fp16 KV bytes / state bytes)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("Accuracy vs compression")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, run, "accuracy_vs_compression.png")

    for name, key, scale, label in (("ttft.png", "ttft_ms", 1.0, "mean TTFT (ms)"),
                                    ("peak_memory.png", "peak_memory_bytes", 2**20, "peak memory (MiB)")):
        fig, ax = plt.subplots(figsize=(6, 4))
        values = [(methods[c][key] or 0) / scale for c in columns]
        bars = ax.bar(range(len(columns)), values, color=[f"C{i}" for i in range(len(columns))])
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_xticks(range(len(columns)), columns, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.set_title(label + " per method")
        fig.tight_layout()
        _save(fig, run, name)

    fig, ax = plt.subplots(figsize=(7, 4))
    buckets = [b for b in metrics["buckets"] if any(b in m["buckets"] for m in methods.values())]
    width = 0.8 / max(1, len(columns))
    for i, column in enumerate(columns):
        values = [(methods[column]["buckets"].get(b) or {}).get("mean") or 0.0 for b in buckets]
        ax.bar([j + i * width for j in range(len(buckets))], values, width, label=column)
    ax.set_xticks([j + width * (len(columns) - 1) / 2 for j in range(len(buckets))], buckets)
    ax.set_xlabel("context tokens")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.05)
    ax.set_title("Accuracy per context length")
    if columns and buckets:
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, run, "accuracy_by_length.png")
    return list(PLOTS)


def _frontier_plot(run: RunDir, metrics: dict) -> None:
    """frontier.png: accuracy against blob bytes per document (log x), one panel per task; one curve per press
    (and budget and dtype) over its ratios, one per gist dtype; full+lora at the document's whole fp16 KV cache
    and rag+lora at its index, as reference marks."""
    import matplotlib.pyplot as plt

    tasks = sorted({t for m in metrics["methods"].values() for t in m["tasks"]})
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
    curves: dict[str, list] = {}
    for column, m in ordered(metrics):
        if m["kind"] in COMPRESSED_KINDS and m["state_bytes"]:
            name = (m.get("press") or "gist") + (",uniform" if m.get("budget") == "uniform" else "")
            curves.setdefault(f"{name} ({m.get('dtype') or 'fp16'})", []).append((column, m))
    for ax, task in zip(axes[0], tasks):
        for i, (label, points) in enumerate(curves.items()):
            pts = sorted(((m["state_bytes"], m["tasks"][task]["mean"], m.get("ratio")) for _, m in points
                          if task in m["tasks"] and m["tasks"][task]["mean"] is not None), key=lambda p: p[0])
            if not pts:
                continue
            style = "--" if "int8" in label else "-"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style + "o", color=f"C{i}", label=label, markersize=4)
            for x, y, ratio in pts:
                if ratio is not None and "int8" not in label:
                    ax.annotate(f"{1 / (1 - ratio):.0f}x" if ratio else "1x", (x, y), textcoords="offset points",
                                xytext=(3, 3), fontsize=7, color=f"C{i}")
        for column, m in ordered(metrics):
            if m["kind"] in ("full", "rag") and m.get("adapter") and task in m["tasks"]:
                x = m["full_kv_bytes"] if m["kind"] == "full" else m["state_bytes"]
                if x and m["tasks"][task]["mean"] is not None:
                    ax.plot([x], [m["tasks"][task]["mean"]], "*" if m["kind"] == "full" else "s", markersize=11,
                            color="black" if m["kind"] == "full" else "grey", label=column, linestyle="none")
        ax.set_xscale("log")
        ax.set_xlabel("bytes kept per document (blob file; full+lora: its whole fp16 KV)")
        ax.set_ylabel("accuracy (mean primary score)")
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"{task} (n={max((m['tasks'][task]['n'] for m in metrics['methods'].values() if task in m['tasks']), default=0)})")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=min(6, len(labels)),
                   bbox_to_anchor=(0.5, -0.08))
    fig.suptitle("gistctl frontier: accuracy vs bytes kept")
    fig.tight_layout()
    _save(fig, run, "frontier.png")


def write_outputs(run: RunDir, metrics: dict, criteria: list | None = None) -> None:
    """metrics.json (with the criteria when given), report.md and the plots."""
    if criteria:
        metrics = {**metrics, "criteria": [c.as_dict() for c in criteria]}
    run.write_json("metrics.json", metrics)
    write_plots(run, metrics)
    run.write_text("report.md", render_markdown(metrics, criteria))
