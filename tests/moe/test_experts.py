"""The torch experts backend against a float64 computation token by token, touching only the experts a token was
routed to; the MoE block with a gated shared expert; per-expert checkpoint names loading into the fused tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trident.errors import TridentError
from trident.models.weights import load_weights
from trident.moe.block import SparseMoeBlock
from trident.moe.config import MoeConfig, RouterConfig
from trident.moe.experts import FusedExperts, TorchExperts, create_experts_backend, expert_packing
from trident.moe.router import route

E, H, I, K, T = 8, 64, 32, 2, 40


def _expert_weights(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(E, 2 * I, H, generator=gen) * 0.2, torch.randn(E, H, I, generator=gen) * 0.2


def _reference(hidden, weights, ids, gate_up, down) -> torch.Tensor:
    """out[t] = sum_j w[t, j] * down_e(silu(gate_e x) * up_e x), in float64, one token at a time."""
    out = torch.zeros(hidden.shape, dtype=torch.float64)
    for t in range(hidden.shape[0]):
        x = hidden[t].double()
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            g, u = (gate_up[e].double() @ x).split(I)
            out[t] += float(weights[t, j]) * (down[e].double() @ (F.silu(g) * u))
    return out


def test_torch_experts_equal_float64_reference_and_read_only_routed_experts() -> None:
    gen = torch.Generator().manual_seed(0)
    gate_up, down = _expert_weights(gen)
    hidden = torch.randn(T, H, generator=gen)
    routing = route(torch.randn(T, E, generator=gen) - torch.arange(E) * 0.5, RouterConfig(num_experts=E, top_k=K))
    unused = sorted(set(range(E)) - set(routing.expert_ids.flatten().tolist()))
    assert unused, "the logits' bias towards low ids should leave some experts idle"
    gate_up[unused] = float("nan")  # an expert nobody was routed to must not be read
    down[unused] = float("nan")
    out = TorchExperts().forward(hidden, routing.weights, routing.expert_ids, gate_up, down, "silu")
    ref = _reference(hidden, routing.weights, routing.expert_ids, gate_up, down)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_torch_experts_bfloat16_close_to_reference() -> None:
    gen = torch.Generator().manual_seed(1)
    gate_up, down = _expert_weights(gen)
    hidden = torch.randn(T, H, generator=gen)
    routing = route(torch.randn(T, E, generator=gen), RouterConfig(num_experts=E, top_k=K))
    out = TorchExperts().forward(hidden.bfloat16(), routing.weights, routing.expert_ids, gate_up.bfloat16(),
                                 down.bfloat16(), "silu")
    ref = _reference(hidden, routing.weights, routing.expert_ids, gate_up, down)
    assert out.dtype == torch.bfloat16
    assert (out.double() - ref).abs().max() < 0.03 * ref.abs().max()


def test_moe_block_with_gated_shared_expert() -> None:
    gen = torch.Generator().manual_seed(2)
    moe = MoeConfig(router=RouterConfig(num_experts=E, top_k=K, renormalize=False), moe_intermediate_size=I,
                    sparse_layers=(0,), shared_expert_intermediate_size=48, shared_expert_gate=True)
    block = SparseMoeBlock(H, "silu", moe, 0, TorchExperts(), stats=None)
    for p in block.parameters():
        p.data = torch.randn(p.shape, generator=gen) * 0.2
    hidden = torch.randn(T, H, generator=gen)
    out = block(hidden)
    routing = route(hidden @ block.gate.weight.t(), moe.router)
    expected = _reference(hidden, routing.weights, routing.expert_ids, block.experts.gate_up_proj,
                          block.experts.down_proj)
    g, u = (hidden.double() @ block.shared_expert.gate_up_proj.weight.double().t()).split(48, dim=-1)
    shared = (F.silu(g) * u) @ block.shared_expert.down_proj.weight.double().t()
    expected += torch.sigmoid(hidden.double() @ block.shared_expert_gate.weight.double().t()) * shared
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("names", [("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj")])
def test_per_expert_checkpoint_names_fill_fused_tensors(names) -> None:
    gen = torch.Generator().manual_seed(3)
    gate_up, down = _expert_weights(gen)
    gate, up, dn = names
    tensors = {}
    for e in range(E):
        tensors[f"layer.experts.{e}.{gate}.weight"] = gate_up[e, :I]
        tensors[f"layer.experts.{e}.{up}.weight"] = gate_up[e, I:]
        tensors[f"layer.experts.{e}.{dn}.weight"] = down[e]
    holder = torch.nn.Module()
    with torch.device("meta"):
        holder.layer = torch.nn.Module()
        holder.layer.experts = FusedExperts(E, H, I, "silu", TorchExperts())
    load_weights(holder, tensors, {}, dtype=torch.float32, device=torch.device("cpu"),
                 expert_modules=expert_packing(gate, up, dn, I, H))
    assert torch.equal(holder.layer.experts.gate_up_proj, gate_up)
    assert torch.equal(holder.layer.experts.down_proj, down)
    del tensors[f"layer.experts.5.{up}.weight"]
    with torch.device("meta"):
        holder.layer.experts = FusedExperts(E, H, I, "silu", TorchExperts())
    with pytest.raises(TridentError, match="missing"):
        load_weights(holder, tensors, {}, dtype=torch.float32, device=torch.device("cpu"),
                     expert_modules=expert_packing(gate, up, dn, I, H))


def test_unknown_experts_backend_is_a_user_error() -> None:
    with pytest.raises(TridentError, match="torch"):
        create_experts_backend("cutlass")
    assert isinstance(create_experts_backend("torch"), TorchExperts)


def test_float32_router_keeps_its_weights_in_float32() -> None:
    """DeepSeek's router (MoeConfig.router_float32) stays in float32 in a bfloat16 model, and computes its logits from
    float32 hidden states, as transformers keeps it."""
    from trident.moe.router import Router

    gen = torch.Generator().manual_seed(4)
    config = RouterConfig(num_experts=E, top_k=K, scoring="sigmoid", score_correction_bias=True)
    holder = torch.nn.Module()
    with torch.device("meta"):
        holder.mlp = torch.nn.Module()
        holder.mlp.gate = Router(H, config, float32=True)
        holder.mlp.gate_up_proj = torch.nn.Linear(H, 2 * I, bias=False)
    tensors = {"mlp.gate.weight": torch.randn(E, H, generator=gen), "mlp.gate_up_proj.weight": torch.randn(2 * I, H),
               "mlp.gate.e_score_correction_bias": torch.randn(E, generator=gen)}
    load_weights(holder, tensors, {}, dtype=torch.bfloat16, device=torch.device("cpu"),
                 float32_suffixes=(".gate.weight", ".gate.e_score_correction_bias"))
    assert holder.mlp.gate.weight.dtype == holder.mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert holder.mlp.gate_up_proj.weight.dtype == torch.bfloat16
    assert torch.equal(holder.mlp.gate.weight, tensors["mlp.gate.weight"])
    hidden = torch.randn(T, H, generator=gen).bfloat16()
    routing = holder.mlp.gate(hidden)
    bias = tensors["mlp.gate.e_score_correction_bias"]
    expected = route(hidden.double() @ tensors["mlp.gate.weight"].double().t(), config, bias.double())
    assert torch.equal(routing.expert_ids, expected.expert_ids)
    torch.testing.assert_close(routing.weights, expected.weights.float(), rtol=1e-5, atol=1e-6)
