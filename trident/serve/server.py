"""What ``trident serve`` runs: the pool of models from the command line or a config file, preloaded, behind
uvicorn."""

from __future__ import annotations

import logging
import os
import sys
import threading

from trident.config import EngineConfig
from trident.errors import TridentError
from trident.serve.api import build_app
from trident.serve.config import ServeConfig
from trident.serve.model_spec import (
    DEFAULT_MODEL_PATH,
    ModelSpec,
    PoolConfig,
    engine_for,
    parse_alias_arg,
    parse_model_arg,
    parse_size,
    read_config_file,
)
from trident.serve.pool import ModelPool


def default_model_name(model: str | None) -> str:
    """The name clients use when --served-model-name is not given: the file or folder name, or the default's."""
    if not model or model == DEFAULT_MODEL_PATH:
        return "SmolLM2-135M-Instruct"
    name = os.path.basename(os.path.normpath(model))
    return name[:-5] if name.endswith(".gguf") else name


def pool_config(base: EngineConfig, *, paths: list[str] = (), named: list[str] = (), aliases: list[str] = (),
                config_file: str | None = None, memory_budget: str | None = None,
                served_model_name: str | None = None, fallbacks: list[str] = ()) -> PoolConfig:
    """The models ``trident serve`` serves: those of the config file, then positional paths (named after their
    file), then ``--model NAME=PATH``; the embedded model when none is given. ``base`` holds the command line's
    engine settings, which file entries may override. ``--memory-budget`` wins over the file's."""
    specs: list[ModelSpec] = []
    budget = None
    alias_map: dict[str, str] = {}
    if config_file is not None:
        specs, budget, alias_map = read_config_file(config_file, base)
    if served_model_name is not None and (len(paths) > 1 or named or config_file):
        raise TridentError("--served-model-name names the one model given as MODEL; with several models use "
                           "--model NAME=PATH or a config file")
    for path in paths:
        specs.append(ModelSpec(name=served_model_name or default_model_name(path), engine=engine_for(path, base)))
    for text in named:
        name, path = parse_model_arg(text)
        specs.append(ModelSpec(name=name, engine=engine_for(path, base)))
    if not specs:
        specs.append(ModelSpec(name=served_model_name or default_model_name(None), engine=base))
    for text in aliases:
        alias, target = parse_alias_arg(text)
        alias_map[alias] = target
    if memory_budget is not None:
        budget = parse_size(memory_budget, "--memory-budget")
    fallback_map = {}
    for text in fallbacks:
        model, sep, fallback = text.partition("=")
        if not sep or not model or not fallback:
            raise TridentError(f"--adaptive-fallback takes MODEL=FALLBACK (e.g. chat=chat-int4), got {text!r}")
        fallback_map[model] = fallback
    return PoolConfig(models=tuple(specs), memory_budget_bytes=budget, aliases=alias_map, fallbacks=fallback_map)


def serve(pool: ModelPool, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          config: ServeConfig | None = None, base_engine: EngineConfig | None = None,
          stop: threading.Event | None = None) -> None:
    """Preload ``pool``'s models and serve them over HTTP until interrupted, or until ``stop`` is set (from any
    thread: a tensor-parallel engine whose group failed). TridentError when the server could not start."""
    import uvicorn

    log = logging.getLogger("trident")
    if not log.handlers:  # loads, unloads and failures, beside uvicorn's own lines
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     [trident] %(message)s"))
        log.addHandler(handler)
    log.setLevel(log_level.upper())

    for name in pool.preload():
        status = next(s for s in pool.statuses() if s.name == name)
        print(f"loaded {name!r} from {status.path} ({status.memory_bytes / (1 << 20):.0f} MiB)", file=sys.stderr)
    waiting = [s.name for s in pool.statuses() if not s.loaded]
    if waiting:
        print(f"loading on first request: {', '.join(waiting)}", file=sys.stderr)
    app = build_app(pool, config, base_engine)
    print(f"serving {', '.join(pool.model_names)} on http://{host}:{port}/v1 (dashboard: "
          f"http://{host}:{port}/dashboard)", file=sys.stderr)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
    if stop is not None:
        def exit_when_stopped() -> None:
            stop.wait()
            server.should_exit = True  # read by uvicorn's main loop every 0.1 s

        threading.Thread(target=exit_when_stopped, name="trident-serve-stop", daemon=True).start()
    server.run()
    if not server.started:
        raise TridentError(f"the server did not start on {host}:{port} (see the lines above: the address may be "
                           "in use); pick another --host / --port")
