"""The public Python API (`gistctl.load`, `Gistctl.compress`, `Gistctl.ask`, `Blob`), and the README's snippet."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gistctl
from gistctl.errors import BlobError, DataError
from gistctl.kv.answer import answer_from_blob
from gistctl.kv.sizes import kv_cache_bytes

ROOT = Path(__file__).resolve().parents[1]
TEXT = "Ada keeps the lighthouse on Marrow Island. The call sign of the radio room is MRW-7. " * 6


@pytest.fixture(scope="module")
def tiny_gc(tiny_model_dir):
    return gistctl.load(model=str(tiny_model_dir), adapter="none", num_gist=2, chunk_tokens=32, device="cpu")


def test_compress_save_load_ask_through_the_api(tiny_gc, tmp_path):
    blob = tiny_gc.compress(TEXT)
    layers, kv_heads, head_dim = blob.meta.layers, blob.meta.kv_heads, blob.meta.head_dim
    assert blob.keys.shape == (layers, kv_heads, 2 * blob.meta.num_chunks, head_dim) == blob.values.shape
    assert blob.meta.num_chunks > 1 and blob.keys.dtype == torch.float16
    assert blob.nbytes == 2 * blob.keys.numel() * 2
    assert blob.stats.document_tokens == blob.meta.document_tokens
    # like for like: the full KV at the blob's dtype, from the model config
    config = tiny_gc.gist_model.model.config
    assert blob.meta.full_kv_bytes == kv_cache_bytes(config, blob.meta.document_tokens, 2)
    size = blob.save(tmp_path / "doc.kv")
    assert size == (tmp_path / "doc.kv").stat().st_size > blob.nbytes
    again = gistctl.Blob.load(tmp_path / "doc.kv")
    assert torch.equal(again.keys, blob.keys) and torch.equal(again.values, blob.values)

    from_path = tiny_gc.ask(tmp_path / "doc.kv", "What is the call sign?", max_new_tokens=4)
    assert isinstance(from_path, gistctl.Answer) and isinstance(from_path.text, str)
    assert from_path.ttft_ms > 0
    # the answer is the blob's greedy answer, whether the blob is given as a path, an object or in a list
    direct = answer_from_blob(tiny_gc.gist_model, again, "What is the call sign?", max_new_tokens=4)
    several = tiny_gc.ask(blob, ["What is the call sign?", "Who keeps it?"], max_new_tokens=4)
    assert [a.text for a in several][0] == from_path.text == direct.text
    assert len(several) == 2 and all(isinstance(a.text, str) for a in several)


def test_ask_refuses_what_it_cannot_answer(tiny_gc, tmp_path):
    with pytest.raises(BlobError, match="does not exist"):
        tiny_gc.ask(tmp_path / "missing.kv", "Q?")
    blob = tiny_gc.compress(TEXT)
    with pytest.raises(DataError, match="at least one question"):
        tiny_gc.ask(blob, [])
    blob.meta.adapter_fingerprint = "0" * 64  # as if made with another adapter
    with pytest.raises(BlobError, match="was made with"):
        tiny_gc.ask(blob, "Q?")


def readme_python_snippet() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_readme_python_snippet_runs_as_written(tmp_path):
    """README's Python API example, run as written in a fresh interpreter on the bundled example."""
    snippet = readme_python_snippet()
    assert "gistctl.load()" in snippet and "gc.compress(" in snippet and "gc.ask(" in snippet
    (tmp_path / "doc.txt").write_text((ROOT / "examples" / "lighthouse.txt").read_text(encoding="utf-8"))
    script = snippet + "\nassert isinstance(ans.text, str) and ans.text\nprint('TTFT', float(ans.ttft_ms))\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"TTFT \d+\.\d+", done.stdout)
    assert (tmp_path / "doc.kv").is_file()
