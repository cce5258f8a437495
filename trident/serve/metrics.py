"""Prometheus metrics of one server: request outcomes, latencies, token counts and engine gauges.

``ServerMetrics`` owns its own ``CollectorRegistry`` (never the process-wide default one), so several
apps can live in one process. Every series but the memory budget carries a ``model`` label (the served
model's name; requests refused before a model was chosen, e.g. for an unknown model, carry
``model=""``); every label combination of a model is created when the model is registered, so each
metric name is exposed (at 0) before its first event.

Where figures come from:

- Per-request figures are recorded by ``request_done``, which the :class:`AsyncEngine` calls exactly
  once for every request it accepted: with the finish reason (``stop``/``length``) when it finishes,
  ``abort`` when its client goes away first, ``error`` when the engine fails under it.
- Requests refused before they reach the engine (4xx/5xx) are counted as ``error`` by
  :class:`RequestErrorCounter`, an ASGI middleware around the generation routes.
- Gauges and the preemption counter mirror ``LLMEngine.stats()``; ``engine_stats`` refreshes them
  after each engine step and on each scrape.
- Loads, unloads, whether a model is loaded and the bytes it holds come from the ModelPool.
- Mixture-of-experts models also expose their expert load (``LLMEngine.moe_stats()``, read on each scrape only:
  it waits for the device): ``trident_moe_expert_tokens_total{layer, expert}`` counts the (token, expert)
  assignments, and per layer ``trident_moe_layer_imbalance_ratio`` (max / mean expert load) and
  ``trident_moe_layer_entropy_term`` (alpha * sum p log p of the mean routing probabilities), both over the
  tokens since the engine's statistics were last reset. Their series appear at the model's first scrape as an
  MoE model: layers x experts counters (6,144 for Qwen3-30B-A3B) and two gauges per layer. Under expert
  parallelism (``serve --tensor-parallel N --expert-parallel``) they are still every expert's: rank 0's router
  routes every token (``moe_stats(whole=True)``); the experts rank r holds are r E / N .. (r + 1) E / N - 1.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from trident.engine.engine import EngineStats
from trident.engine.results import RequestOutput
from trident.moe.stats import MoeStats

METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST
"""The content type of ``ServerMetrics.render()``: Prometheus text exposition format 0.0.4."""

REQUEST_STATUSES = ("stop", "length", "abort", "error")
"""Values of the ``status`` label of ``trident_requests_total``."""

TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 7.5,
                  10.0, 20.0, 40.0, 80.0)
"""Time to first token: milliseconds for a short prompt on a GPU, seconds for a long one on a CPU."""
TPOT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                  0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
"""Time per output token: a few ms per decode step on a GPU, up to a few hundred ms on a laptop CPU."""
E2E_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0, 300.0,
                 600.0)
"""End-to-end request latency, from arrival to the last token."""


class ServerMetrics:
    """The metrics of every model a server serves, in a registry of their own; see the module docstring."""

    def __init__(self, models: Iterable[str] = (), memory_budget_bytes: int | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        labels = ["model"]
        self.requests = Counter("trident_requests_total", "Requests by final status: the finish reason "
                                "(stop, length), abort (client gone) or error (4xx/5xx).",
                                ["model", "status"], registry=r)
        self.ttft = Histogram("trident_time_to_first_token_seconds", "Time from arrival to the first "
                              "generated token, per finished request.", labels, buckets=TTFT_BUCKETS_S, registry=r)
        self.tpot = Histogram("trident_time_per_output_token_seconds", "Mean time between output tokens after "
                              "the first, per finished request with at least two tokens.", labels,
                              buckets=TPOT_BUCKETS_S, registry=r)
        self.e2e = Histogram("trident_e2e_request_latency_seconds", "Time from arrival to the last token, per "
                             "finished request.", labels, buckets=E2E_BUCKETS_S, registry=r)
        self.running = Gauge("trident_num_requests_running", "Sequences in the running batch.", labels,
                             registry=r)
        self.waiting = Gauge("trident_num_requests_waiting", "Sequences queued for the batch.", labels,
                             registry=r)
        self.kv_cache_usage = Gauge("trident_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use (0-1).",
                                    labels, registry=r)
        self.prefix_cache_hit_ratio = Gauge("trident_prefix_cache_hit_ratio", "Prompt tokens served from the "
                                            "prefix cache / prompt tokens looked up, since the model was loaded.",
                                            labels, registry=r)
        self.prompt_tokens = Counter("trident_prompt_tokens_total", "Prompt tokens of requests that finished or "
                                     "were aborted after producing output.", labels, registry=r)
        self.generation_tokens = Counter("trident_generation_tokens_total", "Generated tokens (all samples) of "
                                         "requests that finished or were aborted.", labels, registry=r)
        self.preemptions = Counter("trident_num_preemptions_total", "Sequences preempted for lack of KV blocks "
                                   "(mirrors the engine's counter).", labels, registry=r)
        self.model_loads = Counter("trident_model_loads_total", "Times the model was loaded.", labels, registry=r)
        self.model_unloads = Counter("trident_model_unloads_total", "Times the model was unloaded.", labels,
                                     registry=r)
        self.model_loaded_gauge = Gauge("trident_model_loaded", "1 while the model is loaded, else 0.", labels,
                                        registry=r)
        self.model_memory = Gauge("trident_model_memory_bytes", "Bytes the loaded model holds (weights and KV "
                                  "cache); 0 when unloaded.", labels, registry=r)
        self.model_load_seconds = Gauge("trident_model_load_seconds", "Wall time of the model's latest load.",
                                        labels, registry=r)
        self.memory_budget = Gauge("trident_memory_budget_bytes", "Bytes the loaded models may hold together "
                                   "(0: no budget).", registry=r)
        self.memory_budget.set(memory_budget_bytes or 0)
        self.moe_expert_tokens = Counter("trident_moe_expert_tokens_total", "(Token, expert) assignments of an MoE "
                                         "model's router, per MoE layer and expert.", ["model", "layer", "expert"],
                                         registry=r)
        self.moe_imbalance = Gauge("trident_moe_layer_imbalance_ratio", "Max / mean of the layer's expert loads "
                                   "since the engine's MoE statistics were reset (1 = even).", ["model", "layer"],
                                   registry=r)
        self.moe_entropy = Gauge("trident_moe_layer_entropy_term", "alpha * sum_i p_i log p_i over the layer's mean "
                                 "routing probabilities (-alpha log E when even).", ["model", "layer"], registry=r)
        self.adaptive_decisions = Counter("trident_adaptive_decisions_total", "Decisions of `trident serve "
                                          "--adaptive`: admit in waves, in strict waves, shrink or grow the "
                                          "running limit, admit in every step again (steady), route new requests "
                                          "to the fallback model or return.", ["model", "action"], registry=r)
        self.adaptive_running_limit = Gauge("trident_adaptive_running_limit", "Most sequences `trident serve "
                                            "--adaptive` lets run at once now.", labels, registry=r)
        self.adaptive_waves = Gauge("trident_adaptive_waves", "1 while `trident serve --adaptive` admits requests "
                                    "in waves (only while at most one sequence runs), else 0.", labels, registry=r)
        self._adaptive_actions: dict[str, set[str]] = {}
        """The adaptive decisions each model has made (its series, to remove with the model)."""
        self._moe_counts: dict[str, dict[tuple[int, int], int]] = {}
        """Each MoE model's expert counts at the last refresh (the counters grow by the difference)."""
        self._models: set[str] = set()
        self._engine_preemptions: dict[str, int] = {}
        """Each model's engine preemption count at the last refresh (the counter grows by the difference)."""
        for status in REQUEST_STATUSES:  # requests refused before a model was chosen
            self.requests.labels(model="", status=status)
        for model in models:
            self.add_model(model)

    def add_model(self, model: str) -> None:
        """Create every series of ``model`` (at 0); idempotent."""
        if model in self._models:
            return
        self._models.add(model)
        for status in REQUEST_STATUSES:
            self.requests.labels(model=model, status=status)
        for metric in self._per_model_metrics():
            metric.labels(model=model)

    def remove_model(self, model: str) -> None:
        """Drop every series of ``model`` (a registration that never loaded)."""
        if model not in self._models:
            return
        self._models.discard(model)
        self._engine_preemptions.pop(model, None)
        for status in REQUEST_STATUSES:
            self.requests.remove(model, status)
        for metric in self._per_model_metrics():
            metric.remove(model)
        actions = self._adaptive_actions.pop(model, None)
        for action in actions or ():
            self.adaptive_decisions.remove(model, action)
        if actions is not None:
            self.adaptive_running_limit.remove(model)
            self.adaptive_waves.remove(model)
        moe_series = self._moe_counts.pop(model, {})
        for layer, expert in moe_series:
            self.moe_expert_tokens.remove(model, str(layer), str(expert))
        for layer in {layer for layer, _ in moe_series}:
            self.moe_imbalance.remove(model, str(layer))
            self.moe_entropy.remove(model, str(layer))

    def _per_model_metrics(self) -> tuple:
        return (self.ttft, self.tpot, self.e2e, self.running, self.waiting, self.kv_cache_usage,
                self.prefix_cache_hit_ratio, self.prompt_tokens, self.generation_tokens, self.preemptions,
                self.model_loads, self.model_unloads, self.model_loaded_gauge, self.model_memory,
                self.model_load_seconds)

    def observer(self, model: str) -> ModelObserver:
        """What an AsyncEngine serving ``model`` reports to."""
        self.add_model(model)
        return ModelObserver(self, model)

    # -- events -----------------------------------------------------------------------------------
    def request_done(self, model: str, status: str, last: RequestOutput | None) -> None:
        """Record a request leaving ``model``'s engine: finished (``last`` is its final output), aborted or
        failed (``last`` is the latest output its client received, or None). Latencies are recorded only for
        requests that finished."""
        m = model
        self.requests.labels(model=m, status=status).inc()
        if last is None:
            return
        num_generated = sum(len(c.token_ids) for c in last.outputs)
        self.prompt_tokens.labels(model=m).inc(len(last.prompt_token_ids))
        self.generation_tokens.labels(model=m).inc(num_generated)
        if not last.finished or status in ("abort", "error"):
            return
        metrics = last.metrics
        if metrics.ttft_s is not None:
            self.ttft.labels(model=m).observe(metrics.ttft_s)
        if metrics.e2e_s is not None:
            self.e2e.labels(model=m).observe(metrics.e2e_s)
        if last.tpot_s is not None:
            self.tpot.labels(model=m).observe(last.tpot_s)

    def request_refused(self, model: str = "") -> None:
        """Count a request answered with an error before it reached an engine (``model``: the model it was
        routed to, or "" when none was chosen)."""
        self.requests.labels(model=model, status="error").inc()

    def engine_stats(self, model: str, stats: EngineStats) -> None:
        """Refresh ``model``'s gauges and preemption counter from its engine's figures."""
        m = model
        self.running.labels(model=m).set(stats.num_running)
        self.waiting.labels(model=m).set(stats.num_waiting)
        self.kv_cache_usage.labels(model=m).set(stats.kv_cache_usage)
        queried = stats.prefix_cache_queried_tokens
        self.prefix_cache_hit_ratio.labels(model=m).set(stats.prefix_cache_hit_tokens / queried if queried else 0.0)
        previous = self._engine_preemptions.get(m, 0)
        if stats.num_preemptions > previous:
            self.preemptions.labels(model=m).inc(stats.num_preemptions - previous)
        self._engine_preemptions[m] = stats.num_preemptions

    def moe_stats(self, model: str, stats: MoeStats) -> None:
        """Refresh ``model``'s expert-load series from its engine's snapshot. The counters grow by the counts added
        since the previous refresh; after a reset of the engine's statistics (a count below the previous one) by
        the whole new count."""
        previous = self._moe_counts.setdefault(model, {})
        for load in stats.layers:
            layer = str(load.layer)
            for expert, count in enumerate(load.token_counts, start=stats.first_expert):
                before = previous.get((load.layer, expert), 0)
                counter = self.moe_expert_tokens.labels(model=model, layer=layer, expert=str(expert))
                if count != before:
                    counter.inc(count - before if count > before else count)
                previous[(load.layer, expert)] = count
            self.moe_imbalance.labels(model=model, layer=layer).set(load.imbalance)
            self.moe_entropy.labels(model=model, layer=layer).set(load.entropy_term)

    def adaptive_decision(self, model: str, action: str, limit: int, waves: bool) -> None:
        """Count a decision of ``model``'s adaptive controller and show its running limit and admission."""
        self._adaptive_actions.setdefault(model, set()).add(action)
        self.adaptive_decisions.labels(model=model, action=action).inc()
        self.adaptive_limits(model, limit, waves)

    def adaptive_limits(self, model: str, limit: int, waves: bool) -> None:
        """Show ``model``'s running limit and whether it admits in waves under --adaptive."""
        self._adaptive_actions.setdefault(model, set())
        self.adaptive_running_limit.labels(model=model).set(limit)
        self.adaptive_waves.labels(model=model).set(int(waves))

    def model_loaded(self, model: str, memory_bytes: int, load_seconds: float) -> None:
        self.add_model(model)
        self.model_loads.labels(model=model).inc()
        self.model_loaded_gauge.labels(model=model).set(1)
        self.model_memory.labels(model=model).set(memory_bytes)
        self.model_load_seconds.labels(model=model).set(load_seconds)
        self._engine_preemptions[model] = 0  # a fresh engine counts from zero
        if model in self._moe_counts:
            self._moe_counts[model] = dict.fromkeys(self._moe_counts[model], 0)

    def model_unloaded(self, model: str) -> None:
        """Count the unload and zero the model's gauges (its engine is gone)."""
        self.model_unloads.labels(model=model).inc()
        for gauge in (self.model_loaded_gauge, self.model_memory, self.running, self.waiting, self.kv_cache_usage):
            gauge.labels(model=model).set(0)

    def render(self) -> bytes:
        """The registry in Prometheus text format (content type ``METRICS_CONTENT_TYPE``)."""
        return generate_latest(self.registry)


class ModelObserver:
    """An :class:`~trident.serve.async_engine.EngineObserver` that records into ``metrics`` under ``model``."""

    def __init__(self, metrics: ServerMetrics, model: str) -> None:
        self.metrics = metrics
        self.model = model

    def request_done(self, status: str, last: RequestOutput | None) -> None:
        self.metrics.request_done(self.model, status, last)

    def engine_stats(self, stats: EngineStats) -> None:
        self.metrics.engine_stats(self.model, stats)
