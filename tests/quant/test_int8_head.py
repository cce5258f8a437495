"""The int8 LM head (trident/quant/head.py): `trident quantize --lm-head int8` on an untied and a tied model, the
folder's round trip, the head's product against float64 math on its dequantized codes, the logits' distance from
the float head, and `trident bench --weights int8 --lm-head int8`."""

from __future__ import annotations

import json

import pytest
import torch
from hf_tiny import make_hf_model, tiny_hf_configs
from test_quantized_model import _build, _logits

from trident.cli import main
from trident.loader import load_checkpoint
from trident.quant.embedding import QuantizedEmbedding
from trident.quant.head import head_config, head_module, quantize_head
from trident.quant.linear import QuantizedLinear, quantize_model
from trident.quant.rtn import QuantConfig, dequantize

TOKENS = [(5 * i + 3) % 97 for i in range(20)]
HEAD_TOLERANCE = 0.1
"""The largest logit difference over 20 tokens x 97 logits, relative to the largest logit, between an int8 head and
the float head on the same int4 layers (tiny random models, seed 7): measured 0.7% untied, 4.3% tied. A head left
float gives 0; misplaced scales give order 1. The exact check is the head's own product against float64 math."""


@pytest.fixture(params=["llama", "llama3-scaled"], ids=["untied", "tied"])
def tiny_dir(request, tmp_path_factory):
    config = tiny_hf_configs()[request.param]
    path = tmp_path_factory.mktemp(f"head-{request.param}")
    make_hf_model(config, seed=7).save_pretrained(path)
    return path, bool(config.tie_word_embeddings)


def test_quantize_cli_int8_head_round_trips_and_stays_close(tiny_dir, tmp_path, capsys) -> None:
    source, tied = tiny_dir
    out = tmp_path / "q"
    report = tmp_path / "q.json"
    assert main(["quantize", str(source), "--bits", "4", "--group-size", "32", "--lm-head", "int8", "--out", str(out),
                 "--json", str(report)]) == 0, capsys.readouterr().err
    head = "model.embed_tokens" if tied else "lm_head"
    record = json.loads(report.read_text())
    assert record["lm_head"] == head and record["lm_head_bytes_after"] > 0
    entry = json.loads((out / "config.json").read_text())["quantization_config"]
    assert head in entry["modules"]
    assert entry["module_configs"][head] == {"bits": 8, "group_size": None, "symmetric": True}

    loaded = load_checkpoint(str(out))
    model = _build(loaded)
    module = model.get_submodule(head)
    assert isinstance(module, QuantizedEmbedding if tied else QuantizedLinear)
    linear = module.head if tied else module
    assert linear.config == head_config()

    # the same model quantized in memory: identical logits
    checkpoint = load_checkpoint(str(source))
    reference = _build(checkpoint)
    quantize_model(reference, QuantConfig(bits=4, group_size=32))
    float_head = _logits(reference, TOKENS)
    assert quantize_head(reference) == head == head_module(_build(checkpoint))
    logits = _logits(model, TOKENS)
    assert torch.equal(logits, _logits(reference, TOKENS))
    # and within the int8 rounding of the float head on the same layers (but not equal to it)
    relative = (logits - float_head).abs().max() / float_head.abs().max()
    assert 0 < relative < HEAD_TOLERANCE, relative

    # the head's product: float64 math on its dequantized codes, and within half a scale per weight of the float head
    hidden = torch.randn(3, linear.in_features, generator=torch.Generator().manual_seed(0))
    weight = dequantize(linear.quantized, linear.config, torch.float64)
    expected = hidden.double() @ weight.T
    got = (module.logits(hidden) if tied else module(hidden)).double()
    assert ((got - expected).abs() <= 1e-5 * (hidden.double().abs() @ weight.abs().T) + 1e-7).all()
    original = checkpoint.tensors["model.embed_tokens.weight" if tied else "lm_head.weight"].double()
    rounding = hidden.double().abs() @ (linear.scales.double().reshape(-1, 1) / 2).expand_as(original).T
    assert ((expected - hidden.double() @ original.T).abs() <= rounding * (1 + 1e-6)).all()
    if tied:  # the lookups read the same codes
        ids = torch.tensor([0, 5, 17])
        torch.testing.assert_close(module(ids).double(), weight[ids], rtol=0, atol=1e-6)


def test_lm_head_flag_errors(tiny_dir, tmp_path, capsys) -> None:
    source, _ = tiny_dir
    for extra in (["--bits", "mixed", "--avg-bits", "5"], ["--method", "w8a8", "--bits", "8"]):
        assert main(["quantize", str(source), *extra, "--lm-head", "int8", "--out", str(tmp_path / "x")]) == 2
        assert "--lm-head int8 applies to --method rtn or gptq" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_bench_int8_head_counts_its_bytes(tmp_path, capsys) -> None:
    """`trident bench latency --weights int4 --lm-head int8`: the engine runs the int8 head, and the roofline counts
    its codes and scales instead of the float head."""
    config = tiny_hf_configs()["llama"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    rows = {}
    for head in ("float", "int8"):
        out = tmp_path / f"{head}.json"
        assert main(["bench", "latency", "--shape", str(path), "--prompt-len", "8", "--output-len", "3", "--repeat",
                     "1", "--device", "cpu", "--dtype", "float32", "--weights", "int4", "--group-size", "32",
                     "--lm-head", head, "--json", str(out)]) == 0
        rows[head] = json.loads(out.read_text())
    vocab, hidden = config.vocab_size, config.hidden_size
    saved = rows["float"]["roofline"]["weight_bytes_per_step"] - rows["int8"]["roofline"]["weight_bytes_per_step"]
    assert saved == 4 * vocab * hidden - (vocab * hidden + 4 * vocab)  # float32 head -> int8 codes + a scale per row
    assert rows["int8"]["results"][0]["decode_tok_s"] > 0
    assert rows["int8"]["lm_head"] == "int8" and rows["float"]["lm_head"] == "float"
    assert rows["int8"]["results"][0]["engine"].endswith("int4 g32 weights, int8 LM head)")
    assert "LM head" not in rows["float"]["results"][0]["engine"]
    assert main(["bench", "latency", "--shape", str(path), "--device", "cpu", "--lm-head", "int8"]) == 2
    assert "--lm-head int8 applies to --weights int8 or int4" in capsys.readouterr().err
