"""`gistctl bench` on the tiny model: files and counts, resume, plots, blob-derived sizes, criteria, errors."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gistctl.bench.protocol import seed_criteria
from gistctl.scoring import question_type
from gistctl.bench.report import PLOTS, render_markdown, summarize, write_plots
from gistctl.bench.runner import parse_methods
from gistctl.cli.main import app
from gistctl.data.schema import write_jsonl
from gistctl.errors import ConfigError, DataError
from gistctl.kv.blob import read_blob_meta
from gistctl.kv.sizes import kv_cache_bytes
from gistctl.runs import RunDir

runner = CliRunner()
GIST = "gist[none,K=2]"

DOCS = [
    ("The lighthouse keeper is Ada Lindqvist. The supply boat is the Saint Brendan. " * 3, "Who keeps the light?",
     ["Ada Lindqvist"], "facts", {"kind": "name"}),
    ("Marrow Island lies eleven miles off the coast. The passkey is 7K2P9A. The gulls nest there. " * 2,
     "What is the passkey?", ["7K2P9A"], "passkey", {"key_format": "alnum6"}),
    ("The radio call sign is MRW-7. The island has one well and a small harbour. " * 4, "What is the call sign?",
     ["MRW-7"], "niah", {"kind": "code"}),
]
TYPES = {"ex-0": "name", "ex-1": "alnum6", "ex-2": "code"}


def write_data(path: Path, n: int = 3) -> Path:
    records = [{"id": f"ex-{i}", "task": task, "context": context, "question": question, "answers": answers,
                "meta": {"context_tokens": 500 + 1000 * i, **meta}}
               for i, (context, question, answers, task, meta) in enumerate(DOCS[:n])]
    write_jsonl(path, records)
    return path


def bench_args(model_dir, data, run_dir, *extra):
    return ["bench", "--methods", "gist,full", "--adapter", "none", "--num-gist", "2", "--model", str(model_dir),
            "--device", "cpu", "--max-new-tokens", "3", "--data", str(data), "--run-dir", str(run_dir), *extra]


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def bench_run(tiny_model_dir, tmp_path_factory):
    """One bench run of 2 of the 3 examples, then resumed on all 3 (so each column's worker runs twice)."""
    root = tmp_path_factory.mktemp("bench")
    data = write_data(root / "set.jsonl")
    run_dir = root / "run"
    first = runner.invoke(app, bench_args(tiny_model_dir, data, run_dir, "--limit", "2"))
    assert first.exit_code == 0, first.output
    first_rows = read_rows(run_dir)
    second = runner.invoke(app, bench_args(tiny_model_dir, data, run_dir))
    assert second.exit_code == 0, second.output
    return {"run_dir": run_dir, "data": data, "first_rows": first_rows, "output": second.output}


def test_run_writes_documented_files_with_consistent_counts(bench_run):
    run_dir = bench_run["run_dir"]
    for name in ("predictions.jsonl", "metrics.json", "report.md", "config.yaml", "meta.json", *PLOTS):
        assert (run_dir / name).is_file(), name
    rows = read_rows(run_dir)
    assert len(rows) == 6
    assert {(r["method"], r["id"]) for r in rows} == {(m, f"ex-{i}") for m in (GIST, "full") for i in range(3)}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["columns"] == [GIST, "full"] and set(metrics["methods"]) == {GIST, "full"}
    assert metrics["n_examples"] == 3
    for column, m in metrics["methods"].items():
        mine = [r for r in rows if r["method"] == column]
        assert m["n"] == m["accuracy"]["n"] == 3
        assert m["errors"] == sum(1 for r in mine if r["error"]) == 0
        assert m["accuracy"]["mean"] == pytest.approx(sum(r["primary"] for r in mine) / 3)
        assert sum(t["n"] for t in m["tasks"].values()) == 3
        assert set(m["tasks"]) == {"facts", "passkey", "niah"}
        assert {k: v["n"] for k, v in m["buckets"].items()} == {"<1k": 1, "1k-2k": 1, "2k-4k": 1}
        assert m["ttft_ms"] > 0 and m["prepare_s"] > 0 and m["peak_memory_bytes"] > 0 and m["prompt_tokens"] > 0
        for row in mine:
            assert isinstance(row["prediction"], str) and row["scores"]["primary"] == row["primary"]
            assert row["ttft_ms"] > 0 and row["prepare_s"] > 0
    gist_rows = [r for r in rows if r["method"] == GIST]
    full_rows = [r for r in rows if r["method"] == "full"]
    # gist answers from a few gists, full re-reads the document: fewer prompt tokens at question time
    assert all(g["prompt_tokens"] < f["prompt_tokens"] for g, f in zip(gist_rows, full_rows))
    report = (run_dir / "report.md").read_text()
    assert GIST in report and "| full |" in report
    assert GIST in bench_run["output"] and "ratio" in bench_run["output"]
    # each row records its example's question type; metrics and report break accuracy down by it
    assert {r["id"]: r["question_type"] for r in rows} == TYPES
    for column, m in metrics["methods"].items():
        by_id = {r["id"]: r["primary"] for r in rows if r["method"] == column}
        assert {k: (v["mean"], v["n"]) for k, v in m["question_types"].items()} == {
            "facts/name": (by_id["ex-0"], 1), "passkey/alnum6": (by_id["ex-1"], 1), "niah/code": (by_id["ex-2"], 1)}
    assert "## Accuracy per question type" in report and "| passkey/alnum6 |" in report


def test_question_type_breakdown_on_hand_made_rows():
    rows = [{"method": "gist", "id": f"a{i}", "task": "aggregate", "question_type": qt, "primary": p,
             "context_tokens": 900}
            for i, (qt, p) in enumerate((("list", 1.0), ("list", 0.5), ("count", 0.0), ("count", 1.0), ("total", 0.0)))]
    rows.append({"method": "gist", "id": "q", "task": "qa", "question_type": None, "primary": 0.25,
                 "context_tokens": 900})
    m = summarize(rows, ["gist"])["methods"]["gist"]
    assert {k: (v["mean"], v["n"]) for k, v in m["question_types"].items()} == {
        "aggregate/count": (0.5, 2), "aggregate/list": (0.75, 2), "aggregate/total": (0.0, 1)}
    assert m["tasks"]["aggregate"]["mean"] == pytest.approx(2.5 / 5)
    table = render_markdown({**summarize(rows, ["gist"]), "data": "d", "model": "m", "device": "cpu"})
    assert "| aggregate/list | 0.75 [" in table and "| aggregate/total | 0.00 [0.00, 0.79] (n=1) |" in table
    assert "qa/" not in table
    assert question_type("aggregate", {"question_type": "total"}) == "total"
    assert question_type("niah", {"kind": "date"}) == "date" and question_type("qa", {"kind": "x"}) is None


def test_rows_without_question_type_get_it_from_their_examples(bench_run, tiny_model_dir, tmp_path):
    """Runs benched before rows recorded question_type are broken down by type when resumed."""
    import shutil

    run_dir = tmp_path / "old"
    shutil.copytree(bench_run["run_dir"], run_dir)
    old_rows = [{k: v for k, v in r.items() if k != "question_type"} for r in read_rows(run_dir)]
    (run_dir / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old_rows))
    again = runner.invoke(app, bench_args(tiny_model_dir, bench_run["data"], run_dir))
    assert again.exit_code == 0, again.output
    assert read_rows(run_dir) == old_rows  # nothing re-run, nothing rewritten
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["methods"][GIST]["question_types"]) == {"facts/name", "passkey/alnum6", "niah/code"}


