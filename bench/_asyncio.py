"""asyncio workers: zbus.asyncio against raw ``zmq.asyncio``, same frames, same proxy.

The fan-out shape only (one subscriber): it measures what the backend adds over the threads
one, both ways against a raw baseline on the same event-loop machinery.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any, cast

import zmq
import zmq.asyncio

import zbus
import zbus.asyncio
from zbus._names import CONTROL_PREFIX
from zbus._transport import make_socket

from ._util import (
    MEASURE,
    WARM,
    Counter,
    StopWhen,
    payload_bytes,
    publish_loop_async,
    reporting_failure,
    wait_async,
)
from ._zmq import EXCHANGE, IDLE, ROUTING_KEY

__all__ = ["raw_async_consumer", "raw_async_publisher", "zbus_async_consumer",
           "zbus_async_publisher"]

perf = time.perf_counter


def zbus_async_publisher(args: dict[str, Any], index: int, results: Any, go: Any,
                         done: Any) -> None:
    async def main() -> dict[str, Any]:
        ctx: zmq.Context[Any] = zmq.Context()
        conn = zbus.asyncio.Connection(args["run_dir"], context=ctx)
        pub = zbus.asyncio.Publisher(conn.exchange(EXCHANGE),
                                     zbus.MessageFactory(args["key"], "bench-publisher"))
        warm = payload_bytes(args["size"], WARM)
        body = payload_bytes(args["size"], MEASURE)
        send = pub.send

        async def send_warm(n: int) -> None:
            for _ in range(n):
                await send(ROUTING_KEY, warm)

        async def burst(n: int) -> None:
            for _ in range(n):
                await send(ROUTING_KEY, body)

        results.put(("ready", index, None))
        await wait_async(go)
        report = await publish_loop_async(args, send_warm, burst)
        conn.close()
        ctx.term()  # flushes the queue: asyncio Connection.close() alone drops its tail
        return report

    with reporting_failure(results, index):
        results.put(("result", index, asyncio.run(main())))
        done.set()


def zbus_async_consumer(args: dict[str, Any], index: int, results: Any, go: Any,
                        done: Any) -> None:
    async def main() -> dict[str, Any]:
        conn = zbus.asyncio.Connection(args["run_dir"])
        count = Counter()

        def handler(delivery: zbus.Delivery) -> None:
            count.hit(delivery.payload[0], perf())

        dispatcher = zbus.Dispatcher()
        dispatcher.bind(EXCHANGE, ROUTING_KEY, handler)
        sub = conn.subscribe(dispatcher, args["key"])
        await sub.ready()
        results.put(("ready", index, None))
        process = sub.process
        stop = StopWhen(done, args["timeout"])
        while True:
            if await process(IDLE):
                continue
            if stop():
                break
        report = count.as_dict()
        report["zbus_lost"] = sub.stats.lost
        sub.close()
        conn.close()
        return report

    with reporting_failure(results, index):
        results.put(("result", index, asyncio.run(main())))


def raw_async_publisher(args: dict[str, Any], index: int, results: Any, go: Any,
                        done: Any) -> None:
    async def main() -> dict[str, Any]:
        settings = zbus.Settings()
        base: zmq.Context[Any] = zmq.Context()
        ctx = zmq.asyncio.Context(base)
        sock = cast(zmq.asyncio.Socket, make_socket(
            ctx, zmq.PUSH, settings, sndhwm=settings.publish_hwm,
            connect=zbus.Endpoints(Path(args["run_dir"])).ingress))
        topic = f"{EXCHANGE}/{ROUTING_KEY}".encode()
        size, body_len = args["size"], args["body_bytes"]
        fill = b"x" * (body_len - size)
        sig = b"s" * args["sig_bytes"]
        warm = [topic, fill + payload_bytes(size, WARM), sig]
        frames = [topic, fill + payload_bytes(size, MEASURE), sig]
        send = sock.send_multipart

        async def send_warm(n: int) -> None:
            for _ in range(n):
                await send(warm)

        async def burst(n: int) -> None:
            for _ in range(n):
                await send(frames)

        results.put(("ready", index, None))
        await wait_async(go)
        report = await publish_loop_async(args, send_warm, burst)
        sock.close(linger=10_000)
        base.term()
        return report

    with reporting_failure(results, index):
        results.put(("result", index, asyncio.run(main())))
        done.set()


def raw_async_consumer(args: dict[str, Any], index: int, results: Any, go: Any,
                       done: Any) -> None:
    async def main() -> dict[str, Any]:
        settings = zbus.Settings()
        endpoints = zbus.Endpoints(Path(args["run_dir"]))
        ctx = zmq.asyncio.Context()
        sock = cast(zmq.asyncio.Socket, make_socket(
            ctx, zmq.SUB, settings, rcvhwm=settings.subscriber_hwm, connect=endpoints.deliver))
        sock.subscribe(f"{EXCHANGE}/{ROUTING_KEY}".encode())
        token = CONTROL_PREFIX + b"probe/" + os.urandom(8).hex().encode()
        sock.subscribe(token)
        push: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.PUSH)
        push.connect(endpoints.ingress)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the subscription is live once a probe is back
            push.send(token)
            if await sock.poll(20) and (await sock.recv_multipart())[0] == token:
                break
        push.close(linger=0)
        sock.unsubscribe(token)
        results.put(("ready", index, None))
        count = Counter()
        at = -args["size"]
        recv = sock.recv_multipart
        stop = StopWhen(done, args["timeout"])
        while True:
            try:
                frames = await recv(zmq.NOBLOCK)
            except zmq.Again:
                if not await sock.poll(int(IDLE * 1000)) and stop():
                    break
                continue
            if frames[0] == token or len(frames[1]) < -at:  # a probe, or a repeated beacon
                continue
            count.hit(frames[1][at], perf())
        sock.close(linger=0)
        return count.as_dict()

    with reporting_failure(results, index):
        results.put(("result", index, asyncio.run(main())))
