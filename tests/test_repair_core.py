"""Repair's I/O-free halves (zbus._repair): what a publisher keeps, and how a subscriber's
core asks for gaps, holds what arrives behind them and hands the stream on in order."""

from __future__ import annotations

from typing import Any

import pytest

import zbus
from zbus._dispatch import ConsumerCore
from zbus._repair import Ask, RepairPolicy, Retention, envelope_head
from zbus._replay import ReplayGuard, ReplayPolicy

KEY = b"k" * 32


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _stream(count: int, clock: Clock, batch_at: tuple[int, int] | None = None
            ) -> list[list[bytes]]:
    """``count`` messages of one stream (one envelope each, or one batch where asked)."""
    factory = zbus.MessageFactory(KEY, "pub", clock=clock)
    out = []
    n = 1
    while n <= count:
        if batch_at is not None and n == batch_at[0]:
            out.append(factory.batch("ex", "r.k", list(range(batch_at[0], batch_at[1] + 1))))
            n = batch_at[1] + 1
        else:
            out.append(factory.frames("ex", "r.k", n))
            n += 1
    return out


def _core(clock: Clock, policy: RepairPolicy | None = None,
          window: int = 4096) -> tuple[ConsumerCore, list[Any]]:
    got: list[Any] = []
    dispatcher = zbus.Dispatcher()
    dispatcher.bind("ex", "#", lambda d: got.append(d.payload))
    core = ConsumerCore(dispatcher, KEY, clock=clock,
                        replay=ReplayGuard(ReplayPolicy(sequence_window=window)),
                        repair=policy or RepairPolicy(interval=10.0))
    return core, got


def _drain(core: ConsumerCore, got: list[Any]) -> list[Any]:
    while (delivery := core.next_ready()) is not None:
        core.run_handlers(delivery)
    return got


def test_a_gap_is_asked_for_held_behind_and_handed_on_in_order_once_repaired() -> None:
    clock = Clock()
    frames = _stream(10, clock)
    core, got = _core(clock)
    for i in [0, 1, 2, 5, 6, 7, 8, 9]:  # 4 and 5 lost
        core.feed(frames[i])
    assert _drain(core, got) == [1, 2, 3]  # 6..10 wait behind the gap
    assert core.stats.lost == 2 and core.stats.repair_requested == 2
    assert core.book is not None and len(core.book.asks) == 1
    ask = core.book.asks[0]
    assert (ask.publisher_id, ask.ranges) == ("pub", [[4, 5]])
    for i in (3, 4):
        core.feed(frames[i], repaired=True)
    assert _drain(core, got) == list(range(1, 11))
    assert core.stats.lost == 0 and core.stats.repaired == 2
    assert core.stats.unrepairable == 0 and not core.stats.rejected
    assert len(core.book) == 0 and core.book.held == 0


