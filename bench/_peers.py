"""Peer workers: pika -> RabbitMQ (topic exchange) and nats-py -> NATS, same shapes.

Fan-out: every consumer has its own queue (RabbitMQ: an exclusive queue bound to the topic
exchange; NATS: a plain subscription). Pool: consumers share one queue (RabbitMQ: a named
queue, NATS: a queue group). Consumers ack nothing (RabbitMQ ``auto_ack``): at-most-once,
like zbus's fast path. The payload is the same bytes zbus carries as its payload; the peers
neither sign nor wrap it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ._util import MEASURE, WARM, Counter, payload_bytes, reachable, report_failure

__all__ = ["PEERS", "available", "nats_consumer", "nats_publisher", "rabbit_consumer",
           "rabbit_publisher"]

HOST = "127.0.0.1"  # never anything but loopback
RABBIT_PORT = 5672
NATS_PORT = 4222
EXCHANGE = "zbus-bench"
ROUTING_KEY = "bench.data"
POOL_QUEUE = "zbus-bench-pool"
IDLE = 0.25
perf = time.perf_counter

PEERS = {"rabbitmq": (HOST, RABBIT_PORT), "nats": (HOST, NATS_PORT)}


def available() -> dict[str, str | None]:
    """Each peer's name -> None when usable, else why it is skipped."""
    out: dict[str, str | None] = {}
    for name, (host, port) in PEERS.items():
        module = "pika" if name == "rabbitmq" else "nats"
        try:
            __import__(module)
        except ImportError:
            out[name] = f"python package {module!r} is not installed (pip install " \
                        f"{'pika' if module == 'pika' else 'nats-py'})"
            continue
        out[name] = None if reachable(host, port) else f"no server on {host}:{port}"
    return out


def _send_loop(args: dict[str, Any], send: Any) -> dict[str, Any]:
    warm = payload_bytes(args["size"], WARM)
    body = payload_bytes(args["size"], MEASURE)
    for _ in range(args["warm"]):
        send(warm)
    sent = 0
    t0 = perf()
    end = t0 + args["duration"]
    while perf() < end:
        for _ in range(100):
            send(body)
        sent += 100
    return {"sent": args["warm"] + sent, "measured_sent": sent,
            "send_rate": sent / (perf() - t0)}


# -- RabbitMQ (pika) --------------------------------------------------------------------


def _rabbit_channel() -> tuple[Any, Any]:
    import pika

    params = pika.ConnectionParameters(
        HOST, RABBIT_PORT, credentials=pika.PlainCredentials("guest", "guest"),
        heartbeat=0,
    )
    conn = pika.BlockingConnection(params)
    channel = conn.channel()
    channel.exchange_declare(EXCHANGE, "topic", auto_delete=False)
    return conn, channel


def rabbit_publisher(args: dict[str, Any], index: int, results: Any, go: Any,
                     done: Any) -> None:
    try:
        conn, channel = _rabbit_channel()
        publish = channel.basic_publish
        results.put(("ready", index, None))
        go.wait()
        report = _send_loop(args, lambda body: publish(EXCHANGE, ROUTING_KEY, body))
        conn.close()  # flushes what pika still buffers
        results.put(("result", index, report))
        done.set()
    except BaseException as exc:
        report_failure(results, index, exc)
        raise


def rabbit_consumer(args: dict[str, Any], index: int, results: Any, go: Any,
                    done: Any) -> None:
    try:
        conn, channel = _rabbit_channel()
        if args.get("pool"):
            queue = channel.queue_declare(POOL_QUEUE, auto_delete=True).method.queue
            if index == 0:
                channel.queue_purge(queue)
        else:
            queue = channel.queue_declare("", exclusive=True).method.queue
        channel.queue_bind(queue, EXCHANGE, ROUTING_KEY)
        count = Counter()

        def on_message(ch: Any, method: Any, props: Any, body: bytes) -> None:
            count.hit(body[0], perf())

        channel.basic_consume(queue, on_message, auto_ack=True)
        results.put(("ready", index, None))
        stop_at = time.monotonic() + args["timeout"]
        while True:
            before = count.warm + count.measured
            conn.process_data_events(time_limit=IDLE)
            idle = count.warm + count.measured == before
            if (idle and done.is_set()) or time.monotonic() > stop_at:
                break
        results.put(("result", index, count.as_dict()))
        conn.close()
    except BaseException as exc:
        report_failure(results, index, exc)
        raise


# -- NATS (nats-py) ---------------------------------------------------------------------


def nats_publisher(args: dict[str, Any], index: int, results: Any, go: Any,
                   done: Any) -> None:
    async def main() -> dict[str, Any]:
        import nats

        nc = await nats.connect(f"nats://{HOST}:{NATS_PORT}")
        results.put(("ready", index, None))
        while not go.is_set():
            await asyncio.sleep(0.005)
        warm = payload_bytes(args["size"], WARM)
        body = payload_bytes(args["size"], MEASURE)
        publish = nc.publish
        for _ in range(args["warm"]):
            await publish(ROUTING_KEY, warm)
        sent = 0
        t0 = perf()
        end = t0 + args["duration"]
        while perf() < end:
            for _ in range(100):
                await publish(ROUTING_KEY, body)
            sent += 100
            await asyncio.sleep(0)  # let the client's flusher task write
        await nc.flush()
        elapsed = perf() - t0
        await nc.close()
        return {"sent": args["warm"] + sent, "measured_sent": sent,
                "send_rate": sent / elapsed}

    try:
        report = asyncio.run(main())
        results.put(("result", index, report))
        done.set()
    except BaseException as exc:
        report_failure(results, index, exc)
        raise


def nats_consumer(args: dict[str, Any], index: int, results: Any, go: Any,
                  done: Any) -> None:
    async def main() -> dict[str, Any]:
        import nats

        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(type(exc).__name__)

        nc = await nats.connect(f"nats://{HOST}:{NATS_PORT}", error_cb=on_error)
        count = Counter()

        async def on_message(msg: Any) -> None:
            count.hit(msg.data[0], perf())

        await nc.subscribe(ROUTING_KEY, queue="zbus-bench" if args.get("pool") else "",
                           cb=on_message)
        await nc.flush()  # the server has the subscription
        results.put(("ready", index, None))
        stop_at = time.monotonic() + args["timeout"]
        while True:
            before = count.warm + count.measured
            await asyncio.sleep(IDLE)
            idle = count.warm + count.measured == before
            if (idle and done.is_set()) or time.monotonic() > stop_at:
                break
        await nc.close()
        report = count.as_dict()
        report["errors"] = sorted(set(errors))
        return report

    try:
        results.put(("result", index, asyncio.run(main())))
    except BaseException as exc:
        report_failure(results, index, exc)
        raise
