"""Sparse upcycling: a dense Llama-form model turned into a Mixtral-form mixture of experts.

Every decoder layer's gated MLP (gate_proj, up_proj, down_proj) becomes ``num_experts`` experts, each starting as
a copy of it (Mixtral's ``block_sparse_moe.experts.{e}.w1`` = gate, ``w3`` = up, ``w2`` = down), plus a router
(``block_sparse_moe.gate.weight``, [num_experts, hidden]). Attention, norms and embeddings are copied unchanged.
The idea is sparse upcycling (Komatsuzaki et al., 2023): start a mixture of experts from a trained dense model
rather than from scratch, so that it begins as good as the dense model and further training only has to teach the
experts to specialise.

Mixtral takes a softmax over the router's logits, keeps the top k and renormalises those k weights to sum to 1. So
with identical experts the MoE layer's output is exactly the dense MLP's, whatever the router says: an unperturbed
upcycled model computes the dense model's logits (up to float rounding), which is what the tests check.

Identical experts also receive identical gradients, up to their routing weights, and so stay alike for a long
time. Two seeded ways to make them differ, both off by default (an exact copy of the dense model):

- ``reinit_fraction`` r, after Drop-Upcycling (Nakamura et al., 2025): in each expert a random r of the
  intermediate neurons (a different draw per expert and layer) are drawn afresh: their rows of w1 and w3 and their
  column of w2 are replaced by normal samples with the mean and standard deviation of that whole matrix. The other
  neurons keep the dense weights, so each expert keeps most of what the dense MLP knew and owns some new capacity.
- ``noise`` s: every expert matrix gets Gaussian noise of standard deviation s times that matrix's own standard
  deviation (a small, dense perturbation; the experts differ everywhere a little).

The router is drawn from a seeded normal with a small standard deviation (``router_std``), so the initial routing
is close to uniform and no expert starts favoured.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from trident.errors import TridentError

DENSE_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
"""The dense families upcycled (Llama-form: no attention or MLP bias, gated MLP), by Hugging Face model_type."""
MLP_PARTS = (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2"))
"""Dense MLP matrix -> Mixtral's per-expert name (w1 gate, w3 up, w2 down)."""
MOE_DROPPED_KEYS = ("architectures", "attention_bias", "mlp_bias", "pretraining_tp", "model_type", "num_experts",
                    "num_local_experts", "num_experts_per_tok", "transformers_version")
"""Dense config keys not carried into the Mixtral config (re-set or meaningless there)."""


@dataclass(frozen=True)
class UpcycleConfig:
    """How to upcycle: the experts and how they are made to differ."""

    num_experts: int = 8
    """Experts per layer."""
    top_k: int = 2
    """Experts each token is routed to (1 <= top_k <= num_experts)."""
    reinit_fraction: float = 0.0
    """Fraction of each expert's intermediate neurons drawn afresh (Drop-Upcycling), in [0, 1)."""
    noise: float = 0.0
    """Gaussian noise added to every expert matrix, as a multiple of that matrix's standard deviation (>= 0)."""
    router_std: float = 0.02
    """Standard deviation of the router's normal initialisation (>= 0; small keeps initial routing near uniform)."""
    seed: int = 0
    """Seed of every random draw (router, re-initialised neurons, noise)."""

    def __post_init__(self) -> None:
        if not isinstance(self.num_experts, int) or self.num_experts < 2:
            raise TridentError(f"--experts must be an integer >= 2, got {self.num_experts!r}")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_experts:
            raise TridentError(f"--top-k must be between 1 and --experts ({self.num_experts}), got {self.top_k!r}")
        if not 0.0 <= self.reinit_fraction < 1.0:
            raise TridentError(f"--reinit-fraction must be in [0, 1), got {self.reinit_fraction!r}")
        if not self.noise >= 0.0:
            raise TridentError(f"--noise must be >= 0, got {self.noise!r}")
        if not self.router_std >= 0.0:
            raise TridentError(f"--router-std must be >= 0, got {self.router_std!r}")


@dataclass(frozen=True)
class LayerRecord:
    """One upcycled layer: how far its experts ended up from the dense MLP and from each other."""

    layer: int
    reinit_neurons: int
    """Intermediate neurons re-initialised in each expert."""
    distance_from_dense: float
    """Mean over experts of ||expert - dense|| / ||dense||, the three matrices together."""
    distance_between_experts: float
    """Mean over expert pairs of ||expert_a - expert_b|| / ||dense||."""


@dataclass(frozen=True)
class UpcycleResult:
    """The Mixtral checkpoint (tensors under Hugging Face names, config dict) and what was done."""

    tensors: dict[str, torch.Tensor]
    hf_config: dict[str, Any]
    params_dense: int
    params_moe: int
    params_active: int
    """Parameters one token uses: everything but the experts it is not routed to."""
    layers: list[LayerRecord] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"params_dense": self.params_dense, "params_moe": self.params_moe, "params_active": self.params_active,
                "layers": [vars(r) for r in self.layers]}


def check_dense(checkpoint) -> None:
    """Refuse what cannot be upcycled here, with the fix."""
    model_type = checkpoint.hf_config.get("model_type")
    if model_type not in DENSE_MODEL_TYPES:
        raise TridentError(f"upcycle takes a dense Llama-form model ({', '.join(DENSE_MODEL_TYPES)}); this one is "
                           f"{model_type!r}")
    if checkpoint.quantization is not None:
        raise TridentError("upcycle takes an unquantized model; pass the original, not a trident quantize folder")
    for key in ("attention_bias", "mlp_bias"):
        if checkpoint.hf_config.get(key):
            raise TridentError(f"the model has {key}=true, which Mixtral has no place for; upcycle a model without")


