"""The LM head as int8: an opt-in part of a quantized model (``trident quantize --lm-head int8``, ``trident bench
--lm-head int8``).

Round-to-nearest quantization leaves the head and embeddings in the model dtype by default (rtn.NEVER_QUANTIZED).
At batch 1 the head is the largest single read of a decode step (Llama-3-8B: 128256 x 4096, 1.05 GB in bfloat16,
~0.24 ms on an H200), so llama.cpp's 8-bit files store it as Q8_0 and its 4-bit mixes at 6 bits. Here the head
becomes int8 per output channel, symmetric (:func:`head_config`), whatever the other layers' bits:

- an untied head (``lm_head``) becomes a QuantizedLinear;
- a tied one is the token embedding table: ``model.embed_tokens`` becomes a QuantizedEmbedding (its rows come out
  dequantized; as the head it is a QuantizedLinear over the same codes), so the lookups read the int8 table too.

Per channel is per vocabulary row: each row's error is at most half its scale (absmax / 254), the weight error
int8 layers already have. The quantized folder lists the module with :func:`head_config` in ``module_configs``;
the loader installs it like any listed module (trident/quant/format.py). Torch-free at import (the CLI parsers
take HEAD_CHOICES from here).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trident.errors import TridentError

if TYPE_CHECKING:
    from torch import nn

    from trident.quant.rtn import QuantConfig

HEAD_CHOICES = ("float", "int8")
"""--lm-head: keep the model dtype, or int8 (:func:`head_config`)."""


def head_config() -> QuantConfig:
    """How the LM head is quantized: int8, per output channel, symmetric."""
    from trident.quant.rtn import QuantConfig

    return QuantConfig(bits=8)


def listed_head(modules: tuple[str, ...]) -> str | None:
    """The head among a quantized checkpoint's listed modules (``lm_head``, or a tied head's ``embed_tokens``
    table, as :func:`head_module` names them), or None: the head stayed float."""
    return next((name for name in modules if name == "lm_head" or name.endswith("embed_tokens")), None)


def head_module(model: nn.Module) -> str:
    """The name of the module that computes ``model``'s logits: ``lm_head``, or the embedding table it is tied to."""
    from trident.models.layers import Embedding, Linear

    if isinstance(getattr(model, "lm_head", None), Linear):
        return "lm_head"
    tables = [name for name, module in model.named_modules()
              if isinstance(module, Embedding) and name.endswith("embed_tokens")]
    if len(tables) != 1:
        raise TridentError(f"cannot tell which module is {type(model).__name__}'s LM head: no lm_head Linear and "
                           f"{len(tables)} embed_tokens tables")
    return tables[0]


def quantize_head(model: nn.Module) -> str:
    """Replace ``model``'s head (see :func:`head_module`) by its int8 twin, in place, where its weight lies; returns
    the module's name."""
    from trident.models.layers import Embedding
    from trident.quant.embedding import QuantizedEmbedding
    from trident.quant.linear import QuantizedLinear, replace_module
    from trident.quant.rtn import quantize

    name = head_module(model)
    module = model.get_submodule(name)
    if isinstance(module, Embedding):
        num, dim = module.weight.shape
        config = head_config()
        replace_module(model, name, QuantizedEmbedding(num, dim, config, quantize(module.weight, config),
                                                       module.weight.dtype))
    else:
        replace_module(model, name, QuantizedLinear.from_linear(module, head_config()))
    return name
