"""Hugging Face transformers on the same workload, in the same process (the honest ratio).

The model is loaded the way a transformers user would: from the same GGUF file (dequantized by
transformers) or the same Hugging Face folder, in the same dtype as trident's run.
"""

from __future__ import annotations

import os
import time

from trident.bench.workloads import Workload


def load_hf(path: str, dtype):
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    if path.endswith(".gguf"):
        model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                     dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.eval(), time.perf_counter() - t0


def hf_latency(model, workload: Workload) -> dict:
    import torch

    x = torch.tensor([workload.prompts[0]])
    n = workload.output_len
    with torch.inference_mode():
        model.generate(x, max_new_tokens=8, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        model(x)
        prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        total_s = time.perf_counter() - t0
    generated = out.shape[1] - x.shape[1]
    return {"prompt_tokens": x.shape[1], "output_tokens": generated,
            "prefill_tok_s": x.shape[1] / prefill_s,
            "decode_tok_s": (generated - 1) / max(total_s - prefill_s, 1e-9),
            "ttft_ms": prefill_s * 1000}


def hf_offline(model, workload: Workload) -> dict:
    """One static batch of all prompts (they have equal lengths, so there is no padding)."""
    import torch

    x = torch.tensor(workload.prompts)
    n = workload.output_len
    with torch.inference_mode():
        model.generate(x[:, :32], max_new_tokens=4, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        out = model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        elapsed = time.perf_counter() - t0
    tokens = (out.shape[1] - x.shape[1]) * x.shape[0]
    return {"requests": x.shape[0], "output_tokens": tokens, "elapsed_s": elapsed, "output_tok_s": tokens / elapsed}
