"""The library-side metrics hook: an application exports its consumers' counters."""

from __future__ import annotations

import os
import select
import socket
import threading
import urllib.request
from pathlib import Path

from zbus_proxy import Proxy

import zbus
from tests.conftest import ProxyProcess
from zbus.metrics import MAX_CONNECTIONS, MetricsServer, render_consumers


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = reply.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def test_an_application_serves_its_subscribers_counters(run_dir: Path, key: bytes) -> None:
    with Proxy(run_dir):
        conn = zbus.Connection(run_dir)
        dispatcher = zbus.Dispatcher()
        dispatcher.bind("ex", "a.#", lambda d: None)
        sub = conn.subscribe(dispatcher, key)
        sub.ready()
        pub = zbus.Publisher(conn.exchange("ex"), zbus.MessageFactory(key, "app"))
        for i in range(5):
            pub.send("a.b", i)
        forger = zbus.MessageFactory(zbus.generate_key(), "forger")
        conn.send_frames(forger.frames("ex", "a.b", "x"))
        server = MetricsServer(lambda: render_consumers({"billing": sub.stats}), "127.0.0.1", 0)
        try:
            assert sub.run(max_messages=5, idle_timeout=5) == 5
            sub.receive(timeout=0.5)  # the forgery is read and counted, not delivered
            got = scrape(server.port)
        finally:
            server.stop()
            sub.close()
            conn.close()
    assert got['zbus_consumer_delivered_total{consumer="billing"}'] == 5
    assert got['zbus_consumer_received_total{consumer="billing"}'] == 6
    assert got['zbus_consumer_rejected_total{consumer="billing",reason="bad_signature"}'] == 1
    assert got['zbus_consumer_lost{consumer="billing"}'] == 0  # a gauge: repairs lower it


def test_label_values_are_escaped() -> None:
    stats = zbus.ConsumerStats(received=1)
    text = render_consumers({'we"ird\\name\n': stats})
    assert 'zbus_consumer_received_total{consumer="we\\"ird\\\\name\\n"} 1' in text


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_idle_connections_cannot_exhaust_the_proxy(run_dir: Path) -> None:
    # Issue 14, item 4: one thread and fd per connection, no timeout: ~1,800 idle
    # connections took the proxy to its fd limit and libzmq aborted it.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proxy = ProxyProcess(run_dir, "--metrics-port", str(port)).start()
    idle: list[socket.socket] = []
    try:
        scrape(port)  # the endpoint is up before the baseline is taken
        baseline = _fds(proxy.pid)
        idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(200)]
        samples = scrape(port)  # a fresh client is served among 200 idle ones
        assert samples["zbus_metrics_connections_evicted_total"] >= 200 - MAX_CONNECTIONS
        assert samples["zbus_metrics_connections_open"] <= MAX_CONNECTIONS
        assert _fds(proxy.pid) <= baseline + MAX_CONNECTIONS + 2
        with zbus.Connection(run_dir) as conn:
            assert conn.control.request("ping", timeout=5)["ok"]
        # The evicted ones were closed: each reads end-of-file.
        closed = sum(1 for s in idle if _closed(s))
        assert closed >= 200 - MAX_CONNECTIONS
    finally:
        for s in idle:
            s.close()
        assert proxy.stop() == 0


def _closed(sock: socket.socket) -> bool:
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(1) == b""
    except OSError:
        return True


def test_a_silent_connection_is_timed_out_and_counted() -> None:
    server = MetricsServer(lambda: "", "127.0.0.1", 0, timeout=0.2)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as silent:
            assert silent.recv(1) == b""  # blocks until the server closes it
        assert server.connections["timed_out"] == 1
        assert scrape(server.port)["zbus_metrics_connections_timed_out_total"] == 1
    finally:
        server.stop()


def test_requests_beyond_the_limit_are_refused_and_counted() -> None:
    # Every slot busy answering (render blocks): a new connection is closed unserved.
    release = threading.Event()
    entered = threading.Semaphore(0)

    def render() -> str:
        entered.release()
        release.wait(10)
        return ""

    server = MetricsServer(render, "127.0.0.1", 0, max_connections=2)
    clients: list[threading.Thread] = []
    try:
        for _ in range(2):
            clients.append(threading.Thread(target=scrape, args=(server.port,)))
            clients[-1].start()
        for _ in range(2):
            assert entered.acquire(timeout=5)
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as extra:
            assert extra.recv(1) == b""
        assert server.connections["refused"] == 1
    finally:
        release.set()
        for client in clients:
            client.join(10)
        server.stop()


def test_counters_past_a_million_are_shown_exactly() -> None:
    from zbus.metrics import family

    lines = family("c", "counter", "h", [({}, 1_234_567_891), ({"x": "y"}, True), ({}, 0.25)])
    assert lines[2:] == ["c 1234567891", 'c{x="y"} 1', "c 0.25"]
