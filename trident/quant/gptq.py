"""GPTQ (Frantar et al., 2022): quantize a weight W [N, K] column by column, spreading each column's rounding
error over the columns not yet quantized so that the layer's output on its calibration inputs X [n, K] moves as
little as possible, ``min ||X W^T - X Q^T||_F``. Only the inputs' Hessian ``H = 2/n X^T X`` [K, K] is needed.

The math, per output row w (rows are independent and share H): quantizing input column j to q_j leaves an
error ``e_j = w_j - q_j``; the change of the not-yet-quantized columns F that minimises the loss afterwards is
``dw_F = -e_j / [H_F^-1]_jj * [H_F^-1]_{j,F}`` (the optimal brain surgeon step), and removing column j from F
turns ``H_F^-1`` into its Schur complement. Going through the columns in a fixed order, the rows of the upper
Cholesky factor U of ``H^-1`` (``H^-1 = U^T U``) hold exactly these successive quantities scaled by
``sqrt([H_F^-1]_jj)``: with ``d = U_jj``, ``err = e_j / d`` and the update is ``w_F -= err * U_{j,F}``. So one
Cholesky factorisation replaces every Schur complement.

How this file does it:
- **Dampening**: ``H + damp * mean(diag H) * I`` (``damp`` relative, default 0.01) keeps H safely positive
  definite. A Cholesky factorisation that still fails is retried with ten times the damping, up to
  ``DAMP_RETRIES`` times, then a :class:`TridentError` names the damping tried.
- **Dead inputs** (``H_jj = 0``: an input that is zero on every calibration row, so its row and column of H are
  zero) get ``H_jj = mean of the live diagonal``: their weights are rounded to nearest and pass no error on
  (they are kept, not zeroed, since other inputs may not be zero).
- **Lazy block updates**: columns are processed in blocks of ``block_size`` (128). Inside a block a column gets
  the updates of the block's earlier columns when its turn comes (``w_j - Err[:, :i] U[:i, j]``, one small
  product), and the whole block's errors update the columns after the block in one matrix product
  ``W[:, end:] -= Err @ U[block, end:]``: the same result as updating every later column after each column,
  with far fewer passes over W.
- **Groups** (``group_size`` of :class:`QuantConfig`): each group's grid (scale, zero point) is chosen exactly as
  :mod:`trident.quant.rtn` chooses it (:func:`rtn.group_grid`), from the group's values **as updated** when its
  first column comes up (the errors of the earlier columns are already in them). Per channel, the grid of a row
  comes from the original weight, as round-to-nearest's.
- **Act order** (``act_order``): the columns are quantized by decreasing ``H_jj`` (the inputs with the most energy
  first, while there are many columns left to absorb their errors). Groups then are *static*: their grids come
  from the original weight in natural order (round-to-nearest's scales and zero points), so every group stays
  the consecutive run of inputs round-to-nearest's layout has, whatever the order the columns were quantized in;
  no permutation is stored.

Rounding and the grid run in float32 exactly as round-to-nearest's, the error propagation in float32 against a
float64 Cholesky factorisation. With ``H = I`` no error propagates (U is diagonal) and the codes are
round-to-nearest's. The result is a :class:`QuantizedWeight` in round-to-nearest's layout: the format, loader
and QuantizedLinear do not know which method chose the codes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch

from trident.errors import TridentError
from trident.quant.gptq_config import GPTQConfig
from trident.quant.rtn import (
    Grid,
    QuantConfig,
    QuantizedWeight,
    grid_values,
    group_grid,
    group_size_of,
    pack_codes,
    round_to_grid,
)

DAMP_RETRIES = 3
"""Times the damping is multiplied by 10 after a failed Cholesky factorisation before giving up."""


class GPTQResult(NamedTuple):
    quantized: QuantizedWeight
    """Codes, scales and zero points in round-to-nearest's layout."""
    damp: float
    """The relative damping that was used (more than asked when the Cholesky factorisation needed it)."""


