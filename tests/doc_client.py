"""A zbus client written from docs/PROTOCOL.md alone: pyzmq, msgpack, hmac, hashlib, struct.

It imports nothing from zbus on purpose: if the document leaves out something a client needs
(a field, a rule of the loss count, the pool receipts, the at-least-once member protocol),
the tests that run this client against a real zbus-proxy and real zbus peers fail. The
section numbers refer to the document.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import math
import os
import struct
import time
from collections import Counter
from typing import Any

import msgpack
import zmq

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


def sign(key_id: str, key: bytes, topic: bytes, envelope: bytes) -> bytes:  # section 6
    digest = hmac.new(key, _U32.pack(len(topic)) + topic + envelope, hashlib.sha256).digest()
    kid = key_id.encode("ascii")
    return bytes([1, len(kid)]) + kid + digest


class RejectedError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _no_ext(code: int, data: bytes) -> Any:
    raise RejectedError("malformed")


def open_envelope(ring: dict[str, bytes], frames: list[bytes]) -> tuple[str, list[Any]]:
    """Section 7 steps 2 to 5: (topic, envelope fields), or RejectedError(reason)."""
    if len(frames) != 3:
        raise RejectedError("frame_count")
    topic, envelope, sig = frames
    if len(sig) < 35 or sig[0] != 1 or len(sig) != 34 + sig[1]:
        raise RejectedError("bad_signature")
    key = ring.get(sig[2 : 2 + sig[1]].decode("ascii", "replace"))
    if key is None:
        raise RejectedError("unknown_key")
    want = hmac.new(key, _U32.pack(len(topic)) + topic + envelope, hashlib.sha256).digest()
    if not hmac.compare_digest(want, sig[2 + sig[1] :]):
        raise RejectedError("bad_signature")
    try:
        fields = msgpack.unpackb(envelope, raw=False, strict_map_key=True, ext_hook=_no_ext)
    except RejectedError:
        raise
    except Exception:
        raise RejectedError("malformed") from None
    if not isinstance(fields, list) or not fields or type(fields[0]) is not int \
            or fields[0] != 2:
        raise RejectedError("unknown_version")
    if len(fields) != 5:
        raise RejectedError("malformed")
    _, publisher_id, stream_id, first, messages = fields
    if type(publisher_id) is not str or type(stream_id) is not bytes or len(stream_id) != 8 \
            or type(first) is not int or first < 1 or type(messages) is not list:
        raise RejectedError("wrong_type")
    for message in messages:
        if type(message) is not list or len(message) != 4:
            raise RejectedError("wrong_type")
        timestamp = message[0]
        if type(timestamp) not in (int, float) or not math.isfinite(timestamp):
            raise RejectedError("wrong_type")
    return topic.decode("ascii"), fields


class Streams:
    """Section 7's stream state and loss count (the window is not needed here: nothing in
    these tests arrives more than W behind)."""

    def __init__(self) -> None:
        self.state: dict[tuple[str, bytes], tuple[int, int, set[int]]] = {}
        self.lost = 0
        self.reordered = 0
        self.replays = 0

    def message(self, publisher_id: str, stream_id: bytes, s: int) -> bool:
        key = (publisher_id, stream_id)
        if key not in self.state:
            self.state[key] = (s, s, set())
            return True
        h, f, missing = self.state[key]
        if s > h:
            missing.update(range(h + 1, s))
            self.lost += s - h - 1
            self.state[key] = (s, f, missing)
            return True
        if f <= s <= h:
            if s not in missing:
                self.replays += 1
                return False
            missing.discard(s)
            self.lost -= 1
            self.reordered += 1
            return True
        missing.update(range(s + 1, f))
        self.lost += f - s - 1
        self.reordered += 1
        self.state[key] = (h, s, missing)
        return True

    def beacon(self, publisher_id: str, stream_id: bytes, first: int) -> None:
        key = (publisher_id, stream_id)
        if key not in self.state:
            return
        h, f, missing = self.state[key]
        last = first - 1
        if last > h:
            missing.update(range(h + 1, last + 1))
            self.lost += last - h
            self.state[key] = (last, f, missing)


class DocClient:
    """The sockets of section 1 on one run directory."""

    def __init__(self, run_dir: str, ring: dict[str, bytes], active: str) -> None:
        self.run_dir = run_dir
        self.ring = ring
        self.active = active
        self.ctx = zmq.Context()
        self.push: zmq.Socket[Any] | None = None
        self.streams: dict[bytes, list[Any]] = {}  # topic -> [stream id, next sequence]

    def endpoint(self, name: str) -> str:
        return f"ipc://{self.run_dir}/{name}"

    def request(self, **request: Any) -> dict[str, Any]:  # section 9
        req = self.ctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(self.endpoint("control.sock"))
        try:
            req.send(msgpack.packb(request, use_bin_type=True))
            if not req.poll(10_000):
                raise TimeoutError(f"no answer to {request['op']}")
            reply: dict[str, Any] = msgpack.unpackb(req.recv(), raw=False)
        finally:
            req.close()
        if not reply.get("ok"):
            raise RuntimeError(reply.get("error"))
        return reply

    # -- publishing (sections 2, 4, 5, 6) ------------------------------------------------

    def publish(self, exchange: str, routing_key: str, payloads: list[Any],
                publisher_id: str = "doc-client") -> None:
        """One envelope carrying ``payloads`` (a batch when there are several)."""
        if self.push is None:
            self.push = self.ctx.socket(zmq.PUSH)
            self.push.setsockopt(zmq.LINGER, 2000)
            self.push.connect(self.endpoint("ingress.sock"))
        topic = f"{exchange}/{routing_key}".encode("ascii")
        stream = self.streams.setdefault(topic, [os.urandom(8), 1])
        messages = [[time.time(), routing_key, 1, p] for p in payloads]
        envelope = msgpack.packb([2, publisher_id, stream[0], stream[1], messages],
                                 use_bin_type=True)
        stream[1] += len(payloads)
        self.push.send_multipart([topic, envelope,
                                  sign(self.active, self.ring[self.active], topic, envelope)])

    def beacons(self, publisher_id: str = "doc-client") -> None:
        assert self.push is not None
        for topic, (stream_id, following) in self.streams.items():
            envelope = msgpack.packb([2, publisher_id, stream_id, following, []],
                                     use_bin_type=True)
            self.push.send_multipart([topic, envelope,
                                      sign(self.active, self.ring[self.active], topic, envelope)])

    # -- subscribing (sections 7 and 8) ---------------------------------------------------

    def subscribe(self, prefixes: list[bytes]) -> DocSubscriber:
        return DocSubscriber(self, prefixes)

    def close(self) -> None:
        if self.push is not None:
            self.push.close()
        self.ctx.destroy(linger=0)  # whatever a failed test left open must not hang it


class DocSubscriber:
    def __init__(self, client: DocClient, prefixes: list[bytes]) -> None:
        self.client = client
        self.sub = client.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.connect(client.endpoint("deliver.sock"))
        for prefix in prefixes:
            self.sub.subscribe(prefix)
        self.streams = Streams()
        self.received: list[tuple[str, Any]] = []  # (topic, payload) accepted, in order
        self.rejected: Counter[str] = Counter()
        self.early: list[list[bytes]] = []

    def ready(self, timeout: float = 10.0) -> None:
        """Section 8's readiness probe."""
        token = b"\x00probe/" + os.urandom(8).hex().encode()
        self.sub.subscribe(token)
        push = self.client.ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(self.client.endpoint("ingress.sock"))
        deadline, interval = time.monotonic() + timeout, 0.005
        try:
            while time.monotonic() < deadline:
                with contextlib.suppress(zmq.Again):
                    push.send(token, zmq.NOBLOCK)
                if self.sub.poll(int(interval * 1000) + 1):
                    frames = self.sub.recv_multipart()
                    if frames == [token]:
                        return
                    self.early.append(frames)
                interval = min(interval * 2, 0.2)
            raise TimeoutError("the probe did not come back")
        finally:
            push.close()
            self.sub.unsubscribe(token)

    def take(self, frames: list[bytes]) -> None:
        if len(frames) == 1 and frames[0].startswith(b"\x00"):
            return
        try:
            topic, (_, publisher_id, stream_id, first, messages) = open_envelope(
                self.client.ring, frames)
        except RejectedError as exc:
            self.rejected[exc.reason] += 1
            return
        if not messages:
            self.streams.beacon(publisher_id, stream_id, first)
            return
        for i, (_, _, _, payload) in enumerate(messages):
            if self.streams.message(publisher_id, stream_id, first + i):
                self.received.append((topic, payload))

    def read(self, idle: float = 0.5) -> None:
        for frames in self.early:
            self.take(frames)
        self.early.clear()
        while self.sub.poll(int(idle * 1000)):
            self.take(self.sub.recv_multipart())

    def close(self) -> None:
        self.sub.close()


