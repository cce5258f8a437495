"""The paged KV cache's bookkeeping: which physical blocks hold which sequence's keys and values.
Imports no torch.

The cache is ``num_blocks`` blocks of ``block_size`` token slots. A sequence's ``block_table`` lists
the physical blocks that hold its positions in order (position ``p`` lives in slot ``p % block_size``
of ``block_table[p // block_size]``).

Prefix caching: once a block is full of computed tokens it gets a hash that chains the hash of the
block before it with its own token ids, so two blocks have the same hash only if everything up to
and including them is the same (a blake2b digest, so an accidental or crafted collision is not a
concern). Full hashed blocks can be shared by several sequences (reference counted); the last,
partial block of a sequence is always private. A block whose reference count drops to 0 keeps its
hash and contents and becomes *evictable*: it still answers prefix look-ups (and is revived without
recomputation) until its slot is needed for a new allocation, least recently freed first. Blocks
without a hash are reused before any evictable block, lowest id first: a sequence allocated alone gets
consecutive blocks whatever ran before it, so its keys are one slice of the cache (the CPU decode step attends
over such a slice without gathering: trident/engine/cpu_decode.py).
"""

from __future__ import annotations

import hashlib
import heapq
from array import array
from collections import OrderedDict
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass

from trident.engine.request import Sequence

ROOT_HASH = bytes(16)
"""The parent hash of a sequence's first block."""


def hash_block(parent_hash: bytes, token_ids: SequenceOf[int]) -> bytes:
    """The hash of a full block: a digest of the previous block's hash and this block's token ids."""
    digest = hashlib.blake2b(parent_hash, digest_size=16)
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


