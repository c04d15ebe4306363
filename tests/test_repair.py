"""Repair through a real zbus-proxy process (issue 15): gaps a subscriber finds are asked for
on the proxy's repair plane, answered by the publishing connection that keeps them, and
handed to handlers in stream order; what cannot be repaired is counted once, exactly.

Every test counts what the subscriber should have had from the numbers in the payloads, not
from zbus's own counters, and checks those against it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

import zbus
import zbus.eventlet as zbus_eventlet

from .conftest import ProxyProcess

EX = "notifications"
TOPICS = ("compute.instance.create.end", "compute.volume.attach")
pytestmark = pytest.mark.timeout(120)


def _numbers(pattern: str) -> tuple[zbus.Dispatcher, dict[str, list[int]]]:
    seen: dict[str, list[int]] = {}
    dispatcher = zbus.Dispatcher()
    dispatcher.bind(EX, pattern, lambda d: seen.setdefault(d.routing_key, []).append(d.payload))
    return dispatcher, seen


def _overflow(run_dir: Path, key: bytes, count: int, hwm: int = 200
              ) -> tuple[zbus.Connection, zbus.Subscriber, dict[str, list[int]],
                         zbus.Connection, dict[str, int]]:
    """A subscriber that reads nothing while ``count`` messages go out on two topics: the
    proxy's queue for it (``hwm``) overflows and drops."""
    settings = zbus.Settings(subscriber_hwm=hwm)
    conn = zbus.Connection(run_dir, settings=settings)
    dispatcher, seen = _numbers("compute.#")
    sub = conn.subscribe(dispatcher, key)
    sub.ready()
    pub_conn = zbus.Connection(run_dir)
    pub = zbus.Publisher(pub_conn.exchange(EX), zbus.MessageFactory(key, "svc"))
    sent = dict.fromkeys(TOPICS, 0)
    for i in range(count):
        topic = TOPICS[i % 2]
        sent[topic] += 1
        pub.send(topic, sent[topic])
    pub_conn.flush()
    return conn, sub, seen, pub_conn, sent


