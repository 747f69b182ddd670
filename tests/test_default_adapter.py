"""The shipped default adapter: it loads, it is the adapter its meta.json describes, and it reads a passkey."""

import json

import pytest

from gistctl.gist.adapter import DEFAULT_ADAPTER, SHIPPED_ADAPTERS, adapter_fingerprint, read_adapter_meta

ADAPTER = SHIPPED_ADAPTERS / DEFAULT_ADAPTER


@pytest.mark.parametrize("name", [DEFAULT_ADAPTER, "p0-digits", "full-reader"])
def test_shipped_adapter_is_small_and_self_describing(name):
    adapter = SHIPPED_ADAPTERS / name
    assert (adapter / "gist.json").is_file(), f"the {name} adapter is not shipped"
    meta = json.loads((adapter / "meta.json").read_text())
    assert meta["adapter_fingerprint"] == adapter_fingerprint(adapter)
    for key in ("recipe", "data", "step", "evals"):
        assert key in meta, key
    assert sum(p.stat().st_size for p in adapter.iterdir()) < 20 * 2**20
    gist = read_adapter_meta(adapter)
    assert gist.num_gist == meta["recipe"]["gist"]["num_gist"]


def test_full_reader_is_shipped_as_a_full_reader_and_compress_refuses_it():
    """The trained ceiling (`train --reader full`) ships beside the gist adapters for `ask --method full|rag
    --adapter full-reader`; as a gist adapter it is refused before any model loads."""
    from gistctl.engine import open_gist_model
    from gistctl.errors import DataError
    from gistctl.gist.adapter import adapter_reader

    assert adapter_reader(read_adapter_meta(SHIPPED_ADAPTERS / "full-reader")) == "full"
    assert adapter_reader(read_adapter_meta(ADAPTER)) == "gist"
    with pytest.raises(DataError, match="reads whole documents"):
        open_gist_model(None, "full-reader")


def fresh_passkeys_right(adapter: str | None, key_format: str, n: int = 3, tokens: str = "600") -> int:
    """How many of n fresh passkey documents (seed 777_000: no recipe uses it) the adapter answers from
    its blob."""
    from gistctl.scoring import passkey_match
    from gistctl.data.builders import build_passkey
    from gistctl.data.lengths import parse_lengths
    from gistctl.engine import open_gist_model
    from gistctl.kv.answer import answer_from_blob
    from gistctl.kv.compress import compress_document

    gm = open_gist_model(None, adapter, device="cpu")
    records = build_passkey(gm.tokenizer, n=n, seed=777_000, tokens=parse_lengths(tokens), key_format=key_format)
    right = 0
    for record in records:
        blob, _ = compress_document(gm, record["context"])
        answer = answer_from_blob(gm, blob, record["question"], max_new_tokens=12)
        right += passkey_match(answer.text, record["answers"][0])
    return right


@pytest.mark.slow
def test_phase0_adapter_answers_fresh_digit_passkeys_from_its_blob():
    """The shipped phase-0 adapter (digit keys, 200-400-token training documents) reads fresh ones."""
    assert fresh_passkeys_right("p0-digits", "digits5", tokens="300") == 3


def test_default_adapter_reads_one_chunk_per_1024_tokens():
    """The shipped recipe's last phase (p12-squad) trains 1024-token chunks, and the adapter ships with them."""
    meta = json.loads((ADAPTER / "meta.json").read_text())
    assert read_adapter_meta(ADAPTER).chunk_tokens == 1024
    assert meta["phases"][-1]["gist"] == meta["recipe"]["phases"][-1]["gist"] == {"chunk_tokens": 1024,
                                                                                  "positions": "auto"}
    assert meta["step"] == sum(phase["steps"] for phase in meta["phases"])


def test_default_yaml_is_the_shipped_adapters_recipe(monkeypatch):
    """`gistctl train --config configs/default.yaml` trains the shipped adapter: the recipe meta.json records
    (every phase, with the settings it changed) is that config."""
    from pathlib import Path

    from gistctl.config import config_from_dict, load_config

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # recipe paths are relative to the repo root
    meta = json.loads((ADAPTER / "meta.json").read_text())
    assert config_from_dict(meta["recipe"]) == load_config("configs/default.yaml")
    assert [p["name"] for p in meta["phases"]] == [p["name"] for p in meta["recipe"]["phases"]]


@pytest.mark.slow
def test_default_adapter_reads_fresh_passkeys_from_its_blob():
    """A regression guard: at least 7 of these 8 at 512-2k tokens (the shipped adapter reads 74 of 80 bench
    passkeys at 512-2k, as the p1-p5 adapter it continues did). The untrained gists answer none."""
    assert fresh_passkeys_right(None, "alnum6", n=8, tokens="512..2k") >= 7


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="the shipped adapter misses one or more of these 8 at 600 tokens; it reads "
                                       "74/80 of the bench's passkeys at 512-2k, 95% CI [85%, 97%] (the p1-p5 "
                                       "adapter it continues: 95.2% of 480): not every key; see README, Results")
def test_default_adapter_reads_every_fresh_passkey():
    assert fresh_passkeys_right(None, "alnum6", n=8) == 8


def test_default_adapter_reads_with_the_layout_its_last_phase_trained():
    """The last phase trained the layout compress reads with (auto: one per document); gist.json (what compress uses)
    says so, and meta.json records no other shipped layout."""
    from gistctl.gist.positions import AUTO, SEQUENTIAL

    meta, gist = json.loads((ADAPTER / "meta.json").read_text()), read_adapter_meta(ADAPTER)
    recipe = meta["recipe"]
    trained = recipe["phases"][-1]["gist"].get("positions", recipe["gist"].get("positions", SEQUENTIAL))
    assert gist.positions == trained == AUTO
    assert "positions" not in meta
