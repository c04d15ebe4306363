"""At-least-once pools against the fast path, with a member SIGKILLed mid-stream.

The proxy is a real ``zbus-proxy`` process; the at-least-once component
(``zbus_proxy._reliable.ReliablePool``) runs in the test process beside it, on the proxy's
run directory, as the proxy will run it once wired in. Workers are processes that write one
line per handled message (one ``os.write``, before the ack) to their own file: that file is
the exact record of what each handler did, even for a SIGKILLed worker.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from zbus_proxy._reliable import ReliablePool

import zbus

from .agents import Agent
from .conftest import ProxyProcess, Spawn, spawner
from .reliability_agents import RAgent

BINDING = "notifications/compute.#"
KEY = "compute.instance.create.end"
COUNT = 3000

@pytest.fixture
def spawn(run_dir: Path, key: bytes, agents: list[Agent]) -> Spawn:
    return spawner(RAgent, run_dir, key, agents)


def lines(path: Path) -> list[tuple[str, int, str]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        pub, seq, mid = line.split()
        out.append((pub, int(seq), mid))
    return out


def wait_for(done: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)  # polling files another process writes: no event to wait on


def publish(run_dir: Path, key: bytes, first: int, count: int,
            factory: zbus.MessageFactory) -> None:
    with zbus.Connection(run_dir, settings=zbus.Settings(send_timeout=10)) as conn:
        for n in range(first, first + count):
            conn.send_frames(factory.frames("notifications", KEY, {"n": n}))


@pytest.fixture
def reliable_pool(proxy_process: ProxyProcess, run_dir: Path) -> Iterator[ReliablePool]:
    ctx: zmq.Context[Any] = zmq.Context()
    settings = zbus.Settings(heartbeat_ivl=0.2, heartbeat_timeout=1.0)
    pool = ReliablePool("billing", [BINDING], zbus.Endpoints(run_dir), settings, ctx,
                        ack_timeout=30.0)
    pool.start()
    try:
        yield pool
    finally:
        pool.stop()
        ctx.term()


def workers(spawn: Spawn, run_dir: Path, mode: str, *extra: str) -> list[tuple[Agent, Path]]:
    out = []
    for name in ("wA", "wB"):
        path = run_dir / f"{name}.out"
        agent = spawn("worker", name, "--pool", "billing", "--mode", mode, "--bind", BINDING,
                      "--out", str(path), "--delay", "0.002", "--heartbeat", "0.2", *extra)
        out.append((agent, path))
    for agent, _ in out:
        agent.wait_ready()
    return out


def test_at_least_once_pool_survives_a_sigkilled_member(
    reliable_pool: ReliablePool, run_dir: Path, key: bytes, spawn: Spawn
) -> None:
    """Every message is handled at least once by the pool; the duplicates are exactly the
    messages the dead member handled but had not acked, and each is found by message id."""
    (a, a_out), (b, b_out) = workers(spawn, run_dir, "reliable", "--window", "20")
    factory = zbus.MessageFactory(key, "pub1")
    publish(run_dir, key, 0, COUNT, factory)
    wait_for(lambda: len(lines(a_out)) >= 300, 30, "worker A to get going")
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(10)
    killed = time.monotonic()
    wait_for(lambda: reliable_pool.stats()["members_lost"] == 1, 10, "the pool to notice")
    noticed = time.monotonic() - killed
    wait_for(lambda: reliable_pool.stats()["acked"] == COUNT, 60, "every message acked")
    b.tell_stop()
    assert b.wait(15) == 0

    handled = lines(a_out) + lines(b_out)
    by_id = Counter(mid for _, _, mid in handled)
    assert {seq for _, seq, _ in handled} == set(range(1, COUNT + 1))  # at least once
    assert len(by_id) == COUNT
    dups = sum(n - 1 for n in by_id.values())
    stats = reliable_pool.stats()
    assert stats["accepted"] == COUNT and stats["overflow"] == 0
    assert stats["queued"] == 0 and stats["in_flight"] == 0 and stats["dead_lettered"] == 0
    # Each delivery is acked once or died with A and went out again: no third fate.
    assert stats["delivered"] == COUNT + stats["redelivered"]
    # A had at most its window in flight; of those, the ones it had written are duplicates.
    assert 0 < stats["redelivered"] <= 20
    assert dups <= stats["redelivered"]
    dup_ids = {mid for mid, n in by_id.items() if n > 1}
    assert dup_ids <= {mid for _, _, mid in lines(a_out)}
    print(f"\nFAULT | at-least-once member SIGKILL | sent {COUNT} | delivered {len(by_id)} "
          f"| lost 0 | dups {dups} (redelivered {stats['redelivered']}) | "
          f"recovery {noticed:.3f}s")


def test_fast_pool_loss_on_a_sigkilled_member_is_counted(
    proxy_process: ProxyProcess, run_dir: Path, key: bytes, spawn: Spawn
) -> None:
    """The same fault on the PUSH/PULL fast path: what the dead member had prefetched is
    lost. The publisher's sequence numbers count it: sent - handled, exactly."""
    (a, a_out), (b, b_out) = workers(spawn, run_dir, "fast")
    factory = zbus.MessageFactory(key, "pub1")
    half = COUNT // 2
    publish(run_dir, key, 0, half, factory)
    wait_for(lambda: len(lines(a_out)) >= 300, 30, "worker A to get going")
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(10)
    # With A gone (its ipc connection closed), everything from now on goes to B.
    before = lines(a_out)
    publish(run_dir, key, half, COUNT - half, factory)
    wait_for(lambda: any(seq == COUNT for _, seq, _ in lines(b_out)), 60, "the last message")
    b.tell_stop()
    assert b.wait(15) == 0
    assert lines(a_out) == before

    handled = lines(a_out) + lines(b_out)
    seqs = Counter(seq for _, seq, _ in handled)
    assert all(n == 1 for n in seqs.values())  # at most once
    lost = COUNT - len(seqs)
    missing = set(range(1, COUNT + 1)) - set(seqs)
    assert lost == len(missing) > 0, "nothing was lost: A had prefetched nothing"
    # What is lost is what A had received and not handled: all from the first half.
    assert max(missing) <= half
    print(f"\nFAULT | fast pool member SIGKILL | sent {COUNT} | delivered {len(seqs)} | "
          f"lost {lost} (counted by publisher sequence) | dups 0 | recovery -")


