"""ReplayGuard: duplicates rejected, gaps counted exactly (beacons too), memory bounded,
clock windows."""

from __future__ import annotations

import contextlib
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zbus import ConfigError, ReplayError
from zbus._replay import ReplayGuard, ReplayPolicy

STREAM = b"\x01" * 8


def test_in_order_stream_has_no_loss() -> None:
    guard = ReplayGuard()
    assert [guard.observe("p", STREAM, s) for s in range(1, 6)] == [(0, False)] * 5


def test_gap_then_late_arrival_settles_to_exact_loss() -> None:
    guard = ReplayGuard()
    lost = 0
    for seq in (1, 2, 5, 3, 6):
        delta, _ = guard.observe("p", STREAM, seq)
        lost += delta
    assert lost == 1  # only 4 never arrived


def test_duplicate_is_rejected_as_replay() -> None:
    guard = ReplayGuard()
    guard.observe("p", STREAM, 1)
    guard.observe("p", STREAM, 2)
    for seq in (1, 2):
        with pytest.raises(ReplayError) as err:
            guard.observe("p", STREAM, seq)
        assert err.value.reason == "replay"


def test_streams_are_independent() -> None:
    guard = ReplayGuard()
    guard.observe("p", STREAM, 7)
    # another topic, or a restarted publisher
    assert guard.observe("p", b"\x02" * 8, 7) == (0, False)
    assert guard.observe("q", STREAM, 7) == (0, False)


def test_too_old_to_tell_is_rejected() -> None:
    guard = ReplayGuard(ReplayPolicy(sequence_window=8))
    guard.observe("p", STREAM, 90)
    guard.observe("p", STREAM, 100)
    with pytest.raises(ReplayError):
        guard.observe("p", STREAM, 92)
    assert guard.observe("p", STREAM, 93) == (-1, True)  # fills one of the 9 missing


def test_stream_table_is_bounded() -> None:
    guard = ReplayGuard(ReplayPolicy(max_streams=3))
    for i in range(10):
        guard.observe(f"p{i}", STREAM, 1)
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
            delta, _ = guard.observe("p", STREAM, seq)
        except ReplayError:
            rejected += 1
            continue
        lost += delta
        accepted += 1
    distinct = set(seqs)
    assert rejected == len(seqs) - len(distinct)
    assert accepted == len(distinct)
    assert accepted + lost == max(seqs) - min(seqs) + 1


def stream(i: int) -> bytes:
    return i.to_bytes(8, "big")


def flood(guard: ReplayGuard, publisher_id: str, streams: int) -> None:
    for i in range(streams):
        guard.observe(publisher_id, stream(10_000 + i), 1)


@pytest.mark.parametrize("per_publisher", [4, 100])
def test_one_publisher_flooding_streams_evicts_only_its_own(per_publisher: int) -> None:
    """With the per-publisher bound, a flood of run ids under one publisher id (all a key
    bound to it can make) leaves the other publishers' runs alone; without it (bound as
    large as the table) the flood pushes them out and their old messages pass again."""
    guard = ReplayGuard(ReplayPolicy(max_streams=20, max_streams_per_publisher=per_publisher))
    honest = [f"h{i}" for i in range(10)]
    for pid in honest:
        guard.observe(pid, STREAM, 1)
        guard.observe(pid, STREAM, 2)
    flood(guard, "x", 1000)
    replays = 0
    for pid in honest:
        try:
            guard.observe(pid, STREAM, 1)  # a replay of the honest run's first message
        except ReplayError:
            replays += 1
    if per_publisher == 4:
        assert replays == 10 and len(guard) == 14
    else:  # the documented limit of a table without the bound: evicted, so not told apart
        assert replays == 0


def test_a_publisher_s_oldest_stream_goes_first() -> None:
    guard = ReplayGuard(ReplayPolicy(max_streams_per_publisher=2))
    guard.observe("p", stream(1), 5)
    guard.observe("p", stream(2), 5)
    guard.observe("p", stream(1), 6)  # seen again: creation order, not recency, decides
    guard.observe("p", stream(3), 5)  # evicts run 1
    assert len(guard) == 2
    with pytest.raises(ReplayError):
        guard.observe("p", stream(2), 5)  # run 2 kept
    assert guard.observe("p", stream(1), 5) == (0, False)  # run 1 forgotten: a new baseline


def test_max_streams_per_publisher_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="max_streams_per_publisher"):
        ReplayGuard(ReplayPolicy(max_streams_per_publisher=0))


@given(
    st.lists(st.tuples(st.sampled_from("pqrs"), st.integers(0, 9), st.integers(1, 5)),
             max_size=200),
    st.integers(1, 12),
    st.integers(1, 5),
)
def test_stream_tables_stay_bounded_and_consistent(
    ops: list[tuple[str, int, int]], max_streams: int, per_publisher: int
) -> None:
    guard = ReplayGuard(
        ReplayPolicy(max_streams=max_streams, max_streams_per_publisher=per_publisher)
    )
    for pid, r, seq in ops:
        with contextlib.suppress(ReplayError):
            guard.observe(pid, stream(r), seq)
        by_publisher = guard._by_publisher
        assert {(p, k) for p, runs in by_publisher.items() for k in runs} == set(guard._streams)
        assert all(0 < len(runs) <= per_publisher for runs in by_publisher.values())
        assert len(guard) <= max_streams


