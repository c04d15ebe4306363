"""A Connection that has sent before fork() works in the child, and the parent's is untouched.

libzmq's state does not survive fork: a socket inherited by the child queues where nothing
reads it (every message silently lost), and past ``publish_hwm`` pyzmq retries libzmq's
EINTR for ever (a busy loop that never raises Timeout). zbus.Connection notices the fork and
makes the child its own context and socket (docs/GUIDE.md, "Threads, processes, forks");
a consumer made before the fork refuses to work in the child with a clear error.

Each child reports on a pipe and is reaped within a bound (killed past it), pass or fail;
deliveries are counted from sequence numbers in the payloads, independently of zbus.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import multiprocessing
import os
import select
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import zbus
import zbus.asyncio

from .conftest import ProxyProcess

pytestmark = pytest.mark.timeout(90)

EXCHANGE = "notifications"
KEY = "compute.instance.create.end"
COUNT = 300
REAP_TIMEOUT = 30.0


def reap(pid: int, timeout: float = REAP_TIMEOUT) -> int:
    """Wait for child ``pid`` (its pidfd turns readable when it exits), killing it past
    ``timeout``; its exit status, or -1 if it had to be killed."""
    pidfd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)
    if not ready:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return -1
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@contextmanager
def forked(child: Callable[[], dict[str, Any]]) -> Iterator[Callable[[], dict[str, Any]]]:
    """Fork; the child runs ``child`` and writes its result (or its traceback) as JSON on a
    pipe, then leaves with os._exit (never through pytest). Yields a function that reaps
    the child and returns what it wrote; the child is reaped on the way out in any case."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        code = 0
        try:
            os.close(read_fd)
            try:
                report = child()
            except BaseException:
                report, code = {"error": traceback.format_exc()}, 1
            os.write(write_fd, json.dumps(report).encode())
        finally:
            os._exit(code)
    os.close(write_fd)
    reaped: list[int] = []

    def result() -> dict[str, Any]:
        if not reaped:
            reaped.append(reap(pid))
        with os.fdopen(read_fd, "rb", closefd=False) as pipe:
            text = pipe.read()
        assert reaped[0] != -1, f"the child did not finish within {REAP_TIMEOUT:g}s (killed)"
        report: dict[str, Any] = json.loads(text) if text else {}
        assert "error" not in report, report["error"]
        assert reaped[0] == 0, f"the child exited with {reaped[0]}: {report}"
        return report

    try:
        yield result
    finally:
        if not reaped:
            reaped.append(reap(pid))
        os.close(read_fd)


def subscribe(conn: zbus.Connection, key: bytes) -> zbus.Subscriber:
    dispatcher = zbus.Dispatcher()
    dispatcher.bind(EXCHANGE, "#", lambda delivery: None)
    sub = conn.subscribe(dispatcher, key)
    sub.ready()
    return sub


def received(sub: zbus.Subscriber, want: int, timeout: float = 10.0) -> dict[str, set[int]]:
    """The payload sequence numbers received, per sender, until ``want`` arrived in all or
    ``timeout`` passed."""
    got: dict[str, set[int]] = {}
    deadline = time.monotonic() + timeout
    while sum(map(len, got.values())) < want and (left := deadline - time.monotonic()) > 0:
        delivery = sub.receive(timeout=left)
        if delivery is None:
            break
        payload = delivery.message
        got.setdefault(payload["who"], set()).add(payload["n"])
    return got


def publish(publisher: zbus.Publisher, who: str, count: int = COUNT) -> None:
    for n in range(count):
        publisher.send(KEY, {"who": who, "n": n})


def test_forked_child_publishes_everything(proxy_process: ProxyProcess, run_dir: Path,
                                          key: bytes) -> None:
    conn = zbus.Connection(run_dir)
    sub = subscribe(conn, key)
    publisher = zbus.Publisher(conn.exchange(EXCHANGE), zbus.MessageFactory(key, "svc"))
    publish(publisher, "parent", 1)  # the parent's socket and context exist before the fork

    def child() -> dict[str, Any]:
        publish(publisher, "child")
        conn.close()  # flushes through the proxy: returns once all 300 passed it
        return {}

    with forked(child) as result:
        result()
    got = received(sub, 1 + COUNT)
    assert {who: len(ns) for who, ns in got.items()} == {"parent": 1, "child": COUNT}
    sub.close()
    conn.close()