def _run_until(sub: zbus.Subscriber, done: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        sub.process(0.05)


def test_a_subscriber_past_its_high_water_mark_gets_every_message_repaired_in_order(
        run_dir: Path, key: bytes) -> None:
    proxy = ProxyProcess(run_dir, "--subscriber-hwm", "200").start()
    try:
        conn, sub, seen, pub_conn, sent = _overflow(run_dir, key, 6000)
        total = sum(sent.values())
        _run_until(sub, lambda: sum(map(len, seen.values())) >= total, 30)
        for topic in TOPICS:
            assert seen.get(topic) == list(range(1, sent[topic] + 1)), (
                topic, len(seen.get(topic, [])), sub.counters())
        stats = sub.stats
        assert stats.repaired > 0, "nothing was dropped: the test proves nothing"
        assert stats.repaired == stats.repair_requested
        assert stats.lost == 0 and stats.unrepairable == 0 and not stats.rejected
        keeper = pub_conn.keeper_stats
        assert keeper is not None and keeper["given"] > 0
        proxy_stats = conn.proxy_stats()
        repair = proxy_stats["repair"]
        assert repair["forwarded"] > 0 and repair["given"] == keeper["given"]
        # ... and where operators read them.
        from zbus_proxy.cli import render_metrics

        from zbus.metrics import render_consumers
        assert f'zbus_proxy_repair_total{{what="given"}} {keeper["given"]}\n' in \
            render_metrics(proxy_stats)
        assert f'{{consumer="s"}} {stats.repaired}\n' in render_consumers({"s": stats})
        # The proxy knows what its publishing connections keep (from their offers), and
        # zbus stats says it.
        assert repair["keepers"] == 1 and repair["retained_bytes"] > 0
        from zbus.cli import format_stats
        assert f"keep {repair['retained_bytes']:,} bytes" in format_stats(proxy_stats, None)
        sub.close()
        conn.close()
        pub_conn.close()
    finally:
        proxy.stop()


def test_gaps_no_one_keeps_are_counted_unrepairable_exactly(run_dir: Path, key: bytes) -> None:
    """The publisher closed before the subscriber read: its proxy says no one keeps the
    streams, and the subscriber gives the gaps up at once, each counted once; every number
    that arrived is handed on, in order."""
    proxy = ProxyProcess(run_dir, "--subscriber-hwm", "200").start()
    try:
        # Past the proxy's start grace, when "no one keeps it" becomes final.
        with zbus.Connection(run_dir) as probe:
            deadline = time.monotonic() + 10
            while probe.proxy_stats()["repair"]["starting"]:
                assert time.monotonic() < deadline
                time.sleep(0.1)  # polling a condition the proxy reports
        conn, sub, seen, pub_conn, sent = _overflow(run_dir, key, 6000)
        pub_conn.close()  # its beacons are left with the proxy: the tail shows too
        total = sum(sent.values())
        _run_until(sub, lambda: sub.stats.unrepairable + sum(map(len, seen.values()))
                   >= total, 30)
        missing = total - sum(map(len, seen.values()))
        assert missing > 0
        for topic, numbers in seen.items():
            assert numbers == sorted(set(numbers)), topic
        stats = sub.stats
        assert stats.unrepairable == missing == stats.lost, sub.counters()
        assert stats.repaired == 0 and not stats.rejected
        sub.close()
        conn.close()
    finally:
        proxy.stop()


def test_repair_off_behaves_as_before(run_dir: Path, key: bytes) -> None:
    proxy = ProxyProcess(run_dir, "--subscriber-hwm", "200").start()
    try:
        off = zbus.Settings(subscriber_hwm=200, repair=zbus.RepairPolicy(interval=0))
        conn = zbus.Connection(run_dir, settings=off)
        dispatcher, seen = _numbers("compute.#")
        sub = conn.subscribe(dispatcher, key)
        sub.ready()
        pub_conn = zbus.Connection(run_dir, settings=off)
        pub = zbus.Publisher(pub_conn.exchange(EX), zbus.MessageFactory(key, "svc"))
        for i in range(6000):
            pub.send(TOPICS[i % 2], i)
        pub_conn.flush()
        while sub.process(0.3):
            pass
        # Without repair what overflowed is gone (a lost tail only shows once the publisher
        # closes and its beacons come round: tests/test_beacons.py), and nothing is asked.
        assert pub_conn.keeper_stats is None
        assert sum(map(len, seen.values())) < 6000 and sub.stats.repair_requested == 0
        assert sub.stats.repaired == 0 and sub.stats.held == 0
        sub.close()
        conn.close()
        pub_conn.close()
    finally:
        proxy.stop()


def test_a_proxy_killed_and_restarted_under_load_loses_nothing_within_the_interval(
        run_dir: Path, key: bytes) -> None:
    """SIGKILL the proxy while a publisher sends 3,000 messages a second: what died in the
    proxy, and what went out before the subscriber's subscription reached the new one, is
    asked for and repaired once the publisher offers its streams to the new proxy."""
    import signal
    import threading

    proxy = ProxyProcess(run_dir).start()
    conn = zbus.Connection(run_dir)
    dispatcher, seen = _numbers("compute.#")
    sub = conn.subscribe(dispatcher, key)
    sub.ready()
    sent = dict.fromkeys(TOPICS, 0)
    stop = threading.Event()
    errors: list[BaseException] = []

    def publish() -> None:
        pub_conn = zbus.Connection(run_dir, settings=zbus.Settings(send_timeout=30))
        pub = zbus.Publisher(pub_conn.exchange(EX), zbus.MessageFactory(key, "svc"))
        try:
            i, start = 0, time.monotonic()
            while not stop.is_set():
                topic = TOPICS[i % 2]
                sent[topic] += 1
                pub.send(topic, sent[topic])
                i += 1
                ahead = i / 3000 - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)  # paces the sender at 3,000 a second
            done.wait(60)  # keep what was sent until the subscriber has it all
        except BaseException as exc:
            errors.append(exc)
        finally:
            pub_conn.close()

    done = threading.Event()
    publisher = threading.Thread(target=publish)
    publisher.start()
    try:
        _run_until(sub, lambda: sum(map(len, seen.values())) >= 3000, 20)  # a second in
        proxy.stop(signal.SIGKILL)
        proxy = ProxyProcess(run_dir).start()
        _run_until(sub, lambda: sum(map(len, seen.values())) >= 9000, 30)
        stop.set()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (
                sum(map(len, seen.values())) < sum(sent.values()) or sub.core.book is None
                or len(sub.core.book)):
            sub.process(0.05)
        done.set()
        publisher.join(30)
        assert not errors, errors
        for topic in TOPICS:
            assert seen.get(topic) == list(range(1, sent[topic] + 1)), (
                topic, sent[topic], len(seen.get(topic, [])), sub.counters())
        stats = sub.stats
        assert stats.repaired > 0, "the restart lost nothing: the test proves nothing"
        assert stats.lost == 0 and stats.unrepairable == 0 and not stats.rejected
    finally:
        stop.set()
        done.set()
        publisher.join(30)
        sub.close()
        conn.close()
        proxy.stop()


