"""ReplayGuard: duplicates rejected, gaps counted exactly, memory bounded, clock windows."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zbus import ReplayError
from zbus._replay import ReplayGuard

RUN = b"\x01" * 8


def test_in_order_stream_has_no_loss() -> None:
    guard = ReplayGuard()
    assert [guard.observe("p", RUN, s) for s in range(1, 6)] == [(0, False)] * 5


def test_gap_then_late_arrival_settles_to_exact_loss() -> None:
    guard = ReplayGuard()
    lost = 0
    for seq in (1, 2, 5, 3, 6):
        delta, _ = guard.observe("p", RUN, seq)
        lost += delta
    assert lost == 1  # only 4 never arrived


def test_duplicate_is_rejected_as_replay() -> None:
    guard = ReplayGuard()
    guard.observe("p", RUN, 1)
    guard.observe("p", RUN, 2)
    for seq in (1, 2):
        with pytest.raises(ReplayError) as err:
            guard.observe("p", RUN, seq)
        assert err.value.reason == "replay"


def test_runs_are_independent() -> None:
    guard = ReplayGuard()
    guard.observe("p", RUN, 7)
    assert guard.observe("p", b"\x02" * 8, 7) == (0, False)  # a restarted publisher
    assert guard.observe("q", RUN, 7) == (0, False)


def test_too_old_to_tell_is_rejected() -> None:
    guard = ReplayGuard(sequence_window=8)
    guard.observe("p", RUN, 90)
    guard.observe("p", RUN, 100)
    with pytest.raises(ReplayError):
        guard.observe("p", RUN, 92)
    assert guard.observe("p", RUN, 93) == (-1, True)  # fills one of the 9 missing


def test_run_table_is_bounded() -> None:
    guard = ReplayGuard(max_runs=3)
    for i in range(10):
        guard.observe(f"p{i}", RUN, 1)
    assert len(guard) == 3


@pytest.mark.parametrize(
    ("timestamp", "reason"), [(1000.0 - 301, "stale"), (1000.0 + 61, "future")]
)
def test_time_window(timestamp: float, reason: str) -> None:
    guard = ReplayGuard(max_age=300, max_skew=60)
    guard.check_time(1000.0 - 299, 1000.0)
    guard.check_time(1000.0 + 59, 1000.0)
    with pytest.raises(ReplayError) as err:
        guard.check_time(timestamp, 1000.0)
    assert err.value.reason == reason


@given(st.lists(st.integers(min_value=1, max_value=200), min_size=1, max_size=300), st.randoms())
def test_books_balance_for_any_arrival_order(seqs: list[int], rnd: random.Random) -> None:
    """Whatever arrives, in whatever order and with repeats: exactly the repeats are
    rejected, and accepted + lost == the span seen (the window is wider than the span)."""
    rnd.shuffle(seqs)
    guard = ReplayGuard(sequence_window=1024)
    lost = accepted = rejected = 0
    for seq in seqs:
        try:
            delta, _ = guard.observe("p", RUN, seq)
        except ReplayError:
            rejected += 1
            continue
        lost += delta
        accepted += 1
    distinct = set(seqs)
    assert rejected == len(seqs) - len(distinct)
    assert accepted == len(distinct)
    assert accepted + lost == max(seqs) - min(seqs) + 1
