"""Two hooks into the model's attention that presses need, behind transformers' own attention registry.

- `observe_attention(model, fn)`: `fn(module, query, key, value, scaling)` sees every layer's attention module, its
  post-RoPE queries (batch, heads, Q, head_dim), keys and values (batch, kv_heads, cache + Q, head_dim) and the
  logit scale the model uses, as the model runs; presses score cached entries with it.
- `entry_masks(model, keep)`: keep (layers, kv_heads, entries) bool hides the cache entries marked False from every
  query of that layer and KV head (a press blob's padding: kept counts differ per head, the cache is one length).

Both wrap `sdpa` in `ALL_ATTENTION_FUNCTIONS` (transformers.modeling_utils) once; with neither active, the wrapper
calls the original function unchanged. Only sdpa models are supported (the default `load_model` loads).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from gistctl.errors import DataError

_STATE = "_gistctl_press_state"  # attribute set on each attention module while a context manager is active


def attention_modules(model) -> list[torch.nn.Module]:
    """The self-attention module of every decoder layer, in layer order; refuse a model whose attention this
    cannot observe (no sdpa, no layer index, not a decoder of attention layers)."""
    config = model.config
    implementation = getattr(config, "_attn_implementation", None)
    modules = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")
               and hasattr(m, "scaling")]
    if implementation != "sdpa" or len(modules) != getattr(config, "num_hidden_layers", -1):
        raise DataError(f"presses need a decoder whose attention gistctl can observe (sdpa attention with one "
                        f"self-attention module per layer); this model has attention '{implementation}' and "
                        f"{len(modules)} such modules for {getattr(config, 'num_hidden_layers', '?')} layers")
    return sorted(modules, key=lambda m: m.layer_idx)


def _install() -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    original = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if getattr(original, "_gistctl_wrapped", False):
        return

    def sdpa_with_presses(module, query, key, value, attention_mask, *args, **kwargs):
        state = getattr(module, _STATE, None)
        if state is None:
            return original(module, query, key, value, attention_mask, *args, **kwargs)
        if state.get("observe") is not None:
            scaling = kwargs.get("scaling")
            state["observe"](module, query, key, value, module.scaling if scaling is None else scaling)
        keep = state.get("keep")
        if keep is None:
            return original(module, query, key, value, attention_mask, *args, **kwargs)
        return _masked_sdpa(module, query, key, value, attention_mask, keep[module.layer_idx], kwargs.get("scaling"))

    sdpa_with_presses._gistctl_wrapped = True
    AttentionInterface.register("sdpa", sdpa_with_presses)


def _masked_sdpa(module, query, key, value, attention_mask, keep, scaling):
    """sdpa with keep (kv_heads, entries) ANDed into the mask of the first `entries` keys, per KV head.
    query (batch, heads, Q, d); key/value (batch, kv_heads, K, d); returns (batch, Q, heads, d) as sdpa does.

    The query heads of a KV group are packed as extra query rows of that KV head (batch, kv_heads, groups x Q, d),
    so keys are never copied per query head and the mask is one (kv_heads, K) row set per group."""
    groups = module.num_key_value_groups
    batch, heads, q_len, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    entries = keep.shape[-1]
    per_head = torch.ones(kv_heads, k_len, dtype=torch.bool, device=query.device)
    per_head[:, :entries] = keep.to(query.device)
    if attention_mask is None:
        base = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)[None, None]
    else:
        base = attention_mask[..., :k_len]  # (batch, 1, Q, K), bool or additive
    base = base[:, :, None].expand(batch, 1, groups, q_len, k_len)  # (batch, 1, groups, Q, K)
    hide = ~per_head[None, :, None, None, :]  # (1, kv_heads, 1, 1, K)
    if base.dtype == torch.bool:
        mask = base & ~hide
    else:
        mask = base.masked_fill(hide, torch.finfo(base.dtype).min)
    mask = mask.reshape(batch, kv_heads, groups * q_len, k_len)
    packed = query.reshape(batch, kv_heads, groups * q_len, dim)
    out = torch.nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=mask,
                                                           scale=scaling if scaling is not None else module.scaling)
    return out.reshape(batch, heads, q_len, dim).transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def _state(model, **state) -> Iterator[None]:
    modules = attention_modules(model)
    _install()
    previous = [getattr(m, _STATE, None) for m in modules]
    for m, old in zip(modules, previous):
        setattr(m, _STATE, {**(old or {}), **state})
    try:
        yield
    finally:
        for m, old in zip(modules, previous):
            setattr(m, _STATE, old)


def observe_attention(model, fn: Callable[..., None]):
    """Context manager: `fn(module, query, key, value, scaling)` on every attention call (see the module docstring)."""
    return _state(model, observe=fn)


def entry_masks(model, keep: torch.Tensor | None):
    """Context manager: hide cache entries where keep (layers, kv_heads, entries) is False. None: no-op."""
    if keep is None or bool(keep.all()):
        return contextlib.nullcontext()
    return _state(model, keep=keep)