def test_a_subscriber_on_another_host_is_repaired_over_the_links(key: bytes) -> None:
    """Host A's subscriber overflows its queue at A while a publisher on host B sends:
    A's repair plane asks its peers over the CURVE links, B's answers with the envelopes
    its publisher keeps, and A's subscriber gets every message, in order."""
    from .conftest import short_tmp_dir
    from .federation_agents import free_port_pair, make_hosts, wait_meshed

    with short_tmp_dir("zr-") as tmp:
        a, b, _ = make_hosts(tmp)
        try:
            for h in (a, b):
                h.port = free_port_pair(h.address)
            a.start("--peer", b.peer_spec(), "--subscriber-hwm", "200")
            b.start("--peer", a.peer_spec())
            wait_meshed([a, b])
            conn = zbus.Connection(a.run_dir, settings=zbus.Settings(subscriber_hwm=200))
            dispatcher, seen = _numbers("compute.#")
            sub = conn.subscribe(dispatcher, key)
            sub.ready()
            pub_conn = zbus.Connection(b.run_dir)
            pub = zbus.Publisher(pub_conn.exchange(EX), zbus.MessageFactory(key, "svc"))
            sent = dict.fromkeys(TOPICS, 0)
            for i in range(6000):  # A's subscriber reads nothing meanwhile
                topic = TOPICS[i % 2]
                sent[topic] += 1
                pub.send(topic, sent[topic])
            pub_conn.flush()
            total = sum(sent.values())
            _run_until(sub, lambda: sum(map(len, seen.values())) >= total, 40)
            for topic in TOPICS:
                assert seen.get(topic) == list(range(1, sent[topic] + 1)), (
                    topic, len(seen.get(topic, [])), sub.counters())
            stats = sub.stats
            assert stats.repaired > 0, "nothing was dropped: the test proves nothing"
            assert stats.lost == 0 and stats.unrepairable == 0 and not stats.rejected
            assert conn.proxy_stats()["repair"]["given_from_peers"] > 0
            sub.close()
            conn.close()
            pub_conn.close()
        finally:
            for h in (a, b):
                h.stop()


