"""Build a model of a registered family from its config and Hugging Face-named tensors."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from trident.attention.base import AttentionBackend
from trident.config import ModelConfig
from trident.models.layers import RotaryEmbedding
from trident.models.registry import model_class


def build_model(config: ModelConfig, tensors: Mapping[str, torch.Tensor], *, dtype: torch.dtype,
                device: torch.device, backend: AttentionBackend) -> torch.nn.Module:
    """Instantiate without initialising parameters (they are all overwritten), then load the weights."""
    cls = model_class(config.model_type)
    with torch.device("meta"):
        model = cls(config, backend)
    model = model.to_empty(device=device).to(dtype)
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.reset_inv_freq(device)
    model.load_weights(tensors)
    return model.eval()
