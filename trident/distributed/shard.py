"""Split a built model over the ranks of a tensor-parallel group, in place (Megatron-style).

:func:`shard_model` takes a model built and loaded by trident/models/build.py and replaces its modules by
the layers of trident/distributed/layers.py holding this rank's slices of the loaded weights:

- attention: this rank's kv heads and the query heads that read them (qkv_proj column-parallel, the q, k and v
  parts each split by heads; o_proj row-parallel). kv heads that do not split evenly split as evenly as they can
  (SmolLM2-135M's 3 over 2 ranks: 1 and 2, with their 3 and 6 query heads; each rank's cache holds its own); with
  more ranks than kv heads, each kv head is replicated on the ranks whose query heads read it;
- the dense gated MLP: gate_up_proj column-parallel (this rank's gate rows, then its up rows), down_proj
  row-parallel;
- MoE blocks: every routed expert keeps the same slice of its intermediate features (gate_up rows, down
  columns), the shared expert is split like a dense MLP, the router stays whole; the block's output (routed
  plus shared) is all-reduced once (:class:`~trident.distributed.layers.ReducedMoeBlock`). With expert
  parallelism (``parallel.expert_parallel``) each rank keeps whole routed experts instead, E / N of them
  (:class:`~trident.distributed.experts.ExpertParallelExperts`), and the model's load statistics report those;
- the embedding table and LM head: by vocabulary (tied embeddings included);
- norms and rotary embeddings: replicated.

Weight-only quantized layers split the same way, their stored codes, scales and zero points cut exactly
(trident/distributed/quantized.py): a column-parallel QuantizedLinear keeps its rows (a plain QuantizedLinear), a
row-parallel one its input features inside a RowParallelLinear, quantized experts their features or whole experts.
Cutting input features needs whole quantization groups (and whole int4 bytes) on every rank: where some rank's
share is not (int4 in groups of 32 over a 96-feature MLP on two ranks: 48 each), the model is a TridentError
naming the layer, before anything changes. So are modules it does not know how to split (quantized embeddings and
LM heads, W8A8 layers, multi-head latent attention). Modules shared by several layers (``trident share``) are split
once.

The model's ``config`` becomes :func:`shard_config`'s: this rank's heads, which is what the runner sizes each
layer's KV cache from.

An engine splits its model while it loads (:class:`ModelSharder`): each decoder layer as soon as its weights are set
(build_model's ``layer_loaded``), its slices moved to the rank's device at once and the full tensors they were cut
from released; then the rest. A rank's host memory holds one decoder layer's full weights at a time beyond the
checkpoint's own tensors (for a memory-mapped safetensors file, the page cache, shared by the ranks of a host), not
the whole model's fused copies (qkv, gate|up, the routed experts: nearly all of an MoE model).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from trident.config import ModelConfig
from trident.distributed.experts import ExpertParallelExperts, expert_features
from trident.distributed.group import TensorParallel
from trident.distributed.layers import (
    ColumnParallelLinear,
    Ranges,
    ReducedMoeBlock,
    RowParallelLinear,
    VocabParallelEmbedding,
    VocabParallelLMHead,
    even_share,
    even_shares,
    linear_columns,
)
from trident.distributed.quantized import (
    check_columns,
    check_expert_columns,
    quantized_columns,
    quantized_rows,
)
from trident.errors import TridentError
from trident.models.layers import Attention, Embedding, GatedMLP, Linear, RMSNorm, RotaryEmbedding
from trident.moe.block import SparseMoeBlock
from trident.moe.experts import FusedExperts
from trident.moe.quant import QuantizedFusedExperts
from trident.moe.router import Router
from trident.quant.embedding import QuantizedEmbedding
from trident.quant.format import QUANT_METHOD, QuantizedModules
from trident.quant.linear import QuantizedLinear

UNSUPPORTED = "not supported with --tensor-parallel yet"

Memo = dict[int, tuple[nn.Module, nn.Module]]
"""id(original module) -> (the original, kept alive so its id stays unique; its replacement)."""


def check_shardable(config: ModelConfig, size: int, expert_parallel: bool = False,
                    quantization: QuantizedModules | None = None) -> None:
    """Raise a TridentError when ``config``'s model cannot be split over ``size`` ranks: every rank needs a kv head
    (kv heads at least the ranks, split as evenly as they go, or fewer, a divisor of the ranks, each replicated with
    the query heads split evenly), intermediate and expert features must divide evenly, and multi-head latent
    attention is not split yet. With ``expert_parallel``, the routed experts must split evenly (whole experts per
    rank) rather than their features, and the model must have some. With ``quantization`` (what a quantized
    checkpoint holds, as described before loading it), its layers must split too (the checks :func:`shard_model`
    makes on the loaded model, made here on a meta-device build: nothing is read or allocated)."""
    if config.mla is not None:
        raise TridentError(f"{config.model_type}: multi-head latent attention (DeepSeek-V2/V3) is {UNSUPPORTED}; "
                           "run it without --tensor-parallel")
    heads, kv_heads = config.num_heads, config.num_kv_heads
    if kv_heads < size and (size % kv_heads or heads % size):
        sizes = (f"a size that divides {heads}" if kv_heads == 1
                 else f"at most {kv_heads} ranks, or a multiple of {kv_heads} that divides {heads}")
        raise TridentError(f"the model has {heads} attention heads and {kv_heads} kv head{'s' * (kv_heads > 1)}, "
                           f"fewer than --tensor-parallel {size}: each rank would need a whole share of one kv head's "
                           f"query heads; use {sizes}")
    moe = config.moe
    dense = [i for i in range(config.num_layers) if moe is None or not moe.is_sparse(i)]
    sizes = {"intermediate_size": config.intermediate_size if dense else 0}
    if expert_parallel:
        if moe is None:
            raise TridentError(f"{config.model_type} has no routed experts for --expert-parallel to split; drop "
                               "--expert-parallel")
        experts = moe.router.num_experts
        if experts % size:
            raise TridentError(f"the model's {experts} routed experts do not split evenly over --tensor-parallel "
                               f"{size} with --expert-parallel; use a size that divides {experts}")
    if moe is not None:
        if not expert_parallel:
            sizes["moe_intermediate_size"] = moe.moe_intermediate_size
        sizes["shared_expert_intermediate_size"] = moe.shared_expert_intermediate_size
    for name, features in sizes.items():
        if features % size:
            raise TridentError(f"the model's {name} ({features}) does not split evenly over --tensor-parallel "
                               f"{size}; use a size that divides it")
    if quantization is not None:
        _check_modules(_quantized_meta_model(config, quantization), "", size, expert_parallel)


def _quantized_meta_model(config: ModelConfig, quantization: QuantizedModules) -> nn.Module:
    """``config``'s model on the meta device with ``quantization``'s layers and experts installed as loading the
    checkpoint installs them (their stored tensors' shapes from the formats)."""
    from trident.models.build import meta_model
    from trident.moe.quant import expert_layout
    from trident.quant.format import install_quantized_modules, listed_shape
    from trident.quant.rtn import stored_layout

    if quantization.quant_method != QUANT_METHOD:
        raise TridentError(f"{quantization.quant_method} layers (int8 weights times int8 activations) are "
                           f"{UNSUPPORTED}; use a weight-only (trident-rtn) or unquantized checkpoint")
    model = meta_model(config)
    layouts = {}
    for name in quantization.modules:
        layout = stored_layout(*listed_shape(model, name), quantization.config_of(name))
        layouts.update({f"{name}.{kind}": spec for kind, spec in layout.items()})
    bits, group = quantization.experts_format()
    for name in quantization.experts:
        experts = model.get_submodule(name)
        for prefix, (num_experts, n, k) in (("gate_up", experts.gate_up_proj.shape),
                                            ("down", experts.down_proj.shape)):
            groups = 1 if group is None else k // group
            codes, scales = expert_layout(bits, num_experts, n, k, groups)
            layouts.update({f"{name}.{prefix}_qweight": codes, f"{name}.{prefix}_scales": scales})
    tensors = {name: torch.empty(shape, dtype=dtype, device="meta") for name, (shape, dtype) in layouts.items()}
    install_quantized_modules(model, quantization, tensors, torch.device("meta"), torch.float32)
    return model


def kv_heads_of(num_kv_heads: int, size: int, rank: int) -> tuple[int, int]:
    """(first kv head, kv heads) a rank holds: with at least as many kv heads as ranks, its share of them, as even
    as they split (the later ranks take one more where they do not); with fewer, the one kv head its query heads
    read."""
    if num_kv_heads >= size:
        first = rank * num_kv_heads // size
        return first, (rank + 1) * num_kv_heads // size - first
    return rank * num_kv_heads // size, 1


def heads_of(heads: int, kv_heads: int, size: int, rank: int) -> tuple[int, int]:
    """(first query head, query heads) a rank holds: those of its kv heads (all the query heads that read them), or
    with replicated kv heads its even share of the query heads."""
    if kv_heads >= size:
        first_kv, local_kv = kv_heads_of(kv_heads, size, rank)
        group = heads // kv_heads
        return first_kv * group, local_kv * group
    return rank * (heads // size), heads // size


def shard_config(config: ModelConfig, size: int, expert_parallel: bool = False, rank: int = 0) -> ModelConfig:
    """``config`` as rank ``rank``'s attention and KV cache see it: its query and kv heads (the rest of the model is
    described as a whole: hidden and vocabulary sizes are the model's, and so are the experts')."""
    check_shardable(config, size, expert_parallel)
    return dataclasses.replace(config, num_heads=heads_of(config.num_heads, config.num_kv_heads, size, rank)[1],
                               num_kv_heads=kv_heads_of(config.num_kv_heads, size, rank)[1])


def shard_model(model: nn.Module, parallel: TensorParallel) -> nn.Module:
    """Split ``model`` (built and loaded, see the module docstring) over ``parallel``'s ranks in place; returns it.
    ``parallel.expert_parallel`` says how MoE blocks split their routed experts."""
    return ModelSharder(parallel).finish(model)


class ModelSharder:
    """Splits a model over ``parallel``'s ranks while build_model loads it: :meth:`layer_loaded` (its
    ``layer_loaded`` hook) splits each decoder layer once its weights are set, moves it to ``device`` (None: where
    it is) and releases the full tensors its slices were cut from; :meth:`finish` splits the rest once the model is
    loaded (every layer, for a model loaded without the hook) and returns it. Every module is checked before the
    first one changes."""

    def __init__(self, parallel: TensorParallel, device: torch.device | None = None) -> None:
        self.parallel = parallel
        self.device = device
        self._memo: Memo = {}
        self._done: set[int] = set()
        """ids of the decoder layers split already."""
        self._checked = False

    def layer_loaded(self, model: nn.Module, path: str) -> None:
        """Split the decoder layer at ``path`` of ``model`` (its weights set, later layers' perhaps not yet)."""
        self._check(model)
        layer = model.get_submodule(path)
        before = set(self._memo)
        _shard_children(layer, f"{path}.", self.parallel, self._memo, self._done)
        if self.device is not None:
            layer.to(self.device)
        kept = {id(t) for t in (*layer.parameters(), *layer.buffers())}
        for key in self._memo.keys() - before:  # the replaced modules' full tensors (kept alive by the memo) go
            _release(self._memo[key][0], kept)
        self._done.add(id(layer))

    def finish(self, model: nn.Module) -> nn.Module:
        """Split what :meth:`layer_loaded` has not (embeddings, LM head, any layer it was not called for); the
        model with this rank's config."""
        self._check(model)
        parallel = self.parallel
        _shard_children(model, "", parallel, self._memo, self._done)
        model.config = shard_config(model.config, parallel.size, parallel.expert_parallel, parallel.rank)
        return model

    def _check(self, model: nn.Module) -> None:
        if not self._checked:
            parallel = self.parallel
            check_shardable(model.config, parallel.size, parallel.expert_parallel)
            _check_modules(model, "", parallel.size, parallel.expert_parallel)
            self._checked = True


_REPLICATED = (RMSNorm, RotaryEmbedding)
"""Modules every rank keeps whole."""


def _check_modules(module: nn.Module, path: str, size: int, expert_parallel: bool) -> None:
    """Raise before any change when a module holding weights is of a kind this file cannot split (quantized
    embeddings and LM heads, W8A8 layers, any module unknown here), or a quantized layer's input features do not cut
    into whole groups on every one of ``size`` ranks."""
    for name, child in module.named_children():
        child_path = f"{path}{name}"
        if isinstance(child, Attention):
            _expect_linear(child, child_path, ("qkv_proj", "o_proj"))
            dim = child.head_dim
            heads = (heads_of(child.num_heads, child.num_kv_heads, size, rank) for rank in range(size))
            _check_input_features(child.o_proj, f"{child_path}.o_proj",
                                  [(first * dim, count * dim) for first, count in heads])
            for norm in ("q_norm", "k_norm"):
                if hasattr(child, norm) and type(getattr(child, norm)) is not RMSNorm:
                    raise TridentError(f"{child_path}.{norm} is a {type(getattr(child, norm)).__name__}: {UNSUPPORTED}")
        elif isinstance(child, GatedMLP):
            _check_mlp(child, child_path, size)
        elif isinstance(child, SparseMoeBlock):
            experts = child.experts
            if type(experts) not in (FusedExperts, QuantizedFusedExperts):
                raise TridentError(f"{child_path}.experts is a {type(experts).__name__} {_unsupported_kind(experts)}: "
                                   f"{UNSUPPORTED}")
            if type(experts) is QuantizedFusedExperts and not expert_parallel:
                check_expert_columns(f"{child_path}.experts", experts, even_shares(experts.intermediate_size, size))
            if type(child.gate) is not Router:
                raise TridentError(f"{child_path}.gate is a {type(child.gate).__name__}: {UNSUPPORTED}")
            if child.shared_expert is not None:
                _check_mlp(child.shared_expert, f"{child_path}.shared_expert", size)
            if child.shared_expert_gate is not None:
                _expect_linear(child, child_path, ("shared_expert_gate",))
        elif type(child) is Embedding or (child_path == "lm_head" and type(child) is Linear):
            continue
        elif isinstance(child, _REPLICATED):
            continue
        elif (child_path == "lm_head" or isinstance(child, (QuantizedEmbedding, QuantizedLinear))
              or any(t is not None for t in (*child._parameters.values(), *child._buffers.values()))):
            raise TridentError(f"{child_path} is a {type(child).__name__}, which {_unsupported_kind(child)} is "
                               f"{UNSUPPORTED}; use an unquantized checkpoint (for a GGUF file: --gguf-weights "
                               "dequantize)")
        else:
            _check_modules(child, f"{child_path}.", size, expert_parallel)


def _check_mlp(mlp: GatedMLP, path: str, size: int) -> None:
    _expect_linear(mlp, path, ("gate_up_proj", "down_proj"))
    _check_input_features(mlp.down_proj, f"{path}.down_proj", even_shares(mlp.intermediate_size, size))


def _check_input_features(layer: nn.Module, path: str, ranges: list[tuple[int, int]]) -> None:
    """A row-parallel quantized layer's input features (each rank's (start, length)) must cut into its groups."""
    if isinstance(layer, QuantizedLinear):
        check_columns(path, layer.config.bits, layer.config.group_size, ranges)


def _unsupported_kind(module: nn.Module) -> str:
    return "(quantized weights)" if "quant" in type(module).__module__ else "(a layer split nowhere here)"


def _expect_linear(owner: nn.Module, path: str, names: tuple[str, ...]) -> None:
    for name in names:
        layer = getattr(owner, name)
        if type(layer) not in (Linear, QuantizedLinear):
            raise TridentError(f"{path}.{name} is a {type(layer).__name__} {_unsupported_kind(layer)}: {UNSUPPORTED}; "
                               "use a weight-only quantized (int8 / int4) or unquantized checkpoint")


def _column_parallel(full: Linear | QuantizedLinear, ranges: Ranges) -> nn.Module:
    """The rows ``ranges`` of ``full``: a ColumnParallelLinear, or a QuantizedLinear of those rows."""
    if isinstance(full, QuantizedLinear):
        return quantized_rows(full, ranges)
    return ColumnParallelLinear.shard(full, ranges)


def _row_parallel(full: Linear | QuantizedLinear, start: int, length: int, parallel: TensorParallel,
                  reduce: bool = True) -> RowParallelLinear:
    """The input features ``start : start + length`` of ``full`` in a RowParallelLinear (a quantized layer's: a
    QuantizedLinear of those features inside it)."""
    columns = (quantized_columns(full, start, length) if isinstance(full, QuantizedLinear)
               else linear_columns(full, start, length))
    return RowParallelLinear.of(full, columns, parallel, reduce)


def _once(memo: Memo, module: nn.Module, make: Callable[[], nn.Module]) -> nn.Module:
    """``module``'s replacement, made on its first visit (shared modules are split once)."""
    if id(module) not in memo:
        memo[id(module)] = (module, make())
    return memo[id(module)][1]


def _release(module: nn.Module, kept: set[int]) -> None:
    """Replace ``module``'s parameters and buffers (its submodules' too) by meta tensors of their shapes, but for
    those whose ids are in ``kept``: the module stays (a memo key) without its data."""
    for owner in module.modules():
        for key, param in owner._parameters.items():
            if param is not None and id(param) not in kept and not param.is_meta:
                owner._parameters[key] = nn.Parameter(param.to("meta"), requires_grad=False)
        for key, buffer in owner._buffers.items():
            if buffer is not None and id(buffer) not in kept and not buffer.is_meta:
                owner._buffers[key] = buffer.to("meta")


def _shard_children(module: nn.Module, path: str, parallel: TensorParallel, memo: Memo, done: set[int]) -> None:
    """Split ``module``'s children (``path``: its own, with a trailing dot), skipping the modules in ``done``."""
    for name, child in list(module.named_children()):
        child_path = f"{path}{name}"
        if id(child) in done:
            continue
        if isinstance(child, Attention):
            new = _once(memo, child, lambda c=child: _shard_attention(c, parallel, memo))
        elif isinstance(child, GatedMLP):
            new = _once(memo, child, lambda c=child: _shard_mlp(c, parallel, memo, reduce=True))
        elif isinstance(child, SparseMoeBlock):
            new = _once(memo, child, lambda c=child: _shard_moe(c, parallel, memo))
        elif type(child) is Embedding:
            new = _once(memo, child, lambda c=child: VocabParallelEmbedding.shard(c.weight, parallel))
        elif child_path == "lm_head":
            new = _once(memo, child, lambda c=child: VocabParallelLMHead.shard(c.weight, parallel))
        elif isinstance(child, _REPLICATED):
            continue
        else:
            _shard_children(child, f"{child_path}.", parallel, memo, done)
            continue
        if new is not child:
            setattr(module, name, new)


def _shard_attention(attn: Attention, parallel: TensorParallel, memo: Memo) -> Attention:
    """This rank's query heads and the kv heads they read, in place."""
    heads, kv_heads, dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
    first_head, local_heads = heads_of(heads, kv_heads, parallel.size, parallel.rank)
    first_kv, local_kv = kv_heads_of(kv_heads, parallel.size, parallel.rank)
    q_size, kv_size = heads * dim, kv_heads * dim
    rows = ((first_head * dim, local_heads * dim), (q_size + first_kv * dim, local_kv * dim),
            (q_size + kv_size + first_kv * dim, local_kv * dim))
    attn.qkv_proj = _once(memo, attn.qkv_proj, lambda: _column_parallel(attn.qkv_proj, rows))
    attn.o_proj = _once(memo, attn.o_proj, lambda: _row_parallel(attn.o_proj, first_head * dim, local_heads * dim,
                                                                 parallel))
    attn.num_heads, attn.num_kv_heads = local_heads, local_kv
    attn.q_size, attn.kv_size = local_heads * dim, local_kv * dim
    return attn


def _shard_mlp(mlp: GatedMLP, parallel: TensorParallel, memo: Memo, reduce: bool) -> GatedMLP:
    """This rank's slice of the intermediate features, in place; ``reduce``: down_proj all-reduces its output (not
    inside an MoE block, which reduces once for all its experts)."""
    features = mlp.intermediate_size
    start, local = even_share(features, parallel.size, parallel.rank)
    mlp.gate_up_proj = _once(memo, mlp.gate_up_proj, lambda: _column_parallel(
        mlp.gate_up_proj, ((start, local), (features + start, local))))
    mlp.down_proj = _once(memo, mlp.down_proj, lambda: _row_parallel(mlp.down_proj, start, local, parallel,
                                                                     reduce=reduce))
    mlp.intermediate_size = local
    return mlp


def _shard_moe(block: SparseMoeBlock, parallel: TensorParallel, memo: Memo) -> ReducedMoeBlock:
    """Every routed expert's slice of its intermediate features (with expert parallelism: this rank's whole experts)
    and the shared expert's, partial sums reduced once by the returned wrapper; the router and the shared expert's
    gate stay whole."""
    if block.shared_expert is not None:
        _shard_mlp(block.shared_expert, parallel, memo, reduce=False)
    if parallel.expert_parallel:
        block.experts = ExpertParallelExperts.shard(block.experts, parallel)
        if block.stats is not None:  # one object for all layers: each rank reports its own experts' load
            block.stats.report_experts(*even_share(block.stats.num_experts, parallel.size, parallel.rank))
        return ReducedMoeBlock(block, parallel)
    block.experts = expert_features(block.experts, *even_share(block.experts.intermediate_size, parallel.size,
                                                               parallel.rank))
    return ReducedMoeBlock(block, parallel)
