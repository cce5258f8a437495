"""ModelPool: the models one server serves, loaded on demand within a memory budget.

Each model has its own LLMEngine behind its own AsyncEngine (its own batch and KV cache). A request
names a model or an alias; ``use(name)`` resolves it, loads the model if needed and yields the
:class:`ServeContext` the routes work with. Loading first reads the checkpoint's header and estimates the
engine's bytes (weights plus KV cache, ``trident.engine.sizing``); if the loaded models and the new one
would exceed the budget, the least recently used idle models are unloaded first. A model the device cannot hold
as configured (``trident.advise.memory.serving_problem``: a KV cache shorter than one sequence of its context,
or more memory than is free) is refused before its weights are read. A model is idle when
no request is inside ``use`` for it and its engine holds no request; busy models are never unloaded, so
when only busy ones could make room the request is answered 503 with Retry-After.

Loads and unloads run one at a time (an asyncio lock) and the blocking work runs in a worker thread,
so requests to models already loaded keep flowing meanwhile. Everything else runs on the event loop.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

import torch

from trident.advise.memory import serving_problem
from trident.config import EngineConfig
from trident.engine.engine import LLMEngine
from trident.engine.heap import release_free_heap
from trident.engine.sizing import MemoryEstimate, estimate_memory, gguf_native
from trident.errors import TridentError
from trident.loader import Checkpoint, load_checkpoint
from trident.loader.describe import ModelDescription, describe_model
from trident.serve.adaptive import AdaptiveController
from trident.serve.async_engine import AsyncEngine
from trident.serve.config import ServeConfig
from trident.serve.context import ServeContext
from trident.serve.metrics import ServerMetrics
from trident.serve.model_spec import ModelSpec, PoolConfig, check_name
from trident.serve.pool_errors import (
    ModelBusyError,
    ModelCapacityError,
    ModelConflictError,
    ModelTooLargeError,
    UnknownModelError,
)

logger = logging.getLogger("trident.serve")

EngineLoader = Callable[[EngineConfig, Checkpoint], LLMEngine]


@dataclass(frozen=True)
class ModelStatus:
    """One model as /admin/models reports it."""

    name: str
    path: str
    aliases: tuple[str, ...]
    loaded: bool
    memory_bytes: int
    """Measured bytes while loaded, else the estimate (0 until first estimated)."""
    active_requests: int
    last_used_s_ago: float | None
    max_model_len: int | None


class _Entry:
    """A model's place in the pool: its spec and, while loaded, its engine."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.engine: AsyncEngine | None = None
        self.context: ServeContext | None = None
        self.memory_bytes = 0
        self.estimate_bytes: int | None = None
        self.max_model_len: int | None = None
        self.last_used: float | None = None
        self.pending = 0
        """Requests inside ``use`` (resolved, maybe waiting for the load, not yet handed to the engine)."""

    @property
    def busy(self) -> bool:
        if self.pending:
            return True
        engine = self.engine
        return engine is not None and (engine.engine.has_unfinished() or engine.stats().num_streams > 0)

    def active_requests(self) -> int:
        engine = self.engine
        return self.pending + (engine.stats().num_streams if engine is not None else 0)


def _default_loader(config: EngineConfig, checkpoint: Checkpoint) -> LLMEngine:
    return LLMEngine(config, checkpoint)


