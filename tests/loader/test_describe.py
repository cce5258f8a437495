"""describe_model reads what load_checkpoint would give (config and quantization) without the weights: for the
embedded GGUF (native or dequantized), a Hugging Face folder and a `trident quantize` folder."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from trident.cli import main
from trident.errors import TridentError
from trident.loader import load_checkpoint
from trident.loader.describe import describe_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    from hf_tiny import make_hf_model, tiny_llama_config

    root = tmp_path_factory.mktemp("describe")
    make_hf_model(tiny_llama_config(vocab_size=256, max_position_embeddings=256), seed=5).save_pretrained(root / "hf")
    assert main(["quantize", str(root / "hf"), "--bits", "4", "--group-size", "32", "--out", str(root / "int4")]) == 0
    return root / "hf", root / "int4"


@pytest.mark.parametrize("native", [True, False])
def test_describes_the_default_gguf_without_reading_weights(native: bool, monkeypatch) -> None:
    import trident.loader.gguf as gguf_loader

    def refuse(*args):
        raise AssertionError("describe_model read a weight")

    with monkeypatch.context() as patched:
        for reader in ("_load_tensor", "_load_native"):
            patched.setattr(gguf_loader, reader, refuse)
        described = describe_model(None, gguf_native=native)
    loaded = load_checkpoint(None, gguf_native=native)
    assert described.config == loaded.config and described.quantization == loaded.quantization
    assert (described.quantization is not None) == native
    assert described.path == loaded.path


def test_describes_folders(folders) -> None:
    for folder in folders:
        described, loaded = describe_model(str(folder)), load_checkpoint(str(folder))
        assert described.config == loaded.config and described.quantization == loaded.quantization
    assert describe_model(str(folders[1])).quantization.config.bits == 4


def test_bad_paths_are_refused_as_load_checkpoint_refuses_them(tmp_path) -> None:
    with pytest.raises(TridentError, match="does not exist"):
        describe_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(TridentError, match="has no config.json"):
        describe_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TridentError, match="not the file inside it"):
        describe_model(str(tmp_path / "config.json"))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all, long enough")
    with pytest.raises(TridentError, match="not a GGUF file"):
        describe_model(str(tmp_path / "junk.gguf"))