def _worker(publisher: zbus.Publisher, count: int) -> None:
    """A multiprocessing worker publishing through the Connection it inherited."""
    publish(publisher, "worker", count)
    publisher.exchange.connection.close()


def test_multiprocessing_fork_worker_publishes_everything(
    proxy_process: ProxyProcess, run_dir: Path, key: bytes
) -> None:
    """The way oslo.service starts workers: fork start method, the parent's objects passed."""
    conn = zbus.Connection(run_dir)
    sub = subscribe(conn, key)
    publisher = zbus.Publisher(conn.exchange(EXCHANGE), zbus.MessageFactory(key, "svc"))
    publish(publisher, "parent", 1)
    worker = multiprocessing.get_context("fork").Process(target=_worker, args=(publisher, COUNT))
    worker.start()
    try:
        worker.join(REAP_TIMEOUT)
    finally:
        if worker.is_alive():
            worker.kill()
            worker.join()
    assert worker.exitcode == 0, f"worker exit code {worker.exitcode}"
    got = received(sub, 1 + COUNT)
    assert {who: len(ns) for who, ns in got.items()} == {"parent": 1, "worker": COUNT}
    sub.close()
    conn.close()


def test_parent_keeps_publishing_while_a_child_does(proxy_process: ProxyProcess,
                                                   run_dir: Path, key: bytes) -> None:
    conn = zbus.Connection(run_dir)
    sub = subscribe(conn, key)
    publisher = zbus.Publisher(conn.exchange(EXCHANGE), zbus.MessageFactory(key, "svc"))
    publish(publisher, "before", 1)
    # The child waits for the parent's go (a pipe), so both publish at the same time.
    go_read, go_write = os.pipe()

    def child() -> dict[str, Any]:
        os.read(go_read, 1)
        publish(publisher, "child")
        conn.close()
        return {}

    with forked(child) as result:
        os.write(go_write, b"g")
        publish(publisher, "parent")
        conn.flush()
        result()
    os.close(go_read)
    os.close(go_write)
    publish(publisher, "after")  # and after the child exited
    conn.flush()
    got = received(sub, 1 + 3 * COUNT)
    assert {who: len(ns) for who, ns in got.items()} == {
        "before": 1, "child": COUNT, "parent": COUNT, "after": COUNT}
    sub.close()
    conn.close()


def test_forked_child_with_a_full_queue_raises_timeout(run_dir: Path, key: bytes) -> None:
    """No proxy: the child's queue fills at publish_hwm, and send raises Timeout after
    send_timeout instead of spinning for ever on the parent's socket."""
    hwm, send_timeout = 10, 0.5
    conn = zbus.Connection(run_dir, settings=zbus.Settings(  # each message alone: the
        publish_hwm=hwm, send_timeout=send_timeout, linger=0,  # queue holds hwm of them
        batch_bytes=0), require_proxy=False)
    publisher = zbus.Publisher(conn.exchange(EXCHANGE), zbus.MessageFactory(key, "svc"))
    publish(publisher, "parent", 1)  # queued in the parent's socket: no proxy to take it

    def child() -> dict[str, Any]:
        sent = 0
        start = time.monotonic()
        try:
            while sent < 100 * hwm:
                publisher.send(KEY, {"who": "child", "n": sent})
                sent += 1
        except zbus.Timeout:
            return {"sent": sent, "timeout_after": time.monotonic() - start}
        return {"sent": sent}

    with forked(child) as result:
        report = result()
    assert "timeout_after" in report, f"no Timeout after {report['sent']} sends"
    # The queue holds at least publish_hwm messages (libzmq may take a few more) before
    # send has to wait, and the wait is the child's send_timeout.
    assert hwm <= report["sent"] < 100 * hwm
    conn.close()


