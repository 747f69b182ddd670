"""Shared fixtures: tests never touch the user's home; tiny models are built in code."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny import save_tiny  # noqa: E402

from gistctl.models import model_cache_dir  # noqa: E402

# Resolved before any test changes the environment: the dequantized default model is reused across tests.
REAL_MODEL_CACHE = model_cache_dir()


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("GISTCTL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GISTCTL_MODEL_CACHE", str(REAL_MODEL_CACHE))
    monkeypatch.setenv("GISTCTL_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama + tokenizer directory (2 layers, 4 heads, 2 KV heads)."""
    return save_tiny(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir):
    """The tiny model loaded through gistctl's real loader, fp32 on CPU, sdpa attention."""
    from gistctl.models import load_model

    return load_model(str(tiny_model_dir), device="cpu")
