"""What the tensor-parallel tests run: tiny models with random weights, the same steps on every rank, and the
function each spawned rank runs (:func:`run_rank`). The parent process runs the same models unsplit (TP=1) as the
reference."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator

import torch

from trident.bench.quantized_weights import quantize_checkpoint
from trident.bench.random_weights import weight_specs
from trident.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from trident.distributed.experts import ExpertParallelExperts
from trident.engine.engine import LLMEngine
from trident.engine.plan import ScheduledChunk, StepPlan
from trident.engine.request import SamplingParams
from trident.errors import TridentError
from trident.loader.checkpoint import Checkpoint
from trident.moe.block import SparseMoeBlock
from trident.native.build import DISABLE_ENV
from trident.quant.rtn import QuantConfig

SIZE = 2
"""Ranks of the spawned group."""
ATOL = 1e-5
"""float32: the split sums differ from the whole ones in rounding only (about 1e-6 here)."""

_COMMON = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "vocab_size": 101, "max_position_embeddings": 256, "eos_token_id": 0}

SHAPES: dict[str, dict] = {
    # grouped-query attention, an odd vocabulary (the last rank's slice is padded), biases on the fused projections
    # (split with them) and on down_proj (added once after the all-reduce), an untied LM head
    "llama-gqa-bias": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **_COMMON,
                       "attention_bias": True, "mlp_bias": True, "tie_word_embeddings": False},
    # per-head q/k norms, tied embeddings (the vocabulary-parallel table is also the LM head)
    "qwen3-tied": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", **_COMMON, "head_dim": 16,
                   "vocab_size": 100, "tie_word_embeddings": True},
    # Gemma 2: (1 + w) norms around attention and MLP, soft-capped attention and logits, sliding layers
    "gemma2": {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", **_COMMON, "head_dim": 16,
               "sliding_window": 6, "query_pre_attn_scalar": 16, "attn_logit_softcapping": 50.0,
               "final_logit_softcapping": 30.0},
    # one kv head for four query heads: replicated on both ranks
    "llama-mqa": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **_COMMON, "num_key_value_heads": 1,
                  "tie_word_embeddings": True},
    # SmolLM2-135M's heads (9, 3 kv heads): they split unevenly, rank 0 one kv head and 3 query heads, rank 1 two
    # and 6
    "llama-uneven-heads": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **_COMMON, "hidden_size": 72,
                           "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": True},
    # routed experts, a gated shared expert and a dense first layer: routed + shared reduced once
    "qwen2-moe-shared": {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", **_COMMON,
                         "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                         "shared_expert_intermediate_size": 48, "mlp_only_layers": [0], "tie_word_embeddings": False},
    "mixtral": {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", **_COMMON, "num_local_experts": 4,
                "num_experts_per_tok": 2, "sliding_window": 7, "tie_word_embeddings": False},
}
"""Hugging Face config dicts of the models split over two ranks."""

_WIDE = {"hidden_size": 128, "intermediate_size": 128}
"""Sizes whose row-parallel input features (o_proj's 64 of 128, down_proj's 64 of 128 per rank) hold whole groups of
32."""

QUANTIZED: dict[str, tuple[dict, QuantConfig]] = {
    # weight-only int8 per channel and int4 in groups of 32 of the GQA Llama with biases (those of the column-parallel
    # projections kept with their rows, down_proj's added once after the all-reduce)
    "int8/llama-gqa-bias": ({**SHAPES["llama-gqa-bias"], **_WIDE}, QuantConfig(bits=8)),
    "int4-g32/llama-gqa-bias": ({**SHAPES["llama-gqa-bias"], **_WIDE}, QuantConfig(bits=4, group_size=32)),
    # Qwen2-MoE with int8 routed experts (per channel) and int4 ones (groups of 32: 32 intermediate features of 64 per
    # rank), its attention, dense MLP, shared expert and shared expert gate quantized alike
    "int8/qwen2-moe-shared": ({**SHAPES["qwen2-moe-shared"], **_WIDE, "moe_intermediate_size": 64,
                               "shared_expert_intermediate_size": 128}, QuantConfig(bits=8)),
    "int4-g32/qwen2-moe-shared": ({**SHAPES["qwen2-moe-shared"], **_WIDE, "moe_intermediate_size": 64,
                                   "shared_expert_intermediate_size": 128}, QuantConfig(bits=4, group_size=32)),
}
"""Quantized models split over two ranks (:func:`quantized_checkpoint`: the whole model quantized, as `bench
--weights` quantizes it, before the engine splits it)."""

EP_SHAPES = ("qwen2-moe-shared", "mixtral")
"""Shapes also split with expert parallelism (two whole experts of four per rank; the shared expert, attention and
vocabulary split as without it)."""

QUANTIZED_EP = ("int8/qwen2-moe-shared", "int4-g32/qwen2-moe-shared")
"""Quantized models also split with expert parallelism (whole quantized experts)."""

BAD_EXPERTS = {**SHAPES["mixtral"], "num_local_experts": 3}
"""Three experts: they do not split over two ranks with expert parallelism (their features would)."""

BAD_HEADS = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **_COMMON, "hidden_size": 48,
             "num_attention_heads": 3, "num_key_value_heads": 1}
"""Three heads reading one kv head: two ranks would each need one and a half of them."""

ASYNC_SHAPES = ("llama-gqa-bias", "qwen2-moe-shared")
"""Shapes whose engine test runs with asynchronous scheduling (pending tokens read from the broadcast samples)."""

BLOCK_SIZE = 4
PROMPTS = ([5, 17, 3, 99, 42, 8, 23, 61, 12, 7, 30], [9, 4, 88], [11, 22, 33, 44, 55, 66])
"""Token ids of the engine test's prompts (a long one is prefilled in chunks of the step budget)."""
MAX_TOKENS = 10


