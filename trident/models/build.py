"""Build a model of a registered family from its config and Hugging Face-named tensors."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from trident.attention.base import AttentionBackend
from trident.config import ModelConfig
from trident.models.layers import RotaryEmbedding
from trident.models.registry import model_class
from trident.models.weights import LayerLoaded

if TYPE_CHECKING:
    from trident.quant.format import QuantizedModules


def build_model(config: ModelConfig, tensors: Mapping[str, torch.Tensor], *, dtype: torch.dtype,
                device: torch.device, backend: AttentionBackend,
                quantization: QuantizedModules | None = None, experts_backend: str = "torch",
                layer_loaded: LayerLoaded | None = None) -> torch.nn.Module:
    """Create the modules on the meta device (nothing allocated or initialised), then set every
    parameter from the checkpoint's tensors, without a copy where none is needed. ``quantization`` (a
    checkpoint written by ``trident quantize``): the listed Linear layers become QuantizedLinear layers holding
    the checkpoint's codes and scales as stored. ``experts_backend``: the registered name (trident/moe/registry.py)
    of the backend an MoE model runs its routed experts with (dense models have none). Layers that share weights
    (``config.shared_layers``) hold the very same modules, hence tensors, as their source layers.
    ``layer_loaded``: called with the model and each decoder layer's path once its weights are set
    (trident/models/weights.py; a tensor-parallel rank splits the layer there)."""
    cls = model_class(config.model_type)
    extra = {}
    if config.moe is not None:
        from trident.moe.registry import create_experts_backend

        extra["experts_backend"] = create_experts_backend(experts_backend)
    with torch.device("meta"):
        model = cls(config, backend, **extra)
    if quantization is not None:
        from trident.quant.format import install_quantized_modules

        tensors = install_quantized_modules(model, quantization, tensors, device, dtype)
    if config.shared_layers is not None:  # before loading: each shared module is then filled once
        from trident.models.shared_layers import tie_shared_modules

        tie_shared_modules(model, config.shared_layers)
    model.load_weights(tensors, dtype=dtype, device=device, layer_loaded=layer_loaded)
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.reset_inv_freq(device)
    return model.eval()


def meta_model(config: ModelConfig) -> torch.nn.Module:
    """The model of ``config`` on the meta device with the torch attention reference (nothing allocated), its shared
    layers tied as the engine ties them: what counting parameters or choosing layers to quantize needs."""
    from trident.attention.torch_ref import TorchAttention

    with torch.device("meta"):
        model = model_class(config.model_type)(config, TorchAttention())
    if config.shared_layers is not None:
        from trident.models.shared_layers import tie_shared_modules

        tie_shared_modules(model, config.shared_layers)
    return model
