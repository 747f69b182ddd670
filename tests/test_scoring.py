"""Bench metrics on hand-made predictions: right, wrong, formatted, empty, multi-span."""

from __future__ import annotations

import math

import pytest

from gistctl.bench.report import mean_ci95
from gistctl.scoring import (
    contains,
    count_match,
    exact_match,
    first_answer_spans,
    first_number,
    list_recall,
    normalize,
    passkey_match,
    score,
    token_f1,
)
from gistctl.errors import DataError


# --- normalize ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The  Eiffel Tower!", "eiffel tower"),
        ("  A cat, an owl; THE dog.  ", "cat owl dog"),
        ("theatre", "theatre"),  # articles only as whole words
        ("", ""),
        ("...", ""),
    ],
)
def test_normalize(text, expected):
    assert normalize(text) == expected


# --- first answer span / exact match -----------------------------------------------------------------


def test_first_answer_spans_first_line_label_and_sentence_prefixes():
    assert first_answer_spans("\n  **Answer:** Paris. It is big.\nLondon") == [
        "Paris",
        "Paris. It is big",
        "Paris. It is big.",
    ]
    assert first_answer_spans("") == []
    assert first_answer_spans("   \n\n") == []


@pytest.mark.parametrize(
    "prediction",
    [
        "Paris",
        "paris",
        "Paris.",
        "  **Paris**  ",
        "Answer: Paris",
        "The Paris.",
        "Paris. It is the capital of France.",
        "Paris\nThe question asked about London.",
        "\n\nParis",
    ],
)
def test_exact_match_right_and_formatted(prediction):
    assert exact_match(prediction, ["Paris"]) == 1.0


@pytest.mark.parametrize(
    "prediction",
    [
        "London",  # wrong
        "",  # empty
        "   \n ",
        "Paris, the capital of France",  # extra words in the span
        "It is Paris.",  # answer not at the start of the span
        "I think\nParis",  # answer only on a later line
        "Parisian",
    ],
)
def test_exact_match_scores_zero(prediction):
    assert exact_match(prediction, ["Paris"]) == 0.0


def test_exact_match_keeps_abbreviations_and_decimals():
    assert exact_match("Dr. Smith", ["Dr. Smith"]) == 1.0
    assert exact_match("Dr. Smith. He lived in Rome.", ["Dr Smith"]) == 1.0
    assert exact_match("3.5 meters", ["3.5 meters"]) == 1.0
    assert exact_match("3.5 meters", ["3"]) == 0.0


def test_exact_match_any_gold_and_empty_golds():
    assert exact_match("NYC", ["New York City", "NYC"]) == 1.0
    assert exact_match("anything", []) == 0.0
    assert exact_match("", ["the"]) == 0.0  # a gold that normalizes to nothing never matches
    assert exact_match("the", ["the"]) == 0.0


# --- contains ----------------------------------------------------------------------------------------


def test_contains():
    assert contains("I believe the answer is Paris, France.", ["Paris"]) == 1.0
    assert contains("the blue whale, of course", ["Blue Whale"]) == 1.0
    assert contains("London", ["Paris"]) == 0.0
    assert contains("", ["Paris"]) == 0.0
    assert contains("a category error", ["cat"]) == 0.0  # whole words only
    assert contains("blue and whale", ["blue whale"]) == 0.0  # phrase, not bag of words
    assert contains("Paris", []) == 0.0


# --- token F1 ----------------------------------------------------------------------------------------


def test_token_f1_exact_partial_and_zero():
    assert token_f1("Barack Obama", ["Barack Obama"]) == 1.0
    assert token_f1("Obama", ["Barack Obama"]) == pytest.approx(2 / 3)  # P=1, R=1/2
    assert token_f1("President Barack Obama", ["Barack Obama"]) == pytest.approx(0.8)  # P=2/3, R=1
    assert token_f1("George Bush", ["Barack Obama"]) == 0.0
    assert token_f1("", ["Barack Obama"]) == 0.0
    assert token_f1("Obama", []) == 0.0


def test_token_f1_max_over_golds_and_first_span_only():
    assert token_f1("Obama", ["Barack Obama", "Obama"]) == 1.0
    # The rambling after the first sentence does not dilute the score ...
    assert token_f1("Barack Obama. He was president from 2009.", ["Barack Obama"]) == 1.0
    # ... and an answer only on a later line earns nothing.
    assert token_f1("Let me think.\nBarack Obama", ["Barack Obama"]) == 0.0