def checkpoint(hf_config: dict, seed: int = 0, std: float = 0.1) -> Checkpoint:
    """Random weights of ``hf_config``'s model, the same for the same seed in every process (matrices ~ N(0, std),
    wider than the usual initialisation so that logits are far apart; norms around 1)."""
    config = ModelConfig.from_hf_dict(hf_config)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (dims, fill) in weight_specs(config).items():
        tensor = torch.randn(dims, generator=generator) * std
        tensors[name] = tensor if fill is None else tensor + fill
    return Checkpoint(config=config, tensors=tensors, tensor_types=dict.fromkeys(tensors, "F32"), tokenizer=None,
                      format="random", path="random", file_bytes=0, hf_config=hf_config)


def quantized_checkpoint(name: str) -> Checkpoint:
    """The random weights of :data:`QUANTIZED` model ``name``, quantized as `bench --weights` quantizes them (every
    decoder-layer Linear, and the routed experts, by trident/bench/quantized_weights.py)."""
    hf_config, quant = QUANTIZED[name]
    return quantize_checkpoint(checkpoint(hf_config), quant)


@contextlib.contextmanager
def torch_products(name: str) -> Iterator[None]:
    """Within it, a :data:`QUANTIZED` model ``name`` (``ep/`` or not) multiplies on torch's paths (the native
    library off, TRIDENT_NO_NATIVE=1): the native CPU kernel quantizes its activations per block, and that rounding
    turns the split's float32 reorderings (1e-7) into logits 1e-4 apart. Its products of sliced layers are compared
    on identical inputs in test_quantized_split.py."""
    if name.removeprefix("ep/") not in QUANTIZED:
        yield
        return
    before = os.environ.get(DISABLE_ENV)
    os.environ[DISABLE_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[DISABLE_ENV]
        else:
            os.environ[DISABLE_ENV] = before


def shape_checkpoint(name: str) -> Checkpoint:
    """The weights of a :data:`SHAPES` or :data:`QUANTIZED` model."""
    return quantized_checkpoint(name) if name in QUANTIZED else checkpoint(SHAPES[name])


def engine_config(async_scheduling: bool = False) -> EngineConfig:
    """A small float32 CPU engine, one thread (two ranks share the two cores of CI), steps of at most 8 tokens."""
    return EngineConfig(model="", device="cpu", dtype="float32", num_threads=1, max_model_len=64,
                        cache=CacheConfig(block_size=BLOCK_SIZE, num_blocks=48, enable_prefix_caching=False),
                        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8),
                        async_scheduling=async_scheduling)


