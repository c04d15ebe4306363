"""Drain, counters and the at-least-once bookkeeping core (no sockets for the core)."""

from __future__ import annotations

from pathlib import Path

import pytest
from zbus_proxy._reliable import ReliableCore

import zbus

from .conftest import ProxyProcess


def frames(n: int) -> list[bytes]:
    return [b"t", str(n).encode(), b"s"]


def test_core_credit_ack_and_round_robin() -> None:
    core = ReliableCore(max_pending=10)
    for n in range(5):
        assert core.offer(frames(n))
    core.hello(b"a", 2, 0.0)
    core.hello(b"b", 1, 0.0)
    sent = list(core.dispatch(0.0))
    assert [(m, i) for m, i, _, _ in sent] == [(b"a", 1), (b"b", 2), (b"a", 3)]
    assert list(core.dispatch(0.0)) == []  # no credit left: a member gets only what it asked
    core.ack(b"a", [1], 0.1)
    assert [(m, i) for m, i, _, _ in core.dispatch(0.1)] == [(b"a", 4)]
    assert core.pending == 4 and core.counters["acked"] == 1


def test_core_redelivers_on_member_loss_and_ack_timeout_then_dead_letters() -> None:
    core = ReliableCore(max_attempts=2, ack_timeout=1.0, member_timeout=5.0)
    core.offer(frames(1))
    core.hello(b"a", 1, 0.0)
    assert [a for _, _, a, _ in core.dispatch(0.0)] == [1]
    core.tick(1.5)  # ack timeout: back to the queue, attempt 1 used
    assert core.counters["ack_timeouts"] == 1
    core.seen(b"a", 1.5)
    core.hello(b"b", 1, 1.5)
    (member, _, attempt, _), = core.dispatch(1.5)
    assert attempt == 2 and core.counters["redelivered"] == 1
    core.remove(member)  # second attempt dies with its member: dead letter
    assert core.counters["dead_lettered"] == 1 and core.pending == 0
    assert core.dead[0].attempts == 2 and core.dead[0].reason == "member_lost"


def test_core_is_bounded_and_counts_what_it_refuses() -> None:
    core = ReliableCore(max_pending=3, dead_letter_max=1, max_attempts=1)
    assert [core.offer(frames(n)) for n in range(5)] == [True] * 3 + [False] * 2
    assert core.counters["overflow"] == 2
    core.hello(b"a", 5000, 0.0)
    assert core.snapshot()["members"][b"a".hex()]["window"] == core.max_window
    ids = [i for _, i, _, _ in core.dispatch(0.0)]
    core.nack(b"a", ids, 0.0)
    assert core.counters["dead_lettered"] == 3 and len(core.dead) == 1
    assert core.counters["dead_letters_evicted"] == 2
    core.ack(b"a", [99], 0.0)
    assert core.counters["unknown_acks"] == 1


def test_subscriber_drain_handles_everything_already_sent(
    proxy_process: ProxyProcess, run_dir: Path, key: bytes
) -> None:
    """5,000 published before drain(): drain() runs the handlers of all of them, then the
    subscription is closed; the counters say so."""
    handled: list[int] = []
    dispatcher = zbus.Dispatcher()
    dispatcher.bind("notifications", "compute.#", lambda d: handled.append(d.sequence))
    conn = zbus.Connection(run_dir)
    sub = conn.subscribe(dispatcher, key)
    sub.ready()
    factory = zbus.MessageFactory(key, "pub1")
    with zbus.Connection(run_dir) as pub:
        for n in range(5000):
            pub.send_frames(factory.frames("notifications", "compute.x", {"n": n}))
        pub.flush()  # all of it is in the subscriber's pipe or queue now
    assert sub.process(5)
    assert sub.drain(10) == 4999
    assert handled == list(range(1, 5001))
    counters = sub.counters()
    assert counters["received"] == 5000 and counters["lost"] == 0 and counters["live"]
    assert counters["link"] == {"disconnects": 0, "reconnects": 0, "replaced": 0,
                                "resubscribed": 0, "last_outage": None}
    conn.close()


def test_drain_times_out_without_a_proxy(run_dir: Path, key: bytes) -> None:
    dispatcher = zbus.Dispatcher()
    dispatcher.bind("notifications", "compute.#", lambda d: None)
    conn = zbus.Connection(run_dir)
    sub = conn.subscribe(dispatcher, key)
    with pytest.raises(zbus.Timeout):
        sub.drain(0.2)
    conn.close()