def test_token_f1_counts_repeated_tokens_once_each():
    # "new new" shares one "new" with the gold: P=1/2, R=1/2.
    assert token_f1("new new", ["new york"]) == pytest.approx(0.5)


# --- list recall -------------------------------------------------------------------------------------


def test_list_recall():
    items = ["apples", "pears", "New York"]
    assert list_recall("New York, pears and apples", items) == 1.0
    assert list_recall("- apples\n- pears", items) == pytest.approx(2 / 3)
    assert list_recall("bananas", items) == 0.0
    assert list_recall("", items) == 0.0
    assert list_recall("pineapples and yorkshire", items) == 0.0  # whole words only
    assert list_recall("apples apples apples", items) == pytest.approx(1 / 3)  # repeats do not count twice
    assert list_recall("apples", ["Apples", "apples."]) == 1.0  # golds de-duplicated after normalizing
    assert list_recall("apples", []) == 0.0


# --- passkey -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prediction",
    [
        "7K2P9A",
        "The passkey is 7K2P9A.",
        "**7K2P9A**",
        "7k2p9a",
        "7K2P9A\n",
        "`7K2P9A`",
        "Passkey: 7K2P9A. I found it in the 3rd paragraph.",  # short digit tokens are not key candidates
        "7K2P9A (7k2p9a)",  # the same key twice
        "Sure! The passkey is: \"7K2P9A\"",
    ],
)
def test_passkey_match_tolerates_formatting(prediction):
    assert passkey_match(prediction, "7K2P9A") == 1.0


@pytest.mark.parametrize(
    "prediction",
    [
        "7K2P9B",  # wrong key
        "7K2P9AB",  # extra character
        "K2P9A",  # missing character
        "7K2 P9A",  # split key
        "passkey7K2P9A",  # glued to a word
        "",
        "I do not know the passkey.",
        "7K2P9A or 7K2P9B",  # two different candidates, one right: hedging scores 0
        "It is either 7K2P9A or K2P9A",
    ],
)
def test_passkey_match_scores_zero(prediction):
    assert passkey_match(prediction, "7K2P9A") == 0.0


def test_passkey_match_numeric_and_letter_keys():
    assert passkey_match("The pass key is 68123.", "68123") == 1.0
    assert passkey_match("68123 and then 68124", "68123") == 0.0
    assert passkey_match("6812", "68123") == 0.0
    assert passkey_match("The passkey is QXZTRW.", "QXZTRW") == 1.0
    assert passkey_match("qxztrw", "QXZTRW") == 1.0
    assert passkey_match("QXZTRW or QXZTRV", "QXZTRW") == 0.0


def test_passkey_match_rejects_unusable_key():
    with pytest.raises(DataError):
        passkey_match("7K2P9A", "")
    with pytest.raises(DataError):
        passkey_match("7K2-P9A", "7K2-P9A")


# --- count -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("There are 7 cats.", 7),
        ("seven", 7),
        ("Twenty-one times, not 3.", 21),
        ("two hundred and five", 205),
        ("1,024 rows", 1024),
        ("3.5 on average", 3.5),
        ("In the 1st part there are 4", 4),  # ordinals are not counts
        ("three and four", 3),
        ("None.", 0),
        ("no number here", None),
        ("", None),
    ],
)
def test_first_number(text, expected):
    assert first_number(text) == expected


def test_count_match():
    assert count_match("There are 7 cats.", 7) == 1.0
    assert count_match("Seven.", "7") == 1.0
    assert count_match("7", "seven") == 1.0
    assert count_match("The word appears 12 times.", "12") == 1.0
    assert count_match("There are 8 cats.", 7) == 0.0  # wrong
    assert count_match("", 7) == 0.0  # empty
    assert count_match("many", 7) == 0.0
    assert count_match("Not 7 but 8.", 7) == 1.0  # the first number decides, by definition
    assert count_match("Either 8 or 7.", 7) == 0.0  # multi-span: only the first number counts
    assert count_match("7.5", 7) == 0.0
    assert count_match("70", 7) == 0.0
    with pytest.raises(DataError):
        count_match("7", "many")


# --- score -------------------------------------------------------------------------------------------


def test_score_always_returns_em_contains_f1_and_primary():
    for task, meta in [("passkey", None), ("niah", None), ("facts", None), ("qa", None),
                       ("aggregate", {"kind": "list"}), ("aggregate", {"kind": "count"})]:
        answers = ["7"] if task in ("passkey", "aggregate") else ["Paris"]
        scores = score(task, "7", answers, meta)
        assert {"em", "contains", "f1", "primary"} <= set(scores)
        assert all(0.0 <= v <= 1.0 for v in scores.values())