def cdiv(a: int, b: int) -> int:
    """Ceiling division (blocks needed for ``a`` tokens in blocks of ``b``)."""
    return -(-a // b)


@dataclass
class PrefixCacheStats:
    """Prefix-cache counters, summed over admissions (a re-admission after preemption counts again)."""

    queried_tokens: int = 0
    """Tokens of the sequences that looked up the prefix cache."""
    hit_tokens: int = 0
    """Of those, tokens found in the cache (not recomputed)."""

    def record(self, queried: int, hit: int) -> None:
        self.queried_tokens += queried
        self.hit_tokens += hit

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class BlockManager:
    """Reference-counted KV blocks with prefix caching. Owns every ``seq.block_table`` it fills."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.stats = PrefixCacheStats()
        self._ref_counts = [0] * num_blocks
        self._hashes: list[bytes | None] = [None] * num_blocks
        self._free: list[int] = list(range(num_blocks))
        """Unreferenced blocks without a cached hash, reused first: a heap, the lowest id first."""
        self._evictable: OrderedDict[int, None] = OrderedDict()
        """Unreferenced blocks still in the prefix cache, least recently freed first."""
        self._cached: dict[bytes, int] = {}
        """hash -> the block that answers look-ups for it."""
        self._seq_hashes: dict[int, list[bytes]] = {}
        """seq_id -> hashes of its first full blocks (token ids only grow, so they stay valid)."""
        self._num_hashed: dict[int, int] = {}
        """seq_id -> how many blocks at the start of its table already carry their hash."""

    # ----------------------------------------------------------------------------------- queries

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: free plus evictable."""
        return len(self._free) + len(self._evictable)

    @property
    def num_evictable_blocks(self) -> int:
        return len(self._evictable)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by at least one sequence."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def block_hash(self, block_id: int) -> bytes | None:
        """The block's prefix hash, or None while it is not full of computed tokens."""
        return self._hashes[block_id]

    def find_cached_prefix(self, seq: Sequence, max_tokens: int) -> list[int]:
        """The longest chain of cached blocks matching the full blocks among ``seq.token_ids[:max_tokens]``.

        Pure look-up: nothing is referenced until the blocks are passed to :meth:`allocate`.
        """
        if not self.enable_prefix_caching:
            return []
        hashes = self._full_block_hashes(seq, max_tokens // self.block_size)
        found: list[int] = []
        for h in hashes:
            block_id = self._cached.get(h)
            if block_id is None:
                break
            found.append(block_id)
        return found

    # ------------------------------------------------------------------------------- mutations

    def allocate(self, seq: Sequence, num_tokens: int, cached_blocks: SequenceOf[int] = ()) -> bool:
        """Grow ``seq.block_table`` to cover positions ``[0, num_tokens)``.

        ``cached_blocks`` (from :meth:`find_cached_prefix`, only for a sequence that holds no blocks)
        come first and are shared or revived instead of taking fresh blocks. All or nothing: returns
        False and changes nothing when there are not enough free blocks.
        """
        table = seq.block_table
        if cached_blocks and table:
            raise ValueError(f"sequence {seq.seq_id} already holds blocks; cached blocks go first")
        num_new = cdiv(num_tokens, self.block_size) - len(table) - len(cached_blocks)
        if not cached_blocks:  # a running sequence growing: the common case, once per block it fills
            if num_new <= 0:
                return True
            if num_new > len(self._free) + len(self._evictable):
                return False
        else:
            num_revived = sum(1 for b in cached_blocks if self._ref_counts[b] == 0)
            if max(num_new, 0) + num_revived > self.num_free_blocks:
                return False
            for block_id in cached_blocks:  # revive before taking new blocks, which could evict them
                if self._ref_counts[block_id] == 0:
                    del self._evictable[block_id]
                self._ref_counts[block_id] += 1
                table.append(block_id)
            self._num_hashed[seq.seq_id] = len(cached_blocks)
        for _ in range(num_new):
            block_id = self._take_block()
            self._ref_counts[block_id] = 1
            table.append(block_id)
        return True

    def mark_computed(self, seq: Sequence) -> None:
        """Give a hash to every block now full of computed tokens (``seq.num_computed_tokens``)."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        start = self._num_hashed.get(seq.seq_id, 0)
        if num_full <= start:
            return
        hashes = self._full_block_hashes(seq, num_full)
        for i in range(start, num_full):
            block_id = seq.block_table[i]
            h = hashes[i]
            self._hashes[block_id] = h
            # Another block may already answer for this hash (two sequences computed the same prefix
            # at once); this one keeps the hash for its children's chain but stays private.
            self._cached.setdefault(h, block_id)
        self._num_hashed[seq.seq_id] = num_full

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references (its table empties). Idempotent.

        Blocks are released tail first, so a sequence's last blocks are evicted before its prefix.
        """
        for block_id in reversed(seq.block_table):
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] > 0:
                continue
            h = self._hashes[block_id]
            # Stays in the cache if it answers for its hash (or can, now that the first holder is gone).
            if h is not None and self._cached.setdefault(h, block_id) == block_id:
                self._evictable[block_id] = None
            else:
                self._hashes[block_id] = None
                heapq.heappush(self._free, block_id)
        seq.block_table.clear()
        self._num_hashed.pop(seq.seq_id, None)
        self._seq_hashes.pop(seq.seq_id, None)

    # -------------------------------------------------------------------------------- internals

    def _take_block(self) -> int:
        if self._free:
            return heapq.heappop(self._free)
        block_id, _ = self._evictable.popitem(last=False)
        h = self._hashes[block_id]
        if h is not None and self._cached.get(h) == block_id:
            del self._cached[h]
        self._hashes[block_id] = None
        return block_id

    def _full_block_hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """Hashes of the sequence's first ``num_blocks`` full blocks (memoized per sequence)."""
        hashes = self._seq_hashes.setdefault(seq.seq_id, [])
        bs = self.block_size
        tokens = seq.token_ids
        num_blocks = min(num_blocks, len(tokens) // bs)
        while len(hashes) < num_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else ROOT_HASH
            hashes.append(hash_block(parent, tokens[i * bs:(i + 1) * bs]))
        return hashes[:num_blocks]
