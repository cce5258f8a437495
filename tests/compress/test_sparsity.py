"""Unstructured and 2:4 pruning as masks (trident/compress/sparsity.py, `trident prune --structure`): masks against
Python-loop references (exact per-row counts, the two highest of every four kept, ties to the lower index), wanda
scores against a float64 hand computation, the pruned folder's logits in trident equal to transformers', the
--sparse-kernel fallback off CUDA, and the errors a user can cause."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from byte_tokenizer import save_with_byte_tokenizer
from engine_logits import load_engine, prefill_logits
from hf_tiny import tiny_llama_config
from safetensors.torch import load_file

from trident.cli import main
from trident.compress.sparsity import (
    SparsityConfig,
    pruned_per_row,
    read_sparsity,
    two_four_mask,
    unstructured_mask,
    weight_mask,
    weight_scores,
)
from trident.errors import TridentError
from trident.quant.sparse24 import install_sparse_kernels, is_two_four

CALIB = "".join(f"Verse {i}: the miller ground the corn and sang of rain {i * 5 % 11} times.\n" for i in range(60))
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_with_byte_tokenizer(tiny_llama_config(vocab_size=256, max_position_embeddings=128),
                                    tmp_path_factory.mktemp("tiny-sparse"), seed=11)


@pytest.fixture(scope="module")
def tiny_qwen2_dir(tmp_path_factory):
    """q/k/v biases (never masked) and Qwen2's config."""
    config = transformers.Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return save_with_byte_tokenizer(config, tmp_path_factory.mktemp("tiny-sparse-qwen2"), seed=12)


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(CALIB, encoding="utf-8")
    return path


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----- masks -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sparsity, pruned", [(0.3, 19), (0.5, 32), (0.7, 45), (0.01, 1), (0.99, 63)])
def test_unstructured_prunes_an_exact_count_of_the_lowest_per_row(sparsity: float, pruned: int) -> None:
    assert pruned_per_row(64, sparsity) == pruned  # 64 * s rounded half up
    scores = _randn(12, 64, seed=1).abs().double()
    keep = unstructured_mask(scores, sparsity)
    for row in range(12):
        assert int((~keep[row]).sum()) == pruned
        ranked = sorted(range(64), key=lambda j: float(scores[row, j]))  # ascending: the first `pruned` go
        assert sorted(torch.nonzero(~keep[row]).flatten().tolist()) == sorted(ranked[:pruned])


def test_two_four_keeps_the_two_highest_of_every_four() -> None:
    scores = _randn(10, 32, seed=2).abs().double()
    keep = two_four_mask(scores)
    for row in range(10):
        for g in range(8):
            group = [float(scores[row, 4 * g + i]) for i in range(4)]
            best = sorted(range(4), key=lambda i: -group[i])[:2]
            assert [bool(keep[row, 4 * g + i]) for i in range(4)] == [i in best for i in range(4)]


def test_ties_keep_the_lower_index() -> None:
    scores = torch.ones(3, 8, dtype=torch.float64)
    assert unstructured_mask(scores, 0.5)[0].tolist() == [True] * 4 + [False] * 4
    assert two_four_mask(scores)[0].tolist() == [True, True, False, False] * 2


def test_wanda_scores_equal_a_float64_hand_computation() -> None:
    weight = _randn(6, 8, seed=3).to(torch.bfloat16)
    norms = _randn(8, seed=4).abs().double() + 0.1
    expected = torch.tensor([[abs(float(weight[i, j])) * float(norms[j]) for j in range(8)] for i in range(6)],
                            dtype=torch.float64)
    torch.testing.assert_close(weight_scores(weight, norms), expected, rtol=1e-15, atol=0)
    # every |w| = 1: the norms alone decide, and every row keeps the same highest-norm features
    signs = torch.where(_randn(6, 8, seed=5) >= 0, 1.0, -1.0)
    keep = weight_mask(signs, SparsityConfig("unstructured", 0.25, "wanda"), norms)
    top = sorted(sorted(range(8), key=lambda j: -float(norms[j]))[:6])
    assert all(torch.nonzero(keep[i]).flatten().tolist() == top for i in range(6))


