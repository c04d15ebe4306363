"""eventlet workers: ``zbus.eventlet`` (green sockets) publisher and subscriber, and a raw
``eventlet.green.zmq`` publisher.

They are the threads workers of ``_zmq.py`` run on ``zbus.eventlet.Connection`` (the same
API): the publisher sends from the main green thread, the subscriber receives there and its
handlers run in the backend's bounded pool of handler green threads (the default size).
No ``monkey_patch()``: the backend is cooperative without it, and nothing else here needs it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import zmq

import zbus

from ._util import MEASURE, WARM, payload_bytes, publish_loop, reporting_failure
from ._zmq import EXCHANGE, ROUTING_KEY, zbus_consumer, zbus_publisher

__all__ = ["raw_green_publisher", "zbus_green_consumer", "zbus_green_publisher"]

# eventlet warns on import that it is deprecated upstream (issue 8 says why zbus serves it).
warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")


def zbus_green_publisher(args: dict[str, Any], index: int, results: Any, go: Any,
                         done: Any) -> None:
    zbus_publisher({**args, "backend": "eventlet"}, index, results, go, done)


def zbus_green_consumer(args: dict[str, Any], index: int, results: Any, go: Any,
                        done: Any) -> None:
    zbus_consumer({**args, "backend": "eventlet"}, index, results, go, done)


def raw_green_publisher(args: dict[str, Any], index: int, results: Any, go: Any,
                        done: Any) -> None:
    """What a user would write on eventlet: ``eventlet.green.zmq``, a PUSH into the proxy's
    ingress with ``send_multipart``, the same three frames zbus sends (as ``raw``)."""
    from eventlet.green import zmq as gzmq  # type: ignore[import-untyped,unused-ignore]

    with reporting_failure(results, index):
        ctx = gzmq.Context()
        settings = zbus.Settings()
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, settings.publish_hwm)
        sock.connect(zbus.Endpoints(Path(args["run_dir"])).ingress)
        topic = f"{EXCHANGE}/{args.get('routing_key', ROUTING_KEY)}".encode()
        size, sig = args["size"], b"s" * args["sig_bytes"]
        fill = b"x" * (args["body_bytes"] - size)
        warm = [topic, fill + payload_bytes(size, WARM), sig]
        frames = [topic, fill + payload_bytes(size, MEASURE), sig]
        send = sock.send_multipart

        def send_warm(n: int) -> None:
            for _ in range(n):
                send(warm)

        def burst(n: int) -> None:
            for _ in range(n):
                send(frames)

        results.put(("ready", index, None))
        go.wait()
        report = publish_loop(args, send_warm, burst)
        sock.close(linger=10_000)
        ctx.term()
        results.put(("result", index, report))
        done.set()
