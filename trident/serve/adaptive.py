"""`trident serve --adaptive`: hold a time-per-output-token objective by admitting requests in waves and running
fewer sequences at once.

On a saturated device a sequence's time per output token (TPOT) is the length of the steps it decodes in: each
step serves every running sequence and the chunk of prompt being prefilled beside them (on two CPU cores a
512-token chunk makes a step of over a second: every request admitted while a sequence decodes stalls it that long).
The controller, one per loaded model (an AsyncEngine observer), keeps the TPOTs of the requests that finished in the
last ``window_s`` seconds and the lengths of the steps run since its last decision. At most every ``interval_s``
seconds, its signal is the larger of the 90th percentile of those TPOTs (once ``min_requests`` have finished since
its last decision) and the steps' length (once ``MIN_STEPS`` steps have run: each running sequence gets a token a
step, so this is the TPOT they see now, known long before they finish; their mean, or in waves their median:
there the few long steps are a wave's prefill, before its sequences' first tokens). When the signal is above the
objective it

- first admits in waves (``LLMEngine.set_admission_floor(WAVE_FLOOR)``): waiting requests join only in a step that
  starts with at most one sequence running (whole prompts only), so the steps in between are decode steps alone and
  prompts' prefill moves into the time to first token of the wave that brings them (a wave stalls at most the one
  sequence left of the last: with none left, a long request would hold the queue back until it ends);
- then admits in strict waves (``STRICT_FLOOR``: only in a step with nothing running), where a wave's prefill
  stalled the sequence left of the last (on two CPU cores a wave of a few prompts is a step of a second: a request
  of 20 tokens caught by it gets 50 ms more per token);
- then lowers the running limit (``set_running_limit``) by ``shrink`` (at least one sequence less): shorter decode
  steps, smaller waves.

When the signal (with finished requests in it) is below ``grow_below`` of the objective and requests are waiting,
it raises the limit by one sequence, up to max_num_seqs. Under load it never leaves waves by that signal: in waves
the TPOT measured says nothing of the stalls admitting in every step would bring back (waves are what keep it low),
so going back on it would only swing waves, steady, waves again. It admits in every step again at max_num_seqs
(``steady``) once load has dropped: the engine has been idle (nothing running, nothing waiting) for ``idle_s``
seconds. The engine reports only after steps (and once as it goes idle), so the gap is seen at the first report
after it (or at a later idle one), whatever the interval and however few requests or steps there were since.

Requests the limit or a wave holds back wait in the queue (their time to first token grows instead); running ones
are never preempted by a decision. Where the server names a fallback for a model (``--adaptive-fallback NAME=OTHER``,
say its int4 variant), the pool sends new requests for it to the fallback while it is ``overloaded`` (waves, a
lowered limit, or with a time-to-first-token objective (``--slo-ttft-ms``) its recent requests' 90th percentile TTFT
above it; and requests waiting) and back once it ``has_room`` (ModelPool.use). Every decision is logged and
counted on /metrics (``trident_adaptive_decisions_total``: waves, strict, shrink, grow, steady, route, return;
``trident_adaptive_running_limit``, ``trident_adaptive_waves``).
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from trident.bench.serve_stats import percentile
from trident.errors import TridentError

if TYPE_CHECKING:
    from trident.engine.engine import EngineStats, LLMEngine
    from trident.engine.results import RequestOutput

logger = logging.getLogger("trident.serve")

WAVE_FLOOR = 1
"""In waves, new requests join a step that starts with at most this many sequences running: a long request left
alone does not hold the queue back, and one wave's prefill stalls at most this many decoding sequences."""
STRICT_FLOOR = 0
"""In strict waves (when waves alone miss the objective) new requests join only a step with nothing running: no
decoding sequence ever waits for a prompt's prefill (a long request holds the queue back instead)."""
MIN_STEPS = 8
"""Busy steps since the last decision needed before their mean length can call for a shrink."""