def test_is_two_four_known_answers() -> None:
    assert is_two_four(torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0]]))
    assert not is_two_four(torch.tensor([[1.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0]]))
    assert not is_two_four(torch.zeros(2, 6))  # 6 inputs cannot be grouped by four


# ----- the folder --------------------------------------------------------------------------------------------------

def _prune(model, out, *args: str) -> dict:
    report = out.parent / f"{out.name}.json"
    assert main(["prune", str(model), "--out", str(out), "--json", str(report), *args]) == 0
    return json.loads(report.read_text())


@pytest.mark.parametrize("family, structure, method, sparsity", [
    ("llama", "2:4", "wanda", None), ("llama", "unstructured", "l1", "0.3"), ("qwen2", "unstructured", "wanda", "0.6")])
def test_masked_folder_gives_transformers_logits(family: str, structure: str, method: str, sparsity: str | None,
                                                 tiny_dir, tiny_qwen2_dir, calib_file, tmp_path) -> None:
    source_dir = tiny_dir if family == "llama" else tiny_qwen2_dir
    out = tmp_path / "masked"
    args = ["--structure", structure, "--method", method]
    args += [] if sparsity is None else ["--sparsity", sparsity]
    args += ["--calib", str(calib_file), "--calib-samples", "4", "--calib-seq-len", "32"] if method == "wanda" else []
    record = _prune(source_dir, out, *args)
    config = json.loads((out / "config.json").read_text())
    fraction = 0.5 if sparsity is None else float(sparsity)
    assert config["trident_sparsity"] == {"pattern": structure, "sparsity": fraction, "method": method}
    assert read_sparsity(config) == SparsityConfig(structure, fraction, method)

    source, masked = load_file(source_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert source.keys() == masked.keys()
    for name, tensor in source.items():
        assert masked[name].shape == tensor.shape and masked[name].dtype == tensor.dtype
        if not (name.endswith(".weight") and any(p in name for p in PROJECTIONS)):  # embeddings, norms, biases
            assert torch.equal(masked[name], tensor), name
            continue
        zero = masked[name] == 0
        assert torch.equal(masked[name][~zero], tensor[~zero])  # what stays is the source's weight
        if structure == "2:4":
            assert bool((zero.view(tensor.shape[0], -1, 4).sum(-1) >= 2).all()) and is_two_four(masked[name])
        else:
            assert zero.sum(1).tolist() == [pruned_per_row(tensor.shape[1], fraction)] * tensor.shape[0]
    weights = [n for n in source if n.endswith(".weight") and any(p in n for p in PROJECTIONS)]
    assert record["masked_params"] == sum(source[n].numel() for n in weights) and len(record["modules"]) == 2 * 7
    assert record["zeros_after"] == sum(int((masked[n] == 0).sum()) for n in weights)
    if family == "qwen2":
        assert torch.equal(masked["model.layers.1.self_attn.k_proj.bias"],
                           source["model.layers.1.self_attn.k_proj.bias"])

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        expected = hf(torch.tensor([tokens])).logits[0]
    logits = prefill_logits(load_engine(out), tokens)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    if structure == "2:4":  # --sparse-kernel on the CPU: dense matmuls on the masked weights, the same logits
        engine = load_engine(out, sparse_kernel=True)
        logits = prefill_logits(engine, tokens)
        assert engine.sparse_kernels.converted == [] and "CPU" in engine.sparse_kernels.reason
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_cli_wanda_masks_follow_transformers_activation_norms(tiny_dir, calib_file, tmp_path) -> None:
    """The folder's 2:4 wanda masks equal masks scored with float64 norms of transformers' own projection inputs
    on the same calibration tokens (each projection paired with its own input: a mix-up would differ in about
    half of the groups; float32 against float64 norms may flip a near-tie or two)."""
    from trident.loader import load_checkpoint
    from trident.quant.calibrate import calibration_tokens
    from trident.quant.gptq_config import CalibrationConfig

    out = tmp_path / "wanda24"
    _prune(tiny_dir, out, "--structure", "2:4", "--method", "wanda", "--calib", str(calib_file), "--calib-samples",
           "4", "--calib-seq-len", "32")
    from trident.loader.info import model_info

    described = model_info(load_checkpoint(str(out))).sparsity  # `trident info`'s row
    assert described.startswith("2:4 masks (wanda): 50% of the decoder")
    tokens = calibration_tokens(load_checkpoint(str(tiny_dir)).tokenizer,
                                CalibrationConfig(str(calib_file), samples=4, seq_len=32)).token_ids
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64).eval()
    squares: dict[str, torch.Tensor] = {}

    def hook(name):
        def add(_module, args):
            squares[name] = squares.get(name, 0) + args[0].reshape(-1, args[0].shape[-1]).square().sum(0)
        return add

    for name, module in hf.named_modules():
        if any(name.endswith(p) for p in PROJECTIONS):
            module.register_forward_pre_hook(hook(name))
    with torch.no_grad():
        for row in tokens:  # each sequence on its own, from position 0
            hf(row[None])
    masked = load_file(out / "model.safetensors")
    groups = flips = 0
    for name, total in squares.items():
        weight = hf.get_parameter(f"{name}.weight")
        expected = two_four_mask(weight.abs() * total.sqrt()[None, :])
        got = masked[f"{name}.weight"] != 0
        groups += expected.numel() // 4
        flips += int((got != expected).view(-1, 4).any(-1).sum())
    assert len(squares) == 2 * 7 and flips <= groups // 1000


