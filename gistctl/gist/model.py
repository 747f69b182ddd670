"""A base model with gist tokens and, optionally, a trained gist adapter merged in: what compress and ask run."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from gistctl.errors import ModelLoadError
from gistctl.gist.adapter import NO_ADAPTER, adapter_fingerprint, read_adapter_meta
from gistctl.gist.chunks import FIXED
from gistctl.gist.positions import SEQUENTIAL
from gistctl.gist.tokens import add_gist_tokens
from gistctl.models import LoadedModel

# PEFT calls a transformers property that transformers 5.x deprecates; nothing for our users to act on.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


@dataclass
class GistModel:
    """A base model with gist tokens, optionally with a LoRA adapter (PEFT-wrapped or merged)."""

    loaded: LoadedModel
    model: torch.nn.Module
    gist_ids: list[int]
    chunk_tokens: int
    adapter_dir: str | None = None
    adapter_fingerprint: str = NO_ADAPTER
    positions: str = SEQUENTIAL  # gist position layout for compress, or auto (gistctl.gist.positions)
    chunking: str = FIXED  # how compress splits a document into chunks (gistctl.gist.chunks)

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def num_gist(self) -> int:
        """K: gist tokens per chunk."""
        return len(self.gist_ids)


def load_gist_model(loaded: LoadedModel, adapter_dir: str | Path | None = None, *, num_gist: int | None = None,
                    chunk_tokens: int = 1024, merge: bool = True) -> GistModel:
    """Attach gist tokens and (if given) a trained adapter to a freshly loaded base model.

    Without an adapter the gist rows are untrained (mean-initialised): useful for tests and for training.
    With `merge`, LoRA weights are folded into the base weights for faster inference.
    """
    if adapter_dir is None:
        if num_gist is None:
            raise ValueError("give an adapter directory or num_gist")
        if num_gist == 0:  # the base model as it is: a press's reader with no adapter
            return GistModel(loaded, loaded.model, [], chunk_tokens)
        gist_ids = add_gist_tokens(loaded.model, loaded.tokenizer, num_gist)
        return GistModel(loaded, loaded.model, gist_ids, chunk_tokens)
    adapter_dir = Path(adapter_dir)
    meta = read_adapter_meta(adapter_dir)
    if meta.base_fingerprint not in (None, loaded.fingerprint):
        raise ModelLoadError(f"adapter '{adapter_dir}' was trained on {meta.base_model} "
                             f"(fingerprint {meta.base_fingerprint[:12]}), but the loaded model is {loaded.name} "
                             f"(fingerprint {loaded.fingerprint[:12]}); pass the matching --model")
    gist_ids = add_gist_tokens(loaded.model, loaded.tokenizer, meta.num_gist)
    if gist_ids != meta.gist_ids:
        raise ModelLoadError(f"adapter '{adapter_dir}' expects gist ids {meta.gist_ids}, the tokenizer gave {gist_ids}")
    from peft import PeftModel

    model = PeftModel.from_pretrained(loaded.model, adapter_dir)
    if merge:
        model = model.merge_and_unload()
    model.eval()
    return GistModel(loaded, model, gist_ids, meta.chunk_tokens, str(adapter_dir), adapter_fingerprint(adapter_dir),
                     meta.positions, meta.chunking)
