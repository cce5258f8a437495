"""Choosing the attention backend: auto/torch/triton by name, validated when the config is built, and
every impossible choice a one-line TridentError saying what to do instead (no triton needed here)."""

from __future__ import annotations

import pytest
import torch

import trident.attention.registry as registry
from trident import LLM
from trident.attention.registry import create_backend, resolve_backend_name
from trident.attention.torch_ref import TorchAttention
from trident.cli import main
from trident.config import EngineConfig
from trident.errors import TridentError

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object needs no device behind it


def test_unknown_name_lists_the_choices() -> None:
    with pytest.raises(TridentError, match=r"unknown attention backend 'flash'; supported: auto, torch, triton"):
        EngineConfig(model="m", attention_backend="flash")
    with pytest.raises(TridentError, match="unknown attention backend"):
        LLM("no-such-model", attention_backend="flash")  # refused before anything is loaded


def test_triton_on_the_cpu_is_refused_with_the_fix() -> None:
    with pytest.raises(TridentError, match="needs a CUDA device.*--device cuda.*--attention-backend torch"):
        EngineConfig(model="m", device="cpu", attention_backend="triton")
    with pytest.raises(TridentError, match="needs a CUDA device"):
        resolve_backend_name("triton", CPU)
    EngineConfig(model="m", device="cuda:1", attention_backend="triton")  # a valid choice on CUDA


def test_auto_and_torch() -> None:
    assert resolve_backend_name("auto", CPU) == "torch"
    assert resolve_backend_name("torch", CUDA) == "torch"
    assert isinstance(create_backend("auto", CPU), TorchAttention)
    assert not TorchAttention.wants_prefill_batch


def test_missing_triton(monkeypatch) -> None:
    monkeypatch.setattr(registry, "triton_available", lambda: False)
    assert resolve_backend_name("auto", CUDA) == "torch"
    with pytest.raises(TridentError, match="needs the triton package"):
        resolve_backend_name("triton", CUDA)
    monkeypatch.setattr(registry, "triton_available", lambda: True)
    assert resolve_backend_name("auto", CUDA) == "triton"


def test_cli_flag(capsys) -> None:
    assert main(["generate", "--attention-backend", "triton", "--prompt", "hi"]) == 2
    assert "the triton attention backend needs a CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--attention-backend", "flash", "--prompt", "hi"])


def test_latent_attention_takes_the_torch_backend(monkeypatch) -> None:
    """DeepSeek's multi-head latent attention runs on the torch backend only: auto picks it, triton is refused."""
    monkeypatch.setattr(registry, "triton_available", lambda: True)
    assert resolve_backend_name("auto", CUDA, mla=True) == "torch"
    assert resolve_backend_name("torch", CUDA, mla=True) == "torch"
    with pytest.raises(TridentError, match="multi-head latent attention.*--attention-backend torch"):
        resolve_backend_name("triton", CUDA, mla=True)
