"""Turn a batch of next-token logits into sampled tokens (one row per chunk with ``sample=True``).

Per row, in this order (the order of vLLM's original V0 sampler; V1 applies min-p before top-k/top-p,
which gives a different result only when top-p and min-p are both set):

1. **Penalties** on the raw logits: ``repetition_penalty`` over every token of the prompt and the
   output (positive logits are divided by it, negative ones multiplied), then
   ``frequency_penalty * count`` and ``presence_penalty * (count > 0)`` subtracted, counting output
   tokens only.
2. **Log-probabilities for reporting** (``params.logprobs``): ``log_softmax`` of the *penalized*
   logits, before temperature and truncation. They describe the model's (penalized) distribution,
   not the truncated one we draw from, so a reported top-k list is the same whatever the
   temperature/top-k/top-p settings, and it never contains ``-inf`` for tokens a filter removed.
3. **Temperature**: ``0`` means greedy: the argmax of the penalized logits (ties go to the lowest
   token id, which is what ``torch.argmax`` returns). Otherwise the logits are divided by it.
4. **top-k**: keep exactly k tokens (among equal logits at the cut, lower ids win).
5. **top-p**: keep the smallest prefix of the (renormalized) sorted distribution whose mass reaches
   top_p, i.e. drop a token when the mass of the tokens ranked before it is already >= top_p.
6. **min-p**: drop tokens whose (renormalized) probability is below ``min_p`` times the largest.
7. **Draw** with the exponential race ``argmax(probs / E)``, ``E ~ Exponential(1)`` i.i.d. per token,
   which picks token i with probability ``probs[i]``.

Seeds: a row whose request has ``params.seed`` draws its noise from its own ``torch.Generator`` seeded
with a mix of (seed, sample_index, num_output_tokens), so its tokens depend neither on which other
rows share the batch nor on preemption (a recomputed sequence has the same num_output_tokens when it
samples again). Rows without a seed share the sampler's generator.

The common case (every row greedy, no penalties, no logprobs) is one ``argmax``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from trident.engine.plan import ScheduledChunk
from trident.engine.request import SampledToken, SamplingParams
from trident.engine.transfer import HostCopies, to_device, to_host
from trident.models.ops import uses_kernels

_MASK64 = (1 << 64) - 1


@dataclass
class DeviceSamples:
    """One step's sampled tokens, computed on the device and on their way to the host (see
    trident/engine/transfer.py): the device tensor can feed the next step before the host has seen it."""

    token_ids: torch.Tensor
    """[rows] int64 on the device."""
    host_token_ids: torch.Tensor
    """The same, copied to host memory (valid once ``copies`` is waited for)."""
    copies: HostCopies
    logprob_rows: list[int] = field(default_factory=list)
    """Rows that asked for logprobs; the three tensors below have one row each (host copies)."""
    chosen_logprobs: torch.Tensor | None = None
    top_values: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None


class Sampler:
    """Samples one token per logits row. Holds only the generator used for unseeded rows."""

    def __init__(self, seed: int = 0, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed & _MASK64)
        self._plain_tokens: dict[int, SampledToken] = {}
        """token id -> its SampledToken without logprobs (immutable, so one per id serves every row)."""

    def __call__(self, logits: torch.Tensor, chunks: Sequence[ScheduledChunk]) -> list[SampledToken]:
        """Sample a token for each row; ``logits[i]`` ([num_chunks, vocab]) belongs to ``chunks[i]``."""
        return self.resolve(self.sample(logits, chunks), chunks)

    def sample(self, logits: torch.Tensor, chunks: Sequence[ScheduledChunk]) -> DeviceSamples:
        """Queue the sampling of every row on the device, and the copies of the results to the host; the
        host does not wait for the device (unless a penalty needs a sequence's history: see
        :func:`apply_penalties`)."""
        if logits.dim() != 2 or logits.shape[0] != len(chunks):
            raise ValueError(f"logits of shape {tuple(logits.shape)} do not match {len(chunks)} chunks")
        if not chunks or _all_plain_greedy(chunks):
            tokens = argmax(logits)
            return DeviceSamples(tokens, to_host(tokens), HostCopies(logits.device))

        penalized = apply_penalties(logits.float(), chunks)
        logprobs = None
        if any(c.params.logprobs is not None for c in chunks):
            logprobs = torch.log_softmax(penalized, dim=-1)
        tokens = penalized.argmax(dim=-1)  # the greedy rows' answer; random rows are overwritten below
        random_rows = [i for i, c in enumerate(chunks) if not c.params.greedy]
        if random_rows:
            rows = to_device(random_rows, torch.long, logits.device)
            row_chunks = [chunks[i] for i in random_rows]
            probs = filtered_probs(penalized[rows], [c.params for c in row_chunks])
            tokens[rows] = self._draw(probs, row_chunks)
        if logprobs is None:
            return DeviceSamples(tokens, to_host(tokens), HostCopies(logits.device))
        return self._with_logprobs(tokens, logprobs, chunks)

    def resolve(self, samples: DeviceSamples, chunks: Sequence[ScheduledChunk]) -> list[SampledToken]:
        """Wait for the host copies of :meth:`sample`'s results; the SampledToken of each row."""
        samples.copies.wait()
        plain = self._plain(samples.host_token_ids.tolist())
        if not samples.logprob_rows:
            return plain
        result = list(plain)
        chosen = samples.chosen_logprobs.tolist()
        top_values, top_ids = samples.top_values.tolist(), samples.top_ids.tolist()
        for j, i in enumerate(samples.logprob_rows):
            k = chunks[i].params.logprobs
            pairs = sorted(zip(top_ids[j], top_values[j], strict=True), key=lambda p: (-p[1], p[0]))[:k]
            result[i] = SampledToken(plain[i].token_id, chosen[j], tuple(pairs))
        return result

    def _with_logprobs(self, tokens: torch.Tensor, logprobs: torch.Tensor,
                       chunks: Sequence[ScheduledChunk]) -> DeviceSamples:
        """The chosen token's logprob and the top alternatives of the rows that asked for them."""
        rows = [i for i, c in enumerate(chunks) if c.params.logprobs is not None]
        index = to_device(rows, torch.long, logprobs.device)
        chosen = logprobs[index, tokens[index]]
        k_max = min(max(chunks[i].params.logprobs for i in rows), logprobs.shape[1])
        values, ids = logprobs[index].topk(k_max, dim=-1)  # k_max == 0 gives empty rows
        host = [to_host(t) for t in (tokens, chosen, values, ids)]
        return DeviceSamples(tokens, host[0], HostCopies(logprobs.device), rows, *host[1:])

    def _plain(self, token_ids: list[int]) -> list[SampledToken]:
        """A SampledToken (without logprobs) per id, shared from a cache instead of built per row."""
        cache = self._plain_tokens
        out = []
        for t in token_ids:
            token = cache.get(t)
            if token is None:
                token = cache[t] = SampledToken(t)
            out.append(token)
        return out

    def _draw(self, probs: torch.Tensor, chunks: Sequence[ScheduledChunk]) -> torch.Tensor:
        """One token per row of ``probs`` by the exponential race, with each row's generator."""
        noise = torch.empty_like(probs)
        unseeded = [i for i, c in enumerate(chunks) if c.params.seed is None]
        if len(unseeded) == len(chunks):
            noise.exponential_(generator=self.generator)
        else:
            if unseeded:
                block = torch.empty((len(unseeded), probs.shape[1]), dtype=probs.dtype, device=probs.device)
                noise[to_device(unseeded, torch.long, probs.device)] = block.exponential_(
                    generator=self.generator)
            for i, c in enumerate(chunks):
                if c.params.seed is not None:
                    g = torch.Generator(device=probs.device)
                    g.manual_seed(row_seed(c.params.seed, c.sample_index, c.num_output_tokens))
                    noise[i].exponential_(generator=g)
        # A zero draw would turn a masked token's 0/0 into NaN, which argmax would pick.
        noise.clamp_(min=torch.finfo(noise.dtype).tiny)
        return (probs / noise).argmax(dim=-1)


