"""The server refuses a model its device cannot hold as configured (trident/advise/memory.py serving_problem),
before reading its weights: at start-up (`trident serve` exits with the reason) and through the admin API (400)."""

from __future__ import annotations

import httpx

from trident.cli import main


def test_server_refuses_a_cache_shorter_than_its_context(capsys) -> None:
    assert main(["serve", "--kv-cache-memory", "4MiB", "--dtype", "float32", "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "cannot be served as configured" in err and "less than one sequence of the context length 8,192" in err


def test_admin_load_is_refused_before_reading_weights(start_server, monkeypatch) -> None:
    import trident.serve.pool as pool_module
    from trident.engine.llm import engine_config
    from trident.serve import ModelPool, ModelSpec, PoolConfig, ServeConfig, build_app

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were read")

    monkeypatch.setattr(pool_module, "load_checkpoint", no_weights)
    idle = ModelSpec("idle", engine_config(None, dtype="float32"), preload=False)
    pool = ModelPool(PoolConfig(models=(idle,)), ServeConfig(admin_key="k"))
    with start_server(build_app(pool), None) as server:
        answer = httpx.post(f"{server.base_url}/admin/models/load", headers={"Authorization": "Bearer k"},
                            json={"model": "short", "path": "default", "dtype": "float32", "kv_cache_memory": "4MiB"},
                            timeout=60)
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "model_too_large"
    assert "less than one sequence" in answer.json()["error"]["message"]
