"""The library-side metrics hook: an application exports its consumers' counters."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from zbus_proxy import Proxy

import zbus
from zbus.metrics import MetricsServer, render_consumers


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
    assert got['zbus_consumer_lost_total{consumer="billing"}'] == 0


def test_label_values_are_escaped() -> None:
    stats = zbus.ConsumerStats(received=1)
    text = render_consumers({'we"ird\\name\n': stats})
    assert 'zbus_consumer_received_total{consumer="we\\"ird\\\\name\\n"} 1' in text