def test_consumer_made_before_fork_refuses_to_work_in_the_child(
    proxy_process: ProxyProcess, run_dir: Path, key: bytes
) -> None:
    conn = zbus.Connection(run_dir)
    sub = subscribe(conn, key)
    publisher = zbus.Publisher(conn.exchange(EXCHANGE), zbus.MessageFactory(key, "svc"))
    publish(publisher, "parent", 1)
    conn.flush()  # the message is at the subscriber's door when the child starts

    def child() -> dict[str, Any]:
        report: dict[str, Any] = {}
        try:
            report["received"] = sub.receive(timeout=0.2) is not None
        except zbus.TransportError as exc:
            report["error_text"] = str(exc)
        sub.close()  # harmless in the child: the parent's socket is not touched
        fresh = subscribe(conn, key)  # a consumer made in the child works
        fresh.close()
        return report

    with forked(child) as result:
        report = result()
    assert "before fork()" in report.get("error_text", ""), report
    got = received(sub, 1)  # the parent's subscriber still has its message
    assert got == {"parent": {0}}
    sub.close()
    conn.close()


def test_asyncio_connection_in_a_forked_child(proxy_process: ProxyProcess, run_dir: Path,
                                             key: bytes) -> None:
    aconn = zbus.asyncio.Connection(run_dir)
    publisher = zbus.asyncio.Publisher(aconn.exchange(EXCHANGE), zbus.MessageFactory(key, "a"))

    async def send(who: str, count: int) -> None:
        for n in range(count):
            await publisher.send(KEY, {"who": who, "n": n})
        await aconn.flush()

    conn = zbus.Connection(run_dir)
    sub = subscribe(conn, key)
    asyncio.run(send("parent", 1))

    def child() -> dict[str, Any]:
        asyncio.run(send("child", COUNT))
        aconn.close()
        return {}

    with forked(child) as result:
        result()
    got = received(sub, 1 + COUNT)
    assert {who: len(ns) for who, ns in got.items()} == {"parent": 1, "child": COUNT}
    sub.close()
    conn.close()
    aconn.close()


EVENTLET_SCRIPT = r"""
import json, os, select, signal, sys

import eventlet

import zbus
import zbus.eventlet

run_dir, key, count = sys.argv[1], bytes.fromhex(sys.argv[2]), int(sys.argv[3])
conn = zbus.eventlet.Connection(run_dir)
publisher = zbus.Publisher(conn.exchange("notifications"), zbus.MessageFactory(key, "green"))
publisher.send("compute.instance.create.end", {"who": "parent", "n": 0})
conn.flush()
pid = os.fork()
if pid == 0:
    code = 1
    try:
        eventlet.hubs.use_hub()  # a forked eventlet child resets its hub, as oslo.service does
        for n in range(count):
            publisher.send("compute.instance.create.end", {"who": "child", "n": n})
        conn.close()
        code = 0
    finally:
        os._exit(code)
pidfd = os.pidfd_open(pid)
if not select.select([pidfd], [], [], 20)[0]:
    os.kill(pid, signal.SIGKILL)
_, status = os.waitpid(pid, 0)
print(json.dumps({"child": os.waitstatus_to_exitcode(status)}), flush=True)
conn.close()
"""


def test_eventlet_connection_in_a_forked_child(proxy_process: ProxyProcess, run_dir: Path,
                                              key: bytes) -> None:
    """In a process of its own, so that pytest's process never forks with an eventlet hub."""
    if importlib.util.find_spec("eventlet") is None:
        pytest.skip("eventlet is not installed")
    conn = zbus.Connection(run_dir)
    sub = subscribe(conn, key)
    proc = subprocess.Popen(
        [sys.executable, "-c", EVENTLET_SCRIPT, str(run_dir), key.hex(), str(COUNT)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # its forked child too, if still there
        proc.wait()
    assert proc.returncode == 0, err
    assert json.loads(out.splitlines()[-1]) == {"child": 0}, out
    got = received(sub, 1 + COUNT)
    assert {who: len(ns) for who, ns in got.items()} == {"parent": 1, "child": COUNT}
    sub.close()
    conn.close()


def test_fork_counter_moves_only_in_the_child() -> None:
    from zbus import _transport

    before = _transport.forks

    def child() -> dict[str, Any]:
        return {"forks": _transport.forks}

    with forked(child) as result:
        assert result() == {"forks": before + 1}
    assert _transport.forks == before
