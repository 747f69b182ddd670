"""Gist KV blobs: parity with the masked full forward pass, positions, formats, errors."""

import json
import struct

import pytest
import torch
from typer.testing import CliRunner

from gistctl import prompt
from gistctl.cli.main import app
from gistctl.gist.collate import interleave_gists, split_chunks
from gistctl.gist.forward import gist_forward
from gistctl.gist.model import load_gist_model
from gistctl.gist.mask import GistLayout, build_gist_mask
from gistctl.kv.answer import answer_from_blob, blob_cache
from gistctl.kv.blob import read_blob, write_blob
from gistctl.kv.compress import compress_document
from gistctl.generation import greedy_generate
from gistctl.models import load_model

DOC = ("Marrow Island lies eleven miles off the northern coast. The lighthouse is kept by Ada Lindqvist. "
       "Its radio call sign is MRW-7 and the supply boat is the Saint Brendan. ") * 2
QUESTION = "What is the call sign?"


def gist_model(model_dir, chunk_tokens=1024, k=3, chunking="fixed"):
    gm = load_gist_model(load_model(str(model_dir), device="cpu"), None, num_gist=k, chunk_tokens=chunk_tokens)
    gm.chunking = chunking
    with torch.no_grad():  # distinct gist rows, so a wrong gist order or position would show
        gm.model.get_input_embeddings().weight[gm.gist_ids] += torch.randn(k, gm.model.config.hidden_size) * 0.5
    return gm


def masked_reference(gm, text, question, answer_ids=()):
    """Logits of [chunks+gists][question][answer] from one masked full forward pass (no cache)."""
    ids = prompt.context_ids(gm.tokenizer, text)
    chunks = split_chunks(ids, gm.chunk_tokens, gm.chunking)
    q = prompt.question_ids(gm.tokenizer, question)
    layout = GistLayout(tuple(len(c) for c in chunks), gm.num_gist, len(q), len(answer_ids))
    batch = build_gist_mask([layout]).__dict__
    batch["input_ids"] = torch.tensor([interleave_gists(chunks, gm.gist_ids) + q + list(answer_ids)])
    with torch.no_grad():
        return gist_forward(gm.model, batch).logits[0]


def masked_greedy(gm, text, question, steps):
    out = []
    stops = prompt.stop_ids(gm.model, gm.tokenizer)
    for _ in range(steps):
        logits = masked_reference(gm, text, question, out)[-1].clone()
        logits[gm.gist_ids] = float("-inf")
        token = int(logits.argmax())
        if token in stops:
            break
        out.append(token)
    return out


@pytest.mark.parametrize("chunk_tokens, chunking", [(1024, "fixed"), (16, "fixed"), (20, "even")])  # one chunk; several
def test_blob_round_trip_matches_masked_full_forward(tiny_model_dir, tmp_path, chunk_tokens, chunking):
    gm = gist_model(tiny_model_dir, chunk_tokens, chunking=chunking)
    blob, stats = compress_document(gm, DOC, dtype="fp32")
    assert stats.chunks == -(-stats.document_tokens // chunk_tokens)
    assert blob.meta.chunking == chunking
    if chunking == "even":  # the split differs from fixed's, so the parity below is about even chunks
        ids = prompt.context_ids(gm.tokenizer, DOC)
        assert split_chunks(ids, 20, "even") != split_chunks(ids, 20, "fixed")
    write_blob(blob, tmp_path / "doc.kv")
    loaded_blob = read_blob(tmp_path / "doc.kv")
    gen = answer_from_blob(gm, loaded_blob, QUESTION, max_new_tokens=6)
    reference = masked_reference(gm, DOC, QUESTION)[-1]
    assert torch.allclose(gen.first_logits, reference, atol=1e-4)
    assert gen.token_ids == masked_greedy(gm, DOC, QUESTION, 6)
    # fp16 blob: same next-token argmax
    half, _ = compress_document(gm, DOC, dtype="fp16")
    assert int(answer_from_blob(gm, half, QUESTION, max_new_tokens=1).first_logits.argmax()) == int(reference.argmax())


def test_positions_matter(tiny_model_dir):
    gm = gist_model(tiny_model_dir)
    blob, _ = compress_document(gm, DOC, dtype="fp32")
    right = answer_from_blob(gm, blob, QUESTION, max_new_tokens=1).first_logits
    # broken variant: restart the question's positions right after the cache length, as `generate` would
    wrong = greedy_generate(gm.model, gm.tokenizer, prompt.question_ids(gm.tokenizer, QUESTION),
                            cache=blob_cache(blob, gm.model), cache_length=blob.meta.total_gists,
                            first_position=blob.meta.total_gists, max_new_tokens=1).first_logits
    assert not torch.allclose(right, wrong, atol=1e-3)
    assert blob.meta.next_position == blob.meta.document_tokens + blob.meta.num_gist
    assert blob.meta.gist_positions == list(range(blob.meta.document_tokens, blob.meta.next_position))


def test_blob_size_is_the_formula_plus_header(tiny_model_dir, tmp_path):
    gm = gist_model(tiny_model_dir, chunk_tokens=16)
    blob, stats = compress_document(gm, DOC, dtype="fp16")
    size = write_blob(blob, tmp_path / "doc.kv")
    config = gm.model.config
    kv_heads, head_dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    tensor_bytes = 2 * config.num_hidden_layers * kv_heads * gm.num_gist * stats.chunks * head_dim * 2
    header = struct.unpack("<Q", (tmp_path / "doc.kv").read_bytes()[:8])[0]
    assert size == 8 + header + tensor_bytes
    assert stats.full_kv_bytes == 2 * config.num_hidden_layers * kv_heads * stats.document_tokens * head_dim * 2


def _compress_cli(model_dir, doc_path, *extra):
    return CliRunner().invoke(app, ["compress", str(doc_path), "--model", str(model_dir), "--adapter", "none",
                                    "--gist", "3", *extra])


@pytest.fixture
def blob_file(tiny_model_dir, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC)
    result = _compress_cli(tiny_model_dir, doc)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "doc.kv").exists()  # -o defaults to <name>.kv beside the input
    for word in ("document tokens", "blob bytes", "full KV bytes", "ratio", "compress time"):
        assert word in result.output
    return tmp_path / "doc.kv"


