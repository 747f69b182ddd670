"""The `Method` protocol and its registry. Adding a method is one new module that calls `register`."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch


@dataclass
class Answer:
    """One answer and what it cost at question time."""

    text: str
    ttft_ms: float  # question submitted -> first answer token chosen
    decode_tokens_per_s: float
    prompt_tokens: int  # tokens the model had to process at question time (cache entries excluded)
    peak_memory_bytes: int  # CUDA max allocated, or the process's peak RSS on CPU


class Method(Protocol):
    """`prepare` once per document, then `answer` any number of questions from its state."""

    name: str

    def prepare(self, document: str) -> Any: ...

    def answer(self, state: Any, question: str) -> Answer: ...

    def state_bytes(self, state: Any) -> int:
        """Bytes that must be kept per document to answer later questions."""
        ...


REGISTRY: dict[str, Callable[..., Method]] = {}
_MODULES = {"full": "gistctl.methods.full", "rag": "gistctl.methods.rag", "gist": "gistctl.methods.gist"}


def register(name: str):
    def decorator(factory):
        REGISTRY[name] = factory
        return factory

    return decorator


def get_method(name: str, **kwargs) -> Method:
    """Build the method registered under `name` (its module is imported on first use)."""
    if name not in REGISTRY and name in _MODULES:
        importlib.import_module(_MODULES[name])
    if name not in REGISTRY:
        from gistctl.errors import ConfigError

        raise ConfigError(f"unknown method '{name}'; choose from {', '.join(sorted(_MODULES))}")
    return REGISTRY[name](**kwargs)
