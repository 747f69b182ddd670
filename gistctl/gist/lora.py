"""LoRA + trainable gist embedding rows, and the self-describing adapter directory.

An adapter directory holds PEFT's `adapter_config.json` + `adapter_model.safetensors` (LoRA weights and
the gist rows only: `save_embedding_layers=False`), the tokenizer with its gist tokens, and `gist.json`
(K, gist ids, chunk length, base model name and fingerprint). Its fingerprint is the sha256 of the
two PEFT files.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from gistctl.config import LoraSettings
from gistctl.errors import ModelLoadError
from gistctl.gist.tokens import add_gist_tokens
from gistctl.gist.chunks import FIXED, check_chunking
from gistctl.kv.positions import SEQUENTIAL, check_layout
from gistctl.models import LoadedModel
from gistctl.runs import atomic_write_json, atomic_write_text

# PEFT calls a transformers property that transformers 5.x deprecates; nothing for our users to act on.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

GIST_META = "gist.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
NO_ADAPTER = "none"
GIST_ROWS_KEY = "trainable_tokens_delta"  # PEFT's name for the gist rows (their values, not a difference)


@dataclass
class GistModel:
    """A base model with gist tokens, optionally with a LoRA adapter (PEFT-wrapped or merged)."""

    loaded: LoadedModel
    model: torch.nn.Module
    gist_ids: list[int]
    chunk_tokens: int
    adapter_dir: str | None = None
    adapter_fingerprint: str = NO_ADAPTER
    positions: str = SEQUENTIAL  # gist position layout for compress, or auto (gistctl.kv.positions)
    chunking: str = FIXED  # how compress splits a document into chunks (gistctl.gist.chunks)

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def num_gist(self) -> int:
        return len(self.gist_ids)


def wrap_with_lora(model: torch.nn.Module, gist_ids: list[int], settings: LoraSettings):
    """PEFT LoRA on `settings.target_modules` plus trainable gist rows; everything else frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.target_modules), trainable_token_indices=list(gist_ids),
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def expected_trainable_parameters(model_config, settings: LoraSettings, num_gist: int, module_shapes: dict) -> int:
    """r x (in + out) per adapted linear per layer, plus K x hidden for the gist rows.

    `module_shapes` maps a target module name to its (in_features, out_features).
    """
    lora = sum(settings.r * (fan_in + fan_out) for fan_in, fan_out in module_shapes.values())
    return lora * model_config.num_hidden_layers + num_gist * model_config.hidden_size


def adapter_fingerprint(adapter_dir: str | Path) -> str:
    digest = hashlib.sha256()
    for name in ADAPTER_FILES:
        path = Path(adapter_dir) / name
        if not path.is_file():
            raise ModelLoadError(f"'{adapter_dir}' is not a gist adapter: {name} is missing")
        digest.update(name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def save_adapter(peft_model, loaded: LoadedModel, gist_ids: list[int], chunk_tokens: int, directory: Path,
                 extra_meta: dict | None = None, positions: str = SEQUENTIAL, chunking: str = FIXED) -> str:
    """Write the adapter directory (caller makes it atomic by writing into a temp dir); returns its fingerprint.
    `chunk_tokens`, `positions` (the gist layout) and `chunking` are what compress will use with it."""
    directory = Path(directory)
    peft_model.save_pretrained(directory, save_embedding_layers=False)
    _sort_target_modules(directory / "adapter_config.json")
    loaded.tokenizer.save_pretrained(directory)
    meta = {"num_gist": len(gist_ids), "gist_ids": list(gist_ids), "chunk_tokens": chunk_tokens,
            "positions": check_layout(positions, allow_auto=True), "chunking": check_chunking(chunking),
            "base_model": loaded.name, "base_fingerprint": loaded.fingerprint, **(extra_meta or {})}
    atomic_write_json(directory / GIST_META, meta)
    return adapter_fingerprint(directory)


def _sort_target_modules(path: Path) -> None:
    """PEFT writes target_modules in its set's order, which changes from process to process (string hashing):
    the same weights saved twice would get two fingerprints. Sorted, the file depends on the adapter alone."""
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True))


def read_gist_meta(adapter_dir: str | Path) -> dict:
    """gist.json, with the reading settings adapters saved before them lacked filled in as they were then:
    positions sequential, chunking fixed."""
    path = Path(adapter_dir) / GIST_META
    if not path.is_file():
        raise ModelLoadError(f"'{adapter_dir}' is not a gist adapter directory ({GIST_META} is missing)")
    return {"positions": SEQUENTIAL, "chunking": FIXED, **json.loads(path.read_text())}


def load_gist_model(loaded: LoadedModel, adapter_dir: str | Path | None = None, *, num_gist: int | None = None,
                    chunk_tokens: int = 1024, merge: bool = True) -> GistModel:
    """Attach gist tokens and (if given) a trained adapter to a freshly loaded base model.

    Without an adapter the gist rows are untrained (mean-initialised): useful for tests and for training.
    With `merge`, LoRA weights are folded into the base weights for faster inference.
    """
    if adapter_dir is None:
        if num_gist is None:
            raise ValueError("give an adapter directory or num_gist")
        gist_ids = add_gist_tokens(loaded.model, loaded.tokenizer, num_gist)
        return GistModel(loaded, loaded.model, gist_ids, chunk_tokens)
    adapter_dir = Path(adapter_dir)
    meta = read_gist_meta(adapter_dir)
    if meta.get("base_fingerprint") not in (None, loaded.fingerprint):
        raise ModelLoadError(f"adapter '{adapter_dir}' was trained on {meta.get('base_model')} "
                             f"(fingerprint {meta['base_fingerprint'][:12]}), but the loaded model is {loaded.name} "
                             f"(fingerprint {loaded.fingerprint[:12]}); pass the matching --model")
    gist_ids = add_gist_tokens(loaded.model, loaded.tokenizer, meta["num_gist"])
    if gist_ids != meta["gist_ids"]:
        raise ModelLoadError(f"adapter '{adapter_dir}' expects gist ids {meta['gist_ids']}, the tokenizer gave {gist_ids}")
    from peft import PeftModel

    model = PeftModel.from_pretrained(loaded.model, adapter_dir)
    if merge:
        model = model.merge_and_unload()
    model.eval()
    return GistModel(loaded, model, gist_ids, int(meta.get("chunk_tokens", chunk_tokens)), str(adapter_dir),
                     adapter_fingerprint(adapter_dir), check_layout(meta["positions"], allow_auto=True),
                     check_chunking(meta["chunking"]))


SHIPPED_ADAPTERS = Path(__file__).resolve().parents[1] / "adapters"
DEFAULT_ADAPTER = "default"


def resolve_adapter(spec: str | None) -> Path | None:
    """None -> the shipped default adapter; 'none' -> untrained gist tokens (debugging); else a directory
    or the name of a shipped adapter."""
    if spec == NO_ADAPTER:
        return None
    if spec is None:
        path = SHIPPED_ADAPTERS / DEFAULT_ADAPTER
        if not (path / GIST_META).is_file():
            raise ModelLoadError("no default gist adapter is shipped yet; pass --adapter DIR (train one with "
                                 "`gistctl train`), or --adapter none for untrained gist tokens")
        return path
    path = Path(spec).expanduser()
    if not path.exists() and (SHIPPED_ADAPTERS / spec / GIST_META).is_file():
        path = SHIPPED_ADAPTERS / spec
    if not path.is_dir():
        raise ModelLoadError(f"adapter directory '{spec}' does not exist")
    read_gist_meta(path)
    return path