def test_two_questions_in_one_call_equal_separate_calls(blob_file):
    runner = CliRunner()
    both = runner.invoke(app, ["ask", str(blob_file), QUESTION, "Who keeps the lighthouse?",
                               "--max-new-tokens", "5"])
    one = runner.invoke(app, ["ask", str(blob_file), QUESTION, "--max-new-tokens", "5"])
    two = runner.invoke(app, ["ask", str(blob_file), "Who keeps the lighthouse?", "--max-new-tokens", "5"])
    assert both.exit_code == one.exit_code == two.exit_code == 0, both.output
    assert both.stdout.splitlines() == one.stdout.splitlines() + two.stdout.splitlines()


def test_ask_json_reports_timings(blob_file):
    result = CliRunner().invoke(app, ["ask", str(blob_file), QUESTION, "--json", "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout.splitlines()[0])
    assert row["state_bytes"] == blob_file.stat().st_size
    assert row["ttft_ms"] > 0 and "answer" in row


def _edit_metadata(path, change):
    raw = path.read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + header_len])
    meta = json.loads(header["__metadata__"]["gistctl"])
    change(meta)
    header["__metadata__"]["gistctl"] = json.dumps(meta)
    new_header = json.dumps(header).encode()
    new_header += b" " * (-len(new_header) % 8)
    path.write_bytes(struct.pack("<Q", len(new_header)) + new_header + raw[8 + header_len :])


def _edit_with_checksum(path, change):
    """Edit the metadata and recompute its checksum, as a careful forger would."""
    from safetensors import safe_open

    from gistctl.kv.blob import blob_checksum

    def edit(meta):
        change(meta)
        with safe_open(str(path), framework="pt") as handle:
            tensors = [handle.get_tensor(n) for n in ("keys", "values", "key_scales", "value_scales") if n in handle.keys()]
        meta["checksum"] = blob_checksum(tensors, meta)

    _edit_metadata(path, edit)


