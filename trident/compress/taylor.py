"""First-order Taylor importance for structured pruning (``trident prune --method taylor``).

Removing a unit (an MLP channel, a KV group: :mod:`trident.compress.prune`) sets its weights W to zero; to first
order the calibration loss L changes by ``-sum(W * dL/dW)`` over them, so the unit's score is
``|sum over its weights of W * dL/dW|`` (one absolute value over the whole unit). L is the mean next-token NLL of
the calibration tokens; the gradients come from Hugging Face transformers' model of the same weights (autograd
through its reference implementation; trident's engine runs inference only).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from trident.errors import TridentError

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")
"""The weights whose gradients the scores need, per decoder layer."""


def weight_gradient_products(tensors: Mapping[str, torch.Tensor], hf_config: Mapping, tokens: torch.Tensor, *,
                             batch_size: int = 8, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """``W * dL/dW`` (float64) of every projection weight of the decoder layers, by Hugging Face name; L is the
    mean NLL of the next tokens of ``tokens`` [samples, seq_len] (each row a sequence from position 0)."""
    from trident.compress.hf_model import transformers_model

    model = transformers_model(tensors, hf_config, dtype=dtype, attn_implementation="eager").eval()
    wanted = {f"model.layers.{i}.{m}.weight" for i in range(model.config.num_hidden_layers) for m in PROJECTIONS}
    params = dict(model.named_parameters())
    for name, p in params.items():
        p.requires_grad_(name in wanted)
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise TridentError(f"calibration tokens must be [samples, seq_len >= 2], got {tuple(tokens.shape)}")
    targets = tokens.shape[0] * (tokens.shape[1] - 1)
    for batch in tokens.split(batch_size):
        logits = model(batch).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                reduction="sum")
        (nll / targets).backward()
    return {name: (params[name].detach().double() * params[name].grad.double()) for name in sorted(wanted)}
