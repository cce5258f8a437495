"""Perplexity on fixed windows of a token stream, computed through the engine's own model and paged KV cache.

Windows depend on the token ids and the :class:`PerplexityConfig` alone, never on the model, so two variants
of one model (the original and a quantized one, say) score exactly the same targets from exactly the same
contexts. :attr:`PerplexityResult.fingerprint`, a digest of the windows' layout and tokens, shows it: equal
fingerprints mean equal windows of equal tokens.

Windows (``W`` = ``window``, ``S`` = ``stride``, ``S = W`` unless given): window k holds the tokens
``[k*S, k*S + W)``. Windows are taken while they fit whole in the stream (cut to ``max_tokens`` first), at most
``max_windows`` of them; tokens after the last whole window are not scored. A window predicts each of its
tokens but the first from the tokens before it in the window, and scores only the targets no earlier window
scored: window 0 scores positions ``[1, W)``, window k > 0 scores ``[max(k*S + 1, end of window k-1), k*S + W)``.
So non-overlapping windows (``S = W``) score ``W - 1`` targets each, every one from a context of its own
window only; sliding windows (``S < W``) score ``S`` targets each after the first window, every one with at
least ``W - S`` tokens of context (the usual strided perplexity).

How the logits are computed: each window is a fresh sequence, like a prompt in ``generate``. Its KV blocks
come from the engine's own BlockManager (a Sequence allocated as any request's is, never marked computed, so
it never enters the prefix cache, and freed right after its forward): the engine's cache is reused rather than
a second one built beside it, and the engine must be idle meanwhile. ``ModelRunner.prepare`` turns the windows
(prompt chunks of one StepPlan) into the flat batch and attention metadata of a prefill step, then
``model.forward`` and ``model.compute_logits`` run as they do in ``generate``, on the scored rows only. The
negative log-likelihood of each target is ``-log_softmax(logits)[target] = logsumexp(logits) - logits[target]``
in float64, summed in float64.
"""

from __future__ import annotations

import hashlib
import math
import time
from array import array
from collections.abc import Sequence as SequenceOf
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, NamedTuple

from trident.errors import TridentError

if TYPE_CHECKING:
    import torch

    from trident.engine.engine import LLMEngine

LOGIT_ROWS = 256
"""Rows of logits widened to float64 at a time (bounds the [rows, vocab] temporaries)."""
_FINGERPRINT_VERSION = b"trident-ppl-windows-v1"


@dataclass(frozen=True)
class PerplexityConfig:
    """Which windows of a token stream are scored, and how many go through the model at once."""

    window: int = 512
    """Tokens per window: a target is predicted from at most ``window - 1`` tokens before it."""
    stride: int | None = None
    """Tokens between the starts of consecutive windows; None: ``window`` (non-overlapping windows). Smaller:
    overlapping windows, each scoring only the tokens no earlier window scored."""
    max_tokens: int | None = None
    """Use only the first this many tokens of the stream (None: all of it)."""
    max_windows: int | None = None
    """Score at most this many windows (None: every whole window)."""
    batch_windows: int = 4
    """Windows run through the model in one forward (a step of that many prompts). Changes speed and memory,
    not which tokens are scored."""

    def __post_init__(self) -> None:
        _check(_is_int(self.window) and self.window >= 2, f"window must be an integer >= 2 tokens, got {self.window!r}")
        _check(self.stride is None or (_is_int(self.stride) and 1 <= self.stride <= self.window),
               f"stride must be an integer in [1, window={self.window}], got {self.stride!r}")
        _check(self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 2),
               f"max_tokens must be an integer >= 2, got {self.max_tokens!r}")
        _check(self.max_windows is None or (_is_int(self.max_windows) and self.max_windows >= 1),
               f"max_windows must be an integer >= 1, got {self.max_windows!r}")
        _check(_is_int(self.batch_windows) and self.batch_windows >= 1,
               f"batch_windows must be an integer >= 1, got {self.batch_windows!r}")

    @property
    def stride_tokens(self) -> int:
        """The stride in effect (``window`` when none was given)."""
        return self.stride or self.window