def test_a_gap_older_than_the_interval_is_counted_once_and_the_rest_goes_on(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    frames = _stream(3, clock)
    core, got = _core(clock, RepairPolicy(interval=2.0, retry=0.5))
    core.feed(frames[0])
    core.feed(frames[2])
    assert _drain(core, got) == [1]
    clock.now += 1.0
    core.tick()  # asked again, not yet given up
    assert core.book is not None and len(core.book.asks) == 2
    assert _drain(core, got) == [1]
    clock.now += 1.5
    core.tick()
    assert _drain(core, got) == [1, 3]
    assert core.stats.unrepairable == 1 and core.stats.lost == 1
    assert "DATALOSS" in caplog.text
    core.tick()
    assert core.stats.unrepairable == 1  # once
    # The given-up one arriving after all is delivered (out of order), not held.
    core.feed(frames[1], repaired=True)
    assert _drain(core, got) == [1, 3, 2]


def test_repairs_of_what_was_had_are_duplicates_not_replays() -> None:
    clock = Clock()
    frames = _stream(3, clock)
    core, got = _core(clock)
    for f in frames:
        core.feed(f)
    core.feed(frames[1], repaired=True)
    assert _drain(core, got) == [1, 2, 3]
    assert core.stats.repair_duplicates == 1 and not core.stats.rejected
    core.feed(frames[1])  # the same copy on the data path is a replay, as before
    assert core.stats.rejected == {"replay": 1}


def test_a_lost_tail_shown_by_a_beacon_is_asked_for_and_repaired() -> None:
    clock = Clock()
    factory = zbus.MessageFactory(KEY, "pub", clock=clock)
    frames = [factory.frames("ex", "r.k", n) for n in range(1, 6)]
    beacon = factory.beacons()[0]
    core, got = _core(clock)
    for f in frames[:3]:
        core.feed(f)
    core.feed(beacon)
    assert core.book is not None and core.book.asks[-1].ranges == [[4, 5]]
    for f in frames[3:]:
        core.feed(f, repaired=True)
    assert _drain(core, got) == [1, 2, 3, 4, 5]
    assert core.stats.lost == 0 and core.stats.repaired == 2


def test_a_batch_answer_wider_than_the_gap_fills_it_and_drops_the_rest() -> None:
    clock = Clock()
    factory = zbus.MessageFactory(KEY, "pub", clock=clock)
    singles = [factory.frames("ex", "r.k", n) for n in range(1, 3)]
    batch = factory.batch("ex", "r.k", [3, 4, 5, 6])
    after = factory.frames("ex", "r.k", 7)
    core, got = _core(clock)
    for f in singles:
        core.feed(f)
    core.feed(after)  # 3..6 lost
    core.feed(singles[1], repaired=True)
    core.feed(batch, repaired=True)
    assert _drain(core, got) == [1, 2, 3, 4, 5, 6, 7]
    assert core.stats.repair_duplicates == 1 and core.stats.lost == 0


def test_a_gap_beyond_the_sequence_window_is_still_repaired() -> None:
    clock = Clock()
    frames = _stream(40, clock)
    core, got = _core(clock, window=8)
    core.feed(frames[0])
    core.feed(frames[39])  # 2..39 missing: far beyond the guard's window of 8
    for f in frames[1:39]:
        core.feed(f, repaired=True)
    assert _drain(core, got) == list(range(1, 41))
    assert core.stats.lost == 0 and not core.stats.rejected


def test_more_held_than_max_held_gives_the_oldest_gap_up() -> None:
    clock = Clock()
    frames = _stream(8, clock)
    core, got = _core(clock, RepairPolicy(interval=10.0, max_held=3))
    core.feed(frames[0])
    for f in frames[2:]:  # 2 lost; 3..8 held: more than 3
        core.feed(f)
    assert _drain(core, got) == [1, 3, 4, 5, 6, 7, 8]
    assert core.stats.unrepairable == 1 and core.book is not None and core.book.held == 0


def test_repair_off_keeps_todays_behaviour() -> None:
    clock = Clock()
    frames = _stream(3, clock)
    core, got = _core(clock, RepairPolicy(interval=0))
    core.feed(frames[0])
    core.feed(frames[2])
    assert core.book is None and _drain(core, got) == [1, 3] and core.stats.lost == 1


def test_retention_finds_kept_envelopes_and_says_what_is_gone() -> None:
    clock = Clock()
    frames = _stream(9, clock, batch_at=(4, 6))  # 1 2 3 [4 5 6] 7 8 9
    retention = Retention(RepairPolicy(interval=10.0))
    for f in frames:
        stream, first, count = envelope_head(f[1])
        retention.keep(clock.now, stream, first, count, f)
    stream = envelope_head(frames[0][1])[0]
    found, gone = retention.find(stream, [(5, 5), (8, 12)])
    assert [envelope_head(f[1])[1:] for f in found] == [(4, 3), (8, 1), (9, 1)]
    assert gone == [[10, 12]]
    assert retention.find(b"x" * 8, [(1, 2)]) == ([], [[1, 2]])
    # An envelope the asker could not take (a frame over its limit) is answered as gone.
    limit = max(len(x) for x in frames[0]) + 1
    found, gone = retention.find(stream, [(4, 4), (8, 8)], max_bytes=limit)
    assert [envelope_head(f[1])[1:] for f in found] == [(8, 1)] and gone == [[4, 4]]
    # By time: everything kept more than the interval ago goes.
    retention.expire(clock.now + 11)
    assert retention.size == 0 and retention.streams == {}


def test_retention_is_bounded_in_bytes_oldest_first() -> None:
    clock = Clock()
    frames = _stream(10, clock)
    size = sum(len(x) for x in frames[0])
    retention = Retention(RepairPolicy(interval=10.0, retain_bytes=3 * size + 2))
    for f in frames:
        retention.keep(clock.now, *envelope_head(f[1]), f)
    retention.expire(clock.now)
    stream = envelope_head(frames[0][1])[0]
    found, gone = retention.find(stream, [(1, 10)])
    assert len(found) <= 3 and gone == [[1, 10 - len(found)]]
    assert retention.evicted == 10 - len(found)


@pytest.mark.parametrize("body", [
    b"\xc1", b"\x90", [1, "p", b"x" * 8, []], [1, "p", b"short", [[1, 2]]],
    [1, "p", b"x" * 8, [[3, 2]]], [1, "p", b"x" * 8, [[0, 2]]], [-1, "p", b"x" * 8, [[1, 2]]],
    [1, "", b"x" * 8, [[1, 2]]], [1, "p", b"x" * 8, [[1, 2]] * 65],
    [1, "p", b"x" * 8, [[1, 200_000]]], [1, "p", b"x" * 8, [[1, 1.5]]],
    [1, "p", b"x" * 8, [[True, 2]]], [1, "p", b"x" * 8, [[1, 2]], 0, 5],
])
def test_hostile_requests_are_refused(body: Any) -> None:
    import msgpack
    if isinstance(body, list) and len(body) == 4:
        body = [*body, 1 << 20]
    raw = body if isinstance(body, bytes) else msgpack.packb(body)
    with pytest.raises(ValueError):
        Ask.decode(raw)


def test_a_request_round_trips() -> None:
    ask = Ask("pub", b"s" * 8, [[1, 3], [7, 7]])
    assert Ask.decode(ask.encode(42, 1024)) == (42, "pub", b"s" * 8, [[1, 3], [7, 7]], 1024)


def test_a_far_jump_is_asked_for_within_what_one_request_may_name() -> None:
    from zbus._repair import MAX_ASK_SEQUENCES

    clock = Clock()
    factory = zbus.MessageFactory(KEY, "pub", clock=clock)
    first = factory.frames("ex", "r.k", 1)
    factory._streams[first[0]].next = 10**9  # a peer that jumps far ahead
    far = factory.frames("ex", "r.k", 2)
    core, _ = _core(clock)
    core.feed(first)
    core.feed(far)
    assert core.book is not None
    (ask,) = core.book.asks
    assert ask.ranges == [[2, 1 + MAX_ASK_SEQUENCES]]
    Ask.decode(ask.encode(1, 1 << 20))  # what the proxy accepts


def test_what_nobody_keeps_is_given_up_after_a_grace_for_what_is_on_its_way() -> None:
    """A beacon can overtake messages still queued at the proxy: their publisher gone, the
    gap is given up after a second, not at once, and what arrives meanwhile is no loss."""
    from zbus._repair import GONE_GRACE

    clock = Clock()
    factory = zbus.MessageFactory(KEY, "pub", clock=clock)
    frames = [factory.frames("ex", "r.k", n) for n in range(1, 6)]
    beacon = factory.beacons()[0]
    core, got = _core(clock)
    core.feed(frames[0])
    core.feed(beacon)  # says 5: 2..5 look missing, but are on their way
    assert core.book is not None
    key = ("pub", envelope_head(frames[0][1])[0])
    core.book.give_up_soon(key, [[2, 5]], clock.now, GONE_GRACE)
    core.tick()
    for f in frames[1:]:
        core.feed(f)
    assert _drain(core, got) == [1, 2, 3, 4, 5]
    assert core.stats.lost == 0 and core.stats.unrepairable == 0


def test_a_message_given_up_that_arrives_while_its_stream_waits_is_still_delivered() -> None:
    clock = Clock()
    frames = _stream(6, clock)
    core, got = _core(clock, RepairPolicy(interval=2.0))
    core.feed(frames[0])
    core.feed(frames[2])  # 2 missing
    clock.now += 1.5
    core.feed(frames[5])  # 4, 5 missing, found later
    clock.now += 1.0
    core.tick()  # 2 given up; 4 and 5 still within the interval: the stream stays open
    core.feed(frames[1], repaired=True)  # 2 after all
    core.feed(frames[3])
    core.feed(frames[4])
    assert sorted(_drain(core, got)) == [1, 2, 3, 4, 5, 6] and core.stats.unrepairable == 1