class HessianAccumulator:
    """Sums ``X^T X`` over batches of inputs [..., K]: each batch's product in its own dtype (float32), the
    running sum in float64. :meth:`hessian` gives ``H = 2/n X^T X`` over all ``n`` rows seen."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.sum.shape[0]).to(torch.float32)
        self.sum += (x.T @ x).to(torch.float64)
        self.rows += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if not self.rows:
            raise TridentError("no calibration inputs reached this layer; GPTQ needs at least one")
        return self.sum * (2.0 / self.rows)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, config: QuantConfig,
                  gptq: GPTQConfig | None = None) -> GPTQResult:
    """Quantize ``weight`` [N, K] on ``config``'s grid with GPTQ's error compensation, given the Hessian
    [K, K] of its inputs (see the module docstring). Runs on the weight's device."""
    gptq = gptq or GPTQConfig()
    if weight.dim() != 2:
        raise TridentError(f"GPTQ expects a 2-D weight [N, K], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if tuple(hessian.shape) != (k, k):
        raise TridentError(f"the Hessian is {tuple(hessian.shape)}, expected ({k}, {k}) for a weight [{n}, {k}]")
    group = group_size_of(config, k)
    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(device=w.device, dtype=torch.float64).clone()
    if not torch.isfinite(h).all():
        raise TridentError("the Hessian of the calibration inputs holds NaN or infinity: the model's activations "
                           "overflowed; calibrate in float32 on other text")
    with _one_cpu_thread(w.device):
        return _gptq(w, h, config, gptq, group)


def _gptq(w: torch.Tensor, h: torch.Tensor, config: QuantConfig, gptq: GPTQConfig, group: int) -> GPTQResult:
    """gptq_quantize on a float32 copy of the weight and a float64 copy of the Hessian (both changed)."""
    n, k = w.shape
    diag = h.diagonal()
    dead = diag <= 0
    live = diag[~dead]
    diag[dead] = live.mean() if live.numel() else 1.0

    static = gptq.act_order or group == k
    grid = group_grid(w.reshape(n, k // group, group), config) if static else None
    scales = grid.scales if grid else torch.empty(n, k // group, dtype=torch.float32, device=w.device)
    zeros = grid.zeros if grid else (None if config.symmetric else torch.empty(n, k // group, dtype=torch.int32,
                                                                               device=w.device))
    order = torch.argsort(h.diagonal(), descending=True, stable=True) if gptq.act_order else None
    if order is not None:
        w = w[:, order]
        h = h[order][:, order]
    upper, damp = _inverse_cholesky(h, gptq.damp)
    codes = _quantize_columns(w, upper, order, scales, zeros, group, static, config, gptq.block_size)
    return GPTQResult(pack_codes(codes, Grid(scales, zeros), config), damp)


def _quantize_columns(w: torch.Tensor, upper: torch.Tensor, order: torch.Tensor | None, scales: torch.Tensor,
                      zeros: torch.Tensor | None, group: int, static: bool, config: QuantConfig,
                      block_size: int) -> torch.Tensor:
    """The codes [N, K] (natural column order) of ``w`` [N, K] (columns in processing order), updating ``w``,
    and, for dynamic groups, ``scales`` / ``zeros`` in place."""
    n, k = w.shape
    columns = order.tolist() if order is not None else range(k)  # the natural index of each processed column
    codes = torch.empty(k, n, dtype=torch.int32, device=w.device)  # [processed column, N]
    for start in range(0, k, block_size):
        end = min(start + block_size, k)
        block = w[:, start:end].T.contiguous()  # [columns, N]: one column per contiguous row
        errors = torch.zeros_like(block)
        u = upper[start:end, start:end]
        for i in range(end - start):
            col = columns[start + i]
            g = col // group
            if not static and col % group == 0:  # the group's grid, from its values as updated so far
                values = block[i: i + group] - u[:i, i: i + group].T @ errors[:i]
                fresh = group_grid(values.T.unsqueeze(1), config)
                scales[:, g] = fresh.scales[:, 0]
                if zeros is not None:
                    zeros[:, g] = fresh.zeros[:, 0]
            s = scales[:, g]
            z = None if zeros is None else zeros[:, g]
            # the column as updated by the block's earlier columns
            value = block[i] - u[:i, i] @ errors[:i]
            q = round_to_grid(value, s, z, config)
            codes[start + i] = q
            errors[i] = (value - grid_values(q, s, z)) / u[i, i]
        w[:, end:] -= errors.T @ upper[start:end, end:]
    return codes.T if order is None else codes[torch.argsort(order)].T


@contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run GPTQ on one CPU thread: its column loop is small vector operations, and with a second thread the
    workers left spinning after each matrix product compete with the loop for the cores. On a busy 2-core
    machine, a 3072 x 576 int4 weight took 20 s on two threads and 0.4 s on one."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _inverse_cholesky(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """The upper Cholesky factor U (float32) of ``(H + damp * mean(diag H) * I)^-1 = U^T U``, with the damping
    multiplied by 10 after each failure (at most DAMP_RETRIES times)."""
    mean = float(h.diagonal().mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    tried = []
    for attempt in range(DAMP_RETRIES + 1):
        d = damp * 10 ** attempt
        tried.append(d)
        lower, info = torch.linalg.cholesky_ex(h + (d * mean) * eye)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if int(info) == 0 and torch.isfinite(upper).all():
                return upper.to(torch.float32), d
    raise TridentError(f"GPTQ's Cholesky factorisation of the Hessian failed with relative damping "
                       f"{', '.join(f'{d:g}' for d in tried)}: the calibration inputs are degenerate; calibrate on "
                       "more or longer samples (--calib-samples, --calib-seq-len) or raise --damp")


def relative_output_error(weight: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """``||X W^T - X Q^T||_F / ||X W^T||_F`` on the inputs whose Hessian (any multiple of ``X^T X``) is given,
    in float64: ``||X D^T||_F^2 = trace(D X^T X D^T)``."""
    w = weight.detach().to(torch.float64)
    h = hessian.detach().to(device=w.device, dtype=torch.float64)
    d = w - dequantized.detach().to(device=w.device, dtype=torch.float64)
    num = float(((d @ h) * d).sum())
    den = float(((w @ h) * w).sum())
    return (max(num, 0.0) / den) ** 0.5 if den > 0 else 0.0
