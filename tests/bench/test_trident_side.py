"""The latency bench warms the engine up with a prompt as long as the one it times, so that kernels compiled for
the timed prefill's shape are compiled before the clock starts (a shorter warm-up left compilation inside the first
repetition's TTFT)."""

from __future__ import annotations

from types import SimpleNamespace

from trident.bench.trident_side import WARM_UP_PROMPT_LEN, run_latency, warm_up
from trident.bench.workloads import latency_workload


class RecordingEngine:
    """An engine stand-in that records each request's prompt and emits one token per step."""

    def __init__(self, max_num_seqs: int = 4) -> None:
        self.model_config = SimpleNamespace(vocab_size=500)
        self.config = SimpleNamespace(scheduler=SimpleNamespace(max_num_seqs=max_num_seqs))
        self.prompts: list[list[int]] = []
        self._running: list[list] = []

    def add_request(self, prompt, params) -> None:
        self.prompts.append(list(prompt))
        self._running.append([params.max_tokens, 0])

    def has_unfinished(self) -> bool:
        return bool(self._running)

    def step(self) -> list:
        outs = []
        for request in self._running:
            request[1] += 1
            outs.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=[0] * request[1])]))
        self._running = [r for r in self._running if r[1] < r[0]]
        return outs


def test_latency_warm_up_matches_the_timed_prompt_length() -> None:
    engine = RecordingEngine()
    result = run_latency(engine, latency_workload(None, prompt_len=77, output_len=5, vocab_size=500))
    assert [len(p) for p in engine.prompts] == [77, 77], "warm-up, then the timed prompt"
    assert engine.prompts[0] != engine.prompts[1], "the warm-up must not be a prefix-cache hit for the timed prompt"
    assert result["prompt_tokens"] == 77 and result["output_tokens"] == 5


def test_warm_up_defaults_and_caps_at_the_batch() -> None:
    engine = RecordingEngine(max_num_seqs=3)
    warm_up(engine, num_requests=10)
    assert [len(p) for p in engine.prompts] == [WARM_UP_PROMPT_LEN] * 3
    assert not engine.has_unfinished()
