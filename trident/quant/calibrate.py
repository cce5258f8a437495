"""Calibrated quantization of a whole model with GPTQ, decoder layer after decoder layer.

Calibration text (:func:`calibration_tokens`): a named corpus's ``calib`` slice (:mod:`trident.compress.texts`:
never the text ``trident eval ppl`` evaluates on) or a whole UTF-8 file, tokenized with the model's tokenizer
and cut into ``samples`` consecutive sequences of ``seq_len`` tokens (the windows of
:func:`trident.compress.eval.plan_windows`, whose fingerprint identifies them).

The model (:func:`gptq_model`), sequentially:

1. the hidden states entering decoder layer 0 are computed once for every calibration sequence (the layers are
   skipped in that pass, so it costs the embeddings only); so are each layer's other inputs (rotary tables,
   attention metadata), which depend on positions only;
2. for each decoder layer in turn: its inputs run through it once with forward pre-hooks on its Linear layers
   summing each one's ``X^T X`` (the fused ``qkv_proj`` and ``gate_up_proj`` are one Linear, with one input);
   each Linear is then quantized by :func:`trident.quant.gptq.gptq_quantize` and replaced by a QuantizedLinear;
   the inputs run through the quantized layer, and its outputs are the next layer's inputs.

So each layer sees the outputs of the layers already quantized before it, as it will when the model runs, and
the model runs two layer-passes per layer over the calibration tokens, never once per layer. Mixed bits pass
per-module grids (``module_configs``: int8 per channel for some modules, the int4 groups for the rest); their
sensitivity measurement asks for each module's codes on the float model's inputs instead (``install``: the model
stays float, and one layer pass per layer suffices). The attention runs
through the model's own backend over a small paged KV cache (one layer's worth, reused by every layer), with the
batches laid out by the engine's ModelRunner as prefill steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from trident.errors import TridentError
from trident.quant.gptq import HessianAccumulator, gptq_quantize, relative_output_error
from trident.quant.gptq_config import CalibrationConfig, GPTQConfig
from trident.quant.linear import ModuleReport, QuantizedLinear, QuantReport, eligible_modules, replace_module
from trident.quant.rtn import QuantConfig, dequantize, quantize

CALIB_BLOCK_SIZE = 16
"""KV-cache block size of the calibration passes (any size works; the engine's default)."""


@dataclass(frozen=True)
class CalibrationTokens:
    """The calibration sequences and where they came from."""

    token_ids: torch.Tensor
    """int64 [samples, seq_len]."""
    source: str
    description: str
    """The corpus and its package version, or the file."""
    slice: str
    """``calib`` for a named corpus, ``all`` for a file."""
    fingerprint: str
    """The windows' fingerprint (:func:`trident.compress.eval.plan_windows`): equal fingerprints, equal tokens."""

    def as_dict(self) -> dict:
        samples, seq_len = self.token_ids.shape
        return {"text": self.source, "description": self.description, "slice": self.slice, "samples": samples,
                "seq_len": seq_len, "tokens": samples * seq_len, "fingerprint": self.fingerprint}


def calibration_tokens(tokenizer, config: CalibrationConfig) -> CalibrationTokens:
    """The first ``samples`` whole sequences of ``seq_len`` tokens of the calibration text (see the module
    docstring); fewer is a TridentError."""
    from trident.compress.eval import PerplexityConfig, plan_windows
    from trident.compress.texts import CORPORA, encode_first, read_source, slice_text

    if tokenizer is None:
        raise TridentError("the model has no tokenizer; GPTQ calibration needs one to tokenize --calib")
    source = read_source(config.text)
    which = "calib" if config.text in CORPORA else "all"
    text = slice_text(source.text, which)
    wanted = config.samples * config.seq_len
    ids = encode_first(tokenizer, text, wanted)
    if len(ids) < wanted:
        raise TridentError(f"{source.description} ({which} slice) gives {len(ids):,} tokens, fewer than "
                           f"--calib-samples {config.samples} x --calib-seq-len {config.seq_len} = {wanted:,}: "
                           "use fewer or shorter samples, or a longer text")
    plan = plan_windows(ids, PerplexityConfig(window=config.seq_len, max_windows=config.samples))
    token_ids = torch.tensor(ids[:wanted], dtype=torch.long).view(config.samples, config.seq_len)
    return CalibrationTokens(token_ids, config.text, source.description, which, plan.fingerprint)


@dataclass
class GPTQModuleReport(ModuleReport):
    """A module quantized by GPTQ: besides the weight error, the relative output error on its calibration
    inputs X, ``||X W^T - X Q^T||_F / ||X W^T||_F`` (float64, from the Hessian), GPTQ's and round-to-nearest's."""

    output_error: float = 0.0
    rtn_output_error: float = 0.0
    """Round-to-nearest's output error on the same inputs and grid settings."""
    damp: float = 0.0
    """The relative damping used (more than asked when the Cholesky factorisation needed it)."""
    calibration_rows: int = 0
    """Input rows summed into the Hessian."""


Progress = Callable[[int, int, str], None]
"""``progress(done, total, what)``: called after each unit of work (a batch through a layer, a module)."""


Install = Callable[[str, QuantizedLinear], None]
"""``install(name, quantized)``: where a module quantized by :func:`gptq_model` goes."""


@torch.no_grad()
def gptq_model(model: nn.Module, config: QuantConfig, gptq: GPTQConfig, tokens: torch.Tensor, *,
               batch_size: int = 8, progress: Progress | None = None,
               module_configs: Mapping[str, QuantConfig] | None = None, install: Install | None = None
               ) -> QuantReport:
    """Quantize every eligible Linear of ``model``'s decoder layers with GPTQ, calibrated on ``tokens``
    [samples, seq_len], in place (see the module docstring); runs on the model's device and dtype.

    ``module_configs`` (mixed bits) quantizes the modules it names on their own grid, ``config`` the others (and
    chooses the modules). ``install``: by default each quantized module replaces its float one, so that the layers
    after it calibrate on quantized outputs; given, it receives each quantized module instead and the model stays
    float: every module is then quantized on the float model's inputs (one layer pass per layer, not two)."""
    layers = _decoder_layers(model)
    names = eligible_modules(model, config)
    module_configs = dict(module_configs or {})
    unknown = sorted(set(module_configs) - set(names))
    if unknown:
        raise TridentError(f"module_configs names {', '.join(unknown)}, which the config does not quantize")
    sequential = install is None
    prefixes = {id(layer): name for name, layer in model.named_modules() if any(layer is x for x in layers)}
    by_layer: list[list[str]] = [[n for n in names if n.startswith(prefixes[id(layer)] + ".")] for layer in layers]
    outside = sorted(set(names) - {n for group in by_layer for n in group})
    if outside:
        raise TridentError(f"GPTQ quantizes the Linear layers of the decoder layers; {outside[0]} is outside them: "
                           "narrow the module patterns or use --method rtn")
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    _check_tokens(model, tokens)

    batches = [tokens[i: i + batch_size] for i in range(0, tokens.shape[0], batch_size)]
    total = len(batches) * (1 + (2 if sequential else 1) * len(layers)) + len(names)
    done = 0

    def advance(what: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total, what)

    kv_cache, step_inputs = _step_inputs(model, batches, device, dtype)
    states: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    extras: list[list[tuple]] = []
    for input_ids, positions, meta in step_inputs:
        hidden, layer_args = _layer_inputs(model, layers, input_ids, positions, [kv_cache] * len(layers), meta)
        states.append((hidden, None))
        extras.append(layer_args)
        advance("embeddings")

    report = QuantReport(config)
    for index, (layer, layer_names) in enumerate(zip(layers, by_layer)):
        accumulators = {name: HessianAccumulator(model.get_submodule(name).in_features, device)
                        for name in layer_names}
        hooks = [model.get_submodule(name).register_forward_pre_hook(
            lambda _module, args, acc=acc: acc.add(args[0])) for name, acc in accumulators.items()]
        outputs = []
        try:
            for b, (hidden, residual) in enumerate(states):
                if layer_names or not sequential:  # a layer with nothing to quantize needs no Hessian pass
                    outputs.append(layer(hidden, residual, *extras[b][index]))
                advance(f"layer {index}: inputs")
        finally:
            for hook in hooks:
                hook.remove()
        for name, acc in accumulators.items():
            report.modules.append(_quantize_module(model, name, acc, module_configs.get(name, config), gptq,
                                                   install))
            advance(name)
        if sequential:  # the outputs of the quantized layer
            outputs = [layer(hidden, residual, *extras[b][index]) for b, (hidden, residual) in enumerate(states)]
            for _ in states:
                advance(f"layer {index}: outputs")
        states = outputs
    return report


@torch.no_grad()
def run_calibration(model: nn.Module, tokens: torch.Tensor, *, batch_size: int = 8,
                    progress: Callable[[int, int], None] | None = None) -> None:
    """Run ``model`` (all of it) over the calibration ``tokens`` [samples, seq_len], ``batch_size`` sequences per
    forward, for the hooks the caller has set (SmoothQuant's activation maxima); outputs are discarded. Each batch
    is a prefill step laid out by the engine's ModelRunner; one layer's KV cache serves every layer (each layer
    writes its keys and values before its attention reads them). ``progress(done, total)`` after each batch."""
    layers = _decoder_layers(model)
    _check_tokens(model, tokens)
    param = next(model.parameters())
    batches = [tokens[i: i + batch_size] for i in range(0, tokens.shape[0], batch_size)]
    kv_cache, steps = _step_inputs(model, batches, param.device, param.dtype)
    for done, (input_ids, positions, meta) in enumerate(steps, 1):
        model(input_ids, positions, [kv_cache] * len(layers), meta)
        if progress is not None:
            progress(done, len(steps))


def _check_tokens(model: nn.Module, tokens: torch.Tensor) -> None:
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise TridentError(f"calibration tokens must be [samples, seq_len >= 2], got {tuple(tokens.shape)}")
    if tokens.shape[1] > model.config.max_position_embeddings:
        raise TridentError(f"--calib-seq-len {tokens.shape[1]} is longer than the model's context "
                           f"({model.config.max_position_embeddings} tokens); lower it")


def _quantize_module(model: nn.Module, name: str, acc: HessianAccumulator, config: QuantConfig,
                     gptq: GPTQConfig, install: Install | None) -> GPTQModuleReport:
    layer = model.get_submodule(name)
    hessian = acc.hessian()
    try:
        result = gptq_quantize(layer.weight, hessian, config, gptq)
    except TridentError as e:
        raise TridentError(f"{name}: {e}") from None
    qlayer = QuantizedLinear(layer.in_features, layer.out_features, config, result.quantized, layer.bias)
    w64 = layer.weight.to(torch.float64)
    deq = qlayer.dequantized_weight(torch.float64)
    rtn = dequantize(quantize(layer.weight, config), config, torch.float64)
    report = GPTQModuleReport(
        name, layer.out_features, layer.in_features,
        relative_error=float(torch.linalg.norm(w64 - deq) / torch.linalg.norm(w64).clamp_min(1e-300)),
        bytes_before=layer.weight.numel() * layer.weight.element_size(), bytes_after=qlayer.storage_bytes(),
        bits=config.bits, group_size=config.group_size, symmetric=config.symmetric,
        output_error=relative_output_error(w64, deq, hessian),
        rtn_output_error=relative_output_error(w64, rtn, hessian),
        damp=result.damp, calibration_rows=acc.rows)
    if install is None:
        replace_module(model, name, qlayer)
    else:
        install(name, qlayer)
    return report


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise TridentError(f"{type(model).__name__} has no decoder layers at model.layers; GPTQ calibrates "
                           "decoder-only models layer by layer")
    return layers


def _step_inputs(model: nn.Module, batches: list[torch.Tensor], device: torch.device, dtype: torch.dtype
                 ) -> tuple[tuple[torch.Tensor, torch.Tensor], list[tuple]]:
    """One layer's KV cache (shared by the passes of every layer) and, per batch, (input_ids, positions,
    attention metadata) of a prefill step of its sequences, laid out by the engine's ModelRunner."""
    from trident.attention.base import AttentionBackend
    from trident.engine.plan import ScheduledChunk, StepPlan
    from trident.engine.request import SamplingParams
    from trident.engine.runner import ModelRunner
    from trident.engine.sampler import Sampler
    from trident.models.layers import Attention
    from trident.quant.kv import kv_cache_format

    backend: AttentionBackend = next(m.backend for m in model.modules() if isinstance(m, Attention))
    seq_len = batches[0].shape[1]
    per_seq = math.ceil(seq_len / CALIB_BLOCK_SIZE)
    runner = ModelRunner(model, backend=backend, num_blocks=len(batches[0]) * per_seq, block_size=CALIB_BLOCK_SIZE,
                         kv_format=kv_cache_format("auto", dtype), device=device, sampler=Sampler(device=device),
                         max_num_seqs=len(batches[0]))
    params = SamplingParams()
    steps = []
    for batch in batches:
        chunks = tuple(ScheduledChunk(seq_id=i, token_ids=tuple(seq.tolist()), start_pos=0,
                                      block_table=tuple(range(i * per_seq, (i + 1) * per_seq)), sample=False,
                                      params=params) for i, seq in enumerate(batch))
        input_ids, positions, meta, _, _ = runner.prepare(StepPlan(chunks=chunks))
        steps.append((input_ids, positions, meta))
    return runner.kv_caches[0], steps


def _layer_inputs(model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor, positions: torch.Tensor,
                  kv_caches: list, meta) -> tuple[torch.Tensor, list[tuple]]:
    """The hidden states entering layer 0 and, per layer, the arguments it is called with after (hidden,
    residual): one forward of the model with every decoder layer passing its input through unchanged."""
    calls: list[tuple] = []

    def passthrough(hidden, residual, *args):
        calls.append((hidden, args))
        return hidden, residual

    with _replaced_forwards(layers, passthrough):
        model(input_ids, positions, kv_caches, meta)
    if len(calls) != len(layers):
        raise TridentError(f"{type(model).__name__} called {len(calls)} of its {len(layers)} decoder layers; GPTQ "
                           "calibration cannot follow this model")
    return calls[0][0], [args for _, args in calls]


@contextmanager
def _replaced_forwards(layers: nn.ModuleList, forward: Callable) -> Iterator[None]:
    """Every layer's ``forward`` replaced by ``forward`` (an instance attribute), restored on exit."""
    for layer in layers:
        layer.forward = forward
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
