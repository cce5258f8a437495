"""The latent KV cache of multi-head latent attention (DeepSeek): each layer caches one vector per token (the latent
plus the shared rope key) and no value tensor; the runner allocates, and the sizing and roofline functions count,
exactly that; the equivalent multi-head cache is reported beside it."""

from __future__ import annotations

import pytest
import torch
from hf_tiny import tiny_deepseek_configs, trident_config

from trident.attention.torch_ref import TorchAttention
from trident.bench.roofline import kv_read_bytes
from trident.bench.shapes import resolve_shape
from trident.config import ModelConfig
from trident.engine.runner import ModelRunner
from trident.engine.sampler import Sampler
from trident.engine.sizing import kv_bytes_per_block, weights_bytes
from trident.errors import TridentError
from trident.models.deepseek import MlaAttention
from trident.models.registry import model_class
from trident.quant.kv import kv_cache_format

CPU = torch.device("cpu")


def _meta_model(config: ModelConfig) -> torch.nn.Module:
    with torch.device("meta"):
        return model_class(config.model_type)(config, TorchAttention())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(tiny_deepseek_configs()))
def test_latent_cache_bytes_per_token(name: str, dtype: torch.dtype) -> None:
    hf = tiny_deepseek_configs()[name]
    config = trident_config(hf)
    element = torch.empty((), dtype=dtype).element_size()
    expected = hf.num_hidden_layers * (hf.kv_lora_rank + hf.qk_rope_head_dim) * element
    block_size, num_blocks = 4, 6
    kv_format = kv_cache_format("auto", dtype)
    assert kv_bytes_per_block(config, block_size, kv_format) == block_size * expected
    # what the runner allocates: one [1, blocks, block_size, latent] tensor per layer, no value tensor
    model = _meta_model(config)
    runner = ModelRunner(model, backend=TorchAttention(), num_blocks=num_blocks, block_size=block_size,
                         kv_format=kv_format, device=CPU, sampler=Sampler(device=CPU), max_num_seqs=2)
    assert all(c.value is None and c.key.shape == (1, num_blocks, block_size, hf.kv_lora_rank + hf.qk_rope_head_dim)
               for c in runner.kv_caches)
    assert sum(c.nbytes for c in runner.kv_caches) == num_blocks * block_size * expected
    heads = hf.num_attention_heads
    mha = hf.num_hidden_layers * heads * (hf.qk_nope_head_dim + hf.qk_rope_head_dim + hf.v_head_dim) * element
    assert config.mha_equivalent_kv_bytes_per_token(element) == mha


def test_quantized_latent_cache_is_refused() -> None:
    config = trident_config(tiny_deepseek_configs()["deepseek_v2"])
    model = _meta_model(config)
    with pytest.raises(TridentError, match="multi-head latent attention.*--kv-cache-dtype auto"):
        ModelRunner(model, backend=TorchAttention(), num_blocks=2, block_size=4,
                    kv_format=kv_cache_format("int8", torch.float32), device=CPU, sampler=Sampler(device=CPU),
                    max_num_seqs=1)


def test_backends_without_mla_are_refused() -> None:
    class NoMla:
        supports_mla = False

    config = trident_config(tiny_deepseek_configs()["deepseek_v3"])
    with pytest.raises(TridentError, match="does not run multi-head latent attention"):
        MlaAttention(config, 0, NoMla())


def test_deepseek_v2_lite_shape() -> None:
    """DeepSeek-V2-Lite's published figures: 15.7 B parameters, 27 layers caching 512 + 64 values per token, 16 heads
    of 128 + 64 query/key and 128 value widths."""
    config = ModelConfig.from_hf_dict(resolve_shape("deepseek-v2-lite").hf_config)
    assert round(config.num_parameters() / 1e9, 1) == 15.7
    assert weights_bytes(config, torch.bfloat16) == 2 * config.num_parameters()
    assert kv_bytes_per_block(config, 16, kv_cache_format("auto", torch.bfloat16)) == 16 * 27 * 576 * 2
    assert config.mha_equivalent_kv_bytes_per_token(2) == 27 * 16 * (128 + 64 + 128) * 2
    # the decode roofline reads the latents: one token attending to 10 cached tokens in 27 layers
    assert kv_read_bytes(config, [10], [1], 2) == (10 * 27 * 576 * 2, 10)


def test_yarn_is_refused_outside_deepseek() -> None:
    """Yarn's scale of the rotated parts is applied by the latent attention only: other families refuse yarn."""
    raw = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1,
           "intermediate_size": 96, "vocab_size": 97,
           "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}}
    with pytest.raises(TridentError, match="yarn rope scaling is supported for DeepSeek"):
        ModelConfig.from_hf_dict(raw)
