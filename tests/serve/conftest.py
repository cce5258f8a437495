"""A real uvicorn server on loopback serving the default model (float32), shared by the serve tests."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

MODEL_NAME = "smollm2-test"


@dataclass
class LiveServer:
    base_url: str
    """http://127.0.0.1:PORT"""
    async_engine: object
    """The AsyncEngine behind the app (its ``.engine`` is the LLMEngine)."""

    def wait_idle(self, timeout_s: float = 10.0) -> None:
        """Wait until the engine has no unfinished request; fail the test if it never gets there."""
        engine = self.async_engine.engine
        deadline = time.monotonic() + timeout_s
        while engine.has_unfinished() or self.async_engine.stats().num_streams:
            if time.monotonic() > deadline:
                raise AssertionError(f"engine still busy after {timeout_s} s: {engine.stats()}")
            time.sleep(0.02)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def run_server(app, async_engine) -> Iterator[LiveServer]:
    """Serve ``app`` with uvicorn on a free loopback port in a thread until the block ends."""
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           loop="asyncio", http="h11", lifespan="off"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield LiveServer(base_url=f"http://127.0.0.1:{port}", async_engine=async_engine)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def live_server() -> Iterator[LiveServer]:
    from trident.engine.engine import LLMEngine
    from trident.engine.llm import engine_config
    from trident.serve import AsyncEngine, ModelPool, build_app

    async_engine = AsyncEngine(LLMEngine(engine_config(None, dtype="float32")))
    with run_server(build_app(ModelPool.of_engine(async_engine, MODEL_NAME)), async_engine) as server:
        yield server


@pytest.fixture(scope="session")
def model_name() -> str:
    return MODEL_NAME


@pytest.fixture(scope="session")
def client(live_server):
    import openai

    return openai.OpenAI(base_url=f"{live_server.base_url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def offline_llm(live_server):
    """Offline greedy references: the same weights through LLM, float32, its own engine."""
    from trident import LLM

    return LLM(dtype="float32")


@pytest.fixture(scope="session")
def start_server():
    """``run_server`` for tests that build an app of their own: ``with start_server(app, engine) as live:``."""
    return run_server
