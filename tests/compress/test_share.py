"""Cross-layer weight sharing (trident/compress/share*.py, trident/models/shared_layers.py, `trident share`): a shared
folder gives in trident the logits transformers gives on its expanded copy; shared layers hold the very same tensors
in the loaded model (through dtype conversion, fused projections and runtime quantization); unique parameters equal
a hand count; the NLL and cosine criteria pick a pair built identical; the errors a user can cause."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import transformers
from byte_tokenizer import save_with_byte_tokenizer
from engine_logits import load_engine, prefill_logits

from trident.cli import main
from trident.compress.share import ShareConfig, parse_groups, tie_shared_layers, unique_tensors
from trident.compress.share_choice import choose_joins, cosine_cost, runs_of
from trident.errors import TridentError
from trident.models.shared_layers import SharedLayers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))

LAYERS = 4
SIZES = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=128)
CALIB = "".join(f"Line {i}: the keeper climbed the stair and trimmed the wick {i * 7 % 13} times.\n"
                for i in range(40))
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return save_with_byte_tokenizer(transformers.LlamaConfig(**SIZES), tmp_path_factory.mktemp("share-llama"), seed=11)


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory) -> Path:  # q/k norms (shared with --share-norms), q/k/v without bias
    return save_with_byte_tokenizer(transformers.Qwen3Config(**SIZES, head_dim=16),
                                    tmp_path_factory.mktemp("share-qwen3"), seed=12)


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("share-calib") / "calib.txt"
    path.write_text(CALIB, encoding="utf-8")
    return path


def _share(model: Path, out: Path, *args: str) -> dict:
    report = out.parent / f"{out.name}.json"
    assert main(["share", str(model), "--out", str(out), "--json", str(report), *args]) == 0
    return json.loads(report.read_text())


def _hf(path: Path, dtype=torch.float32):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


# ----- trident on the shared folder equals transformers on its expanded copy --------------------------------------

@pytest.mark.parametrize("family, args", [("llama", ("--groups", "1-2")),
                                          ("qwen3", ("--groups", "0-1,2-3", "--merge", "mean", "--share-norms"))])
def test_shared_folder_gives_the_expanded_folders_transformers_logits(family, args, llama_dir, qwen3_dir,
                                                                      tmp_path) -> None:
    source = llama_dir if family == "llama" else qwen3_dir
    record = _share(source, tmp_path / "shared", *args)
    assert main(["share", str(tmp_path / "shared"), "--expand", "--out", str(tmp_path / "expanded")]) == 0
    hf = _hf(tmp_path / "expanded")
    original = _hf(source, torch.float64)
    for first, last in record["groups"]:  # the expanded copy holds each group's weights in all its layers
        for layer in range(first, last + 1):
            for name in PROJECTIONS:
                module = "self_attn" if name[0] in "qkvo" else "mlp"
                got = getattr(getattr(hf.model.layers[layer], module), name).weight
                members = [getattr(getattr(original.model.layers[i], module), name).weight
                           for i in range(first, last + 1)]
                want = members[0] if record["merge"] == "first" else torch.stack(members).mean(0)
                torch.testing.assert_close(got.double(), want, atol=1e-7, rtol=0)
    tokens = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    with torch.no_grad():
        expected = hf(torch.tensor([tokens])).logits[0]
    got = prefill_logits(load_engine(tmp_path / "shared"), tokens)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


# ----- shared tensors are one storage in the loaded model ----------------------------------------------------------

def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return pa.keys() == pb.keys() and all(pa[k].data_ptr() == pb[k].data_ptr() for k in pa)


def test_loaded_shared_layers_hold_the_same_storage_and_count_once(llama_dir, tmp_path) -> None:
    record = _share(llama_dir, tmp_path / "shared", "--groups", "1-3")
    from trident.loader import load_checkpoint
    from trident.loader.info import model_info

    described = model_info(load_checkpoint(str(tmp_path / "shared"))).shared_layers  # `trident info`'s row
    assert described.startswith("2 layers") and "(2 -> 1, 3 -> 1)" in described
    hidden, inter, kv = SIZES["hidden_size"], SIZES["intermediate_size"], SIZES["num_key_value_heads"] * 8
    per_layer = hidden * hidden * 2 + 2 * hidden * kv + 3 * hidden * inter  # q, o, k, v, gate, up, down
    assert record["params_after"] == record["params_before"] - 2 * per_layer  # layers 2 and 3 lose theirs
    engine = load_engine(tmp_path / "shared")
    layers = engine.model.model.layers
    for paths in (("self_attn", "qkv_proj"), ("self_attn", "o_proj"), ("mlp", "gate_up_proj"), ("mlp", "down_proj")):
        source = layers[1].get_submodule(".".join(paths))
        assert all(_same(layers[i].get_submodule(".".join(paths)), source) for i in (2, 3))
        assert not _same(layers[0].get_submodule(".".join(paths)), source)
    assert layers[2].input_layernorm.weight.data_ptr() != layers[1].input_layernorm.weight.data_ptr()
    unique = sum(p.numel() for p in engine.model.parameters())
    assert unique == record["params_after"] == record["engine_params_after"]
    assert engine.memory_usage().weights_bytes == 4 * unique + engine.model.model.rotary.inv_freq.nbytes

    from trident.engine.sizing import weights_bytes
    from trident.quant.linear import num_weights

    assert num_weights(engine.model) == unique  # what `trident eval report` counts (its memory: memory_usage, above)
    assert weights_bytes(engine.model_config, torch.float32) == 4 * unique  # the serve pool's estimate

    bf16 = load_engine(tmp_path / "shared", "bfloat16")  # a dtype conversion still converts each tensor once
    assert bf16.model.model.layers[3].mlp.down_proj.weight.data_ptr() == \
        bf16.model.model.layers[1].mlp.down_proj.weight.data_ptr()
    assert bf16.model.model.layers[3].mlp.down_proj.weight.dtype == torch.bfloat16


def test_runtime_quantization_quantizes_a_shared_module_once(llama_dir, tmp_path) -> None:
    from trident.attention.torch_ref import TorchAttention
    from trident.bench.quantized_weights import quantize_checkpoint
    from trident.loader import load_checkpoint
    from trident.models.build import build_model
    from trident.quant.linear import QuantizedLinear, quantize_model
    from trident.quant.rtn import QuantConfig

    _share(llama_dir, tmp_path / "shared", "--groups", "2-3")
    config = QuantConfig(bits=8, group_size=None, symmetric=True)
    checkpoint = quantize_checkpoint(load_checkpoint(str(tmp_path / "shared")), config)  # bench --weights int8
    assert not any(n.startswith("model.layers.3.mlp") for n in checkpoint.quantization.modules)
    device = torch.device("cpu")
    for model in (build_model(checkpoint.config, checkpoint.tensors, dtype=torch.float32, device=device,
                              backend=TorchAttention(), quantization=checkpoint.quantization),
                  build_model(checkpoint.config, load_checkpoint(str(tmp_path / "shared")).tensors,
                              dtype=torch.float32, device=device, backend=TorchAttention())):
        if not isinstance(model.model.layers[2].mlp.down_proj, QuantizedLinear):
            quantize_model(model, config)  # trident quantize's path: replace_module keeps the sharing
        layers = model.model.layers
        assert layers[3].mlp.down_proj is layers[2].mlp.down_proj
        assert isinstance(layers[3].self_attn.qkv_proj, QuantizedLinear)
        assert layers[3].self_attn.qkv_proj.qweight.data_ptr() == layers[2].self_attn.qkv_proj.qweight.data_ptr()

    # trident quantize's folder keeps the sharing keys, lists the source layers' modules only and loads shared
    assert main(["quantize", str(tmp_path / "shared"), "--bits", "8", "--out", str(tmp_path / "q8"),
                 "--json", str(tmp_path / "q8.json")]) == 0
    quantized = load_engine(tmp_path / "q8").model.model.layers
    assert quantized[3].mlp.gate_up_proj is quantized[2].mlp.gate_up_proj
    assert isinstance(quantized[3].mlp.gate_up_proj, QuantizedLinear)


# ----- choosing the groups -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def twin_dir(tmp_path_factory) -> Path:
    """A tiny Llama whose layer 2 is a copy of layer 1 (every tensor), so sharing 1-2 changes nothing."""
    path = save_with_byte_tokenizer(transformers.LlamaConfig(**SIZES), tmp_path_factory.mktemp("share-twin"), seed=13)
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    for name in [n for n in tensors if n.startswith("model.layers.1.")]:
        tensors[name.replace("layers.1.", "layers.2.")] = tensors[name].clone()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


def test_nll_and_cosine_criteria_share_the_identical_pair_first(twin_dir) -> None:
    from trident.compress.eval import PerplexityConfig, perplexity
    from trident.compress.share_choice import nll_cost
    from trident.engine.request import SamplingParams
    from trident.loader import load_checkpoint

    # tokens sampled from the model itself: the model is then the best one for them in expectation, so any change
    # raises their NLL, except sharing the identical pair, which changes nothing
    engine = load_engine(twin_dir)
    for seed in range(3):
        engine.add_request([1], SamplingParams(temperature=1.0, max_tokens=127, ignore_eos=True, seed=seed))
    samples = []
    while engine.has_unfinished():
        samples += [(o.request_id, o.outputs[0].token_ids) for o in engine.step(only_finished=True)]
    ids = [t for _, tokens in sorted(samples) for t in [1, *tokens]]  # three sequences of 128: the three windows
    assert len(ids) == 384
    cost = nll_cost(lambda: perplexity(engine, ids, PerplexityConfig(window=128)).nll, engine.model,
                    ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"), "first")
    choice = choose_joins(LAYERS, 1, cost)
    assert choice.joins[0].layer == 2 and choice.alone[2] == 0.0
    assert choice.alone[1] > 0 and choice.alone[3] > 0

    cos = choose_joins(LAYERS, 1, cosine_cost(load_checkpoint(str(twin_dir)).tensors, "first"))
    assert cos.joins[0].layer == 2 and cos.alone[2] == pytest.approx(0.0, abs=1e-12)
    assert min(cos.alone[1], cos.alone[3]) > 0.5  # independent random layers are far from parallel


def test_cli_auto_costs_add_up_to_the_written_models_nll_rise(twin_dir, calib_file, tmp_path) -> None:
    record = _share(twin_dir, tmp_path / "nll", "--groups", "auto", "--num-shared", "2", "--calib", str(calib_file),
                    "--calib-tokens", "256")
    choice = record["choice"]
    assert choice["alone"]["2"] == 0.0 and [j["layer"] for j in choice["joins"]].count(2) == 1
    assert record["num_shared"] == 2 and choice["calibration"].endswith("slice all, 256 tokens")
    from trident.compress.eval import PerplexityConfig, perplexity
    from trident.compress.texts import encode_first

    before, after = load_engine(twin_dir), load_engine(tmp_path / "nll")
    ids = encode_first(before.tokenizer, CALIB, 256)
    config = PerplexityConfig(window=128)
    rise = perplexity(after, ids, config).nll - perplexity(before, ids, config).nll
    assert rise == pytest.approx(sum(j["cost"] for j in choice["joins"]), abs=1e-9)


def test_greedy_picks_known_costs_and_runs() -> None:
    costs = {1: 5.0, 2: 1.0, 3: 2.0, 4: 9.0}  # additive costs: the greedy takes 2, then 3 (a run 1-3), then 1
    choice = choose_joins(5, 3, lambda joined, t: costs[t])
    assert [j.layer for j in choice.joins] == [2, 3, 1] and choice.groups == ((0, 3),)
    assert runs_of({2, 4}) == ((1, 2), (3, 4)) and runs_of({1, 2, 4}) == ((0, 2), (3, 4))


# ----- transformers helpers for a shared student -------------------------------------------------------------------

def test_tie_shared_layers_and_unique_tensors_round_trip(llama_dir, tmp_path) -> None:
    _share(llama_dir, tmp_path / "shared", "--groups", "0-1")
    assert main(["share", str(tmp_path / "shared"), "--expand", "--out", str(tmp_path / "expanded")]) == 0
    hf = _hf(tmp_path / "expanded")
    from trident.loader import load_checkpoint

    shared = load_checkpoint(str(tmp_path / "shared"))
    tie_shared_layers(hf, shared.config.shared_layers)
    assert hf.model.layers[1].mlp.up_proj.weight is hf.model.layers[0].mlp.up_proj.weight
    assert hf.model.layers[1].post_attention_layernorm.weight is not hf.model.layers[0].post_attention_layernorm.weight
    assert sum(p.numel() for p in hf.parameters()) == sum(t.numel() for t in shared.tensors.values())
    unique = unique_tensors(hf.state_dict(), shared.config.shared_layers)
    assert unique.keys() == shared.tensors.keys()
    assert all(torch.equal(unique[k], shared.tensors[k]) for k in unique)
    with torch.no_grad():
        hf.model.layers[1].mlp.up_proj.weight.add_(1.0)  # one tensor: the source changed with it
    assert torch.equal(hf.model.layers[0].mlp.up_proj.weight, shared.tensors["model.layers.0.mlp.up_proj.weight"] + 1)
    untied = _hf(tmp_path / "expanded")
    with torch.no_grad():
        untied.model.layers[1].mlp.up_proj.weight.add_(1.0)
    with pytest.raises(TridentError, match="not shared as declared"):
        unique_tensors(untied.state_dict(), shared.config.shared_layers)


# ----- errors a user can cause -------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("1-2,2-3", "overlaps 1-2"), ("2-4", "out of range"), ("3-3", "not a run"), ("3-1", "not a run"),
    ("1,3", "cannot read '1'"), ("", "empty")])
def test_bad_groups_are_refused(text: str, message: str) -> None:
    with pytest.raises(TridentError, match=message):
        parse_groups(text, LAYERS)


def test_bad_configs_and_cli_errors(llama_dir, tmp_path, capsys) -> None:
    with pytest.raises(TridentError, match="not shared itself"):
        SharedLayers.of({2: 1, 1: 0}, ("self_attn.o_proj",))
    with pytest.raises(TridentError, match="shared together"):
        SharedLayers.of({2: 1}, ("self_attn.q_proj", "self_attn.k_proj"))
    with pytest.raises(TridentError, match="overlaps"):
        ShareConfig(groups=((0, 2), (2, 3)))
    config = json.loads((llama_dir / "config.json").read_text())
    from trident.config import ModelConfig

    with pytest.raises(TridentError, match="names layer 7"):
        ModelConfig.from_hf_dict({**config, "trident_shared_layers": {"7": 1}})

    def error(*args: str) -> str:
        assert main(["share", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err
        return err

    model, out = str(llama_dir), str(tmp_path / "out")
    assert "overlaps" in error(model, "--groups", "0-1,1-2", "--out", out)
    assert "out of range" in error(model, "--groups", "2-9", "--out", out)
    assert "needs --num-shared" in error(model, "--groups", "auto", "--out", out)
    assert "add --calib" in error(model, "--groups", "auto", "--num-shared", "1", "--out", out)
    assert "between 1 and 3" in error(model, "--groups", "auto", "--num-shared", "4", "--criterion", "cosine",
                                      "--out", out)
    assert "shares no layers" in error(model, "--expand", "--out", out)

    _share(llama_dir, tmp_path / "shared", "--groups", "0-1")
    assert "cannot each get their own" in error_of(["quantize", str(tmp_path / "shared"), "--bits", "8", "--method",
                                                   "smoothquant", "--calib", str(llama_dir / "config.json"),
                                                   "--out", str(tmp_path / "sq")], capsys)


def error_of(argv: list[str], capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    return capsys.readouterr().err
