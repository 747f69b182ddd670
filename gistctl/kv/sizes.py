"""Byte counts of KV caches, measured from the model config (not quoted from theory)."""

from __future__ import annotations


def kv_geometry(config) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a decoder config; GQA models keep fewer KV heads than heads."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def kv_bytes(layers: int, kv_heads: int, head_dim: int, tokens: int, bytes_per_value: int) -> int:
    """Bytes of a KV cache: 2 (keys, values) x layers x kv_heads x tokens x head_dim x bytes."""
    return 2 * layers * kv_heads * tokens * head_dim * bytes_per_value


def kv_cache_bytes(config, tokens: int, bytes_per_value: int) -> int:
    """Bytes of a full KV cache of `tokens` tokens for a decoder config."""
    return kv_bytes(*kv_geometry(config), tokens, bytes_per_value)
