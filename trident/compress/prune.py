"""Structured pruning of Llama-form dense models: whole MLP channels and whole attention KV groups removed.

What is removed, per decoder layer (every layer loses the same number, so the config keeps one size per field and
the folder loads in Hugging Face transformers as well as in trident):

- ``mlp``: intermediate channel j is row j of ``gate_proj`` and ``up_proj`` (and of their biases) and column j of
  ``down_proj``.
- ``heads``: a KV group g is key/value head g with the ``num_attention_heads / num_key_value_heads`` query heads
  that read it: those heads' rows of ``q_proj``, ``k_proj``, ``v_proj`` (and biases) and columns of ``o_proj``.
  Whole groups go, so the query heads per KV head stay the same and grouped-query attention stays consistent;
  per-head norms (Qwen3's ``q_norm`` / ``k_norm``) are shared by all heads and are kept as they are.

How many (:func:`kept_count`): ``n * (1 - sparsity)`` rounded half up; for MLP channels, when the intermediate
size is a multiple of 8, to the nearest multiple of 8 (at least 8) so matmul shapes stay aligned. At least one
channel and one group are always kept. Llama only (:data:`HEADS_DIVIDE_HIDDEN`): transformers refuses a Llama
config whose ``hidden_size`` is not a multiple of ``num_attention_heads`` (even with ``head_dim`` set), so the
groups kept are the count nearest ``num_key_value_heads * (1 - sparsity)`` whose heads divide the hidden size
(ties: the smaller count).

Importance (higher is kept; ties keep the lower index), with ``||X_i||`` the L2 norm over the calibration tokens
of input feature i of the Linear layer (Wanda's activation-aware score):

- ``l1``: channel j: ``|W_gate[j]|_1 + |W_up[j]|_1 + |W_down[:, j]|_1``; group g: the sum of ``|W|`` over its
  q/k/v rows and o columns;
- ``wanda``: the same sums of ``|W_ki| * ||X_i||``: for gate/up and q/k/v rows the norms of the hidden input
  (after the norm layer), for down column j the norm of intermediate channel j, for o column c the norm of the
  attention output feature c;
- ``taylor``: first-order Taylor, ``|sum(W * dL/dW)|`` over the unit's weights, L the calibration loss
  (:mod:`trident.compress.taylor`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from trident.errors import TridentError

TARGETS = ("mlp", "heads")
METHODS = {
    "l1": "sum of |W| over the channel's or group's weights",
    "wanda": "sum of |W| times the L2 norm of its input feature on the calibration tokens",
    "taylor": "|sum of W * dL/dW| over the unit's weights, L the calibration loss",
}
"""Importance scores by name (see the module docstring)."""
NEEDS_CALIBRATION = ("wanda", "taylor")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}
"""The model types pruned (dense Llama-form decoders) and their Hugging Face class, written into config.json."""
CHANNEL_MULTIPLE = 8
HEADS_DIVIDE_HIDDEN = ("llama",)
"""Model types whose transformers config requires ``hidden_size % num_attention_heads == 0`` (transformers 5.x)."""
"""MLP sizes are rounded to a multiple of this when the original is one."""


@dataclass(frozen=True)
class PruneConfig:
    """What to remove and how to choose it."""

    sparsity: float
    """Fraction of MLP channels and of KV groups removed in every layer, 0 < sparsity < 1."""
    targets: tuple[str, ...] = TARGETS
    """Which structures are pruned: any of ``mlp`` and ``heads``."""
    method: str = "l1"
    """The importance score (a key of :data:`METHODS`)."""

    def __post_init__(self) -> None:
        s = self.sparsity
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s < 1:
            raise TridentError(f"--sparsity must be a fraction strictly between 0 and 1 (0.2 removes 20%), got {s!r}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise TridentError(f"--targets must list some of {', '.join(TARGETS)} once each (comma separated), got "
                               f"{','.join(self.targets) or 'nothing'}")
        if self.method not in METHODS:
            raise TridentError(f"unknown pruning method {self.method!r}; choose one of {', '.join(METHODS)}")


@dataclass(frozen=True)
class Shape:
    """The sizes pruning reads from the model's config."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    model_type: str = "llama"

    @classmethod
    def of(cls, config) -> Shape:
        """From the checkpoint's parsed ModelConfig (trident/config.py); a family other than the dense Llama-form
        ones is a TridentError."""
        if config.model_type not in ARCHITECTURES:
            raise TridentError(f"trident prune handles the dense Llama-form families ({', '.join(ARCHITECTURES)}); "
                               f"this model is {config.model_type!r}")
        return cls(num_layers=config.num_layers, hidden_size=config.hidden_size,
                   intermediate_size=config.intermediate_size, num_heads=config.num_heads,
                   num_kv_heads=config.num_kv_heads, head_dim=config.head_dim, model_type=config.model_type)

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass
class ActivationNorms:
    """One decoder layer's input-feature L2 norms over the calibration tokens (float64)."""

    attn_in: torch.Tensor
    """[hidden]: the input of q/k/v_proj."""
    attn_out: torch.Tensor
    """[num_heads * head_dim]: the input of o_proj."""
    mlp_in: torch.Tensor
    """[hidden]: the input of gate/up_proj."""
    mlp_mid: torch.Tensor
    """[intermediate]: the input of down_proj."""


