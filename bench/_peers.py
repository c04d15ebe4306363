"""Peer workers: pika -> RabbitMQ (topic exchange) and nats-py -> NATS, same shapes.

Fan-out: every consumer has its own queue (RabbitMQ: an exclusive queue bound to the topic
exchange; NATS: a plain subscription). Pool: consumers share one queue (RabbitMQ: a named
queue, NATS: a queue group). Consumers ack nothing (RabbitMQ ``auto_ack``): at-most-once,
like zbus's fast path. The payload is the same bytes zbus carries as its payload; the peers
neither sign nor wrap it.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from ._util import (
    MEASURE,
    WARM,
    Counter,
    StopWhen,
    payload_bytes,
    publish_loop,
    publish_loop_async,
    reachable,
    reporting_failure,
    wait_async,
)

__all__ = ["PEERS", "available", "nats_consumer", "nats_publisher", "rabbit_consumer",
           "rabbit_publisher", "server_pids"]

HOST = "127.0.0.1"  # never anything but loopback
RABBIT_PORT = 5672
NATS_PORT = 4222
EXCHANGE = "zbus-bench"
ROUTING_KEY = "bench.data"
POOL_QUEUE = "zbus-bench-pool"
IDLE = 0.25
perf = time.perf_counter

PEERS = {"rabbitmq": (HOST, RABBIT_PORT), "nats": (HOST, NATS_PORT)}


SERVERS = {"rabbitmq": b"beam.smp", "nats": b"nats-server"}


def server_pids(name: str) -> list[int]:
    """The local server's processes (by command name, from /proc), so its CPU counts in a
    trial's CPU per message as a zbus proxy's does; [] where none is found."""
    wanted = SERVERS[name]
    out = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm", "rb") as f:
                    if f.read().strip() == wanted:
                        out.append(int(entry))
            except OSError:
                continue
    return out


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

    def send_warm(n: int) -> None:
        for _ in range(n):
            send(warm)

    def burst(n: int) -> None:
        for _ in range(n):
            send(body)

    # Unpaced and one message a send, whatever the scenario asks of zbus.
    return publish_loop({**args, "rate": None, "batch": 0}, send_warm, burst)


def _rabbit_count(args: dict[str, Any]) -> dict[str, Any]:
    """pika's publisher tops out near 20k msg/s: a RabbitMQ trial sends ``peer_count``
    messages (fewer than zbus's), so it takes seconds, not a minute; being publisher-bound,
    it has no backlog whose catching up a longer trial would time."""
    return {**args, "count": args.get("peer_count") or args["count"]}


# -- RabbitMQ (pika) --------------------------------------------------------------------


def _rabbit_channel() -> tuple[Any, Any]:
    import pika  # type: ignore[import-untyped,unused-ignore]

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
    with reporting_failure(results, index):
        conn, channel = _rabbit_channel()
        publish = channel.basic_publish
        results.put(("ready", index, None))
        go.wait()
        report = _send_loop(_rabbit_count(args),
                            lambda body: publish(EXCHANGE, ROUTING_KEY, body))
        conn.close()  # flushes what pika still buffers
        results.put(("result", index, report))
        done.set()


def rabbit_consumer(args: dict[str, Any], index: int, results: Any, go: Any,
                    done: Any) -> None:
    with reporting_failure(results, index):
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
        stop = StopWhen(done, args["timeout"])
        while True:
            before = count.total
            conn.process_data_events(time_limit=IDLE)
            if stop(idle=count.total == before):
                break
        results.put(("result", index, count.as_dict()))
        conn.close()


# -- NATS (nats-py) ---------------------------------------------------------------------


def nats_publisher(args: dict[str, Any], index: int, results: Any, go: Any,
                   done: Any) -> None:
    async def main() -> dict[str, Any]:
        import nats

        nc = await nats.connect(f"nats://{HOST}:{NATS_PORT}")
        results.put(("ready", index, None))
        await wait_async(go)
        warm = payload_bytes(args["size"], WARM)
        body = payload_bytes(args["size"], MEASURE)
        publish = nc.publish

        async def send_warm(n: int) -> None:
            for _ in range(n):
                await publish(ROUTING_KEY, warm)

        async def burst(n: int) -> None:
            for _ in range(n):
                await publish(ROUTING_KEY, body)
            await asyncio.sleep(0)  # let the client's flusher task write

        report = await publish_loop_async(args, send_warm, burst, nc.flush)
        await nc.close()
        return report

    with reporting_failure(results, index):
        results.put(("result", index, asyncio.run(main())))
        done.set()


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
        stop = StopWhen(done, args["timeout"])
        while True:
            before = count.total
            await asyncio.sleep(IDLE)
            if stop(idle=count.total == before):
                break
        await nc.close()
        report = count.as_dict()
        report["errors"] = sorted(set(errors))
        return report

    with reporting_failure(results, index):
        results.put(("result", index, asyncio.run(main())))