def test_sparse_kernel_reasons_off_cuda() -> None:
    model = torch.nn.Module()
    for pattern, device, dtype, says in [(None, "cuda", torch.bfloat16, "not marked 2:4"),
                                         ("unstructured", "cuda", torch.bfloat16, "only 2:4"),
                                         ("2:4", "cpu", torch.bfloat16, "on the CPU"),
                                         ("2:4", "cuda", torch.float32, "bfloat16 or float16")]:
        report = install_sparse_kernels(model, pattern, torch.device(device), dtype)
        assert report.backend is None and report.converted == [] and says in report.reason


# ----- errors ------------------------------------------------------------------------------------------------------

def _cli_error(capsys, *args: str) -> str:
    assert main(["prune", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def test_cli_user_errors(tiny_dir, calib_file, tmp_path, capsys) -> None:
    model, out = str(tiny_dir), str(tmp_path / "out")
    assert "its sparsity is 0.5" in _cli_error(capsys, model, "--structure", "2:4", "--sparsity", "0.3", "--out", out)
    assert "strictly between 0 and 1" in _cli_error(capsys, model, "--structure", "unstructured", "--out", out)
    assert "strictly between 0 and 1" in _cli_error(capsys, model, "--structure", "unstructured", "--sparsity", "1",
                                                    "--out", out)
    assert "scores weights by l1, wanda; got 'taylor'" in _cli_error(capsys, model, "--structure", "2:4", "--method",
                                                                     "taylor", "--out", out)
    assert "drop --targets" in _cli_error(capsys, model, "--structure", "2:4", "--targets", "mlp", "--out", out)
    assert "add --calib TEXT" in _cli_error(capsys, model, "--structure", "2:4", "--method", "wanda", "--out", out)
    assert "drop --calib" in _cli_error(capsys, model, "--structure", "2:4", "--calib", str(calib_file), "--out", out)
    assert "structured pruning needs --sparsity" in _cli_error(capsys, model, "--out", out)
    assert not (tmp_path / "out").exists()
    with pytest.raises(TridentError, match="groups the input features by 4"):
        two_four_mask(torch.ones(2, 6, dtype=torch.float64))
    for entry, says in [("2:4", "must be an object"), ({"pattern": "3:8"}, "unknown sparsity pattern"),
                        ({"pattern": "unstructured"}, "strictly between 0 and 1")]:
        with pytest.raises(TridentError, match=says):
            read_sparsity({"trident_sparsity": entry})