@dataclass
class LayerPlan:
    """What one layer keeps (ascending indices) and the scores it was chosen by."""

    index: int
    channels: list[int]
    groups: list[int]
    channel_scores: torch.Tensor | None = None
    group_scores: torch.Tensor | None = None


@dataclass
class PrunePlan:
    config: PruneConfig
    shape: Shape
    layers: list[LayerPlan] = field(default_factory=list)

    @property
    def intermediate_size(self) -> int:
        return len(self.layers[0].channels)

    @property
    def num_kv_heads(self) -> int:
        return len(self.layers[0].groups)

    @property
    def num_heads(self) -> int:
        return self.num_kv_heads * self.shape.heads_per_group


def kept_count(total: int, sparsity: float, multiple: int = 1) -> int:
    """How many of ``total`` units stay at ``sparsity`` (see the module docstring for the rounding)."""
    target = total * (1 - sparsity)
    if multiple > 1 and total % multiple == 0 and total >= 2 * multiple:
        return min(total, max(multiple, multiple * math.floor(target / multiple + 0.5)))
    return min(total, max(1, math.floor(target + 0.5)))


def kept_groups(shape: Shape, sparsity: float) -> int:
    """How many KV groups every layer keeps (see the module docstring)."""
    if shape.model_type not in HEADS_DIVIDE_HIDDEN:
        return kept_count(shape.num_kv_heads, sparsity)
    valid = [n for n in range(1, shape.num_kv_heads + 1) if shape.hidden_size % (n * shape.heads_per_group) == 0]
    if not valid:
        raise TridentError(f"no number of KV groups keeps hidden_size {shape.hidden_size} a multiple of the query "
                           "heads, as transformers requires of a Llama config; prune --targets mlp only")
    target = shape.num_kv_heads * (1 - sparsity)
    return min(valid, key=lambda n: (abs(n - target), n))


def _name(layer: int, module: str, kind: str = "weight") -> str:
    return f"model.layers.{layer}.{module}.{kind}"


def _abs64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64).abs()


def channel_scores(tensors: Mapping[str, torch.Tensor], layer: int, norms: ActivationNorms | None) -> torch.Tensor:
    """Importance of each MLP channel of ``layer`` (float64 [intermediate]): l1 without ``norms``, wanda with."""
    gate, up = (_abs64(tensors[_name(layer, f"mlp.{m}")]) for m in ("gate_proj", "up_proj"))
    down = _abs64(tensors[_name(layer, "mlp.down_proj")])
    x_in = 1.0 if norms is None else norms.mlp_in[None, :]
    x_mid = 1.0 if norms is None else norms.mlp_mid
    return (gate * x_in).sum(1) + (up * x_in).sum(1) + down.sum(0) * x_mid