def step_plans() -> list[StepPlan]:
    """A prefill of two prompts (one crossing blocks), then decodes of both with a third prompt's prefill beside
    them, then decodes of all three: fixed token ids, so every process runs the very same steps."""
    greedy = SamplingParams(temperature=0.0)

    def chunk(seq: int, tokens: tuple[int, ...], start: int, blocks: tuple[int, ...]) -> ScheduledChunk:
        return ScheduledChunk(seq_id=seq, token_ids=tokens, start_pos=start, block_table=blocks, sample=True,
                              params=greedy)

    a, b, c = (0, 1, 2, 3), (4, 5, 8), (6, 7)
    plans = [StepPlan((chunk(0, (3, 14, 15, 92, 65, 35, 89, 79, 32), 0, a), chunk(1, (2, 71, 82, 81, 82), 0, b)))]
    plans.append(StepPlan((chunk(0, (38,), 9, a), chunk(1, (46,), 5, b), chunk(2, (26, 43, 38, 32, 79), 0, c))))
    for step, tokens in enumerate(((50, 28, 84), (19, 71, 69), (39, 93, 75))):
        plans.append(StepPlan((chunk(0, (tokens[0],), 10 + step, a), chunk(1, (tokens[1],), 6 + step, b),
                               chunk(2, (tokens[2],), 5 + step, c))))
    return plans


@torch.inference_mode()
def step_logits(engine: LLMEngine) -> list[torch.Tensor]:
    """The logits (float32, full vocabulary) of every :func:`step_plans` step, through the engine's runner and
    model on its KV cache."""
    runner = engine.runner
    out = []
    for plan in step_plans():
        ids, positions, meta, rows, _ = runner.prepare(plan)
        hidden = runner.model(ids, positions, runner.kv_caches, meta)
        out.append(runner.model.compute_logits(hidden[rows]).float())
    return out


def assert_ranks_logits_equal(ranks: list[dict], key: str, reference: list[torch.Tensor]) -> None:
    """Every rank's logits of the fixed steps (``ranks[r][key]``) equal ``reference`` (the unsplit engine's) within
    ATOL."""
    for rank, seen in enumerate(ranks):
        logits = seen[key]
        assert len(logits) == len(reference)
        for step, (got, want) in enumerate(zip(logits, reference)):
            assert got.shape == want.shape, (rank, step)
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=f"rank {rank}, step {step}")