def _flip_tensor_byte(path):
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF  # inside the values tensor (the data follows the header)
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "truncated or corrupt|not a gistctl blob"),
    (lambda p: p.write_text("hello"), "not a gistctl blob"),
    (lambda p: _edit_metadata(p, lambda m: m.update(format_version=99)), "newer than this gistctl"),
    # every field is type- and consistency-checked, before the checksum
    (lambda p: _edit_metadata(p, lambda m: m.update(num_chunks=2)), "corrupt metadata: num_chunks is 2"),
    (lambda p: _edit_metadata(p, lambda m: m.update(num_chunks="1.0")), "num_chunks must be a positive integer"),
    (lambda p: _edit_metadata(p, lambda m: m.update(format_version=0)), "blob format 0"),
    (lambda p: _edit_metadata(p, lambda m: m.update(format_version=1)), "blob format 1 .*compress the document again"),
    (lambda p: _edit_metadata(p, lambda m: m.update(positions="weird")), "positions must be one of"),
    (lambda p: _edit_metadata(p, lambda m: m.update(num_gist=True)), "num_gist must be a positive integer"),
    (lambda p: _edit_metadata(p, lambda m: m.update(dtype="bf16")), "metadata says bf16"),
    (lambda p: _edit_metadata(p, lambda m: m.update(gist_positions=m["gist_positions"][:-1])), "gist_positions"),
    (lambda p: _edit_metadata(p, lambda m: m.pop("checksum")), "missing checksum"),
    # the checksum covers the metadata as well as the tensors, and a blob without one is refused
    (lambda p: _edit_metadata(p, lambda m: m.update(created_at="2020-01-01T00:00:00Z")), "checksum mismatch"),
    # positions are checked against the layout before the checksum: an edit with the checksum recomputed fails too
    (lambda p: _edit_metadata(p, lambda m: m.update(next_position=m["next_position"] + 4000)), "next_position is"),
    (lambda p: _edit_with_checksum(p, lambda m: m.update(next_position=5000)), "layout puts the question at"),
    (lambda p: _edit_with_checksum(p, lambda m: m.update(gist_positions=[x + 1 for x in m["gist_positions"]],
                                                         next_position=m["next_position"] + 1)), "gist_positions disagree"),
    (lambda p: _edit_metadata(p, lambda m: m.update(model_fingerprint="0" * 64)), "checksum mismatch"),
    (lambda p: _edit_metadata(p, lambda m: m.update(adapter_fingerprint="f" * 64)), "checksum mismatch"),
    (lambda p: (_edit_metadata(p, lambda m: m.update(checksum="")), _flip_tensor_byte(p)), "checksum must be a sha256"),
    (_flip_tensor_byte, "checksum mismatch"),
])
def test_blob_errors_are_one_line_exit_2(blob_file, damage, message):
    damage(blob_file)
    result = CliRunner().invoke(app, ["ask", str(blob_file), QUESTION])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    import re

    assert re.search(message, result.output), result.output


def test_blob_from_another_model_is_refused(blob_file, tmp_path):
    from tiny import save_tiny

    other = save_tiny(tmp_path / "other", seed=7)
    result = CliRunner().invoke(app, ["ask", str(blob_file), QUESTION, "--model", str(other)])
    assert result.exit_code == 2
    assert "was made with" in result.output and "you loaded" in result.output


def test_compress_bad_inputs(tiny_model_dir, tmp_path):
    missing = _compress_cli(tiny_model_dir, tmp_path / "absent.txt")
    assert missing.exit_code == 2 and "does not exist" in missing.output
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert _compress_cli(tiny_model_dir, empty).exit_code == 2
    long = tmp_path / "long.txt"
    long.write_text("word " * 3000)  # the tiny model's window is 512 positions
    too_long = _compress_cli(tiny_model_dir, long)
    assert too_long.exit_code == 2 and "window" in too_long.output
    result = CliRunner().invoke(app, ["ask", str(tmp_path / "absent.kv"), QUESTION])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_answer_ranks_agree_with_greedy_decoding_from_the_blob(tiny_model_dir, tmp_path):
    from gistctl.bench.misses import first_miss
    from gistctl.kv.answer import answer_ranks

    gm = gist_model(tiny_model_dir, chunk_tokens=16)
    blob, _ = compress_document(gm, DOC)
    write_blob(blob, tmp_path / "doc.kv")
    blob = read_blob(tmp_path / "doc.kv")
    greedy = answer_from_blob(gm, blob, QUESTION, max_new_tokens=6).token_ids
    ranks = answer_ranks(gm, blob, QUESTION, greedy)
    assert [r for r, _, _ in ranks] == [0] * len(greedy) and [c for _, c, _ in ranks] == greedy
    first = answer_from_blob(gm, blob, QUESTION, max_new_tokens=1).first_logits
    first[gm.gist_ids] = float("-inf")
    assert ranks[0][2] == pytest.approx(float(first.log_softmax(-1)[greedy[0]]), abs=1e-4)
    stops = prompt.stop_ids(gm.model, gm.tokenizer)
    assert first_miss(gm.tokenizer, greedy, ranks, stops)[0] is None
    # leave the second token out: the first miss is there, and greedy decoding chose the left-out token
    assert len(greedy) >= 3 and greedy[1] != greedy[2]
    skipped = [greedy[0]] + greedy[2:]
    ranks = answer_ranks(gm, blob, QUESTION, skipped)
    position, rank, kind, text = first_miss(gm.tokenizer, skipped, ranks, stops)
    assert (position, ranks[1][1]) == (1, greedy[1]) and rank > 0 and text == gm.tokenizer.decode([greedy[1]])
    assert kind in ("skip", "other")  # "skip" only if greedy[1]'s text also starts what follows
    # stopping: greedy ids followed by a token it would not choose, then end-of-turn
    ends = first_miss(gm.tokenizer, [1, 2], [(0, 1, -0.1), (3, next(iter(stops)), -2.0)], stops)
    assert ends[0] == 1 and ends[2] == "end"


