"""`trident upcycle`: a tiny dense Llama turned into a Mixtral folder. Unperturbed, its logits are the dense model's
(in transformers and in trident); perturbed, trident's logits are transformers' on the same folder and the experts
differ as asked; the command end to end and its refusals."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from trident.attention.registry import create_backend
from trident.cli import main
from trident.compress.upcycle import UpcycleConfig, save_upcycled, upcycle
from trident.engine.plan import ScheduledChunk, StepPlan
from trident.engine.request import SamplingParams
from trident.engine.runner import ModelRunner
from trident.engine.sampler import Sampler
from trident.errors import TridentError
from trident.loader import load_checkpoint
from trident.models.build import build_model
from trident.quant.kv import kv_cache_format

CPU = torch.device("cpu")
TOKENS = [(7 * i + 3) % 97 for i in range(24)]


@pytest.fixture(scope="module")
def tied_llama_dir(tmp_path_factory):
    """A tiny dense Llama with tied embeddings (as SmolLM2), saved by transformers."""
    from hf_tiny import COMMON, make_hf_model

    config = transformers.LlamaConfig(**COMMON, tie_word_embeddings=True, rope_theta=50000.0)
    path = tmp_path_factory.mktemp("tiny-dense-llama")
    make_hf_model(config, seed=3).save_pretrained(path)
    return path


def _trident_logits(path) -> torch.Tensor:
    """Prefill logits of TOKENS through trident's model and paged KV cache, float32."""
    checkpoint = load_checkpoint(str(path))
    model = build_model(checkpoint.config, checkpoint.tensors, dtype=torch.float32, device=CPU,
                        backend=create_backend("torch", CPU))
    runner = ModelRunner(model, backend=create_backend("torch", CPU), num_blocks=4, block_size=16,
                         kv_format=kv_cache_format("auto", torch.float32), device=CPU, sampler=Sampler(device=CPU),
                         max_num_seqs=1)
    chunk = ScheduledChunk(seq_id=0, token_ids=tuple(TOKENS), start_pos=0, block_table=(0, 1), sample=True,
                           params=SamplingParams(temperature=0.0))
    input_ids, positions, meta, _, _ = runner.prepare(StepPlan(chunks=(chunk,)))
    with torch.inference_mode():
        return model.compute_logits(model(input_ids, positions, runner.kv_caches, meta)).float()


def _hf_logits(path, dtype: torch.dtype) -> torch.Tensor:
    moe = {"experts_implementation": "eager"} if "moe" in path.name else {}  # grouped_mm takes no float64
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager",
                                                              **moe).eval()
    with torch.inference_mode():
        return model(torch.tensor([TOKENS])).logits[0]


def _moved(rows: torch.Tensor, dense_rows: torch.Tensor) -> set[int]:
    """The rows (neurons) with a weight more than 0.3 of the dense matrix's std away from the dense one."""
    far = ((rows - dense_rows).abs() > 0.3 * dense_rows.std()).any(dim=1)
    return set(far.nonzero().flatten().tolist())


def _upcycle_to(path, out, config: UpcycleConfig):
    checkpoint = load_checkpoint(str(path))
    result = upcycle(checkpoint, config)
    save_upcycled(result, checkpoint, str(out))
    return result


def test_unperturbed_experts_compute_the_dense_logits(tied_llama_dir, tmp_path) -> None:
    out = tmp_path / "moe"
    result = _upcycle_to(tied_llama_dir, out, UpcycleConfig(num_experts=4, top_k=2, router_std=0.5))
    hf_config = json.loads((out / "config.json").read_text())
    assert (hf_config["model_type"], hf_config["num_local_experts"], hf_config["num_experts_per_tok"]) == (
        "mixtral", 4, 2)
    assert hf_config["tie_word_embeddings"] is True
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(loaded).__name__ == "MixtralForCausalLM"
    assert loaded.config.rope_parameters["rope_theta"] == 50000.0
    dense64 = _hf_logits(tied_llama_dir, torch.float64)
    moe64 = _hf_logits(out, torch.float64)
    # identical experts, top-2 weights summing to 1: exact but for transformers' router, whose softmax runs in
    # float32 even here (the weights sum to 1 within ~1e-7; measured 7e-7 on the logits, which reach ~3)
    assert torch.allclose(moe64, dense64, rtol=0, atol=1e-5)
    moe32 = _trident_logits(out)  # float32 rounding through 3 layers: measured 6e-6 and 2e-6
    assert torch.allclose(moe32, dense64.float(), rtol=0, atol=5e-5)
    assert torch.allclose(moe32, _trident_logits(tied_llama_dir), rtol=0, atol=5e-5)
    assert all(r.distance_between_experts == 0.0 and r.distance_from_dense == 0.0 for r in result.layers)