class DocPoolMember:
    """A fast-pool member (section 8, "Pools", "Pool receipts" and "Stream books")."""

    def __init__(self, client: DocClient, pool: str, bindings: list[str],
                 prefixes: list[bytes]) -> None:
        self.client = client
        self.pool = pool
        self.prefixes = prefixes
        client.request(op="declare_pool", name=pool, bindings=sorted(bindings))
        self.pull = client.ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        monitor = self.pull.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self.pull.connect(client.endpoint(f"pool-{pool}.sock"))
        if not monitor.poll(10_000):
            raise TimeoutError("the pool socket did not connect")
        self.pull.disable_monitor()
        monitor.close()
        self.member_id = os.urandom(8).hex()
        self.received = 0  # 3-frame messages read
        self.frames = 0  # frames of any message read
        self.payloads: list[Any] = []
        self.reported_at = time.monotonic()
        # (publisher_id, stream_id) -> [count, lowest, highest]; and those changed since
        # the last report.
        self.books: dict[tuple[str, bytes], list[int]] = {}
        self.changed: dict[tuple[str, bytes], None] = {}

    def keep_books(self, publisher_id: str, stream_id: bytes, first: int, n: int) -> None:
        key = (publisher_id, stream_id)
        book = self.books.get(key)
        if book is None:  # a beacon (n = 0) makes [0, first, first - 1]
            self.books[key] = [n, first, first + n - 1]
        else:
            book[0] += n
            if n and first < book[1]:
                book[1] = first
            book[2] = max(book[2], first + n - 1)
        self.changed[key] = None

    def report(self, final: bool = False) -> None:
        while True:  # at most 1,000 streams a report; the last report carries `final`
            keys = list(self.changed)[:1000]
            for key in keys:
                del self.changed[key]
            streams = [[*key, *self.books[key]] for key in keys]
            self.client.request(op="pool_receipts", pool=self.pool, member=self.member_id,
                                received=self.received, frames=self.frames,
                                final=final and not self.changed, streams=streams)
            if not self.changed:
                break
        self.reported_at = time.monotonic()

    def read(self, idle: float = 0.5) -> None:
        while self.pull.poll(int(idle * 1000)):
            frames = self.pull.recv_multipart()
            self.frames += len(frames)
            if len(frames) == 3:
                self.received += 1
            try:
                topic, fields = open_envelope(self.client.ring, frames)
            except RejectedError:
                continue
            self.keep_books(fields[1], fields[2], fields[3], len(fields[4]))
            if topic.encode().startswith(tuple(self.prefixes)):
                self.payloads.extend(m[3] for m in fields[4])
            if self.received % 1000 == 0 or time.monotonic() - self.reported_at > 0.5:
                self.report()
        self.report()

    def close(self) -> None:
        self.report(final=True)
        self.pull.close()