def test_resume_runs_only_missing_rows(bench_run, tiny_model_dir):
    first, rows = bench_run["first_rows"], read_rows(bench_run["run_dir"])
    assert len(first) == 4
    assert rows[:4] == first  # kept, not redone
    again = runner.invoke(app, bench_args(tiny_model_dir, bench_run["data"], bench_run["run_dir"]))
    assert again.exit_code == 0, again.output
    assert read_rows(bench_run["run_dir"]) == rows  # nothing pending: no worker, no new rows


def test_resume_redoes_gist_rows_of_a_changed_adapter(tiny_model_dir, tmp_path):
    """Re-shipping an adapter under the same column name must not reuse the old adapter's rows."""
    from gistctl.config import load_config
    from gistctl.gist.adapter import adapter_fingerprint
    from gistctl.train.loop import train

    data = write_data(tmp_path / "set.jsonl", 1)
    config = load_config(None, {"model.name": str(tiny_model_dir), "model.device": "cpu", "gist.num_gist": 2,
                                "train.data": str(data), "train.batch_size": 1, "train.max_steps": 1,
                                "train.bf16": False, "lora.r": 4, "lora.alpha": 8})
    adapter = train(config, tmp_path / "train").final_dir
    args = ["bench", "--methods", "gist", "--adapter", str(adapter), "--model", str(tiny_model_dir), "--device",
            "cpu", "--max-new-tokens", "2", "--data", str(data), "--run-dir", str(tmp_path / "run")]
    assert runner.invoke(app, args).exit_code == 0
    old = adapter_fingerprint(adapter)
    config.train.seed = 1
    train(config, tmp_path / "train2")
    for name in ("adapter_model.safetensors",):  # "re-ship": other weights under the same directory
        (adapter / name).write_bytes((tmp_path / "train2" / "final" / name).read_bytes())
    assert adapter_fingerprint(adapter) != old
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = read_rows(tmp_path / "run")
    assert [r["adapter_fingerprint"] for r in rows] == [old, adapter_fingerprint(adapter)]  # redone, not reused
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["methods"]["gist[final]"]["n"] == 1
    gist_json = adapter / "gist.json"  # re-shipped with another chunk length: the weights are the same
    gist_json.write_text(json.dumps({**json.loads(gist_json.read_text()), "chunk_tokens": 16}))
    assert runner.invoke(app, args).exit_code == 0
    assert [r["chunk_tokens"] for r in read_rows(tmp_path / "run")][-1] == 16
    assert len(read_rows(tmp_path / "run")) == 3


