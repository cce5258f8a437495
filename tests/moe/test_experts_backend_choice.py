"""Choosing the experts backend: auto picks the fused triton kernels for 16-bit models on CUDA where Triton imports
and the torch reference elsewhere; impossible choices are user errors with the fix; the engine config validates the
name before anything loads; the command line's flag reaches the engine config."""

from __future__ import annotations

import pytest
import torch

from trident.config import EngineConfig
from trident.errors import TridentError
from trident.moe import registry
from trident.moe.registry import resolve_experts_backend

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("triton_imports", [True, False])
def test_auto_picks_triton_only_for_16_bit_models_on_cuda(monkeypatch, triton_imports: bool) -> None:
    monkeypatch.setattr(registry, "triton_available", lambda: triton_imports)
    for dtype in (torch.bfloat16, torch.float16):
        assert resolve_experts_backend("auto", CUDA, dtype) == ("triton" if triton_imports else "torch")
        assert resolve_experts_backend("auto", CPU, dtype) == "torch"
    assert resolve_experts_backend("auto", CUDA, torch.float32) == "torch"
    assert resolve_experts_backend("torch", CUDA, torch.bfloat16) == "torch"


def test_impossible_choices_are_user_errors(monkeypatch) -> None:
    monkeypatch.setattr(registry, "triton_available", lambda: True)
    assert resolve_experts_backend("triton", CUDA, torch.float16) == "triton"
    with pytest.raises(TridentError, match="--experts-backend torch"):
        resolve_experts_backend("triton", CPU, torch.bfloat16)
    with pytest.raises(TridentError, match="--dtype bfloat16"):
        resolve_experts_backend("triton", CUDA, torch.float32)
    with pytest.raises(TridentError, match="auto, torch, triton"):
        resolve_experts_backend("cutlass", CUDA, torch.bfloat16)
    monkeypatch.setattr(registry, "triton_available", lambda: False)
    with pytest.raises(TridentError, match="install triton"):
        resolve_experts_backend("triton", CUDA, torch.bfloat16)


def test_engine_config_checks_the_name() -> None:
    with pytest.raises(TridentError, match="unknown experts backend"):
        EngineConfig(model="m", experts_backend="cutlass")
    with pytest.raises(TridentError, match="needs a CUDA device"):
        EngineConfig(model="m", device="cpu", experts_backend="triton")
    assert EngineConfig(model="m", device="cuda:0", experts_backend="triton").experts_backend == "triton"


def test_cli_flag_reaches_the_engine_config() -> None:
    import argparse

    from trident.cli import _engine_args, _engine_config

    parser = argparse.ArgumentParser()
    _engine_args(parser)
    assert _engine_config(parser.parse_args([]), None).experts_backend == "auto"
    args = parser.parse_args(["--device", "cuda", "--experts-backend", "triton"])
    assert _engine_config(args, None).experts_backend == "triton"