class DocReliableMember:
    """An at-least-once member (section 8, "At-least-once pools")."""

    def __init__(self, client: DocClient, pool: str, bindings: list[str], window: int) -> None:
        self.client = client
        client.request(op="declare_reliable_pool", name=pool, bindings=sorted(bindings))
        self.dealer = client.ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 1000)
        self.dealer.connect(client.endpoint(f"rpool-{pool}.sock"))
        self.dealer.send_multipart([b"HELLO", _U32.pack(window)])
        if not self.dealer.poll(10_000):
            raise TimeoutError("no WELCOME")
        verb, *_ = self.dealer.recv_multipart()
        assert verb == b"WELCOME", verb
        self.payloads: list[Any] = []
        self.handled: set[bytes] = set()

    def read(self, idle: float = 0.5) -> None:
        last_ping = time.monotonic()
        while self.dealer.poll(int(idle * 1000)):
            frames = self.dealer.recv_multipart()
            if time.monotonic() - last_ping > 1.0:
                self.dealer.send(b"PING")
                last_ping = time.monotonic()
            if frames[0] != b"MSG":
                continue
            delivery = frames[1]
            try:
                _, fields = open_envelope(self.client.ring, frames[3:])
            except RejectedError:
                self.dealer.send_multipart([b"ACK", delivery])
                continue
            _, _, stream_id, first, messages = fields
            for i, message in enumerate(messages):
                message_id = stream_id + _U64.pack(first + i)
                if message_id not in self.handled:
                    self.handled.add(message_id)
                    self.payloads.append(message[3])
            self.dealer.send_multipart([b"ACK", delivery])

    def close(self) -> None:
        self.dealer.send(b"BYE")
        self.dealer.close()
