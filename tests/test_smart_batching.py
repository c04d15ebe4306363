"""Smart batching (issue 16): a busy publishing connection gathers one stream's messages into
one envelope, an idle one sends each message alone at once, and nothing taken by ``send``
is lost or counted wrong. Real proxy process, real ipc sockets; every count is checked
against the payloads' own numbers."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

import zbus
from tests.conftest import ProxyProcess, collect_deliveries
from zbus._envelope import decode_batch

EXCHANGE = "compute"
KEY_A, KEY_B = "instance.create", "instance.delete"


def _subscriber(conn: zbus.Connection, key: bytes, pattern: str = "#") -> tuple[Any, list[Any]]:
    dispatcher = zbus.Dispatcher()
    dispatcher.bind(EXCHANGE, pattern, lambda d: None)
    sub = conn.subscribe(dispatcher, key)
    sub.ready()
    return sub, []


def _payloads(deliveries: list[zbus.Delivery]) -> list[Any]:
    return [d.payload for d in deliveries]


def test_a_sealed_batch_is_the_bytes_msgpack_writes_for_the_whole_envelope() -> None:
    """OpenBatch joins messages packed one by one under one array header: byte for byte what
    packing the whole envelope writes, at every array-header size, and decodable."""
    factory = zbus.MessageFactory(b"k" * 32, "pub")
    for n in (1, 15, 16, 65_535, 65_536):
        batch = factory.open_batch(EXCHANGE, KEY_A)
        for i in range(n):
            batch.add(factory.pack(KEY_A, i))
        _, envelope, _ = batch.seal()
        entries = [msgpack.unpackb(p) for p in batch.parts]
        assert envelope == msgpack.packb(
            [2, "pub", batch.stream.stream_id, batch.first, entries], use_bin_type=True)
        assert 0 <= batch.size - len(envelope) <= 4  # the bound the limit is checked on
        assert len(decode_batch(envelope).entries) == n
    assert factory.stream(EXCHANGE, KEY_A)[1] == 1 + 1 + 15 + 16 + 65_535 + 65_536


def test_an_idle_publisher_sends_each_message_alone(
    proxy_process: ProxyProcess, run_dir: Path, key: bytes
) -> None:
    """A message sent after the last one was received goes alone, at once: no batching, and
    so no added latency, at low rates."""
    with zbus.Connection(run_dir) as conn, zbus.Connection(run_dir) as sub_conn:
        sub, _ = _subscriber(sub_conn, key)
        pub = zbus.Publisher(conn.exchange(EXCHANGE), zbus.MessageFactory(key, "idle"))
        for i in range(20):
            pub.send(KEY_A, i)
            got = collect_deliveries(sub, 1, 5)  # arrives with no flush: it went at once
            assert _payloads(got) == [i]
        assert (conn.messages_sent, conn.envelopes_sent) == (20, 20)
        sub.close()


def test_a_busy_publisher_batches_and_the_flusher_sends_the_tail(
    proxy_process: ProxyProcess, run_dir: Path, key: bytes
) -> None:
    """A tight loop of sends goes out in far fewer envelopes; the tail gathered last leaves
    as soon as the sending thread waits (here, on its subscriber), with no flush or close.
    Every message arrives once, in order, each with its own sequence; the subscriber's
    counters agree with the payloads."""
    count = 20_000
    with zbus.Connection(run_dir) as conn, zbus.Connection(run_dir) as sub_conn:
        sub, _ = _subscriber(sub_conn, key)
        pub = zbus.Publisher(conn.exchange(EXCHANGE), zbus.MessageFactory(key, "busy"))
        for i in range(count):
            pub.send(KEY_A, i)
        got = collect_deliveries(sub, count, 30)
        assert _payloads(got) == list(range(count))
        assert [d.sequence for d in got] == list(range(1, count + 1))
        assert len({d.envelope.message_id for d in got}) == count
        assert conn.messages_sent == count
        assert conn.envelopes_sent <= count // 10, conn.envelopes_sent
        stats = sub.stats
        assert (stats.received, stats.lost, dict(stats.rejected)) == (count, 0, {})
        sub.close()


def test_batches_keep_the_order_across_topics_and_stay_within_batch_bytes(
    proxy_process: ProxyProcess, run_dir: Path, key: bytes
) -> None:
    """Bursts on two topics, interleaved: a message of another stream sends the gathered
    batch first, so a subscriber to both sees the publisher's order; every envelope frame on
    the wire (read by a raw SUB at the proxy) is at most ``batch_bytes``."""
    limit = 4096
    ctx = zmq.Context.instance()
    raw = ctx.socket(zmq.SUB)
    raw.setsockopt(zmq.RCVHWM, 0)
    raw.connect(zbus.Endpoints(run_dir).deliver)
    raw.subscribe(f"{EXCHANGE}/".encode())
    settings = zbus.Settings(batch_bytes=limit)
    sent: list[tuple[str, int]] = []
    try:
        with zbus.Connection(run_dir, settings=settings) as conn, \
                zbus.Connection(run_dir) as sub_conn:
            sub, _ = _subscriber(sub_conn, key)
            pub = zbus.Publisher(conn.exchange(EXCHANGE), zbus.MessageFactory(key, "two"))
            n = 0
            for burst in range(40):
                rk = KEY_A if burst % 3 else KEY_B
                for _ in range(50 + burst * 7):
                    pub.send(rk, {"n": n, "pad": "x" * (n % 90)})
                    sent.append((rk, n))
                    n += 1
            got = collect_deliveries(sub, len(sent), 30)
            assert [(d.routing_key, d.payload["n"]) for d in got] == sent
            assert conn.envelopes_sent < len(sent) // 5
            sub.close()
        sizes = []
        while raw.poll(1000):
            frames = raw.recv_multipart()
            if len(frames) == 3 and msgpack.unpackb(frames[1])[4]:  # not a beacon
                sizes.append(len(frames[1]))
        assert len(sizes) == conn.envelopes_sent
        assert max(sizes) <= limit
    finally:
        raw.close(linger=0)


def test_batch_bytes_zero_sends_every_message_alone(
    proxy_process: ProxyProcess, run_dir: Path, key: bytes
) -> None:
    with zbus.Connection(run_dir, settings=zbus.Settings(batch_bytes=0)) as conn, \
            zbus.Connection(run_dir) as sub_conn:
        sub, _ = _subscriber(sub_conn, key)
        pub = zbus.Publisher(conn.exchange(EXCHANGE), zbus.MessageFactory(key, "alone"))
        for i in range(2000):
            pub.send(KEY_A, i)
        assert _payloads(collect_deliveries(sub, 2000, 20)) == list(range(2000))
        assert conn.envelopes_sent == conn.messages_sent == 2000
        sub.close()


def test_send_many_sends_few_envelopes_before_it_returns(
    proxy_process: ProxyProcess, run_dir: Path, key: bytes
) -> None:
    with zbus.Connection(run_dir) as conn, zbus.Connection(run_dir) as sub_conn:
        sub, _ = _subscriber(sub_conn, key)
        pub = zbus.Publisher(conn.exchange(EXCHANGE), zbus.MessageFactory(key, "many"))
        pub.send_many(KEY_A, list(range(1000)))
        assert conn._batch is None  # sent, not left gathered
        assert conn.messages_sent == 1000 and conn.envelopes_sent <= 10
        assert _payloads(collect_deliveries(sub, 1000, 20)) == list(range(1000))
        sub.close()


def test_a_payload_that_cannot_be_packed_fails_alone_and_leaves_no_gap(
    proxy_process: ProxyProcess, run_dir: Path, key: bytes
) -> None:
    """In the middle of a busy burst, one payload msgpack cannot pack: that send raises
    ConfigError, takes no number, and the others arrive with no gap counted."""
    with zbus.Connection(run_dir) as conn, zbus.Connection(run_dir) as sub_conn:
        sub, _ = _subscriber(sub_conn, key)
        pub = zbus.Publisher(conn.exchange(EXCHANGE), zbus.MessageFactory(key, "bad"))
        for i in range(500):
            if i == 250:
                with pytest.raises(zbus.ConfigError, match="cannot be packed"):
                    pub.send(KEY_A, object())
            pub.send(KEY_A, i)
        got = collect_deliveries(sub, 500, 20)
        assert _payloads(got) == list(range(500))
        assert [d.sequence for d in got] == list(range(1, 501))
        assert sub.stats.lost == 0
        sub.close()


def test_nothing_send_took_is_lost_when_the_proxy_stops_taking(
    run_dir: Path, key: bytes
) -> None:
    """The proxy is frozen (SIGSTOP) under a busy publisher: once the queue is full, a send
    raises Timeout and that message is not sent; every send that returned is delivered once
    the proxy runs again, and the subscriber counts no loss: the payloads say so."""
    proxy = ProxyProcess(run_dir).start()
    frozen = False
    try:
        settings = zbus.Settings(publish_hwm=20, send_timeout=0.3)
        with zbus.Connection(run_dir, settings=settings) as conn, \
                zbus.Connection(run_dir) as sub_conn:
            sub, _ = _subscriber(sub_conn, key)
            pub = zbus.Publisher(conn.exchange(EXCHANGE), zbus.MessageFactory(key, "frozen"))
            os.kill(proxy.pid, signal.SIGSTOP)
            frozen = True
            taken: list[int] = []
            refused = 0
            for i in range(400_000):
                try:
                    pub.send(KEY_A, {"n": i, "pad": "y" * 200})
                except zbus.Timeout as exc:
                    assert "was not sent" in str(exc)
                    refused += 1
                    if refused == 3:
                        break
                    continue
                taken.append(i)
            assert refused == 3, "the queue never filled"
            os.kill(proxy.pid, signal.SIGCONT)
            frozen = False
            conn.flush(30)
            got = collect_deliveries(sub, len(taken), 60)
            assert [d.payload["n"] for d in got] == taken
            assert sub.stats.lost == 0 and conn.unsent == 0
            sub.close()
    finally:
        if frozen:
            os.kill(proxy.pid, signal.SIGCONT)
        proxy.stop()


def test_an_eventlet_publisher_s_batch_goes_when_it_yields(
    proxy_process: ProxyProcess, run_dir: Path, key: bytes
) -> None:
    """zbus.eventlet: a green publisher's burst is gathered; the rest leaves as soon as the
    green thread yields to the hub (a green sleep while a plain-thread subscriber counts)."""
    eventlet = pytest.importorskip("eventlet")
    import zbus.eventlet

    count = 5000
    received = threading.Event()
    got: list[int] = []
    with zbus.Connection(run_dir) as sub_conn:
        sub, _ = _subscriber(sub_conn, key)
        sub_thread_error: list[BaseException] = []

        def consume() -> None:
            try:
                got.extend(_payloads(collect_deliveries(sub, count, 30)))
            except BaseException as exc:  # reported by the test thread
                sub_thread_error.append(exc)
            received.set()

        with zbus.eventlet.Connection(run_dir) as conn:
            pub = zbus.Publisher(conn.exchange(EXCHANGE), zbus.MessageFactory(key, "green"))
            for i in range(count):
                pub.send(KEY_A, i)
            # The subscriber starts only now, on a plain thread: the sockets are not shared.
            thread = threading.Thread(target=consume)
            thread.start()
            while not received.is_set():
                eventlet.sleep(0.01)  # yields to the hub: the flusher green thread runs
            assert conn.envelopes_sent < count // 10
        thread.join(5)
        assert not sub_thread_error
        assert got == list(range(count))
        sub.close()


def test_batches_a_subscriber_lost_are_repaired_whole_and_in_order(
    run_dir: Path, key: bytes
) -> None:
    """A subscriber reading nothing while a busy publisher sends batches: its 20-deep queue
    at the proxy drops envelopes; repair asks for the missing ranges and the publisher's
    keeper gives back the kept batches: every message arrives once, in order, and the
    counters say repaired, none lost or unrepairable."""
    proxy = ProxyProcess(run_dir, "--subscriber-hwm", "20").start()
    try:
        with zbus.Connection(run_dir, settings=zbus.Settings(subscriber_hwm=20)) as conn, \
                zbus.Connection(run_dir, settings=zbus.Settings(batch_bytes=1024)) as pub_conn:
            sub, _ = _subscriber(conn, key)
            pub = zbus.Publisher(pub_conn.exchange(EXCHANGE), zbus.MessageFactory(key, "rep"))
            count = 6000
            for i in range(count):
                pub.send(KEY_A, i)
            pub_conn.flush()
            assert pub_conn.envelopes_sent > 100  # more than the queue holds
            got = collect_deliveries(sub, count, 60)
            assert _payloads(got) == list(range(count))
            stats = sub.stats
            assert stats.repaired > 0, "nothing was dropped: the test proves nothing"
            assert (stats.lost, stats.unrepairable, dict(stats.rejected)) == (0, 0, {})
            keeper = pub_conn.keeper_stats
            assert keeper is not None and keeper["given"] > 0
            sub.close()
    finally:
        proxy.stop()


def test_an_asyncio_publisher_s_batch_goes_when_the_task_awaits(
    proxy_process: ProxyProcess, run_dir: Path, key: bytes
) -> None:
    """zbus.asyncio: a burst of awaited sends (which never suspend while the queue takes
    them) is gathered; the rest leaves from a loop callback as soon as the task awaits
    something else, here its own subscriber. Every message once, in order."""
    import asyncio

    import zbus.asyncio

    count = 5000

    async def main() -> tuple[list[Any], int, int]:
        async with zbus.asyncio.Connection(run_dir) as conn, \
                zbus.asyncio.Connection(run_dir) as sub_conn:
            dispatcher = zbus.Dispatcher()
            got: list[Any] = []
            dispatcher.bind(EXCHANGE, "#", lambda d: got.append(d.payload))
            sub = sub_conn.subscribe(dispatcher, key)
            await sub.ready()
            pub = zbus.asyncio.Publisher(conn.exchange(EXCHANGE),
                                         zbus.MessageFactory(key, "task"))
            for i in range(count):
                await pub.send(KEY_A, i)
            handled = await sub.run(max_messages=count, idle_timeout=10)
            await sub.aclose()
            return got, handled, conn.envelopes_sent

    got, handled, envelopes = asyncio.run(main())
    assert handled == count and got == list(range(count))
    assert envelopes < count // 10
