"""Fixtures of the native-kernel tests: a tiny random Llama quantized to int4 in groups of 32, and to per-channel
int8."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))


@pytest.fixture(scope="session")
def tiny_int4_llama_dir(tmp_path_factory) -> Path:
    from hf_tiny import make_hf_model, tiny_llama_config

    from trident.cli import main

    root = tmp_path_factory.mktemp("tiny-llama-native")
    make_hf_model(tiny_llama_config(vocab_size=256, max_position_embeddings=256), seed=5).save_pretrained(root / "hf")
    assert main(["quantize", str(root / "hf"), "--method", "rtn", "--bits", "4", "--group-size", "32",
                 "--out", str(root / "int4")]) == 0
    return root / "int4"


@pytest.fixture(scope="session", params=["symmetric", "asymmetric", "group64"])
def tiny_int8_llama_dir(request, tmp_path_factory) -> Path:
    """The same tiny Llama quantized to int8 (`trident quantize --bits 8 [--asymmetric | --group-size 64]`)."""
    from hf_tiny import make_hf_model, tiny_llama_config

    from trident.cli import main

    root = tmp_path_factory.mktemp(f"tiny-llama-int8-{request.param}")
    make_hf_model(tiny_llama_config(vocab_size=256, max_position_embeddings=256), seed=5).save_pretrained(root / "hf")
    extra = {"symmetric": [], "asymmetric": ["--asymmetric"], "group64": ["--group-size", "64"]}[request.param]
    assert main(["quantize", str(root / "hf"), "--bits", "8", *extra, "--out", str(root / "int8")]) == 0
    return root / "int8"
