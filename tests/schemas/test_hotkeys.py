"""The hot-keys summary: bounded, exact while it fits, bounds that hold on any stream."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamsink.schemas.hotkeys import HotKeys


def test_exact_while_the_keys_fit() -> None:
    hot: HotKeys[str] = HotKeys(4)
    hot.add([("a", 5), ("b", 2)])
    hot.add([("a", 1), ("c", 7)])
    assert [(h.key, h.count, h.error) for h in hot.top()] == [("c", 7, 0), ("a", 6, 0), ("b", 2, 0)]
    assert hot.total == 15 and hot.floor == 0


def test_memory_stays_bounded_and_a_heavy_key_stays_on_top() -> None:
    hot: HotKeys[str] = HotKeys(8)
    rng = random.Random(1)
    for _ in range(200):
        window = Counter(f"k{rng.randrange(100_000)}" for _ in range(500))
        window["heavy"] += 50
        hot.add(window.items())
        assert len(hot) <= 8
    top = hot.top(1)[0]
    assert top.key == "heavy"
    assert top.count - top.error <= 200 * 50 <= top.count


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.dictionaries(st.integers(0, 40), st.integers(1, 30), max_size=30),
        min_size=1,
        max_size=12,
    ),
    st.integers(1, 6),
)
def test_counts_bound_the_true_counts(windows: list[dict[int, int]], capacity: int) -> None:
    hot: HotKeys[int] = HotKeys(capacity)
    truth: Counter[int] = Counter()
    for window in windows:
        hot.add(window.items())
        truth.update(window)
    assert len(hot) <= capacity
    for h in hot.top():
        assert h.count - h.error <= truth[h.key] <= h.count
    shown = {h.key for h in hot.top()}
    assert all(n <= hot.floor for key, n in truth.items() if key not in shown)


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity"):
        HotKeys(0)
