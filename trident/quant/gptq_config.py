"""The settings of GPTQ (:mod:`trident.quant.gptq`) and of its calibration (:mod:`trident.quant.calibrate`), apart
from them so that the command line reads their defaults without importing torch."""

from __future__ import annotations

from dataclasses import dataclass

from trident.errors import TridentError


@dataclass(frozen=True)
class GPTQConfig:
    """How GPTQ compensates the rounding errors (the code grid itself is :class:`QuantConfig`'s)."""

    damp: float = 0.01
    """Dampening added to H's diagonal, relative to the mean of the diagonal (0 < damp <= 1)."""
    block_size: int = 128
    """Columns per lazy block update; a multiple of 128 so that every group fits inside one block."""
    act_order: bool = False
    """Quantize the columns by decreasing H_jj (with static groups from the original weight)."""

    def __post_init__(self) -> None:
        if not isinstance(self.damp, (int, float)) or isinstance(self.damp, bool) or not 0 < self.damp <= 1:
            raise TridentError(f"GPTQ damp must be a number in (0, 1] (0.01 is usual), got {self.damp!r}")
        if not isinstance(self.block_size, int) or self.block_size <= 0 or self.block_size % 128:
            raise TridentError(f"GPTQ block_size must be a positive multiple of 128, got {self.block_size!r}")
        if not isinstance(self.act_order, bool):
            raise TridentError(f"act_order must be True or False, got {self.act_order!r}")


@dataclass(frozen=True)
class CalibrationConfig:
    """Which tokens GPTQ calibrates on, and how many go through the model at once."""

    text: str
    """A named corpus (``shakespeare``, ``kjv``: its ``calib`` slice) or a UTF-8 file (taken whole)."""
    samples: int = 64
    """Sequences of ``seq_len`` tokens. 64 x 512 = 32,768 tokens: each Hessian averages over 32k rows (many more
    than the 1,536 inputs of the widest layer of a 135M model) while a pass over them stays short on 2 CPU cores."""
    seq_len: int = 512
    """Tokens per sequence (each is a fresh sequence from position 0, as a prompt is)."""
    batch_size: int = 8
    """Sequences per forward: bounds the memory of one pass; does not change the result beyond float rounding."""

    def __post_init__(self) -> None:
        for name, low in (("samples", 1), ("seq_len", 2), ("batch_size", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise TridentError(f"calibration {name} must be an integer >= {low}, got {value!r}")
