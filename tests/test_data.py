"""`gistctl data`: schema, builders and CLI on the tiny tokenizer and haystacks written by the tests."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
from tiny import build_tokenizer
from typer.testing import CliRunner

from gistctl.scoring import score
from gistctl.cli.main import app
from gistctl.data.builders import build_aggregate, build_facts, build_niah, build_passkey
from gistctl.data.haystack import builtin_haystack, haystack_from_dir
from gistctl.data.lengths import count_tokens, parse_lengths
from gistctl.data.mix import build_mix, split_counts, validate_recipe
from gistctl.data.schema import read_jsonl, write_jsonl
from gistctl.errors import ConfigError, DataError

runner = CliRunner()

SUBJECTS = ["The river", "A heavy cart", "The old road", "Morning fog", "The shepherd", "A tall hedge", "The village well",
            "Evening light", "The small bakery", "A grey heron", "The stone wall", "The narrow lane", "Autumn rain"]
VERBS = ["wanders past", "rests beside", "leans toward", "drifts over", "waits near", "turns around", "follows"]
OBJECTS = ["the meadow", "the quiet farm", "the crooked fence", "the sleeping dog", "the apple trees", "the mill pond",
           "the chapel gate", "the hay barn", "the muddy ford"]


def write_haystack(folder, files=3, paragraphs=40):
    """A folder of short, plain sentences (at most ~25 tiny-tokenizer tokens each) with no digits or names."""
    folder.mkdir(parents=True, exist_ok=True)
    k = 0
    for f in range(files):
        paras = []
        for _ in range(paragraphs):
            sentences = []
            for _ in range(5):
                sentences.append(f"{SUBJECTS[k % len(SUBJECTS)]} {VERBS[(k // 3) % len(VERBS)]} "
                                 f"{OBJECTS[(k // 7) % len(OBJECTS)]}.")
                k += 1
            paras.append(" ".join(sentences))
        (folder / f"part{f}.txt").write_text("\n\n".join(paras) + "\n")
    return folder


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture
def hay_dir(tmp_path):
    return write_haystack(tmp_path / "hay")


def run(*args):
    return runner.invoke(app, ["data", *map(str, args)])


def max_sentence_tokens(tok, haystack):
    return max(count_tokens(tok, " " + s) for p in haystack.paragraphs for s in p)


# ---------------------------------------------------------------- schema


def test_write_then_read_roundtrip(tmp_path):
    record = {"id": "a", "task": "niah", "context": "Text.", "question": "Q?", "answers": ["x"], "meta": {"k": 1}}
    write_jsonl(tmp_path / "d.jsonl", [record])
    assert read_jsonl(tmp_path / "d.jsonl") == [record]
    assert not list(tmp_path.glob(".d.jsonl.*"))  # no temp file left behind


@pytest.mark.parametrize("bad, message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"id": "b", "task": "niah", "context": "c", "question": "q", "answers": ["x"]}), "missing meta"),
    (json.dumps({"id": "b", "task": "chess", "context": "c", "question": "q", "answers": ["x"], "meta": {}}),
     "unknown task 'chess'"),
    (json.dumps({"id": "b", "task": "niah", "context": "c", "question": "q", "answers": [], "meta": {}}), "answers"),
    (json.dumps({"id": "a", "task": "niah", "context": "c", "question": "q", "answers": ["x"], "meta": {}}),
     "duplicate id 'a'"),
])
def test_reader_names_the_bad_line(tmp_path, bad, message):
    good = json.dumps({"id": "a", "task": "niah", "context": "c", "question": "q", "answers": ["x"], "meta": {}})
    path = tmp_path / "d.jsonl"
    path.write_text(good + "\n\n" + bad + "\n")
    with pytest.raises(DataError, match=rf"d\.jsonl:3: .*{message}"):
        read_jsonl(path)


def test_writer_refuses_invalid_records(tmp_path):
    with pytest.raises(DataError, match="unknown task"):
        write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "task": "nope", "context": "c", "question": "q",
                                            "answers": ["x"], "meta": {}}])
    assert not (tmp_path / "d.jsonl").exists()


def test_length_specs():
    assert parse_lengths("2k..8k").items == ((2000, 8000),)
    assert parse_lengths("512,1k").items == ((512, 512), (1000, 1000))
    with pytest.raises(ConfigError, match="bad token length"):
        parse_lengths("lots")


# ---------------------------------------------------------------- determinism


BUILD_ARGS = {
    "passkey": ["--tokens", "400,800"],
    "niah": ["--tokens", "400,800"],
    "facts": ["--tokens", "600,900", "--facts", "2..5"],
    "aggregate": ["--tokens", "600,900", "--items", "3..6"],
}


@pytest.mark.parametrize("task", sorted(BUILD_ARGS))
def test_same_seed_byte_identical_other_seed_other_needles(task, tmp_path, hay_dir, tiny_model_dir):
    extra = [] if task == "passkey" else ["--haystack-dir", hay_dir]
    paths = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        paths[name] = tmp_path / f"{name}.jsonl"
        result = run(task, "--n", 6, "--seed", seed, *BUILD_ARGS[task], *extra, "--model", tiny_model_dir,
                     "-o", paths[name])
        assert result.exit_code == 0, result.output
    assert paths["a"].read_bytes() == paths["b"].read_bytes()
    a, c = read_jsonl(paths["a"]), read_jsonl(paths["c"])
    assert len(a) == 6
    if task == "aggregate":
        assert [r["meta"]["items"] for r in a] != [r["meta"]["items"] for r in c]
    else:
        assert {r["answers"][0] for r in a}.isdisjoint({r["answers"][0] for r in c})


def test_cli_prints_summary_table(tmp_path, tiny_model_dir):
    result = run("passkey", "--n", 4, "--tokens", 300, "--model", tiny_model_dir, "-o", tmp_path / "p.jsonl")
    assert result.exit_code == 0, result.output
    assert re.search(r"passkey\s*│\s*4\s*│\s*\d+\s*│\s*\d+\s*│\s*\d+", result.output), result.output
    assert "wrote 4 records" in result.output


# ---------------------------------------------------------------- needles, depth, lengths


def assert_on_sentence_boundary(context, offset):
    before = context[:offset]
    assert offset == 0 or (before[-1].isspace() and before.rstrip()[-1] in ".!?"), before[-40:]


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_niah_needle_once_at_depth(tok, hay_dir, depth):
    haystack = haystack_from_dir(hay_dir)
    slack = max_sentence_tokens(tok, haystack) + 2
    filler = "\n".join(path.read_text() for path in sorted(hay_dir.glob("*.txt")))
    records = list(build_niah(tok, n=10, seed=1, tokens=parse_lengths("500,1200"), haystack=haystack, depth=depth))
    assert {r["meta"]["kind"] for r in records} == {"code", "number", "name", "place", "date"}
    for r in records:
        context, needle, answer, offset = r["context"], r["meta"]["needle"], r["answers"][0], r["meta"]["needle_offset"]
        assert context.count(needle) == 1 and context.count(answer) == 1
        assert context[offset:].startswith(needle)
        assert answer not in filler  # derivable from the needle only
        assert_on_sentence_boundary(context, offset)
        filler_tokens = count_tokens(tok, context.replace(needle + " ", "").replace(needle, ""))
        assert abs(count_tokens(tok, context[:offset]) - depth * filler_tokens) <= slack
        assert r["meta"]["source"] == {"name": "haystack-dir:hay", "license": "user-supplied"}


@pytest.mark.parametrize("protocol", ["classic", "seed"])
def test_passkey_once_at_depth(tok, protocol):
    depths = "0,0.25,0.5,0.75,1"
    key_format = "digits5" if protocol == "classic" else "alnum6"
    records = list(build_passkey(tok, n=10, seed=2, tokens=parse_lengths("2000,3000"), depth=depths,
                                 protocol=protocol, key_format=key_format))
    slack = 300 if protocol == "seed" else 12  # the longest built-in sentence is under 400 characters
    for i, r in enumerate(records):
        key, context, offset = r["answers"][0], r["context"], r["meta"]["needle_offset"]
        pattern = r"[A-Z0-9]{6}" if protocol == "seed" else r"\d{5}"
        assert re.fullmatch(pattern, key)
        assert context.count(key) == 1
        assert_on_sentence_boundary(context, offset)
        expected = [0, 0.25, 0.5, 0.75, 1][i % 5] * r["meta"]["context_tokens"]
        assert abs(count_tokens(tok, context[:offset]) - expected) <= slack + 20
    if protocol == "seed":
        assert records[0]["question"] == "What is the passkey?"
        assert "\n\n" in records[0]["context"]  # inside filler paragraphs
        assert records[0]["meta"]["source"]["license"] in ("PSF-2.0", "Apache-2.0")


def test_facts_every_value_once_and_asked_one(tok, hay_dir):
    haystack = haystack_from_dir(hay_dir)
    for r in build_facts(tok, n=8, seed=5, tokens=parse_lengths("1500"), haystack=haystack, facts="2..12"):
        facts = r["meta"]["facts"]
        assert 2 <= len(facts) <= 12
        assert len({f["value"] for f in facts}) == len(facts)
        for fact in facts:
            assert r["context"].count(fact["value"]) == 1
            assert r["context"][fact["offset"]:].startswith(fact["statement"])
        asked = facts[r["meta"]["asked"]]
        assert r["answers"] == [asked["value"]]
        assert asked["subject"] in asked["statement"] and f"the {asked['subject']}" in r["question"]


@pytest.mark.parametrize("builder, kwargs", [
    (build_passkey, {}),
    (build_passkey, {"protocol": "seed"}),
    (build_niah, {}),
    (build_facts, {"facts": "2..6"}),
    (build_aggregate, {}),
])
def test_measured_lengths_within_5_percent(tok, builder, kwargs):
    records = list(builder(tok, n=9, seed=7, tokens=parse_lengths("700,1500,4k"), **kwargs))
    for r in records:
        measured = count_tokens(tok, r["context"])
        assert measured == r["meta"]["context_tokens"]
        assert abs(measured - r["meta"]["target_tokens"]) <= 0.05 * r["meta"]["target_tokens"]


# ---------------------------------------------------------------- aggregate


def recompute_aggregate(record):
    """Answers from the context alone, with patterns written here rather than taken from the builder."""
    patterns = {"doors": r"The door of house number (\d+) is painted (\w+)\.",
                "ships": r"The ship ([A-Z]\w+ [A-Z]\w+) arrived in port carrying (\w+)\.",
                "birds": r"On day (\d+) of the survey the observer counted a (\w+)\."}
    found = re.findall(patterns[record["meta"]["family"]], record["context"])
    values = [v for _, v in found]
    question = record["question"]
    if question.startswith("Which"):
        return ", ".join(sorted(set(values)))
    asked = re.search(r"(?:painted|carrying|count a) (\w+)\?$", question)
    if asked:
        return str(Counter(values)[asked.group(1)])
    return str(len(found))


def test_aggregate_answers_recomputed_from_context(tok, hay_dir):
    records = list(build_aggregate(tok, n=18, seed=11, tokens=parse_lengths("900,1600"),
                                   haystack=haystack_from_dir(hay_dir), items="3..10"))
    assert {(r["meta"]["family"], r["meta"]["question_type"]) for r in records} == {
        (f, q) for f in ("doors", "ships", "birds") for q in ("list", "count", "total")}
    for r in records:
        assert recompute_aggregate(r) == r["answers"][0], r["question"]
        # spread through the whole text: planted items are not all in one place
        offsets = r["meta"]["offsets"]
        assert max(offsets) - min(offsets) > 0.3 * len(r["context"]) or len(offsets) < 4


def test_aggregate_questions_choose_the_types_asked(tok, hay_dir):
    hay = haystack_from_dir(hay_dir)
    records = list(build_aggregate(tok, n=9, seed=12, tokens=parse_lengths("600"), haystack=hay, items="3..6",
                                   questions=("count", "total")))
    assert Counter(r["meta"]["question_type"] for r in records) == {"count": 6, "total": 3}
    for r in records:
        assert recompute_aggregate(r) == r["answers"][0], r["question"]
    with pytest.raises(ConfigError, match="unknown aggregate question type.*sum"):
        list(build_aggregate(tok, n=1, seed=12, tokens=parse_lengths("600"), haystack=hay, questions=("sum",)))


def test_itemized_counts_train_the_items_in_text_order_then_the_number_scored_as_before(tok, hay_dir):
    hay = haystack_from_dir(hay_dir)
    build = lambda counts: list(build_aggregate(tok, n=9, seed=13, tokens=parse_lengths("900"), haystack=hay,
                                                items="3..7", counts=counts))
    plain, itemized = build("number"), build("itemized")
    patterns = {"doors": r"painted (\w+)\.", "ships": r"carrying (\w+)\.", "birds": r"counted a (\w+)\."}
    for a, b in zip(plain, itemized):
        # the same example, question and scored answer; only what training says differs
        assert (a["context"], a["question"], a["answers"]) == (b["context"], b["question"], b["answers"])
        assert "completion" not in a["meta"]
        if b["meta"]["question_type"] == "list":
            assert "completion" not in b["meta"]
            continue
        completion = b["meta"]["completion"]
        values_in_text = re.findall(patterns[b["meta"]["family"]], b["context"])
        sequence, number = completion.rsplit(": ", 1)
        items, label = sequence.split("; ")
        assert items.split(", ") == values_in_text
        assert number == b["answers"][0] == recompute_aggregate(b)
        assert label == (b["meta"]["asked_value"] if b["meta"]["question_type"] == "count" else "all")
        assert score("aggregate", completion, b["answers"], b["meta"])["primary"] == 1.0
    with pytest.raises(ConfigError, match="unknown count format 'words'"):
        list(build_aggregate(tok, n=1, seed=13, tokens=parse_lengths("600"), haystack=hay, counts="words"))


def test_aggregate_values_sets_how_many_distinct_values_each_planted_at_least_once(tok, hay_dir):
    hay = haystack_from_dir(hay_dir)
    build = lambda **kw: list(build_aggregate(tok, n=9, seed=14, tokens=parse_lengths("900"), haystack=hay,
                                              items="4..6", questions=("list",), **kw))
    for r in build(values=6):  # capped at each context's 4..6 items: every value mentioned once
        planted = [v for _, v in r["meta"]["items"]]
        assert len(set(planted)) == len(planted)
        assert recompute_aggregate(r) == r["answers"][0]
    assert all(4 <= len({v for _, v in r["meta"]["items"]}) <= len(r["meta"]["items"]) for r in build(values="4..6"))
    some = build(values=2)
    assert all(len({v for _, v in r["meta"]["items"]}) == 2 for r in some)
    default = build()  # the palette draw every recipe so far was built with: values repeat
    assert any(len({v for _, v in r["meta"]["items"]}) < len(r["meta"]["items"]) for r in default)
    with pytest.raises(ConfigError, match="--values"):
        build(values="0..3")
    recipe = small_recipe(haystack_dir=str(hay_dir), components=[
        {"task": "aggregate", "weight": 1, "tokens": "600", "options": {"items": 3, "values": 3, "questions": "list"}}])
    records = [r for split in build_mix(tok, validate_recipe(recipe)).values() for r in split]
    assert records and all(len({v for _, v in r["meta"]["items"]}) == 3 for r in records)


def test_mix_passes_aggregate_questions_as_list_or_string(tok, hay_dir):
    for questions in (["total"], "total"):
        recipe = small_recipe(haystack_dir=str(hay_dir), components=[
            {"task": "aggregate", "weight": 1, "tokens": "600", "options": {"items": "3..5", "questions": questions}}])
        splits = build_mix(tok, validate_recipe(recipe))
        assert {r["meta"]["question_type"] for split in splits.values() for r in split} == {"total"}
    recipe = small_recipe(haystack_dir=str(hay_dir), components=[
        {"task": "aggregate", "weight": 1, "tokens": "600", "options": {"items": "3..5", "counts": "itemized"}}])
    records = [r for split in build_mix(tok, validate_recipe(recipe)).values() for r in split]
    assert all(("completion" in r["meta"]) == (r["meta"]["question_type"] != "list") for r in records)


# ---------------------------------------------------------------- qa


def write_longbench(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_qa_maps_longbench_fields(tmp_path, tiny_model_dir):
    rows = [{"input": f"Who keeps lighthouse {i}?", "context": f"Lighthouse {i} is kept by Ada number {i}. " * (i + 1),
             "answers": [f"Ada number {i}"], "dataset": "toy", "length": 10, "_id": f"row{i}"} for i in range(6)]
    rows.append({"input": "Empty?", "context": "", "answers": ["x"], "dataset": "toy", "length": 0, "_id": "empty"})
    source = write_longbench(tmp_path / "lb.jsonl", rows)
    out = tmp_path / "qa.jsonl"
    result = run("qa", "--from", source, "--model", tiny_model_dir, "-o", out)
    assert result.exit_code == 0, result.output
    records = read_jsonl(out)
    assert len(records) == 6  # the empty context is skipped
    by_id = {r["id"]: r for r in records}
    assert by_id["qa-row2"]["question"] == "Who keeps lighthouse 2?"
    assert by_id["qa-row2"]["answers"] == ["Ada number 2"]
    assert by_id["qa-row2"]["meta"]["fields"]["dataset"] == "toy"
    assert by_id["qa-row2"]["context"] == rows[2]["context"]
    # --tokens keeps only contexts that fit
    short = tmp_path / "short.jsonl"
    limit = count_tokens(build_tokenizer(), rows[1]["context"])
    assert run("qa", "--from", source, "--tokens", limit, "--model", tiny_model_dir, "-o", short).exit_code == 0
    assert {r["id"] for r in read_jsonl(short)} == {"qa-row0", "qa-row1"}


def test_qa_missing_field_is_exit_2(tmp_path, tiny_model_dir):
    source = write_longbench(tmp_path / "lb.jsonl", [{"question": "q", "context": "c", "answers": ["a"]}])
    result = run("qa", "--from", source, "--model", tiny_model_dir, "-o", tmp_path / "o.jsonl")
    assert result.exit_code == 2
    assert "no field(s) input" in result.output and "Traceback" not in result.output


# ---------------------------------------------------------------- mix


def small_recipe(**overrides):
    recipe = {"train": {"n": 12, "seed": 1}, "eval": {"n": 5, "seed": 2}, "haystack_dir": None, "components": [
        {"task": "passkey", "weight": 1, "tokens": "400..600", "options": {"key_format": "alnum6"}},
        {"task": "niah", "weight": 1, "tokens": "400..600"},
        {"task": "facts", "weight": 1, "tokens": "600..800", "options": {"facts": "2..4"}},
        {"task": "aggregate", "weight": 1, "tokens": "600..800", "options": {"items": "3..5"}}]}
    recipe.update(overrides)
    return recipe


def test_split_counts_follow_weights():
    assert split_counts(10, [0.15, 0.3, 0.3, 0.25]) == [2, 3, 3, 2]
    assert sum(split_counts(4000, [0.15, 0.3, 0.3, 0.25])) == 4000


def test_mix_held_out_split_never_shares_seeds(tok, hay_dir):
    recipe = validate_recipe(small_recipe(haystack_dir=str(hay_dir)))
    splits = build_mix(tok, recipe)
    assert len(splits["train"]) == 12 and len(splits["eval"]) == 5
    assert Counter(r["task"] for r in splits["train"]) == {"passkey": 3, "niah": 3, "facts": 3, "aggregate": 3}
    train_seeds = {r["meta"]["seed"] for r in splits["train"]}
    eval_seeds = {r["meta"]["seed"] for r in splits["eval"]}
    assert train_seeds.isdisjoint(eval_seeds)
    assert {r["answers"][0] for r in splits["train"]}.isdisjoint({r["answers"][0] for r in splits["eval"]
                                                                  if r["task"] != "aggregate"})


def test_mix_cli_writes_splits_deterministically(tmp_path, tiny_model_dir):
    import yaml

    recipe = tmp_path / "mix.yaml"
    recipe.write_text(yaml.safe_dump(small_recipe()))
    outputs = []
    for name in ("a", "b"):
        result = run("mix", "--recipe", recipe, "--model", tiny_model_dir, "-o", tmp_path / name, "--n-train", 8)
        assert result.exit_code == 0, result.output
        assert "train.jsonl" in result.output and "eval.jsonl" in result.output
        outputs.append(tmp_path / name)
    for split in ("train", "eval"):
        assert (outputs[0] / f"{split}.jsonl").read_bytes() == (outputs[1] / f"{split}.jsonl").read_bytes()
    assert len(read_jsonl(outputs[0] / "train.jsonl")) == 8


def test_shipped_recipe_is_valid():
    from pathlib import Path

    from gistctl.data.mix import load_recipe

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "configs" / "recipes" / "data_mix.yaml")
    assert recipe["train"]["seed"] != recipe["eval"]["seed"]


# ---------------------------------------------------------------- bad input -> one line, exit 2


def assert_user_error(result, message):
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_empty_haystack_dir_is_exit_2(tmp_path, tiny_model_dir):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("\n\n")
    result = run("niah", "--haystack-dir", tmp_path / "empty", "--model", tiny_model_dir, "-o", tmp_path / "o.jsonl")
    assert_user_error(result, "has no .txt files with text")
    assert not (tmp_path / "o.jsonl").exists()


def test_target_larger_than_haystack_is_exit_2(tmp_path, tiny_model_dir):
    small = write_haystack(tmp_path / "small", files=1, paragraphs=3)
    result = run("niah", "--haystack-dir", small, "--tokens", 50000, "--model", tiny_model_dir, "-o", tmp_path / "o.jsonl")
    assert_user_error(result, "fewer than the")


def test_unknown_task_in_recipe_is_exit_2(tmp_path, tiny_model_dir):
    import yaml

    recipe = small_recipe()
    recipe["components"].append({"task": "chess", "weight": 1, "tokens": 500})
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(recipe))
    result = run("mix", "--recipe", tmp_path / "mix.yaml", "--model", tiny_model_dir, "-o", tmp_path / "out")
    assert_user_error(result, "unknown task 'chess'")


def test_unknown_subcommand_is_exit_2(tmp_path):
    result = run("chess", "-o", tmp_path / "o.jsonl")
    assert result.exit_code == 2


@pytest.mark.parametrize("args, message", [
    (["passkey", "--key-format", "hex9"], "unknown key format 'hex9'"),
    (["passkey", "--protocol", "ruler"], "unknown passkey protocol 'ruler'"),
    (["niah", "--depth", "1.5"], "must lie within 0..1"),
    (["facts", "--facts", "2..31"], "must lie within 2..30"),
    (["niah", "--kinds", "code,colour"], "unknown needle kind(s) colour"),
])
def test_bad_options_are_exit_2(tmp_path, tiny_model_dir, args, message):
    result = run(*args, "--n", 2, "--tokens", 500, "--model", tiny_model_dir, "-o", tmp_path / "o.jsonl")
    assert_user_error(result, message)


def test_same_seeds_in_recipe_rejected():
    with pytest.raises(ConfigError, match="seeds must differ"):
        validate_recipe(small_recipe(eval={"n": 5, "seed": 1}))


# ---------------------------------------------------------------- haystack source


def test_builtin_haystack_is_prose_with_licence():
    haystack = builtin_haystack()
    assert haystack.license in ("PSF-2.0", "Apache-2.0")
    sentences = [s for p in haystack.paragraphs for s in p]
    assert len(sentences) > 500
    assert not any(">>>" in s or "::=" in s for s in sentences)


@pytest.mark.slow
def test_seed_protocol_on_default_tokenizer():
    from gistctl.data.lengths import load_tokenizer

    tok = load_tokenizer(None)
    for r in build_passkey(tok, n=6, seed=0, tokens=parse_lengths("2k..8k"), protocol="seed"):
        assert 2000 * 0.95 <= r["meta"]["context_tokens"] <= 8000 * 1.05
        assert abs(r["meta"]["context_tokens"] - r["meta"]["target_tokens"]) <= 0.05 * r["meta"]["target_tokens"]
        assert r["context"].count(r["answers"][0]) == 1
