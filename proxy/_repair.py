"""The host's repair plane: a ROUTER on ``repair.sock`` between the subscribers that ask for
gaps and the publishing connections that keep what they sent (zbus._repair; wire in
docs/PROTOCOL.md, section 11).

Publishers offer their streams (``OFFER``, every second, so a restarted proxy learns them
again within a second); a subscriber's ``ASK`` goes to the connection that offered the
stream, whose ``GIVE`` (the kept envelopes, signed as first sent) goes back to the subscriber
alone. No data message passes here: Python runs per request, never per message, and the
forwarding planes stay libzmq's C loop.

Requests are untrusted: each is decoded and bounded before anything else, each requester is
held to a rate, the stream table is bounded, and every refusal is counted by reason. A repair
carries only envelopes a subscriber verifies like any other (same MAC), so whoever can reach
this socket (the run directory's owner) can learn nothing it could not subscribe to.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from typing import TYPE_CHECKING, Any

import msgpack
import zmq

from zbus._repair import MAX_GIVE_BATCHES, Ask
from zbus._transport import make_socket

if TYPE_CHECKING:
    from ._proxy import Proxy

__all__ = ["RepairRouter"]

log = logging.getLogger("zbus.proxy")

MAX_STREAMS = 200_000
"""Streams whose publisher this proxy remembers (least recently offered go first)."""
OFFER_TTL = 5.0
"""Seconds an offer stands without being renewed (publishers renew every second)."""
MAX_OFFER = 4096
"""Most stream ids in one OFFER."""
ASK_RATE = 200.0
ASK_BURST = 400.0
"""Requests per second one requester may make, and its burst (a token bucket)."""
MAX_REQUESTERS = 4096
START_GRACE = 2.5
"""Seconds after its start during which an unknown stream is not final (publishers offer
every second, so all of them have offered again by then)."""


class RepairRouter:
    def __init__(self, proxy: Proxy) -> None:
        self._proxy = proxy
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._owners: OrderedDict[bytes, tuple[bytes, float]] = OrderedDict()
        self._buckets: OrderedDict[bytes, list[float]] = OrderedDict()
        self._started = time.monotonic()
        self.counts: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._proxy.health.guard("zbus-repair", self._serve),
            name="zbus-repair", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the repair socket did not start")

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def stats(self) -> dict[str, Any]:
        return {"streams": len(self._owners), **dict(self.counts),
                "refused": dict(self.refused),
                "starting": time.monotonic() - self._started <= START_GRACE}

    def _serve(self) -> None:
        proxy = self._proxy
        assert proxy._ctx is not None
        sock = make_socket(proxy._ctx, zmq.ROUTER, proxy.settings, bind=proxy.endpoints.repair)
        # An answer for a subscriber that has gone must be counted, not dropped unseen.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # The beacons keepers repeat go into this host's delivery plane only (its fan-in
        # subscribes here): through the origin, pools and peers' links would hand them out
        # as envelopes, and a repeat no member took would count as an envelope lost.
        self._tails = make_socket(proxy._ctx, zmq.PUB, proxy.settings, sndhwm=10_000,
                                  bind=proxy.tails_endpoint)
        self._started = time.monotonic()
        self._ready.set()
        try:
            while not proxy._stopping.is_set():
                if not sock.poll(100):
                    continue
                for _ in range(1000):  # then look at the stop event again
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._handle(sock, frames, time.monotonic())
        finally:
            sock.close(linger=0)
            self._tails.close(linger=0)

    def _refuse(self, reason: str) -> None:
        self.refused[reason] += 1
        if self.refused[reason] == 1:
            log.warning("refused a repair-plane message", extra={"reason": reason})

    def _handle(self, sock: zmq.Socket[Any], frames: list[bytes], now: float) -> None:
        if len(frames) < 2:
            self._refuse("malformed")
            return
        sender, verb = frames[0], frames[1]
        if verb == b"ASK" and len(frames) == 3:
            self._ask(sock, sender, frames[2], now)
        elif verb == b"GIVE" and len(frames) >= 4 and (len(frames) - 4) % 3 == 0 \
                and (len(frames) - 4) // 3 <= MAX_GIVE_BATCHES:
            self._send(sock, [frames[2], b"GIVE", *frames[3:]], "undeliverable")
            self.counts["given"] += (len(frames) - 4) // 3
            self.counts["given_bytes"] += sum(len(f) for f in frames[4:])
        elif verb == b"OFFER" and len(frames) == 3:
            self._offer(sender, frames[2], now)
        elif verb == b"TAIL" and len(frames) >= 5 and (len(frames) - 2) % 3 == 0 \
                and (len(frames) - 2) // 3 <= MAX_GIVE_BATCHES:
            for i in range(2, len(frames), 3):
                try:
                    self._tails.send_multipart(frames[i:i + 3], zmq.NOBLOCK)
                except zmq.Again:
                    self.counts["tails_dropped"] += 1
                    break
                self.counts["tails"] += 1
        else:
            self._refuse("malformed")

    def _offer(self, sender: bytes, body: bytes, now: float) -> None:
        try:
            streams = msgpack.unpackb(body, raw=False, use_list=True)
        except Exception:
            streams = None
        if (type(streams) is not list or len(streams) > MAX_OFFER
                or not all(type(s) is bytes and len(s) == 8 for s in streams)):
            self._refuse("malformed")
            return
        owners = self._owners
        for stream in streams:
            owners[stream] = (sender, now)
            owners.move_to_end(stream)
        while len(owners) > MAX_STREAMS:
            owners.popitem(last=False)
            self.counts["streams_forgotten"] += 1

    def _allowed(self, requester: bytes, now: float) -> bool:
        bucket = self._buckets.get(requester)
        if bucket is None:
            bucket = self._buckets[requester] = [ASK_BURST, now]
            if len(self._buckets) > MAX_REQUESTERS:
                self._buckets.popitem(last=False)
        self._buckets.move_to_end(requester)
        tokens = min(ASK_BURST, bucket[0] + (now - bucket[1]) * ASK_RATE)
        bucket[1] = now
        if tokens < 1:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1
        return True

    def _ask(self, sock: zmq.Socket[Any], requester: bytes, body: bytes, now: float) -> None:
        try:
            ask_id, _, stream, _, _ = Ask.decode(body)
        except ValueError:
            self._refuse("malformed")
            return
        if not self._allowed(requester, now):
            self._refuse("rate")
            return
        self.counts["asked"] += 1
        owner = self._owners.get(stream)
        if owner is None or now - owner[1] > OFFER_TTL:
            # Nobody here keeps it. Final, unless this proxy has only just started: its
            # publishers offer again within a second of a restart, so then the subscriber
            # is told to ask again, not to give up.
            self.counts["unknown"] += 1
            final = now - self._started > START_GRACE
            self._send(sock, [requester, b"GONE",
                              bytes(msgpack.packb([ask_id, stream, final]))], "undeliverable")
            return
        if self._send(sock, [owner[0], b"ASK", requester, body], "publisher_gone"):
            self.counts["forwarded"] += 1

    def _send(self, sock: zmq.Socket[Any], frames: list[bytes], unreachable: str) -> bool:
        try:
            sock.send_multipart(frames, zmq.NOBLOCK)
            return True
        except zmq.ZMQError:  # EHOSTUNREACH (gone), EAGAIN (not reading): counted
            self.counts[unreachable] += 1
            return False
