"""Child processes for tests/test_backends.py (run as ``python tests/backend_agent.py ROLE``).

* ``subscribe`` — a threads-backend subscriber: prints ``READY`` once ``ready()`` returned,
  then receives until ``--expect`` deliveries or ``--timeout`` and prints one JSON line:
  ``{"count", "publishers", "in_order", "stats"}``.
* ``green-selftest`` — the eventlet backend end to end in one process, with
  ``--monkey-patch`` calling ``eventlet.monkey_patch()`` before anything imports zbus. A
  ticker green thread counts 10 ms sleeps; each wait below must let it run (the hub is never
  blocked). Prints one JSON line of counts for the test to judge.

Every socket is closed before exit; a wait never lasts longer than its timeout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

AGENT = Path(__file__).resolve()


def subscribe(args: argparse.Namespace) -> dict[str, Any]:
    import zbus

    last: dict[str, int] = {}
    in_order = True

    def seen(delivery: zbus.Delivery) -> None:
        nonlocal in_order
        in_order &= delivery.sequence > last.get(delivery.publisher_id, 0)
        last[delivery.publisher_id] = delivery.sequence

    dispatcher = zbus.Dispatcher()
    dispatcher.bind(args.exchange, "#", seen)
    key = bytes.fromhex(args.key)
    with zbus.Connection(args.run_dir) as conn, conn.subscribe(dispatcher, key) as sub:
        sub.ready(timeout=10)
        print("READY", flush=True)
        count = sub.run(max_messages=args.expect, idle_timeout=args.timeout)
        return {"count": count, "publishers": len(last), "in_order": in_order,
                "stats": sub.stats.as_dict()}


def green_selftest(args: argparse.Namespace) -> dict[str, Any]:
    import eventlet

    import zbus
    import zbus.eventlet

    key = bytes.fromhex(args.key)
    ticks = [0]

    def ticker() -> None:
        while True:
            eventlet.sleep(0.01)
            ticks[0] += 1

    def ticks_during(fn: Any, *a: Any, **kw: Any) -> tuple[Any, int]:
        before = ticks[0]
        return fn(*a, **kw), ticks[0] - before

    out: dict[str, Any] = {"monkey_patched": eventlet.patcher.is_monkey_patched("thread")}
    tick_thread = eventlet.spawn(ticker)
    got: dict[str, list[int]] = {"sub": [], "pool": []}
    fan, pool = zbus.Dispatcher(), zbus.Dispatcher()
    fan.bind("green", "#", lambda d: got["sub"].append(d.payload))
    pool.bind("green", "#", lambda d: got["pool"].append(d.payload))
    conn = zbus.eventlet.Connection(args.run_dir)
    sub = conn.subscribe(fan, key)
    member = conn.join_pool("greenpool", pool, key)
    try:
        _, out["ticks_ready"] = ticks_during(sub.ready, 10)
        _, out["ticks_pool_ready"] = ticks_during(member.ready, 10)
        none, out["ticks_idle_receive"] = ticks_during(sub.receive, 0.3)
        out["idle_receive"] = none

        def publish() -> None:
            with zbus.eventlet.Connection(args.run_dir) as pub_conn:
                publisher = zbus.Publisher(pub_conn.exchange("green"),
                                           zbus.MessageFactory(key, "green-pub"))
                for i in range(args.count):
                    publisher.send("x.y", i)
                    if i % 50 == 0:
                        eventlet.sleep(0)

        consumers = [eventlet.spawn(c.run, max_messages=args.count, idle_timeout=10)
                     for c in (sub, member)]
        publisher = eventlet.spawn(publish)
        publisher.wait()
        out["handled"] = [c.wait() for c in consumers]
        out["in_order"] = {name: seq == list(range(args.count)) for name, seq in got.items()}
        _, out["ticks_stats"] = ticks_during(conn.proxy_stats)
    finally:
        sub.close()
        member.close()
        conn.close()
        tick_thread.kill()
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["subscribe", "green-selftest"])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--exchange", default="green")
    parser.add_argument("--expect", type=int, default=0)
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--timeout", type=float, default=20.0)
    parser.add_argument("--monkey-patch", action="store_true")
    args = parser.parse_args()
    if args.monkey_patch:
        import eventlet

        eventlet.monkey_patch()
    result = subscribe(args) if args.role == "subscribe" else green_selftest(args)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
