"""`trident generate --tensor-parallel 2` (and `--expert-parallel`) as a user runs it (real processes: the command
spawns its two gloo ranks), on tiny Llama and Mixtral folders with a byte-level tokenizer (tiny_folders.py; the
Llama one is conftest.py's), against the same command without it."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_folders import mixtral_folder

TRIDENT = [sys.executable, "-m", "trident.cli"]
GENERATE = ("--prompt", "The quick brown fox", "--max-tokens", "12", "--ignore-eos", "--dtype", "float32",
            "--max-model-len", "128", "--threads", "1")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*TRIDENT, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _unsplit_text(folder: Path) -> str:
    """What ``generate`` prints without tensor parallelism."""
    whole = _run("generate", str(folder), *GENERATE)
    assert whole.returncode == 0, whole.stderr
    assert whole.stdout.startswith("The quick brown fox") and whole.stdout.endswith("\n")
    generated = whole.stdout[len("The quick brown fox"): -1]
    assert len(generated) == 12 and generated.isprintable()  # one character per token
    return whole.stdout


@pytest.fixture(scope="module")
def unsplit_text(tiny_folder) -> str:
    return _unsplit_text(tiny_folder)


def test_generate_tensor_parallel_prints_the_unsplit_text(tiny_folder, unsplit_text) -> None:
    split = _run("generate", str(tiny_folder), *GENERATE, "--tensor-parallel", "2")
    assert split.returncode == 0, split.stderr
    assert "12 generated" in split.stderr and "loaded in" in split.stderr
    assert split.stdout == unsplit_text


@pytest.mark.slow
def test_default_model_splits_its_heads_unevenly_and_prints_the_unsplit_text() -> None:
    """The embedded SmolLM2-135M (9 heads, 3 kv heads: rank 0 takes one kv head and its 3 query heads, rank 1 the
    other 6) over two ranks prints, greedily, what it prints unsplit from the same (dequantized) weights: more
    than a few words, so that a wrong head would show."""
    common = ("generate", "--prompt", "The capital of France is", "--max-tokens", "24", "--ignore-eos",
              "--gguf-weights", "dequantize", "--dtype", "float32", "--threads", "1")
    whole, split = _run(*common), _run(*common, "--tensor-parallel", "2")
    assert whole.returncode == 0 and split.returncode == 0, (whole.stderr, split.stderr)
    assert "24 generated" in split.stderr
    assert len(whole.stdout.split()) > 8
    assert split.stdout == whole.stdout


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
    assert r.stderr == ("error: the model has 4 attention heads and 2 kv heads, fewer than --tensor-parallel 3: "
                        "each rank would need a whole share of one kv head's query heads; use at most 2 ranks, or a "
                        "multiple of 2 that divides 4\n")


@pytest.fixture(scope="module")
def tiny_moe_folder(tmp_path_factory) -> Path:
    """tiny_folders.mixtral_folder: experts that split whole but not by features."""
    return mixtral_folder(tmp_path_factory.mktemp("ep-mixtral"))


def test_generate_expert_parallel_prints_the_unsplit_text(tiny_moe_folder, capsys) -> None:
    """Whole experts per rank reach the spawned ranks (the features would not split) and generate the text the
    unsplit command streams (its engine and sampling built in this process from the same arguments); tensor
    parallelism alone refuses the model in one line before any rank starts."""
    from trident.cli import _engine_config, _params, _stream, build_parser, main
    from trident.engine.engine import LLMEngine

    split = _run("generate", str(tiny_moe_folder), *GENERATE, "--tensor-parallel", "2", "--expert-parallel")
    assert split.returncode == 0, split.stderr
    args = build_parser().parse_args(["generate", str(tiny_moe_folder), *GENERATE])
    engine = LLMEngine(_engine_config(args, args.model))
    streamed = io.StringIO()
    _stream(engine, engine.tokenizer.encode(args.prompt), _params(args), out=streamed)
    assert split.stdout == f"{args.prompt}{streamed.getvalue()}\n"
    assert len(streamed.getvalue()) == 12 and streamed.getvalue().isprintable()  # one character per token
    assert main(["generate", str(tiny_moe_folder), *GENERATE, "--tensor-parallel", "2"]) == 2
    assert capsys.readouterr().err == ("error: the model's moe_intermediate_size (33) does not split evenly over "
                                       "--tensor-parallel 2; use a size that divides it\n")
