"""BlockManager: reference counts, chained prefix hashes, LRU eviction, and a randomized invariant check."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from trident.engine.block_manager import ROOT_HASH, BlockManager, cdiv, hash_block
from trident.engine.request import SamplingParams, Sequence

PARAMS = SamplingParams()


def make_seq(seq_id: int, tokens: list[int]) -> Sequence:
    return Sequence(seq_id=seq_id, request_id=f"r{seq_id}", sample_index=0, prompt_token_ids=list(tokens),
                    params=PARAMS)


def compute(bm: BlockManager, seq: Sequence, num_tokens: int | None = None) -> None:
    """Allocate and 'compute' the sequence up to num_tokens (default: all of it)."""
    num_tokens = seq.num_tokens if num_tokens is None else num_tokens
    assert bm.allocate(seq, num_tokens)
    seq.num_computed_tokens = num_tokens
    bm.mark_computed(seq)


def admit(bm: BlockManager, seq: Sequence) -> int:
    """Allocate a new sequence after its cached prefix (leaving the last token); returns the hit tokens."""
    cached = bm.find_cached_prefix(seq, seq.num_tokens - 1)
    assert bm.allocate(seq, seq.num_tokens, cached)
    seq.num_computed_tokens = len(cached) * bm.block_size
    return seq.num_computed_tokens


def test_allocate_and_free_count_blocks() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(0, list(range(10)))
    assert bm.allocate(seq, 10)
    assert len(seq.block_table) == 3 and len(set(seq.block_table)) == 3
    assert all(bm.ref_count(b) == 1 for b in seq.block_table)
    assert bm.num_free_blocks == 5 and bm.usage == 3 / 8
    assert bm.allocate(seq, 12)  # still inside the third block
    assert len(seq.block_table) == 3
    assert bm.allocate(seq, 13)
    assert len(seq.block_table) == 4
    bm.free(seq)
    assert seq.block_table == [] and bm.num_free_blocks == 8 and bm.usage == 0.0
    assert all(bm.ref_count(b) == 0 for b in range(8))
    bm.free(seq)  # idempotent
    assert bm.num_free_blocks == 8


def test_a_lone_sequence_gets_consecutive_blocks_whatever_ran_before() -> None:
    """Unhashed free blocks are reused lowest id first, so after other sequences come and go (freed in any order,
    tail first) a sequence allocated alone lies in consecutive blocks, its keys one slice of the cache."""
    bm = BlockManager(num_blocks=12, block_size=4)
    seqs = [make_seq(i, list(range(9))) for i in range(3)]
    for seq in seqs:
        assert bm.allocate(seq, 9)
    for i in (1, 0, 2):
        bm.free(seqs[i])
    lone = make_seq(9, list(range(30)))
    assert bm.allocate(lone, 30)
    assert lone.block_table == list(range(8))


def test_allocate_is_all_or_nothing() -> None:
    bm = BlockManager(num_blocks=3, block_size=2)
    a, b = make_seq(0, [1, 2, 3]), make_seq(1, [4, 5, 6])
    assert bm.allocate(a, 3)
    assert not bm.can_allocate(2)
    assert not bm.allocate(b, 3)
    assert b.block_table == [] and bm.num_free_blocks == 1
    assert bm.allocate(b, 2)


def test_only_full_computed_blocks_get_hashes() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(0, list(range(10)))
    compute(bm, seq, 6)
    assert bm.block_hash(seq.block_table[0]) == hash_block(ROOT_HASH, [0, 1, 2, 3])
    assert bm.block_hash(seq.block_table[1]) is None  # half full
    compute(bm, seq)
    h1 = hash_block(hash_block(ROOT_HASH, [0, 1, 2, 3]), [4, 5, 6, 7])
    assert bm.block_hash(seq.block_table[1]) == h1
    assert bm.block_hash(seq.block_table[2]) is None  # the partial last block stays private


def test_shared_prefix_is_reference_counted() -> None:
    bm = BlockManager(num_blocks=10, block_size=4)
    a = make_seq(0, list(range(12)) + [50])
    compute(bm, a)
    b = make_seq(1, list(range(8)) + [60, 61, 62])
    assert admit(bm, b) == 8
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] not in a.block_table
    assert [bm.ref_count(x) for x in a.block_table] == [2, 2, 1, 1]
    assert bm.stats.queried_tokens == 0  # look-ups alone record nothing; the scheduler records admissions
    bm.free(a)
    assert [bm.ref_count(x) for x in b.block_table] == [1, 1, 1]
    bm.free(b)
    assert bm.num_free_blocks == 10


def test_a_block_matches_only_with_its_whole_prefix() -> None:
    bm = BlockManager(num_blocks=10, block_size=2)
    a = make_seq(0, [1, 2, 3, 4, 5])
    compute(bm, a)
    same_second_block = make_seq(1, [9, 9, 3, 4, 5])
    assert bm.find_cached_prefix(same_second_block, 4) == []
    diverges_in_second = make_seq(2, [1, 2, 3, 9, 5])
    assert bm.find_cached_prefix(diverges_in_second, 4) == a.block_table[:1]
    whole = make_seq(3, [1, 2, 3, 4, 5])
    assert bm.find_cached_prefix(whole, 5) == a.block_table[:2]
    assert bm.find_cached_prefix(whole, 3) == a.block_table[:1]  # bounded by max_tokens


def test_freed_blocks_stay_cached_and_are_revived() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_seq(0, [1, 2, 3, 4, 5])
    compute(bm, a)
    full = a.block_table[:2]
    bm.free(a)
    assert bm.num_free_blocks == 4 and bm.num_evictable_blocks == 2
    assert all(bm.ref_count(x) == 0 for x in full)
    b = make_seq(1, [1, 2, 3, 4, 7, 8])
    assert admit(bm, b) == 4
    assert b.block_table[:2] == full
    assert bm.num_evictable_blocks == 0 and [bm.ref_count(x) for x in b.block_table] == [1, 1, 1]


def test_unhashed_blocks_are_reused_before_evictable_ones_in_lru_order() -> None:
    bm = BlockManager(num_blocks=5, block_size=2)
    a = make_seq(0, [1, 2, 3, 4])
    c = make_seq(1, [5, 6, 7, 8])
    compute(bm, a)
    compute(bm, c)
    a_blocks, c_blocks = list(a.block_table), list(c.block_table)
    bm.free(a)  # freed first: evicted first, its tail block before its head
    bm.free(c)
    d = make_seq(2, [9])
    assert bm.allocate(d, 2)
    assert d.block_table[0] not in a_blocks + c_blocks  # the never-used block goes first
    assert bm.allocate(d, 4)
    assert d.block_table[1] == a_blocks[1]
    assert bm.find_cached_prefix(make_seq(3, [1, 2, 3, 4]), 4) == a_blocks[:1]
    assert bm.find_cached_prefix(make_seq(4, [5, 6, 7, 8]), 4) == c_blocks
    assert bm.allocate(d, 6)
    assert d.block_table[2] == a_blocks[0]
    assert bm.find_cached_prefix(make_seq(5, [1, 2, 3, 4]), 4) == []
    assert bm.block_hash(a_blocks[0]) is None  # an evicted block forgets its hash


def test_reviving_a_block_saves_it_from_eviction_by_the_same_allocation() -> None:
    bm = BlockManager(num_blocks=3, block_size=2)
    a, c = make_seq(0, [1, 2, 3, 4]), make_seq(1, [7, 8])
    compute(bm, a)
    compute(bm, c)
    a_blocks, c_blocks = list(a.block_table), list(c.block_table)
    bm.free(a)  # a's blocks are now the least recently used
    bm.free(c)
    b = make_seq(2, [1, 2, 3, 4, 5])
    cached = bm.find_cached_prefix(b, 4)
    assert cached == a_blocks
    assert bm.allocate(b, 5, cached)
    assert b.block_table == a_blocks + c_blocks  # the new block evicted c's, not the revived ones
    assert bm.num_free_blocks == 0


def test_the_same_prefix_computed_twice_keeps_one_cached_copy() -> None:
    bm = BlockManager(num_blocks=6, block_size=2)
    a, b = make_seq(0, [1, 2, 3, 4]), make_seq(1, [1, 2, 3, 4])
    assert bm.allocate(a, 4) and bm.allocate(b, 4)  # both computed privately (admitted the same step)
    for s in (a, b):
        s.num_computed_tokens = 4
        bm.mark_computed(s)
    a_blocks = list(a.block_table)
    assert bm.find_cached_prefix(make_seq(2, [1, 2, 3, 4]), 4) == a_blocks
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 6 and bm.num_evictable_blocks == 2
    c = make_seq(3, [1, 2, 3, 4, 5])
    assert admit(bm, c) == 4 and c.block_table[:2] == a_blocks


def test_the_second_copy_takes_over_when_the_first_is_evicted() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b = make_seq(0, [1, 2]), make_seq(1, [1, 2])
    compute(bm, a)
    compute(bm, b)
    b_block = b.block_table[0]
    bm.free(a)
    filler = make_seq(2, [7])
    assert bm.allocate(filler, 6)  # takes the 2 unused blocks, then evicts a's block
    assert bm.find_cached_prefix(make_seq(3, [1, 2]), 2) == []
    bm.free(b)  # b's copy now answers for the hash instead of going back to the free list
    assert bm.num_evictable_blocks == 1
    assert bm.find_cached_prefix(make_seq(4, [1, 2]), 2) == [b_block]


def test_without_prefix_caching_nothing_is_hashed_or_shared() -> None:
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    a = make_seq(0, [1, 2, 3, 4])
    compute(bm, a)
    assert all(bm.block_hash(x) is None for x in a.block_table)
    assert bm.find_cached_prefix(make_seq(1, [1, 2, 3, 4, 5]), 4) == []
    bm.free(a)
    assert bm.num_evictable_blocks == 0 and bm.num_free_blocks == 4


# ------------------------------------------------------------------------------ randomized check

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.lists(st.integers(0, 1), min_size=1, max_size=12)),
        st.tuples(st.just("step"), st.integers(0, 30), st.integers(1, 5), st.integers(0, 1)),
        st.tuples(st.just("free"), st.integers(0, 30)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(num_blocks=st.integers(1, 12), block_size=st.integers(1, 4), ops=OPS)
def test_random_operations_keep_the_invariants(num_blocks: int, block_size: int, ops: list[tuple]) -> None:
    """Random sequences with heavily shared prefixes (tokens 0/1) grow, compute and free.

    A shadow records which token prefix each block's contents were computed from; every block a
    look-up returns must hold exactly the queried prefix, and nobody writes into a shared block.
    """
    bm = BlockManager(num_blocks, block_size)
    bs = block_size
    shadow: dict[int, tuple[int, ...]] = {}  # block -> the token prefix its slots were computed from
    live: list[Sequence] = []
    next_id = 0
    for op in ops:
        if op[0] == "add":
            seq = make_seq(next_id, op[1])
            next_id += 1
            cached = bm.find_cached_prefix(seq, seq.num_tokens - 1)
            for i, block in enumerate(cached):
                assert shadow[block] == tuple(seq.token_ids[:(i + 1) * bs])
            if bm.allocate(seq, len(cached) * bs, cached):
                seq.num_computed_tokens = len(cached) * bs
                live.append(seq)
            else:
                assert seq.block_table == []
                bm.free(seq)
        elif op[0] == "step" and live:
            seq = live[op[1] % len(live)]
            start = seq.num_computed_tokens
            end = min(start + op[2], seq.num_tokens)
            if end > start and bm.allocate(seq, end):
                for p in range(start, end):
                    block = seq.block_table[p // bs]
                    assert bm.ref_count(block) == 1, "wrote into a shared block"
                    shadow[block] = tuple(seq.token_ids[:p + 1])
                seq.num_computed_tokens = end
                bm.mark_computed(seq)
                if end == seq.num_tokens:
                    seq.token_ids.append(op[3])  # a generated token
        elif op[0] == "free" and live:
            seq = live.pop(op[1] % len(live))
            bm.free(seq)
        check_invariants(bm, live, shadow)
    for seq in live:
        bm.free(seq)
    assert bm.num_free_blocks == num_blocks
    assert all(bm.ref_count(b) == 0 for b in range(num_blocks))


def check_invariants(bm: BlockManager, live: list[Sequence], shadow: dict[int, tuple[int, ...]]) -> None:
    bs = bm.block_size
    refs = Counter(b for s in live for b in s.block_table)
    for block in range(bm.num_blocks):
        assert bm.ref_count(block) == refs[block]
    assert bm.num_free_blocks == bm.num_blocks - len(refs)
    owners: dict[int, list[tuple[Sequence, int]]] = {}
    for seq in live:
        assert len(seq.block_table) == cdiv(seq.num_computed_tokens, bs)
        assert len(set(seq.block_table)) == len(seq.block_table)
        for i, block in enumerate(seq.block_table):
            owners.setdefault(block, []).append((seq, i))
            if (i + 1) * bs <= seq.num_computed_tokens:
                assert shadow[block] == tuple(seq.token_ids[:(i + 1) * bs])
    for block, users in owners.items():
        if len(users) > 1:
            (first, index), *rest = users
            prefix = tuple(first.token_ids[:(index + 1) * bs])
            assert bm.block_hash(block) is not None
            for seq, i in users:
                assert i == index and seq.num_computed_tokens >= (i + 1) * bs
                assert tuple(seq.token_ids[:(i + 1) * bs]) == prefix