@given(
    st.lists(
        st.one_of(st.integers(min_value=1, max_value=120),
                  st.tuples(st.just("beacon"), st.integers(min_value=0, max_value=130))),
        min_size=1, max_size=300),
    st.integers(min_value=1, max_value=64),
)
def test_books_match_a_reference_for_any_order_window_and_beacons(
    ops: list[int | tuple[str, int]], window: int
) -> None:
    """Against a plain-set reference model: whatever arrives (repeats, any order, beacons),
    the guard accepts a sequence exactly when the reference says it is new and within the
    window, and at every step accepted + lost == highest - floor + 1."""
    guard = ReplayGuard(ReplayPolicy(sequence_window=window))
    seen: set[int] = set()
    highest = floor = None
    lost = accepted = 0
    for op in ops:
        if isinstance(op, tuple):
            lost += guard.observe_beacon("p", STREAM, op[1])
            if highest is not None:
                highest = max(highest, op[1])
        else:
            new = highest is None or (op not in seen and op > highest - window)
            try:
                delta, _ = guard.observe("p", STREAM, op)
            except ReplayError:
                assert not new, op
                continue
            assert new, op
            seen.add(op)
            lost += delta
            accepted += 1
            highest = op if highest is None else max(highest, op)
            floor = op if floor is None else min(floor, op)
        if highest is not None and floor is not None:
            state = guard._streams[("p", STREAM)]
            assert (state.highest, state.floor) == (highest, floor)
            assert accepted + lost == highest - floor + 1


def test_a_beacon_reveals_a_lost_tail_and_late_messages_still_fill_it() -> None:
    guard = ReplayGuard()
    assert guard.observe_beacon("p", STREAM, 10) == 0  # no baseline: nothing to count
    for seq in (1, 2, 3):
        guard.observe("p", STREAM, seq)
    assert guard.observe_beacon("p", STREAM, 6) == 3  # 4, 5 and 6 never came
    assert guard.observe_beacon("p", STREAM, 6) == 0  # said once, counted once
    assert guard.observe_beacon("p", STREAM, 2) == 0  # an old beacon tells nothing new
    assert guard.observe("p", STREAM, 5) == (-1, True)  # late, not a replay
    assert guard.observe("p", STREAM, 7) == (0, False)  # the stream goes on
    with pytest.raises(ReplayError):
        guard.observe("p", STREAM, 5)


def test_a_huge_jump_costs_no_memory() -> None:
    """A signed sequence far ahead (up to 2^64 - 1) must not shift a bitmap by that much."""
    guard = ReplayGuard()
    guard.observe("p", STREAM, 1)
    assert guard.observe("p", STREAM, 2**64 - 1) == (2**64 - 3, False)
    state = guard._streams[("p", STREAM)]
    assert state.missing.bit_length() <= guard.window
    assert guard.observe_beacon("p", b"\x02" * 8, 2**64 - 1) == 0


def test_a_whole_stream_keeps_no_bitmap() -> None:
    """The usual case, a stream that arrives whole, keeps a bitmap of 0 whatever the window:
    memory per stream stays a few small ints (a million topics stay affordable)."""
    guard = ReplayGuard(ReplayPolicy(sequence_window=1 << 16))
    for seq in range(1, 5000):
        guard.observe("p", STREAM, seq)
    assert guard._streams[("p", STREAM)].missing == 0


def test_observe_run_records_exactly_what_observing_each_in_turn_would() -> None:
    """The batch fast path (ReplayGuard.observe_run) against the reference, message by
    message: after random runs, next in line or (``skip``, a pool member's share) ahead of
    it, every stream's state and every later verdict agree."""
    import random

    rng = random.Random(7)
    for window in (8, 64):
        policy = ReplayPolicy(sequence_window=window)
        for _ in range(200):
            fast, slow = ReplayGuard(policy), ReplayGuard(policy)
            fast.observe("p", b"s" * 8, 1)
            slow.observe("p", b"s" * 8, 1)
            highest = 1
            for _ in range(rng.randrange(1, 12)):
                gap = rng.choice([0, 0, 1, 3, window - 1, window, window + 5])
                count = rng.choice([1, 2, 5, window, window + 3])
                first = highest + 1 + gap
                taken = fast.observe_run("p", b"s" * 8, first, count, skip=True)
                assert taken
                for seq in range(first, first + count):
                    slow.observe("p", b"s" * 8, seq)
                highest = first + count - 1
                assert fast._streams == slow._streams, (window, gap, count)
            # A run behind, or ahead without skip, is refused and records nothing.
            before = dict(fast._streams)
            assert not fast.observe_run("p", b"s" * 8, highest, 2, skip=True)
            assert not fast.observe_run("p", b"s" * 8, highest + 2, 2)
            assert fast._streams == before
