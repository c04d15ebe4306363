"""What publishing connections sent, kept for a reliability interval, and the one thread per
process and proxy that offers those streams on the proxy's repair plane and answers requests
for them (zbus._repair has the pure parts; docs/RELIABILITY.md, "Repair").

Each publishing connection has its own :class:`Retention` (its own interval and byte bound);
its sending thread only appends to a deque (atomic under the GIL: no lock on the hot path).
One :class:`Keeper` serves every connection of a process that reaches the same proxy through
the same context: one thread and one DEALER, however many connections (a service with a
thousand asyncio tasks, each with its own connection, has one). The keeper expires what is
past its time, offers the streams every second, repeats idle streams' beacons, and answers
requests by scanning what is kept (requests are rare). Its socket is made and used in its
own thread, as libzmq sockets require; it is an OS thread even under eventlet or asyncio,
so neither a hub nor an event loop ever waits in libzmq. A connection leaving never waits
for it: the thread ends on its own once the last one has left.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import msgpack
import zmq

from ._message import BEACON_IDLE, MessageFactory
from ._repair import MAX_GIVE_BATCHES, Ask, Retention, envelope_head
from ._settings import Endpoints, Settings
from ._transport import make_socket

__all__ = ["Keeper", "Kept"]

log = logging.getLogger("zbus")

OFFER_EVERY = 1.0
"""Seconds between offers of every kept stream (a restarted proxy learns them again)."""
MAX_OFFER = 4096
GIVE_BYTES = 4 << 20
"""Most bytes of envelopes in one answer message (an answer goes in as many as it needs)."""
BEACONS_EVERY = 1.0


class Kept:
    """One connection's part of a keeper: its retention, the beacons of its idle streams
    (``MessageFactory.tail_beacons``: repeated every second while its streams are within the
    interval, so a lost tail shows even when the publisher sends nothing more), and what it
    answered."""

    def __init__(self, retention: Retention, beacons: Callable[[], list[list[bytes]]]) -> None:
        self.retention = retention
        self.beacons = beacons
        self.keep = retention.keep
        """keep(now, stream, first, count, frames): from the sending thread."""
        self.asked = 0
        self.given = 0
        self.not_kept = 0

    def keep_sent(self, factory: MessageFactory, frames: list[bytes]) -> None:
        """From the sending thread: ``frames``, which ``factory`` made, were just sent. Their
        stream and numbers come from the factory when it sealed them last (no parse); the
        envelope's head is read only for frames sealed before others."""
        stream, first = factory._last_sealed
        if stream is not None and stream.topic == frames[0]:
            self.keep(time.monotonic(), stream.stream_id, first, stream.next - first, frames)
        else:
            self.keep(time.monotonic(), *envelope_head(frames[1]), frames)

    def stats(self) -> dict[str, int]:
        return {"asked": self.asked, "given": self.given, "not_kept": self.not_kept,
                "retained_bytes": self.retention.size, "evicted": self.retention.evicted}


_keepers: dict[tuple[str, int], Keeper] = {}
_keepers_lock = threading.Lock()


def _forget_after_fork() -> None:
    # The parent's keeper threads do not exist in a child: it starts its own.
    global _keepers_lock
    _keepers.clear()
    _keepers_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)


