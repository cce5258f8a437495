"""What a multi-model server serves: ``ModelSpec`` (one model: its name, files, engine settings, limits and
aliases) and ``PoolConfig`` (all of them plus the memory budget), from ``--model NAME=PATH`` flags or a
TOML/JSON config file. Everything is validated here, before any model is loaded."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from trident.config import EngineConfig
from trident.errors import TridentError

DEFAULT_MODEL_PATH = "default"
"""The PATH that names the embedded SmolLM2 in ``--model NAME=PATH`` and in config files."""
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$")
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "M": 1000**2, "MB": 1000**2, "G": 1000**3, "GB": 1000**3,
          "T": 1000**4, "TB": 1000**4, "KI": 1024, "KIB": 1024, "MI": 1024**2, "MIB": 1024**2, "GI": 1024**3,
          "GIB": 1024**3, "TI": 1024**4, "TIB": 1024**4}


def parse_size(text: str | int, what: str = "size") -> int:
    """Bytes from ``"1.5GiB"``, ``"800MB"``, ``"4G"`` (decimal units unless ``i``), or a plain integer."""
    if isinstance(text, bool):
        raise TridentError(f"{what} must be a size such as 2GiB or 800MB, got {text!r}")
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE.match(str(text))
        if not match:
            raise TridentError(f"{what} must be a size such as 2GiB, 800MB or 1000000 (bytes), got {text!r}")
        value = float(match.group(1)) * _UNITS[(match.group(2) or "").upper()]
        if not math.isfinite(value):
            raise TridentError(f"{what} is not finite: {text!r}")
        value = int(value)
    if value <= 0:
        raise TridentError(f"{what} must be positive, got {text!r}")
    return value


def check_name(name: str, what: str = "model name") -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise TridentError(f"{what} {name!r} is not valid: use letters, digits and . _ : / @ + - (no spaces), "
                           "starting with a letter or digit")
    return name


@dataclass(frozen=True)
class ModelSpec:
    """One model the server can serve."""

    name: str
    """What clients pass as "model" (and the ``model`` label on /metrics)."""
    engine: EngineConfig
    """How to load and run it; ``engine.model`` is the path ("" for the embedded default model).
    ``engine.scheduler.max_num_seqs`` is the model's concurrency limit (sequences in its running batch)."""
    aliases: tuple[str, ...] = ()
    """Other names that route to this model (e.g. ``chat-fast`` for the int8 variant)."""
    max_queued_requests: int | None = None
    """Waiting sequences beyond its running batch before new requests get 429; None: the server's limit."""
    preload: bool = True
    """Load at start-up (if the memory budget allows); otherwise on the first request."""

    def __post_init__(self) -> None:
        check_name(self.name)
        for alias in self.aliases:
            check_name(alias, "alias")
        if self.max_queued_requests is not None and (isinstance(self.max_queued_requests, bool) or not isinstance(
                self.max_queued_requests, int) or self.max_queued_requests < 1):
            raise TridentError(f"max_queued_requests of {self.name!r} must be an integer >= 1, "
                               f"got {self.max_queued_requests!r}")

    @property
    def path(self) -> str:
        return self.engine.model or DEFAULT_MODEL_PATH


@dataclass(frozen=True)
class PoolConfig:
    """All models of one server and the memory they may share."""

    models: tuple[ModelSpec, ...]
    memory_budget_bytes: int | None = None
    """Weights plus KV caches of the loaded models stay within this; the least recently used idle model is
    unloaded to make room for another. None: no limit (every model stays loaded once loaded)."""
    aliases: Mapping[str, str] = field(default_factory=dict)
    """alias -> model name, besides each ModelSpec's own aliases."""
    fallbacks: Mapping[str, str] = field(default_factory=dict)
    """model -> the model its new requests go to while ``--adaptive`` finds it overloaded (a lower-precision
    variant, say); both served model names."""

    def __post_init__(self) -> None:
        if not self.models:
            raise TridentError("no model to serve")
        if self.memory_budget_bytes is not None:
            parse_size(self.memory_budget_bytes, "memory budget")
        names: dict[str, str] = {}
        for spec in self.models:
            if spec.name in names:
                raise TridentError(f"the model name {spec.name!r} is used twice")
            names[spec.name] = spec.name
        aliases = dict(self.aliases)
        for spec in self.models:
            for alias in spec.aliases:
                aliases[alias] = spec.name
        for model, fallback in self.fallbacks.items():
            unknown = [n for n in (model, fallback) if n not in names]
            if unknown or model == fallback:
                raise TridentError(f"the fallback {model}={fallback} must name two different served models "
                                   f"({', '.join(names)})")
        for alias, target in aliases.items():
            check_name(alias, "alias")
            if alias in names:
                raise TridentError(f"the alias {alias!r} is already the name of a model")
            if target not in names:
                raise TridentError(f"the alias {alias!r} points to {target!r}, which is not a served model "
                                   f"(models: {', '.join(sorted(names))})")
        object.__setattr__(self, "aliases", aliases)

    def resolve(self, name: str) -> str | None:
        """The model a request for ``name`` goes to, or None."""
        if any(spec.name == name for spec in self.models):
            return name
        return self.aliases.get(name)


