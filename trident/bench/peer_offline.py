"""Hugging Face transformers on an offline workload: its continuous batching (a paged cache, requests
joining and leaving the batch) when the installed version has it, else one padded ``generate`` batch.

Each request generates exactly its own number of tokens (EOS disabled), greedily. Setting up the batching
manager (cache allocation, CUDA-graph warm-up) is reported as ``setup_s``, outside ``elapsed_s``, as
trident's engine is built and warmed up outside its own.
"""

from __future__ import annotations

import time

import torch

from trident.bench.workloads import Workload
from trident.progress import progress_bar

CPU_MAX_BATCH_TOKENS = 512
"""Token budget of one continuous-batching step on the CPU (transformers sizes it from free memory
otherwise, allocating and filling gigabytes of static buffers first)."""


def continuous_batching_available(model) -> bool:
    try:
        from transformers import ContinuousBatchingConfig  # noqa: F401
        from transformers.generation.continuous_batching.utils import WorkloadHints  # noqa: F401
    except ImportError:
        return False
    return hasattr(model, "continuous_batching_context_manager")


def hf_offline(model, workload: Workload) -> dict:
    """Continuous batching when available, else the padded fallback; ``method`` says which ran."""
    if continuous_batching_available(model):
        return hf_continuous_batching(model, workload)
    return hf_padded_generate(model, workload)


def hf_continuous_batching(model, workload: Workload) -> dict:
    from transformers import ContinuousBatchingConfig, GenerationConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints

    prompts, output_lens = workload.prompts, workload.output_lens
    generation = GenerationConfig(do_sample=False, max_new_tokens=max(output_lens), eos_token_id=-1)
    hints = WorkloadHints(max_prompt_length=max(workload.prompt_lens), max_generated_length=max(output_lens),
                          num_requests=len(prompts))
    cb_config = ContinuousBatchingConfig()
    if model.device.type == "cpu":
        # tokens per block: page_size in recent transformers, block_size in 5.17
        block = getattr(cb_config, "page_size", None) or getattr(cb_config, "block_size", None) or 256
        blocks = sum(-(-(len(p) + o) // block) for p, o in zip(prompts, output_lens)) + 1
        cb_config = ContinuousBatchingConfig(num_blocks=blocks, max_batch_tokens=CPU_MAX_BATCH_TOKENS)
    t_setup = time.perf_counter()
    done: dict[str, object] = {}
    # No torch.inference_mode() here: the manager runs the model in a thread of its own (under no_grad), and
    # transformers 5.17 does not carry inference mode into it (later versions do), so buffers made here would be
    # inference tensors that thread may not update in place.
    with model.continuous_batching_context_manager(
            generation_config=generation, continuous_batching_config=cb_config, workload_hints=hints) as manager:
        attn = model.config._attn_implementation  # the paged variant the manager switched to
        setup_s = time.perf_counter() - t_setup
        t0 = time.perf_counter()
        ids = [manager.add_request(list(p), request_id=f"bench-{i}", max_new_tokens=o, eos_token_id=-1)
               for i, (p, o) in enumerate(zip(prompts, output_lens))]
        with progress_bar(transient=True) as progress:
            task = progress.add_task("hf continuous batching", total=len(ids))
            while len(done) < len(ids):
                result = manager.get_result(timeout=1)
                if result is None:
                    if not manager.is_running():
                        raise RuntimeError("transformers' continuous batching loop stopped before finishing")
                    continue
                if result.is_finished():
                    if result.error is not None:
                        raise RuntimeError(f"transformers' continuous batching failed a request: {result.error}")
                    done[result.request_id] = result
                    progress.advance(task)
        elapsed = time.perf_counter() - t0
    tokens = sum(len(done[i].generated_tokens) for i in ids)
    return {"requests": len(ids), "output_tokens": tokens, "elapsed_s": elapsed, "output_tok_s": tokens / elapsed,
            "setup_s": setup_s, "method": f"continuous batching ({attn})"}


def hf_padded_generate(model, workload: Workload) -> dict:
    """One left-padded batch generating the longest output for every row; only each request's own tokens
    count as output (the rest is the price of not batching continuously)."""
    device = model.device
    width = max(workload.prompt_lens)
    x = torch.zeros((len(workload.prompts), width), dtype=torch.long, device=device)
    mask = torch.zeros_like(x)
    for row, prompt in enumerate(workload.prompts):
        x[row, width - len(prompt):] = torch.tensor(prompt, device=device)
        mask[row, width - len(prompt):] = 1
    n = max(workload.output_lens)
    with torch.inference_mode():
        model.generate(x[:, -8:], attention_mask=mask[:, -8:], max_new_tokens=2, do_sample=False,
                       pad_token_id=0)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = model.generate(x, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
    generated = out.shape[1] - width
    tokens = sum(min(o, generated) for o in workload.output_lens)
    return {"requests": len(workload.prompts), "output_tokens": tokens, "elapsed_s": elapsed,
            "output_tok_s": tokens / elapsed, "setup_s": 0.0,
            "method": "padded generate (no continuous batching in this transformers)"}