class Window(NamedTuple):
    """One window: tokens ``[start, end)`` run through the model, targets ``[score_from, end)`` scored."""

    start: int
    end: int
    score_from: int
    """First scored target position (at least ``start + 1``: the window's first token has no context)."""

    @property
    def num_scored(self) -> int:
        return self.end - self.score_from


@dataclass(frozen=True)
class WindowPlan:
    """The windows of a token stream under a config, and their fingerprint."""

    windows: tuple[Window, ...]
    fingerprint: str
    """Hex digest of the window layout (window, stride, count) and of every token the windows hold."""

    @property
    def num_scored_tokens(self) -> int:
        return sum(w.num_scored for w in self.windows)

    @property
    def num_model_tokens(self) -> int:
        return sum(w.end - w.start for w in self.windows)


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity of a model on the windows of a token stream."""

    perplexity: float
    """``exp(nll)``."""
    nll: float
    """Mean negative log-likelihood of the scored tokens, in nats."""
    num_scored_tokens: int
    num_windows: int
    num_model_tokens: int
    """Tokens run through the model (more than the scored ones when windows overlap)."""
    seconds: float
    """Wall time of the forwards and the log-likelihoods (loading and tokenizing not included)."""
    tokens_per_second: float
    """``num_model_tokens / seconds``."""
    fingerprint: str
    """The :class:`WindowPlan`'s: equal fingerprints, equal scored tokens and contexts."""
    window: int
    stride: int

    def as_dict(self) -> dict:
        return asdict(self)


def plan_windows(token_ids: SequenceOf[int], config: PerplexityConfig) -> WindowPlan:
    """The windows scored in ``token_ids`` (see the module docstring for the rule). Depends on nothing else."""
    window, stride = config.window, config.stride_tokens
    n = len(token_ids) if config.max_tokens is None else min(len(token_ids), config.max_tokens)
    if n < window:
        capped = f" (of {len(token_ids)}, cut by max_tokens)" if n < len(token_ids) else ""
        raise TridentError(f"the text has {n} tokens{capped}, fewer than one window of {window}: use a longer "
                           "text or a smaller window (--window)")
    count = (n - window) // stride + 1
    if config.max_windows is not None:
        count = min(count, config.max_windows)
    windows, previous_end = [], 0
    for k in range(count):
        start = k * stride
        windows.append(Window(start, start + window, max(start + 1, previous_end)))
        previous_end = start + window
    digest = hashlib.blake2b(_FINGERPRINT_VERSION, digest_size=16)
    digest.update(f":{window}:{stride}:{count}:".encode())
    digest.update(array("q", token_ids[: windows[-1].end]).tobytes())
    return WindowPlan(windows=tuple(windows), fingerprint=digest.hexdigest())


