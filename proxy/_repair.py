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
import os
import threading
import time
from collections import Counter, OrderedDict
from typing import TYPE_CHECKING, Any

import msgpack
import zmq

from zbus._names import CONTROL_PREFIX
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
FABRIC_ASK = CONTROL_PREFIX + b"repair/ask/"
FABRIC_GIVE = CONTROL_PREFIX + b"repair/give/"
FABRIC_TAIL = CONTROL_PREFIX + b"repair/tail/"
PEER_ASKER = b"peer:"
"""A requester identity that stands for an asker on another host (a local one is libzmq's,
which never starts so)."""
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
        # Publishing connection -> (bytes it keeps, when it said so), from its offers.
        self._kept: OrderedDict[bytes, tuple[int, float]] = OrderedDict()
        self._started = time.monotonic()
        self._token = os.urandom(8)  # this proxy's repair plane, as peers' answers name it
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
        now = time.monotonic()
        live = [kept for kept, at in list(self._kept.values()) if now - at <= OFFER_TTL]
        return {"streams": len(self._owners), "keepers": len(live),
                "retained_bytes": sum(live), **dict(self.counts),
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
        # Across hosts, requests and answers travel the fabric itself, as messages under
        # the control prefix: published into this host's ingress, they reach every peer
        # whose repair plane subscribed (its links carry them under CURVE, as they carry
        # data), and answers reach the asking host alone (it alone subscribes its token).
        self._fabric: tuple[zmq.Socket[Any], zmq.Socket[Any]] | None = None
        if proxy.federation is not None:
            push = make_socket(proxy._ctx, zmq.PUSH, proxy.settings,
                               connect=proxy.endpoints.ingress)
            sub = make_socket(proxy._ctx, zmq.SUB, proxy.settings,
                              connect=proxy.endpoints.deliver)
            for prefix in (FABRIC_ASK, FABRIC_GIVE + self._token, FABRIC_TAIL):
                sub.subscribe(prefix)
            self._fabric = (push, sub)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        if self._fabric is not None:
            poller.register(self._fabric[1], zmq.POLLIN)
        self._started = time.monotonic()
        self._ready.set()
        try:
            while not proxy._stopping.is_set():
                ready = dict(poller.poll(100))
                for source in ready:
                    for _ in range(1000):  # then look at the stop event again
                        try:
                            frames = source.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        if source is sock:
                            self._handle(sock, frames, time.monotonic())
                        else:
                            self._from_fabric(sock, frames, time.monotonic())
        finally:
            sock.close(linger=0)
            self._tails.close(linger=0)
            if self._fabric is not None:
                for fabric_sock in self._fabric:
                    fabric_sock.close(linger=0)

    def _publish(self, frames: list[bytes]) -> None:
        """Into this host's ingress, for the peers' repair planes (never waits)."""
        assert self._fabric is not None
        try:
            self._fabric[0].send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            self.counts["fabric_dropped"] += 1

    def _from_fabric(self, sock: zmq.Socket[Any], frames: list[bytes], now: float) -> None:
        topic = frames[0]
        if topic.startswith(FABRIC_GIVE) and len(frames) >= 3 and (len(frames) - 3) % 3 == 0:
            # An answer a peer's keeper gave to one of ours: to the asker alone.
            if self._send(sock, [frames[1], b"GIVE", *frames[2:]], "undeliverable"):
                self.counts["given_from_peers"] += (len(frames) - 3) // 3
        elif topic.startswith(FABRIC_ASK) and len(frames) == 2:
            try:
                origin, asker, body = msgpack.unpackb(frames[1], raw=False)
                _, _, stream, _, _ = Ask.decode(body)
            except Exception:
                self._refuse("malformed")
                return
            if origin == self._token:
                return  # our own, back through our delivery plane
            if type(origin) is not bytes or type(asker) is not bytes:
                self._refuse("malformed")
                return
            if not self._allowed(b"peer:" + origin, now):
                self._refuse("rate")
                return
            owner = self._owners.get(stream)
            if owner is None or now - owner[1] > OFFER_TTL:
                return  # another host's, maybe: each host answers for its own publishers
            requester = PEER_ASKER + bytes(msgpack.packb([origin, asker]))
            if self._send(sock, [owner[0], b"ASK", requester, body], "publisher_gone"):
                self.counts["forwarded_for_peers"] += 1
        elif topic == FABRIC_TAIL and len(frames) >= 5 and (len(frames) - 2) % 3 == 0:
            if frames[1] != self._token:  # ours went into our delivery plane already
                self._tail(frames[2:])
        else:
            self._refuse("malformed")

    def _tail(self, triples: list[bytes]) -> None:
        for i in range(0, len(triples), 3):
            try:
                self._tails.send_multipart(triples[i:i + 3], zmq.NOBLOCK)
            except zmq.Again:
                self.counts["tails_dropped"] += 1
                return
            self.counts["tails"] += 1

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
            requester = frames[2]
            if requester.startswith(PEER_ASKER) and self._fabric is not None:
                try:
                    origin, asker = msgpack.unpackb(requester[len(PEER_ASKER):], raw=False)
                except Exception:
                    self._refuse("malformed")
                    return
                self._publish([FABRIC_GIVE + origin, asker, *frames[3:]])
                self.counts["given_to_peers"] += (len(frames) - 4) // 3
            else:
                self._send(sock, [requester, b"GIVE", *frames[3:]], "undeliverable")
            self.counts["given"] += (len(frames) - 4) // 3
            self.counts["given_bytes"] += sum(len(f) for f in frames[4:])
        elif verb == b"OFFER" and len(frames) == 3:
            self._offer(sender, frames[2], now)
        elif verb == b"TAIL" and len(frames) >= 5 and (len(frames) - 2) % 3 == 0 \
                and (len(frames) - 2) // 3 <= MAX_GIVE_BATCHES:
            self._tail(frames[2:])
            if self._fabric is not None:  # and to the peers' delivery planes
                self._publish([FABRIC_TAIL, self._token, *frames[2:]])
        else:
            self._refuse("malformed")

    def _offer(self, sender: bytes, body: bytes, now: float) -> None:
        try:
            offer = msgpack.unpackb(body, raw=False, use_list=True)
            streams, kept = offer if type(offer) is list and len(offer) == 2 else (None, None)
        except Exception:
            streams = kept = None
        if (type(streams) is not list or len(streams) > MAX_OFFER
                or not all(type(s) is bytes and len(s) == 8 for s in streams)
                or type(kept) is not int or not 0 <= kept < 2**63):
            self._refuse("malformed")
            return
        self._kept[sender] = (kept, now)
        self._kept.move_to_end(sender)
        while len(self._kept) > MAX_REQUESTERS:
            self._kept.popitem(last=False)
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
            # Nobody here keeps it. Final, unless this proxy has only just started (its
            # publishers offer again within a second of a restart) or has peers, one of
            # which may: then the request goes to them, and the subscriber asks again
            # until its interval ends.
            self.counts["unknown"] += 1
            final = now - self._started > START_GRACE and self._fabric is None
            if self._fabric is not None:
                self._publish([FABRIC_ASK + stream,
                               bytes(msgpack.packb([self._token, requester, body]))])
                self.counts["asked_peers"] += 1
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
