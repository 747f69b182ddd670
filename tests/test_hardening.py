"""What a bad-input and crash sweep broke, each now refused in one line (exit 2) or survived: crafted pickles,
blank or oversize questions, unwritable outputs, killed benches, escaping adapter names, stale temp files,
run folders made before a refusal, tokenizers without a chat template, documents with no text."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gistctl.cli.main import app
from gistctl.data.schema import write_jsonl

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
DOC = "Ada Lindqvist keeps the lighthouse. The call sign of the radio room is MRW-7. " * 4


def one_line_exit_2(result, pattern: str) -> None:
    import re

    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert re.search(pattern, result.output), result.output


@pytest.fixture
def tiny_blob(tiny_model_dir, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC)
    result = runner.invoke(app, ["compress", str(doc), "--model", str(tiny_model_dir), "--adapter", "none",
                                 "--num-gist", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return tmp_path / "doc.kv"


# 1: a crafted training_state.pt runs nothing -------------------------------------------------------------------

class _Payload:
    """Unpickling this makes the marker directory: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_crafted_pickle_in_a_checkpoint_is_refused_and_runs_nothing(tiny_model_dir, tmp_path):
    from test_train import passkey_records

    data = tmp_path / "train.jsonl"
    write_jsonl(data, passkey_records())
    run = tmp_path / "run"
    args = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--num-gist", "2", "--max-steps", "4",
            "--batch-size", "2", "--device", "cpu", "--run-dir", str(run), "--stop-after", "2"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    step = run / "step-000002"
    assert (step / "training_state.json").is_file() and (step / "training_state.safetensors").is_file()
    assert not list(run.rglob("*.pt"))  # nothing gistctl writes for itself is a pickle
    marker = tmp_path / "marker"
    (step / "training_state.pt").write_bytes(pickle.dumps(_Payload(marker)))
    # beside the real state, the pickle is never read
    resumed = runner.invoke(app, ["train", "--run-dir", str(run), "--resume", "--stop-after", "1"])
    assert resumed.exit_code == 0, resumed.output
    assert not marker.exists()
    # alone (an old-style checkpoint), it is refused in one line
    latest = run / "step-000003"
    for name in ("training_state.json", "training_state.safetensors"):
        (latest / name).unlink()
    (latest / "training_state.pt").write_bytes(pickle.dumps(_Payload(marker)))
    refused = runner.invoke(app, ["train", "--run-dir", str(run), "--resume"])
    one_line_exit_2(refused, "never unpickles")
    assert not marker.exists()


