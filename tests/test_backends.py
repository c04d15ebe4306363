"""The three concurrency backends (threads, asyncio, eventlet) over one core and one wire.

The scenario suite runs unchanged over every backend through a small synchronous facade
(:class:`Backend`): the facade only adapts *how* a backend waits; the scenarios and their
assertions are written once. Backend-specific tests follow. Eventlet here runs without
``monkey_patch()`` (this is pytest's process); the monkey-patched run is a subprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

import zbus
import zbus.asyncio
import zbus.eventlet
from tests.backend_agent import AGENT

eventlet = pytest.importorskip("eventlet")

pytestmark = pytest.mark.timeout(60)

EXCHANGE = "orders"


# -- one synchronous facade per backend -------------------------------------------------------


class Backend:
    """The threads backend as is; subclasses adapt asyncio and eventlet."""

    name = "threads"
    connection_class: Any = zbus.Connection

    def connect(self, run_dir: Path, **kw: Any) -> Any:
        return self.connection_class(run_dir, **kw)

    def handler(self, fn: Callable[[zbus.Delivery], None]) -> Callable[[zbus.Delivery], Any]:
        return fn

    def call(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """Call a backend method and wait for its result in this backend's way."""
        return fn(*args, **kw)

    def subscriber(self, conn: Any, dispatcher: zbus.Dispatcher, key: bytes) -> Any:
        sub = self.call(lambda: conn.subscribe(dispatcher, key))
        self.call(sub.ready)
        return sub

    def pool_member(self, conn: Any, pool: str, dispatcher: zbus.Dispatcher, key: bytes) -> Any:
        member = self.call(lambda: conn.join_pool(pool, dispatcher, key))
        self.call(member.ready)
        return member

    def publish(self, conn: Any, factory: zbus.MessageFactory, routing_key: str,
                payloads: list[Any], exchange: str = EXCHANGE) -> None:
        publisher = self.publisher_class(conn.exchange(exchange), factory)
        for payload in payloads:
            self.call(publisher.send, routing_key, payload)

    publisher_class: Any = zbus.Publisher

    def run(self, consumer: Any, count: int) -> int:
        return int(self.call(consumer.run, max_messages=count, idle_timeout=5))

    def close(self, *things: Any) -> None:
        for thing in things:
            thing.close()

    def shutdown(self) -> None:
        pass