ARGMAX_GROUPS = 64
"""Groups the two-pass argmax splits a row into (when they divide the vocabulary)."""


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(dim=-1)`` ([rows, vocab] -> [rows] int64, the first index among equal maxima), in two
    passes on CUDA: the maximum of each slice of a row, then of those (trident/kernels/argmax.py's two launches
    where Triton imports, else torch over ARGMAX_GROUPS slices). torch reduces a single long row in one thread
    block (27 us for 128,256 logits on an H200, against a few for the two passes, which spread the row over the
    chip). On the CPU, torch.max's indices (the first maximum too): 2.7x
    faster than torch.argmax on bfloat16 logits (49,152 of them: 0.10 against 0.27 ms for one row, 0.77 against
    2.2 ms for 16 rows, 2 cores). Elsewhere, or when the groups do not divide the vocabulary, torch's argmax."""
    rows, vocab = logits.shape
    if not logits.is_cuda:
        return logits.max(dim=-1).indices
    if uses_kernels(logits) and logits.stride(1) == 1:
        from trident.kernels.argmax import argmax as kernel_argmax

        return kernel_argmax(logits)
    if vocab % ARGMAX_GROUPS or rows > ARGMAX_GROUPS:
        return logits.argmax(dim=-1)
    return two_pass_argmax(logits, ARGMAX_GROUPS)