def test_resume_refuses_other_settings(bench_run, tiny_model_dir):
    args = bench_args(tiny_model_dir, bench_run["data"], bench_run["run_dir"])
    args[args.index("--max-new-tokens") + 1] = "5"
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "max_new_tokens" in result.output


def test_blob_sizes_and_compression_match_the_report(bench_run, tiny_model_dir):
    from transformers import AutoConfig

    run_dir = bench_run["run_dir"]
    config = AutoConfig.from_pretrained(tiny_model_dir)
    rows = [r for r in read_rows(run_dir) if r["method"] == GIST]
    sizes, ratios = [], []
    for row in rows:
        blob = run_dir / row["blob"]
        assert blob.parent == run_dir / "blobs" / "gist_none_K=2"
        meta = read_blob_meta(blob)
        size = blob.stat().st_size
        ratio = kv_cache_bytes(config, meta.document_tokens, 2) / size
        assert row["state_bytes"] == size and row["compression_ratio"] == pytest.approx(ratio)
        assert meta.num_gist == 2 and row["document_tokens"] == meta.document_tokens
        sizes.append(size)
        ratios.append(ratio)
    m = json.loads((run_dir / "metrics.json").read_text())["methods"][GIST]
    assert m["state_bytes"] == pytest.approx(sum(sizes) / 3)
    assert m["compression_ratio"] == pytest.approx(sum(ratios) / 3)
    assert m["compression_ratio"] > 1