class AsyncioBackend(Backend):
    """Every call runs to completion on one event loop owned by the test's thread; handlers
    are coroutine functions, so the dispatcher's awaiting is what is tested."""

    name = "asyncio"
    connection_class = zbus.asyncio.Connection
    publisher_class = zbus.asyncio.Publisher

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def handler(self, fn: Callable[[zbus.Delivery], None]) -> Callable[[zbus.Delivery], Any]:
        async def handle(delivery: zbus.Delivery) -> None:
            await asyncio.sleep(0)
            fn(delivery)

        return handle

    def call(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        async def within_loop() -> Any:
            result = fn(*args, **kw)
            return await result if asyncio.iscoroutine(result) else result

        return self.loop.run_until_complete(within_loop())

    def shutdown(self) -> None:
        self.loop.close()


class EventletBackend(Backend):
    name = "eventlet"
    connection_class = zbus.eventlet.Connection

    def publish(self, conn: Any, factory: zbus.MessageFactory, routing_key: str,
                payloads: list[Any], exchange: str = EXCHANGE) -> None:
        super().publish(conn, factory, routing_key, payloads, exchange)
        # As an eventlet program does: yield to the hub, where a batch the publisher
        # gathered while busy goes out (the consumer here may run another backend's loop).
        import eventlet

        eventlet.sleep(0)


BACKENDS: dict[str, Callable[[], Backend]] = {
    "threads": Backend, "asyncio": AsyncioBackend, "eventlet": EventletBackend,
}


def _backend(name: str) -> Iterator[Backend]:
    backend = BACKENDS[name]()
    try:
        yield backend
    finally:
        backend.shutdown()


@pytest.fixture(params=list(BACKENDS))
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    yield from _backend(request.param)


@pytest.fixture(params=list(BACKENDS))
def other(request: pytest.FixtureRequest) -> Iterator[Backend]:
    yield from _backend(request.param)


def _recorder(backend: Backend, routing: str = "#") -> tuple[zbus.Dispatcher, list[Any]]:
    seen: list[Any] = []
    dispatcher = zbus.Dispatcher()
    dispatcher.bind(EXCHANGE, routing, backend.handler(lambda d: seen.append(d.payload)))
    return dispatcher, seen


# -- the scenario suite, once for every backend -----------------------------------------------


def test_fanout_after_ready_gets_every_message_in_order(
    backend: Backend, proxy_process: Any, run_dir: Path, key: bytes
) -> None:
    conn = backend.connect(run_dir)
    (d1, seen1), (d2, seen2) = _recorder(backend), _recorder(backend)
    subs = [backend.subscriber(conn, d1, key), backend.subscriber(conn, d2, key)]
    try:
        backend.publish(conn, zbus.MessageFactory(key, "pub"), "order.created", list(range(300)))
        assert [backend.run(sub, 300) for sub in subs] == [300, 300]
        assert seen1 == seen2 == list(range(300))
        for sub in subs:
            assert (sub.stats.lost, sub.stats.delivered, dict(sub.stats.rejected)) == (0, 300, {})
    finally:
        backend.close(*subs, conn)


def test_pool_member_gets_the_pools_messages(
    backend: Backend, proxy_process: Any, run_dir: Path, key: bytes
) -> None:
    conn = backend.connect(run_dir)
    dispatcher, seen = _recorder(backend, "order.*")
    member = backend.pool_member(conn, "billing", dispatcher, key)
    try:
        factory = zbus.MessageFactory(key, "pub")
        backend.publish(conn, factory, "audit.read", ["not for the pool"] * 20)
        backend.publish(conn, factory, "order.created", list(range(100)))
        assert backend.run(member, 100) == 100
        assert seen == list(range(100))
        assert member.stats.delivered == 100
    finally:
        backend.close(member, conn)


def test_raising_handler_is_counted_and_the_loop_goes_on(
    backend: Backend, proxy_process: Any, run_dir: Path, key: bytes
) -> None:
    conn = backend.connect(run_dir)
    dispatcher, seen = _recorder(backend)

    def boom(delivery: zbus.Delivery) -> None:
        if delivery.payload % 2:
            raise RuntimeError(f"handler failed on {delivery.payload}")

    dispatcher.bind(EXCHANGE, "#", backend.handler(boom))
    sub = backend.subscriber(conn, dispatcher, key)
    try:
        backend.publish(conn, zbus.MessageFactory(key, "pub"), "order.created", list(range(10)))
        assert backend.run(sub, 10) == 10
        assert seen == list(range(10))
        assert (sub.stats.handler_errors, sub.stats.delivered) == (5, 10)
    finally:
        backend.close(sub, conn)


def _drive_link(backend: Backend, consumer: Any, done: Callable[[], bool], what: str) -> None:
    """Receive (nothing is published meanwhile) until ``done()``: receiving is what looks
    after a consumer's link to its proxy."""
    deadline = time.monotonic() + 20
    while not done():
        assert backend.call(consumer.receive, timeout=0.1) is None
        assert time.monotonic() < deadline, f"{what}: {consumer.counters()}"


def test_a_stricter_subscriber_survives_a_message_above_its_limit(
    backend: Backend, proxy_process: Any, run_dir: Path, key: bytes
) -> None:
    """A message the proxy takes (1 MiB limit) but this subscriber refuses (16 KiB): libzmq
    ends the connection for good; the subscriber counts it, reconnects on a new socket, and
    loses nothing sent once it is live again."""
    limit = 16 * 1024
    conn = backend.connect(run_dir, settings=zbus.Settings(max_message_bytes=limit))
    dispatcher, seen = _recorder(backend)
    sub = backend.subscriber(conn, dispatcher, key)
    publisher = zbus.Connection(run_dir)
    try:
        factory = zbus.MessageFactory(key, "pub")
        Backend().publish(publisher, factory, "order.created", list(range(20)))
        assert backend.run(sub, 20) == 20
        Backend().publish(publisher, factory, "order.created", ["x" * 2 * limit])
        _drive_link(backend, sub, lambda: sub.link.resubscribed > 0, "never reconnected")
        assert sub.live and (sub.link.disconnects, sub.link.replaced) == (1, 1)
        Backend().publish(publisher, factory, "order.created", list(range(20, 40)))
        assert backend.run(sub, 20) == 20
        assert seen == list(range(40))
        # the refused message is a gap in the publisher's sequence, counted as lost
        assert (sub.stats.lost, dict(sub.stats.rejected)) == (1, {})
    finally:
        backend.close(sub, conn)
        publisher.close()


def test_a_stricter_pool_member_survives_a_message_above_its_limit(
    backend: Backend, proxy_process: Any, run_dir: Path, key: bytes
) -> None:
    """The same for a fast-pool member (a PULL): it reconnects on a new socket and goes on
    taking its share; the refused message is counted by the proxy as unaccounted."""
    limit = 16 * 1024
    conn = backend.connect(run_dir, settings=zbus.Settings(max_message_bytes=limit))
    dispatcher, seen = _recorder(backend, "order.*")
    member = backend.pool_member(conn, "billing", dispatcher, key)
    try:
        with zbus.Connection(run_dir) as publisher:
            factory = zbus.MessageFactory(key, "pub")
            Backend().publish(publisher, factory, "order.created", list(range(20)))
            assert backend.run(member, 20) == 20
            Backend().publish(publisher, factory, "order.created", ["x" * 2 * limit])
            _drive_link(backend, member, lambda: member.link.replaced > 0 and member.live,
                        "never reconnected")
            assert (member.link.disconnects, member.link.reconnects) == (1, 1)
            Backend().publish(publisher, factory, "order.created", list(range(20, 40)))
            assert backend.run(member, 20) == 20
            assert seen == list(range(40))
        # The publisher's close sent its stream's beacon, which the pool handed out too:
        # read it, so that the books below hold the refused message alone.
        deadline = time.monotonic() + 5
        while not member.stats.beacons and time.monotonic() < deadline:
            backend.call(member.receive, 0.1)
        assert member.stats.beacons == 1
    finally:
        backend.close(member, conn)
    with zbus.Connection(run_dir) as watcher:
        deadline = time.monotonic() + 10
        # Envelopes: all but the refused one, and the beacon.
        while (pool := watcher.proxy_stats()["fast_pools"]["billing"])["reported"] < \
                publisher.envelopes_sent:
            assert time.monotonic() < deadline, pool  # the final report is on its way
    # Handed out in envelopes: a busy publisher batches (the beacon of its close is one more).
    assert (pool["handed_out"], pool["unaccounted"]) == (publisher.envelopes_sent + 1, 1)


def test_subscriber_rejoins_a_restarted_proxy(
    backend: Backend, proxy_process: Any, run_dir: Path, key: bytes
) -> None:
    """SIGKILL and restart the proxy: libzmq reconnects the same socket (nothing replaced),
    the subscriber proves its subscriptions live again, and what is sent after that arrives."""
    conn = backend.connect(run_dir)
    dispatcher, seen = _recorder(backend)
    sub = backend.subscriber(conn, dispatcher, key)
    try:
        factory = zbus.MessageFactory(key, "pub")
        with zbus.Connection(run_dir) as publisher:
            Backend().publish(publisher, factory, "order.created", list(range(10)))
        assert backend.run(sub, 10) == 10
        proxy_process.stop(signal.SIGKILL)
        proxy_process.start()
        _drive_link(backend, sub, lambda: sub.link.resubscribed > 0, "never resubscribed")
        assert sub.live
        assert (sub.link.disconnects, sub.link.reconnects, sub.link.replaced) == (1, 1, 0)
        with zbus.Connection(run_dir) as publisher:  # the same factory: its sequence goes on
            Backend().publish(publisher, factory, "order.created", list(range(10, 30)))
        assert backend.run(sub, 20) == 20
        assert seen == list(range(30))
        assert (sub.stats.lost, dict(sub.stats.rejected)) == (0, {})
    finally:
        backend.close(sub, conn)


def test_every_backend_receives_every_backends_messages(
    backend: Backend, other: Backend, proxy_process: Any, run_dir: Path, key: bytes
) -> None:
    """Interop: publisher ``backend``, subscriber ``other``; one wire format."""
    pub_conn, sub_conn = backend.connect(run_dir), other.connect(run_dir)
    dispatcher, seen = _recorder(other)
    sub = other.subscriber(sub_conn, dispatcher, key)
    try:
        backend.publish(pub_conn, zbus.MessageFactory(key, backend.name), "order.x", [1, 2, 3])
        assert other.run(sub, 3) == 3
        assert seen == [1, 2, 3]
    finally:
        other.close(sub, sub_conn)
        backend.close(pub_conn)


# -- asyncio ----------------------------------------------------------------------------------


def _ended(ctx: zmq.Context[Any], timeout: float = 5.0) -> bool:
    """Terminate ``ctx``; True when that returned, i.e. when none of its sockets was open."""
    done = threading.Thread(target=ctx.term, daemon=True)
    done.start()
    done.join(timeout)
    return not done.is_alive()


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 45))