def group_scores(tensors: Mapping[str, torch.Tensor], layer: int, shape: Shape,
                 norms: ActivationNorms | None) -> torch.Tensor:
    """Importance of each KV group of ``layer`` (float64 [num_kv_heads]): l1 without ``norms``, wanda with."""
    d, r = shape.head_dim, shape.heads_per_group
    x_in = 1.0 if norms is None else norms.attn_in[None, :]
    x_out = 1.0 if norms is None else norms.attn_out[None, :]
    q, k, v = ((_abs64(tensors[_name(layer, f"self_attn.{m}")]) * x_in).sum(1) for m in ("q_proj", "k_proj",
                                                                                           "v_proj"))
    o = (_abs64(tensors[_name(layer, "self_attn.o_proj")]) * x_out).sum(0)
    g = shape.num_kv_heads
    return q.view(g, r * d).sum(1) + k.view(g, d).sum(1) + v.view(g, d).sum(1) + o.view(g, r * d).sum(1)


def taylor_channel_scores(products: Mapping[str, torch.Tensor], layer: int) -> torch.Tensor:
    """``|sum(W * dL/dW)|`` over each MLP channel of ``layer``; ``products``: W * dL/dW by weight name."""
    gate, up = (products[_name(layer, f"mlp.{m}")] for m in ("gate_proj", "up_proj"))
    return (gate.sum(1) + up.sum(1) + products[_name(layer, "mlp.down_proj")].sum(0)).abs()


def taylor_group_scores(products: Mapping[str, torch.Tensor], layer: int, shape: Shape) -> torch.Tensor:
    """``|sum(W * dL/dW)|`` over each KV group's q/k/v rows and o columns of ``layer``."""
    g, d, r = shape.num_kv_heads, shape.head_dim, shape.heads_per_group
    q, k, v = (products[_name(layer, f"self_attn.{m}")].sum(1) for m in ("q_proj", "k_proj", "v_proj"))
    o = products[_name(layer, "self_attn.o_proj")].sum(0)
    return (q.view(g, r * d).sum(1) + k.view(g, d).sum(1) + v.view(g, d).sum(1) + o.view(g, r * d).sum(1)).abs()


def top_indices(scores: torch.Tensor, keep: int) -> list[int]:
    """The ``keep`` highest-scoring indices in ascending order (ties keep the lower index)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:keep])


def plan_pruning(tensors: Mapping[str, torch.Tensor], shape: Shape, config: PruneConfig,
                 norms: list[ActivationNorms] | None = None,
                 products: Mapping[str, torch.Tensor] | None = None) -> PrunePlan:
    """Choose what every layer keeps; wanda needs ``norms`` (one per layer), taylor ``products`` (W * dL/dW by
    weight name, :func:`trident.compress.taylor.weight_gradient_products`)."""
    if config.method == "wanda" and (norms is None or len(norms) != shape.num_layers):
        raise TridentError("--method wanda needs the activation norms of every layer (--calib TEXT)")
    if config.method == "taylor" and products is None:
        raise TridentError("--method taylor needs the weights' gradients on calibration text (--calib TEXT)")
    use = norms if config.method == "wanda" else None
    taylor = config.method == "taylor"
    plan = PrunePlan(config, shape)
    keep_channels = kept_count(shape.intermediate_size, config.sparsity, CHANNEL_MULTIPLE)
    keep_groups = kept_groups(shape, config.sparsity)
    for i in range(shape.num_layers):
        layer_norms = None if use is None else use[i]
        layer = LayerPlan(i, list(range(shape.intermediate_size)), list(range(shape.num_kv_heads)))
        if "mlp" in config.targets:
            layer.channel_scores = (taylor_channel_scores(products, i) if taylor
                                    else channel_scores(tensors, i, layer_norms))
            layer.channels = top_indices(layer.channel_scores, keep_channels)
        if "heads" in config.targets:
            layer.group_scores = (taylor_group_scores(products, i, shape) if taylor
                                  else group_scores(tensors, i, shape, layer_norms))
            layer.groups = top_indices(layer.group_scores, keep_groups)
        plan.layers.append(layer)
    return plan


def _rows(groups: list[int], per_group: int) -> torch.Tensor:
    return torch.tensor([g * per_group + j for g in groups for j in range(per_group)], dtype=torch.long)


def pruned_tensors(tensors: Mapping[str, torch.Tensor], plan: PrunePlan) -> dict[str, torch.Tensor]:
    """Every tensor of the model with the plan's channels and groups cut out (contiguous; dtypes kept)."""
    s = plan.shape
    out = dict(tensors)
    for layer in plan.layers:
        i = layer.index
        channels = torch.tensor(layer.channels, dtype=torch.long)
        q_rows = _rows(layer.groups, s.heads_per_group * s.head_dim)
        kv_rows = _rows(layer.groups, s.head_dim)
        cuts = [(f"mlp.{m}", kind, 0, channels) for m in ("gate_proj", "up_proj") for kind in ("weight", "bias")]
        cuts += [("mlp.down_proj", "weight", 1, channels), ("self_attn.o_proj", "weight", 1, q_rows)]
        cuts += [(f"self_attn.{m}", kind, 0, rows) for m, rows in (("q_proj", q_rows), ("k_proj", kv_rows),
                                                                   ("v_proj", kv_rows)) for kind in ("weight", "bias")]
        for module, kind, dim, index in cuts:
            name = _name(i, module, kind)
            if name in out:
                out[name] = out[name].index_select(dim, index).contiguous()
    return out


