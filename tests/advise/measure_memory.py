"""Run in a fresh process: the resident memory an engine and a workload that fills its KV cache add to the process.

    python measure_memory.py '{"max_model_len": 1024, "max_num_seqs": 4, "dtype": "float32"}'

Prints one JSON line: ``peak_bytes``, the highest anonymous resident memory (heap: tensors and Python objects; not
code or mapped files) above what the process held before the engine was created, sampled every 2 ms from then
until ``max_num_seqs`` sequences of ``max_model_len`` tokens (prompt plus output) have been generated.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import trident.engine.engine  # noqa: F401  (code imported before the baseline: it is not what is measured)
import trident.loader.gguf  # noqa: F401
import trident.models.llama  # noqa: F401
import trident.tokenizer  # noqa: F401
from trident.engine.llm import LLM
from trident.engine.request import SamplingParams

PAGE = os.sysconf("SC_PAGE_SIZE")
OUTPUT_TOKENS = 4


def anonymous_bytes() -> int:
    with open("/proc/self/statm") as f:
        _, resident, shared, *_ = (int(v) for v in f.read().split())
    return (resident - shared) * PAGE


def main() -> None:
    options = json.loads(sys.argv[1])
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], anonymous_bytes())
            time.sleep(0.002)

    base = anonymous_bytes()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    llm = LLM(None, **options)
    context, seqs = options["max_model_len"], options["max_num_seqs"]
    prompts = [[(7 * i + 13 * j) % 1000 + 5 for j in range(context - OUTPUT_TOKENS)] for i in range(seqs)]
    outputs = llm.generate(prompts, SamplingParams(max_tokens=OUTPUT_TOKENS, ignore_eos=True, temperature=0))
    done.set()
    sampler.join()
    peak[0] = max(peak[0], anonymous_bytes())
    assert all(len(o.outputs[0].token_ids) == OUTPUT_TOKENS for o in outputs)
    blocks_used = seqs * -(-context // llm.engine.config.cache.block_size)
    print(json.dumps({"peak_bytes": peak[0] - base, "blocks_used": blocks_used, "num_blocks": llm.engine.num_blocks}))


if __name__ == "__main__":
    main()