def test_at_least_once_poison_message_is_dead_lettered(
    reliable_pool: ReliablePool, run_dir: Path, key: bytes
) -> None:
    """A handler that always raises: NACKed, retried max_attempts times, then dead-lettered
    and readable back; the other messages are unaffected."""
    seen: Counter[int] = Counter()

    def handler(delivery: zbus.Delivery) -> None:
        seen[delivery.payload["n"]] += 1
        if delivery.payload["n"] == 3:
            raise RuntimeError("poison")

    dispatcher = zbus.Dispatcher()
    dispatcher.bind("notifications", "compute.#", handler)
    conn = zbus.Connection(run_dir)
    member = conn.join_reliable_pool("billing", dispatcher, key)
    member.ready()
    factory = zbus.MessageFactory(key, "pub1")
    publish(run_dir, key, 0, 10, factory)
    deadline = time.monotonic() + 20
    while reliable_pool.stats()["dead_lettered"] < 1 or reliable_pool.stats()["acked"] < 9:
        assert time.monotonic() < deadline, reliable_pool.stats()
        member.process(0.05)
    assert member.drain(5) == 0
    conn.close()
    dead = reliable_pool.dead_letters()
    assert len(dead) == 1 and dead[0].attempts == reliable_pool.core.max_attempts
    assert dead[0].reason == "nack"
    assert seen[3] == reliable_pool.core.max_attempts
    assert all(seen[n] == 1 for n in range(10) if n != 3)
    assert member.reliable.nacked == reliable_pool.core.max_attempts
    assert member.reliable.acked == 9
    stats = reliable_pool.stats()
    assert stats["acked"] == 9 and stats["in_flight"] == 0 and stats["queued"] == 0


def test_reliable_member_drain_hands_back_nothing(
    reliable_pool: ReliablePool, run_dir: Path, key: bytes
) -> None:
    """drain() with messages in flight: all handled and acked, none left at the pool."""
    handled: list[int] = []
    dispatcher = zbus.Dispatcher()
    dispatcher.bind("notifications", "compute.#", lambda d: handled.append(d.payload["n"]))
    conn = zbus.Connection(run_dir)
    member = conn.join_reliable_pool("billing", dispatcher, key, window=50)
    member.ready()
    publish(run_dir, key, 0, 200, zbus.MessageFactory(key, "pub1"))
    for _ in range(20):
        assert member.process(5)
    # The pool has our 20 acks and has refilled the window: 50 are on their way to us.
    wait_for(lambda: reliable_pool.stats()["acked"] == 20
             and reliable_pool.stats()["in_flight"] == 50, 10, "a refilled window")
    drained = member.drain(10)
    conn.close()
    assert drained == 50  # exactly the window that was in flight, no more
    wait_for(lambda: reliable_pool.stats()["members"] == {}, 5, "BYE")
    stats = reliable_pool.stats()
    assert stats["acked"] == 70 and stats["in_flight"] == 0 and stats["queued"] == 130
    assert handled == list(range(70))


def test_member_rejoins_after_the_pool_restarts(
    proxy_process: ProxyProcess, run_dir: Path, key: bytes
) -> None:
    """The component restarts (a proxy restart loses its memory): the member is told WHO,
    says HELLO again, counts the restart, and keeps consuming without being restarted."""
    settings = zbus.Settings(heartbeat_ivl=0.2, heartbeat_timeout=1.0)
    ctx: zmq.Context[Any] = zmq.Context()
    got: list[int] = []
    dispatcher = zbus.Dispatcher()
    dispatcher.bind("notifications", "compute.#", lambda d: got.append(d.payload["n"]))
    conn = zbus.Connection(run_dir, settings=settings)
    member = conn.join_reliable_pool("billing", dispatcher, key)
    factory = zbus.MessageFactory(key, "pub1")
    try:
        for round_ in range(2):
            pool = ReliablePool("billing", [BINDING], zbus.Endpoints(run_dir), settings, ctx)
            pool.start()
            try:
                if round_ == 0:
                    member.ready()
                publish(run_dir, key, 100 * round_, 100, factory)
                deadline = time.monotonic() + 20
                while pool.stats()["acked"] < 100:
                    assert time.monotonic() < deadline, pool.stats()
                    member.process(0.05)
            finally:
                pool.stop()
        assert got == list(range(200))
        assert member.reliable.pool_restarts == 1
    finally:
        member.close()
        conn.close()
        ctx.term()
