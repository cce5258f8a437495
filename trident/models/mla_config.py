"""Multi-head latent attention settings (DeepSeek-V2 / V3), read from a Hugging Face config dict (torch-free).

Each token's keys and values come from one compressed latent c (``kv_lora_rank``, RMS-normalised) through
``kv_b_proj`` (per head: a key part without position, ``qk_nope_head_dim``, and a value, ``v_head_dim``), plus a
rope key (``qk_rope_head_dim``) shared by every head. Queries come from the hidden state directly (``q_proj``) or
through a low-rank bottleneck (``q_a_proj``, RMS norm, ``q_b_proj``) when ``q_lora_rank`` is set. Only c and the
rope key are cached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from trident.errors import TridentError

MLA_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")


@dataclass(frozen=True)
class MlaConfig:
    """The shape of multi-head latent attention."""

    kv_lora_rank: int
    """Width of the cached latent c."""
    qk_nope_head_dim: int
    """Per head: the query/key part without rotary position."""
    qk_rope_head_dim: int
    """Per head: the rotated query part; the rotated key part is one vector shared by all heads."""
    v_head_dim: int
    """Per head: value width (the attention output per head)."""
    q_lora_rank: int | None = None
    """Rank of the query bottleneck (q_a_proj / q_a_layernorm / q_b_proj); None: one q_proj."""
    rope_interleaved: bool = True
    """The checkpoint's rope pairs are interleaved (x0, x1), (x2, x3), ... (DeepSeek-V2 always, V3 with
    rope_interleave) rather than split in halves."""
    softmax_mscale: float = 1.0
    """The attention scale is qk_head_dim ** -0.5 times this (yarn's mscale(factor, mscale_all_dim) squared)."""

    def __post_init__(self) -> None:
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(self, name) <= 0:
                raise TridentError(f"mla config: {name} must be positive, got {getattr(self, name)}")
        if self.qk_rope_head_dim % 2:
            raise TridentError(f"mla config: qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise TridentError(f"mla config: q_lora_rank must be positive or None, got {self.q_lora_rank}")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """What one token caches per layer: the latent and the shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        return self.qk_head_dim ** -0.5 * self.softmax_mscale


def yarn_mscale(factor: float, mscale: float) -> float:
    """Yarn's attention-temperature factor (1 when the context is not stretched)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def mla_config_from_hf(model_type: str, d: dict[str, Any], rope_scaling: dict[str, Any] | None) -> MlaConfig | None:
    """The MlaConfig of a Hugging Face config dict ``d`` (class defaults filled in); None for other families."""
    if model_type not in MLA_MODEL_TYPES:
        return None
    q_lora = d.get("q_lora_rank")
    scaling = dict(rope_scaling or {})
    mscale = 1.0
    if scaling.get("rope_type", scaling.get("type", "default")) not in (None, "default") and \
            scaling.get("mscale_all_dim"):
        mscale = yarn_mscale(float(scaling["factor"]), float(scaling["mscale_all_dim"])) ** 2
    interleaved = model_type == "deepseek_v2" or bool(d.get("rope_interleave", True))
    return MlaConfig(kv_lora_rank=int(d["kv_lora_rank"]), qk_nope_head_dim=int(d["qk_nope_head_dim"]),
                     qk_rope_head_dim=int(d["qk_rope_head_dim"]), v_head_dim=int(d["v_head_dim"]),
                     q_lora_rank=None if q_lora is None else int(q_lora), rope_interleaved=interleaved,
                     softmax_mscale=mscale)