class ModelPool:
    """See the module docstring. Build it, ``preload()`` before serving, then route with ``use``."""

    def __init__(self, config: PoolConfig, serve_config: ServeConfig | None = None,
                 metrics: ServerMetrics | None = None, loader: EngineLoader = _default_loader) -> None:
        self.config = config
        self.serve_config = serve_config if serve_config is not None else ServeConfig()
        self.metrics = metrics if metrics is not None else ServerMetrics(memory_budget_bytes=config.memory_budget_bytes)
        self.memory_budget_bytes = config.memory_budget_bytes
        self._loader = loader
        self._entries = {spec.name: _Entry(spec) for spec in config.models}
        self._aliases = dict(config.aliases)
        self._controllers: dict[str, AdaptiveController] = {}
        """The adaptive controller of each loaded model (with ``serve_config.adaptive``)."""
        self._routing: dict[str, bool] = {}
        """Whether a model's new requests go to its fallback now (PoolConfig.fallbacks)."""
        if config.fallbacks and self.serve_config.adaptive is None:
            raise TridentError("fallback models (--adaptive-fallback) go with --adaptive")
        self._lock = asyncio.Lock()
        self.created = int(time.time())
        for name in self._entries:
            self.metrics.add_model(name)

    @classmethod
    def of_engine(cls, engine: LLMEngine | AsyncEngine, name: str, serve_config: ServeConfig | None = None,
                  aliases: dict[str, str] | None = None) -> ModelPool:
        """A pool of one model already loaded (tests, benchmarks, embedding in another program, a tensor-parallel
        server's rank 0); ``aliases`` (alias -> ``name``) route to it too."""
        async_engine = engine if isinstance(engine, AsyncEngine) else AsyncEngine(engine)
        spec = ModelSpec(name=name, engine=async_engine.engine.config)
        pool = cls(PoolConfig(models=(spec,), aliases=aliases or {}), serve_config)
        pool._attach(pool._entries[name], async_engine, async_engine.engine.load_seconds)
        return pool

    # -- names ------------------------------------------------------------------------------------
    @property
    def model_names(self) -> list[str]:
        return list(self._entries)

    @property
    def aliases(self) -> dict[str, str]:
        return dict(self._aliases)

    def resolve(self, name: str) -> str:
        """The model a request for ``name`` goes to (an alias resolved); UnknownModelError otherwise."""
        if name in self._entries:
            return name
        target = self._aliases.get(name)
        if target is None:
            served = ", ".join(sorted([*self._entries, *self._aliases]))
            raise UnknownModelError(f"the model {name!r} does not exist; this server serves: {served}")
        return target

    def engine(self, name: str) -> AsyncEngine | None:
        """The loaded engine of model (or alias) ``name``, or None."""
        return self._entries[self.resolve(name)].engine

    def loaded_engines(self) -> dict[str, AsyncEngine]:
        return {name: e.engine for name, e in self._entries.items() if e.engine is not None}

    def loaded_bytes(self) -> int:
        return sum(e.memory_bytes for e in self._entries.values() if e.engine is not None)

    # -- routing ----------------------------------------------------------------------------------
    @asynccontextmanager
    async def use(self, name: str) -> AsyncIterator[ServeContext]:
        """The context of the model ``name`` routes to, loaded; while inside, the model is not unloaded.
        A request handed to the engine inside keeps the model busy until it finishes."""
        entry = self._entries[self._route(self.resolve(name))]
        entry.pending += 1
        try:
            if entry.engine is None:
                await self._load(entry)
            entry.last_used = time.monotonic()
            assert entry.context is not None
            yield entry.context
        finally:
            entry.pending -= 1

    def _route(self, name: str) -> str:
        """``name``, or its fallback (PoolConfig.fallbacks) while its adaptive controller finds it overloaded and
        the fallback is loaded and not overloaded itself; a change of course is logged and counted."""
        fallback = self.config.fallbacks.get(name)
        controller = self._controllers.get(name)
        if fallback is None or controller is None:
            return name
        spare = self._controllers.get(fallback)
        usable = self._entries[fallback].engine is not None and not (spare is not None and spare.overloaded)
        routing = self._routing.get(name, False)
        if not routing and controller.overloaded and usable:
            routing = True
        elif routing and (controller.has_room or not usable):
            routing = False
        if routing != self._routing.get(name, False):
            self._routing[name] = routing
            action = "route" if routing else "return"
            logger.info("adaptive %s: %s new requests %s %s", name, "sending" if routing else "bringing back",
                        "to" if routing else "from", fallback)
            self.metrics.adaptive_decision(name, action, controller.engine.running_limit, controller.waves)
        return fallback if routing else name

    # -- loading ----------------------------------------------------------------------------------
    def preload(self) -> list[str]:
        """Load, in order, the models marked ``preload`` that fit the budget beside those loaded before
        them (blocking; call before serving). Returns the names loaded; the others load on demand."""
        loaded = []
        for entry in self._entries.values():
            if not entry.spec.preload or entry.engine is not None:
                continue
            model = describe_model(entry.spec.engine.model or None, _gguf_native(entry.spec.engine))
            estimate = self._estimate(entry, model)
            need = estimate.total_bytes
            if self.memory_budget_bytes is not None and self.loaded_bytes() + need > self.memory_budget_bytes:
                logger.warning("not preloading %s: it needs %s beside %s loaded, over the budget of %s; it loads "
                               "on its first request", entry.spec.name, _gib(need), _gib(self.loaded_bytes()),
                               _gib(self.memory_budget_bytes))
                continue
            self._check_device(entry, model, estimate)
            t0 = time.perf_counter()
            engine = self._load_engine(entry.spec.engine)
            self._attach(entry, AsyncEngine(engine), time.perf_counter() - t0)
            loaded.append(entry.spec.name)
        return loaded

    async def load(self, name: str) -> ModelStatus:
        """Load model ``name`` (no-op when loaded), unloading idle models as the budget needs."""
        async with self.use(name):
            pass
        return self._status(self._entries[self.resolve(name)])

    def register(self, spec: ModelSpec) -> bool:
        """Add a model to serve (admin API); False when the same name with the same settings is served."""
        existing = self._entries.get(spec.name)
        if existing is not None:
            if replace(existing.spec, preload=spec.preload) != spec:
                raise ModelConflictError(f"a model named {spec.name!r} is already served from "
                                         f"{existing.spec.path!r} with other settings; unload it and pick another "
                                         "name")
            return False
        if spec.name in self._aliases:
            raise ModelConflictError(f"{spec.name!r} is already an alias of {self._aliases[spec.name]!r}")
        for alias in spec.aliases:
            check_name(alias, "alias")
            if alias in self._entries or self._aliases.get(alias, spec.name) != spec.name:
                raise ModelConflictError(f"the alias {alias!r} is already taken")
        self._entries[spec.name] = _Entry(spec)
        for alias in spec.aliases:
            self._aliases[alias] = spec.name
        self.metrics.add_model(spec.name)
        return True

    def unregister(self, name: str) -> None:
        """Stop serving a model that is not loaded (a registration whose load failed)."""
        entry = self._entries.get(name)
        if entry is None or entry.engine is not None or entry.pending:
            raise ModelBusyError(f"the model {name!r} is loaded or in use; unload it first")
        del self._entries[name]
        self._aliases = {a: t for a, t in self._aliases.items() if t != name}
        self.metrics.remove_model(name)

    async def unload(self, name: str) -> ModelStatus:
        """Unload model ``name`` now; ModelBusyError while it has requests."""
        entry = self._entries[self.resolve(name)]
        async with self._lock:
            if entry.engine is not None:
                if entry.busy:
                    raise ModelBusyError(f"the model {entry.spec.name!r} has {entry.active_requests()} requests in "
                                         "flight; unload it once they finish")
                self._detach(entry)
        return self._status(entry)

    async def _load(self, entry: _Entry) -> None:
        async with self._lock:
            if entry.engine is not None:  # loaded by a request that held the lock before us
                return
            spec = entry.spec
            model = await asyncio.to_thread(describe_model, spec.engine.model or None, _gguf_native(spec.engine))
            estimate = self._estimate(entry, model)
            self._make_room(entry, estimate.total_bytes)
            self._check_device(entry, model, estimate)
            logger.info("loading %s from %s (%s)", spec.name, spec.path, _gib(estimate.total_bytes))
            t0 = time.perf_counter()
            engine = await asyncio.to_thread(self._load_engine, spec.engine)
            self._attach(entry, AsyncEngine(engine), time.perf_counter() - t0)

    def _load_engine(self, config: EngineConfig) -> LLMEngine:
        engine = self._loader(config, load_checkpoint(config.model or None, _gguf_native(config)))
        if engine.device.type == "cpu":  # what loading copied, now that the checkpoint is gone too
            release_free_heap()
        return engine

    def _estimate(self, entry: _Entry, model: ModelDescription) -> MemoryEstimate:
        """The model's weights and KV cache as its engine will allocate them, refused with ModelTooLargeError
        when more than the whole memory budget."""
        estimate = estimate_memory(model.config, entry.spec.engine, model.quantization)
        budget = self.memory_budget_bytes
        if budget is not None and estimate.total_bytes > budget:
            raise ModelTooLargeError(
                f"the model {entry.spec.name!r} needs {_gib(estimate.total_bytes)} ({_gib(estimate.weights_bytes)} "
                f"weights + {_gib(estimate.kv_cache_bytes)} KV cache), more than the whole memory budget of "
                f"{_gib(budget)}; raise --memory-budget or give it a smaller KV cache (kv_cache_memory)")
        entry.estimate_bytes = estimate.total_bytes
        entry.max_model_len = estimate.max_model_len
        return estimate

    def _check_device(self, entry: _Entry, model: ModelDescription, estimate: MemoryEstimate) -> None:
        """ModelTooLargeError when the device cannot hold the model as configured (advise.memory.serving_problem):
        checked before its weights are read."""
        problem = serving_problem(model.config, entry.spec.engine, estimate)
        if problem is not None:
            raise ModelTooLargeError(f"the model {entry.spec.name!r} cannot be served as configured: {problem}")

    def _make_room(self, entry: _Entry, need: int) -> None:
        """Unload least recently used idle models until ``need`` more bytes fit the budget."""
        budget = self.memory_budget_bytes
        if budget is None:
            return
        loaded = sorted((e for e in self._entries.values() if e.engine is not None and e is not entry),
                        key=lambda e: e.last_used or 0.0)
        idle = [e for e in loaded if not e.busy]
        if self.loaded_bytes() - sum(e.memory_bytes for e in idle) + need > budget:
            busy = [f"{e.spec.name} ({e.active_requests()} requests)" for e in loaded if e.busy]
            raise ModelCapacityError(
                f"the model {entry.spec.name!r} needs {_gib(need)} but only {_gib(budget - self.loaded_bytes())} "
                f"of the {_gib(budget)} memory budget is free, and the models holding the rest are busy: "
                f"{', '.join(busy)}; retry shortly")
        for victim in idle:  # least recently used first
            if self.loaded_bytes() + need <= budget:
                return
            logger.info("unloading %s (least recently used) to make room for %s", victim.spec.name, entry.spec.name)
            self._detach(victim)

    def _attach(self, entry: _Entry, engine: AsyncEngine, load_seconds: float) -> None:
        name = entry.spec.name
        engine.add_observer(self.metrics.observer(name))
        adaptive = self.serve_config.adaptive
        if adaptive is not None:
            controller = AdaptiveController(engine.engine, adaptive, name, on_decision=lambda action, limit, waves:
                                            self.metrics.adaptive_decision(name, action, limit, waves))
            engine.add_observer(controller)
            self._controllers[name] = controller
            self.metrics.adaptive_limits(name, engine.engine.running_limit, controller.waves)
        max_queued = entry.spec.max_queued_requests or self.serve_config.max_queued_requests
        entry.engine = engine
        entry.context = ServeContext(engine=engine, served_model_name=name, max_queued_requests=max_queued,
                                     request_timeout_s=self.serve_config.request_timeout_s)
        entry.memory_bytes = engine.engine.memory_usage().total_bytes
        entry.max_model_len = engine.max_model_len
        entry.last_used = time.monotonic()
        self.metrics.model_loaded(name, entry.memory_bytes, load_seconds)
        logger.info("loaded %s in %.2f s (%s; %s; %s)", name, load_seconds, _gib(entry.memory_bytes),
                    engine.engine.kv_cache_summary(), engine.engine.decode_summary())

    def _detach(self, entry: _Entry) -> None:
        device = entry.engine.engine.device if entry.engine is not None else None
        entry.engine = None
        entry.context = None
        entry.memory_bytes = 0
        self._controllers.pop(entry.spec.name, None)
        self._routing.pop(entry.spec.name, None)
        self.metrics.model_unloaded(entry.spec.name)
        gc.collect()  # the engine's tensors go now, not at some later collection
        if device is not None and device.type == "cuda":
            torch.cuda.empty_cache()

    # -- status -----------------------------------------------------------------------------------
    def statuses(self) -> list[ModelStatus]:
        return [self._status(e) for e in self._entries.values()]

    def _status(self, entry: _Entry) -> ModelStatus:
        name = entry.spec.name
        loaded = entry.engine is not None
        return ModelStatus(
            name=name, path=entry.spec.path, aliases=tuple(a for a, t in self._aliases.items() if t == name),
            loaded=loaded, memory_bytes=entry.memory_bytes if loaded else entry.estimate_bytes or 0,
            active_requests=entry.active_requests(),
            last_used_s_ago=time.monotonic() - entry.last_used if entry.last_used is not None else None,
            max_model_len=entry.max_model_len)

    def refresh_metrics(self) -> None:
        """Bring every loaded model's gauges up to date (before a scrape)."""
        for name, engine in self.loaded_engines().items():
            self.metrics.engine_stats(name, engine.engine.stats())
            moe = engine.engine.moe_stats(whole=True)  # every expert, also when rank 0 holds some of them
            if moe is not None:
                self.metrics.moe_stats(name, moe)


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 28 else f"{n / (1 << 20):.1f} MiB"


def _gguf_native(config: EngineConfig) -> bool:
    return gguf_native(config, torch.device(config.device))