def test_training_state_round_trips_without_pickle(tmp_path):
    import random

    import torch

    from gistctl.train.state import load_training_state, save_training_state

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    state = {"optimizer": optimizer.state_dict(), "rng": {"python": random.getstate(), "torch": torch.get_rng_state()},
             "step": 3, "history": [{"loss": float("inf")}], "best": None}
    save_training_state(tmp_path, state)
    back = load_training_state(tmp_path)
    assert back["rng"]["python"] == state["rng"]["python"]  # tuples come back as tuples
    assert torch.equal(back["rng"]["torch"], state["rng"]["torch"])
    assert back["history"] == state["history"] and back["step"] == 3 and back["best"] is None
    restored = torch.optim.AdamW(model.parameters(), lr=1e-3)
    restored.load_state_dict(back["optimizer"])
    for a, b in zip(restored.state_dict()["state"].values(), optimizer.state_dict()["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)


# 5, 6: blank questions, questions past the window ----------------------------------------------------------------

@pytest.mark.parametrize("question", ["", "   ", "\x00\n"])
def test_blank_question_is_refused(tiny_blob, tiny_model_dir, question):
    one_line_exit_2(runner.invoke(app, ["ask", str(tiny_blob), question]), "question is blank")
    doc = tiny_blob.with_suffix(".txt")
    one_line_exit_2(runner.invoke(app, ["ask", "--method", "full", "--model", str(tiny_model_dir), str(doc), question]),
                    "question is blank")


def test_question_past_the_window_is_refused_on_the_gist_path(tiny_blob):
    question = "Why is the sky blue? " * 200  # the tiny model's window is 512 positions
    one_line_exit_2(runner.invoke(app, ["ask", str(tiny_blob), question]), "window allows 512")


def test_bad_blob_fails_before_the_model_loads(tiny_blob):
    raw = bytearray(tiny_blob.read_bytes())
    raw[-3] ^= 0xFF
    tiny_blob.write_bytes(bytes(raw))
    # a model that does not exist would fail to load: the blob's own error comes first
    result = runner.invoke(app, ["ask", str(tiny_blob), "Who?", "--model", "/nonexistent/model"])
    one_line_exit_2(result, "checksum mismatch")


# 7: outputs that cannot be written ---------------------------------------------------------------------------------

def test_compress_output_checked_before_the_work(tiny_model_dir, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC)
    (tmp_path / "isdir").mkdir()
    # --model would fail to load: the output's error comes first, so it is checked before any work
    base = ["compress", str(doc), "--model", "/nonexistent/model"]
    one_line_exit_2(runner.invoke(app, [*base, "-o", str(tmp_path / "isdir")]), "is a directory")
    (tmp_path / "afile").write_text("x")
    one_line_exit_2(runner.invoke(app, [*base, "-o", str(tmp_path / "afile" / "doc.kv")]), "is not a directory")


def test_write_errors_are_one_line(tiny_model_dir, tmp_path, monkeypatch):
    import errno

    import gistctl.runs

    doc = tmp_path / "doc.txt"
    doc.write_text(DOC)

    def read_only(*_):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(gistctl.runs.os, "replace", read_only)
    result = runner.invoke(app, ["compress", str(doc), "--model", str(tiny_model_dir), "--adapter", "none",
                                 "--num-gist", "2", "-o", str(tmp_path / "out.kv")])
    one_line_exit_2(result, "cannot write blob .*Read-only file system")
    assert not list(tmp_path.glob(".out.kv*"))  # the temp file went with the error


# 8: a killed bench ---------------------------------------------------------------------------------------------------

def _gistctl(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gistctl", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def _workers_of(run: Path) -> list[int]:
    """Pids of live bench workers of this run (their command line names its job file)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
                state = (proc / "stat").read_text().split()[2]
            except OSError:
                continue
            if "gistctl.bench.worker" in cmdline and str(run) in cmdline and state != "Z":
                pids.append(int(proc.name))
    return pids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc to find the worker")
def test_killed_bench_leaves_no_worker_and_resumes_without_duplicates(tiny_model_dir, tmp_path):
    n = 300
    records = [{"id": f"pk-{i}", "task": "passkey", "context": f"The pass key is K{i:05d}. " + "Grass is green. " * 8,
                "question": "What is the pass key?", "answers": [f"K{i:05d}"], "meta": {}} for i in range(n)]
    data = tmp_path / "set.jsonl"
    write_jsonl(data, records)
    run = tmp_path / "run"
    args = ["bench", "--methods", "gist", "--adapter", "none", "--num-gist", "2", "--model", str(tiny_model_dir),
            "--device", "cpu", "--max-new-tokens", "2", "--data", str(data), "--run-dir", str(run)]
    bench = _gistctl(*args)
    predictions = run / "predictions.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (predictions.is_file() and predictions.read_text().count("\n") >= 3):
        time.sleep(0.05)
    assert predictions.is_file(), "the bench wrote no row in time"
    # a second bench on the same run folder is refused while the first runs
    second = _gistctl(*args)
    out, _ = second.communicate(timeout=120)
    assert second.returncode == 2 and "is in use" in out, out
    assert bench.poll() is None, "the first bench finished before it could be killed; give it more examples"
    workers = _workers_of(run)
    assert len(workers) == 1
    # freeze the worker mid-run (as if busy with a long example), then kill the bench: the worker must not
    # outlive it (before, it went on and wrote a row beside the rerun's)
    os.kill(workers[0], signal.SIGSTOP)
    try:
        bench.send_signal(signal.SIGKILL)
        bench.wait()
        deadline = time.time() + 10
        while time.time() < deadline and _workers_of(run):
            time.sleep(0.1)
        assert _workers_of(run) == []  # the worker died with its bench
    finally:
        for pid in _workers_of(run):
            os.kill(pid, signal.SIGKILL)
    again = _gistctl(*args)
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out[-2000:]
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    keys = [(r["method"], r["id"]) for r in rows]
    assert len(keys) == len(set(keys)) == n


def test_resume_drops_rows_repeated_by_an_older_killed_bench(tmp_path):
    from gistctl.bench.runner import dedupe_predictions

    rows = [{"method": "gist", "id": "a", "primary": 1.0}, {"method": "gist", "id": "b", "primary": 0.0},
            {"method": "gist", "id": "a", "primary": 0.0}, {"method": "full", "id": "a", "primary": 1.0}]
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert dedupe_predictions(path) == 1
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert kept == [rows[0], rows[1], rows[3]]  # the first row of each (column, example) stays


# 9: adapter names never escape the shipped folder; shipped adapters are recorded by name ---------------------------

def test_adapter_name_with_dots_is_a_path_not_a_shipped_name(tmp_path, monkeypatch):
    from gistctl.errors import ModelLoadError
    from gistctl.gist.adapter import SHIPPED_ADAPTERS, resolve_adapter

    monkeypatch.chdir(tmp_path)
    escaping = "../adapters/default"  # from the shipped folder this leads back into it: resolved there before
    assert (SHIPPED_ADAPTERS / escaping / "gist.json").is_file()
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_adapter(escaping)
    assert resolve_adapter("default") == SHIPPED_ADAPTERS / "default"


def test_blob_records_a_shipped_adapter_by_name(tiny_model_dir, tmp_path, monkeypatch):
    import gistctl.gist.adapter as adapter_module
    from gistctl.engine import load, load_for_blob
    from gistctl.gist.adapter import save_adapter
    from gistctl.gist.tokens import add_gist_tokens
    from gistctl.models import load_model
    from gistctl.config import LoraSettings
    from gistctl.train.lora import wrap_with_lora

    shipped = tmp_path / "install-1" / "adapters"
    loaded = load_model(str(tiny_model_dir), device="cpu")
    gist_ids = add_gist_tokens(loaded.model, loaded.tokenizer, 2)
    save_adapter(wrap_with_lora(loaded.model, gist_ids, LoraSettings(r=2, alpha=4)), loaded, gist_ids, 64,
                 shipped / "tiny")
    monkeypatch.setattr(adapter_module, "SHIPPED_ADAPTERS", shipped)
    blob = load(str(tiny_model_dir), "tiny", device="cpu").compress(DOC)
    assert blob.meta.adapter == "tiny"
    blob.save(tmp_path / "doc.kv")
    # the install moves: the blob still names its adapter, found in the new install
    os.rename(tmp_path / "install-1", tmp_path / "install-2")
    monkeypatch.setattr(adapter_module, "SHIPPED_ADAPTERS", tmp_path / "install-2" / "adapters")
    (tmp_path / "cwd" / "tiny").mkdir(parents=True)  # a folder of the same name where the user stands is not it
    monkeypatch.chdir(tmp_path / "cwd")
    gc = load_for_blob(tmp_path / "doc.kv", device="cpu")
    assert isinstance(gc.ask(tmp_path / "doc.kv", "Who keeps it?", max_new_tokens=2).text, str)


# 10: temp files of killed writes ---------------------------------------------------------------------------------------

def test_a_write_killed_before_its_rename_leaves_nothing_after_the_next_write(tmp_path):
    target = tmp_path / "doc.kv"
    script = ("import os, sys; from gistctl.runs import atomic_path\n"
              "with atomic_path(sys.argv[1]) as tmp:\n"
              "    tmp.write_bytes(b'x' * 4096)\n"
              "    os._exit(9)  # killed between the write and the rename\n")
    done = subprocess.run([sys.executable, "-c", script, str(target)], cwd=ROOT)
    assert done.returncode == 9
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".doc.kv.") and not target.exists()
    legacy = tmp_path / ".doc.kv.ab12cd34.tmp"  # gistctl < 0.2's name, no pid in it
    legacy.write_bytes(b"old")
    os.utime(legacy, (time.time() - 3600, time.time() - 3600))
    live = tmp_path / f".doc.kv.{os.getpid()}.zzzz1234.tmp"  # a writer still running: its file stays
    live.write_bytes(b"busy")
    from gistctl.runs import atomic_write_bytes

    atomic_write_bytes(target, b"done")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["doc.kv", live.name])


# 11: refusals before the run folder exists ---------------------------------------------------------------------------

def test_4bit_on_cpu_is_refused_before_a_run_folder_is_made(tiny_model_dir, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine can load in 4-bit")
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "--model", str(tiny_model_dir), "--load-in-4bit", "--run-dir", str(run),
                                 "--data", str(ROOT / "examples" / "lighthouse.txt")])
    one_line_exit_2(result, "CUDA")
    assert not run.exists()


# 12: a tokenizer without a chat template -----------------------------------------------------------------------------

def test_model_without_chat_template_is_one_line(tiny_model_dir, tmp_path):
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(tiny_model_dir, plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in plain.glob("chat_template.*"):
        extra.unlink()
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC)
    result = runner.invoke(app, ["ask", "--method", "full", "--model", str(plain), str(doc), "Who?"])
    one_line_exit_2(result, "no chat template")
    assert str(plain) in result.output


# 13: a document with no text -------------------------------------------------------------------------------------------

def test_document_of_nul_bytes_is_refused(tiny_model_dir, tmp_path):
    doc = tmp_path / "nul.txt"
    doc.write_bytes(b"\x00" * 5000)
    result = runner.invoke(app, ["compress", str(doc), "--model", str(tiny_model_dir), "--adapter", "none",
                                 "--num-gist", "2"])
    one_line_exit_2(result, "no text")
    assert not (tmp_path / "nul.kv").exists()