def generate(engine: LLMEngine, max_tokens: int = MAX_TOKENS, logprobs: int | None = None) -> list[list]:
    """Greedy outputs of :data:`PROMPTS` (EOS ignored), all submitted at once: per prompt its token ids, or with
    ``logprobs`` its sampled tokens with their log-probabilities and that many alternatives."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=logprobs)
    ids = [engine.add_request(list(prompt), params) for prompt in PROMPTS]
    done = {}
    while len(done) < len(ids):
        for out in engine.step(only_finished=True):
            output = out.outputs[0]
            done[out.request_id] = list(output.token_ids if logprobs is None else output.logprobs)
    return [done[i] for i in ids]


def experts_seen(model) -> list[tuple[int, tuple[int, ...]]]:
    """For each MoE layer of ``model``, the model's id of its first expert here and the shape of its gate_up
    tensor (float weights or codes)."""
    seen = []
    for block in (m for m in model.modules() if isinstance(m, SparseMoeBlock)):
        experts, first = block.experts, 0
        if isinstance(experts, ExpertParallelExperts):
            experts, first = experts.experts, experts.first_expert
        gate_up = experts.gate_up_proj if hasattr(experts, "gate_up_proj") else experts.gate_up_qweight
        seen.append((first, tuple(gate_up.shape)))
    return seen


def _split_run(name: str, parallel, seen: dict) -> None:
    """One model (``name``: a :data:`SHAPES` or :data:`QUANTIZED` one, after ``ep/`` with expert parallelism) over
    ``parallel``'s ranks: the step logits, this rank's kv heads, block count and block bytes, its experts and their
    load after the steps (MoE models), and (rank 0) the engine's greedy tokens; into ``seen`` under ``name``/."""
    shape = name.removeprefix("ep/")
    ckpt = shape_checkpoint(shape)
    engine = LLMEngine(engine_config(), ckpt, parallel=parallel)
    seen[f"{name}/logits"] = step_logits(engine)
    seen[f"{name}/kv_heads"] = engine.runner.kv_caches[0].key.shape[0]
    seen[f"{name}/num_blocks"] = engine.num_blocks
    seen[f"{name}/kv_block_bytes"] = engine.kv_block_bytes
    experts = experts_seen(engine.model)
    if experts:
        seen[f"{name}/experts"] = experts
    if engine.moe_stats() is not None:
        seen[f"{name}/moe_stats"] = dataclasses.asdict(engine.moe_stats())  # plain types: torch.load's weights_only
        seen[f"{name}/moe_stats_whole"] = dataclasses.asdict(engine.model.load_stats.snapshot(whole=True))
    engine = LLMEngine(engine_config(async_scheduling=shape in ASYNC_SHAPES), ckpt, parallel=parallel)
    engine.runner.warm_up()  # what a CUDA engine runs at start-up on every rank, each by itself (no plans sent)
    if parallel.is_driver:
        try:
            seen[f"{name}/tokens"] = generate(engine)
        finally:
            engine.runner.stop_followers()
    else:
        engine.runner.follow()


def run_rank(rank: int, size: int, init_method: str, out_dir: str) -> None:
    """One spawned rank: every shape and quantized model split with tensor parallelism (:func:`_split_run`), then
    the :data:`EP_SHAPES` and :data:`QUANTIZED_EP` with expert parallelism too (under ``ep/``); then the errors of a
    model whose heads do not split and of one whose experts do not. Saves what it saw to ``out_dir``/rank{rank}.pt."""
    from trident.distributed.config import ParallelConfig
    from trident.distributed.group import destroy_tensor_parallel, init_tensor_parallel

    torch.set_num_threads(1)
    parallel = init_tensor_parallel(ParallelConfig(tensor_parallel_size=size, rank=rank, init_method=init_method),
                                    torch.device("cpu"))
    seen: dict[str, object] = {}
    try:
        for name in (*SHAPES, *QUANTIZED):
            with torch_products(name):
                _split_run(name, parallel, seen)
        expert_parallel = dataclasses.replace(parallel, expert_parallel=True)  # the same process groups
        for name in (*EP_SHAPES, *QUANTIZED_EP):
            with torch_products(name):
                _split_run(f"ep/{name}", expert_parallel, seen)
        try:
            LLMEngine(engine_config(), checkpoint(BAD_HEADS), parallel=parallel)
        except TridentError as e:
            seen["bad-heads/error"] = str(e)
        try:
            LLMEngine(engine_config(), checkpoint(BAD_EXPERTS), parallel=expert_parallel)
        except TridentError as e:
            seen["ep/bad-experts/error"] = str(e)
    finally:
        torch.save(seen, f"{out_dir}/rank{rank}.pt")
        destroy_tensor_parallel()