def parse_model_arg(text: str) -> tuple[str, str]:
    """``NAME=PATH`` of ``--model`` as (name, path); PATH ``default`` is the embedded model."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise TridentError(f"--model takes NAME=PATH (e.g. chat=/models/qwen.gguf, or chat=default for the "
                           f"embedded SmolLM2), got {text!r}")
    return check_name(name), path


def parse_alias_arg(text: str) -> tuple[str, str]:
    alias, sep, target = text.partition("=")
    if not sep or not alias or not target:
        raise TridentError(f"--alias takes ALIAS=MODEL (e.g. chat-fast=chat-int8), got {text!r}")
    return check_name(alias, "alias"), target


def engine_for(path: str, base: EngineConfig) -> EngineConfig:
    """``base`` (the command line's engine settings) for the model at ``path``."""
    return replace(base, model="" if path == DEFAULT_MODEL_PATH else path)


_SPEC_KEYS = {"name", "path", "aliases", "max_queued_requests", "preload", "dtype", "device", "max_model_len",
              "kv_cache_memory", "kv_cache_dtype", "block_size", "max_num_seqs", "max_num_batched_tokens",
              "enable_prefix_caching", "num_threads", "seed", "attention_backend",
              "experts_backend"}
_FILE_KEYS = {"models", "memory_budget", "aliases"}


def _check_keys(table: Mapping, known: set[str], where: str) -> None:
    unknown = set(table) - known
    if unknown:
        raise TridentError(f"{where}: unknown setting(s) {', '.join(sorted(unknown))}; known: "
                           f"{', '.join(sorted(known))}")


def spec_from_dict(entry: Mapping, base: EngineConfig, where: str) -> ModelSpec:
    """One ``[[models]]`` entry of a config file; keys not given take ``base``'s values."""
    if not isinstance(entry, Mapping):
        raise TridentError(f"{where}: each model must be a table of settings, got {entry!r}")
    _check_keys(entry, _SPEC_KEYS, where)
    if "name" not in entry:
        raise TridentError(f"{where}: every model needs a name")
    cache = replace(base.cache, **{k: entry[k] for k in ("block_size", "enable_prefix_caching", "kv_cache_dtype")
                                     if k in entry})
    if "kv_cache_memory" in entry:
        cache = replace(cache, memory_budget_bytes=parse_size(entry["kv_cache_memory"], f"{where}: kv_cache_memory"))
    scheduler = replace(base.scheduler, **{k: entry[k] for k in ("max_num_seqs", "max_num_batched_tokens")
                                           if k in entry})
    engine_keys = ("dtype", "device", "max_model_len", "num_threads", "seed", "attention_backend",
                   "experts_backend")
    engine = replace(engine_for(str(entry.get("path", DEFAULT_MODEL_PATH)), base), cache=cache, scheduler=scheduler,
                     **{k: entry[k] for k in engine_keys if k in entry})
    aliases = entry.get("aliases", ())
    if isinstance(aliases, str) or not isinstance(aliases, (list, tuple)):
        raise TridentError(f"{where}: aliases must be a list of names")
    return ModelSpec(name=entry["name"], engine=engine, aliases=tuple(aliases),
                     max_queued_requests=entry.get("max_queued_requests"), preload=bool(entry.get("preload", True)))


def read_config_file(path: str | Path, base: EngineConfig) -> tuple[list[ModelSpec], int | None, dict[str, str]]:
    """(models, memory budget in bytes or None, aliases) of a ``.toml`` or ``.json`` server config file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise TridentError(f"cannot read the config file {path}: {e.strerror or e}") from None
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        elif path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            raise TridentError(f"the config file {path} must end in .toml or .json")
    except (ValueError, ImportError) as e:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise TridentError(f"the config file {path} is not valid {path.suffix[1:].upper()}: {e}") from None
    if not isinstance(data, dict):
        raise TridentError(f"the config file {path} must hold a table (object) at the top")
    _check_keys(data, _FILE_KEYS, str(path))
    entries = data.get("models", [])
    if not isinstance(entries, list):
        raise TridentError(f"{path}: models must be a list of tables ([[models]] in TOML)")
    specs = [spec_from_dict(e, base, f"{path}: models[{i}]") for i, e in enumerate(entries)]
    budget = data.get("memory_budget")
    aliases = data.get("aliases", {})
    if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
        raise TridentError(f"{path}: aliases must be a table of alias = \"model name\"")
    return specs, parse_size(budget, f"{path}: memory_budget") if budget is not None else None, dict(aliases)
