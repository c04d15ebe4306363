"""A publishing connection's keeper: what it sent, kept for a reliability interval, and the
thread that offers those streams on the proxy's repair plane and answers requests for them
(zbus._repair has the pure parts; docs/RELIABILITY.md, "Repair").

The sending thread only appends to a deque (atomic under the GIL: no lock on the hot path);
the keeper's thread expires what is past its time and answers requests by scanning what is
kept (requests are rare). The keeper owns its own DEALER, made and used in its own thread,
as libzmq sockets require.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import msgpack
import zmq

from ._message import BEACON_IDLE
from ._repair import MAX_GIVE_BATCHES, Ask, Retention
from ._settings import Endpoints, Settings
from ._transport import make_socket

__all__ = ["Keeper"]

log = logging.getLogger("zbus")

OFFER_EVERY = 1.0
"""Seconds between offers of every kept stream (a restarted proxy learns them again)."""
MAX_OFFER = 4096
GIVE_BYTES = 4 << 20
"""Most bytes of envelopes in one answer message (an answer goes in as many as it needs)."""


class Keeper:
    """``beacons()`` gives the signed beacons of the connection's streams idle for a second
    that sent within the interval (``MessageFactory.tail_beacons``): the keeper sends them
    every second, so that a stream whose tail was lost shows its last sequence even when its
    publisher sends nothing more (the connection itself sends beacons only when it sends,
    flushes or closes, and those can be lost with the tail)."""

    def __init__(self, ctx: zmq.Context[Any], settings: Settings, endpoints: Endpoints,
                 beacons: Callable[[], list[list[bytes]]],
                 thread: type[threading.Thread] = threading.Thread) -> None:
        self._ctx = ctx
        self._settings = settings
        self._endpoints = endpoints
        self._beacons = beacons
        self.retention = Retention(settings.repair)
        self.keep = self.retention.keep
        """keep(now, stream, first, count, frames): from the sending thread."""
        self.asked = 0
        self.given = 0
        self.not_kept = 0
        self._stop = threading.Event()
        # ``thread``: an OS thread's class (under eventlet.monkey_patch(), threading's
        # original one: the keeper waits in libzmq, which a green thread must never do).
        self._thread = thread(target=self._serve, name="zbus-keeper", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def stats(self) -> dict[str, int]:
        return {"asked": self.asked, "given": self.given, "not_kept": self.not_kept,
                "retained_bytes": self.retention.size, "evicted": self.retention.evicted}

    def _serve(self) -> None:
        try:
            sock = make_socket(self._ctx, zmq.DEALER, self._settings,
                               connect=self._endpoints.repair)
        except Exception:  # a closed context (process exit): nothing to keep for
            log.debug("zbus: keeper could not start", exc_info=True)
            return
        retention = self.retention
        next_offer = next_beacons = 0.0
        try:
            while not self._stop.is_set():
                if sock.poll(100):
                    for _ in range(100):
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._answer(sock, frames)
                now = time.monotonic()
                retention.expire(now)
                if retention.new_streams or now >= next_offer:
                    retention.new_streams.clear()
                    streams = list(retention.streams)
                    for start in range(0, max(len(streams), 1), MAX_OFFER):
                        chunk = streams[start:start + MAX_OFFER]
                        self._send(sock, [b"OFFER",
                                          bytes(msgpack.packb([chunk, retention.size]))])
                    next_offer = now + OFFER_EVERY
                if now >= next_beacons:
                    # To the proxy, which publishes them into its delivery plane. A beacon
                    # goes once its stream has been idle a second: whatever it announces
                    # left on the connection's own socket long before.
                    next_beacons = now + BEACON_IDLE
                    beacons = self._beacons()
                    for start in range(0, len(beacons), MAX_GIVE_BATCHES):
                        tail = beacons[start:start + MAX_GIVE_BATCHES]
                        self._send(sock, [b"TAIL", *(f for beacon in tail for f in beacon)])
        except zmq.ContextTerminated:
            return
        finally:
            sock.close(linger=0)

    def _send(self, sock: zmq.Socket[Any], frames: list[bytes]) -> None:
        with contextlib.suppress(zmq.Again):  # no proxy now: the next offer or ask comes
            sock.send_multipart(frames, zmq.NOBLOCK)

    def _answer(self, sock: zmq.Socket[Any], frames: list[bytes]) -> None:
        if len(frames) != 3 or frames[0] != b"ASK":
            return
        requester = frames[1]
        try:
            ask_id, publisher_id, stream, ranges, max_bytes = Ask.decode(frames[2])
        except ValueError:
            return
        self.asked += 1
        found, gone = self.retention.find(stream, [(lo, hi) for lo, hi in ranges], max_bytes)
        self.not_kept += sum(hi - lo + 1 for lo, hi in gone)
        # What is no longer kept goes in the first part's head; the rest say only which.
        head = bytes(msgpack.packb([ask_id, publisher_id, stream, gone]))
        part: list[bytes] = []
        size = 0
        sent = False
        for envelope in found:
            part.extend(envelope)
            size += sum(len(frame) for frame in envelope)
            if len(part) // 3 >= MAX_GIVE_BATCHES or size >= GIVE_BYTES:
                self._send(sock, [b"GIVE", requester, head, *part])
                self.given += len(part) // 3
                head = bytes(msgpack.packb([ask_id, publisher_id, stream, []]))
                part, size, sent = [], 0, True
        if part or not sent:
            self._send(sock, [b"GIVE", requester, head, *part])
            self.given += len(part) // 3
