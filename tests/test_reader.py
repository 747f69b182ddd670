"""The full reader (the trained ceiling), context distillation, continuation data and the bench's retention."""

from __future__ import annotations

import json

import pytest
import torch

from gistctl import prompt
from gistctl.errors import ConfigError, DataError
from gistctl.train.loop import train
from gistctl.train.objectives import Teacher, encode_full, full_answer_logits, kl_sum

from test_squad import write_squad
from test_train import data_file, lora_model_that_matters, passkey_records, settings  # noqa: F401

QUESTION = "What is the pass key?"


def test_full_reader_prompt_is_the_one_ask_method_full_builds(tiny_loaded):
    tok = tiny_loaded.tokenizer
    example = passkey_records(1)[0]
    encoded = encode_full(tok, example, 4096)
    answer = prompt.answer_ids(tok, example["answers"][0])
    assert encoded.input_ids == prompt.with_context_ids(tok, example["context"], QUESTION) + answer
    assert encoded.answer == len(answer) and encoded.truncated_tokens == 0
    # too long: the document's end is cut, the question and answer stay whole
    short = encode_full(tok, example, len(encoded.input_ids) - 10)
    assert len(short.input_ids) <= len(encoded.input_ids) - 10
    assert short.input_ids[-len(answer):] == answer and short.truncated_tokens >= 10
    # what a student read: its first N document tokens
    context = prompt.context_ids(tok, example["context"])
    read = encode_full(tok, example, 4096, cut=len(context) - 7)
    assert read.input_ids == prompt.with_context_ids(tok, tok.decode(context[:7]), QUESTION) + answer
    with pytest.raises(DataError, match="more than max_length"):
        encode_full(tok, example, 5)


def test_full_answer_logits_predict_the_answer_tokens(tiny_loaded):
    """The logits kept are those at the positions before each answer token: the loss matches the full forward's."""
    tok, model = tiny_loaded.tokenizer, tiny_loaded.model
    encoded = [encode_full(tok, e, 4096) for e in passkey_records(2)]
    for (logits, targets), example in zip(full_answer_logits(model, encoded), encoded):
        ids = torch.tensor([example.input_ids])
        whole = model(input_ids=ids).logits[0]
        a = example.answer
        assert targets.tolist() == example.input_ids[-a:]
        torch.testing.assert_close(logits, whole[-a - 1 : -1], rtol=1e-4, atol=1e-4)


def test_kl_sum_is_kl_of_teacher_to_student():
    torch.manual_seed(0)
    teacher, student = torch.randn(3, 11), torch.randn(3, 11)
    p, log_p, log_q = teacher.softmax(-1), teacher.log_softmax(-1), student.log_softmax(-1)
    expected = (p * (log_p - log_q)).sum()
    torch.testing.assert_close(kl_sum(teacher, student), expected)
    assert float(kl_sum(teacher, teacher)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="different answer tokens"):
        kl_sum(teacher, student[:2])