def pruned_hf_config(hf_config: Mapping, plan: PrunePlan) -> dict:
    """The source's config with the pruned sizes, ``head_dim`` explicit and ``architectures`` set."""
    config = dict(hf_config)
    config.update(intermediate_size=plan.intermediate_size, num_attention_heads=plan.num_heads,
                  num_key_value_heads=plan.num_kv_heads, head_dim=plan.shape.head_dim)
    config.setdefault("architectures", [ARCHITECTURES[config["model_type"]]])
    return config


def layer_parameters(tensors: Mapping[str, torch.Tensor], layer: int) -> int:
    prefix = f"model.layers.{layer}."
    return sum(t.numel() for name, t in tensors.items() if name.startswith(prefix))


@torch.no_grad()
def activation_norms(model: nn.Module, tokens: torch.Tensor, *, batch_size: int = 8,
                     progress: Callable[[int, int], None] | None = None) -> list[ActivationNorms]:
    """Per decoder layer of trident ``model``, the L2 norm over ``tokens`` [samples, seq_len] of each input feature
    of its attention and MLP projections (forward pre-hooks on the fused ``qkv_proj`` / ``gate_up_proj`` and on
    ``o_proj`` / ``down_proj``; the model runs through :func:`trident.quant.calibrate.run_calibration`)."""
    from trident.quant.calibrate import run_calibration

    layers = model.model.layers
    sums: list[dict[str, torch.Tensor]] = [{} for _ in layers]
    modules = {"attn_in": "self_attn.qkv_proj", "attn_out": "self_attn.o_proj", "mlp_in": "mlp.gate_up_proj",
               "mlp_mid": "mlp.down_proj"}

    def hook(store: dict, key: str):
        def add(_module, args) -> None:
            x = args[0].detach().to(torch.float64)
            squares = x.reshape(-1, x.shape[-1]).square().sum(0)
            store[key] = squares if key not in store else store[key] + squares
        return add

    handles = [layer.get_submodule(path).register_forward_pre_hook(hook(sums[i], key))
               for i, layer in enumerate(layers) for key, path in modules.items()]
    try:
        run_calibration(model, tokens, batch_size=batch_size, progress=progress)
    finally:
        for handle in handles:
            handle.remove()
    return [ActivationNorms(**{key: s[key].sqrt().cpu() for key in modules}) for s in sums]
