"""Repair on and off in one run (issue 15): what keeping and asking costs without faults,
and how long a repair takes when a subscriber loses messages.

    python -m bench.repair                 # ~1 minute on 2 cores
    python -m bench.repair --messages 100000 --rounds 1   # quicker

Every variant runs a zbus-proxy, one publisher and one subscriber, each in its own process
(spawn), on a fresh run directory; the rounds interleave the variants so a busy machine slows
them alike, and the table shows medians.

* throughput: ``--messages`` 100-byte messages sent as fast as the publisher can, timed from
  the first send to the last receive (catching up counts); publisher CPU per message from
  its own process times;
* latency: one-way, 5,000 messages a second for 2 s, p50 and p99 (the clocks are one host's);
* repair: the subscriber reads nothing while 20,000 messages overflow its queue at the proxy
  (``subscriber_hwm`` 200), then reads: delivered must equal sent; the table shows what was
  repaired and the time from each gap found to its message arriving (p50, p99).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

KEY = b"r" * 32
_STAMP = struct.Struct("!dI")


def _proxy(run_dir: str, hwm: int, ready: Any, stop: Any) -> None:
    from zbus_proxy import Proxy

    import zbus

    with Proxy(run_dir, settings=zbus.Settings(subscriber_hwm=hwm)):
        ready.set()
        stop.wait(600)


def _settings(repair: bool, hwm: int = 100_000) -> Any:
    import zbus

    policy = zbus.RepairPolicy() if repair else zbus.RepairPolicy(interval=0)
    return zbus.Settings(repair=policy, subscriber_hwm=hwm)


def _subscriber(run_dir: str, repair: bool, hwm: int, count: int, hold: float,
                ready: Any, out: Any) -> None:
    import zbus

    got = [0]
    last = [0.0]
    latencies: list[float] = []

    def handle(delivery: zbus.Delivery) -> None:
        got[0] += 1
        last[0] = time.time()
        if len(latencies) < 20_000:
            latencies.append(last[0] - _STAMP.unpack_from(delivery.payload)[0])

    with zbus.Connection(run_dir, settings=_settings(repair, hwm)) as conn:
        dispatcher = zbus.Dispatcher()
        dispatcher.bind("bench", "#", handle)
        sub = conn.subscribe(dispatcher, KEY)
        sub.ready()
        ready.set()
        if hold:
            time.sleep(hold)  # the scenario: a subscriber that does not read meanwhile
        deadline = time.monotonic() + 120
        while got[0] < count and time.monotonic() < deadline:
            sub.process(0.2)
        book = sub.core.book
        out.put({"got": got[0], "last": last[0], "latencies": latencies,
                 "stats": sub.stats.as_dict(),
                 "repair_latencies": list(book.latencies) if book is not None else []})
        sub.close()


def _publisher(run_dir: str, repair: bool, count: int, rate: float, go: Any,
               out: Any, done: Any) -> None:
    import zbus

    with zbus.Connection(run_dir, settings=_settings(repair)) as conn:
        pub = zbus.Publisher(conn.exchange("bench"), zbus.MessageFactory(KEY, "bench"))
        pad = b"x" * (100 - _STAMP.size)
        go.wait()
        cpu0, start = os.times(), time.time()
        for i in range(count):
            if rate:
                ahead = start + i / rate - time.time()
                if ahead > 0:
                    time.sleep(ahead)
            pub.send("m.r", _STAMP.pack(time.time(), i) + pad)
        cpu1 = os.times()
        out.put({"first": start, "cpu": (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)})
        conn.flush(30)
        done.wait(300)  # keeps what it sent until the subscriber has had everything


def trial(repair: bool, count: int, rate: float = 0, hwm: int = 100_000,
          hold: float = 0) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="zbr-") as tmp:
        run_dir = str(Path(tmp) / "run")
        proxy_ready, stop = ctx.Event(), ctx.Event()
        proxy = ctx.Process(target=_proxy, args=(run_dir, hwm, proxy_ready, stop))
        proxy.start()
        proxy_ready.wait(30)
        sub_ready, go, done = ctx.Event(), ctx.Event(), ctx.Event()
        sub_out, pub_out = ctx.Queue(), ctx.Queue()
        sub = ctx.Process(target=_subscriber,
                          args=(run_dir, repair, hwm, count, hold, sub_ready, sub_out))
        pub = ctx.Process(target=_publisher,
                          args=(run_dir, repair, count, rate, go, pub_out, done))
        sub.start()
        pub.start()
        sub_ready.wait(30)
        go.set()
        p, s = pub_out.get(timeout=300), sub_out.get(timeout=300)
        done.set()
        for proc in (pub, sub):
            proc.join(30)
        stop.set()
        proxy.join(30)
        for proc in (pub, sub, proxy):
            if proc.is_alive():
                proc.kill()
        return {"sent": count, "got": s["got"], "seconds": s["last"] - p["first"],
                "pub_cpu_us": p["cpu"] / count * 1e6, "latencies": s["latencies"],
                "stats": s["stats"], "repair_latencies": s["repair_latencies"]}


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.repair", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=300_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    rows: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
    lat: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
    for _ in range(args.rounds):
        for name in ("on", "off"):
            rows[name].append(trial(name == "on", args.messages))
            lat[name].append(trial(name == "on", 10_000, rate=5000))
    print(f"fan-out, 1 subscriber, {args.messages:,} x 100 B, median of {args.rounds}:")
    print(f"{'repair':8}{'msg/s':>10}{'pub CPU µs/msg':>16}{'p50 µs @5k':>12}"
          f"{'p99 µs @5k':>12}{'lost':>6}")
    rates = {}
    for name in ("on", "off"):
        rate = statistics.median(r["got"] / r["seconds"] for r in rows[name])
        rates[name] = rate
        cpu = statistics.median(r["pub_cpu_us"] for r in rows[name])
        p50 = statistics.median(_pct(r["latencies"], 50) for r in lat[name]) * 1e6
        p99 = statistics.median(_pct(r["latencies"], 99) for r in lat[name]) * 1e6
        lost = sum(r["sent"] - r["got"] for r in rows[name] + lat[name])
        print(f"{name:8}{rate:>10,.0f}{cpu:>16.2f}{p50:>12.0f}{p99:>12.0f}{lost:>6}")
    print(f"repair on / off throughput: {rates['on'] / rates['off']:.2f}")
    fault = trial(True, 20_000, hwm=200, hold=1.0)
    stats, rl = fault["stats"], fault["repair_latencies"]
    print(f"\na subscriber that stalls 1 s while 20,000 messages overflow its queue (hwm 200), "
          f"repair on: delivered {fault['got']:,} of {fault['sent']:,}, repaired "
          f"{stats['repaired']:,}, unrepairable {stats['unrepairable']}, gap found -> "
          f"repaired p50 {_pct(rl, 50) * 1e3:.1f} ms, p99 {_pct(rl, 99) * 1e3:.1f} ms")
    return 0 if fault["got"] == fault["sent"] else 1


if __name__ == "__main__":
    sys.exit(main())