def upcycle(checkpoint, config: UpcycleConfig,
            progress: Callable[[int], None] | None = None) -> UpcycleResult:
    """The Mixtral form of the dense ``checkpoint`` (see the module docstring); ``progress(layer)`` after each
    layer. Every tensor is float32 (the source's widened)."""
    check_dense(checkpoint)
    num_layers = checkpoint.config.num_layers
    hidden = checkpoint.config.hidden_size
    source = checkpoint.tensors
    mlp_names = {f"model.layers.{i}.mlp.{part}.weight" for i in range(num_layers) for part, _ in MLP_PARTS}
    missing = sorted(mlp_names - set(source))
    if missing:
        raise TridentError(f"the model lacks its dense MLP weights ({missing[0]}, ...); upcycle needs gate_proj, "
                           "up_proj and down_proj in every layer")
    stray = sorted(n for n in source if ".mlp." in n and n not in mlp_names)
    if stray:
        raise TridentError(f"the model's MLP has tensors upcycle does not know ({stray[0]}); it takes a plain "
                           "gated MLP")
    generator = torch.Generator().manual_seed(config.seed)
    tensors = {name: t.float() for name, t in source.items() if name not in mlp_names}
    records = []
    for i in range(num_layers):
        prefix = f"model.layers.{i}"
        dense = {part: source[f"{prefix}.mlp.{part}.weight"].float() for part, _ in MLP_PARTS}
        tensors[f"{prefix}.block_sparse_moe.gate.weight"] = (
            torch.randn(config.num_experts, hidden, generator=generator) * config.router_std)
        experts = [_expert(dense, config, generator) for _ in range(config.num_experts)]
        for e, expert in enumerate(experts):
            for part, short in MLP_PARTS:
                tensors[f"{prefix}.block_sparse_moe.experts.{e}.{short}.weight"] = expert[part]
        records.append(_record(i, dense, experts, config))
        if progress is not None:
            progress(i)
    params_dense = checkpoint.num_parameters()
    mlp_total = sum(source[n].numel() for n in mlp_names)
    expert_params = mlp_total // num_layers
    router = num_layers * config.num_experts * hidden
    params_moe = params_dense - mlp_total + num_layers * config.num_experts * expert_params + router
    params_active = params_dense - mlp_total + num_layers * config.top_k * expert_params + router
    return UpcycleResult(tensors, mixtral_config(checkpoint.hf_config, config), params_dense, params_moe,
                         params_active, records)


def _expert(dense: Mapping[str, torch.Tensor], config: UpcycleConfig,
            generator: torch.Generator) -> dict[str, torch.Tensor]:
    expert = {part: w.clone() for part, w in dense.items()}
    intermediate = dense["gate_proj"].shape[0]
    count = round(config.reinit_fraction * intermediate)
    if count:
        neurons = torch.randperm(intermediate, generator=generator)[:count]
        for part in ("gate_proj", "up_proj"):  # rows: the neurons' input weights
            w = dense[part]
            expert[part][neurons] = _normal((count, w.shape[1]), w, generator)
        w = dense["down_proj"]  # columns: the neurons' output weights
        expert["down_proj"][:, neurons] = _normal((w.shape[0], count), w, generator)
    if config.noise:
        for part, w in dense.items():
            expert[part] += torch.randn(w.shape, generator=generator) * (config.noise * w.std())
    return expert


def _normal(shape: tuple[int, int], like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator) * like.std() + like.mean()


def _record(layer: int, dense: Mapping[str, torch.Tensor], experts: list[dict[str, torch.Tensor]],
            config: UpcycleConfig) -> LayerRecord:
    def norm(parts) -> float:
        return float(sum(float(p.double().square().sum()) for p in parts) ** 0.5)

    scale = norm(dense.values())
    from_dense = [norm(e[p] - dense[p] for p in dense) / scale for e in experts]
    pairs = [norm(a[p] - b[p] for p in dense) / scale
             for i, a in enumerate(experts) for b in experts[i + 1:]]
    count = round(config.reinit_fraction * dense["gate_proj"].shape[0])
    return LayerRecord(layer, count, sum(from_dense) / len(from_dense), sum(pairs) / len(pairs))


def mixtral_config(dense: Mapping[str, Any], config: UpcycleConfig) -> dict[str, Any]:
    """The Mixtral config.json of the upcycled ``dense`` config: same dimensions, rope, norms, tying and special
    tokens; each expert as wide as the dense MLP."""
    out = {k: v for k, v in dense.items() if k not in MOE_DROPPED_KEYS}
    out.update(model_type="mixtral", architectures=["MixtralForCausalLM"], num_local_experts=config.num_experts,
               num_experts_per_tok=config.top_k, intermediate_size=int(dense["intermediate_size"]),
               tie_word_embeddings=bool(dense.get("tie_word_embeddings", False)), dtype="float32")
    if dense.get("model_type") != "mistral":
        out["sliding_window"] = None  # Mixtral's own default is a window; Llama attends to everything
    if "rope_parameters" not in out:  # a GGUF source's config: transformers 5's form of the same rope
        scaling = dict(dense.get("rope_scaling") or {})
        rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
        out["rope_parameters"] = {"rope_type": rope_type, "rope_theta": float(dense.get("rope_theta", 10000.0)),
                                  **scaling}
    return out


def save_upcycled(result: UpcycleResult, checkpoint, out_dir: str) -> list[str]:
    """Write ``result`` as a Hugging Face folder (config.json, model.safetensors, the source's tokenizer); returns
    the files written."""
    from trident.quant.format import write_hf_folder

    return write_hf_folder(out_dir, result.tensors, result.hf_config, checkpoint)
