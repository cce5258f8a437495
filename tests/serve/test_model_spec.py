"""What a multi-model server serves, from flags and config files: parsing and validation (nothing loaded)."""

from __future__ import annotations

import json

import pytest

from trident.cli import build_parser, serve_pool_config
from trident.config import EngineConfig
from trident.errors import TridentError
from trident.serve.model_spec import ModelSpec, PoolConfig, parse_size, read_config_file

BASE = EngineConfig(model="", dtype="float32")


@pytest.mark.parametrize(("text", "expected"), [
    ("1024", 1024), ("2GiB", 2 * 1024**3), ("1.5 GiB", 3 * 1024**3 // 2), ("800MB", 800 * 10**6), ("4G", 4 * 10**9),
    ("512mib", 512 * 1024**2), ("10KiB", 10240), (4096, 4096),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-1GiB", "0", "1.5XB", "GiB", True, 0])
def test_parse_size_rejects(text):
    with pytest.raises(TridentError, match="size|positive"):
        parse_size(text)


def _serve_args(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def test_flags_build_the_pool():
    config = serve_pool_config(_serve_args("--model", "chat=default", "--model", "small=/m/q4.gguf",
                                           "--alias", "fast=small", "--memory-budget", "3GiB", "--dtype",
                                           "bfloat16", "--kv-cache-memory", "256MiB", "--max-num-seqs", "8"))
    assert [(m.name, m.engine.model) for m in config.models] == [("chat", ""), ("small", "/m/q4.gguf")]
    assert config.memory_budget_bytes == 3 * 1024**3 and config.aliases == {"fast": "small"}
    assert config.resolve("fast") == "small" and config.resolve("chat") == "chat" and config.resolve("x") is None
    engine = config.models[1].engine
    assert engine.dtype == "bfloat16" and engine.cache.memory_budget_bytes == 256 * 1024**2
    assert engine.scheduler.max_num_seqs == 8


def test_positional_models_and_default():
    config = serve_pool_config(_serve_args("/models/qwen2-0.5b.gguf", "/models/Llama-3.2-1B/"))
    assert [m.name for m in config.models] == ["qwen2-0.5b", "Llama-3.2-1B"]
    single = serve_pool_config(_serve_args("--served-model-name", "mine"))
    assert [(m.name, m.engine.model) for m in single.models] == [("mine", "")]
    with pytest.raises(TridentError, match="served-model-name"):
        serve_pool_config(_serve_args("a.gguf", "b.gguf", "--served-model-name", "x"))


@pytest.mark.parametrize(("argv", "match"), [
    (["--model", "chat"], "NAME=PATH"),
    (["--model", "=x.gguf"], "NAME=PATH"),
    (["--model", "bad name=x.gguf"], "not valid"),
    (["--model", "a=default", "--model", "a=default"], "used twice"),
    (["--model", "a=default", "--alias", "b=nope"], "not a served model"),
    (["--model", "a=default", "--alias", "a=a"], "already the name of a model"),
    (["--memory-budget", "plenty"], "size"),
])
def test_bad_flags(argv, match):
    with pytest.raises(TridentError, match=match):
        serve_pool_config(_serve_args(*argv))


TOML = """
memory_budget = "6GiB"

[aliases]
latest = "chat"

[[models]]
name = "chat"
path = "default"
dtype = "bfloat16"
max_model_len = 2048
kv_cache_memory = "128MiB"
max_num_seqs = 16
max_queued_requests = 32
aliases = ["assistant"]

[[models]]
name = "small"
path = "/models/q4.gguf"
preload = false
"""


def test_toml_config_file(tmp_path):
    path = tmp_path / "serve.toml"
    path.write_text(TOML)
    specs, budget, aliases = read_config_file(path, BASE)
    assert budget == 6 * 1024**3 and aliases == {"latest": "chat"}
    chat, small = specs
    assert (chat.name, chat.engine.model, chat.engine.dtype, chat.engine.max_model_len) == ("chat", "", "bfloat16",
                                                                                           2048)
    assert chat.engine.cache.memory_budget_bytes == 128 * 1024**2 and chat.engine.scheduler.max_num_seqs == 16
    assert chat.max_queued_requests == 32 and chat.aliases == ("assistant",) and chat.preload
    assert (small.engine.model, small.engine.dtype, small.preload) == ("/models/q4.gguf", "float32", False)
    config = serve_pool_config(_serve_args("--config", str(path), "--memory-budget", "1GiB"))  # flag wins
    assert config.memory_budget_bytes == 1024**3
    assert config.aliases == {"latest": "chat", "assistant": "chat"}


def test_json_config_file(tmp_path):
    path = tmp_path / "serve.json"
    path.write_text(json.dumps({"models": [{"name": "a"}, {"name": "b", "path": "x.gguf", "dtype": "float16"}]}))
    specs, budget, aliases = read_config_file(path, BASE)
    assert [(s.name, s.engine.model, s.engine.dtype) for s in specs] == [("a", "", "float32"),
                                                                         ("b", "x.gguf", "float16")]
    assert budget is None and aliases == {}


@pytest.mark.parametrize(("name", "text", "match"), [
    ("c.toml", "[[models]]\nname = 'a'\ncolour = 'blue'\n", "unknown setting.*colour"),
    ("c.toml", "models = 3\n", "list of tables"),
    ("c.toml", "[[models]]\npath = 'default'\n", "needs a name"),
    ("c.toml", "[[models]]\nname = 'a'\ndtype = 'float64'\n", "unsupported dtype"),
    ("c.toml", "[[models]]\nname = 'a'\nkv_cache_memory = 'big'\n", "kv_cache_memory"),
    ("c.toml", "name = = 'a'\n", "not valid TOML"),
    ("c.json", "{'models': []}", "not valid JSON"),
    ("c.yaml", "models: []\n", "must end in .toml or .json"),
    ("c.toml", "port = 80\n", "unknown setting.*port"),
])
def test_bad_config_files(tmp_path, name, text, match):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(TridentError, match=match):
        read_config_file(path, BASE)


def test_missing_config_file(tmp_path):
    with pytest.raises(TridentError, match="cannot read"):
        read_config_file(tmp_path / "nope.toml", BASE)


def test_pool_config_validation():
    a = ModelSpec("a", BASE)
    with pytest.raises(TridentError, match="no model"):
        PoolConfig(models=())
    with pytest.raises(TridentError, match="max_queued_requests"):
        ModelSpec("b", BASE, max_queued_requests=0)
    with pytest.raises(TridentError, match="alias"):
        PoolConfig(models=(a,), aliases={"x y": "a"})
