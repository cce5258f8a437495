"""Hugging Face transformers on the same workload, in the same process (the honest ratio): loading, and
batch-1 latency with a static-cache ``generate``. The offline side is trident/bench/peer_offline.py.

A model file or folder is loaded the way a transformers user would (the same GGUF, dequantized by
transformers, or the same folder); a random-weight shape gets the very tensors trident runs, assigned
into a transformers model of that config (no copy when dtype and device agree). Attention is transformers'
default for the architecture (sdpa where supported); continuous batching switches it to its paged variant.
"""

from __future__ import annotations

import contextlib
import os
import time

import torch

from trident.bench.workloads import Workload
from trident.errors import TridentError
from trident.loader.checkpoint import Checkpoint


def load_hf(path: str, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM

    if path.endswith(".gguf"):
        model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                     dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device).eval()


@contextlib.contextmanager
def _parameters_on_meta():
    """Modules created inside keep their parameters on the meta device (each is moved there as it is registered,
    so at most one is ever allocated), their buffers where they are created."""
    register = torch.nn.Module.register_parameter

    def register_on_meta(module, name, param):
        if param is not None and not param.is_meta:
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def load_hf_same_weights(checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device):
    """A transformers model of ``checkpoint.hf_config`` holding ``checkpoint.tensors`` themselves.

    The model is built with its parameters on the meta device (no memory: a 61 GB model's empty parameters beside
    its checkpoint and a quantized engine would not fit one GPU) and its buffers, such as rotary frequencies, on
    ``device`` computed as usual; then every parameter is replaced by the checkpoint's tensor and tied weights are
    re-tied. A tensor the model lacks, or a parameter left unset, is an error."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    raw = dict(checkpoint.hf_config)
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    with torch.device(device), no_init_weights(), _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    result = model.load_state_dict(checkpoint.tensors, strict=False, assign=True)
    tied = {"lm_head.weight"} if checkpoint.config.tie_word_embeddings else set()
    if result.unexpected_keys or set(result.missing_keys) - tied:
        raise TridentError(f"transformers' {type(model).__name__} does not take trident's tensor names: missing "
                           f"{sorted(set(result.missing_keys) - tied)[:5]}, unexpected {result.unexpected_keys[:5]}")
    model.tie_weights()
    unset = [name for name, p in model.named_parameters() if p.is_meta]
    if unset:
        raise TridentError(f"transformers' {type(model).__name__} has parameters no tensor filled: {unset[:5]}")
    return model.eval()


def hf_latency(model, workload: Workload, compile: bool = False) -> dict:
    """Batch 1 with a static KV cache: prefill tok/s of the prompt (one forward), decode tok/s of the rest.
    ``compile`` lets transformers compile the decode step (it does so on accelerators only)."""
    device = model.device
    x = torch.tensor([workload.prompts[0]], device=device)
    n = workload.output_lens[0]
    options = dict(do_sample=False, cache_implementation="static", disable_compile=not compile,
                   attention_mask=torch.ones_like(x), pad_token_id=0)
    with torch.inference_mode():
        # Warm-up; a compiled decode step is traced for the cache length of the real run, so warm up with it.
        warm = n if compile else min(n, 8)
        model.generate(x, max_new_tokens=warm, min_new_tokens=warm, **options)
        _sync(device)
        t0 = time.perf_counter()
        model(x)
        _sync(device)
        prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(x, max_new_tokens=n, min_new_tokens=n, **options)
        _sync(device)
        total_s = time.perf_counter() - t0
    generated = out.shape[1] - x.shape[1]
    return {"prompt_tokens": x.shape[1], "output_tokens": generated,
            "prefill_tok_s": x.shape[1] / prefill_s,
            "decode_tok_s": (generated - 1) / max(total_s - prefill_s, 1e-9),
            "ttft_ms": prefill_s * 1000}


def hf_latency_method(device: torch.device, compile: bool) -> str:
    compiled = compile and device.type != "cpu"
    return "static cache, compiled" if compiled else "static cache"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
