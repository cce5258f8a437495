"""StepPlan.longest_decodes_first: decode chunks by decreasing context, prefill chunks where they were."""
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from trident.engine.plan import ScheduledChunk, StepPlan
from trident.engine.request import SamplingParams

PARAMS = SamplingParams(temperature=0.0, max_tokens=4)


def chunk(seq_id: int, start_pos: int, num_tokens: int) -> ScheduledChunk:
    return ScheduledChunk(seq_id=seq_id, token_ids=tuple(range(1, num_tokens + 1)), start_pos=start_pos,
                          block_table=(0,), sample=True, params=PARAMS)


def test_known_order() -> None:
    plan = StepPlan(chunks=(chunk(0, 5, 1), chunk(1, 0, 7), chunk(2, 9, 1), chunk(3, 5, 1), chunk(4, 2, 1)),
                    preempted_seq_ids=(8,))
    ordered = plan.longest_decodes_first()
    assert [c.seq_id for c in ordered.chunks] == [2, 1, 0, 3, 4]  # the prefill (seq 1) stays second; ties keep order
    assert ordered.preempted_seq_ids == (8,)


def test_already_ordered_plan_is_returned_as_is() -> None:
    plan = StepPlan(chunks=(chunk(0, 9, 1), chunk(1, 3, 1), chunk(2, 0, 4)))
    assert plan.longest_decodes_first() is plan


@given(st.lists(st.tuples(st.integers(0, 50), st.sampled_from([1, 1, 1, 3])), max_size=20))
def test_decodes_sorted_prefills_in_place(spec: list[tuple[int, int]]) -> None:
    plan = StepPlan(chunks=tuple(chunk(i, pos, n) for i, (pos, n) in enumerate(spec)))
    ordered = plan.longest_decodes_first().chunks
    assert sorted(c.seq_id for c in ordered) == list(range(len(spec)))
    for before, after in zip(plan.chunks, ordered):
        assert (before.num_tokens == 1) == (after.num_tokens == 1)
        if before.num_tokens != 1:
            assert after is before
    decodes = [c for c in ordered if c.num_tokens == 1]
    for a, b in zip(decodes, decodes[1:]):
        assert a.start_pos > b.start_pos or (a.start_pos == b.start_pos and a.seq_id < b.seq_id)