def test_perturbed_experts_differ_and_trident_matches_transformers(tied_llama_dir, tmp_path) -> None:
    out = tmp_path / "moe"
    config = UpcycleConfig(num_experts=4, top_k=2, reinit_fraction=0.25, noise=0.05, router_std=0.5, seed=7)
    result = _upcycle_to(tied_llama_dir, out, config)
    dense = load_checkpoint(str(tied_llama_dir)).tensors
    moe = load_checkpoint(str(out)).tensors
    intermediate = dense["model.layers.0.mlp.gate_proj.weight"].shape[0]
    for layer in range(3):
        prefix = f"model.layers.{layer}"
        redrawn = []
        for e in range(4):  # noise of 0.05 std moves no weight by 0.3 std; a re-drawn neuron moves some by more
            expert = {short: moe[f"{prefix}.block_sparse_moe.experts.{e}.{short}.weight"]
                      for short in ("w1", "w3", "w2")}
            moved = [_moved(expert["w1"], dense[f"{prefix}.mlp.gate_proj.weight"]),
                     _moved(expert["w3"], dense[f"{prefix}.mlp.up_proj.weight"]),
                     _moved(expert["w2"].T, dense[f"{prefix}.mlp.down_proj.weight"].T)]
            assert moved[0] == moved[1] == moved[2] and len(moved[0]) == round(0.25 * intermediate)
            assert not torch.equal(expert["w1"], dense[f"{prefix}.mlp.gate_proj.weight"])
            redrawn.append(moved[0])
        assert len({frozenset(r) for r in redrawn}) == 4  # each expert its own neurons
        assert result.layers[layer].distance_between_experts > 0.1
    hf = _hf_logits(out, torch.float32)
    assert torch.allclose(_trident_logits(out), hf, rtol=0, atol=1e-4)
    assert not torch.allclose(hf, _hf_logits(tied_llama_dir, torch.float32), atol=1e-2)  # the experts count


def test_same_seed_same_folder(tied_llama_dir) -> None:
    checkpoint = load_checkpoint(str(tied_llama_dir))
    config = UpcycleConfig(num_experts=3, top_k=1, reinit_fraction=0.1, noise=0.01, seed=11)
    a, b = upcycle(checkpoint, config), upcycle(checkpoint, config)
    assert a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    c = upcycle(checkpoint, UpcycleConfig(num_experts=3, top_k=1, reinit_fraction=0.1, noise=0.01, seed=12))
    assert not torch.equal(a.tensors["model.layers.0.block_sparse_moe.gate.weight"],
                           c.tensors["model.layers.0.block_sparse_moe.gate.weight"])


def test_cli_end_to_end(tiny_text_llama_dir, tmp_path, capsys) -> None:
    out, record = tmp_path / "moe", tmp_path / "upcycle.json"
    code = main(["upcycle", str(tiny_text_llama_dir), "--experts", "3", "--top-k", "2", "--reinit-fraction", "0.1",
                 "--out", str(out), "--json", str(record)])
    assert code == 0
    data = json.loads(record.read_text())
    dense = load_checkpoint(str(tiny_text_llama_dir))
    cfg = dense.config
    mlp = 3 * cfg.hidden_size * cfg.intermediate_size
    assert data["params_dense"] == dense.num_parameters()
    assert data["params_moe"] == data["params_dense"] + cfg.num_layers * (2 * mlp + 3 * cfg.hidden_size)
    assert data["params_active"] == data["params_dense"] + cfg.num_layers * (mlp + 3 * cfg.hidden_size)
    assert load_checkpoint(str(out)).num_parameters() == data["params_moe"]
    assert (out / "tokenizer.json").is_file()
    assert "mixture of experts written" in capsys.readouterr().out
    assert main(["generate", str(out), "--prompt", "ab", "--max-tokens", "3", "--temperature", "0"]) == 0


@pytest.mark.parametrize("argv, message", [
    (["--experts", "2", "--top-k", "3"], "--top-k must be between 1 and --experts"),
    (["--experts", "1"], "--experts must be an integer >= 2"),
    (["--reinit-fraction", "1.0"], "--reinit-fraction must be in [0, 1)"),
    (["--noise", "-0.1"], "--noise must be >= 0"),
])
def test_cli_refuses_bad_arguments(tiny_text_llama_dir, tmp_path, capsys, argv, message) -> None:
    assert main(["upcycle", str(tiny_text_llama_dir), *argv, "--out", str(tmp_path / "x")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_refuses_a_model_that_is_not_dense_llama(tmp_path, capsys) -> None:
    from hf_tiny import make_hf_model, tiny_moe_configs

    moe = tmp_path / "mixtral"
    make_hf_model(tiny_moe_configs()["mixtral"]).save_pretrained(moe)
    assert main(["upcycle", str(moe), "--out", str(tmp_path / "x")]) == 2
    assert "upcycle takes a dense Llama-form model" in capsys.readouterr().err
    with pytest.raises(TridentError, match="--top-k must be between"):
        UpcycleConfig(num_experts=4, top_k=0)
