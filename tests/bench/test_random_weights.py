"""Random-weight checkpoints: deterministic from the seed, on the asked device and dtype, scaled as
documented, and the very same weights in trident and in transformers (their log-probabilities agree
to 1e-4 in float32)."""

from __future__ import annotations

import pytest
import torch
from tiny_shapes import TINY_SHAPES

from trident.bench.peers import load_hf_same_weights
from trident.bench.random_weights import WEIGHT_STD, random_checkpoint
from trident.bench.shapes import Shape
from trident.engine.engine import LLMEngine
from trident.engine.llm import engine_config
from trident.engine.request import SamplingParams

TOLERANCE = 1e-4


def _shape(name: str) -> Shape:
    return Shape(name, dict(TINY_SHAPES[name]), "test")


def test_same_seed_same_tensors_other_seed_others() -> None:
    a = random_checkpoint(_shape("qwen3-tied"), device="cpu", dtype=torch.bfloat16, seed=1)
    b = random_checkpoint(_shape("qwen3-tied"), device="cpu", dtype=torch.bfloat16, seed=1)
    c = random_checkpoint(_shape("qwen3-tied"), device="cpu", dtype=torch.bfloat16, seed=2)
    assert list(a.tensors) == list(b.tensors)
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    q = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(a.tensors[q], c.tensors[q])
    assert all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in a.tensors.values())
    assert a.tokenizer is None and a.config.hidden_size == 64


def test_matrices_are_small_normals_and_norms_unit() -> None:
    ckpt = random_checkpoint(_shape("qwen2-bias"), device="cpu", dtype=torch.float32, seed=0)
    embed = ckpt.tensors["model.embed_tokens.weight"]
    assert abs(embed.std().item() - WEIGHT_STD) < 1e-3 and abs(embed.mean().item()) < 1e-3
    assert ckpt.tensors["model.layers.0.self_attn.q_proj.bias"].abs().max() > 0  # Qwen2's biases are there
    norms = [k for k in ckpt.tensors if "norm" in k]
    assert norms and all(bool((ckpt.tensors[k] == 1).all()) for k in norms)


@pytest.mark.parametrize("name", list(TINY_SHAPES))
def test_trident_and_transformers_run_the_same_weights(name: str) -> None:
    check_same_weights(name, torch.device("cpu"))


def check_same_weights(name: str, device: torch.device) -> None:
    """Greedy tokens and the top-20 log-probabilities of every step, from trident's engine, against
    transformers' full forward over the same tokens (float32)."""
    ckpt = random_checkpoint(_shape(name), device=device, dtype=torch.float32, seed=3)
    hf = load_hf_same_weights(ckpt, torch.float32, device)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert hf.state_dict()[q].data_ptr() == ckpt.tensors[q].data_ptr()  # the same memory, not a copy
    engine = LLMEngine(engine_config(None, device=device.type, dtype="float32", block_size=4), ckpt)
    prompt = [(7 * i + 3) % 10000 for i in range(11)]
    engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=20))
    while engine.has_unfinished():
        for out in engine.step():
            completion = out.outputs[0]
    tokens = list(completion.token_ids)
    with torch.inference_mode():
        logits = hf(torch.tensor([prompt + tokens], device=device)).logits[0].float()
    reference = torch.log_softmax(logits, dim=-1)[len(prompt) - 1: len(prompt) - 1 + len(tokens)]
    assert tokens == reference.argmax(-1).tolist()
    for step, sampled in enumerate(completion.logprobs):
        ids = [i for i, _ in sampled.top_logprobs]
        ours = torch.tensor([lp for _, lp in sampled.top_logprobs])
        assert len(ids) == 20
        assert torch.allclose(ours, reference[step, ids].cpu(), atol=TOLERANCE, rtol=0)
