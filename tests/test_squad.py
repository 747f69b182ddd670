"""`gistctl data squad`: SQuAD questions among other articles' paragraphs, split by article, reproducible."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from gistctl.cli.main import app
from gistctl.data.lengths import parse_lengths
from gistctl.data.squad import NOT_IN_DOCUMENT, article_split, build_squad
from gistctl.errors import DataError


def write_squad(path, articles: int = 40):
    data = []
    for a in range(articles):
        paragraphs = []
        for p in range(3):
            context = f"Article {a} paragraph {p} says the value of item {a}-{p} is {a * 10 + p}. " * 3
            qas = [{"id": f"q{a}-{p}", "question": f"What is the value of item {a}-{p}?", "is_impossible": False,
                    "answers": [{"text": str(a * 10 + p), "answer_start": 0}]},
                   {"id": f"u{a}-{p}", "question": f"Who wrote item {a}-{p}?", "is_impossible": True, "answers": []}]
            paragraphs.append({"context": context, "qas": qas})
        data.append({"title": f"Article_{a}", "paragraphs": paragraphs})
    path.write_text(json.dumps({"version": "v2.0", "data": data}))
    return path


@pytest.fixture
def squad_file(tmp_path):
    return write_squad(tmp_path / "squad.json")


def test_gold_paragraph_among_other_articles_split_by_article(squad_file, tiny_loaded):
    tok = tiny_loaded.tokenizer
    by_split = {s: list(build_squad(tok, source=squad_file, n=8, seed=3, tokens=parse_lengths("300..600"), split=s))
                for s in ("train", "dev", "eval")}
    articles = {s: {r["meta"]["article"] for r in rows} | {a for r in rows for a in r["meta"]["distractor_articles"]}
                for s, rows in by_split.items()}
    assert not articles["train"] & articles["eval"] and not articles["dev"] & articles["eval"]
    assert not articles["train"] & articles["dev"]
    for split, rows in by_split.items():
        for r in rows:
            assert article_split(r["meta"]["article"]) == split
            assert r["meta"]["article"] not in r["meta"]["distractor_articles"]  # distractors: other articles only
            assert r["task"] == "qa" and r["answers"][0] in r["context"] and r["meta"]["answerable"]
            gold = r["context"].split("\n\n")[r["meta"]["gold_paragraph"]]
            assert r["meta"]["article"].split("_")[1] == gold.split()[1]
            assert 0.5 * r["meta"]["target_tokens"] <= r["meta"]["context_tokens"] <= 1.3 * r["meta"]["target_tokens"]
    again = list(build_squad(tok, source=squad_file, n=8, seed=3, tokens=parse_lengths("300..600"), split="eval"))
    assert again == by_split["eval"]


def test_unanswerable_share_says_not_in_the_document(squad_file, tiny_loaded):
    rows = list(build_squad(tiny_loaded.tokenizer, source=squad_file, n=30, seed=1, tokens=parse_lengths("300"),
                            split="train", unanswerable=0.5))
    impossible = [r for r in rows if not r["meta"]["answerable"]]
    assert 5 <= len(impossible) <= 25
    assert all(r["answers"] == [NOT_IN_DOCUMENT] for r in impossible)


def test_bad_inputs_are_one_line(tmp_path, squad_file, tiny_model_dir):
    runner = CliRunner()
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["data", "squad", "--from", str(tmp_path / "missing.json"), "-o", str(out),
                                 "--model", str(tiny_model_dir)])
    assert result.exit_code == 2 and "does not exist" in result.output
    (tmp_path / "bad.json").write_text('{"data": [{"no": 1}]}')
    result = runner.invoke(app, ["data", "squad", "--from", str(tmp_path / "bad.json"), "-o", str(out),
                                 "--model", str(tiny_model_dir)])
    assert result.exit_code == 2 and "not a SQuAD v2.0 JSON file" in result.output
    result = runner.invoke(app, ["data", "squad", "--from", str(squad_file), "--split", "test", "-o", str(out),
                                 "--model", str(tiny_model_dir)])
    assert result.exit_code == 2 and "unknown split" in result.output
    result = runner.invoke(app, ["data", "squad", "--from", str(squad_file), "--split", "eval", "--n", "5",
                                 "--tokens", "300", "-o", str(out), "--model", str(tiny_model_dir)])
    assert result.exit_code == 0, result.output
    assert len(out.read_text().splitlines()) == 5


def test_asking_for_more_questions_than_a_split_has(squad_file, tiny_loaded):
    with pytest.raises(DataError, match="ask for fewer"):
        list(build_squad(tiny_loaded.tokenizer, source=squad_file, n=10_000, seed=0, tokens=parse_lengths("300"),
                         split="dev"))


def test_a_mixture_draws_squad_train_from_train_articles_and_eval_from_dev(squad_file, tiny_loaded):
    from gistctl.data.mix import build_mix, validate_recipe

    recipe = validate_recipe({"train": {"n": 6, "seed": 1}, "eval": {"n": 4, "seed": 2}, "components": [
        {"task": "squad", "weight": 1, "tokens": "300", "options": {"source": str(squad_file)}}]})
    splits = build_mix(tiny_loaded.tokenizer, recipe)
    assert {article_split(r["meta"]["article"]) for r in splits["train"]} == {"train"}
    assert {article_split(r["meta"]["article"]) for r in splits["eval"]} == {"dev"}


def test_a_mixture_draws_continuations_from_train_articles_and_eval_from_dev(squad_file, tiny_loaded):
    from gistctl.data.mix import build_mix, validate_recipe
    from gistctl.errors import ConfigError

    recipe = validate_recipe({"train": {"n": 6, "seed": 1}, "eval": {"n": 4, "seed": 2}, "components": [
        {"task": "squad_continue", "weight": 1, "tokens": "300", "options": {"source": str(squad_file)}}]})
    splits = build_mix(tiny_loaded.tokenizer, recipe)
    assert {r["meta"]["kind"] for r in splits["train"] + splits["eval"]} == {"continuation"}
    assert {article_split(r["meta"]["article"]) for r in splits["train"]} == {"train"}
    assert {article_split(r["meta"]["article"]) for r in splits["eval"]} == {"dev"}
    with pytest.raises(ConfigError, match="squad_continue needs options.source"):
        validate_recipe({"train": {"n": 6, "seed": 1}, "eval": {"n": 4, "seed": 2},
                         "components": [{"task": "squad_continue", "weight": 1}]})