def test_asyncio_thousand_tasks_publishing(proxy_process: Any, run_dir: Path, key: bytes) -> None:
    tasks, each = 1000, 5
    ctx: zmq.Context[Any] = zmq.Context()
    ctx.MAX_SOCKETS = 4 * tasks

    async def scenario() -> None:
        last: dict[str, int] = {}
        disordered = 0

        def seen(delivery: zbus.Delivery) -> None:
            nonlocal disordered
            disordered += delivery.sequence <= last.get(delivery.publisher_id, 0)
            last[delivery.publisher_id] = delivery.sequence

        dispatcher = zbus.Dispatcher()
        dispatcher.bind(EXCHANGE, "#", seen)
        async def publish(n: int) -> None:
            async with zbus.asyncio.Connection(run_dir, context=ctx) as own:  # a socket each
                publisher = zbus.asyncio.Publisher(own.exchange(EXCHANGE),
                                                   zbus.MessageFactory(key, f"task-{n}"))
                for i in range(each):
                    await publisher.send("order.created", i)
                    await asyncio.sleep(0)  # let the other 999 interleave

        conn = zbus.asyncio.Connection(run_dir, context=ctx)
        async with conn, conn.subscribe(dispatcher, key) as sub:
            await sub.ready()
            consumer = asyncio.create_task(sub.run(max_messages=tasks * each, idle_timeout=10))
            await asyncio.gather(*(publish(n) for n in range(tasks)))
            assert await consumer == tasks * each
            assert (len(last), disordered, sub.stats.lost) == (tasks, 0, 0)

    try:
        _run(scenario())
    finally:
        assert _ended(ctx)