def test_hostile_repair_plane_messages_are_refused_counted_and_change_nothing(
        run_dir: Path, key: bytes) -> None:
    """Anything on repair.sock is untrusted: malformed requests and offers, answers with a
    wrong shape, a flood of requests (past the 400 burst) are refused and counted by reason;
    the plane keeps serving and a real gap is still repaired afterwards."""
    import msgpack
    import zmq

    from zbus._repair import Ask

    proxy = ProxyProcess(run_dir, "--subscriber-hwm", "200").start()
    ctx: zmq.Context = zmq.Context()
    rogue = ctx.socket(zmq.DEALER)
    rogue.setsockopt(zmq.LINGER, 0)
    try:
        rogue.connect(zbus.Endpoints(run_dir).repair)
        junk = [[b"ASK", b"\xc1"], [b"ASK", msgpack.packb([1, "p", b"short", [[1, 2]], 9])],
                [b"OFFER", b"junk"], [b"OFFER", msgpack.packb([b"x" * 9])], [b"GIVE"],
                [b"GIVE", b"who", b"head", b"t", b"e"], [b"NOPE", b"x"], [b"ASK"]]
        for frames in junk:
            rogue.send_multipart(frames)
        ask = Ask("svc", b"s" * 8, [[1, 5]]).encode(1, 1 << 20)
        for _ in range(600):
            rogue.send_multipart([b"ASK", ask])

        def refused() -> dict[str, int]:
            with zbus.Connection(run_dir) as conn:
                counts: dict[str, int] = conn.proxy_stats()["repair"]["refused"]
                return counts

        deadline = time.monotonic() + 10
        while refused().get("rate", 0) < 100 and time.monotonic() < deadline:
            time.sleep(0.05)  # polling the proxy's counters
        counts = refused()
        assert counts.get("malformed") == len(junk) and counts.get("rate", 0) >= 100, counts
        # The plane still serves the real thing.
        conn, sub, seen, pub_conn, sent = _overflow(run_dir, key, 4000)
        total = sum(sent.values())
        _run_until(sub, lambda: sum(map(len, seen.values())) >= total, 30)
        assert sum(map(len, seen.values())) == total and sub.stats.repaired > 0
        sub.close()
        conn.close()
        pub_conn.close()
    finally:
        rogue.close(linger=0)
        ctx.term()
        proxy.stop()


_PATCHED_PUBLISHER = """
import sys, eventlet
eventlet.monkey_patch()
import zbus, zbus.eventlet
run_dir, key, count = sys.argv[1], bytes.fromhex(sys.argv[2]), int(sys.argv[3])
conn = zbus.eventlet.Connection(run_dir, settings=zbus.Settings(batch_bytes=0))
pub = zbus.eventlet.Publisher(conn.exchange("notifications"), zbus.MessageFactory(key, "svc"))
for n in range(1, count + 1):
    pub.send("compute.instance.create.end", n)
conn.flush()
print("SENT", flush=True)
sys.stdin.readline()  # keeps what it sent until the test has read everything
print("GIVEN", conn.keeper_stats["given"], flush=True)
conn.close()
"""