def perplexity(engine: LLMEngine, token_ids: SequenceOf[int], config: PerplexityConfig | None = None, *,
               progress: bool = False, description: str = "perplexity") -> PerplexityResult:
    """Perplexity of the engine's model on the windows of ``token_ids``. ``engine`` is an LLMEngine, or an LLM
    (whose engine is used); it must be idle (no unfinished requests). ``config`` defaults to PerplexityConfig();
    ``progress`` shows a bar over the windows."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from trident.progress import progress_bar

    engine = getattr(engine, "engine", engine)
    config = config or PerplexityConfig()
    plan = plan_windows(token_ids, config)
    tokens = [int(t) for t in token_ids[: plan.windows[-1].end]]
    batch = min(config.batch_windows, len(plan.windows))
    _check_engine(engine, tokens, config.window, batch)
    total_nll = 0.0
    t0 = time.perf_counter()
    with progress_bar(TextColumn(description), BarColumn(), MofNCompleteColumn(), TextColumn("windows"),
                      TimeElapsedColumn(), transient=True, disable=not progress) as bar:
        task = bar.add_task(description, total=len(plan.windows))
        for i in range(0, len(plan.windows), batch):
            group = plan.windows[i: i + batch]
            total_nll += _windows_nll(engine, tokens, group)
            bar.advance(task, len(group))
    seconds = time.perf_counter() - t0
    nll = total_nll / plan.num_scored_tokens
    return PerplexityResult(
        perplexity=math.exp(nll) if nll < 700 else math.inf, nll=nll, num_scored_tokens=plan.num_scored_tokens,
        num_windows=len(plan.windows), num_model_tokens=plan.num_model_tokens, seconds=seconds,
        tokens_per_second=plan.num_model_tokens / seconds if seconds > 0 else math.inf,
        fingerprint=plan.fingerprint, window=config.window, stride=config.stride_tokens,
    )


def _check_engine(engine: LLMEngine, tokens: list[int], window: int, batch: int) -> None:
    """Everything that would stop a run part-way, checked before the first forward."""
    from trident.engine.block_manager import cdiv

    vocab = engine.model_config.vocab_size
    if any(t < 0 or t >= vocab for t in tokens):
        raise TridentError(f"token ids must be in [0, {vocab}) for this model's vocabulary")
    if window > engine.max_model_len:
        raise TridentError(f"a window of {window} tokens is longer than the engine's context "
                           f"({engine.max_model_len} tokens): lower --window or raise --max-model-len")
    if engine.has_unfinished():
        raise TridentError("perplexity runs on an idle engine (its KV blocks come from the engine's cache); "
                           "finish or abort the engine's requests first")
    manager = engine.scheduler.block_manager
    needed = batch * cdiv(window, manager.block_size)
    if needed > manager.num_free_blocks:
        raise TridentError(f"{batch} windows of {window} tokens at once need {needed} KV blocks, but the "
                           f"cache has {manager.num_free_blocks} free: lower --batch-windows or --window, or raise "
                           "--kv-cache-memory")


def _windows_nll(engine: LLMEngine, tokens: list[int], windows: SequenceOf[Window]) -> float:
    """Summed NLL of the windows' scored targets, the windows run as one prefill step of fresh sequences."""
    import torch

    from trident.engine.plan import ScheduledChunk, StepPlan
    from trident.engine.request import SamplingParams, Sequence

    params = SamplingParams()
    manager = engine.scheduler.block_manager
    # Negative ids never meet the engine's own sequences (numbered from 0).
    seqs = [Sequence(seq_id=-1 - i, request_id="perplexity", sample_index=0,
                     prompt_token_ids=tokens[w.start: w.end], params=params) for i, w in enumerate(windows)]
    try:
        for seq in seqs:
            if not manager.allocate(seq, seq.num_tokens):  # checked up front; only a concurrent user gets here
                raise TridentError("the KV cache ran out of blocks during perplexity; is the engine in use?")
        chunks = tuple(ScheduledChunk(seq_id=s.seq_id, token_ids=tuple(s.token_ids), start_pos=0,
                                      block_table=tuple(s.block_table), sample=False, params=params) for s in seqs)
        rows: list[int] = []
        targets: list[int] = []
        offset = 0
        for w in windows:  # the hidden state at row r of a window predicts the window's token r + 1
            rows.extend(range(offset + w.score_from - w.start - 1, offset + w.end - w.start - 1))
            targets.extend(tokens[w.score_from: w.end])
            offset += w.end - w.start
        runner = engine.runner
        with torch.inference_mode():
            input_ids, positions, meta, _, _ = runner.prepare(StepPlan(chunks=chunks))
            hidden = engine.model(input_ids, positions, runner.kv_caches, meta)
            return _nll_sum(engine.model, hidden, rows, targets)
    finally:
        for seq in seqs:
            manager.free(seq)


def _nll_sum(model: torch.nn.Module, hidden: torch.Tensor, rows: list[int], targets: list[int]) -> float:
    """Sum over ``rows`` of ``logsumexp(logits) - logits[target]`` in float64, LOGIT_ROWS rows at a time."""
    import torch

    device = hidden.device
    row_index = torch.tensor(rows, dtype=torch.long, device=device)
    target_index = torch.tensor(targets, dtype=torch.long, device=device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for i in range(0, len(rows), LOGIT_ROWS):
        logits = model.compute_logits(hidden[row_index[i: i + LOGIT_ROWS]]).double()
        picked = logits.gather(1, target_index[i: i + LOGIT_ROWS, None]).squeeze(1)
        total += (torch.logsumexp(logits, dim=-1) - picked).sum()
    return float(total)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise TridentError(f"invalid perplexity settings: {message}")
