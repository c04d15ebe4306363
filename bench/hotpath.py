"""``python -m bench.hotpath``: where the time goes per message, stage by stage, in-process.

CPU microseconds per message of each stage of zbus's publish and consume paths next to the
raw pyzmq calls they wrap, measured over real ipc sockets (no proxy: a drain process plays
the proxy's ingress; an in-process PUB plays its deliver socket). Rows marked ``candidate``
are prototypes of proposed core changes (see bench/README.md, "What is left"), kept here so
their gain can be re-measured; delete them once the change lands in zbus.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
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

import msgpack
import zmq

import zbus
from zbus._dispatch import ConsumerCore
from zbus._envelope import (
    ENVELOPE_FORMAT,
    MAC_BYTES,
    SIGNATURE_SCHEME,
    _refuse_ext,
    decode_envelope,
    decode_topic,
    mac,
    verify_frames,
)
from zbus._names import split_topic, topic_frame, validate_routing_key

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


# -- candidates (prototypes of proposed zbus changes) -----------------------------------


class PadMac:
    """HMAC-SHA256 from precomputed inner/outer SHA-256 states (RFC 2104), same bytes."""

    def __init__(self, key: bytes) -> None:
        k = (key if len(key) <= 64 else hashlib.sha256(key).digest()).ljust(64, b"\0")
        self._inner = hashlib.sha256(bytes(x ^ 0x36 for x in k))
        self._outer = hashlib.sha256(bytes(x ^ 0x5C for x in k))

    def __call__(self, topic: bytes, envelope: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(_U32.pack(len(topic)) + topic + envelope)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


class CandidateFactory(zbus.MessageFactory):
    """MessageFactory.frames for a plain payload, signing with PadMac."""

    def __init__(self, key: bytes, publisher_id: str) -> None:
        super().__init__(key, publisher_id)
        self._mac = PadMac(key)
        key_id = self.keys.active_id.encode("ascii")
        self._head = bytes((SIGNATURE_SCHEME, len(key_id))) + key_id

    def frames(self, exchange: str, routing_key: str, obj: Any, **kw: Any) -> list[bytes]:
        topic = topic_frame(exchange, routing_key)
        seq = self._next_seq
        envelope = self._packb([ENVELOPE_FORMAT, self.run_id + seq.to_bytes(8, "big"),
                                self.publisher_id, seq, float(self._clock()), routing_key, 1,
                                obj])
        self._next_seq = seq + 1
        return [topic, envelope, self._head + self._mac(topic, envelope)]


class _Env:
    __slots__ = ("message_id", "message_type", "message_type_version", "payload",
                 "publisher_id", "sequence", "timestamp")

    def __init__(self, *values: Any) -> None:
        (self.message_id, self.publisher_id, self.sequence, self.timestamp, self.message_type,
         self.message_type_version, self.payload) = values


class CandidateCore(ConsumerCore):
    """ConsumerCore.accept with the same checks and: PadMac per key, a bounded cache of
    verified topic frames and of validated message types, a plain slots envelope."""

    def __init__(self, dispatcher: zbus.Dispatcher, key: bytes) -> None:
        super().__init__(dispatcher, key)
        assert self.keys is not None
        self._macs = {kid: PadMac(self.keys.get(kid)) for kid in self.keys.ids()}
        self._topics: dict[bytes, tuple[str, str]] = {}
        self._types: set[str] = set()

    def accept(self, frames: list[bytes]) -> zbus.Delivery | None:
        if len(frames) != 3:
            return None
        topic, raw, sig = frames
        self.stats.received += 1
        if len(sig) < 3 + MAC_BYTES or sig[0] != SIGNATURE_SCHEME:
            return None
        n = sig[1]
        if len(sig) != 2 + n + MAC_BYTES:
            return None
        key_id = sig[2:2 + n].decode("ascii")
        mac_of = self._macs.get(key_id)
        if mac_of is None or not hmac.compare_digest(mac_of(topic, raw), sig[2 + n:]):
            return None
        names = self._topics.get(topic)
        if names is None:
            if len(self._topics) >= 4096:
                self._topics.clear()
            names = self._topics[topic] = split_topic(topic)
        fields = msgpack.unpackb(raw, raw=False, strict_map_key=True, ext_hook=_refuse_ext)
        if type(fields) is not list or len(fields) != 8 or type(fields[0]) is not int \
                or fields[0] != ENVELOPE_FORMAT:
            return None
        _, mid, pid, seq, ts, mtype, ver, payload = fields
        if (type(mid) is not bytes or len(mid) != 16 or type(pid) is not str
                or not 0 < len(pid) <= 255 or type(seq) is not int or seq < 0
                or (type(ts) is not float and type(ts) is not int) or type(mtype) is not str
                or type(ver) is not int or ver < 0):
            return None
        if mtype not in self._types:
            validate_routing_key(mtype)
            if len(self._types) < 4096:
                self._types.add(mtype)
        env: Any = _Env(mid, pid, seq, float(ts), mtype, ver, payload)
        guard = self._guard  # the same replay and sequence accounting as ConsumerCore
        guard.check_time(env.timestamp, self._clock())
        missing, late = guard.observe(pid, mid[:8], seq)
        if self._count_gaps:
            self.stats.lost += missing
            self.stats.reordered += late
        handlers = self.dispatcher.route(*names)
        return zbus.Delivery(names[0], names[1], env, key_id, payload, handlers)


# -- measuring --------------------------------------------------------------------------


def timed(fn: Callable[[int], float | None], n: int, repeat: int) -> float:
    """Best of ``repeat`` runs, in microseconds per message (fn may return its own time)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        own = fn(n)
        best = min(best, own if own is not None else time.perf_counter() - t0)
    return best / n * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hotpath", description=__doc__)
    p.add_argument("-n", type=int, default=30_000, help="messages per measurement")
    p.add_argument("--repeat", type=int, default=5, help="best of this many runs")
    p.add_argument("--size", type=int, default=100, help="payload bytes")
    args = p.parse_args(argv)
    n, rep = args.n, args.repeat
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
        cand = CandidateFactory(key, "bench-publisher")
        sample = factory.frames(EXCHANGE, KEY, body)
        verify_frames(zbus.KeyRing.of(key), *cand.frames(EXCHANGE, KEY, body))  # same bytes
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

        pad = PadMac(key)

        def mac_pad(k: int) -> None:
            for _ in range(k):
                pad(sample[0], sample[1])

        def frames_cand(k: int) -> None:
            for _ in range(k):
                cand.frames(EXCHANGE, KEY, body)

        def publisher_send(k: int) -> None:
            for _ in range(k):
                pub.send(KEY, body)

        batch = [body] * 100

        def publisher_send_many(k: int) -> None:
            for _ in range(k // 100):
                pub.send_many(KEY, batch)

        def cand_send(k: int) -> None:
            send = push.send
            for _ in range(k):
                fr = cand.frames(EXCHANGE, KEY, body)
                send(fr[0], SNDMORE)
                send(fr[1], SNDMORE)
                send(fr[2])

        row("pub", "raw pyzmq: send_multipart(3 frames)", raw_multipart)
        row("pub", "raw pyzmq: 3 x send(frame, int SNDMORE)", raw_three)
        row("pub", "zbus: MessageFactory.frames (envelope + HMAC)", frames_now)
        row("pub", "  of which mac() (hmac.digest)", mac_now)
        row("pub", "  candidate: mac from precomputed SHA-256 pads", mac_pad)
        row("pub", "zbus: Publisher.send (frames + send_multipart)", publisher_send)
        row("pub", "zbus: Publisher.send_many, batches of 100", publisher_send_many)
        row("pub", "candidate: pad-HMAC frames + 3 x send(int SNDMORE)", cand_send)
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

        def accept_cand(k: int) -> None:
            core = CandidateCore(dispatcher, key)
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

        sock = sub._sock

        def cand_receive(k: int) -> float:
            core = CandidateCore(dispatcher, key)
            fill()
            recv = sock.recv_multipart
            t0 = time.perf_counter()
            for _ in range(k):
                try:
                    frames = recv(zmq.NOBLOCK)
                except zmq.Again:
                    sock.poll(1000)
                    frames = recv()
                delivery = core.accept(frames)
                if delivery is not None:
                    core.run_handlers(delivery)
            return time.perf_counter() - t0

        row("con", "zbus: ConsumerCore.accept (verify, decode, route)", accept_now)
        row("con", "  of which verify_frames (HMAC)", verify_now)
        row("con", "  of which decode_topic", topic_now)
        row("con", "  of which decode_envelope (msgpack + checks + Envelope)", envelope_now)
        row("con", "  candidate: accept with pad HMAC, caches, slots envelope", accept_cand)
        row("con", "zbus: Subscriber.process (poll + recv + accept + handler)",
            subscriber_process)
        row("con", "candidate: recv(NOBLOCK) first, poll on Again + candidate accept",
            cand_receive)
        sub.close()
        sub_conn.close()
        pubsock.close(linger=0)
        push.close(linger=0)
    finally:
        drain.kill()
        drain.wait()
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
