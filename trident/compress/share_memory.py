"""Memory of a loaded engine, two ways (``trident share --rss``, docs/compression.md "Weight sharing"):

- *unique storage bytes* (:func:`engine_weight_bytes`): the bytes of every parameter and buffer of the engine's
  model, each storage counted once (``LLMEngine.memory_usage().weights_bytes``): exact and deterministic, what the
  weights hold whatever the allocator does;
- *resident set size* (:func:`rss_of_engine`): a fresh Python process imports trident and torch, reads its
  VmRSS (/proc/self/status), loads the model into an engine (float32, a small KV cache), generates a few tokens
  (so every weight page is touched, including pages mapped from the file), and reads VmRSS again; the difference
  is what loading the model and running it added to the process (the KV cache's few blocks included). Linux only;
  it moves with the allocator and the page cache, so compare variants measured the same way, one after another.
"""

from __future__ import annotations

import json
import subprocess
import sys

from trident.errors import TridentError

RSS_KV_BLOCKS = 8
"""KV blocks of the measured engine (16 tokens each): the cache adds well under 1 MiB for a 135M model."""
_PROBE = r"""
import json, sys
import torch
import trident.engine.engine, trident.engine.llm  # imports before the first reading

def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

before = rss()
from trident.engine.engine import LLMEngine
from trident.engine.llm import engine_config
from trident.engine.request import SamplingParams
engine = LLMEngine(engine_config(sys.argv[1] or None, dtype="float32", device="cpu", num_blocks=int(sys.argv[2])))
engine.add_request([1, 2, 3, 4], SamplingParams(max_tokens=4, ignore_eos=True))
while engine.has_unfinished():
    engine.step()
after = rss()
print(json.dumps({"rss_before_bytes": before, "rss_after_bytes": after, "rss_added_bytes": after - before,
                  "weights_bytes": engine.memory_usage().weights_bytes}))
"""


def rss_of_engine(model: str | None) -> dict:
    """Load ``model`` (a path; None: the default model) in a fresh process and measure it (module docstring)."""
    done = subprocess.run([sys.executable, "-c", _PROBE, model or "", str(RSS_KV_BLOCKS)], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        raise TridentError(f"the memory probe of {model or 'the default model'} failed: "
                           f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def engine_weight_bytes(engine) -> int:
    """Unique storage bytes of the engine's weights (see the module docstring)."""
    return engine.memory_usage().weights_bytes