@dataclass(frozen=True)
class AdaptiveConfig:
    """The objective, how fast the controller moves, and how long an idle engine takes to admit in every step
    again."""

    tpot_ms: float
    """The 90th percentile of time per output token to hold, milliseconds."""
    window_s: float = 10.0
    """Finished requests this recent inform a decision."""
    interval_s: float = 2.0
    """At most one decision this often."""
    min_requests: int = 4
    """Requests finished since the last decision needed for the next."""
    shrink: float = 0.75
    """The running limit is multiplied by this (rounded down, at least one less) when the objective is missed."""
    grow_below: float = 0.7
    """The limit grows by one while the percentile is below this fraction of the objective and requests wait (up
    to max_num_seqs; waves stay on: a low TPOT in waves does not end them)."""
    idle_s: float = 10.0
    """Once the engine has been idle this long (nothing running, nothing waiting), load has dropped: the limit goes
    back to max_num_seqs and requests join in every step again."""
    ttft_ms: float | None = None
    """The 90th percentile of time to first token to hold (``--slo-ttft-ms``), or None. While the recent requests'
    is above it and requests wait, the model counts as overloaded: new ones go to its fallback. It moves no admission
    lever: admitting fewer requests would only queue them longer."""

    def __post_init__(self) -> None:
        if (not self.tpot_ms > 0 or not self.window_s > 0 or not self.interval_s >= 0 or self.min_requests < 1
                or not self.idle_s > 0 or (self.ttft_ms is not None and not self.ttft_ms > 0)):
            raise TridentError("--adaptive needs a positive --slo-tpot-ms (and a positive --slo-ttft-ms if any, "
                               "window, interval, idle time and request count)")
        if not 0 < self.shrink < 1 or not 0 < self.grow_below < 1:
            raise TridentError("the adaptive controller's shrink and grow_below factors must lie in (0, 1)")