def two_pass_argmax(logits: torch.Tensor, groups: int) -> torch.Tensor:
    """:func:`argmax`'s two passes over ``groups`` equal slices of each row (``groups`` divides the vocabulary)."""
    rows, vocab = logits.shape
    size = vocab // groups
    values, local = logits.view(rows, groups, size).max(dim=-1)  # first maximum within each slice
    group = values.argmax(dim=-1, keepdim=True)  # the first slice holding the row's maximum
    return (group * size + local.gather(1, group)).squeeze(1)


def _plain_greedy(params: SamplingParams) -> bool:
    return params.temperature == 0.0 and params.logprobs is None and not params.needs_penalties


def _all_plain_greedy(chunks: Sequence[ScheduledChunk]) -> bool:
    """Whether every row is plain greedy; rows sharing one params object (a batch of one kind) are
    checked once."""
    last = None
    for c in chunks:
        params = c.params
        if params is not last:
            if not _plain_greedy(params):
                return False
            last = params
    return True


def row_seed(seed: int, sample_index: int, num_output_tokens: int) -> int:
    """A 63-bit generator seed for one draw of a seeded request (splitmix64 over the three values)."""
    h = 0x9E3779B97F4A7C15
    for value in (seed, sample_index, num_output_tokens):
        h = _splitmix64((h ^ (value & _MASK64)) & _MASK64)
    return h >> 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def apply_penalties(logits: torch.Tensor, chunks: Sequence[ScheduledChunk]) -> torch.Tensor:
    """Repetition, frequency and presence penalties; returns ``logits`` itself when no row has any.

    Uses ``chunk.prompt_token_ids`` (repetition only) and ``chunk.output_token_ids`` (all three).
    Never modifies ``logits`` in place.
    """
    rows = [i for i, c in enumerate(chunks) if c.params.needs_penalties]
    if not rows:
        return logits
    vocab, device = logits.shape[1], logits.device
    params = [chunks[i].params for i in rows]
    output_counts = _token_counts([chunks[i].output_token_ids for i in rows], vocab, device)
    prompt_counts = _token_counts([chunks[i].prompt_token_ids for i in rows], vocab, device)
    repetition = _column([p.repetition_penalty for p in params], device)
    frequency = _column([p.frequency_penalty for p in params], device)
    presence = _column([p.presence_penalty for p in params], device)

    index = to_device(rows, torch.long, device)
    x = logits[index]
    seen = (prompt_counts + output_counts) > 0
    x = torch.where(seen, torch.where(x > 0, x / repetition, x * repetition), x)
    x = x - frequency * output_counts - presence * (output_counts > 0).float()
    out = logits.clone()
    out[index] = x
    return out


def filtered_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p for non-greedy rows; returns the probabilities to draw from."""
    vocab, device = logits.shape[1], logits.device
    x = logits / _column([p.temperature for p in params], device)
    if any(0 < p.top_k < vocab or p.top_p < 1.0 for p in params):
        top_k = to_device([p.top_k if 0 < p.top_k < vocab else vocab for p in params], torch.long, device)
        # top_p == 1 must disable the filter exactly (float32 cumulative sums can exceed 1).
        top_p = to_device([p.top_p if p.top_p < 1.0 else float("inf") for p in params], torch.float32, device)
        x = _top_k_top_p(x, top_k, top_p)
    if any(p.min_p > 0 for p in params):
        probs = torch.softmax(x, dim=-1)
        threshold = probs.amax(dim=-1, keepdim=True) * _column([p.min_p for p in params], device)
        x = x.masked_fill(probs < threshold, float("-inf"))
    return torch.softmax(x, dim=-1)


def _top_k_top_p(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) all but each row's top_k tokens, then all but its top_p nucleus."""
    sorted_x, order = x.sort(dim=-1, descending=True, stable=True)
    positions = torch.arange(x.shape[1], device=x.device)
    sorted_x = sorted_x.masked_fill(positions[None, :] >= top_k[:, None], float("-inf"))
    probs = torch.softmax(sorted_x, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # exactly 0 for the first token, so it always stays
    sorted_x = sorted_x.masked_fill(mass_before >= top_p[:, None], float("-inf"))
    return torch.empty_like(x).scatter_(1, order, sorted_x)


def _token_counts(token_lists: Sequence[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[rows, vocab] float32 occurrence counts of each token id per row."""
    width = max((len(t) for t in token_lists), default=0)
    counts = torch.zeros((len(token_lists), vocab + 1), dtype=torch.float32, device=device)
    if width:
        padded = [list(t) + [vocab] * (width - len(t)) for t in token_lists]  # id `vocab` = padding
        ids = to_device(padded, torch.long, device)
        counts.scatter_add_(1, ids, torch.ones(ids.shape, dtype=torch.float32, device=device))
    return counts[:, :vocab]


def _column(values: Sequence[float], device: torch.device) -> torch.Tensor:
    return to_device(values, torch.float32, device)[:, None]
