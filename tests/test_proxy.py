"""The zbus-proxy daemon's lifecycle and control socket, against real processes."""

from __future__ import annotations

import errno
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from zbus_proxy import Proxy, cli

import zbus

from .agents import Agent, Collector
from .conftest import ProxyProcess

BINDING = "notifications/compute.#"
LOCK = "zbus-proxy.lock"


def sockets(run_dir: Path) -> set[str]:
    return {p.name for p in run_dir.glob("*.sock")}


def test_second_proxy_on_the_same_run_dir_refuses(
    proxy_process: ProxyProcess, run_dir: Path
) -> None:
    second = subprocess.run(
        [sys.executable, "-m", "zbus_proxy", "--run-dir", str(run_dir)],
        capture_output=True, text=True, timeout=30,
    )
    # The CLI documents its exit codes; "run directory taken" is 2 in the wording,
    # EXIT_TAKEN where the CLI names it.
    assert second.returncode == getattr(cli, "EXIT_TAKEN", 2), second.stderr
    assert f"pid {proxy_process.pid}" in second.stderr
    # ... and the first one is untouched by the attempt.
    assert (run_dir / LOCK).read_text() == str(proxy_process.pid)
    with zbus.Connection(run_dir) as conn:
        assert conn.control.request("ping")["pid"] == proxy_process.pid


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_shutdown_leaves_no_sockets_and_no_lock(run_dir: Path, sig: int) -> None:
    proxy = ProxyProcess(run_dir).start()
    try:
        with zbus.Connection(run_dir) as conn:
            conn.declare_pool("billing", [BINDING])
        assert {"ingress.sock", "origin.sock", "deliver.sock", "control.sock",
                "pool-billing.sock", "pool-billing.origin.sock"} <= sockets(run_dir)
        assert (run_dir / LOCK).exists()
    finally:
        code = proxy.stop(sig)
    assert code == 0, proxy.log.read_text()
    assert sockets(run_dir) == set()
    assert not (run_dir / LOCK).exists()
    assert (run_dir / "pools.json").exists()  # declarations are state, not leftovers


def test_sigkilled_proxy_leftovers_are_cleaned_by_the_next_start(
    run_dir: Path, key: bytes
) -> None:
    proxy = ProxyProcess(run_dir).start()
    try:
        with zbus.Connection(run_dir) as conn:
            conn.declare_pool("gone", [BINDING])
        assert proxy.stop(signal.SIGKILL) == -signal.SIGKILL
        stale = sockets(run_dir)
        assert {"deliver.sock", "pool-gone.sock", "pool-gone.origin.sock"} <= stale
        assert all(not accepts(run_dir / name) for name in stale)  # nobody behind them
        assert (run_dir / LOCK).exists()  # the file stays; its flock died with the process
        # Forget the pool, so that only the proxy's own cleanup can remove its sockets.
        (run_dir / "pools.json").write_text(json.dumps({"pools": {}}))

        proxy.start()
        assert (run_dir / LOCK).read_text() == str(proxy.pid)
        assert "pool-gone.sock" not in sockets(run_dir)
        assert "pool-gone.origin.sock" not in sockets(run_dir)
        fresh = sockets(run_dir)
        assert fresh == {"ingress.sock", "origin.sock", "deliver.sock", "control.sock",
                         "repair.sock"}
        assert all(accepts(run_dir / name) for name in fresh)
        # And it serves: a subscription goes live end to end and a message gets through.
        round_trip(run_dir, key)
    finally:
        proxy.stop()


