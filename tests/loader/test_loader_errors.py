"""Every user-caused loading failure is a TridentError whose message says what to do."""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
from tiny_gguf import tiny_config, tiny_model, write_gguf

from trident.errors import TridentError
from trident.loader import load_checkpoint


@pytest.fixture(scope="module")
def tiny_gguf_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return write_gguf(str(path), tiny_model(tiny_config("llama")), "Q8_0")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("folder")
    tiny_model(tiny_config("qwen2")).save_pretrained(path)
    return path


def _copy(src, dst, keep: float | None = None, garbage_at: int | None = None) -> str:
    data = bytearray(open(src, "rb").read())
    if keep is not None:
        data = data[: int(len(data) * keep)]
    if garbage_at is not None:
        rng = np.random.default_rng(0)
        data[garbage_at:] = rng.integers(0, 256, len(data) - garbage_at, dtype=np.uint8).tobytes()
    with open(dst, "wb") as f:
        f.write(data)
    return str(dst)


def test_missing_path(tmp_path):
    with pytest.raises(TridentError, match="does not exist.*never downloads"):
        load_checkpoint(str(tmp_path / "nope.gguf"))


def test_folder_without_config(tmp_path):
    with pytest.raises(TridentError, match="no config.json"):
        load_checkpoint(str(tmp_path))


def test_folder_without_weights(tmp_path, tiny_folder):
    shutil.copy(tiny_folder / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(TridentError, match="no model.safetensors.*pytorch_model.bin.*safetensors"):
        load_checkpoint(str(tmp_path))


def test_folder_with_missing_shard(tmp_path, tiny_folder):
    shutil.copy(tiny_folder / "config.json", tmp_path / "config.json")
    index = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(TridentError, match="lacks the weight shards"):
        load_checkpoint(str(tmp_path))


def test_corrupt_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(TridentError, match="config.json is not valid JSON"):
        load_checkpoint(str(tmp_path))


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.01])
def test_truncated_safetensors(tmp_path, tiny_folder, keep):
    shutil.copy(tiny_folder / "config.json", tmp_path / "config.json")
    _copy(tiny_folder / "model.safetensors", tmp_path / "model.safetensors", keep=keep)
    with pytest.raises(TridentError, match="corrupt or truncated.*again"):
        load_checkpoint(str(tmp_path))


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.05, 0.001])
def test_truncated_gguf(tmp_path, tiny_gguf_file, keep):
    with pytest.raises(TridentError, match="truncated|too small"):
        load_checkpoint(_copy(tiny_gguf_file, tmp_path / "cut.gguf", keep=keep))


@pytest.mark.parametrize("garbage_at", [0, 4, 30, 200])
def test_garbage_gguf(tmp_path, tiny_gguf_file, garbage_at):
    with pytest.raises(TridentError):
        load_checkpoint(_copy(tiny_gguf_file, tmp_path / "bad.gguf", garbage_at=garbage_at))


def test_not_a_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(TridentError, match="not a GGUF file.*Hugging Face model folder"):
        load_checkpoint(str(path))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(TridentError, match="pass the model folder"):
        load_checkpoint(str(tmp_path / "model.safetensors"))


def test_unsupported_gguf_architecture(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "phi.gguf"), "phi3")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(TridentError, match="unsupported GGUF architecture 'phi3'.*llama"):
        load_checkpoint(str(tmp_path / "phi.gguf"))


def test_unsupported_folder_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(TridentError, match="unsupported architecture 'bert'.*supports"):
        load_checkpoint(str(tmp_path))


def test_unsupported_gguf_tensor_type(tmp_path):
    model = tiny_model(tiny_config("llama", num_hidden_layers=1))
    path = write_gguf(str(tmp_path / "i32.gguf"), model, norm_type="I32")
    with pytest.raises(TridentError, match="tensor blk.0.attn_norm.weight: GGUF tensor type I32 is not supported"):
        load_checkpoint(path)


def test_unknown_ggml_type_id(tmp_path, tiny_gguf_file):
    """A tensor whose type id the gguf package does not know (a newer llama.cpp quantization)."""
    from trident.loader.gguf_reader import read_gguf

    f = read_gguf(tiny_gguf_file)
    info = next(iter(f.tensors.values()))
    data = bytearray(open(tiny_gguf_file, "rb").read())
    name = info.name.encode()
    at = data.index(name) + len(name)
    n_dims = int.from_bytes(data[at : at + 4], "little")
    type_at = at + 4 + 8 * n_dims
    data[type_at : type_at + 4] = (250).to_bytes(4, "little")
    bad = tmp_path / "newtype.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(TridentError, match="type id 250.*re-quantize"):
        load_checkpoint(str(bad))


def test_split_gguf_part(tmp_path):
    model = tiny_model(tiny_config("llama", num_hidden_layers=1))
    path = write_gguf(str(tmp_path / "m-00001-of-00002.gguf"), model, extra=[("uint16", ("split.count", 2))])
    with pytest.raises(TridentError, match="split GGUF; merge the parts"):
        load_checkpoint(path)
