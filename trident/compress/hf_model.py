"""A Hugging Face transformers model built from the tensors and config trident's loader gives, for the
compression steps that need autograd (Taylor scores, distillation): trident's engine runs inference only."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from trident.errors import TridentError


def transformers_model(tensors: Mapping[str, torch.Tensor], hf_config: Mapping, *, dtype: torch.dtype = torch.float32,
                       attn_implementation: str = "sdpa") -> torch.nn.Module:
    """transformers' ``AutoModelForCausalLM`` of ``hf_config`` (a loaded checkpoint's ``hf_config``) holding
    ``tensors`` (Hugging Face names) in ``dtype``, in train mode as transformers builds it. Every weight must fit:
    a missing one (but a tied ``lm_head.weight``) or an unexpected one is a TridentError."""
    try:
        import transformers
    except ImportError:
        raise TridentError("this step runs the model through Hugging Face transformers: pip install "
                           "'transformers>=5.0'") from None
    config = dict(hf_config)
    model_type = config.pop("model_type")
    config.pop("architectures", None)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(model_type, **config),
                                                          dtype=dtype, attn_implementation=attn_implementation)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise TridentError(f"the weights do not fit transformers' {type(model).__name__}: missing "
                           f"{missing[:3]}, unexpected {unexpected[:3]}")
    return model