def test_plots_differ_when_data_differ(bench_run, tmp_path):
    metrics = json.loads((bench_run["run_dir"] / "metrics.json").read_text())
    for name in PLOTS:
        assert (bench_run["run_dir"] / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    same, other = RunDir(tmp_path / "same"), RunDir(tmp_path / "other")
    write_plots(same, metrics)
    changed = json.loads(json.dumps(metrics))
    for m in changed["methods"].values():
        m["accuracy"].update(mean=0.5, low=0.1, high=0.9)
        m["ttft_ms"] *= 3
        m["peak_memory_bytes"] //= 2
        m["compression_ratio"] *= 2
        for bucket in m["buckets"].values():
            bucket["mean"] = 0.5
        for task in m["tasks"].values():  # the frontier plots each task's accuracy
            task["mean"] = 0.5
    write_plots(other, changed)
    for name in PLOTS:
        assert (same.file(name)).read_bytes() == (bench_run["run_dir"] / name).read_bytes(), name  # deterministic
        assert (other.file(name)).read_bytes() != (same.file(name)).read_bytes(), name


def _methods(gist_ttft=50.0, rag_ttft=100.0, gist_mem=100, rag_mem=200, passkey=0.7, gist_agg=0.8, rag_agg=0.6):
    def task(mean):
        return {"mean": mean, "low": None, "high": None, "n": 10}

    return {"gist[K=8]": {"ttft_ms": gist_ttft, "peak_memory_bytes": gist_mem,
                          "tasks": {"passkey": task(passkey), "aggregate": task(gist_agg)}},
            "rag": {"ttft_ms": rag_ttft, "peak_memory_bytes": rag_mem,
                    "tasks": {"passkey": task(1.0), "aggregate": task(rag_agg)}}}


def test_seed_criteria_pass_and_fail_on_hand_made_numbers():
    verdicts = lambda methods: [c.passed for c in seed_criteria(methods, "gist[K=8]")]  # noqa: E731
    assert verdicts(_methods()) == [True, True, True, True]  # thresholds met exactly count as a pass
    assert verdicts(_methods(gist_mem=201)) == [False, True, True, True]
    assert verdicts(_methods(gist_ttft=71.0)) == [True, False, True, True]  # 29% faster is not enough
    assert verdicts(_methods(gist_ttft=70.0)) == [True, True, True, True]
    assert verdicts(_methods(passkey=0.69)) == [True, True, False, True]
    assert verdicts(_methods(gist_agg=0.79)) == [True, True, True, False]
    assert verdicts(_methods(gist_agg=0.3, rag_agg=0.4)) == [True, True, True, False]
    # the criterion has two halves: 20 points above RAG is not enough below 80%
    assert verdicts(_methods(gist_agg=0.6, rag_agg=0.4)) == [True, True, True, False]
    assert verdicts(_methods(gist_agg=0.9, rag_agg=0.75)) == [True, True, True, False]
    assert verdicts(_methods(gist_agg=1.0, rag_agg=0.8)) == [True, True, True, True]
    missing = _methods()
    del missing["rag"]
    assert verdicts(missing) == [None, None, True, None]
    assert [c.verdict for c in seed_criteria(_methods(passkey=0.1), "gist[K=8]")] == ["PASS", "PASS", "FAIL", "PASS"]


def test_method_columns():
    assert [s.column for s in parse_methods("gist,rag,full", "none", "2,4")] == \
        ["gist[none,K=2]", "gist[none,K=4]", "rag", "full"]
    assert [s.num_gist for s in parse_methods("gist", "none", "2,4")] == [2, 4]
    assert [s.column for s in parse_methods("full", None, None)] == ["full"]
    chunked = parse_methods("gist,full", "none", "2", "16,32")
    assert [(s.column, s.chunk_tokens) for s in chunked] == \
        [("gist[none,K=2,chunk=16]", 16), ("gist[none,K=2,chunk=32]", 32), ("full", None)]
    layouts = parse_methods("gist", "none", "2", "16", "sequential,compact")
    assert [(s.column, s.chunk_tokens, s.positions) for s in layouts] == \
        [("gist[none,K=2,chunk=16,pos=sequential]", 16, "sequential"),
         ("gist[none,K=2,chunk=16,pos=compact]", 16, "compact")]
    splits = parse_methods("gist,rag", "none", "2", None, None, "fixed,even")
    assert [(s.column, s.chunking) for s in splits] == \
        [("gist[none,K=2,split=fixed]", "fixed"), ("gist[none,K=2,split=even]", "even"), ("rag", None)]
    assert parse_methods("gist", "none", "2")[0].chunking == "fixed"
    dtypes = parse_methods("gist,rag", "none", "2", None, None, None, "fp16,int8")
    assert [(s.column, s.dtype) for s in dtypes] == [("gist[none,K=2,fp16]", "fp16"), ("gist[none,K=2,int8]", "int8"),
                                                     ("rag", "fp16")]
    with pytest.raises(ConfigError, match="unknown blob dtype"):
        parse_methods("gist", "none", "2", None, None, None, "int4")
    with pytest.raises(DataError, match="unknown chunking 'halves'"):
        parse_methods("gist", "none", "2", None, None, "halves")


def test_adapter_columns_are_named_apart(tmp_path):
    """Adapters are labelled by directory name, or, where two share one (two runs' final/), by the path given."""
    import shutil

    from gistctl.gist.adapter import SHIPPED_ADAPTERS

    runs = [tmp_path / "run-a" / "final", tmp_path / "run-b" / "final", tmp_path / "run-b" / "best"]
    for run in runs:
        shutil.copytree(SHIPPED_ADAPTERS / "p0-digits", run)
    specs = parse_methods("gist", ",".join(["default"] + [str(r) for r in runs]))
    assert [s.column for s in specs] == ["gist[default]", f"gist[{runs[0]}]", f"gist[{runs[1]}]", "gist[best]"]
    assert [s.adapter for s in specs] == ["default"] + [str(r) for r in runs]


def test_chunk_columns_keep_k_gists_per_chunk(tiny_model_dir, tmp_path):
    """--chunk-tokens: the same adapter at two chunk lengths; the shorter keeps more gists in a bigger blob."""
    data = write_data(tmp_path / "set.jsonl", 1)
    args = bench_args(tiny_model_dir, data, tmp_path / "run", "--chunk-tokens", "16,64")
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = {r["method"]: r for r in read_rows(tmp_path / "run")}
    short, long = rows["gist[none,K=2,chunk=16]"], rows["gist[none,K=2,chunk=64]"]
    n_tokens = short["document_tokens"]
    assert n_tokens > 64
    for row, chunk in ((short, 16), (long, 64)):
        meta = read_blob_meta(tmp_path / "run" / row["blob"])
        assert meta.chunk_tokens == chunk and row["chunk_tokens"] == chunk
        assert meta.chunking == "fixed" == row["chunking"]  # --adapter none: fixed chunks
        assert meta.num_chunks == -(-n_tokens // chunk)
    assert short["state_bytes"] > long["state_bytes"]


def test_position_columns_store_their_layout(tiny_model_dir, tmp_path):
    """--positions: one column per layout over the same adapter; as many gists, at other positions. (Both read
    even chunks: --chunking reaches the blob and the row.)"""
    data = write_data(tmp_path / "set.jsonl", 1)
    args = bench_args(tiny_model_dir, data, tmp_path / "run", "--chunk-tokens", "16", "--positions",
                      "sequential,compact", "--chunking", "even")
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = {r["method"]: r for r in read_rows(tmp_path / "run")}
    column = "gist[none,K=2,chunk=16,pos={},split=even]".format
    sequential, compact = rows[column("sequential")], rows[column("compact")]
    metas = {name: read_blob_meta(tmp_path / "run" / row["blob"]) for name, row in
             (("sequential", sequential), ("compact", compact))}
    for name, meta in metas.items():
        assert meta.positions == name == rows[column(name)]["positions"]
        assert meta.chunking == "even" == rows[column(name)]["chunking"]
    assert metas["compact"].gist_positions == list(range(metas["compact"].total_gists))
    assert metas["sequential"].next_position == metas["sequential"].document_tokens + metas["sequential"].total_gists
    assert metas["sequential"].total_gists == metas["compact"].total_gists > 2  # same tensors, several chunks


@pytest.mark.parametrize("args, message", [
    (["--data", "{tmp}/missing.jsonl", "--methods", "full"], "does not exist"),
    (["--data", "{data}", "--methods", "gist,nope"], "unknown method 'nope'"),
    (["--data", "{data}", "--methods", "gist", "--adapter", "{tmp}/no-adapter"], "does not exist"),
    (["--data", "{data}", "--methods", "gist", "--gist-sizes", "7"], "gist_7"),
    (["--data", "{data}", "--methods", "gist", "--adapter", "none"], "--num-gist"),
    (["--methods", "full"], "--data"),
    (["--data", "{data}", "--methods", "gist", "--adapter", "none", "--num-gist", "2", "--positions", "diag"],
     "unknown gist position layout"),
    (["--protocol", "other"], "unknown protocol"),
])
def test_user_errors_exit_2(tmp_path, args, message):
    data = write_data(tmp_path / "set.jsonl", 1)
    args = [a.format(tmp=tmp_path, data=data) for a in args]
    result = runner.invoke(app, ["bench", *args, "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_worker_user_error_is_one_line_exit_2(tmp_path):
    data = write_data(tmp_path / "set.jsonl", 1)
    result = runner.invoke(app, ["bench", "--methods", "full", "--model", str(tmp_path / "no-model"), "--device",
                                 "cpu", "--data", str(data), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert "no-model" in result.output and "Traceback" not in result.output


def test_document_too_long_for_full_is_a_failed_row_not_a_crash(tiny_model_dir, tmp_path):
    long = "The passkey is 7K2P9A. " + "Gulls wheel over the grey harbour wall at dusk. " * 200
    write_jsonl(tmp_path / "long.jsonl", [{"id": "long", "task": "passkey", "context": long,
                                            "question": "What is the passkey?", "answers": ["7K2P9A"],
                                            "meta": {"context_tokens": 9000}}])
    result = runner.invoke(app, ["bench", "--methods", "full", "--model", str(tiny_model_dir), "--device", "cpu",
                                 "--data", str(tmp_path / "long.jsonl"), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    (row,) = read_rows(tmp_path / "run")
    assert row["error_stage"] == "answer" and "window" in row["error"] and row["primary"] == 0.0
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())["methods"]["full"]
    assert m["errors"] == 1 and m["accuracy"]["mean"] == 0.0 and m["buckets"][">=8k"]["n"] == 1


def test_a_row_cut_short_by_a_crash_is_dropped(tmp_path):
    from gistctl.bench.runner import load_predictions

    path = tmp_path / "predictions.jsonl"
    path.write_text('{"method": "full", "id": "a"}\n{"method": "full", "id": "b"}\n{"method": "fu')
    assert [r["id"] for r in load_predictions(path)] == ["a", "b"]
    assert path.read_text().count("\n") == 2 and path.read_text().endswith("}\n")
    path.write_text('{"method": "fu\n{"method": "full", "id": "b"}\n')
    with pytest.raises(Exception, match="predictions.jsonl:1"):
        load_predictions(path)


def test_itemized_counts_split_a_wrong_number_into_recall_and_counting(tmp_path):
    from gistctl.bench.itemized import check_itemized, check_run
    from gistctl.data.schema import write_jsonl

    meta = {"question_type": "count", "asked_value": "red", "items": [["1", "red"], ["2", "blue"], ["3", "red"]]}
    right = check_itemized("red, blue, red; red: 2", meta)
    assert right.itemized and right.items_right and right.length_right and right.self_consistent and right.number_right
    miscounted = check_itemized("red, blue, red; red: 3", meta)  # recalled the items, counted them wrong
    assert miscounted.items_right and not miscounted.self_consistent and not miscounted.number_right
    misrecalled = check_itemized("red, blue; red: 1", meta)  # counted what it said, said too few
    assert not misrecalled.items_right and not misrecalled.length_right and misrecalled.self_consistent
    total = {**meta, "question_type": "total", "asked_value": None}
    assert check_itemized("red, blue, blue; all: 3", total).number_right and \
        not check_itemized("red, blue, blue; all: 3", total).items_right
    assert check_itemized("2", meta) == type(right)(itemized=False)

    records = [{"id": f"a{i}", "task": "aggregate", "context": "text", "question": "q", "answers": [a],
                "meta": {**m, "context_tokens": 10, "target_tokens": 10}}
               for i, (a, m) in enumerate([("2", meta), ("3", total), ("blue, red", {"question_type": "list"})])]
    write_jsonl(tmp_path / "agg.jsonl", records)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(f"data: {tmp_path / 'agg.jsonl'}\n")
    rows = [("gist", "a0", "red, blue, red; red: 3"), ("gist", "a1", "red, blue, red; all: 3"),
            ("gist", "a2", "blue, red"), ("rag", "a0", "2"), ("rag", "a1", "3")]
    (tmp_path / "run" / "predictions.jsonl").write_text("".join(
        json.dumps({"method": m, "id": i, "task": "aggregate", "prediction": p}) + "\n" for m, i, p in rows))
    table = check_run(tmp_path / "run")
    assert table["gist"]["count"] == {"n": 1, "itemized": 1, "items_right": 1, "length_right": 1,
                                      "self_consistent": 0, "number_right": 0}
    assert table["gist"]["total"]["number_right"] == 1 and "list" not in table["gist"]
    assert table["rag"]["count"] == {"n": 1, "itemized": 0, "items_right": 0, "length_right": 0,
                                     "self_consistent": 0, "number_right": 0}


def test_list_recall_split_by_how_often_the_document_mentions_each_value(tmp_path, capsys):
    from gistctl.bench.lists import check_run, named_values, recall_by_mentions, repeats_an_item
    from gistctl.data.schema import write_jsonl

    items = [["1", "wren"], ["2", "plover"], ["3", "wren"], ["4", "heron"], ["5", "wren"], ["6", "plover"]]
    meta = {"question_type": "list", "family": "birds", "items": items}  # heron once, plover twice, wren 3 times
    assert recall_by_mentions("plover, plover", meta) == {"1": (0, 1), "2": (1, 1), "3+": (0, 1)}
    assert recall_by_mentions("Heron, plover and wren.", meta) == {"1": (1, 1), "2": (1, 1), "3+": (1, 1)}
    assert repeats_an_item("plover, Plover.") and not repeats_an_item("heron, plover") and not repeats_an_item("")
    assert named_values("heron, finch, plover, finch, swimming", meta) == (3, 1)  # finch is not in the document
    assert named_values("I do not know.", meta) == (0, 0)

    records = [{"id": "a0", "task": "aggregate", "context": "text", "question": "q", "answers": ["heron, plover, wren"],
                "meta": {**meta, "context_tokens": 10, "target_tokens": 10}},
               {"id": "a1", "task": "aggregate", "context": "text", "question": "q", "answers": ["1"],
                "meta": {"question_type": "count", "asked_value": "wren", "items": items, "context_tokens": 10,
                         "target_tokens": 10}}]
    write_jsonl(tmp_path / "agg.jsonl", records)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(f"data: {tmp_path / 'agg.jsonl'}\n")
    rows = [("gist", "a0", "wren, wren, kestrel"), ("gist", "a1", "3"), ("rag", "a0", "heron, plover")]
    (tmp_path / "run" / "predictions.jsonl").write_text("".join(
        json.dumps({"method": m, "id": i, "task": "aggregate", "prediction": p}) + "\n" for m, i, p in rows))
    table = check_run(tmp_path / "run")
    assert table["gist"] == {"answers": 1, "repeats": 1, "named": 2, "named_wrong": 1, "recalled_1": 0,
                             "values_1": 1, "recalled_2": 0, "values_2": 1, "recalled_3+": 1, "values_3+": 1}
    assert table["rag"]["recalled_1"] == 1 and table["rag"]["recalled_3+"] == 0 and table["rag"]["repeats"] == 0
    result = runner.invoke(app, ["analyze", "lists", str(tmp_path / "run")])
    assert result.exit_code == 0 and "gist\t1\t1\t2\t1\t0/1\t0/1\t1/1" in result.output
    result = runner.invoke(app, ["analyze", "lists", str(tmp_path)])  # not a bench run: one line, exit 2
    assert result.exit_code == 2 and "not a bench run directory" in result.output


def test_dtype_columns_store_int8_blobs(tiny_model_dir, tmp_path):
    """--dtypes fp16,int8: one gist column per blob dtype, each blob in its dtype (sizes: test_kv, int8)."""
    data = write_data(tmp_path / "set.jsonl", 2)
    result = runner.invoke(app, bench_args(tiny_model_dir, data, tmp_path / "run", "--dtypes", "fp16,int8"))
    assert result.exit_code == 0, result.output
    rows = read_rows(tmp_path / "run")
    by_column = {}
    for row in rows:
        by_column.setdefault(row["method"], []).append(row)
    half, int8 = by_column["gist[none,K=2,fp16]"], by_column["gist[none,K=2,int8]"]
    assert {r["dtype"] for r in int8} == {"int8"} and {r["dtype"] for r in half} == {"fp16"}
    from gistctl.kv.blob import read_blob

    assert read_blob(tmp_path / "run" / int8[0]["blob"]).keys.dtype.is_floating_point is False
    for a, b in zip(sorted(half, key=lambda r: r["id"]), sorted(int8, key=lambda r: r["id"])):
        # like for like: each blob is compared with the full KV at its own dtype
        assert b["full_kv_bytes"] * 2 == a["full_kv_bytes"]
        assert b["compression_ratio"] == pytest.approx(b["full_kv_bytes"] / b["state_bytes"])


@pytest.fixture(scope="module")
def tiny_reader(tiny_model_dir, tmp_path_factory):
    """A full-context reader adapter for the tiny model, 20 steps on the first two examples."""
    from gistctl.config import load_config
    from gistctl.train.loop import train

    root = tmp_path_factory.mktemp("reader")
    data = write_data(root / "set.jsonl", 2)
    config = load_config(None, {"model.name": str(tiny_model_dir), "model.device": "cpu", "gist.num_gist": 2,
                                "train.data": str(data), "train.batch_size": 2, "train.max_steps": 20,
                                "train.lr": 1e-2, "train.reader": "full", "train.bf16": False, "lora.r": 4,
                                "lora.alpha": 8})
    return train(config, root / "train").final_dir


def test_full_lora_column_reads_with_the_reader_adapter_and_reports_retention(tiny_model_dir, tiny_reader, tmp_path):
    """A full+lora column runs in its worker with the reader adapter merged: its answers are those of
    `open_text_method('full', adapter=...)`, unlike the plain full column's, and the report has retention."""
    from gistctl.data.schema import read_jsonl
    from gistctl.engine import open_text_method

    data, reader = write_data(tmp_path / "set.jsonl", 2), tiny_reader
    result = runner.invoke(app, ["bench", "--methods", "gist,full,full+lora", "--adapter", "none", "--num-gist", "2",
                                 "--reader-adapter", str(reader), "--model", str(tiny_model_dir), "--device", "cpu",
                                 "--max-new-tokens", "4", "--data", str(data), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    rows = {(r["method"], r["id"]): r for r in read_rows(tmp_path / "run")}
    tuned = open_text_method("full", model=str(tiny_model_dir), adapter=str(reader), device="cpu", max_new_tokens=4)
    base = open_text_method("full", model=str(tiny_model_dir), device="cpu", max_new_tokens=4)
    differs = False
    for record in read_jsonl(data):
        want = tuned.answer(tuned.prepare(record["context"]), record["question"]).text
        assert rows[("full+lora", record["id"])]["prediction"] == want
        differs |= want != base.answer(base.prepare(record["context"]), record["question"]).text
    assert differs
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["retention"]["ceiling"] == "full+lora"
    assert "gist[none,K=2]" in metrics["retention"]["columns"]
    assert "retention gist[none,K=2] / full+lora" in result.output


def test_press_compress_cost_is_reported_against_its_own_prefill_per_document():
    costs = ((2.0, 5.8), (1.0, 3.2), (4.0, 10.0))  # (prefill_s, prepare_s): 2.9x, 3.2x, 2.5x
    rows = [{"method": "kvzip[0.75,fp16]", "kind": "press", "dtype": "fp16", "id": f"p{i}", "task": "qa",
             "primary": 0.5, "prefill_s": pre, "prepare_s": prep, "document_tokens": 1000, "state_bytes": 2048,
             "compression_ratio": 4.0, "kept_fraction": 0.25, "ttft_ms": 10.0} for i, (pre, prep) in enumerate(costs)]
    rows.append({**rows[0], "id": "gone", "error": "too long", "prefill_s": 1.0, "prepare_s": 100.0})  # not counted
    m = summarize(rows, ["kvzip[0.75,fp16]"])["methods"]["kvzip[0.75,fp16]"]
    assert m["prepare_x_prefill"] == {"median": pytest.approx(2.9), "min": pytest.approx(2.5),
                                      "max": pytest.approx(3.2), "n": 3}
    table = render_markdown({**summarize(rows, ["kvzip[0.75,fp16]"]), "data": "d", "model": "m", "device": "cpu"})
    assert "| 2.90 (2.50–3.20) |" in table and "x prefill" in table


def test_press_columns_bench_end_to_end_beside_their_reader(tiny_model_dir, tiny_reader, tmp_path):
    """kvzip and streaming at two ratios and two dtypes, read with a full reader: one worker for the presses,
    ratio 0 answers exactly as full+lora, kept shares and bytes follow the ratio and dtype, the frontier is drawn."""
    data, run_dir = write_data(tmp_path / "set.jsonl"), tmp_path / "run"
    result = runner.invoke(app, ["bench", "--methods", "kvzip,streaming,full+lora", "--ratios", "0,0.5",
                                 "--dtypes", "fp16,int8", "--reader-adapter", str(tiny_reader), "--model",
                                 str(tiny_model_dir), "--device", "cpu", "--max-new-tokens", "3", "--data", str(data),
                                 "--run-dir", str(run_dir)])
    assert result.exit_code == 0, result.output
    rows = read_rows(run_dir)
    by = {(r["method"], r["id"]): r for r in rows}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    presses = [c for c in metrics["columns"] if metrics["methods"][c]["kind"] == "press"]
    assert len(presses) == 8 and len(rows) == 9 * 3
    for i in range(3):
        full = by[("full+lora", f"ex-{i}")]
        for press in ("kvzip", "streaming"):
            whole = by[(f"{press}[0,fp16]", f"ex-{i}")]
            assert whole["prediction"] == full["prediction"]  # ratio 0 keeps the whole cache
            half, half8 = by[(f"{press}[0.5,fp16]", f"ex-{i}")], by[(f"{press}[0.5,int8]", f"ex-{i}")]
            # entries over the document's tokens: the template's head is stored too, so ratio 0 is a little over 1
            assert 1 < whole["kept_fraction"] < 1.1
            assert half["kept_fraction"] == pytest.approx(whole["kept_fraction"] / 2, abs=0.02)
            assert half8["state_bytes"] < 0.7 * half["state_bytes"] < 0.7 * whole["state_bytes"]
            assert half["prefill_s"] > 0 and half["prepare_s"] >= half["prefill_s"]
    workers = sorted(p.name for p in (run_dir / "workers").glob("*.log"))
    assert len(workers) == 2, workers  # every press column of one reader shares one worker (one prefill each)
    report = (run_dir / "report.md").read_text()
    assert "## Frontier (compressed columns)" in report and "| kvzip[0.5,int8] | int8 |" in report
    assert (run_dir / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
