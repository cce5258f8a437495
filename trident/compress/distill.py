"""Knowledge distillation (``trident distill``): a student model learns a frozen teacher's next-token
distributions on a text, typically to recover a pruned model (:mod:`trident.compress.prune`) from its original.

The loss of a batch, over its N predicted positions (every window position but the last; V the vocabulary)::

    loss = alpha * T^2 * KL + (1 - alpha) * CE
    KL   = 1/N sum_n sum_v p_t(v) (log p_t(v) - log p_s(v)),   p = softmax(logits / T), t teacher, s student
    CE   = 1/N sum_n -log softmax(student logits)[next token]

(Hinton et al.'s softened targets; the T^2 keeps the KL term's gradients the size of the CE term's as T changes.)
Both are computed from float32 logits, whatever the autocast dtype.

Both models are Hugging Face transformers models built from trident's loader output
(:func:`trident.compress.hf_model.transformers_model`): the teacher frozen in eval mode under ``no_grad``, the
student training with float32 master weights, under bf16 autocast on CUDA (float32 on the CPU unless asked).
AdamW (weight decay on matrices only), a linear warmup then a cosine decay to zero, gradient-norm clipping.
Batches are random windows of ``seq_len`` tokens of one token stream, their starts drawn by a seeded CPU
generator whose state is part of a checkpoint (:mod:`trident.compress.distill_state`), so a resumed run draws
the batches an uninterrupted one would.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
from torch import nn

from trident.errors import TridentError

DTYPES = ("auto", "float32", "bfloat16")
"""The ``dtype`` choices: the student's autocast dtype (its master weights are float32 always)."""


