"""LoRA wrapping for training: PEFT LoRA on the attention projections plus trainable gist embedding rows."""

from __future__ import annotations

import torch

from gistctl.config import LoraSettings

GIST_ROWS_KEY = "trainable_tokens_delta"  # PEFT's name for the gist rows (their values, not a difference)


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
