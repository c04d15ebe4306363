"""Consumers hear a hung proxy (docs/RELIABILITY.md, "Heartbeats").

Every socket zbus connects pings its peer (ZMTP heartbeats). A consumer's own socket (SUB,
PULL, DEALER) only pings, without a local timeout, since libzmq would time out a slow
consumer's healthy connection (and abort the process when a SUB reads on: libzmq #3937);
its link's heartbeat socket, a PUSH to the proxy's ingress, carries the timeout. The proxy
here is a real ``zbus-proxy`` process, hung with SIGSTOP.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

import zbus
from zbus._transport import make_socket

from .conftest import ProxyProcess
from .test_backends import BACKENDS, Backend, _drive_link, _recorder

pytestmark = pytest.mark.timeout(90)

# Small, so that a test takes seconds: the proxy is noticed hung within ~0.6 s.
FAST = zbus.Settings(heartbeat_ivl=0.1, heartbeat_timeout=0.5)


@pytest.fixture(params=list(BACKENDS))
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    backend = BACKENDS[request.param]()
    try:
        yield backend
    finally:
        backend.shutdown()


def _options(sock: zmq.Socket[Any]) -> tuple[int, int, int]:
    ivl, timeout, ttl = (sock.getsockopt(option) for option in (
        zmq.HEARTBEAT_IVL, zmq.HEARTBEAT_TIMEOUT, zmq.HEARTBEAT_TTL))
    assert isinstance(ivl, int) and isinstance(timeout, int) and isinstance(ttl, int)
    return ivl, timeout, ttl


def test_every_connecting_socket_pings() -> None:
    """A socket its caller connects (a consumer's, after its monitor) pings like any
    connecting socket, when the caller says so. Without a local timeout, the option is 0,
    never libzmq's default -1 (which means: the interval). A socket its caller binds later
    (a fast pool's PUSH to its members) gets none: its peers ping it."""
    ctx = zmq.Context()
    socks = []
    try:
        for kind in (zmq.SUB, zmq.PULL, zmq.DEALER):
            socks.append(sock := make_socket(ctx, kind, FAST, heartbeat_timeout=False))
            assert _options(sock) == (100, 0, 500), zmq.SocketType(kind).name
        socks.append(push := make_socket(ctx, zmq.PUSH, FAST, connect="inproc://nobody"))
        assert _options(push) == (100, 500, 500)
        socks.append(push := make_socket(ctx, zmq.PUSH, FAST, heartbeat_timeout=True))
        assert _options(push) == (100, 500, 500)  # connected by its caller
        socks.append(bound := make_socket(ctx, zmq.PULL, FAST, bind="inproc://here"))
        assert _options(bound)[0] == 0  # ipc/inproc listeners: their peers ping
        socks.append(later := make_socket(ctx, zmq.PUSH, FAST))
        assert _options(later)[0] == 0  # bound by its caller (a fast pool's PUSH)
    finally:
        for sock in socks:
            sock.close(linger=0)
        ctx.term()


def _hang(proxy: ProxyProcess, consumer: Any, drive: Callable[[Callable[[], bool], str], None]
          ) -> tuple[float, float]:
    """SIGSTOP the proxy until ``consumer`` says its link is down, then SIGCONT it and drive
    until the link is live again. Returns (SIGSTOP to noticed, noticed to SIGCONT)."""
    stopped = time.monotonic()
    os.kill(proxy.pid, signal.SIGSTOP)
    try:
        drive(lambda: not consumer.live, "the hung proxy was never noticed")
        noticed = time.monotonic()
        assert consumer.link.disconnects == 1
    finally:
        os.kill(proxy.pid, signal.SIGCONT)
    resumed = time.monotonic()
    drive(lambda: consumer.live, "never live again after SIGCONT")
    return noticed - stopped, resumed - noticed


def test_subscriber_notices_a_hung_proxy(
    backend: Backend, proxy_process: ProxyProcess, run_dir: Path, key: bytes
) -> None:
    """The subscriber's link goes down within about the heartbeat timeout of a SIGSTOP
    (one disconnect, ``live`` False); after SIGCONT it reconnects, re-probes, is live again
    with the outage measured, and receives what is published next."""
    conn = backend.connect(run_dir, settings=FAST)
    dispatcher, seen = _recorder(backend)
    sub = backend.subscriber(conn, dispatcher, key)
    try:
        _, down = _hang(proxy_process, sub,
                        lambda done, what: _drive_link(backend, sub, done, what))
        link = sub.link
        assert (link.disconnects, link.reconnects, link.resubscribed) == (1, 1, 1)
        assert link.last_outage is not None and link.last_outage >= down
        with zbus.Connection(run_dir) as publisher:
            Backend().publish(publisher, zbus.MessageFactory(key, "pub"), "order.created",
                              list(range(20)))
        assert backend.run(sub, 20) == 20
        assert seen == list(range(20))
        assert sub.link.disconnects == 1 and sub.live
    finally:
        backend.close(sub, conn)


@pytest.mark.parametrize("mode", ["fast", "reliable"])
def test_pool_members_notice_a_hung_proxy(
    mode: str, proxy_process: ProxyProcess, run_dir: Path, key: bytes
) -> None:
    """The same for a fast-pool member (PULL) and an at-least-once member (DEALER): down
    within about the heartbeat timeout, live again after SIGCONT, and taking the pool's
    messages again."""
    seen: list[int] = []
    dispatcher = zbus.Dispatcher()
    dispatcher.bind("orders", "order.*", lambda d: seen.append(d.payload))
    conn = zbus.Connection(run_dir, settings=FAST)
    member: Any = (conn.join_pool("billing", dispatcher, key) if mode == "fast"
                   else conn.join_reliable_pool("billing", dispatcher, key))
    member.ready()
    backend = Backend()
    try:
        _, down = _hang(proxy_process, member,
                        lambda done, what: _drive_link(backend, member, done, what))
        assert member.link.last_outage is not None and member.link.last_outage >= down
        with zbus.Connection(run_dir) as publisher:
            backend.publish(publisher, zbus.MessageFactory(key, "pub"), "order.created",
                            list(range(20)), exchange="orders")
        deadline = time.monotonic() + 20
        while len(seen) < 20 and time.monotonic() < deadline:
            member.process(timeout=0.1)
        assert sorted(seen) == list(range(20))
        assert member.link.disconnects == 1 and member.live
    finally:
        member.close()
        conn.close()


SLOW_SUBSCRIBER = r"""
import json, sys, time
import zbus
run_dir, key = sys.argv[1], bytes.fromhex(sys.argv[2])
settings = zbus.Settings(heartbeat_ivl=0.05, heartbeat_timeout=0.2, subscriber_hwm=10)
dispatcher = zbus.Dispatcher()
dispatcher.bind("orders", "#", lambda d: None)
with zbus.Connection(run_dir, settings=settings) as conn:
    sub = conn.subscribe(dispatcher, key)
    sub.ready()
    print("READY", flush=True)
    sys.stdin.readline()  # the parent has published: the receive queue is full
    time.sleep(1.0)  # a slow consumer: reads nothing for 5 heartbeat timeouts
    while sub.receive(timeout=0.5) is not None:
        time.sleep(0.01)
    print(json.dumps(sub.counters()), flush=True)
    sub.close()
"""


def test_a_slow_subscriber_keeps_its_connection(
    proxy_process: ProxyProcess, run_dir: Path, key: bytes
) -> None:
    """A subscriber whose receive queue is full reads nothing from its connection, heartbeat
    replies included: it must not time its healthy proxy out (nor abort: libzmq #3937).
    Run in a child process, so that an abort fails this test and not the test run."""
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SUBSCRIBER, str(run_dir), key.hex()],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        assert proc.stdout.readline().strip() == "READY"
        with zbus.Connection(run_dir) as publisher:
            Backend().publish(publisher, zbus.MessageFactory(key, "pub"), "order.created",
                              list(range(2000)), exchange="orders")
        proc.stdin.write("go\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        assert proc.wait(30) == 0, f"the slow subscriber died: exit {proc.returncode}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    counters = json.loads(line)
    assert counters["link"]["disconnects"] == 0 and counters["live"], counters
    assert counters["received"] == 2000 and counters["lost"] == 0  # the proxy held them
