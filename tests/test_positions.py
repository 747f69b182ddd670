"""Gist position layouts: re-rotating stored keys, compact vs sequential blobs, choosing a layout."""

import json

import pytest
import torch
from typer.testing import CliRunner

from gistctl import prompt
from gistctl.cli.main import app
from gistctl.errors import DataError
from gistctl.gist.adapter import GIST_META, read_adapter_meta, save_adapter
from gistctl.gist.model import load_gist_model
from gistctl.train.lora import wrap_with_lora
from gistctl.config import LoraSettings
from gistctl.kv.answer import answer_from_blob
from gistctl.kv.blob import read_blob, write_blob
from gistctl.kv.compress import compress_document
from gistctl.gist.positions import (AUTO, AUTO_SEQUENTIAL_CHUNKS, COMPACT, SEQUENTIAL, layout_for, rope_inv_freq,
                                  rotate_keys)
from gistctl.models import load_model

DOC = ("Marrow Island lies eleven miles off the northern coast. The lighthouse is kept by Ada Lindqvist. "
       "Its radio call sign is MRW-7 and the supply boat is the Saint Brendan. ") * 2
QUESTION = "What is the call sign?"


def gist_model(model_dir, chunk_tokens=1024, k=3, positions=SEQUENTIAL, dtype=torch.float32):
    loaded = load_model(str(model_dir), device="cpu")
    loaded.model.to(dtype)
    gm = load_gist_model(loaded, None, num_gist=k, chunk_tokens=chunk_tokens)
    torch.manual_seed(0)
    with torch.no_grad():  # distinct gist rows, so a wrong gist order or position would show
        gm.model.get_input_embeddings().weight[gm.gist_ids] += torch.randn(k, gm.model.config.hidden_size).to(dtype)
    gm.positions = positions
    return gm


@torch.no_grad()
def layer_keys(model, ids, start):
    out = model(input_ids=torch.tensor([ids]), position_ids=torch.arange(start, start + len(ids))[None],
                use_cache=True)
    return [layer.keys for layer in out.cache.layers]


