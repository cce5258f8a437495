"""`trident generate --tensor-parallel 2` as a user runs it (real processes: the command spawns its two gloo ranks),
on a tiny Llama folder with a byte-level tokenizer (conftest.py), against the same command without it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

TRIDENT = [sys.executable, "-m", "trident.cli"]
GENERATE = ("--prompt", "The quick brown fox", "--max-tokens", "12", "--ignore-eos", "--dtype", "float32",
            "--max-model-len", "128", "--threads", "1")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*TRIDENT, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.fixture(scope="module")
def unsplit_text(tiny_folder) -> str:
    """What ``generate`` prints without tensor parallelism."""
    whole = _run("generate", str(tiny_folder), *GENERATE)
    assert whole.returncode == 0, whole.stderr
    assert whole.stdout.startswith("The quick brown fox") and whole.stdout.endswith("\n")
    generated = whole.stdout[len("The quick brown fox"): -1]
    assert len(generated) == 12 and generated.isprintable()  # one character per token
    return whole.stdout


def test_generate_tensor_parallel_prints_the_unsplit_text(tiny_folder, unsplit_text) -> None:
    split = _run("generate", str(tiny_folder), *GENERATE, "--tensor-parallel", "2")
    assert split.returncode == 0, split.stderr
    assert "12 generated" in split.stderr and "loaded in" in split.stderr
    assert split.stdout == unsplit_text


def test_generate_under_torchrun(tiny_folder, unsplit_text) -> None:
    """torchrun starts the two ranks (this process is one of them, rank 0 prints), as on several hosts."""
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "trident.cli", "generate", str(tiny_folder), *GENERATE, "--tensor-parallel", "2"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout == unsplit_text


def test_heads_that_do_not_split_are_one_line_before_any_rank(tiny_folder) -> None:
    r = _run("generate", str(tiny_folder), *GENERATE, "--tensor-parallel", "3")
    assert r.returncode == 2, r.stderr
    assert r.stderr == ("error: the model has 4 attention heads, which do not split evenly over --tensor-parallel 3; "
                        "use a size that divides 4\n")
