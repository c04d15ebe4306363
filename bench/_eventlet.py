"""eventlet workers: ``zbus.eventlet`` (green sockets) publisher and subscriber.

They mirror the threads workers in ``_zmq.py`` line for line, on ``zbus.eventlet.Connection``:
the publisher sends from the main green thread, the subscriber receives there and its
handlers run in the backend's bounded pool of handler green threads (the default size).
No ``monkey_patch()``: the backend is cooperative without it, and nothing else here needs it.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import zbus
import zbus.eventlet

from ._util import (
    MEASURE,
    WARM,
    Counter,
    StopWhen,
    payload_bytes,
    publish_loop,
    reporting_failure,
)
from ._zmq import EXCHANGE, IDLE, ROUTING_KEY

__all__ = ["zbus_green_consumer", "zbus_green_publisher"]

# eventlet warns on import that it is deprecated upstream (issue 8 says why zbus serves it).
warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")

perf = time.perf_counter


def zbus_green_publisher(args: dict[str, Any], index: int, results: Any, go: Any,
                         done: Any) -> None:
    with reporting_failure(results, index):
        conn = zbus.eventlet.Connection(args["run_dir"])
        factory = zbus.MessageFactory(args["key"], "bench-publisher")
        pub = zbus.eventlet.Publisher(conn.exchange(EXCHANGE), factory)
        warm = payload_bytes(args["size"], WARM)
        body = payload_bytes(args["size"], MEASURE)
        send = pub.send

        def send_warm(n: int) -> None:
            for _ in range(n):
                send(ROUTING_KEY, warm)

        def burst(n: int) -> None:
            for _ in range(n):
                send(ROUTING_KEY, body)

        results.put(("ready", index, None))
        go.wait()  # nothing else runs in this hub yet: a blocking wait starves nobody
        report = publish_loop(args, send_warm, burst)
        results.put(("result", index, report))
        done.set()
        conn.close()


def zbus_green_consumer(args: dict[str, Any], index: int, results: Any, go: Any,
                        done: Any) -> None:
    with reporting_failure(results, index):
        conn = zbus.eventlet.Connection(args["run_dir"])
        count = Counter()

        def handler(delivery: zbus.Delivery) -> None:
            count.hit(delivery.payload[0], perf())

        dispatcher = zbus.Dispatcher()
        dispatcher.bind(EXCHANGE, ROUTING_KEY, handler)
        sub = conn.subscribe(dispatcher, args["key"])
        sub.ready()
        results.put(("ready", index, None))
        process = sub.process
        stop = StopWhen(done, args["timeout"])
        while True:
            if process(IDLE):
                continue
            if stop():
                break
        sub.wait_handlers()
        report = count.as_dict()
        report["zbus_lost"] = sub.stats.lost
        results.put(("result", index, report))
        sub.close()
        conn.close()