class AdaptiveController:
    """An EngineObserver that admits ``engine``'s requests in waves and moves its running limit to hold
    ``config.tpot_ms``; ``on_decision(action, limit, waves)`` hears of each decision (the server's metrics)."""

    def __init__(self, engine: LLMEngine, config: AdaptiveConfig, model: str = "",
                 on_decision: Callable[[str, int, bool], None] = lambda *_: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.engine = engine
        self.config = config
        self.model = model
        self.on_decision = on_decision
        self.clock = clock
        self._finished: deque[tuple[float, float]] = deque()
        """(time finished, TPOT seconds) of recent requests, oldest first."""
        self._ttfts: deque[tuple[float, float]] = deque()
        """(time finished, TTFT seconds) of the requests finished in the last window_s (decisions keep them)."""
        self._since_decision = 0
        self._last_decision = -math.inf
        self._steps: list[float] = []
        """Lengths (seconds) of the busy steps since the last decision: what each running sequence waits per
        token now."""
        self._last_stats: float | None = None
        self._idle_since: float | None = None
        """When the engine's idle gap began (its first report of nothing running and nothing waiting); None while
        it has work."""
        self.decisions: list[tuple[str, int, bool, float]] = []
        """(action, running limit set, whether admitting in waves, the signal in ms: 0 for ``steady``, decided on
        an idle gap) of every decision, oldest first."""

    def request_done(self, status: str, last: RequestOutput | None) -> None:
        if last is None or not last.finished or status in ("abort", "error"):
            return
        now = self.clock()
        if last.metrics.ttft_s is not None:
            self._ttfts.append((now, last.metrics.ttft_s))
        if last.tpot_s is not None:
            self._finished.append((now, last.tpot_s))
            self._since_decision += 1

    @property
    def waves(self) -> bool:
        """Whether the engine admits in waves now."""
        return self.engine.admission_floor is not None

    @property
    def overloaded(self) -> bool:
        """Whether the engine admits in waves or under a lowered limit, or misses the TTFT objective, and requests
        wait now (new ones are better sent elsewhere)."""
        engine = self.engine
        held = self.waves or engine.running_limit < engine.config.scheduler.max_num_seqs
        return (held or self.ttft_over) and engine.stats().num_waiting > 0

    @property
    def ttft_over(self) -> bool:
        """Whether the 90th percentile TTFT of the requests finished in the last window_s (min_requests of them at
        least) is above ``config.ttft_ms``; False without a TTFT objective."""
        c = self.config
        if c.ttft_ms is None:
            return False
        self._forget_older(self._ttfts, self.clock())
        if len(self._ttfts) < c.min_requests:
            return False
        return 1000 * percentile([ttft for _, ttft in self._ttfts], 90) > c.ttft_ms

    @property
    def has_room(self) -> bool:
        """Whether fewer sequences run now than the limit lets and none waits (requests may come back)."""
        stats = self.engine.stats()
        return stats.num_running < self.engine.running_limit and stats.num_waiting == 0

    def engine_stats(self, stats: EngineStats) -> None:
        now = self.clock()
        if self._last_stats is not None and stats.num_running > 0:
            self._steps.append(now - self._last_stats)
        self._last_stats = now if stats.num_running > 0 else None  # an idle gap is no step
        if self._steady_after_idle(stats, now):
            return
        c = self.config
        self._forget_older(self._finished, now)
        if now - self._last_decision < c.interval_s:
            return
        finished = self._since_decision >= c.min_requests and self._finished
        p90_ms = 1000 * percentile([tpot for _, tpot in self._finished], 90) if finished else None
        engine, scheduler = self.engine, self.engine.config.scheduler
        limit, waves = engine.running_limit, self.waves
        step_ms = None
        if len(self._steps) >= MIN_STEPS:
            step_ms = 1000 * (percentile(self._steps, 50) if waves else sum(self._steps) / len(self._steps))
        if p90_ms is None and step_ms is None:
            return
        signal_ms = max(v for v in (p90_ms, step_ms) if v is not None)
        floor = engine.admission_floor
        if signal_ms > c.tpot_ms:
            if floor is None:
                self._decide("waves", limit, WAVE_FLOOR, signal_ms, now)
            elif floor > STRICT_FLOOR:
                self._decide("strict", limit, STRICT_FLOOR, signal_ms, now)
            elif limit > 1:
                self._decide("shrink", max(1, min(limit - 1, math.floor(limit * c.shrink))), floor, signal_ms, now)
        elif (p90_ms is not None and signal_ms < c.grow_below * c.tpot_ms and stats.num_waiting > 0
              and limit < scheduler.max_num_seqs):
            self._decide("grow", limit + 1, floor, signal_ms, now)  # waves stay: only an idle gap ends them

    def _forget_older(self, finished: deque[tuple[float, float]], now: float) -> None:
        """Drop the entries (time finished, value) of ``finished`` older than window_s."""
        while finished and finished[0][0] < now - self.config.window_s:
            finished.popleft()

    def _steady_after_idle(self, stats: EngineStats, now: float) -> bool:
        """Note when the engine goes idle (nothing running, nothing waiting) and when it has work again; once it has
        been idle ``idle_s``, go back to max_num_seqs without waves (``steady``) if not there. Whether it did."""
        idle = stats.num_running == 0 and stats.num_waiting == 0
        since = self._idle_since
        if idle and since is None:
            self._idle_since = now
        elif not idle:
            self._idle_since = None
        max_num_seqs = self.engine.config.scheduler.max_num_seqs
        steady = not self.waves and self.engine.running_limit >= max_num_seqs
        if since is None or now - since < self.config.idle_s or steady:
            return False
        self._decide("steady", max_num_seqs, None, 0.0, now, idle_s=now - since)
        return True

    def _decide(self, action: str, limit: int, floor: int | None, signal_ms: float, now: float,
                idle_s: float | None = None) -> None:
        limit = self.engine.set_running_limit(limit)
        self.engine.set_admission_floor(floor)
        waves = floor is not None
        self._last_decision = now
        self._since_decision = 0
        self._finished.clear()  # the next decision reads requests and steps that ran under the new limits
        self._steps.clear()
        self.decisions.append((action, limit, waves, signal_ms))
        seen = (f"idle for {idle_s:.1f} s" if idle_s is not None
                else f"TPOT {signal_ms:.1f} ms against {self.config.tpot_ms:.1f} ms")
        logger.info("adaptive %s: %s: %s, running limit %d", self.model or "model", seen, ACTIONS[action], limit)
        self.on_decision(action, limit, waves)


ACTIONS = {"waves": "admitting requests in waves", "strict": "admitting requests only when none runs",
           "shrink": "lowering the running limit",
           "grow": "raising the running limit", "steady": "admitting requests in every step again"}
"""What each decision does, for the log."""
