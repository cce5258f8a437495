"""`trident serve --tensor-parallel 2` as a user runs it: the command spawns its two gloo ranks, rank 0 serves over
uvicorn; the official `openai` client's greedy completions against the unsplit (TP=1) engine on the same folder
(conftest.py); Ctrl-C, and a rank killed, end every process of the server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from trident.cli import main

ENGINE = ("--dtype", "float32", "--max-model-len", "128", "--threads", "1")
PROMPTS = ("The quick brown fox", "Hello", "Tensor parallel serving")
MAX_TOKENS = 12
START_TIMEOUT_S = 120
STOP_TIMEOUT_S = 40


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes() -> list[tuple[int, str, int, int, str]]:
    """(pid, state, ppid, process group, command line) of every process."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        state, ppid, pgrp = stat[stat.rindex(")") + 2:].split()[:3]
        out.append((int(entry.name), state, int(ppid), int(pgrp), cmdline))
    return out


class Server:
    """``trident serve FOLDER --tensor-parallel 2`` in its own process group (as a terminal runs a command)."""

    def __init__(self, folder: Path, tmp_path: Path, *flags: str) -> None:
        self.port = _free_port()
        self.log = tmp_path / "serve.log"
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "trident.cli", "serve", str(folder), "--served-model-name", "tiny",
                 "--tensor-parallel", "2", "--port", str(self.port), *ENGINE, *flags], stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        self.base_url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert self.process.poll() is None, f"the server exited:\n{self.output()}"
            assert time.monotonic() < deadline, f"the server did not start:\n{self.output()}"
            try:
                if httpx.get(f"{self.base_url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)

    def output(self) -> str:
        return self.log.read_text()

    def ranks(self) -> list[int]:
        """The spawned ranks' process ids, rank 0 first (started in that order)."""
        return sorted(pid for pid, _, ppid, _, cmdline in _processes()
                      if ppid == self.process.pid and "spawn_main" in cmdline)

    def wait_all_ended(self) -> int:
        """The command's exit code, once it and every process it started have ended."""
        code = self.process.wait(timeout=STOP_TIMEOUT_S)
        deadline = time.monotonic() + 10
        while (alive := [pid for pid, state, _, pgrp, _ in _processes()
                         if pgrp == self.process.pid and state != "Z"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive, f"processes {alive} of the server are still running:\n{self.output()}"
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture
def server(tiny_folder, tmp_path):
    s = Server(tiny_folder, tmp_path)
    try:
        yield s
    finally:
        s.kill()  # a failed test leaves no rank behind


def _unsplit_run(folder: Path):
    """The unsplit engine's greedy text for each prompt (12 tokens, EOS ignored; one printable character per token:
    tiny_folders.py, so equal texts are equal tokens), and the engine."""
    from trident.engine.engine import LLMEngine
    from trident.engine.llm import engine_config
    from trident.engine.request import SamplingParams

    engine = LLMEngine(engine_config(str(folder), dtype="float32", max_model_len=128, num_threads=1))
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    ids = {engine.add_request(prompt, params): prompt for prompt in PROMPTS}
    texts = {}
    while engine.has_unfinished():
        for out in engine.step(only_finished=True):
            texts[ids[out.request_id]] = out.outputs[0].text
    assert all(len(t) == MAX_TOKENS and t.isprintable() for t in texts.values()), texts
    return texts, engine


@pytest.fixture(scope="module")
def unsplit_completions(tiny_folder) -> dict[str, str]:
    return _unsplit_run(tiny_folder)[0]


def _complete_all(server: Server) -> dict[str, tuple[str, int]]:
    """Each prompt's greedy completion through the openai client (all at once: batched together on both ranks),
    with its completion token count."""
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["tiny"]

    def complete(prompt: str) -> tuple[str, int]:
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                      extra_body={"ignore_eos": True})
        return r.choices[0].text, r.usage.completion_tokens

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        return dict(zip(PROMPTS, pool.map(complete, PROMPTS)))


def test_serve_answers_as_the_unsplit_engine_and_stops_on_ctrl_c(server, unsplit_completions) -> None:
    answers = _complete_all(server)
    assert answers == {p: (unsplit_completions[p], MAX_TOKENS) for p in PROMPTS}
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=60)
    stream = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in stream if c.choices) == unsplit_completions[PROMPTS[0]]

    assert len(server.ranks()) == 2
    os.killpg(server.process.pid, signal.SIGINT)  # Ctrl-C in the terminal: every process of the group gets it
    assert server.wait_all_ended() == 130
    out = server.output()
    assert "Shutting down" in out and "Traceback" not in out and "error" not in out, out


def test_expert_parallel_serves_the_unsplit_text_and_every_experts_load(tmp_path) -> None:
    """A Mixtral whose experts split whole over the two ranks (their features would not): the unsplit engine's
    completions, and /metrics counts every expert's (token, expert) assignments, rank 1's experts included, as the
    unsplit engine counts them for the same requests."""
    from prometheus_client.parser import text_string_to_metric_families
    from tiny_folders import mixtral_folder

    folder = mixtral_folder(tmp_path / "mixtral")
    texts, engine = _unsplit_run(folder)
    server = Server(folder, tmp_path, "--expert-parallel")
    try:
        assert _complete_all(server) == {p: (texts[p], MAX_TOKENS) for p in PROMPTS}
        exposition = httpx.get(f"{server.base_url}/metrics", timeout=30).text
    finally:
        server.kill()
    counts = {(sample.labels["layer"], sample.labels["expert"]): sample.value
              for family in text_string_to_metric_families(exposition) if family.name == "trident_moe_expert_tokens"
              for sample in family.samples if sample.name.endswith("_total")}
    expected = {(str(load.layer), str(expert)): float(count) for load in engine.moe_stats().layers
                for expert, count in enumerate(load.token_counts)}
    assert len(expected) == 2 * 4 and sum(expected.values()) > 0
    assert counts == expected


def test_a_killed_rank_stops_the_server(server) -> None:
    rank0, rank1 = server.ranks()
    os.kill(rank1, signal.SIGKILL)
    assert server.wait_all_ended() == 1
    out = server.output()
    assert "error: rank 1 was ended by SIGKILL; the other ranks were stopped" in out, out
    with pytest.raises(openai.APIConnectionError):
        openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0).models.list()


@pytest.mark.parametrize(("flags", "message"), [
    (("a.gguf", "b.gguf"), "--tensor-parallel 2 serves one model"),
    (("--memory-budget", "4GiB"), "--memory-budget is not supported with --tensor-parallel 2"),
    (("--admin-key", "secret"), "the admin API (--admin-key or $TRIDENT_ADMIN_KEY) is not supported"),
])
def test_unsupported_combinations_are_refused_before_any_rank(flags, message, capsys, monkeypatch) -> None:
    monkeypatch.delenv("TRIDENT_ADMIN_KEY", raising=False)
    assert main(["serve", *flags, "--tensor-parallel", "2"]) == 2
    assert message in capsys.readouterr().err
