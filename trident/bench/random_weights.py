"""A random-weight Checkpoint of a shape, generated on the target device directly in the target dtype.

Every weight a model of the shape holds is listed under its Hugging Face name (so the same tensors load
into transformers: trident/bench/peers.py), then filled from one seeded generator in that order:
matrices and biases ~ N(0, 0.02) (the usual initializer range: activations stay finite through
dozens of layers in bfloat16) and norm weights at unit scale (1, or 0 for Gemma's (1 + w) norms).
The same seed, device and dtype give the same tensors; an 8B model is a few seconds of `normal_` on a
GPU, with no CPU float32 copy on the way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from trident.bench.shapes import Shape
from trident.config import ModelConfig
from trident.loader.checkpoint import Checkpoint

WEIGHT_STD = 0.02

WeightSpec = tuple[tuple[int, ...], float | None]
"""(shape, fill): fill None = N(0, WEIGHT_STD), a number = that constant."""


def weight_specs(config: ModelConfig) -> dict[str, WeightSpec]:
    """Hugging Face tensor name -> (shape, fill) of every weight a model of ``config`` loads, in a fixed
    order. Taken from the trident model built on the meta device (nothing allocated), with its fused
    projections (qkv_proj, gate_up_proj) split back into the Hugging Face parts."""
    from trident.attention.torch_ref import TorchAttention
    from trident.models.layers import RMSNorm
    from trident.models.registry import model_class

    with torch.device("meta"):
        model = model_class(config.model_type)(config, TorchAttention())
    packed = model.packed_modules
    norms = {name: module for name, module in model.named_modules() if isinstance(module, RMSNorm)}
    specs: dict[str, WeightSpec] = {}
    checkpoint_names = getattr(model, "checkpoint_names", {})

    def hf_name(name: str) -> str:
        for ours, theirs in checkpoint_names.items():
            name = name.replace(ours, theirs)
        return name

    for name, param in model.named_parameters():
        module_name, _, _ = name.rpartition(".")
        fill = None
        if module_name in norms:
            fill = 0.0 if norms[module_name].unit_offset else 1.0
        fused = next((f for f in packed if f".{f}." in name), None)
        if fused is None:
            specs[hf_name(name)] = (tuple(param.shape), fill)
            continue
        for part, rows in packed[fused]:
            specs[hf_name(name.replace(f".{fused}.", f".{part}."))] = ((rows, *param.shape[1:]), fill)
    return specs


def random_checkpoint(shape: Shape, *, device: torch.device | str, dtype: torch.dtype, seed: int = 0,
                      on_tensor: Callable[[int], None] | None = None) -> Checkpoint:
    """A Checkpoint of ``shape`` with random weights on ``device`` in ``dtype`` (no tokenizer: prompts are
    token ids). ``on_tensor(nbytes)`` is called after each tensor (a progress bar's hook)."""
    config = ModelConfig.from_hf_dict(shape.hf_config)
    device = torch.device(device)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, (dims, fill) in weight_specs(config).items():
        tensor = torch.empty(dims, dtype=dtype, device=device)
        if fill is None:
            tensor.normal_(0.0, WEIGHT_STD, generator=generator)
        else:
            tensor.fill_(fill)
        tensors[name] = tensor
        if on_tensor is not None:
            on_tensor(tensor.nbytes)
    dtype_name = str(dtype).removeprefix("torch.")
    return Checkpoint(config=config, tensors=tensors, tensor_types=dict.fromkeys(tensors, dtype_name.upper()),
                      tokenizer=None, format="random", path=f"shape:{shape.name}", file_bytes=0,
                      hf_config=shape.hf_config)


def checkpoint_bytes(shape: Shape, dtype: torch.dtype) -> int:
    """Bytes ``random_checkpoint`` will allocate (for a progress bar's total)."""
    config = ModelConfig.from_hf_dict(shape.hf_config)
    element = torch.empty((), dtype=dtype).element_size()
    return sum(_numel(dims) for dims, _ in weight_specs(config).values()) * element


def _numel(dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n