def test_score_picks_primary_per_task():
    s = score("passkey", "The passkey is 7K2P9A.", ["7K2P9A"])
    assert s["primary"] == s["passkey"] == 1.0
    assert s["em"] == 0.0  # em alone would miss the formatted answer

    s = score("niah", "The magic number is 42.", ["42"])
    assert s["primary"] == s["em"] == 0.0
    assert s["contains"] == 1.0

    s = score("facts", "42", ["42"])
    assert s["primary"] == 1.0

    s = score("qa", "President Barack Obama", ["Barack Obama"])
    assert s["primary"] == s["f1"] == pytest.approx(0.8)

    s = score("aggregate", "red, green", ["red", "green", "blue", "yellow"], {"kind": "list"})
    assert s["primary"] == s["list_recall"] == 0.5

    s = score("aggregate", "There are five.", ["5"], {"kind": "count"})
    assert s["primary"] == s["count"] == 1.0
    s = score("aggregate", "There are six.", ["5"], {"kind": "count"})
    assert s["primary"] == 0.0


def test_score_rejects_unknown_task_and_missing_kind():
    with pytest.raises(DataError, match="unknown task"):
        score("summarize", "x", ["x"])
    with pytest.raises(DataError, match="kind"):
        score("aggregate", "x", ["x"])
    with pytest.raises(DataError, match="kind"):
        score("aggregate", "x", ["x"], {"kind": "mean"})


# --- confidence interval -----------------------------------------------------------------------------


def test_mean_ci95_empty_and_single():
    mean, low, high = mean_ci95([])
    assert math.isnan(mean) and math.isnan(low) and math.isnan(high)
    mean, low, high = mean_ci95([0.4])
    assert mean == 0.4 and math.isnan(low) and math.isnan(high)
    # One binary outcome still gets a (wide) Wilson interval.
    mean, low, high = mean_ci95([1.0])
    assert mean == 1.0 and low == pytest.approx(0.2065, abs=1e-3) and high == 1.0


def test_mean_ci95_wilson_for_proportions():
    # Wilson interval for 7/10 at 95%: (0.3968, 0.8922).
    mean, low, high = mean_ci95([1] * 7 + [0] * 3)
    assert mean == pytest.approx(0.7)
    assert low == pytest.approx(0.3968, abs=1e-3)
    assert high == pytest.approx(0.8922, abs=1e-3)
    # All correct: not a zero-width interval.
    mean, low, high = mean_ci95([1.0] * 20)
    assert mean == 1.0 and high == 1.0 and low == pytest.approx(0.8389, abs=1e-3)


def test_mean_ci95_normal_for_fractions():
    values = [0.2, 0.4, 0.6, 0.8]
    mean, low, high = mean_ci95(values)
    std = math.sqrt(sum((v - 0.5) ** 2 for v in values) / 3)
    assert mean == pytest.approx(0.5)
    assert low == pytest.approx(0.5 - 1.96 * std / 2, abs=1e-3)
    assert high == pytest.approx(0.5 + 1.96 * std / 2, abs=1e-3)
    # Clipped to [0, 1] for bounded scores; not clipped for unbounded values.
    assert mean_ci95([0.0, 0.1, 0.9])[1] == 0.0
    assert mean_ci95([-3.0, 5.0])[1] < -3.0
    # No spread: zero-width interval.
    assert mean_ci95([0.5, 0.5, 0.5]) == (0.5, 0.5, 0.5)


def test_aggregate_records_as_the_builder_writes_them():
    from gistctl.scoring import score

    listed = {"question_type": "list"}
    assert score("aggregate", "blue, green and red", ["blue, red"], listed)["primary"] == 1.0
    assert score("aggregate", "blue", ["blue, red"], listed)["primary"] == 0.5
    for kind in ("count", "total"):
        assert score("aggregate", "There are 4.", ["4"], {"question_type": kind})["primary"] == 1.0
        assert score("aggregate", "There are 5.", ["4"], {"question_type": kind})["primary"] == 0.0


def test_every_aggregate_question_type_the_builder_asks_is_scored():
    """A question type added to the builder without a scoring rule would fail the bench at its first row."""
    import inspect

    from gistctl.scoring import score
    from gistctl.data.builders import build_aggregate
    from gistctl.data.needles import AGGREGATE_QUESTIONS

    assert inspect.signature(build_aggregate).parameters["questions"].default == AGGREGATE_QUESTIONS
    for kind in AGGREGATE_QUESTIONS:
        assert score("aggregate", "4", ["4"], {"question_type": kind})["primary"] == 1.0
