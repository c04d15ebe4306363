"""A proxy's queues are bounded in bytes, not only in messages (issue 14 item 10).

A subscriber that never reads, and unsigned 1 MB messages pushed to ``ingress.sock``, took a
proxy from 29 MiB to 1.9 GiB in 3 s: libzmq's high-water marks count messages, and 100,000
of them may be large. Every high-water mark of a proxy is now at most
``max_queue_bytes // max_message_bytes`` messages. Against a real zbus-proxy process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import zmq

import zbus

from .conftest import ProxyProcess
from .federation_agents import until

MiB = 1 << 20


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _stats(run_dir: Path) -> dict[str, Any]:
    with zbus.Connection(run_dir) as conn:
        return conn.control.request("stats", timeout=5)


def test_settings_make_every_high_water_mark_fit_the_byte_budget() -> None:
    settings = zbus.Settings(max_message_bytes=MiB, max_queue_bytes=64 * MiB)
    bounded = settings.queue_limits()
    for name in ("publish_hwm", "subscriber_hwm", "pool_hwm", "pool_link_hwm"):
        assert getattr(bounded, name) * bounded.max_message_bytes <= 64 * MiB
    # Small messages keep their deep queues; unset, the marks stand as configured.
    deep = zbus.Settings(max_message_bytes=4096, max_queue_bytes=1 << 30).queue_limits()
    assert deep.subscriber_hwm == zbus.Settings().subscriber_hwm
    assert zbus.Settings().queue_limits() == zbus.Settings()
    assert zbus.Settings().worst_queue_bytes == 100_000 * MiB
    with pytest.raises(zbus.ConfigError, match="max_queue_bytes"):
        zbus.Settings(max_message_bytes=MiB, max_queue_bytes=MiB - 1)


@pytest.mark.timeout(120)
def test_a_subscriber_that_never_reads_holds_at_most_max_queue_bytes(run_dir: Path) -> None:
    budget = 64 * MiB
    proxy = ProxyProcess(run_dir, "--max-queue-bytes", str(budget)).start()
    ctx: zmq.Context[Any] = zmq.Context()
    socks: list[zmq.Socket[Any]] = []
    try:
        queues = _stats(run_dir)["queues"]
        assert queues["subscriber_hwm"] == budget // MiB
        endpoints = zbus.Endpoints(run_dir)
        stalled = ctx.socket(zmq.SUB)
        socks.append(stalled)
        stalled.setsockopt(zmq.RCVHWM, 1)
        stalled.setsockopt(zmq.RCVBUF, 4096)
        stalled.setsockopt(zmq.LINGER, 0)
        stalled.connect(endpoints.deliver)
        stalled.subscribe(b"")
        push = ctx.socket(zmq.PUSH)
        socks.append(push)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(endpoints.ingress)

        def subscribed() -> bool:  # the stalled subscriber takes a first message
            push.send_multipart([b"notifications/probe", b"p", b"-"])
            return bool(stalled.poll(100))

        until(subscribed, 20, "the subscription to reach the proxy")
        before = _rss(proxy.pid)
        sent = 400
        body = b"x" * (MiB - 4096)
        for _ in range(sent):
            push.send_multipart([b"notifications/big", body, b"-"], copy=False)

        def taken() -> bool:  # every big message came in (ingress blocks the sender)
            frames = _stats(run_dir)["devices"]["origin"].get("frontend_frames_in", 0)
            return bool(frames >= 3 * (sent + 1))

        until(taken, 60, "the proxy to take every message", step=0.2)
        last = -1

        def settled() -> bool:  # and the delivery plane moved what it will move
            nonlocal last
            now = int(_stats(run_dir)["devices"]["deliver"].get("frontend_frames_in", 0))
            done, last = now == last, now
            return done

        until(settled, 30, "the delivery plane to settle", step=0.3)
        grown = _rss(proxy.pid) - before
        # One stalled pipe of 64 messages (plus socket buffers and allocator slack); without
        # the byte bound it held all 400 (~400 MiB).
        assert grown < 2 * budget, f"the proxy grew by {grown / MiB:.0f} MiB"
        assert proxy.proc is not None and proxy.proc.poll() is None
    finally:
        for sock in socks:
            sock.close(linger=0)
        ctx.term()
        proxy.stop()
