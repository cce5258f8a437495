"""Snapshot: an O(1) view of the first items of an append-only list that behaves like the tuple of them."""

from __future__ import annotations

import copy
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trident.engine.results import Snapshot


def test_later_appends_are_not_part_of_a_snapshot() -> None:
    tokens = [1, 2, 3, 4]
    snap = Snapshot(tokens, 1, 3)
    tokens.extend([5, 6])
    assert len(snap) == 2 and list(snap) == [2, 3] and snap == (2, 3)
    assert snap[-1] == 3 and snap[1:] == (3,) and 4 not in snap and 3 in snap
    assert Snapshot(tokens, 1) == (2, 3, 4, 5, 6)  # stop defaults to the list's length now


def test_it_behaves_like_a_tuple() -> None:
    snap = Snapshot([9, 1, 2, 1], 1)
    assert snap == (1, 2, 1) and (1, 2, 1) == snap and snap == Snapshot([0, 1, 2, 1, 7], 1, 4)
    assert snap != [1, 2, 1] and snap != (1, 2) and snap != "abc"  # a tuple is not equal to a list either
    assert hash(snap) == hash((1, 2, 1)) and len({snap, (1, 2, 1)}) == 1
    assert snap + (5,) == (1, 2, 1, 5) and (0,) + snap == (0, 1, 2, 1) and snap + snap == (1, 2, 1) * 2
    assert isinstance(snap[0:2], tuple) and snap[::-1] == (1, 2, 1)[::-1] and snap[5:1] == ()
    assert snap.count(1) == 2 and snap.index(2) == 1 and list(reversed(snap)) == [1, 2, 1]
    assert repr(snap) == "(1, 2, 1)" and tuple(snap) == (1, 2, 1) and bool(Snapshot([1], 1)) is False
    with pytest.raises(IndexError):
        snap[3]
    with pytest.raises(IndexError):
        snap[-4]
    with pytest.raises(TypeError):
        snap + [1]  # as with a tuple


def test_bounds_are_checked() -> None:
    with pytest.raises(ValueError):
        Snapshot([1, 2], 1, 3)
    with pytest.raises(ValueError):
        Snapshot([1, 2], 2, 1)
    with pytest.raises(ValueError):
        Snapshot([1, 2], -1)


def test_pickle_and_copy_keep_only_the_snapshot_items() -> None:
    items = list(range(1000))
    snap = Snapshot(items, 998)
    restored = pickle.loads(pickle.dumps(snap))
    assert restored == (998, 999) and len(pickle.dumps(snap)) < 100  # not the whole list
    assert copy.deepcopy(snap) == snap and copy.copy(snap) == snap


@settings(max_examples=300, deadline=None)
@given(items=st.lists(st.integers(), max_size=20), data=st.data())
def test_a_snapshot_matches_the_tuple_of_its_items(items: list[int], data: st.DataObject) -> None:
    start = data.draw(st.integers(0, len(items)))
    stop = data.draw(st.integers(start, len(items)))
    snap = Snapshot(items, start, stop)
    expected = tuple(items[start:stop])
    items.extend(data.draw(st.lists(st.integers(), max_size=5)))  # the owner goes on appending
    assert snap == expected and tuple(snap) == expected and len(snap) == len(expected)
    assert hash(snap) == hash(expected)
    for i in range(-len(expected), len(expected)):
        assert snap[i] == expected[i]
    s = slice(data.draw(st.integers(-25, 25) | st.none()), data.draw(st.integers(-25, 25) | st.none()),
              data.draw(st.sampled_from([None, 1, 2, -1, -3])))
    assert snap[s] == expected[s]