def test_score_run_scores_the_right_answer_from_each_kept_blob(tiny_model_dir, tmp_path, monkeypatch):
    """A bench run's rows, rescored from their blobs: a right answer's NLL is the likelier of the tokenizer's pieces
    and greedy decoding's own tokens, and a wrong one reports where greedy decoding left it."""
    from gistctl.bench.misses import score_run, summary
    from gistctl.kv.answer import answer_ranks

    gm = load_gist_model(load_model(str(tiny_model_dir), device="cpu"), None, num_gist=3, chunk_tokens=16)
    blob, _ = compress_document(gm, DOC)
    (tmp_path / "blobs").mkdir()
    write_blob(blob, tmp_path / "blobs" / "doc.kv")
    first = answer_from_blob(gm, blob, QUESTION, max_new_tokens=4).token_ids
    assert len(first) == 4
    # the random tiny model never ends an answer: make its 4th greedy token a stop, so it answers 3 tokens
    stops = prompt.stop_ids(gm.model, gm.tokenizer) | {first[3]}
    monkeypatch.setattr(prompt, "stop_ids", lambda model, tokenizer: stops)
    greedy = answer_from_blob(gm, blob, QUESTION, max_new_tokens=8)
    assert greedy.token_ids == first[:3]
    own = greedy.token_ids + [gm.tokenizer.eos_token_id]
    own_nll = -sum(lp for _, _, lp in answer_ranks(gm, blob, QUESTION, own))
    canonical = prompt.answer_ids(gm.tokenizer, greedy.text)
    canonical_nll = -sum(lp for _, _, lp in answer_ranks(gm, blob, QUESTION, canonical))
    wrong = "MRW-7"
    assert greedy.text != wrong
    rows = [{"kind": "gist", "method": "gist[x]", "id": f"q{i}", "question": QUESTION, "answers": [answer],
             "prediction": greedy.text, "primary": float(answer == greedy.text), "blob": "blobs/doc.kv",
             "error": None} for i, answer in enumerate([greedy.text, wrong])]
    rows.append({**rows[0], "kind": "rag", "blob": None})  # other methods are left out
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    right, miss = score_run(tmp_path)
    assert right.correct and right.nll == pytest.approx(min(own_nll, canonical_nll), abs=1e-4)
    wrong_ranks = answer_ranks(gm, blob, QUESTION, prompt.answer_ids(gm.tokenizer, wrong))
    assert not miss.correct and miss.nll == pytest.approx(-sum(lp for _, _, lp in wrong_ranks), abs=1e-4)
    assert miss.position == next(i for i, (r, _, _) in enumerate(wrong_ranks) if r > 0)
    assert summary([right, miss])["gist[x]"]["right"] == 1


def test_int8_blob_is_close_to_fp16_at_about_half_the_bytes(tiny_model_dir, tmp_path):
    """int8: per-channel key scales and per-gist value scales in the blob, dequantized on read; the round trip
    through the file is exact, the values are within a quantization step, and a flipped scale byte is caught."""
    import torch

    import gistctl

    gc = gistctl.load(model=str(tiny_model_dir), adapter="none", num_gist=4, chunk_tokens=64, device="cpu")
    half, int8 = gc.compress(DOC), gc.compress(DOC, dtype="int8")
    assert int8.keys.dtype == torch.int8 and int8.key_scales.shape == (2, 2, 1, 16)
    assert int8.value_scales.shape == (2, 2, int8.meta.total_gists, 1)
    k16, v16 = half.float_kv()
    k8, v8 = int8.float_kv()
    assert (k8 - k16).abs().max() <= int8.key_scales.float().max() * 0.51 + 1e-3
    assert (v8 - v16).abs().max() <= int8.value_scales.float().max() * 0.51 + 1e-3
    assert int8.nbytes < 0.7 * half.nbytes
    assert int8.meta.full_kv_bytes * 2 == half.meta.full_kv_bytes  # like for like: the full KV at int8
    size = int8.save(tmp_path / "doc.kv")
    back = gistctl.Blob.load(tmp_path / "doc.kv")
    assert all(torch.equal(a, b) for a, b in zip(back.tensors().values(), int8.tensors().values()))
    assert size < (tmp_path / "doc.kv").stat().st_size + 1 and half.save(tmp_path / "half.kv") > size
    assert isinstance(gc.ask(tmp_path / "doc.kv", QUESTION, max_new_tokens=3).text, str)
    raw = bytearray((tmp_path / "doc.kv").read_bytes())
    raw[-3] ^= 0x40  # in the last stored tensor (value_scales)
    (tmp_path / "doc.kv").write_bytes(bytes(raw))
    from gistctl.errors import BlobError

    with pytest.raises(BlobError, match="checksum mismatch"):
        gistctl.Blob.load(tmp_path / "doc.kv")
