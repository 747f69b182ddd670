import os
import time

import pytest
import torch

from gistctl.errors import ModelLoadError
from gistctl.models import default_model_dir, load_embedder, load_model, resolve_dtype


def test_local_directory_round_trip(tiny_model_dir, tmp_path):
    first = load_model(str(tiny_model_dir), device="cpu")
    first.model.save_pretrained(tmp_path / "copy")
    first.tokenizer.save_pretrained(tmp_path / "copy")
    second = load_model(str(tmp_path / "copy"), device="cpu")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(first.model(ids).logits, second.model(ids).logits)
    assert first.fingerprint == second.fingerprint


def test_fingerprint_changes_with_weights(tiny_model_dir, tmp_path):
    from tiny import save_tiny

    other = save_tiny(tmp_path / "other", seed=1)
    assert load_model(str(tiny_model_dir)).fingerprint != load_model(str(other)).fingerprint


def test_cpu_policy_is_fp32():
    assert resolve_dtype(torch.device("cpu")) == torch.float32


def test_four_bit_without_cuda_is_a_clear_error(tiny_model_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ModelLoadError, match="4-bit loading needs a CUDA GPU"):
        load_model(str(tiny_model_dir), load_in_4bit=True)


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nothing-here") + "/")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path / "empty"))


@pytest.mark.slow
def test_default_model_cache_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("GISTCTL_MODEL_CACHE", str(tmp_path / "models"))
    path = default_model_dir()
    config = path / "config.json"
    mtime = config.stat().st_mtime_ns
    time.sleep(0.01)
    assert default_model_dir() == path
    assert config.stat().st_mtime_ns == mtime  # not dequantized again
    assert not [p for p in os.listdir(tmp_path / "models") if p.startswith(".")]  # no temp dir left


@pytest.mark.slow
def test_default_model_answers_capital_of_france():
    from gistctl import prompt
    from gistctl.generation import greedy_generate

    loaded = load_model()
    config = loaded.model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    ids = prompt.chat_ids(loaded.tokenizer, "What is the capital of France?")
    gen = greedy_generate(loaded.model, loaded.tokenizer, ids, max_new_tokens=16,
                          stop_ids=prompt.stop_ids(loaded.model, loaded.tokenizer))
    assert "Paris" in gen.text


@pytest.mark.slow
def test_default_embedder_embeds_offline():
    embedder = load_embedder()
    vectors = embedder.encode(["a lighthouse keeper", "the keeper of a lighthouse", "tax law"])
    assert vectors.shape == (3, 384)
    sims = vectors @ vectors.T
    assert sims[0, 1] > sims[0, 2]
