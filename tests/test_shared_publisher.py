"""zbus.SharedPublisher: one publisher for every thread and green thread of a process, that
survives fork and loses nothing in silence (issue 17).

Deliveries are counted from numbers in the payloads, against a real zbus-proxy process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import zbus

from .conftest import ProxyProcess
from .test_fork import forked

pytestmark = pytest.mark.timeout(90)

EXCHANGE = "notifications"
KEY = "compute.instance.create.end"


def subscriber(conn: zbus.Connection, key: bytes) -> zbus.Subscriber:
    dispatcher = zbus.Dispatcher()
    dispatcher.bind(EXCHANGE, "#", lambda delivery: None)
    sub = conn.subscribe(dispatcher, key)
    sub.ready()
    return sub


def received(sub: zbus.Subscriber, want: int, timeout: float = 15.0
             ) -> tuple[dict[str, list[int]], set[bytes]]:
    """The payload numbers received per sender (in arrival order) and the stream ids seen,
    until ``want`` arrived or ``timeout`` passed, then whatever else comes within 0.3 s."""
    got: dict[str, list[int]] = {}
    streams: set[bytes] = set()
    deadline = time.monotonic() + timeout
    count = 0
    while (left := deadline - time.monotonic()) > 0:
        delivery = sub.receive(timeout=left if count < want else 0.3)
        if delivery is None:
            break
        count += 1
        got.setdefault(delivery.message["who"], []).append(delivery.message["n"])
        streams.add(delivery.envelope.stream_id)
    return got, streams


def test_threads_share_one_publisher_and_every_message_arrives_once(
        proxy_process: ProxyProcess, run_dir: Path, key: bytes) -> None:
    threads, each = 8, 500
    with zbus.Connection(run_dir) as conn, subscriber(conn, key) as sub:
        pub = zbus.SharedPublisher(run_dir, zbus.MessageFactory(key, "svc"))

        def work(t: int) -> None:
            for n in range(each):
                pub.send(EXCHANGE, KEY, {"who": f"t{t}", "n": n})

        workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        pub.flush()
        got, _ = received(sub, threads * each)
        pub.close()
        assert {who: sorted(ns) for who, ns in got.items()} == \
            {f"t{t}": list(range(each)) for t in range(threads)}
        # Each thread's messages keep their order: one queue, one sender.
        assert all(ns == sorted(ns) for ns in got.values())
        assert pub.stats.as_dict() == {"queued": 4000, "sent": 4000, "dropped": 0, "failed": 0,
                                       "retries": 0, "unsent_at_close": 0}
        assert sub.stats.lost == 0


def test_a_full_queue_drops_only_when_asked_and_counts_every_drop(run_dir: Path,
                                                                  key: bytes) -> None:
    # No proxy: the sender's socket fills at publish_hwm and then waits send_timeout, so the
    # queue behind it fills too.
    settings = zbus.Settings(publish_hwm=1, send_timeout=1.0, linger=0.2)
    run_dir.chmod(0o700)
    pub = zbus.SharedPublisher(run_dir, zbus.MessageFactory(key, "svc"), settings=settings,
                               max_queue=2, block=False, require_proxy=False)
    results = [pub.send(EXCHANGE, KEY, {"who": "x", "n": n}) for n in range(50)]
    stats = pub.stats
    assert results.count(False) == stats.dropped > 0
    assert stats.queued + stats.dropped == 50
    with pytest.raises(zbus.Timeout, match="queue stayed full"):
        for n in range(10):
            pub.send(EXCHANGE, KEY, {"who": "x", "n": n}, block=True, timeout=0.2)
    pub.close(timeout=5)
    stats = pub.stats
    # Nothing reached a proxy: every message queued is either failed (refused after
    # send_timeout) or counted unsent at close (still queued, or taken by the socket and
    # never confirmed): none is missing from the books.
    assert stats.failed + stats.unsent_at_close == stats.queued
    with pytest.raises(zbus.TransportError, match="closed"):
        pub.send(EXCHANGE, KEY, {})


def test_no_proxy_is_refused_at_construction(run_dir: Path, key: bytes) -> None:
    with pytest.raises(zbus.ProxyError, match="require_proxy=False"):
        zbus.SharedPublisher(run_dir / "nope", zbus.MessageFactory(key, "svc"))


def test_a_forked_child_sends_through_its_own_sender(proxy_process: ProxyProcess,
                                                     run_dir: Path, key: bytes) -> None:
    with zbus.Connection(run_dir) as conn, subscriber(conn, key) as sub:
        pub = zbus.SharedPublisher(run_dir, zbus.MessageFactory(key, "svc"))
        for n in range(100):
            pub.send(EXCHANGE, KEY, {"who": "parent", "n": n})  # some still queued at fork

        def child() -> dict[str, Any]:
            for n in range(300):
                pub.send(EXCHANGE, KEY, {"who": "child", "n": n})
            pub.close()  # sends, flushes through the proxy, closes
            return pub.stats.as_dict()

        with forked(child) as result:
            for n in range(100, 200):
                pub.send(EXCHANGE, KEY, {"who": "parent", "n": n})
            child_stats = result()
        pub.flush()
        got, streams = received(sub, 500)
        pub.close()
    assert child_stats == {"queued": 300, "sent": 300, "dropped": 0, "failed": 0,
                           "retries": 0, "unsent_at_close": 0}
    # The parent's queue was not sent again from the child: each message exactly once.
    assert sorted(got["parent"]) == list(range(200))
    assert sorted(got["child"]) == list(range(300))
    assert len(streams) == 2  # the child numbers its own stream
    assert sub.stats.lost == 0


GREEN_EMITTER = textwrap.dedent("""
    import eventlet
    eventlet.monkey_patch()
    import json, sys
    import zbus

    run_dir, key = sys.argv[1], bytes.fromhex(sys.argv[2])
    try:
        zbus.Connection(run_dir)
        refused = False
    except zbus.ConfigError:
        refused = True
    pub = zbus.SharedPublisher(run_dir, zbus.MessageFactory(key, "green"))
    ticks = []

    def ticker():  # proves the hub keeps running while green threads publish
        for _ in range(20):
            ticks.append(1)
            eventlet.sleep(0.001)

    def work(g):
        for n in range(50):
            pub.send("notifications", "compute.instance.create.end", {"who": "g%d" % g, "n": n})
            eventlet.sleep(0)

    pool = eventlet.GreenPool()
    pool.spawn_n(ticker)
    for g in range(40):
        pool.spawn_n(work, g)
    pool.waitall()
    pub.flush()
    pub.close()
    print(json.dumps({"refused": refused, "stats": pub.stats.as_dict(), "ticks": len(ticks)}))
""")


def test_eventlet_patched_green_threads_share_one_publisher(
        proxy_process: ProxyProcess, run_dir: Path, key: bytes) -> None:
    with zbus.Connection(run_dir) as conn, subscriber(conn, key) as sub:
        proc = subprocess.run([sys.executable, "-c", GREEN_EMITTER, str(run_dir), key.hex()],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        got, _ = received(sub, 2000)
    assert report["refused"]  # a plain Connection is refused there; the shared one works
    assert report["stats"] == {"queued": 2000, "sent": 2000, "dropped": 0, "failed": 0,
                               "retries": 0, "unsent_at_close": 0}
    assert report["ticks"] == 20
    assert {who: sorted(ns) for who, ns in got.items()} == \
        {f"g{g}": list(range(50)) for g in range(40)}
