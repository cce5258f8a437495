"""What one layer's paged KV cache holds per token, as the model declares it (torch-free).

A multi-head model caches a key and a value of ``head_dim`` per kv head. A model with multi-head latent attention
(DeepSeek-V2 / V3) caches one vector per token: the compressed latent (``kv_lora_rank``) joined to the shared rope
key (``qk_rope_head_dim``), and no value tensor at all. The runner allocates, and the sizing functions count,
exactly what the spec says (``ModelConfig.kv_cache_spec``).
"""

from __future__ import annotations

from dataclasses import dataclass

from trident.errors import TridentError


@dataclass(frozen=True)
class KVCacheSpec:
    """Per token and layer: ``num_kv_heads`` keys of ``key_dim`` and, when ``has_value``, as many values of the
    same width."""

    num_kv_heads: int
    """Cached heads (1 for a latent cache)."""
    key_dim: int
    """Width of each cached key (head_dim; kv_lora_rank + qk_rope_head_dim for a latent cache)."""
    has_value: bool = True
    """Whether a value tensor of the keys' shape is cached beside them (False: the latent cache, whose values are
    up-projected from the same latent)."""

    def __post_init__(self) -> None:
        if self.num_kv_heads <= 0 or self.key_dim <= 0:
            raise TridentError(f"kv cache spec: need positive num_kv_heads and key_dim, got {self}")

    @property
    def tensors_per_layer(self) -> int:
        """Cached tensors of one layer: keys and values, or keys (latents) alone."""
        return 2 if self.has_value else 1

    def elements_per_token(self, num_layers: int) -> int:
        """Cached elements of one token over ``num_layers`` layers (scales of a quantized cache apart)."""
        return num_layers * self.tensors_per_layer * self.num_kv_heads * self.key_dim
