"""The `trident` command as a user runs it: real processes, real default model."""

from __future__ import annotations

import os
import re
import subprocess
import sys

TRIDENT = [sys.executable, "-m", "trident.cli"]


def _run(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*TRIDENT, *args], capture_output=True, text=True, timeout=300, input=input,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_generate_streams_answer_and_speed() -> None:
    r = _run("generate", "--chat", "--prompt", "What is the capital of France?", "--max-tokens", "24")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "tok/s" in r.stderr and "loaded in" in r.stderr
    # how decode steps run, as the engine built them: the default GGUF on the CPU takes the native C layers where
    # they build (trident/native), else the lean torch step
    from trident.native.qmatmul import available, isa

    expected = f"decode: one C call per layer ({isa()})" if available() else "decode: lean torch step"
    assert expected in r.stderr


def test_chat_session_keeps_history() -> None:
    turns = "What is the capital of France?\nAnd of Italy?\n/reset\nWhat is the capital of France?\n/exit\n"
    r = _run("chat", "--max-tokens", "16", input=turns)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    prompt_tokens = [int(n) for n in re.findall(r"\[(\d+) prompt tokens", r.stderr)]
    assert len(prompt_tokens) == 3
    # the second turn carries the first exchange; /reset drops it again
    assert prompt_tokens[1] > prompt_tokens[0] + 8
    assert prompt_tokens[2] == prompt_tokens[0]


def test_info_prints_the_model() -> None:
    r = _run("info")
    assert r.returncode == 0, r.stderr
    for word in ("llama", "Q4_1", "8,192", "576", "134,515,008"):
        assert word in r.stdout


def test_user_errors_are_one_line_without_traceback(tmp_path) -> None:
    for args in (["generate", str(tmp_path / "nope.gguf"), "--prompt", "x"],
                 ["generate", "--prompt", "x", "--temperature", "-1"],
                 ["info", str(tmp_path)]):
        r = _run(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr
