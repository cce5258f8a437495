"""Tensor-parallel layers: each holds this rank's slice of a loaded layer's weights, and the collective that makes
its output whole again.

- :class:`ColumnParallelLinear`: some output features (rows of the weight); no communication, the output stays
  split (a rank's attention heads, its slice of an MLP's intermediate features).
- :class:`RowParallelLinear`: some input features (columns); each rank's product is a partial sum, all-reduced
  (the bias added once, after the sum).
- :class:`VocabParallelEmbedding`: a slice of the vocabulary; ids outside it look up zeros, and the all-reduce
  leaves each token the one rank's row that holds it. Its ``logits`` (tied embeddings) and
  :class:`VocabParallelLMHead` compute this rank's slice of the logits and all-gather the full rows.
- :class:`ReducedMoeBlock`: an MoE block whose routed and shared experts hold slices of their intermediate
  features; their partial outputs are summed and all-reduced once.

The slices are copies (``torch.cat`` of ranges), so the full tensors they came from can be freed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from trident.distributed.group import TensorParallel
from trident.models.layers import Linear, linear

Ranges = Sequence[tuple[int, int]]
"""(start, length) ranges of one dimension, kept in this order."""


def even_share(count: int, size: int, rank: int) -> tuple[int, int]:
    """(start, length) of rank ``rank``'s share of ``count`` things (features, experts) split evenly over ``size``
    ranks (the caller checked that they divide)."""
    length = count // size
    return rank * length, length


def even_shares(count: int, size: int) -> list[tuple[int, int]]:
    """:func:`even_share` of every rank, rank 0 first."""
    return [even_share(count, size, rank) for rank in range(size)]


def take(tensor: torch.Tensor, ranges: Ranges, dim: int = 0) -> torch.Tensor:
    """A new contiguous tensor of ``tensor``'s ranges along ``dim``, concatenated."""
    return torch.cat([tensor.narrow(dim, start, length) for start, length in ranges], dim=dim).contiguous()


def _parameter(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


def _empty_linear(cls: type[Linear], in_features: int, out_features: int, bias: bool) -> Linear:
    """A ``cls`` of the given shape whose parameters are set next (created on the meta device: nothing
    allocated)."""
    with torch.device("meta"):
        return cls(in_features, out_features, bias=bias)


class ColumnParallelLinear(Linear):
    """This rank's output features of a Linear: the rows ``ranges`` of its weight and bias, in that order (the
    fused qkv_proj keeps its q heads, then its k heads, then its v heads; gate_up_proj its gate rows, then its up
    rows). No communication."""

    @classmethod
    def shard(cls, full: Linear, ranges: Ranges) -> ColumnParallelLinear:
        rows = sum(length for _, length in ranges)
        layer = _empty_linear(cls, full.in_features, rows, full.bias is not None)
        layer.weight = _parameter(take(full.weight, ranges))
        if full.bias is not None:
            layer.bias = _parameter(take(full.bias, ranges))
        return layer


def linear_columns(full: Linear, start: int, length: int) -> Linear:
    """A Linear of ``full``'s input features ``start : start + length`` (its weight's columns), without bias."""
    layer = _empty_linear(Linear, length, full.out_features, bias=False)
    layer.weight = _parameter(take(full.weight, ((start, length),), dim=1))
    return layer


class RowParallelLinear(nn.Module):
    """This rank's input features of a linear layer: ``layer`` (a Linear, or a QuantizedLinear cut by
    trident/distributed/quantized.py) holds the columns ``start : start + length`` of its weight and no bias, so its
    product is a partial sum over the ranks. With ``reduce`` it is all-reduced here and the bias (this module's)
    added after; without, the caller reduces the sum of several such outputs once (an MoE block), and rank 0 alone
    adds the bias."""

    def __init__(self, layer: nn.Module, bias: torch.Tensor | None, parallel: TensorParallel,
                 reduce: bool = True) -> None:
        super().__init__()
        self.layer = layer
        self.bias = None if bias is None else _parameter(bias)
        self.parallel = parallel
        self.reduce = reduce

    @classmethod
    def of(cls, full: nn.Module, columns: nn.Module, parallel: TensorParallel,
           reduce: bool = True) -> RowParallelLinear:
        """``columns`` (this rank's input features of ``full``, without bias: :func:`linear_columns`, or
        trident/distributed/quantized.py's for a quantized layer) with a copy of ``full``'s bias."""
        return cls(columns, None if full.bias is None else full.bias.detach().clone(), parallel, reduce)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(x)
        if self.reduce:
            self.parallel.all_reduce(y)
        elif not self.parallel.is_driver:
            return y
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows ``start : start + rows`` of a [vocab_size, hidden] table (the last rank's slice padded with zero rows
    when the vocabulary does not split evenly)."""

    def __init__(self, weight: torch.Tensor, vocab_size: int, start: int, parallel: TensorParallel) -> None:
        super().__init__()
        self.weight = _parameter(weight)
        self.vocab_size = vocab_size
        self.start = start
        self.parallel = parallel

    @classmethod
    def shard(cls, full: torch.Tensor, parallel: TensorParallel) -> VocabParallelEmbedding:
        """This rank's slice of the full table ``full`` [vocab_size, hidden]."""
        vocab_size = full.shape[0]
        rows = -(-vocab_size // parallel.size)
        start = parallel.rank * rows
        kept = max(0, min(rows, vocab_size - start))
        weight = full.new_zeros((rows, full.shape[1]))
        weight[:kept] = full[start: start + kept]
        return cls(weight, vocab_size, start, parallel)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [...] -> embeddings [..., hidden]: the one rank holding each id adds its row, the others zeros."""
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return self.parallel.all_reduce(out)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., hidden] -> [..., vocab_size]: this rank's slice of the logits, all-gathered (the table as a
        tied output projection)."""
        full = self.parallel.gather_last_dim(linear(hidden, self.weight))
        if full.shape[-1] == self.vocab_size:
            return full
        return full[..., : self.vocab_size].contiguous()


class VocabParallelLMHead(VocabParallelEmbedding):
    """An untied LM head split by vocabulary: ``forward`` gives the full logits (:meth:`logits`)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits(hidden)


class ReducedMoeBlock(nn.Module):
    """An MoE block (trident/moe/block.py) whose experts hold slices of their intermediate features: its output,
    routed experts plus the shared expert, is a partial sum, all-reduced here once. The router is whole on every
    rank, so every rank routes every token alike."""

    def __init__(self, block: nn.Module, parallel: TensorParallel) -> None:
        super().__init__()
        self.block = block
        self.parallel = parallel

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.parallel.all_reduce(self.block(hidden))