def accepts(path: Path) -> bool:
    """Whether a live listener is behind unix socket ``path`` (a stale file refuses)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2)
        code = probe.connect_ex(str(path))
    assert code in (0, errno.ECONNREFUSED), errno.errorcode.get(code, code)
    return code == 0


def round_trip(run_dir: Path, key: bytes) -> None:
    dispatcher = zbus.Dispatcher()
    dispatcher.bind("notifications", "compute.#", lambda delivery: None)
    with zbus.Connection(run_dir) as conn, conn.subscribe(dispatcher, key) as sub:
        sub.ready(timeout=10)
        publisher = zbus.Publisher(conn.exchange("notifications"),
                                   zbus.MessageFactory(key, "t"))
        publisher.send("compute.start", {"n": 1})
        delivery = sub.receive(timeout=10)
        assert delivery is not None and delivery.payload == {"n": 1}


def test_pool_declarations_survive_a_restart(proxy_process: ProxyProcess, run_dir: Path) -> None:
    pools = {"billing": [BINDING], "audit": ["compute/#", "network/port.*"]}
    with zbus.Connection(run_dir) as conn:
        for name, bindings in pools.items():
            conn.declare_pool(name, bindings)
        conn.declare_pool("billing", [BINDING])  # idempotent
        assert proxy_process.stop() == 0
        saved = json.loads((run_dir / "pools.json").read_text())
        assert saved == {"pools": {n: sorted(b) for n, b in pools.items()}}

        proxy_process.start()
        assert conn.control.request("pools")["pools"] == saved["pools"]
        assert {"pool-billing.sock", "pool-audit.sock"} <= sockets(run_dir)
        with pytest.raises(zbus.ProxyError, match="declared with bindings"):
            conn.declare_pool("billing", ["notifications/other"])


def raw_request(run_dir: Path, frames: list[bytes], timeout: float = 5.0) -> dict[str, Any] | None:
    """Send ``frames`` as one request on a fresh REQ socket; the reply, or None if none came."""
    ctx: zmq.Context[Any] = zmq.Context.instance()
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    try:
        req.connect(f"ipc://{run_dir}/control.sock")
        req.send_multipart(frames)
        if not req.poll(int(timeout * 1000)):
            return None
        reply: dict[str, Any] = msgpack.unpackb(req.recv(), raw=False)
        return reply
    finally:
        req.close()


GARBAGE = [
    [b"\xc1 not msgpack"],
    [b""],
    [msgpack.packb([1, 2, 3])],
    [msgpack.packb({1: "int key"})],
    [msgpack.packb({"no": "op"})],
    [msgpack.packb({"op": "shutdown"})],
    [msgpack.packb({"op": "declare_pool"})],
    [msgpack.packb({"op": "declare_pool", "name": "../etc", "bindings": [BINDING]})],
    [msgpack.packb({"op": "declare_pool", "name": "p", "bindings": BINDING})],
    [msgpack.packb({"op": "declare_pool", "name": "p", "bindings": [5]})],
    [msgpack.packb({"op": "declare_pool", "name": "p", "bindings": ["no-slash"]})],
    [msgpack.packb({"op": "declare_pool", "name": "p", "bindings": ["ex/a..b"]})],
    [msgpack.packb({"op": "ping"}), b"second frame"],
]


def test_control_socket_refuses_garbage_and_keeps_serving(
    proxy_process: ProxyProcess, run_dir: Path
) -> None:
    for frames in GARBAGE:
        reply = raw_request(run_dir, frames)
        assert reply is not None, f"no reply to {frames!r}"
        assert reply["ok"] is False and reply["error"], (frames, reply)
        assert raw_request(run_dir, [msgpack.packb({"op": "ping"})]) == {
            "ok": True, "pid": proxy_process.pid
        }
    # A request over max_message_bytes never reaches Python: libzmq drops the connection.
    assert raw_request(run_dir, [b"x" * (zbus.Settings().max_message_bytes + 1)], 0.5) is None
    with zbus.Connection(run_dir) as conn:
        assert conn.control.request("ping")["pid"] == proxy_process.pid
        assert conn.control.request("pools")["pools"] == {}  # no garbage was declared
        stats = conn.proxy_stats()
        assert {"origin", "deliver"} <= set(stats["devices"])


def test_publisher_without_proxy_times_out_once_its_queue_is_full(
    run_dir: Path, key: bytes
) -> None:
    settings = zbus.Settings(send_timeout=0.3, publish_hwm=5, linger=0.1)
    factory = zbus.MessageFactory(key, "lonely")
    with zbus.Connection(run_dir, settings=settings, require_proxy=False) as conn:
        sent = 0
        with pytest.raises(zbus.Timeout, match="not sent") as caught:
            for sent in range(1000):  # bounded: the queue holds about publish_hwm
                started = time.monotonic()
                conn.send_frames(factory.frames("notifications", "compute.start", {"n": sent}))
        blocked = time.monotonic() - started
    assert isinstance(caught.value, TimeoutError)
    assert settings.publish_hwm <= sent < 1000
    assert blocked >= settings.send_timeout * 0.9  # it waited send_timeout, then gave up


def test_in_process_proxy_serves_a_fanout(run_dir: Path, key: bytes) -> None:
    """``with Proxy(run_dir)`` in this process; subscribers in their own processes."""
    count = 500
    collector = Collector(run_dir)
    agents: list[Agent] = []
    try:
        with Proxy(run_dir) as proxy:
            for i in range(2):
                agents.append(Agent(run_dir, "subscribe", "--key", key.hex(), "--collector",
                                    collector.endpoint, "--bind", BINDING, name=f"sub{i}"))
            for agent in agents:
                agent.wait_ready()
            factory = zbus.MessageFactory(key, "inproc")
            with zbus.Connection(run_dir) as conn:
                publisher = zbus.Publisher(conn.exchange("notifications"), factory)
                for n in range(count):
                    publisher.send("compute.instance.create.end", {"n": n})
                conn.flush()
            # A busy publisher sends batches (smart batching): the proxy forwards envelopes.
            assert conn.messages_sent == count and 1 <= conn.envelopes_sent <= count
            collector.until(lambda: all(len(collector.seen[a.name]) >= count for a in agents),
                            30, "the fan-out")
            collector.stop_all(agents)
            stats = proxy.stats()
            assert stats["devices"]["origin"]["frontend_frames_in"] >= 3 * conn.envelopes_sent
        for agent in agents:
            assert collector.sequences(agent.name) == list(range(1, count + 1))
            assert collector.stats[agent.name]["stats"]["lost"] == 0
        assert sockets(run_dir) == set()
        assert not (run_dir / LOCK).exists()
    finally:
        for agent in agents:
            agent.close()
        collector.close()


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_send_frames_delivers_any_frame_count_intact(run_dir: Path, count: int) -> None:
    """The fast send path must keep multipart messages whole, whatever their length."""
    with Proxy(run_dir):
        conn = zbus.Connection(run_dir)
        ctx = zmq.Context()
        sub = ctx.socket(zmq.SUB)
        sub.connect(conn.endpoints.deliver)
        sub.subscribe(b"ex/")
        frames = [b"ex/k"] + [bytes([i]) * (i + 1) for i in range(1, count)]
        try:
            # resend until the subscription is live (the first copy to arrive is checked)
            deadline = time.monotonic() + 10
            while not sub.poll(50):
                conn.send_frames(frames)
                assert time.monotonic() < deadline
            assert sub.recv_multipart() == frames
        finally:
            sub.close(linger=0)
            ctx.term()
            conn.close()


def test_stop_right_after_a_pool_is_declared_returns(run_dir: Path) -> None:
    """A pool's member monitor waits in an inbox for the control thread; a stop that came
    first used to leave it open there, and the context's term() then waited forever (seen
    as a proxy that ignored SIGINT). In-process, so the race is hit nearly every time."""
    for attempt in range(5):
        proxy = Proxy(run_dir / f"p{attempt}")
        proxy.start()
        proxy.declare_pool("billing", [BINDING])
        stopper = threading.Thread(target=proxy.stop, daemon=True)
        stopper.start()
        stopper.join(10)
        assert not stopper.is_alive(), f"stop() hung (attempt {attempt})"
