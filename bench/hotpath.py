"""``python -m bench.hotpath``: where the time goes per message, stage by stage, in-process.

CPU microseconds per message of each stage of zbus's publish and consume paths next to the
raw pyzmq calls they wrap, measured over real ipc sockets (no proxy: a drain process plays
the proxy's ingress; an in-process PUB plays its deliver socket). Then routing at 100 and at
100,000 distinct routing keys, and their ratio (``--routing`` runs only that part).
"""

from __future__ import annotations

import argparse
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

import zbus
from zbus._dispatch import ConsumerCore
from zbus._envelope import (
    decode_envelope,
    decode_topic,
    mac,
    verify_frames,
)
from zbus._names import split_topic, topic_frame

EXCHANGE, KEY = "bench", "bench.data"
_U32 = struct.Struct(">I")
SNDMORE = int(zmq.SNDMORE)  # an int: pyzmq's enum Flag.__or__ costs ~1 us per frame
_DRAIN = """
import sys, zmq
s = zmq.Context().socket(zmq.PULL); s.rcvhwm = 0; s.bind(sys.argv[1])
print("ok", flush=True)
while True:
    s.recv_multipart()
"""


def timed(fn: Callable[[int], float | None], n: int, repeat: int) -> float:
    """Best of ``repeat`` runs, in microseconds per message (fn may return its own time)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        own = fn(n)
        best = min(best, own if own is not None else time.perf_counter() - t0)
    return best / n * 1e6


# A consumer's bindings as a notification listener makes them; keys vary in their id word,
# the way instance ids and host names make real routing keys distinct.
ROUTE_BINDINGS = ["compute.#", "compute.instance.*.end", "network.#", "volume.*.create",
                  "#.error", "identity.project.deleted"]
_KEY_FORMS = ["compute.instance.{}.end", "network.port.{}.create", "volume.{}.create",
              "image.{}.upload", "compute.instance.{}.error"]


def routing(repeat: int) -> list[tuple[str, float]]:
    """Dispatcher.route, and split_topic + route, at 100 and at 100,000 distinct keys.

    Issue 13, item 7: per-key caches made routing cost ~25x more past 4,096 distinct keys.
    Each measurement routes 100,000 messages, so every key of the large set is new to it.
    """
    dispatcher = zbus.Dispatcher()
    for pattern in ROUTE_BINDINGS:
        dispatcher.bind("notifications", pattern, lambda d: None)
    route = dispatcher.route
    messages = 100_000
    out: list[tuple[str, float]] = []
    print(f"routing, {len(ROUTE_BINDINGS)} bindings, {messages:,} messages "
          "(us of CPU per message)")
    for what in ("route", "split_topic + route"):
        base = 0.0
        for distinct in (100, 100_000):
            keys = [_KEY_FORMS[i % len(_KEY_FORMS)].format(f"i{i % distinct}")
                    for i in range(messages)]
            # a fresh bytes object per message, as a socket hands them out
            frames = [topic_frame("notifications", k) for k in keys]

            def route_only(k: int, keys: list[str] = keys) -> None:
                for key in keys[:k]:
                    route("notifications", key)

            def split_and_route(k: int, frames: list[bytes] = frames) -> None:
                for frame in frames[:k]:
                    exchange, key = split_topic(frame)
                    route(exchange, key)

            fn = route_only if what == "route" else split_and_route
            fn(messages)  # warm: lazily built matcher states, page faults
            us = timed(fn, messages, repeat)
            label = f"{what}, {distinct:,} distinct keys"
            ratio = f"  ({us / base:.2f}x the 100-key cost)" if base else ""
            print(f"  {label:62s} {us:6.2f} us{ratio}", flush=True)
            out.append((label, us))
            base = base or us
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hotpath", description=__doc__)
    p.add_argument("-n", type=int, default=30_000, help="messages per measurement")
    p.add_argument("--repeat", type=int, default=5, help="best of this many runs")
    p.add_argument("--size", type=int, default=100, help="payload bytes")
    p.add_argument("--routing", action="store_true",
                   help="only the routing rows (100 vs 100,000 distinct keys; no sockets)")
    args = p.parse_args(argv)
    n, rep = args.n, args.repeat
    if args.routing:
        routing(rep)
        return 0
    key = zbus.generate_key()
    body = b"M" + b"x" * (args.size - 1)
    run_dir = Path(tempfile.mkdtemp(prefix="zbh-", dir="/tmp"))
    endpoints = zbus.Endpoints(run_dir)
    drain = subprocess.Popen([sys.executable, "-c", _DRAIN, endpoints.ingress],
                             stdout=subprocess.PIPE, text=True)
    rows: list[tuple[str, str, float]] = []

    def row(side: str, label: str, fn: Callable[[int], float | None]) -> None:
        rows.append((side, label, timed(fn, n, rep)))
        print(f"  {label:62s} {rows[-1][2]:6.2f} us", flush=True)

    try:
        assert drain.stdout is not None and drain.stdout.readline().strip() == "ok"
        ctx: zmq.Context[Any] = zmq.Context.instance()
        push = ctx.socket(zmq.PUSH)
        push.sndhwm = 0
        push.connect(endpoints.ingress)
        factory = zbus.MessageFactory(key, "bench-publisher")
        sample = factory.frames(EXCHANGE, KEY, body)
        raw = [sample[0], b"x" * len(sample[1]), b"s" * len(sample[2])]
        # linger=0: no proxy here, so close() must not wait for a flush probe to come back
        conn = zbus.Connection(run_dir, settings=zbus.Settings(publish_hwm=1_000_000,
                                                               linger=0))
        pub = zbus.Publisher(conn.exchange(EXCHANGE), factory)

        print(f"publish side, {args.size} B payload (us of CPU per message)")

        def raw_multipart(k: int) -> None:
            for _ in range(k):
                push.send_multipart(raw)

        def raw_three(k: int) -> None:
            send = push.send
            for _ in range(k):
                send(raw[0], SNDMORE)
                send(raw[1], SNDMORE)
                send(raw[2])

        def frames_now(k: int) -> None:
            for _ in range(k):
                factory.frames(EXCHANGE, KEY, body)

        def mac_now(k: int) -> None:
            for _ in range(k):
                mac(key, sample[0], sample[1])

        def publisher_send(k: int) -> None:
            for _ in range(k):
                pub.send(KEY, body)

        batch = [body] * 100

        def publisher_send_many(k: int) -> None:
            for _ in range(k // 100):
                pub.send_many(KEY, batch)

        row("pub", "raw pyzmq: send_multipart(3 frames)", raw_multipart)
        row("pub", "raw pyzmq: 3 x send(frame, int SNDMORE)", raw_three)
        row("pub", "zbus: MessageFactory.frames (envelope + HMAC)", frames_now)
        row("pub", "  of which mac() (HMAC-SHA256, precomputed pads)", mac_now)
        row("pub", "zbus: Publisher.send in a tight loop (smart batching)", publisher_send)
        row("pub", "zbus: Publisher.send_many, batches of 100", publisher_send_many)
        conn.close()

        print(f"consume side, {args.size} B payload (us of CPU per message)")
        pubsock = ctx.socket(zmq.PUB)
        pubsock.sndhwm = 0
        pubsock.bind(endpoints.deliver)
        dispatcher = zbus.Dispatcher()
        dispatcher.bind(EXCHANGE, KEY, lambda d: None)
        sub_conn = zbus.Connection(run_dir, settings=zbus.Settings(subscriber_hwm=1_000_000,
                                                                   linger=0))
        signed = [factory.frames(EXCHANGE, KEY, body) for _ in range(n)]

        def fill() -> None:
            # fresh messages each time: a subscriber's replay guard rejects repeats
            for _ in range(n):
                pubsock.send_multipart(factory.frames(EXCHANGE, KEY, body))
            time.sleep(0.3 + n / 200_000)  # the io thread moves them into the SUB's queue

        sub = sub_conn.subscribe(dispatcher, key)
        raw_sub = ctx.socket(zmq.SUB)
        raw_sub.rcvhwm = 0
        raw_sub.connect(endpoints.deliver)
        raw_sub.subscribe(b"")
        time.sleep(0.3)  # subscriptions reach the PUB (no proxy here to probe through)

        def raw_recv(k: int) -> float:
            sub.close()  # only the raw SUB listens during this row
            fill()
            t0 = time.perf_counter()
            for _ in range(k):
                raw_sub.recv_multipart()
            return time.perf_counter() - t0

        row("con", "raw pyzmq: recv_multipart", raw_recv)
        raw_sub.close(linger=0)
        sub = sub_conn.subscribe(dispatcher, key)
        time.sleep(0.3)

        def accept_now(k: int) -> None:
            core = ConsumerCore(dispatcher, key)
            for fr in signed[:k]:
                core.accept(fr)

        def verify_now(k: int) -> None:
            keys = zbus.KeyRing.of(key)
            for _ in range(k):
                verify_frames(keys, *sample)

        def topic_now(k: int) -> None:
            for _ in range(k):
                decode_topic(sample[0])

        def envelope_now(k: int) -> None:
            for _ in range(k):
                decode_envelope(sample[1])

        def subscriber_process(k: int) -> float:
            fill()
            process = sub.process
            t0 = time.perf_counter()
            for _ in range(k):
                if not process(1.0):
                    raise RuntimeError("Subscriber.process timed out: a message went missing")
            return time.perf_counter() - t0

        batched = [factory.batch(EXCHANGE, KEY, [body] * 100) for _ in range(n // 100)]

        def accept_batched(k: int) -> None:
            core = ConsumerCore(dispatcher, key)
            ready = core.ready
            for fr in batched[:k // 100]:
                core.feed(fr)
                ready.clear()

        def subscriber_process_batched(k: int) -> float:
            for _ in range(k // 100):  # fresh numbers each time, as fill() does
                pubsock.send_multipart(factory.batch(EXCHANGE, KEY, [body] * 100))
            time.sleep(0.3 + k / 2_000_000)  # the io thread moves them into the SUB's queue
            process = sub.process
            t0 = time.perf_counter()
            for _ in range(k // 100 * 100):
                if not process(1.0):
                    raise RuntimeError("Subscriber.process timed out: a message went missing")
            return time.perf_counter() - t0

        row("con", "zbus: ConsumerCore.accept (verify, decode, route)", accept_now)
        row("con", "  of which verify_frames (HMAC)", verify_now)
        row("con", "  of which decode_topic", topic_now)
        row("con", "  of which decode_envelope (msgpack + checks + Envelope)", envelope_now)
        row("con", "zbus: ConsumerCore.accept, batches of 100 (a busy publisher's)",
            accept_batched)
        row("con", "zbus: Subscriber.process (recv + accept + handler)",
            subscriber_process)
        row("con", "zbus: Subscriber.process, batches of 100", subscriber_process_batched)
        sub.close()
        sub_conn.close()
        pubsock.close(linger=0)
        push.close(linger=0)
        routing(rep)
    finally:
        drain.kill()
        drain.wait()
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