def test_base_teacher_reads_with_the_adapter_switched_off(tiny_model_dir):
    """The base teacher is the student's own weights with LoRA off: the untouched base model's logits, not the
    adapted model's (the LoRA here is drawn non-zero, so switching it off matters)."""
    from gistctl.models import load_model

    loaded, gm, model = lora_model_that_matters(tiny_model_dir)
    example = [encode_full(loaded.tokenizer, passkey_records(1)[0], 4096)]
    teacher = Teacher("base", model, loaded, model_name=str(tiny_model_dir), device="cpu", dtype="fp32")
    taught = teacher.answer_logits(example)[0]
    plain = load_model(str(tiny_model_dir), device="cpu")
    base = full_answer_logits(plain.model, example)[0][0]
    adapted = full_answer_logits(model, example)[0][0]
    vocab = base.shape[-1]  # the student's vocabulary has its gist tokens added at the end
    torch.testing.assert_close(taught[:, :vocab], base, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(taught, adapted, atol=1e-3)
    assert not taught.requires_grad


def test_reader_full_trains_a_ceiling_that_ask_method_full_uses(tiny_model_dir, data_file, tmp_path):
    """`--reader full` learns the examples read whole; the adapter says so in gist.json; compress refuses it;
    `open_text_method('full', adapter=...)` answers with it (and differs from the base model)."""
    from gistctl.engine import open_gist_model, open_text_method
    from gistctl.gist.adapter import adapter_reader, read_adapter_meta

    config = settings(tiny_model_dir, data_file, reader="full", max_steps=40, eval_every=40, eval_limit=2,
                      eval=str(data_file))
    result = train(config, tmp_path / "full")
    assert result.losses[-1] < 0.5 * result.losses[0]
    assert adapter_reader(read_adapter_meta(result.final_dir)) == "full"
    evals = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert evals[-1]["eval"]["n"] == 2
    with pytest.raises(DataError, match="reads whole documents"):
        open_gist_model(str(tiny_model_dir), str(result.final_dir))
    record = passkey_records(1)[0]
    tuned = open_text_method("full", model=str(tiny_model_dir), adapter=str(result.final_dir), device="cpu")
    base = open_text_method("full", model=str(tiny_model_dir), device="cpu")
    ids = tuned.prompt_ids(tuned.prepare(record["context"]), QUESTION)
    with torch.no_grad():
        tuned_logits = tuned.loaded.model(input_ids=torch.tensor([ids])).logits[0, -1]
        base_logits = base.loaded.model(input_ids=torch.tensor([ids])).logits[0, -1]
    assert not torch.allclose(tuned_logits[: len(base_logits)], base_logits, atol=1e-3)
    answer = tuned.answer(tuned.prepare(record["context"]), QUESTION)
    assert answer.text.strip() == record["answers"][0]
    # the CLI: `ask --method full --adapter` answers what the API answers; compress refuses a full reader
    from typer.testing import CliRunner

    from gistctl.cli.main import app

    doc = tmp_path / "doc.txt"
    doc.write_text(record["context"])
    result = CliRunner().invoke(app, ["ask", "--method", "full", "--adapter", str(result.final_dir), "--model",
                                      str(tiny_model_dir), "--json", str(doc), QUESTION])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["answer"] == answer.text
    refused = CliRunner().invoke(app, ["compress", str(doc), "--adapter", str(tmp_path / "full" / "final"),
                                       "--model", str(tiny_model_dir)])
    assert refused.exit_code == 2 and "reads whole documents" in refused.output


def test_distillation_adds_the_teacher_kl_to_the_answer_loss(tiny_model_dir, data_file, tmp_path):
    """loss = ce + distill x kl, logged per step; distill 0 is the plain answer loss (same first step)."""
    plain = train(settings(tiny_model_dir, data_file, max_steps=2, warmup_steps=0), tmp_path / "plain")
    taught = train(settings(tiny_model_dir, data_file, max_steps=2, warmup_steps=0, distill=0.5), tmp_path / "kd")
    records = [json.loads(line) for line in (tmp_path / "kd" / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        assert record["kl"] > 0
        assert record["loss"] == pytest.approx(record["ce"] + 0.5 * record["kl"], rel=1e-5)
    assert records[0]["ce"] == pytest.approx(plain.losses[0], rel=1e-5)
    assert taught.losses[0] != pytest.approx(plain.losses[0], rel=1e-3)


def test_distillation_from_a_trained_full_reader(tiny_model_dir, data_file, tmp_path):
    full = train(settings(tiny_model_dir, data_file, reader="full", max_steps=3), tmp_path / "full")
    run = train(settings(tiny_model_dir, data_file, max_steps=1, distill=1.0, teacher=str(full.final_dir)),
                tmp_path / "kd")
    assert run.steps == 1
    gist = train(settings(tiny_model_dir, data_file, max_steps=1), tmp_path / "gist")
    with pytest.raises(ConfigError, match="is a gist reader"):
        train(settings(tiny_model_dir, data_file, max_steps=1, distill=1.0, teacher=str(gist.final_dir)),
              tmp_path / "bad")


@pytest.mark.parametrize("key, value, message", [
    ("reader", "gists", "train.reader must be one of gist, full"),
    ("distill", -1.0, "train.distill must be a weight >= 0"),
    ("teacher", "nowhere", "train.teacher must be 'base' or an adapter directory"),
])
def test_reader_settings_are_checked(tiny_model_dir, data_file, key, value, message):
    with pytest.raises(ConfigError, match=message):
        settings(tiny_model_dir, data_file, **{key: value})


def test_distilling_a_full_reader_is_refused(tiny_model_dir, data_file):
    with pytest.raises(ConfigError, match="drop it with --reader full"):
        settings(tiny_model_dir, data_file, reader="full", distill=1.0)


def test_continuation_stops_after_a_sentence_and_answers_the_next(tmp_path, tiny_loaded):
    from gistctl.data.lengths import parse_lengths
    from gistctl.data.squad import CONTINUE_QUESTION, article_split, build_squad_continuation, load_squad

    source = tmp_path / "squad.json"
    data = {"version": "v2.0", "data": [
        {"title": f"Article_{a}", "paragraphs": [
            {"context": f"Article {a} part {p} opens here. It goes on with fact {a}{p}. It ends on {a}-{p}.", "qas": []}
            for p in range(3)]} for a in range(30)]}
    source.write_text(json.dumps(data))
    records = list(build_squad_continuation(tiny_loaded.tokenizer, source=source, n=8, seed=3,
                                            tokens=parse_lengths("100..200"), split="train"))
    texts = {p.text for p in load_squad(source)}
    for record in records:
        assert record["task"] == "qa" and record["question"] == CONTINUE_QUESTION
        head = record["context"].split("\n\n")[-1]
        (paragraph,) = [t for t in texts if t.startswith(head + " ")]
        assert paragraph[len(head) + 1 :].startswith(record["answers"][0])
        assert article_split(record["meta"]["article"]) == "train"
        assert all(article_split(a) == "train" for a in record["meta"]["distractor_articles"])
    again = list(build_squad_continuation(tiny_loaded.tokenizer, source=source, n=8, seed=3,
                                          tokens=parse_lengths("100..200"), split="train"))
    assert again == records


def test_full_lora_column_reads_with_a_reader_adapter(tiny_model_dir, data_file, tmp_path):
    from gistctl.bench.runner import parse_methods

    assert parse_methods("full+lora")[0].adapter == "full-reader"  # the shipped reader unless another is given
    full = train(settings(tiny_model_dir, data_file, reader="full", max_steps=1), tmp_path / "full")
    with pytest.raises(ConfigError, match="add one to --methods"):
        parse_methods("full", reader_adapter=str(full.final_dir))
    specs = parse_methods("full,full+lora,rag+lora", reader_adapter=str(full.final_dir))
    assert [(s.column, s.kind, s.adapter) for s in specs] == [
        ("full", "full", None), ("full+lora", "full", str(full.final_dir)),
        ("rag+lora", "rag", str(full.final_dir))]
    assert specs[1].adapter_fingerprint and specs[0].adapter_fingerprint is None


def test_retention_is_gist_over_the_trained_ceiling():
    from gistctl.bench.report import render_markdown, summarize

    def rows(column, kind, adapter, scores):
        return [{"method": column, "kind": kind, "adapter": adapter, "id": f"e{i}", "task": task, "primary": s}
                for i, (task, s) in enumerate(scores)]

    scores = {"gist[x]": [("qa", 0.2), ("qa", 0.4), ("passkey", 1.0), ("passkey", 0.0)],
              "full+lora": [("qa", 0.6), ("qa", 0.6), ("passkey", 1.0), ("passkey", 1.0)],
              "full": [("qa", 0.0), ("qa", 0.0), ("passkey", 0.0), ("passkey", 0.0)]}
    all_rows = (rows("gist[x]", "gist", "x", scores["gist[x]"]) + rows("full+lora", "full", "r", scores["full+lora"])
                + rows("full", "full", None, scores["full"]))
    metrics = summarize(all_rows, ["gist[x]", "full", "full+lora"])
    kept = metrics["retention"]
    assert kept["ceiling"] == "full+lora"
    assert kept["columns"]["gist[x]"]["accuracy"] == pytest.approx(0.4 / 0.8)
    assert kept["columns"]["gist[x]"]["tasks"] == {"passkey": pytest.approx(0.5), "qa": pytest.approx(0.5)}
    assert "## Retention (gist / full+lora)" in render_markdown(metrics)
    assert summarize(all_rows, ["gist[x]", "full"])["retention"] is None
