"""A forward pass under the gist mask: the one place batches meet the model."""

from __future__ import annotations

import torch

from gistctl.gist.mask import mask_for_model


def gist_forward(model, batch: dict[str, torch.Tensor], **kwargs):
    """`model(...)` on a collated batch (input_ids, position_ids, attend) with the mask converted for its backend."""
    device = next(model.parameters()).device
    return model(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                 attention_mask=mask_for_model(batch["attend"], model), **kwargs)
