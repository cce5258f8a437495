"""Two engines' greedy decodes of one prompt agree: what the native-kernel tests ask of a faster path against its
reference (both run the same model, so only rounding may differ)."""

from __future__ import annotations

import torch


def assert_greedy_agree(ours: list, theirs: list, tolerance: float, min_compared: int = 1) -> int:
    """Per step (Logprob entries with top_logprobs): log-probabilities within ``tolerance`` nats; where the greedy
    tokens differ, only at a near tie (the runner-up within ``tolerance`` in both), after which the continuations
    differ and the comparison stops. At least ``min_compared`` steps compared, and the two of equal length; returns
    the number of steps compared."""
    assert len(ours) == len(theirs), f"{len(ours)} against {len(theirs)} tokens"
    compared = 0
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert abs(a.logprob - b.logprob) < tolerance, f"step {step}: {a.logprob} vs {b.logprob}"
        compared += 1
        if a.token_id != b.token_id:
            margin = min(x.top_logprobs[0][1] - x.top_logprobs[1][1] for x in (a, b))
            assert margin < tolerance, f"step {step}: greedy token {a.token_id} vs {b.token_id}, margin {margin}"
            break
    assert compared >= min_compared, f"only {compared} steps compared"
    return compared


def assert_cuda_kernels_agree_with_triton(model_dir, prompt: list[int], module, function: str, native_summary: str,
                                          triton_summary: str, monkeypatch, max_tokens: int = 12,
                                          tolerance: float = 0.1) -> None:
    """A CUDA engine on ``model_dir`` (batch-1 decode steps, CUDA graphs) runs ``module.function`` (a CUDA kernel's
    wrapper: its calls are counted) and says ``native_summary`` at start-up; the same engine with
    TRIDENT_NO_NATIVE=1 says ``triton_summary``; both greedy decodes of ``prompt`` agree (assert_greedy_agree
    within ``tolerance``, 0.1 nats by default: bfloat16 logits of a tiny random model differ by a few 1e-2 at most,
    a wrong row changes tokens). The reference engine's one-row quantized products are the kernel's arithmetic in
    float32 torch (kernel_rounded_forward), so that the CUDA side's kernels and fusions are what is compared, not the
    kernel's rounding of the activations (one int8 stage for int4 codes moves these logits by ~0.15 alone)."""
    from trident.engine.llm import LLM
    from trident.engine.request import SamplingParams
    from trident.quant.linear import QuantizedLinear

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=3, ignore_eos=True)
    calls = []
    real = getattr(module, function)
    monkeypatch.setattr(module, function, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    options = dict(device="cuda", dtype="bfloat16", block_size=16, max_model_len=128)
    llm = LLM(str(model_dir), **options)
    assert native_summary in llm.engine.decode_summary()
    ours = list(llm.generate(prompt, params)[0].outputs[0].logprobs)
    assert calls, f"{module.__name__}.{function} never ran"
    monkeypatch.setenv("TRIDENT_NO_NATIVE", "1")
    monkeypatch.setattr(QuantizedLinear, "forward", kernel_rounded_forward(QuantizedLinear.forward))
    triton = LLM(str(model_dir), **options)
    assert triton_summary in triton.engine.decode_summary()
    theirs = list(triton.generate(prompt, params)[0].outputs[0].logprobs)
    assert len(ours) == max_tokens
    assert_greedy_agree(ours, theirs, tolerance=tolerance)


def kernel_rounded_forward(plain_forward):
    """QuantizedLinear.forward whose one-row products (those trident/native/gemv_cuda.cu takes: K and the group
    size multiples of 32) are the kernel's arithmetic in float32 torch: the codes' part of W times x rounded as the
    kernel rounds it (quantize_activations_reference, ACTIVATION_STAGES), plus the offsets' part times x itself (x's
    rounding, with a zero point), rounded once to x's dtype; other products go to ``plain_forward``."""
    from trident.native.gemv_cuda import ACTIVATION_STAGES, BLOCK, quantize_activations_reference
    from trident.quant.affine import AffineWeight, affine_dequantize

    def forward(self, x):
        w = self.affine_weight()
        if not (x.dim() == 2 and x.shape[0] == 1 and w.in_features % BLOCK == 0 and w.group_size % BLOCK == 0):
            return plain_forward(self, x)
        codes = affine_dequantize(AffineWeight(w.codes, w.scales, None, w.bits), torch.float32)
        x_hat = quantize_activations_reference(x, ACTIVATION_STAGES[w.bits])
        y = x_hat @ codes.T
        if w.offsets is not None:  # a zero point's share comes from x's codes, other offsets' from x itself
            y = y + (x_hat if w.zero_point else x.float()) @ (affine_dequantize(w, torch.float32) - codes).T
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)

    return forward