@pytest.mark.parametrize("patched", [False, True])
def test_an_eventlet_publisher_keeps_what_it_sent(run_dir: Path, key: bytes,
                                                  patched: bool) -> None:
    """zbus.eventlet publishers keep for repairs too: their keeper is an OS thread on plain
    sockets (under monkey_patch() as well), so the hub never waits in libzmq."""
    import subprocess
    import sys

    proxy = ProxyProcess(run_dir, "--subscriber-hwm", "200").start()
    try:
        conn = zbus.Connection(run_dir, settings=zbus.Settings(subscriber_hwm=200))
        dispatcher, seen = _numbers("compute.#")
        sub = conn.subscribe(dispatcher, key)
        sub.ready()
        count = 4000
        topic = "compute.instance.create.end"
        child = None
        if patched:
            child = subprocess.Popen(
                [sys.executable, "-c", _PATCHED_PUBLISHER, str(run_dir), key.hex(), str(count)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert child.stdout is not None and child.stdout.readline().strip() == "SENT"
        else:
            # Each message alone, so that 4,000 overflow the 200-deep queue (batched, they
            # would fit: tests/test_smart_batching.py repairs batches).
            pub_conn = zbus_eventlet.Connection(run_dir, settings=zbus.Settings(batch_bytes=0))
            pub = zbus_eventlet.Publisher(pub_conn.exchange(EX), zbus.MessageFactory(key, "svc"))
            for n in range(1, count + 1):
                pub.send(topic, n)
            pub_conn.flush()
        _run_until(sub, lambda: len(seen.get(topic, [])) >= count, 30)
        assert seen.get(topic) == list(range(1, count + 1)), sub.counters()
        assert sub.stats.repaired > 0 and sub.stats.unrepairable == 0
        if child is not None:
            assert child.stdin is not None and child.stdout is not None
            child.stdin.write("\n")
            child.stdin.flush()
            given = child.stdout.readline().split()
            assert given[0] == "GIVEN" and int(given[1]) > 0
            assert child.wait(30) == 0
        else:
            stats = pub_conn.keeper_stats
            assert stats is not None and stats["given"] > 0
            pub_conn.close()
        sub.close()
        conn.close()
    finally:
        proxy.stop()


def test_asyncio_subscribers_ask_and_asyncio_publishers_keep(run_dir: Path,
                                                              key: bytes) -> None:
    import asyncio

    import zbus.asyncio as zbus_asyncio

    proxy = ProxyProcess(run_dir, "--subscriber-hwm", "200").start()
    try:
        topic = "compute.instance.create.end"
        count = 4000
        seen: list[int] = []

        async def main() -> tuple[zbus.ConsumerStats, int]:
            conn = zbus_asyncio.Connection(run_dir, settings=zbus.Settings(subscriber_hwm=200))
            dispatcher = zbus.Dispatcher()
            dispatcher.bind(EX, "compute.#", lambda d: seen.append(d.payload))
            sub = conn.subscribe(dispatcher, key)
            await sub.ready()
            # An asyncio publisher keeps too; each message alone, so that 4,000 overflow the
            # 200-deep queue (batched, they would fit).
            pub_conn = zbus_asyncio.Connection(run_dir, settings=zbus.Settings(batch_bytes=0))
            pub = zbus_asyncio.Publisher(pub_conn.exchange(EX), zbus.MessageFactory(key, "svc"))
            for n in range(1, count + 1):
                await pub.send(topic, n)
            await pub_conn.flush()
            deadline = time.monotonic() + 30
            while len(seen) < count and time.monotonic() < deadline:
                delivery = await sub.receive(0.1)
                if delivery is not None:
                    await sub.dispatch(delivery)
            given = (pub_conn.keeper_stats or {}).get("given", 0)
            await pub_conn.aclose()
            sub.close()
            conn.close()
            return sub.stats, given

        stats, given = asyncio.run(main())
        assert seen == list(range(1, count + 1)), stats.as_dict()
        assert stats.repaired > 0 and given > 0 and stats.unrepairable == 0
    finally:
        proxy.stop()


def test_one_keeper_thread_serves_every_connection_and_leaving_never_waits(
        proxy_process: ProxyProcess, key: bytes) -> None:
    """A process with many publishing connections to one proxy runs one keeper thread (a
    thousand asyncio tasks each with its own connection made a thousand threads, and each
    close waited for one); the last connection's close lets it end."""
    import threading

    def keepers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "zbus-keeper" and t.is_alive()]

    before = len(keepers())
    conns = [zbus.Connection(proxy_process.run_dir) for _ in range(50)]
    for n, conn in enumerate(conns):
        zbus.Publisher(conn.exchange(EX), zbus.MessageFactory(key, f"p{n}")).send(TOPICS[0], n)
    assert len(keepers()) == before + 1
    started = time.monotonic()
    for conn in conns:
        conn.close()
    assert time.monotonic() - started < 5  # 50 flushes; no close waits for the keeper
    deadline = time.monotonic() + 5
    while len(keepers()) > before and time.monotonic() < deadline:
        time.sleep(0.05)  # the thread notices within its 0.1 s poll
    assert len(keepers()) == before
