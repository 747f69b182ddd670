"""Presses: the reader's own KV cache, scored and pressed into the same blob format, asked through the same loop."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from gistctl import prompt
from gistctl.cli.main import app
from gistctl.engine import Gistctl, open_reader_model
from gistctl.errors import BlobError, ConfigError, DataError
from gistctl.generation import greedy_generate
from gistctl.kv.answer import answer_from_blobs
from gistctl.kv.attention import _masked_sdpa, entry_masks
from gistctl.kv.blob import blob_checksum, read_blob
from gistctl.kv.press import compress_with_press, prefill_document
from gistctl.kv.presses import KVzipPress, StreamingPress, select_kept
from gistctl.kv.presses.base import kept_per_head

DOC = ("The lighthouse on Marrow Island was built in 1887. Its keeper is Ada Lindqvist, and the radio room "
       "answers to the call sign MRW-7. Ships pass it every night on their way to the northern harbour. ") * 2
QUESTION = "Who keeps the lighthouse?"
runner = CliRunner()


@pytest.fixture(scope="module")
def reader(tiny_model_dir):
    """The tiny model as a press reader: no adapter, no gist tokens."""
    return open_reader_model(str(tiny_model_dir), "none", device="cpu")


def _full_answer(gm, text, question, max_new_tokens=8):
    ids = prompt.with_context_ids(gm.tokenizer, text, question)
    return greedy_generate(gm.model, gm.tokenizer, ids, max_new_tokens=max_new_tokens,
                           stop_ids=prompt.stop_ids(gm.model, gm.tokenizer))


@pytest.mark.parametrize("press", ["none", "kvzip", "snapkv", "streaming", "knorm"])
def test_ratio_zero_answers_as_full_context_token_for_token(reader, tmp_path, press):
    blob, _ = compress_with_press(reader, DOC, press=press, ratio=0.0, dtype="fp32")
    blob.save(tmp_path / "doc.kv")
    pressed = answer_from_blobs(reader, [read_blob(tmp_path / "doc.kv")], QUESTION, max_new_tokens=8)
    full = _full_answer(reader, DOC, QUESTION)
    assert pressed.token_ids == full.token_ids
    assert torch.allclose(pressed.first_logits, full.first_logits, atol=1e-4, rtol=0)


def test_the_question_continues_the_document_as_full_context_tokenizes_it(reader):
    # the split that lets a press prefill once: document turn + question turn == the full prompt
    tok = reader.tokenizer
    text = DOC + "\n"  # trailing whitespace must not change where the document ends
    assert prompt.with_context_ids(tok, text, QUESTION) == (prompt.document_turn_ids(tok, text)
                                                           + prompt.question_turn_ids(tok, QUESTION))
    assert prefill_document(reader, text).ids == prompt.document_turn_ids(tok, text)


def test_a_pressed_answer_differs_from_full_when_entries_are_dropped(reader):
    # the padding mask is live: at a high ratio the first logits move away from the full cache's
    blob, _ = compress_with_press(reader, DOC, press="streaming", ratio=0.9, dtype="fp32")
    pressed = answer_from_blobs(reader, [blob], QUESTION, max_new_tokens=1)
    full = _full_answer(reader, DOC, QUESTION, 1)
    assert not torch.allclose(pressed.first_logits, full.first_logits, atol=1e-3)


def test_global_and_uniform_keep_the_same_total():
    scores = torch.rand(4, 3, 50)
    for ratio in (0.0, 0.5, 0.9375):
        glob, uni = select_kept(scores, ratio, "global", 2), select_kept(scores, ratio, "uniform", 2)
        assert int(glob.sum()) == int(uni.sum()) == 4 * 3 * kept_per_head(50, ratio, 2)
        assert (uni.sum(-1) == kept_per_head(50, ratio, 2)).all()
        assert glob[..., :2].all() and uni[..., :2].all()  # the sinks always stay
    skewed = scores.clone()
    skewed[0, 0] += 10  # one head that matters: the global budget gives it more, the uniform one cannot
    glob = select_kept(skewed, 0.75, "global")
    assert glob[0, 0].sum() > select_kept(skewed, 0.75, "uniform")[0, 0].sum()


def test_kvzip_scoring_memory_does_not_grow_with_the_document(reader):
    widths = []
    for repeats in (3, 12):
        doc = prefill_document(reader, "Ships pass the lighthouse every night. " * repeats)
        press = KVzipPress(chunk=16)
        scores = press.score(doc)
        assert scores.shape == (2, 2, doc.length)
        assert (scores[..., doc.head:] > 0).all()  # every document entry was scored by some chunk
        widths.append(press.largest_scored)
    assert widths[0] == widths[1]  # sinks + one chunk + its repeat, whatever the length


def test_masked_sdpa_ignores_hidden_entries_exactly():
    torch.manual_seed(0)
    module = type("M", (), {"num_key_value_groups": 2, "scaling": 0.125})()
    q = torch.randn(1, 4, 3, 8)
    k, v = torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[0, 5:] = False  # head 0 keeps 5 of the 7 cached entries, head 1 all 7
    out, _ = _masked_sdpa(module, q, k, v, None, keep, 0.125)
    # head 0 computed without its hidden entries at all
    k0 = torch.cat([k[:, :1, :5], k[:, :1, 7:]], dim=2).repeat_interleave(2, dim=1)
    v0 = torch.cat([v[:, :1, :5], v[:, :1, 7:]], dim=2).repeat_interleave(2, dim=1)
    causal = torch.ones(3, 8, dtype=torch.bool).tril(5)
    ref = torch.nn.functional.scaled_dot_product_attention(q[:, :2], k0, v0, attn_mask=causal, scale=0.125)
    assert torch.allclose(out.transpose(1, 2)[:, :2], ref, atol=1e-6)


def test_press_blob_round_trip_is_ragged_and_exact(reader, tmp_path):
    blob, stats = compress_with_press(reader, DOC, press="kvzip", ratio=0.75, dtype="fp16")
    counts = torch.tensor(blob.meta.kept_counts)
    assert len(set(counts.flatten().tolist())) > 1  # a global budget: heads keep different counts
    assert blob.keys.shape == (int(counts.sum()), blob.meta.head_dim)  # no padding stored
    size = blob.save(tmp_path / "a.kv")
    header = struct.unpack("<Q", (tmp_path / "a.kv").read_bytes()[:8])[0]
    assert size == 8 + header + 2 * int(counts.sum()) * blob.meta.head_dim * 2
    back = read_blob(tmp_path / "a.kv")
    assert torch.equal(back.keys, blob.keys) and back.meta.kept_counts == blob.meta.kept_counts
    assert back.meta.press == "kvzip" and back.meta.ratio == 0.75 and back.meta.budget == "global"
    assert back.meta.next_position == back.meta.prefix_tokens == len(prompt.document_turn_ids(reader.tokenizer, DOC))
    keys, _, keep = back.padded_kv()
    assert keep.sum() == counts.sum() and keys.shape[2] == int(counts.max())
    assert abs(back.meta.kept_fraction - 0.25) < 0.02


def test_int8_press_blob_is_close_at_about_half_the_bytes(reader, tmp_path):
    fp16, _ = compress_with_press(reader, DOC, press="kvzip", ratio=0.5, dtype="fp16")
    int8, _ = compress_with_press(reader, DOC, press="kvzip", ratio=0.5, dtype="int8")
    a, b = fp16.save(tmp_path / "a.kv"), int8.save(tmp_path / "b.kv")
    entries, d = int8.keys.shape
    # keys and values in int8, fp16 scales: per (layer, head, channel) for keys, per entry for values
    assert int8.nbytes == 2 * entries * d + 2 * (2 * 2 * d) + 2 * entries
    assert 1.7 < a / b < 2.0  # head_dim 16 here: the per-entry value scale weighs more than at SmolLM2's 64
    ka, va = read_blob(tmp_path / "a.kv").float_kv()
    kb, vb = read_blob(tmp_path / "b.kv").float_kv()
    assert (ka - kb).abs().max() < 0.02 * ka.abs().max() and (va - vb).abs().max() < 0.02 * va.abs().max()
    first_int8 = answer_from_blobs(reader, [int8], QUESTION, max_new_tokens=1)
    first_fp16 = answer_from_blobs(reader, [fp16], QUESTION, max_new_tokens=1)
    assert first_int8.token_ids == first_fp16.token_ids
    assert (first_int8.first_logits - first_fp16.first_logits).abs().max() < 0.05 * first_fp16.first_logits.abs().max()


def test_two_press_blobs_answer_side_by_side_and_gist_blobs_do_not_mix(reader, tiny_model_dir):
    a, _ = compress_with_press(reader, DOC, press="kvzip", ratio=0.5)
    b, _ = compress_with_press(reader, "The harbour master is Tomas Wrede. " * 6, press="snapkv", ratio=0.5)
    gc = Gistctl(reader, reader)
    both = gc.ask([a, b], QUESTION, max_new_tokens=4)
    assert isinstance(both.text, str)
    from gistctl.engine import load

    gist = load(str(tiny_model_dir), "none", num_gist=2, device="cpu").compress(DOC)
    with pytest.raises(DataError, match="cannot be asked together"):
        answer_from_blobs(reader, [a, gist], QUESTION)


def test_a_press_blob_is_refused_under_another_reader(reader, tmp_path, tiny_model_dir):
    from tiny import save_tiny

    blob, _ = compress_with_press(reader, DOC, press="kvzip", ratio=0.5)
    blob.save(tmp_path / "a.kv")
    other = open_reader_model(str(save_tiny(tmp_path / "other", seed=1)), "none", device="cpu")
    with pytest.raises(BlobError, match="was made with"):
        Gistctl(other, other).ask(tmp_path / "a.kv", QUESTION)


def test_presses_refuse_a_model_whose_attention_they_cannot_see(tiny_model_dir):
    from gistctl.models import load_model
    from gistctl.gist.model import load_gist_model

    eager = load_gist_model(load_model(str(tiny_model_dir), device="cpu", attn_implementation="eager"), None,
                            num_gist=0)
    with pytest.raises(DataError, match="presses need a decoder whose attention gistctl can observe"):
        compress_with_press(eager, DOC, press="kvzip", ratio=0.5)


def _rewrite_metadata(path, change, fix_checksum=True):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["gistctl"])
    change(meta)
    if fix_checksum:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            tensors = [handle.get_tensor(name) for name in ("keys", "values", "key_scales", "value_scales")
                       if name in handle.keys()]
        meta["checksum"] = blob_checksum(tensors, meta)
    header["__metadata__"]["gistctl"] = json.dumps(meta)
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    path.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n :])


@pytest.mark.parametrize("change, message", [
    (lambda m: m["kept_counts"][0].__setitem__(0, m["kept_counts"][0][0] + 1), "shape mismatch"),
    (lambda m: m.update(next_position=m["next_position"] + 4000), "next_position"),
    (lambda m: m.update(ratio=1.5), "ratio must be in"),
    (lambda m: m.update(press="zip"), "press must be one of"),
    (lambda m: m.update(budget="uniform"), "uniform budget"),
])
def test_press_blob_metadata_is_checked_against_itself_and_its_tensors(reader, tmp_path, change, message):
    blob, _ = compress_with_press(reader, DOC, press="kvzip", ratio=0.75)
    path = tmp_path / "a.kv"
    blob.save(path)
    _rewrite_metadata(path, change)  # checksum recomputed: the consistency checks alone must refuse it
    result = runner.invoke(app, ["ask", str(path), QUESTION, "--device", "cpu"])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1
    import re

    assert re.search(message, result.output), result.output


def _compress(tiny_model_dir, doc, *extra):
    return runner.invoke(app, ["compress", str(doc), "--model", str(tiny_model_dir), "--adapter", "none",
                               "--device", "cpu", *extra])


@pytest.mark.parametrize("extra, message", [
    (["--press", "kvzip", "--ratio", "1.0"], "--ratio must be in"),
    (["--press", "kvzip", "--ratio", "-0.1"], "--ratio must be in"),
    (["--press", "zipper"], "unknown press 'zipper'"),
    (["--press", "none", "--ratio", "0.5"], "press none keeps every entry"),
    (["--ratio", "0.5"], "press settings"),
    (["--press", "kvzip", "--num-gist", "4"], "gist settings"),
])
def test_press_cli_errors_are_one_line_exit_2(tiny_model_dir, tmp_path, extra, message):
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC)
    result = _compress(tiny_model_dir, doc, *extra)
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "doc.kv").exists()


def test_press_blob_asked_in_two_processes_gives_the_same_answer(tiny_model_dir, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC)
    result = _compress(tiny_model_dir, doc, "--press", "kvzip", "--ratio", "0.75", "-o", str(tmp_path / "d.kv"))
    assert result.exit_code == 0, result.output
    for word in ("press kvzip", "entries kept", "blob bytes", "full KV bytes", "x smaller"):
        assert word in result.output
    answers = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-m", "gistctl", "ask", str(tmp_path / "d.kv"), QUESTION, "--json",
                              "--device", "cpu", "--max-new-tokens", "6"], capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr
        answers.append(json.loads(out.stdout.splitlines()[0])["answer"])
    assert answers[0] == answers[1]


def test_check_ratio_refuses_bools_and_out_of_range():
    from gistctl.kv.presses import check_ratio

    for bad in (1.0, -0.01, True, "0.5"):
        with pytest.raises(ConfigError):
            check_ratio(bad)
    assert check_ratio(0) == 0.0


@pytest.mark.slow
def test_kvzip_keeps_a_planted_line_that_streaming_drops():
    """The real reader: a line planted early in prose survives kvzip at 0.9375, not streaming (recency only)."""
    reader = open_reader_model(None, "full-reader", device="cpu")
    filler = ("The committee met again on Tuesday to discuss the budget for the coming year, and the members "
              "agreed to postpone the vote until the next session. ") * 14
    planted = "The secret code of the vault is 7K2P9A."
    text = f"{filler[:400]} {planted} {filler}"
    doc = prefill_document(reader, text)
    ids = doc.ids
    code = reader.tokenizer(" 7K2P9A", add_special_tokens=False)["input_ids"]
    start = next(i for i in range(len(ids)) if ids[i : i + len(code)] == code)
    span = slice(start, start + len(code))

    def kept_share(press):
        keep = select_kept(press.score(doc), 0.9375, "global", doc.protected)
        return float(keep[..., span].float().mean())

    kvzip, streaming = kept_share(KVzipPress()), kept_share(StreamingPress())
    assert streaming == 0.0
    assert kvzip > 2 / 16  # over twice the budget's share of 1 in 16
    gc = Gistctl(reader, reader)
    question = "What is the secret code of the vault?"
    assert gc.ask(gc.compress(text, press="kvzip", ratio=0.9375), question).text == "7K2P9A"
    assert "7K2P9A" not in gc.ask(gc.compress(text, press="streaming", ratio=0.9375), question).text


def test_kvzip_plus_weighs_an_entry_by_what_its_value_writes_through_the_output_projection(reader):
    # KVzip+: a KV group whose output-projection columns are zero writes nothing to the residual stream, so its
    # entries score 0 under normalize=True; plain KVzip, which sees only attention, still scores them
    doc = prefill_document(reader, DOC)
    attn = reader.model.model.layers[0].self_attn
    span = attn.num_key_value_groups * attn.head_dim  # query heads are grouped by KV head, group 0 first
    saved = attn.o_proj.weight.detach().clone()
    try:
        with torch.no_grad():
            attn.o_proj.weight[:, :span] = 0
        plain, plus = KVzipPress(chunk=32).score(doc), KVzipPress(chunk=32, normalize=True).score(doc)
    finally:
        with torch.no_grad():
            attn.o_proj.weight.copy_(saved)
    body = slice(doc.head, doc.length)
    assert (plus[0, 0, body] == 0).all() and (plain[0, 0, body] > 0).all()
    assert (plus[0, 1, body] > 0).all() and (plus[1, :, body] > 0).all()