@pytest.mark.parametrize("how", ["run", "async for"])
def test_asyncio_cancelling_a_subscriber_task_closes_its_sockets(
    how: str, proxy_process: Any, run_dir: Path, key: bytes
) -> None:
    ctx: zmq.Context[Any] = zmq.Context()

    async def scenario() -> zbus.asyncio.Subscriber:
        conn = zbus.asyncio.Connection(run_dir, context=ctx)
        first = asyncio.Event()
        dispatcher = zbus.Dispatcher()
        dispatcher.bind(EXCHANGE, "#", lambda d: first.set())
        sub = conn.subscribe(dispatcher, key)

        async def consume() -> None:
            await sub.ready()
            if how == "run":
                await sub.run()
            else:
                async for delivery in sub:
                    sub.core.run_handlers(delivery)

        task = asyncio.create_task(consume())
        publisher = zbus.asyncio.Publisher(conn.exchange(EXCHANGE), zbus.MessageFactory(key, "p"))
        while not first.is_set():  # publish until the consumer is mid-stream
            await publisher.send("order.created", 1)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(first.wait(), 0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        conn.close()
        return sub

    sub = _run(scenario())
    assert sub.closed
    assert _ended(ctx), "a socket was left open after the subscriber task was cancelled"


def test_asyncio_aclose_dispatches_what_was_already_read(
    proxy_process: Any, run_dir: Path, key: bytes
) -> None:
    async def scenario() -> None:
        seen: list[int] = []

        async def record(delivery: zbus.Delivery) -> None:
            seen.append(delivery.payload)

        dispatcher = zbus.Dispatcher()
        dispatcher.bind(EXCHANGE, "#", record)
        async with zbus.asyncio.Connection(run_dir) as conn:
            sub = conn.subscribe(dispatcher, key)
            await sub.ready()
            publisher = zbus.asyncio.Publisher(conn.exchange(EXCHANGE),
                                               zbus.MessageFactory(key, "p"))
            await publisher.send_many("order.created", list(range(50)))
            first = await sub.receive(timeout=5)  # taken by the caller, not dispatched
            assert first is not None and first.payload == 0
            assert await sub._sock.poll(5000)  # more has been read into the socket
            drained = await sub.aclose()
            assert sub.closed and drained >= 1
            assert seen == list(range(1, 1 + drained))
            assert sub.stats.received == 1 + drained == sub.stats.delivered + 1

    _run(scenario())


def test_asyncio_aclose_lets_the_handler_in_hand_finish(
    proxy_process: Any, run_dir: Path, key: bytes
) -> None:
    async def scenario() -> None:
        in_handler, release, finished = asyncio.Event(), asyncio.Event(), []

        async def slow(delivery: zbus.Delivery) -> None:
            in_handler.set()
            await release.wait()
            finished.append(delivery.payload)

        dispatcher = zbus.Dispatcher()
        dispatcher.bind(EXCHANGE, "#", slow)
        async with zbus.asyncio.Connection(run_dir) as conn:
            sub = conn.subscribe(dispatcher, key)
            await sub.ready()
            running = asyncio.create_task(sub.run())
            await zbus.asyncio.Publisher(conn.exchange(EXCHANGE),
                                         zbus.MessageFactory(key, "p")).send("order.created", 7)
            await asyncio.wait_for(in_handler.wait(), 5)
            closing = asyncio.create_task(sub.aclose())
            await asyncio.sleep(0)  # let aclose start: it must now wait for the handler
            assert not closing.done() and not sub.closed
            release.set()
            assert await closing == 0 and await running == 1
            assert finished == [7] and sub.closed

    _run(scenario())


# -- eventlet ---------------------------------------------------------------------------------


class Ticker:
    """A green thread that counts 10 ms sleeps: it only advances while the hub runs."""

    def __init__(self) -> None:
        self.ticks = 0
        self.thread = eventlet.spawn(self._tick)

    def _tick(self) -> None:
        while True:
            eventlet.sleep(0.01)
            self.ticks += 1

    def during(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> int:
        before = self.ticks
        with contextlib.suppress(zbus.Timeout):
            fn(*args, **kw)
        return self.ticks - before

    def stop(self) -> None:
        self.thread.kill()


def test_eventlet_no_wait_blocks_the_hub(proxy_process: Any, run_dir: Path, key: bytes,
                                         tmp_path: Path) -> None:
    ticker = Ticker()
    dispatcher, _ = _recorder(Backend())
    conn = zbus.eventlet.Connection(run_dir)
    # Nothing listens here: sends fill the queue and time out, requests time out.
    nowhere = zbus.eventlet.Connection(
        Path("/tmp") / f"zb-none-{run_dir.name}",
        settings=zbus.Settings(publish_hwm=1, send_timeout=0.3), require_proxy=False,
    )
    sub = conn.subscribe(dispatcher, key)
    try:
        sub.ready()
        assert ticker.during(sub.receive, 0.3) >= 10
        assert ticker.during(nowhere.control.request, "ping", 0.3) >= 10

        def fill() -> None:
            for _ in range(10):
                nowhere.send_frames(zbus.MessageFactory(key, "p").frames(EXCHANGE, "a", 1))

        with pytest.raises(zbus.Timeout):
            fill()
        assert ticker.during(fill) >= 10
    finally:
        ticker.stop()
        sub.close()
        conn.close()
        nowhere.close()


def test_eventlet_handlers_run_in_a_bounded_green_pool(
    proxy_process: Any, run_dir: Path, key: bytes
) -> None:
    running, peak, done = [0], [0], []

    def slow(delivery: zbus.Delivery) -> None:
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        eventlet.sleep(0.02)  # yields: other handlers start meanwhile, up to the bound
        running[0] -= 1
        done.append(delivery.payload)

    dispatcher = zbus.Dispatcher()
    dispatcher.bind(EXCHANGE, "#", slow)
    conn = zbus.eventlet.Connection(run_dir, handler_pool_size=3)
    with conn, conn.subscribe(dispatcher, key) as sub:
        sub.ready()
        publisher = zbus.Publisher(conn.exchange(EXCHANGE), zbus.MessageFactory(key, "p"))
        for i in range(30):
            publisher.send("order.created", i)
        assert sub.run(max_messages=30, idle_timeout=5) == 30
        assert sorted(done) == list(range(30))  # run() returned after its handlers
        assert peak[0] == 3


def test_eventlet_thousand_green_publishers_into_one_proxy(
    proxy_process: Any, run_dir: Path, key: bytes
) -> None:
    greenlets, each = 1000, 5
    agent = subprocess.Popen(
        [sys.executable, str(AGENT), "subscribe", "--run-dir", str(run_dir), "--key", key.hex(),
         "--exchange", EXCHANGE, "--expect", str(greenlets * each), "--timeout", "15"],
        stdout=subprocess.PIPE, text=True,
    )
    ctx: zmq.Context[Any] = zmq.Context()
    ctx.MAX_SOCKETS = 4 * greenlets
    try:
        assert agent.stdout is not None and agent.stdout.readline().strip() == "READY"

        def publish(n: int) -> None:
            with zbus.eventlet.Connection(run_dir, context=ctx) as conn:  # one socket each
                publisher = zbus.Publisher(conn.exchange(EXCHANGE),
                                           zbus.MessageFactory(key, f"green-{n}"))
                for i in range(each):
                    publisher.send("order.created", i)
                    eventlet.sleep(0)  # every green thread is mid-stream at once

        pool = eventlet.GreenPool(greenlets)
        for n in range(greenlets):
            pool.spawn_n(publish, n)
        pool.waitall()
        out, _ = agent.communicate(timeout=30)
        result = json.loads(out)
        assert (result["count"], result["publishers"], result["in_order"]) == (
            greenlets * each, greenlets, True)
        assert result["stats"]["lost"] == 0
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        assert _ended(ctx)


def test_eventlet_subscriber_keeps_receiving_while_others_work(
    proxy_process: Any, run_dir: Path, key: bytes
) -> None:
    count = 2000
    dispatcher, seen = _recorder(Backend())
    conn = zbus.eventlet.Connection(run_dir)
    sub = conn.subscribe(dispatcher, key)
    sub.ready()
    work = {"sleeps": 0, "requests": 0}
    done = False

    def sleeper() -> None:
        while not done:
            eventlet.sleep(0.001)
            work["sleeps"] += 1

    def socket_worker() -> None:
        with zbus.eventlet.Connection(run_dir) as own:
            while not done:
                own.proxy_stats()  # a control round trip on its own REQ socket
                work["requests"] += 1

    def publish() -> None:
        with zbus.eventlet.Connection(run_dir) as own:
            publisher = zbus.Publisher(own.exchange(EXCHANGE), zbus.MessageFactory(key, "p"))
            for i in range(count):
                publisher.send("order.created", i)
                if i % 20 == 0:
                    eventlet.sleep(0.001)

    others = [eventlet.spawn(sleeper) for _ in range(10)] + [eventlet.spawn(socket_worker)
                                                           for _ in range(3)]
    try:
        receiving = eventlet.spawn(sub.run, max_messages=count, idle_timeout=10)
        eventlet.spawn(publish).wait()
        assert receiving.wait() == count
        assert seen == list(range(count))
        assert work["sleeps"] > 100 and work["requests"] > 10
    finally:
        done = True
        for other_thread in others:
            other_thread.wait()
        sub.close()
        conn.close()


def test_eventlet_backend_under_monkey_patch(proxy_process: Any, run_dir: Path,
                                            key: bytes) -> None:
    result = _agent_json("green-selftest", "--monkey-patch", "--run-dir", str(run_dir),
                         "--key", key.hex(), "--count", "500")
    assert result["monkey_patched"] is True
    assert result["idle_receive"] is None and result["ticks_idle_receive"] >= 10
    assert result["handled"] == [500, 500]
    assert result["in_order"] == {"sub": True, "pool": True}


def _agent_json(*args: str) -> Any:
    proc = subprocess.run([sys.executable, str(AGENT), *args], capture_output=True, text=True,
                          timeout=45)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30)


def test_eventlet_missing_fails_at_construction_naming_the_extra(run_dir: Path) -> None:
    proc = _python(
        "import sys\n"
        "sys.modules['eventlet'] = None  # what an environment without eventlet looks like\n"
        "import zbus, zbus.eventlet\n"
        "try:\n"
        f"    zbus.eventlet.Connection({str(run_dir)!r})\n"
        "except zbus.ConfigError as exc:\n"
        "    print(exc)\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert 'pip install "zbus-fabric[eventlet]"' in proc.stdout


def test_importing_zbus_and_asyncio_backend_never_imports_eventlet() -> None:
    proc = _python("import sys, zbus, zbus.asyncio, zbus.eventlet\n"
                   "print('eventlet' in sys.modules)")
    assert (proc.returncode, proc.stdout.strip()) == (0, "False"), proc.stderr


# -- across backends --------------------------------------------------------------------------


def test_eventlet_publisher_to_asyncio_subscriber_to_threads_pool(
    proxy_process: Any, run_dir: Path, key: bytes
) -> None:
    """eventlet publishes ``orders``; an asyncio subscriber's coroutine handler forwards each
    to ``work``; a threads pool member consumes ``work``. Each backend in its own thread."""
    count = 200
    worked: list[Any] = []
    work = zbus.Dispatcher()
    work.bind("work", "#", lambda d: worked.append(d.payload))
    threads_conn = zbus.Connection(run_dir)
    member = threads_conn.join_pool("workers", work, key)
    member.ready()

    subscribed = threading.Event()
    failure: list[BaseException] = []

    async def forward() -> None:
        async with zbus.asyncio.Connection(run_dir) as conn:
            republish = zbus.asyncio.Publisher(conn.exchange("work"),
                                               zbus.MessageFactory(key, "asyncio"))

            async def handle(delivery: zbus.Delivery) -> None:
                await republish.send("job", {"from": delivery.publisher_id, "n": delivery.payload})

            orders = zbus.Dispatcher()
            orders.bind(EXCHANGE, "#", handle)
            async with conn.subscribe(orders, key) as sub:
                await sub.ready()
                subscribed.set()
                assert await sub.run(max_messages=count, idle_timeout=10) == count

    def in_thread() -> None:
        try:
            _run(forward())
        except BaseException as exc:
            failure.append(exc)
            subscribed.set()

    aio = threading.Thread(target=in_thread)
    aio.start()
    try:
        assert subscribed.wait(15) and not failure
        green = zbus.eventlet.Connection(run_dir)
        publisher = zbus.Publisher(green.exchange(EXCHANGE), zbus.MessageFactory(key, "green"))
        for i in range(count):
            publisher.send("order.created", i)
        green.close()
        assert member.run(max_messages=count, idle_timeout=10) == count
        assert worked == [{"from": "green", "n": i} for i in range(count)]
    finally:
        aio.join(30)
        member.close()
        threads_conn.close()
    assert not failure, failure


def test_asyncio_aclose_flushes_before_the_process_exits(
    proxy_process: Any, run_dir: Path, key: bytes
) -> None:
    """A publisher process that sends and exits right after ``await conn.aclose()`` loses
    nothing, even when it exits without tearing its ZeroMQ context down (``os._exit``, as
    multiprocessing's forked children do): without the flush, the queue dies with it."""
    count = 5000
    conn = zbus.Connection(run_dir)
    dispatcher = zbus.Dispatcher()
    got: list[int] = []
    dispatcher.bind("ex", "#", lambda d: got.append(d.sequence))
    sub = conn.subscribe(dispatcher, key)
    sub.ready()
    code = f"""
import asyncio, os, zbus, zbus.asyncio
async def main():
    conn = zbus.asyncio.Connection({str(run_dir)!r})
    pub = zbus.asyncio.Publisher(conn.exchange("ex"), zbus.MessageFactory({key!r}, "tail"))
    for i in range({count}):
        await pub.send("k", i)
    await conn.aclose()
asyncio.run(main())
os._exit(0)
"""
    try:
        result = _python(code)
        assert result.returncode == 0, result.stderr
        sub.run(max_messages=count, idle_timeout=10)
        assert got == list(range(1, count + 1))
        assert sub.stats.lost == 0
    finally:
        sub.close()
        conn.close()


def test_asyncio_pool_member_reports_its_receipts(
    proxy_process: Any, run_dir: Path, key: bytes
) -> None:
    """An asyncio fast-pool member's reads are reported to the proxy like a threads
    member's, so the pool's books balance (nothing shows as lost with a dead member)."""
    count = 300

    async def main() -> dict[str, Any]:
        conn = zbus.asyncio.Connection(run_dir)
        dispatcher = zbus.Dispatcher()
        got: list[int] = []
        dispatcher.bind("ex", "#", lambda d: got.append(d.sequence))
        member = conn.join_pool("areceipts", dispatcher, key)
        await member.ready()
        pub = zbus.asyncio.Publisher(conn.exchange("ex"), zbus.MessageFactory(key, "p"))
        for i in range(count):
            await pub.send("k", i)
        await member.run(max_messages=count, idle_timeout=10)
        assert len(got) == count
        await member.aclose()
        stats = await conn.proxy_stats()
        envelopes.append(conn.envelopes_sent)  # a busy publisher batches
        await conn.aclose()
        return dict(stats["fast_pools"]["areceipts"])

    envelopes: list[int] = []
    pool = _run(main())
    assert pool["handed_out"] == envelopes[0]  # counted in envelopes, as members report
    assert pool["reported"] == envelopes[0]
    assert pool["unaccounted"] == 0
