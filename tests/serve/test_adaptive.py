"""`trident serve --adaptive`: the controller's decisions on a scripted clock and finished requests, and a live
server that admits in waves and lowers a model's running limit to chase an objective no batch meets, counted on
/metrics."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import httpx
import openai
import pytest
from test_metrics import scrape, value

from trident.cli import build_parser, serve_config
from trident.errors import TridentError
from trident.serve.adaptive import MIN_STEPS, STRICT_FLOOR, WAVE_FLOOR, AdaptiveConfig, AdaptiveController


@dataclass
class FakeScheduler:
    max_num_seqs: int = 16


@dataclass
class FakeConfig:
    scheduler: FakeScheduler = field(default_factory=FakeScheduler)


class FakeEngine:
    """What the controller reads and sets: the running limit and the admission floor (clamped as the scheduler
    clamps them)."""

    def __init__(self) -> None:
        self.config = FakeConfig()
        self.running_limit = 16
        self.admission_floor: int | None = None

    def set_running_limit(self, limit: int) -> int:
        self.running_limit = max(1, min(limit, self.config.scheduler.max_num_seqs))
        return self.running_limit

    def set_admission_floor(self, floor: int | None) -> int | None:
        self.admission_floor = floor
        return floor


@dataclass
class Metrics:
    ttft_s: float | None = None


@dataclass
class Finished:
    tpot_s: float | None
    finished: bool = True
    metrics: Metrics = field(default_factory=Metrics)


@dataclass
class Stats:
    num_waiting: int
    num_running: int = 0


def test_controller_admits_in_waves_then_strict_waves_then_shrinks_then_grows_back() -> None:
    now = [0.0]
    engine = FakeEngine()
    decisions = []
    controller = AdaptiveController(engine, AdaptiveConfig(tpot_ms=50, window_s=10, interval_s=2, min_requests=3),
                                    "m", on_decision=lambda *d: decisions.append(d), clock=lambda: now[0])
    for _ in range(2):
        controller.request_done("length", Finished(0.080))
    controller.engine_stats(Stats(num_waiting=5))
    assert engine.admission_floor is None  # two requests are not enough to decide
    controller.request_done("length", Finished(0.080))
    controller.request_done("abort", Finished(0.500))  # aborted: not counted
    controller.engine_stats(Stats(num_waiting=5))
    assert (engine.running_limit, engine.admission_floor) == (16, WAVE_FLOOR) and decisions == [("waves", 16, True)]
    assert controller.decisions == [("waves", 16, True, 80.0)]
    for _ in range(3):
        controller.request_done("stop", Finished(0.060))
    now[0] = 1.0
    controller.engine_stats(Stats(num_waiting=5))
    assert engine.running_limit == 16  # within the interval
    now[0] = 2.5
    controller.engine_stats(Stats(num_waiting=5))
    assert (engine.running_limit, engine.admission_floor) == (16, STRICT_FLOOR)  # in waves already: strict waves
    for _ in range(3):
        controller.request_done("stop", Finished(0.060))
    now[0] = 5.0
    controller.engine_stats(Stats(num_waiting=5))
    assert (engine.running_limit, engine.admission_floor) == (12, STRICT_FLOOR)  # then floor(16 * 0.75)
    now[0] = 20.0  # everything finished before is out of the window now
    for _ in range(3):
        controller.request_done("stop", Finished(0.020))
    controller.engine_stats(Stats(num_waiting=0))
    assert engine.running_limit == 12  # fast, but nobody waits: no reason to grow
    controller.engine_stats(Stats(num_waiting=2))
    assert (engine.running_limit, engine.admission_floor) == (13, STRICT_FLOOR)
    assert [d[0] for d in controller.decisions] == ["waves", "strict", "shrink", "grow"]
    assert decisions[1] == ("strict", 16, True)
    now[0] = 30.0
    for _ in range(3):
        controller.request_done("stop", Finished(0.040))  # 80% of the objective: neither shrink nor grow
    controller.engine_stats(Stats(num_waiting=2))
    assert engine.running_limit == 13 and len(decisions) == 4
    for i in range(7):  # fast again (the first with the 40 ms ones in its window): the limit climbs back to
        # max_num_seqs, and admission stays in waves (their low TPOT says nothing of steady admission's stalls)
        now[0] = 40.0 + 3 * i
        for _ in range(3):
            controller.request_done("stop", Finished(0.010))
        controller.engine_stats(Stats(num_waiting=2, num_running=4))
    assert (engine.running_limit, engine.admission_floor) == (16, STRICT_FLOOR)
    assert [d[0] for d in controller.decisions] == ["waves", "strict", "shrink"] + ["grow"] * 4
    assert decisions[-1] == ("grow", 16, True)


def waves_at(limit: int, now: list[float], **config: float) -> tuple[FakeEngine, AdaptiveController,
                                                                   list[tuple[str, int, bool]]]:
    """A controller (objective 50 ms, ``config`` besides) that admits in waves under ``limit`` at ``now[0]``
    (strict waves below max_num_seqs): slow requests called for waves, then strict waves and shrinks, a decision
    every 100 s (longer than any interval here); and the list its ``on_decision`` fills."""
    engine, decisions, settings = FakeEngine(), [], AdaptiveConfig(**{"tpot_ms": 50, **config})
    controller = AdaptiveController(engine, settings, on_decision=lambda *d: decisions.append(d),
                                    clock=lambda: now[0])
    while engine.admission_floor is None or engine.running_limit > limit:
        now[0] += 100
        for _ in range(settings.min_requests):
            controller.request_done("stop", Finished(0.080))
        controller.engine_stats(Stats(num_waiting=4, num_running=engine.running_limit))
    assert (engine.running_limit, engine.admission_floor) == (limit, WAVE_FLOOR if limit == 16 else STRICT_FLOOR)
    return engine, controller, decisions


def test_low_tpot_in_waves_at_the_limit_keeps_waves() -> None:
    now = [0.0]
    engine, controller, _ = waves_at(16, now, interval_s=0, min_requests=3)
    for _ in range(20):  # fast requests and steps of 5 ms, many waiting: the old rule went back to steady here
        for _ in range(3):
            controller.request_done("stop", Finished(0.005))
        for _ in range(MIN_STEPS):
            now[0] += 0.005
            controller.engine_stats(Stats(num_waiting=8, num_running=16))
    assert controller.decisions == [("waves", 16, True, 80.0)]
    assert (engine.running_limit, engine.admission_floor) == (16, WAVE_FLOOR)


@pytest.mark.parametrize("then_running", [0, 3], ids=["idle-call", "work-call"])
def test_an_idle_gap_goes_back_to_steady(then_running: int) -> None:
    now = [0.0]
    # neither the interval nor the requests or steps since the last decision hold it back: the gap is the evidence
    engine, controller, decisions = waves_at(12, now, interval_s=60, min_requests=10, idle_s=5)
    t = now[0]
    now[0] = t + 1.0
    controller.engine_stats(Stats(num_waiting=0, num_running=0))  # the loop goes idle
    assert (engine.running_limit, engine.admission_floor) == (12, STRICT_FLOOR)
    now[0] = t + 6.0  # 5 s later: a request comes (or an aborted one is cleaned up, and the loop is idle again)
    controller.engine_stats(Stats(num_waiting=1 if then_running else 0, num_running=then_running))
    assert (engine.running_limit, engine.admission_floor) == (16, None)
    assert [d[0] for d in controller.decisions] == ["waves", "strict", "shrink", "steady"]
    assert controller.decisions[-1] == ("steady", 16, False, 0.0) and decisions[-1] == ("steady", 16, False)
    now[0] = t + 7.0
    controller.engine_stats(Stats(num_waiting=0, num_running=0))
    now[0] = t + 20.0  # already steady at max_num_seqs: another idle gap decides nothing
    controller.engine_stats(Stats(num_waiting=0, num_running=2))
    assert len(controller.decisions) == 4


def test_a_short_idle_gap_keeps_waves() -> None:
    now = [0.0]
    engine, controller, _ = waves_at(12, now, idle_s=5)
    t = now[0]
    for start in (t + 1.0, t + 10.0):  # the second gap starts anew: the first one's start is forgotten
        now[0] = start
        controller.engine_stats(Stats(num_waiting=0, num_running=0))
        now[0] = start + 4.9
        controller.engine_stats(Stats(num_waiting=2, num_running=2))
    assert [d[0] for d in controller.decisions] == ["waves", "strict", "shrink"]
    assert (engine.running_limit, engine.admission_floor) == (12, STRICT_FLOOR)


def test_a_gap_with_work_is_not_idle() -> None:
    now = [0.0]
    engine, controller, _ = waves_at(16, now, idle_s=5, interval_s=60)
    t = now[0]
    now[0] = t + 1.0
    controller.engine_stats(Stats(num_waiting=0, num_running=0))
    now[0] = t + 2.0  # work again: the idle gap ends at 1 s
    controller.engine_stats(Stats(num_waiting=0, num_running=1))
    now[0] = t + 30.0  # a long step with a sequence running
    controller.engine_stats(Stats(num_waiting=0, num_running=1))
    now[0] = t + 60.0  # nothing running but requests held back: not idle either
    controller.engine_stats(Stats(num_waiting=3, num_running=0))
    now[0] = t + 90.0
    controller.engine_stats(Stats(num_waiting=3, num_running=1))
    assert [d[0] for d in controller.decisions] == ["waves"]
    assert (engine.running_limit, engine.admission_floor) == (16, WAVE_FLOOR)


def test_long_steps_call_for_waves_before_requests_finish() -> None:
    now = [0.0]
    engine = FakeEngine()
    controller = AdaptiveController(engine, AdaptiveConfig(tpot_ms=50, interval_s=2, min_requests=4),
                                    clock=lambda: now[0])
    for _ in range(MIN_STEPS):  # busy steps of 30 ms: under the objective
        now[0] += 0.030
        controller.engine_stats(Stats(num_waiting=4, num_running=16))
    now[0] += 2.0  # one idle gap: the loop was idle, not a step (stats with nothing running end the run of steps)
    controller.engine_stats(Stats(num_waiting=0, num_running=0))
    assert engine.admission_floor is None and controller.decisions == []  # the mean 30 ms step: below 50 ms
    for _ in range(MIN_STEPS):  # then steps of 90 ms: no request has finished yet, the steps alone call for it
        now[0] += 0.090
        controller.engine_stats(Stats(num_waiting=4, num_running=16))
    assert (engine.running_limit, engine.admission_floor) == (16, WAVE_FLOOR)
    action, _, _, signal = controller.decisions[0]
    assert action == "waves" and 50 < signal < 90  # the mean of the steps since the last decision (30 and 90 ms)
    # In waves the median step is the signal: decode steps of 30 ms with two 2-second wave prefills among them
    # (a mean of 300 ms) hold
    for length in [0.030] * 8 + [2.0, 2.0]:
        now[0] += length
        controller.engine_stats(Stats(num_waiting=4, num_running=12))
    assert [d[0] for d in controller.decisions] == ["waves"]
    for _ in range(MIN_STEPS):  # while decode steps of 90 ms call for strict waves
        now[0] += 0.3
        controller.engine_stats(Stats(num_waiting=4, num_running=12))
    assert [d[0] for d in controller.decisions] == ["waves", "strict"]


def test_the_limit_has_a_floor() -> None:
    engine = FakeEngine()
    controller = AdaptiveController(engine, AdaptiveConfig(tpot_ms=1, interval_s=0, min_requests=1))
    for _ in range(20):
        controller.request_done("stop", Finished(1.0))
        controller.engine_stats(Stats(num_waiting=3))
    assert (engine.running_limit, engine.admission_floor) == (1, STRICT_FLOOR)
    assert [(action, limit) for action, limit, _, _ in controller.decisions] == [
        ("waves", 16), ("strict", 16), ("shrink", 12), ("shrink", 9), ("shrink", 6), ("shrink", 4), ("shrink", 3),
        ("shrink", 2), ("shrink", 1)]  # then nothing to lower


class WaitingEngine(FakeEngine):
    """A FakeEngine whose stats report ``waiting`` requests (what ``overloaded`` reads)."""

    def __init__(self, waiting: int) -> None:
        super().__init__()
        self.waiting = waiting

    def stats(self) -> Stats:
        return Stats(num_waiting=self.waiting, num_running=2)


def test_a_missed_ttft_objective_overloads_the_model() -> None:
    """With --slo-ttft-ms, the recent requests' p90 TTFT above it, and requests waiting, the model is overloaded (the
    pool sends new requests to its fallback) without any admission decision; not without waiting requests, not
    once the slow ones leave the window, not with fewer than min_requests, not without the objective."""
    now = [0.0]
    engine = WaitingEngine(waiting=3)
    config = AdaptiveConfig(tpot_ms=50, ttft_ms=1000, window_s=10, min_requests=3)
    controller = AdaptiveController(engine, config, clock=lambda: now[0])
    for ttft in (0.4, 2.5):
        controller.request_done("stop", Finished(0.02, metrics=Metrics(ttft)))
    assert not controller.overloaded  # two requests: too few to judge
    controller.request_done("length", Finished(None, metrics=Metrics(3.0)))  # one token: a TTFT, no TPOT
    assert controller.ttft_over and controller.overloaded and controller.decisions == []
    assert engine.admission_floor is None and engine.running_limit == 16  # no admission lever moved
    engine.waiting = 0
    assert not controller.overloaded  # nothing waits: nothing to send elsewhere
    engine.waiting = 3
    now[0] = 11.0  # out of the window
    assert not controller.ttft_over and not controller.overloaded
    for _ in range(3):
        controller.request_done("stop", Finished(0.02, metrics=Metrics(0.3)))
    assert not controller.overloaded  # fast first tokens
    plain = AdaptiveController(WaitingEngine(waiting=3), AdaptiveConfig(tpot_ms=50, min_requests=1))
    plain.request_done("stop", Finished(0.02, metrics=Metrics(60.0)))
    assert not plain.ttft_over and not plain.overloaded  # no TTFT objective


def test_flags() -> None:
    parser = build_parser()
    config = serve_config(parser.parse_args(["serve", "--adaptive", "--slo-tpot-ms", "80"]), environ={})
    assert config.adaptive == AdaptiveConfig(tpot_ms=80)
    assert serve_config(parser.parse_args(["serve"]), environ={}).adaptive is None
    with pytest.raises(TridentError, match="needs --slo-tpot-ms"):
        serve_config(parser.parse_args(["serve", "--adaptive"]), environ={})
    with pytest.raises(TridentError, match="go with --adaptive"):
        serve_config(parser.parse_args(["serve", "--slo-tpot-ms", "80"]), environ={})
    with pytest.raises(TridentError, match="go with --adaptive"):
        serve_config(parser.parse_args(["serve", "--slo-ttft-ms", "900"]), environ={})
    config = serve_config(parser.parse_args(["serve", "--adaptive", "--slo-tpot-ms", "80", "--slo-ttft-ms", "900"]),
                          environ={})
    assert config.adaptive == AdaptiveConfig(tpot_ms=80, ttft_ms=900)
    with pytest.raises(TridentError, match="slo-ttft-ms"):
        AdaptiveConfig(tpot_ms=80, ttft_ms=0)
    with pytest.raises(TridentError, match="positive --slo-tpot-ms"):
        AdaptiveConfig(tpot_ms=0)
    with pytest.raises(TridentError, match="idle time"):
        AdaptiveConfig(tpot_ms=80, idle_s=0)


def test_live_server_lowers_the_limit_and_counts_it(start_server) -> None:
    from trident.engine.llm import engine_config
    from trident.serve import ModelPool, ModelSpec, PoolConfig, ServeConfig, build_app

    adaptive = AdaptiveConfig(tpot_ms=0.001, interval_s=0, min_requests=2)  # no batch is that fast: it must shrink
    spec = ModelSpec("m", engine_config(None, dtype="float32", max_model_len=256, max_num_seqs=8))
    pool = ModelPool(PoolConfig(models=(spec,)), ServeConfig(adaptive=adaptive))
    assert pool.preload() == ["m"]
    with start_server(build_app(pool), None) as server:
        samples, _ = scrape(server.base_url)
        assert value(samples, "trident_adaptive_running_limit", "m") == 8
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
        answers = []

        def ask(i: int) -> None:
            answers.append(client.completions.create(model="m", prompt=f"Count to {i}:", max_tokens=6,
                                                     temperature=0))

        for _ in range(3):  # the first round's TPOTs call for waves, the second's for strict waves, the third's for
            # a lower limit
            threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert len(answers) == 24 and all(a.usage.completion_tokens == 6 for a in answers)
        samples, _ = scrape(server.base_url)
        limit = value(samples, "trident_adaptive_running_limit", "m")
        shrinks = value(samples, "trident_adaptive_decisions_total", "m", action="shrink")
        assert value(samples, "trident_adaptive_decisions_total", "m", action="waves") == 1
        assert value(samples, "trident_adaptive_decisions_total", "m", action="strict") == 1
        assert value(samples, "trident_adaptive_waves", "m") == 1 and shrinks >= 1 and limit < 8
        assert httpx.get(f"{server.base_url}/health").json() == {"status": "ok"}


def test_overloaded_model_sends_new_requests_to_its_fallback(start_server) -> None:
    import time

    from trident.engine.llm import engine_config
    from trident.serve import ModelPool, ModelSpec, PoolConfig, ServeConfig, build_app

    adaptive = AdaptiveConfig(tpot_ms=0.001, interval_s=0, min_requests=1)  # every finished request shrinks m
    engine = engine_config(None, dtype="float32", max_model_len=256, max_num_seqs=8)
    with pytest.raises(TridentError, match="go with --adaptive"):
        ModelPool(PoolConfig(models=(ModelSpec("m", engine), ModelSpec("m-fast", engine)), fallbacks={"m": "m-fast"}))
    with pytest.raises(TridentError, match="two different served models"):
        PoolConfig(models=(ModelSpec("m", engine),), fallbacks={"m": "other"})
    pool = ModelPool(PoolConfig(models=(ModelSpec("m", engine), ModelSpec("m-fast", engine)),
                                fallbacks={"m": "m-fast"}), ServeConfig(adaptive=adaptive))
    assert pool.preload() == ["m", "m-fast"]
    with start_server(build_app(pool), None) as server:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
        served: list[str] = []

        def ask(tokens: int) -> str:
            model = client.completions.create(model="m", prompt="Once upon a time", max_tokens=tokens,
                                              temperature=0).model
            served.append(model)
            return model

        for _ in range(6):  # each one's TPOT moves m: waves, strict waves, then its limit 6, 4, 3, 2
            ask(4)
        samples, _ = scrape(server.base_url)
        assert value(samples, "trident_adaptive_running_limit", "m") == 2
        first_wave = [threading.Thread(target=ask, args=(48,)) for _ in range(6)]  # more than the limit lets run
        for t in first_wave:
            t.start()
        deadline = time.monotonic() + 60
        while True:  # m's limit is down and requests wait behind it
            samples, _ = scrape(server.base_url)
            if (value(samples, "trident_adaptive_running_limit", "m") < 8
                    and value(samples, "trident_num_requests_waiting", "m") > 0):
                break
            assert time.monotonic() < deadline, "m never became overloaded"
            time.sleep(0.05)
        assert ask(4) == "m-fast"  # a new request now goes to the fallback
        for t in first_wave:
            t.join()
        # the six alone went to m, and the wave's first two at least (wave requests that came once m was
        # overloaded went to the fallback too)
        assert served[:6] == ["m"] * 6 and served.count("m") >= 8 and len(served) == 13
        assert ask(4) == "m"  # m has room again: back to it
        samples, _ = scrape(server.base_url)
        assert value(samples, "trident_adaptive_decisions_total", "m", action="route") >= 1
        assert value(samples, "trident_adaptive_decisions_total", "m", action="return") >= 1
