"""What the tensor-parallel tests run: tiny models with random weights, the same steps on every rank, and the
function each spawned rank runs (:func:`run_rank`). The parent process runs the same models unsplit (TP=1) as the
reference."""

from __future__ import annotations

import dataclasses

import torch

from trident.bench.random_weights import weight_specs
from trident.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from trident.engine.engine import LLMEngine
from trident.engine.plan import ScheduledChunk, StepPlan
from trident.engine.request import SamplingParams
from trident.errors import TridentError
from trident.loader.checkpoint import Checkpoint
from trident.moe.experts import FusedExperts

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

EP_SHAPES = ("qwen2-moe-shared", "mixtral")
"""Shapes also split with expert parallelism (two whole experts of four per rank; the shared expert, attention and
vocabulary split as without it)."""

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


def generate(engine: LLMEngine) -> list[list[int]]:
    """Greedy output tokens of :data:`PROMPTS` (EOS ignored), all submitted at once."""
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    ids = [engine.add_request(list(prompt), params) for prompt in PROMPTS]
    done = {}
    while len(done) < len(ids):
        for out in engine.step(only_finished=True):
            done[out.request_id] = list(out.outputs[0].token_ids)
    return [done[i] for i in ids]


def _split_run(name: str, hf_config: dict, parallel, seen: dict) -> None:
    """One shape over ``parallel``'s ranks: the step logits, this rank's kv heads, block count and block bytes, its
    experts and their load after the steps (MoE models), and (rank 0) the engine's greedy tokens; into ``seen``
    under ``name``/."""
    ckpt = checkpoint(hf_config)
    engine = LLMEngine(engine_config(), ckpt, parallel=parallel)
    seen[f"{name}/logits"] = step_logits(engine)
    seen[f"{name}/kv_heads"] = engine.runner.kv_caches[0].key.shape[0]
    seen[f"{name}/num_blocks"] = engine.num_blocks
    seen[f"{name}/kv_block_bytes"] = engine.kv_block_bytes
    experts = [m for m in engine.model.modules() if isinstance(m, FusedExperts)]
    if experts:  # (the model's id of each layer's first expert here, its gate_up_proj's shape)
        seen[f"{name}/experts"] = [(getattr(m, "first_expert", 0), tuple(m.gate_up_proj.shape)) for m in experts]
    if engine.moe_stats() is not None:
        seen[f"{name}/moe_stats"] = dataclasses.asdict(engine.moe_stats())  # plain types: torch.load's weights_only
        seen[f"{name}/moe_stats_whole"] = dataclasses.asdict(engine.model.load_stats.snapshot(whole=True))
    engine = LLMEngine(engine_config(async_scheduling=name.split("/")[-1] in ASYNC_SHAPES), ckpt, parallel=parallel)
    engine.runner.warm_up()  # what a CUDA engine runs at start-up on every rank, each by itself (no plans sent)
    if parallel.is_driver:
        try:
            seen[f"{name}/tokens"] = generate(engine)
        finally:
            engine.runner.stop_followers()
    else:
        engine.runner.follow()


def run_rank(rank: int, size: int, init_method: str, out_dir: str) -> None:
    """One spawned rank: every shape split with tensor parallelism (:func:`_split_run`), then the :data:`EP_SHAPES`
    with expert parallelism too (under ``ep/``); then the errors of a model whose heads do not split and of one
    whose experts do not. Saves what it saw to ``out_dir``/rank{rank}.pt."""
    from trident.distributed.config import ParallelConfig
    from trident.distributed.group import destroy_tensor_parallel, init_tensor_parallel

    torch.set_num_threads(1)
    parallel = init_tensor_parallel(ParallelConfig(tensor_parallel_size=size, rank=rank, init_method=init_method),
                                    torch.device("cpu"))
    seen: dict[str, object] = {}
    try:
        for name, hf_config in SHAPES.items():
            _split_run(name, hf_config, parallel, seen)
        expert_parallel = dataclasses.replace(parallel, expert_parallel=True)  # the same process groups
        for name in EP_SHAPES:
            _split_run(f"ep/{name}", SHAPES[name], expert_parallel, seen)
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