@pytest.mark.parametrize("delta", [37, -37])
def test_rotating_keys_equals_reading_the_text_at_shifted_positions(tiny_model_dir, delta):
    """RoPE attention depends on distances only, so reading the same text `delta` positions later gives
    every layer's keys turned by delta: what rotate_keys computes. The model itself computes RoPE angles in
    float32 (about 1e-5 off at these positions), hence the tolerance; a wrong turn is off by O(1)."""
    gm = gist_model(tiny_model_dir, dtype=torch.float64)
    ids = prompt.context_ids(gm.tokenizer, DOC)[:40] + gm.gist_ids
    base = 50
    here, there = layer_keys(gm.model, ids, base), layer_keys(gm.model, ids, base + delta)
    inv_freq = rope_inv_freq(gm.model)
    for keys, shifted in zip(here, there):
        assert not torch.allclose(keys, shifted, atol=1e-3)  # the positions do change the keys
        torch.testing.assert_close(rotate_keys(keys, delta, inv_freq), shifted, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(rotate_keys(keys, -delta, inv_freq), shifted, atol=1e-2)


def test_one_chunk_compact_blob_answers_like_sequential(tiny_model_dir):
    """One chunk: the compact layout moves the gists and the question together, so nothing changes."""
    gm = gist_model(tiny_model_dir)
    sequential, _ = compress_document(gm, DOC, dtype="fp32")
    gm.positions = COMPACT
    compact, _ = compress_document(gm, DOC, dtype="fp32")
    k = gm.num_gist
    assert compact.meta.positions == COMPACT and sequential.meta.positions == SEQUENTIAL
    assert compact.meta.gist_positions == list(range(k)) and compact.meta.next_position == k
    assert sequential.meta.next_position == sequential.meta.document_tokens + k
    assert not torch.allclose(compact.keys, sequential.keys, atol=1e-3)  # the stored keys did move
    torch.testing.assert_close(compact.values, sequential.values)
    a = answer_from_blob(gm, compact, QUESTION, max_new_tokens=6)
    b = answer_from_blob(gm, sequential, QUESTION, max_new_tokens=6)
    torch.testing.assert_close(a.first_logits, b.first_logits, atol=1e-4, rtol=1e-4)
    assert a.token_ids == b.token_ids


def test_multi_chunk_compact_blob_keeps_gists_contiguous(tiny_model_dir, tmp_path):
    """Several chunks: the gists sit at 0 .. n x K - 1 and the question right after them; chunk 1's gists
    are the sequential blob's moved back over their chunk; later chunks read the earlier gists nearer, so
    they differ from the sequential blob."""
    gm = gist_model(tiny_model_dir, chunk_tokens=16)
    sequential, _ = compress_document(gm, DOC, dtype="fp32")
    gm.positions = COMPACT
    compact, _ = compress_document(gm, DOC, dtype="fp32")
    k, n = gm.num_gist, compact.meta.num_chunks
    assert n > 2 and compact.meta.gist_positions == list(range(n * k)) and compact.meta.next_position == n * k
    first = rotate_keys(sequential.keys[:, :, :k], -16, rope_inv_freq(gm.model))
    torch.testing.assert_close(compact.keys[:, :, :k], first, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compact.values[:, :, :k], sequential.values[:, :, :k], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(compact.values[:, :, k:], sequential.values[:, :, k:], atol=1e-4)
    write_blob(compact, tmp_path / "doc.kv")  # the layout travels with the blob and answers from disk alike
    from_disk = read_blob(tmp_path / "doc.kv")
    assert from_disk.meta.positions == COMPACT
    torch.testing.assert_close(answer_from_blob(gm, from_disk, QUESTION, max_new_tokens=1).first_logits,
                               answer_from_blob(gm, compact, QUESTION, max_new_tokens=1).first_logits)


@pytest.mark.parametrize("layout", [COMPACT, AUTO])
def test_compact_layout_reads_documents_longer_than_the_window(tiny_model_dir, layout):
    gm = gist_model(tiny_model_dir, chunk_tokens=64)
    text = "word " * 700  # 2,100 tokens; the tiny model's window is 512 positions
    with pytest.raises(DataError, match="--positions compact"):
        compress_document(gm, text)
    gm.positions = layout
    blob, stats = compress_document(gm, text)
    assert stats.document_tokens > 512 and blob.meta.next_position == blob.meta.total_gists < 512
    assert blob.meta.positions == COMPACT


def test_auto_layout_is_chosen_by_the_number_of_chunks():
    assert [layout_for(AUTO, n) for n in (1, AUTO_SEQUENTIAL_CHUNKS, AUTO_SEQUENTIAL_CHUNKS + 1, 8)] == [
        SEQUENTIAL, SEQUENTIAL, COMPACT, COMPACT]
    assert layout_for(SEQUENTIAL, 8) == SEQUENTIAL and layout_for(COMPACT, 1) == COMPACT
    with pytest.raises(DataError, match="unknown gist position layout 'diagonal'"):
        layout_for("diagonal", 1)


@pytest.mark.parametrize("chunks, expected", [(AUTO_SEQUENTIAL_CHUNKS, SEQUENTIAL),
                                              (AUTO_SEQUENTIAL_CHUNKS + 1, COMPACT)])
def test_auto_blob_is_the_blob_of_the_layout_it_chooses(tiny_model_dir, chunks, expected):
    """Under auto a document of up to AUTO_SEQUENTIAL_CHUNKS chunks is read sequentially, a longer one
    compact: the blob equals that layout's blob (and records it), and differs from the other layout's."""
    gm = gist_model(tiny_model_dir, chunk_tokens=16)
    ids = prompt.context_ids(gm.tokenizer, DOC)
    assert len(ids) > 16 * (AUTO_SEQUENTIAL_CHUNKS + 1)
    text = gm.tokenizer.decode(ids[: 16 * chunks])
    assert -(-len(prompt.context_ids(gm.tokenizer, text)) // 16) == chunks  # the decoded text re-reads as chunks
    blobs = {}
    for layout in (SEQUENTIAL, COMPACT, AUTO):
        gm.positions = layout
        blobs[layout], _ = compress_document(gm, text, dtype="fp32")
    auto, chosen = blobs[AUTO], blobs[expected]
    other = blobs[COMPACT if expected == SEQUENTIAL else SEQUENTIAL]
    assert auto.meta.num_chunks == chunks and auto.meta.positions == expected
    assert auto.meta.gist_positions == chosen.meta.gist_positions != other.meta.gist_positions
    assert torch.equal(auto.keys, chosen.keys) and torch.equal(auto.values, chosen.values)
    assert not torch.allclose(auto.keys, other.keys, atol=1e-3)


def test_rope_that_depends_on_length_is_refused(tiny_model_dir):
    gm = gist_model(tiny_model_dir)
    rotary = next(m for m in gm.model.modules() if type(m).__name__.endswith("RotaryEmbedding"))
    rotary.rope_type = "dynamic"
    gm.positions = COMPACT
    with pytest.raises(DataError, match="static RoPE"):
        compress_document(gm, DOC)


def test_compress_cli_positions(tiny_model_dir, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC)
    base = ["compress", str(doc), "--model", str(tiny_model_dir), "--adapter", "none", "--num-gist", "3",
            "--chunk-tokens", "16"]
    result = CliRunner().invoke(app, base + ["--positions", "compact", "-o", str(tmp_path / "c.kv")])
    assert result.exit_code == 0, result.output
    assert "positions compact" in result.output and read_blob(tmp_path / "c.kv").meta.positions == COMPACT
    result = CliRunner().invoke(app, base + ["--positions", "auto", "-o", str(tmp_path / "a.kv")])
    assert result.exit_code == 0, result.output  # DOC is more than two 16-token chunks: read compact
    assert "positions compact (auto)" in result.output and read_blob(tmp_path / "a.kv").meta.positions == COMPACT
    bad = CliRunner().invoke(app, base + ["--positions", "diagonal"])
    assert bad.exit_code == 2 and "unknown gist position layout 'diagonal'" in bad.output
    result = CliRunner().invoke(app, base + ["--chunking", "even", "-o", str(tmp_path / "e.kv")])
    assert result.exit_code == 0, result.output
    assert "split even" in result.output and read_blob(tmp_path / "e.kv").meta.chunking == "even"
    assert read_blob(tmp_path / "c.kv").meta.chunking == "fixed"
    bad = CliRunner().invoke(app, base + ["--chunking", "halves"])
    assert bad.exit_code == 2 and "unknown chunking 'halves'" in bad.output


def test_adapter_records_its_layout_and_reship_changes_it(tiny_model_dir, tmp_path):
    """Training writes the layout it trains with; shipping may choose another, and meta.json keeps both."""
    from gistctl.train.ship import ship_adapter

    loaded = load_model(str(tiny_model_dir), device="cpu")
    gm = load_gist_model(loaded, None, num_gist=2)
    peft_model = wrap_with_lora(gm.model, gm.gist_ids, LoraSettings(r=2, alpha=4, target_modules=["q_proj"]))
    checkpoint = tmp_path / "final"
    save_adapter(peft_model, loaded, gm.gist_ids, 16, checkpoint)
    assert read_adapter_meta(checkpoint).positions == SEQUENTIAL
    (checkpoint / "meta.json").write_text(json.dumps({"step": 3, "seed": 0, "data": {}, "evals": []}))
    (checkpoint / "config.yaml").write_text("train: {}\n")
    shipped = ship_adapter(checkpoint, "demo", positions=COMPACT, target_root=tmp_path / "adapters")
    assert json.loads((shipped / GIST_META).read_text())["positions"] == COMPACT
    assert json.loads((shipped / "meta.json").read_text())["positions"] == {"trained": SEQUENTIAL, "shipped": COMPACT}
    again = ship_adapter(shipped, "demo", positions=SEQUENTIAL, chunk_tokens=32, target_root=tmp_path / "adapters")
    meta = json.loads((again / "meta.json").read_text())
    assert meta["positions"] == {"trained": SEQUENTIAL, "shipped": SEQUENTIAL}
    assert meta["chunk_tokens"] == {"trained": 16, "shipped": 32} and meta["step"] == 3
    reloaded = load_gist_model(load_model(str(tiny_model_dir), device="cpu"), again)
    assert (reloaded.positions, reloaded.chunk_tokens) == (SEQUENTIAL, 32)
    auto = ship_adapter(shipped, "demo", positions=AUTO, target_root=tmp_path / "adapters")
    assert json.loads((auto / "meta.json").read_text())["positions"] == {"trained": SEQUENTIAL, "shipped": AUTO}
    assert load_gist_model(load_model(str(tiny_model_dir), device="cpu"), auto).positions == AUTO
    with pytest.raises(DataError, match="unknown gist position layout"):
        ship_adapter(shipped, "demo", positions="diagonal", target_root=tmp_path / "adapters")
    assert read_adapter_meta(checkpoint).chunking == "fixed"  # the split is recorded like the layout
    even = ship_adapter(shipped, "demo", chunking="even", target_root=tmp_path / "adapters")
    assert json.loads((even / "meta.json").read_text())["chunking"] == {"trained": "fixed", "shipped": "even"}
    assert load_gist_model(load_model(str(tiny_model_dir), device="cpu"), even).chunking == "even"
    with pytest.raises(DataError, match="unknown chunking"):
        ship_adapter(shipped, "demo", chunking="halves", target_root=tmp_path / "adapters")
