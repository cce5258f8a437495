"""Roofline arithmetic against hand computations, and against TARGETS.md's figures for its workloads."""

from __future__ import annotations

import math

import pytest
import torch

from trident.attention.torch_ref import TorchAttention
from trident.bench.roofline import (
    copy_bandwidth,
    decode_roofline,
    decode_weight_bytes,
    expected_active_experts,
    kv_read_bytes,
    routed_expert_bytes,
)
from trident.bench.shapes import resolve_shape
from trident.bench.workloads import nano_workload
from trident.config import ModelConfig
from trident.models.registry import model_class

# hidden 8, intermediate 12, 2 layers, 2 heads / 1 KV head of 4 dims, vocabulary 20
TINY = dict(model_type="llama", vocab_size=20, hidden_size=8, intermediate_size=12, num_layers=2, num_heads=2,
            num_kv_heads=1, head_dim=4, max_position_embeddings=64)
# per layer: q 8x8 + k 8x4 + v 8x4 + o 8x8 = 192, gate/up/down 3 x 8x12 = 288, two norms 16 -> 496
# model: 2 x 496 + final norm 8 + LM head 20x8 = 1160 parameters read per step (the embedding table is not)
TINY_READ_PARAMS = 1160


def _meta_model(config: ModelConfig) -> torch.nn.Module:
    with torch.device("meta"):
        return model_class(config.model_type)(config, TorchAttention()).to(torch.bfloat16)


@pytest.mark.parametrize("tied", [False, True])
def test_weight_bytes_per_step_by_hand(tied: bool) -> None:
    config = ModelConfig(**TINY, tie_word_embeddings=tied)  # tied: the table is the LM head, read once
    model = _meta_model(config)
    assert decode_weight_bytes(model.named_parameters(), tied) == TINY_READ_PARAMS * 2


def test_kv_reads_and_roofline_by_hand() -> None:
    config = ModelConfig(**TINY)
    # bf16 KV: 2 (K and V) x 1 head x 4 dims x 2 bytes = 16 bytes per token per layer, 32 over both layers.
    # Prompts 3 and 5, outputs 2 and 4: contexts 3 + 4 and 5 + 6 + 7 + 8 -> 33 token reads.
    assert kv_read_bytes(config, (3, 5), (2, 4), 2) == (33 * 32, 33)
    r = decode_roofline(config, weight_bytes=2320, kv_element_bytes=2, prompt_lens=(3, 5), output_lens=(2, 4),
                        bandwidth_bytes_s=1e6)
    assert r.steps == 4 and r.total_bytes == 4 * 2320 + 1056
    assert r.tok_s == pytest.approx(6 / (10336 / 1e6))
    assert r.mean_batch == 1.5 and r.mean_context == 5.5


def test_sliding_window_layers_read_at_most_the_window() -> None:
    config = ModelConfig(**TINY, layer_types=("sliding_attention", "full_attention"), sliding_window=4)
    # window layer: contexts 3, 4 and 4, 4, 4, 4 -> 23; full layer: 33; 16 bytes per token per layer
    assert kv_read_bytes(config, (3, 5), (2, 4), 2) == (23 * 16 + 33 * 16, 33)


def test_targets_figures() -> None:
    """TARGETS.md: Llama-3-8B has 16.06 GB of bf16 weights (ours per step leaves out the 1.05 GB embedding
    table); the nano workload on Qwen3-0.6B at 4.3 TB/s with a bf16 KV cache is ~36,000 tok/s."""
    llama = ModelConfig.from_hf_dict(resolve_shape("llama3-8b").hf_config)
    per_step = decode_weight_bytes(_meta_model(llama).named_parameters(), False)
    embedding = llama.vocab_size * llama.hidden_size * 2
    assert round((per_step + embedding) / 1e9, 2) == 16.06
    qwen = ModelConfig.from_hf_dict(resolve_shape("qwen3-0.6b").hf_config)
    nano = nano_workload()
    bound = decode_roofline(qwen, decode_weight_bytes(_meta_model(qwen).named_parameters(), True), 2,
                            nano.prompt_lens, nano.output_lens, 4.3e12)
    assert bound.steps == 1024 and bound.output_tokens == 133_966
    assert 36_000 * 0.9 < bound.tok_s < 36_000 * 1.1


def test_copy_bandwidth_is_a_plausible_rate() -> None:
    rate = copy_bandwidth("cpu", nbytes=16 << 20, repeats=2)
    assert math.isfinite(rate) and 1e8 < rate < 1e13


def test_moe_steps_read_the_expected_share_of_experts_by_hand() -> None:
    """qwen3-moe-tiny (128 experts, top-8): 4 sparse layers of experts [128, 2 x 64, 256] + [128, 256, 64], i.e.
    128 x 49152 weights each. Outputs of 1 and 3 tokens: steps of batch 2, 1, 1; uniform routing reads 8 of 128
    experts at batch 1 and 128 (1 - (15/16)^2) = 15.5 at batch 2."""
    config = ModelConfig.from_hf_dict(resolve_shape("qwen3-moe-tiny").hf_config)
    model = _meta_model(config)
    experts = routed_expert_bytes(model.named_parameters())
    assert experts == 4 * 128 * 49152 * 2
    assert expected_active_experts(128, 8, 1) == pytest.approx(8.0)
    assert expected_active_experts(128, 8, 2) == pytest.approx(15.5)
    total = decode_weight_bytes(model.named_parameters(), True)
    dense = total - experts
    per_expert = experts / 128
    r = decode_roofline(config, total, 2, (3, 5), (1, 3), 1e9, expert_bytes=experts)
    assert r.steps == 3 and r.expert_bytes == experts
    assert r.weight_read_bytes == pytest.approx(3 * dense + (15.5 + 8 + 8) * per_expert)
    assert r.total_bytes == pytest.approx(r.weight_read_bytes + r.kv_read_bytes)
    dense_bound = decode_roofline(config, total, 2, (3, 5), (1, 3), 1e9)  # experts counted whole: the old bound
    assert dense_bound.weight_read_bytes == 3 * total > r.weight_read_bytes


def test_qwen3_30b_a3b_batch_1_reads_its_active_weights() -> None:
    """TARGETS.md: Qwen3-30B-A3B (61 GB of bf16 weights) reads ~6 GB per token at batch 1 (8 of 128 experts per
    layer): a roofline of ~700 tok/s at 4.3 TB/s, before the KV reads."""
    config = ModelConfig.from_hf_dict(resolve_shape("qwen3-30b-a3b").hf_config)
    model = _meta_model(config)
    total = decode_weight_bytes(model.named_parameters(), False)
    experts = routed_expert_bytes(model.named_parameters())
    assert round((total + config.vocab_size * config.hidden_size * 2) / 1e9) == 61
    r = decode_roofline(config, total, 2, (1,), (1000,), 4.3e12, expert_bytes=experts)
    assert 5.8e9 < r.weight_bytes_per_step < 6.2e9
    assert 650 < 4.3e12 / r.weight_bytes_per_step < 750
