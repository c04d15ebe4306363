"""ReplayGuard: duplicates rejected, gaps counted exactly, memory bounded, clock windows."""

from __future__ import annotations

import contextlib
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zbus import ConfigError, ReplayError
from zbus._replay import ReplayGuard, ReplayPolicy

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
    guard = ReplayGuard(ReplayPolicy(sequence_window=8))
    guard.observe("p", RUN, 90)
    guard.observe("p", RUN, 100)
    with pytest.raises(ReplayError):
        guard.observe("p", RUN, 92)
    assert guard.observe("p", RUN, 93) == (-1, True)  # fills one of the 9 missing


def test_run_table_is_bounded() -> None:
    guard = ReplayGuard(ReplayPolicy(max_runs=3))
    for i in range(10):
        guard.observe(f"p{i}", RUN, 1)
    assert len(guard) == 3


@pytest.mark.parametrize(
    ("timestamp", "reason"), [(1000.0 - 301, "stale"), (1000.0 + 61, "future")]
)
def test_time_window(timestamp: float, reason: str) -> None:
    guard = ReplayGuard(ReplayPolicy(max_age=300, max_skew=60))
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
    guard = ReplayGuard(ReplayPolicy(sequence_window=1024))
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


def run(i: int) -> bytes:
    return i.to_bytes(8, "big")


def flood(guard: ReplayGuard, publisher_id: str, runs: int) -> None:
    for i in range(runs):
        guard.observe(publisher_id, run(10_000 + i), 1)


@pytest.mark.parametrize("per_publisher", [4, 100])
def test_one_publisher_flooding_runs_evicts_only_its_own(per_publisher: int) -> None:
    """With the per-publisher bound, a flood of run ids under one publisher id (all a key
    bound to it can make) leaves the other publishers' runs alone; without it (bound as
    large as the table) the flood pushes them out and their old messages pass again."""
    guard = ReplayGuard(ReplayPolicy(max_runs=20, max_runs_per_publisher=per_publisher))
    honest = [f"h{i}" for i in range(10)]
    for pid in honest:
        guard.observe(pid, RUN, 1)
        guard.observe(pid, RUN, 2)
    flood(guard, "x", 1000)
    replays = 0
    for pid in honest:
        try:
            guard.observe(pid, RUN, 1)  # a replay of the honest run's first message
        except ReplayError:
            replays += 1
    if per_publisher == 4:
        assert replays == 10 and len(guard) == 14
    else:  # the documented limit of a table without the bound: evicted, so not told apart
        assert replays == 0


def test_a_publisher_s_oldest_run_goes_first() -> None:
    guard = ReplayGuard(ReplayPolicy(max_runs_per_publisher=2))
    guard.observe("p", run(1), 5)
    guard.observe("p", run(2), 5)
    guard.observe("p", run(1), 6)  # seen again: creation order, not recency, decides
    guard.observe("p", run(3), 5)  # evicts run 1
    assert len(guard) == 2
    with pytest.raises(ReplayError):
        guard.observe("p", run(2), 5)  # run 2 kept
    assert guard.observe("p", run(1), 5) == (0, False)  # run 1 forgotten: a new baseline


def test_max_runs_per_publisher_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="max_runs_per_publisher"):
        ReplayGuard(ReplayPolicy(max_runs_per_publisher=0))


@given(
    st.lists(st.tuples(st.sampled_from("pqrs"), st.integers(0, 9), st.integers(1, 5)),
             max_size=200),
    st.integers(1, 12),
    st.integers(1, 5),
)
def test_run_tables_stay_bounded_and_consistent(
    ops: list[tuple[str, int, int]], max_runs: int, per_publisher: int
) -> None:
    guard = ReplayGuard(ReplayPolicy(max_runs=max_runs, max_runs_per_publisher=per_publisher))
    for pid, r, seq in ops:
        with contextlib.suppress(ReplayError):
            guard.observe(pid, run(r), seq)
        by_publisher = guard._by_publisher
        assert {(p, k) for p, runs in by_publisher.items() for k in runs} == set(guard._runs)
        assert all(0 < len(runs) <= per_publisher for runs in by_publisher.values())
        assert len(guard) <= max_runs