@dataclass(frozen=True)
class DistillConfig:
    """How the student is trained; validated at construction."""

    steps: int
    """Optimizer steps (one batch each)."""
    batch_size: int = 8
    """Windows per batch."""
    seq_len: int = 512
    """Tokens per window; each predicts its ``seq_len - 1`` next tokens."""
    lr: float = 1e-4
    """Peak learning rate of AdamW, reached after the warmup, then cosine-decayed to zero at ``steps``."""
    warmup: int | None = None
    """Linear warmup steps from zero; None: 5% of ``steps`` (rounded)."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay, applied to matrices only (not to norms and biases)."""
    temperature: float = 2.0
    """T: both models' logits are divided by it before the KL term."""
    alpha: float = 0.5
    """Weight of the KL term (``1 - alpha`` that of the cross-entropy with the next tokens), in [0, 1]."""
    grad_clip: float | None = 1.0
    """Clip the gradients' global L2 norm to this (None: no clipping)."""
    seed: int = 0
    """Seeds the window sampler and torch's generator."""
    checkpoint_every: int | None = 100
    """Save a checkpoint every this many steps (and always at the end); None: at the end only."""
    keep_checkpoints: int = 2
    """The newest checkpoints kept; older ones are deleted."""
    log_every: int = 10
    """Steps averaged into one point of the loss curve."""
    device: str = "cpu"
    """``cpu``, ``cuda`` or ``cuda:N``."""
    dtype: str = "auto"
    """The student's and teacher's autocast dtype: ``auto`` (bfloat16 on CUDA, float32 on the CPU), ``float32``
    (no autocast) or ``bfloat16``."""

    def __post_init__(self) -> None:
        _check(_is_int(self.steps) and self.steps >= 1, f"steps must be an integer >= 1, got {self.steps!r}")
        _check(_is_int(self.batch_size) and self.batch_size >= 1,
               f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        _check(_is_int(self.seq_len) and self.seq_len >= 2, f"seq_len must be an integer >= 2, got {self.seq_len!r}")
        _check(_is_number(self.lr) and self.lr > 0, f"lr must be a number > 0, got {self.lr!r}")
        _check(self.warmup is None or (_is_int(self.warmup) and 0 <= self.warmup < self.steps),
               f"warmup must be an integer in [0, steps={self.steps}), got {self.warmup!r}")
        _check(_is_number(self.weight_decay) and self.weight_decay >= 0,
               f"weight_decay must be a number >= 0, got {self.weight_decay!r}")
        _check(_is_number(self.temperature) and self.temperature > 0,
               f"temperature must be a number > 0, got {self.temperature!r}")
        _check(_is_number(self.alpha) and 0 <= self.alpha <= 1, f"alpha must be in [0, 1], got {self.alpha!r}")
        _check(self.grad_clip is None or (_is_number(self.grad_clip) and self.grad_clip > 0),
               f"grad_clip must be a number > 0 or None, got {self.grad_clip!r}")
        _check(_is_int(self.seed), f"seed must be an integer, got {self.seed!r}")
        _check(self.checkpoint_every is None or (_is_int(self.checkpoint_every) and self.checkpoint_every >= 1),
               f"checkpoint_every must be an integer >= 1 or None, got {self.checkpoint_every!r}")
        _check(_is_int(self.keep_checkpoints) and self.keep_checkpoints >= 1,
               f"keep_checkpoints must be an integer >= 1, got {self.keep_checkpoints!r}")
        _check(_is_int(self.log_every) and self.log_every >= 1,
               f"log_every must be an integer >= 1, got {self.log_every!r}")
        _check(isinstance(self.device, str) and (self.device == "cpu" or self.device.split(":")[0] == "cuda"),
               f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        _check(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")

    @property
    def warmup_steps(self) -> int:
        return round(0.05 * self.steps) if self.warmup is None else self.warmup

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype, None for plain float32."""
        if self.dtype == "auto":
            return torch.bfloat16 if self.device.startswith("cuda") else None
        return None if self.dtype == "float32" else torch.bfloat16

    def as_dict(self) -> dict:
        return asdict(self)


RESUMABLE_CHANGES = ("checkpoint_every", "keep_checkpoints", "log_every", "device", "dtype")
"""DistillConfig fields a resumed run may change; any other change is refused (it would be another run)."""
CONFIG_FIELDS = tuple(f.name for f in fields(DistillConfig))


class DistillLoss(NamedTuple):
    """One batch's loss and its two terms (0-d tensors; ``loss`` carries the student's gradients)."""

    loss: torch.Tensor
    kl: torch.Tensor
    """``KL(teacher_T || student_T)`` per predicted token, before the ``T^2`` factor."""
    ce: torch.Tensor


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, *,
                      temperature: float, alpha: float) -> DistillLoss:
    """The loss of the module docstring. ``*_logits`` [..., V] at the predicted positions, ``targets`` [...] the
    next tokens; computed in float32 (or float64 when given float64)."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    vocab = student_logits.shape[-1]
    student = student_logits.to(dtype).reshape(-1, vocab)
    teacher = teacher_logits.to(dtype).reshape(-1, vocab)
    log_student_t = torch.log_softmax(student / temperature, dim=-1)
    log_teacher_t = torch.log_softmax(teacher / temperature, dim=-1)
    kl = torch.nn.functional.kl_div(log_student_t, log_teacher_t, log_target=True, reduction="sum") / student.shape[0]
    ce = torch.nn.functional.cross_entropy(student, targets.reshape(-1))
    return DistillLoss(alpha * temperature ** 2 * kl + (1 - alpha) * ce, kl, ce)


class WindowSampler:
    """Random windows of ``seq_len`` tokens of a token stream, their starts drawn uniformly by a seeded CPU
    generator (the same batches on every device); :meth:`state` / :meth:`load_state` for checkpoints."""

    def __init__(self, token_ids: torch.Tensor, seq_len: int, batch_size: int, seed: int) -> None:
        if token_ids.dim() != 1 or token_ids.numel() < seq_len:
            raise TridentError(f"the text gives {token_ids.numel():,} tokens, fewer than one window of "
                               f"{seq_len}: use a longer text or a smaller --seq-len")
        self.token_ids = token_ids.to(torch.long)
        self.seq_len, self.batch_size = seq_len, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self) -> torch.Tensor:
        """int64 [batch_size, seq_len]."""
        starts = torch.randint(0, self.token_ids.numel() - self.seq_len + 1, (self.batch_size,),
                               generator=self.generator)
        return self.token_ids[starts[:, None] + torch.arange(self.seq_len)]

    def state(self) -> torch.Tensor:
        return self.generator.get_state()

    def load_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


def lr_factor(step: int, warmup: int, steps: int) -> float:
    """The learning rate of (0-based) ``step`` over the peak: linear warmup from ``1/(warmup+1)``, then cosine
    from 1 down to 0 at ``steps``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class StepResult(NamedTuple):
    """What one optimizer step did (Python floats)."""

    loss: float
    kl: float
    ce: float
    lr: float
    grad_norm: float
    tokens: int
    seconds: float


class Distiller:
    """A student, a frozen teacher, their optimizer, schedule and batches: :meth:`step` trains one batch.

    ``teacher`` and ``student`` are transformers causal-LM models (the student's parameters float32); both are
    moved to ``config.device``. ``masked``: names of the student's parameters whose zeros are a pruning mask
    (`trident prune --structure`): their zero entries are set back to zero after every optimizer step, so the
    student keeps its sparsity pattern (2:4 stays 2:4)."""

    def __init__(self, teacher: nn.Module, student: nn.Module, token_ids: torch.Tensor, config: DistillConfig,
                 masked: tuple[str, ...] = ()) -> None:
        self.config = config
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise TridentError("--device cuda, but torch sees no CUDA device here; use --device cpu")
        if teacher.config.vocab_size != student.config.vocab_size:
            raise TridentError(f"the teacher predicts {teacher.config.vocab_size} tokens and the student "
                               f"{student.config.vocab_size}: distillation needs one vocabulary")
        if any(p.dtype != torch.float32 for p in student.parameters()):
            raise TridentError("the student's weights must be float32 (the master weights of mixed precision)")
        self.teacher = teacher.to(self.device).eval().requires_grad_(False)
        self.student = student.to(self.device).train()
        self.sampler = WindowSampler(token_ids, config.seq_len, config.batch_size, config.seed)
        torch.manual_seed(config.seed)
        matrices = [p for p in self.student.parameters() if p.requires_grad and p.dim() >= 2]
        others = [p for p in self.student.parameters() if p.requires_grad and p.dim() < 2]
        self.optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": config.weight_decay},
                                            {"params": others, "weight_decay": 0.0}], lr=config.lr,
                                           betas=(0.9, 0.95))
        warmup, steps = config.warmup_steps, config.steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, warmup, steps))
        self.step_index = 0
        """Steps done."""
        params = dict(self.student.named_parameters())
        unknown = [name for name in masked if name not in params]
        if unknown:
            raise TridentError(f"masked parameters the student does not have: {unknown[:3]}")
        self.masks = tuple((params[name], params[name] != 0) for name in masked)
        """(parameter, keep) of each masked parameter: where it is nonzero at the start."""

    def autocast(self):
        dtype = self.config.autocast_dtype
        return nullcontext() if dtype is None else torch.autocast(self.device.type, dtype=dtype)

    def step(self) -> StepResult:
        """Train one batch: forward both models, the loss, backward, clip, AdamW, the schedule."""
        t0 = time.perf_counter()
        config = self.config
        batch = self.sampler.next_batch().to(self.device)
        inputs, targets = batch, batch[:, 1:]
        with torch.no_grad(), self.autocast():
            teacher_logits = self.teacher(inputs).logits[:, :-1]
        with self.autocast():
            student_logits = self.student(inputs).logits[:, :-1]
        loss = distillation_loss(student_logits, teacher_logits, targets, temperature=config.temperature,
                                 alpha=config.alpha)
        self.optimizer.zero_grad(set_to_none=True)
        loss.loss.backward()
        max_norm = config.grad_clip if config.grad_clip is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), max_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        with torch.no_grad():
            for param, keep in self.masks:
                param.mul_(keep)
        self.scheduler.step()
        self.step_index += 1
        values = torch.stack([loss.loss.detach(), loss.kl.detach(), loss.ce.detach(), grad_norm.float()]).tolist()
        return StepResult(*values[:3], lr=lr, grad_norm=values[3], tokens=inputs.numel(),
                          seconds=time.perf_counter() - t0)

    def state_dict(self) -> dict:
        """Everything but the student's weights that a resumed run needs (see distill_state)."""
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"step": self.step_index, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "sampler": self.sampler.state(), "rng": rng}

    def load_state_dict(self, state: Mapping) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state(state["sampler"])
        torch.set_rng_state(state["rng"]["torch"])
        if self.device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.step_index = int(state["step"])


@torch.no_grad()
def mean_nll(model: nn.Module, windows: torch.Tensor, *, batch_size: int, autocast=nullcontext) -> float:
    """Mean next-token NLL (nats; float32 log-softmax, float64 sum) of ``model`` over ``windows`` [n, L] (each a
    sequence from position 0, every position but the first scored), ``batch_size`` windows per forward; the model
    is put in eval mode meanwhile."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    try:
        for batch in windows.split(batch_size):
            batch = batch.to(device)
            with autocast():
                logits = model(batch).logits[:, :-1]
            nll = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                    batch[:, 1:].reshape(-1), reduction="none")
            total += nll.double().sum()
    finally:
        model.train(was_training)
    return float(total) / (windows.shape[0] * (windows.shape[1] - 1))


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise TridentError(f"invalid distillation settings: {message}")
