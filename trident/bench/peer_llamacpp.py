"""llama.cpp (through llama-cpp-python) as a batch-1 peer of `trident bench latency --compare llama.cpp` on the
same GGUF file, the same prompt token ids and the same thread count, in the same process: the configuration
of TARGETS.md's llama.cpp row (n_ctx 2048, n_batch 512, greedy). llama-cpp-python is optional: `pip install
llama-cpp-python` (it compiles llama.cpp; a few minutes on two cores)."""

from __future__ import annotations

import time

from trident.bench.workloads import Workload
from trident.errors import TridentError

INSTALL_HINT = "pip install llama-cpp-python (an optional peer; it builds llama.cpp from source)"


def load_llamacpp(path: str, threads: int):
    """A llama.cpp context on the GGUF file ``path``."""
    if not path.endswith(".gguf"):
        raise TridentError(f"--compare llama.cpp needs a GGUF model file, got {path}")
    try:
        from llama_cpp import Llama
    except ImportError:
        raise TridentError(f"--compare llama.cpp needs llama-cpp-python: {INSTALL_HINT}") from None
    return Llama(model_path=path, n_ctx=2048, n_threads=threads, n_threads_batch=threads, n_batch=512,
                 verbose=False, seed=0)


def llamacpp_latency(llm, workload: Workload, threads: int) -> dict:
    """Batch 1: prefill tok/s of the prompt (one eval), decode tok/s of the rest (greedy, one token per eval)."""
    prompt = list(workload.prompts[0])
    n = workload.output_lens[0]
    llm.reset()
    llm.eval(prompt[:8])  # warm-up
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(n - 1):  # the first new token comes from the prefill's logits, as trident's does
        llm.eval([llm.sample(temp=0.0)])
    decode_s = time.perf_counter() - t0
    return {"prompt_tokens": len(prompt), "output_tokens": n, "prefill_tok_s": len(prompt) / prefill_s,
            "decode_tok_s": (n - 1) / max(decode_s, 1e-9), "ttft_ms": prefill_s * 1000,
            "method": f"llama-cpp-python, {threads} threads"}