class Keeper:
    @classmethod
    def attach(cls, ctx: zmq.Context[Any], settings: Settings, endpoints: Endpoints,
               factories: Callable[[], list[MessageFactory]],
               thread: type[threading.Thread] = threading.Thread) -> tuple[Keeper, Kept]:
        """The keeper for ``endpoints`` through ``ctx`` (started if there is none), with a new
        part for one connection, whose factories are ``factories()`` (their idle streams'
        beacons are repeated): detach it when the connection closes."""
        interval = settings.repair.interval
        kept = Kept(Retention(settings.repair), lambda: [
            b for f in factories() for b in f.tail_beacons(BEACON_IDLE, interval)])
        with _keepers_lock:
            key = (endpoints.repair, id(ctx))
            keeper = _keepers.get(key)
            if keeper is None or keeper._stop.is_set():
                keeper = _keepers[key] = cls(ctx, settings, endpoints, thread, key)
            keeper._parts.append(kept)
        return keeper, kept

    def __init__(self, ctx: zmq.Context[Any], settings: Settings, endpoints: Endpoints,
                 thread: type[threading.Thread], key: tuple[str, int]) -> None:
        self._ctx = ctx
        self._settings = settings
        self._endpoints = endpoints
        self._key = key
        self._parts: list[Kept] = []
        self._stop = threading.Event()
        # ``thread``: an OS thread's class (under eventlet.monkey_patch(), threading's
        # original one: the keeper waits in libzmq, which a green thread must never do).
        self._thread = thread(target=self._serve, name="zbus-keeper", daemon=True)
        self._thread.start()

    def detach(self, kept: Kept) -> None:
        """A connection closed: its part goes (never waits for the thread)."""
        with _keepers_lock:
            with contextlib.suppress(ValueError):
                self._parts.remove(kept)
            if not self._parts:
                self._stop.set()
                if _keepers.get(self._key) is self:
                    del _keepers[self._key]

    def _serve(self) -> None:
        try:
            sock = make_socket(self._ctx, zmq.DEALER, self._settings,
                               connect=self._endpoints.repair)
        except Exception:  # a closed context (process exit): nothing to keep for
            log.debug("zbus: keeper could not start", exc_info=True)
            return
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
                parts = list(self._parts)
                new = False
                for kept in parts:
                    kept.retention.expire(now)
                    if kept.retention.new_streams:
                        kept.retention.new_streams.clear()
                        new = True
                if new or now >= next_offer:
                    self._offer(sock, parts)
                    next_offer = now + OFFER_EVERY
                if now >= next_beacons:
                    # To the proxy, which publishes them into its delivery plane. A beacon
                    # goes once its stream has been idle a second: whatever it announces
                    # left on the connection's own socket long before.
                    next_beacons = now + BEACONS_EVERY
                    beacons = [b for kept in parts for b in kept.beacons()]
                    for start in range(0, len(beacons), MAX_GIVE_BATCHES):
                        tail = beacons[start:start + MAX_GIVE_BATCHES]
                        self._send(sock, [b"TAIL", *(f for beacon in tail for f in beacon)])
        except zmq.ContextTerminated:
            return
        finally:
            sock.close(linger=0)

    def _offer(self, sock: zmq.Socket[Any], parts: list[Kept]) -> None:
        streams = [s for kept in parts for s in list(kept.retention.streams)]
        size = sum(kept.retention.size for kept in parts)
        for start in range(0, max(len(streams), 1), MAX_OFFER):
            chunk = streams[start:start + MAX_OFFER]
            self._send(sock, [b"OFFER", bytes(msgpack.packb([chunk, size]))])

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
        owner = next((kept for kept in list(self._parts)
                      if stream in kept.retention.streams), None)
        wanted = [(lo, hi) for lo, hi in ranges]
        if owner is None:
            found: list[list[bytes]] = []
            gone = [[lo, hi] for lo, hi in wanted]
        else:
            owner.asked += 1
            found, gone = owner.retention.find(stream, wanted, max_bytes)
            owner.not_kept += sum(hi - lo + 1 for lo, hi in gone)
        # What is no longer kept goes in the first part's head; the rest say only which.
        head = bytes(msgpack.packb([ask_id, publisher_id, stream, gone]))
        part: list[bytes] = []
        size = 0
        sent = given = 0
        for envelope in found:
            part.extend(envelope)
            size += sum(len(frame) for frame in envelope)
            if len(part) // 3 >= MAX_GIVE_BATCHES or size >= GIVE_BYTES:
                self._send(sock, [b"GIVE", requester, head, *part])
                given += len(part) // 3
                head = bytes(msgpack.packb([ask_id, publisher_id, stream, []]))
                part, size, sent = [], 0, 1
        if part or not sent:
            self._send(sock, [b"GIVE", requester, head, *part])
            given += len(part) // 3
        if owner is not None:
            owner.given += given
