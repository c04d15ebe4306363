"""At-least-once pools, the member side (threads backend).

A :class:`ReliableMember` is a DEALER connected to its pool's component in the proxy
(``proxy/_reliable.py`` documents the wire protocol). It asks for at most ``window`` messages
at a time, acknowledges each one after its handlers returned (or NACKs it when a handler
raised, so that it is retried and, after the pool's ``max_attempts``, dead-lettered), and
suppresses duplicates by message id: a redelivery of a message this member already handled is
acknowledged without running the handlers again.

Invariants a maintainer must keep:

* an ACK is sent only after every handler of the message returned: a member that dies before
  that leaves the message un-acked, and the pool redelivers it (at least once);
* duplicate suppression is per member and bounded (``dedup_size`` message ids, oldest
  forgotten first); a message redelivered to *another* member after its first member died
  between handler and ACK runs again there: handlers must be idempotent, or check a shared
  store, for effects that must happen once;
* the member pings every ``heartbeat_ivl`` while it waits; a handler that runs longer than the
  pool's member timeout (``heartbeat_timeout``) makes the pool take its messages back.
"""

from __future__ import annotations

import contextlib
import struct
import time
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass
from typing import Any

import zmq

from ._connection import Connection, _LinkedConsumer
from ._dispatch import ConsumerCore, Delivery, Dispatcher
from ._envelope import message_id
from ._errors import ConfigError, ReplayError, Timeout
from ._keys import KeyRing
from ._names import validate_name
from ._replay import ReplayGuard
from ._settings import Endpoints

__all__ = ["ReliableMember", "ReliableStats", "reliable_endpoint"]

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


def reliable_endpoint(endpoints: Endpoints, pool: str) -> str:
    """Where pool ``pool``'s at-least-once component listens: ``rpool-NAME.sock``."""
    name = validate_name(pool, "pool name")
    path = f"{endpoints.run_dir}/rpool-{name}.sock"
    if len(path.encode()) > 107:
        raise ConfigError(f"ipc socket path {path!r} is too long: shorten the run directory")
    return f"ipc://{path}"


@dataclass
class ReliableStats:
    """Counters of an at-least-once member (beside its :class:`zbus.ConsumerStats`).

    ``acked``/``nacked``: messages acknowledged (handled, or refused as bad input) / handed
    back because a handler raised; ``duplicates``: redeliveries of messages this member had
    already handled, acknowledged without running handlers; ``redelivered``: deliveries with
    attempt > 1 (whoever had them before); ``pool_restarts``: the pool's component came back
    with a new run (a proxy restart: what it held in memory was lost).
    """

    acked: int = 0
    nacked: int = 0
    duplicates: int = 0
    redelivered: int = 0
    pool_restarts: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _DuplicateError(ReplayError):
    pass


class _PoolGuard(ReplayGuard):
    """The member's replay guard: a message this member handled is a duplicate (acked, not
    run again); one it handed back with NACK may come back once per NACK; a redelivery (the
    pool's own resend of a message it holds un-acked, attempt > 1) too far behind its
    stream's newest for the sequence window to judge is taken, since the pool, not the
    window, knows it is owed; the rest is judged as by any consumer. A message id is its
    stream id followed by u64be(sequence) (docs/PROTOCOL.md), so the guard can name it
    without the envelope."""

    def __init__(self, member: ReliableMember) -> None:
        super().__init__(member.connection.settings.replay)
        self.member = member
        self.duplicates: list[bytes] = []  # ids judged duplicates in the envelope at hand
        self.redelivery = False  # the envelope being judged came with attempt > 1

    def observe(self, publisher_id: str, stream: bytes, sequence: int) -> tuple[int, bool]:
        mid = message_id(stream, sequence)
        if mid in self.member._dedup or mid in self.member._ids:
            self.duplicates.append(mid)
            raise _DuplicateError(
                f"message {sequence} of {publisher_id!r} again", reason="duplicate"
            )
        if mid in self.member._retry:
            self.member._retry.discard(mid)
            return 0, True
        if self.redelivery:
            # Members share a stream, so while a dead member's messages wait for the pool
            # to notice, the others may move that stream's window past them. Rejecting
            # them as "too old to tell" would ack work nobody did (issue: 9 of 16,001
            # handled by no one, books balanced). Only the pool sets the attempt count.
            state = self._streams.get((publisher_id, stream))
            if state is not None and sequence <= state.highest - self.window:
                return 0, True
        return super().observe(publisher_id, stream, sequence)


class ReliableMember(_LinkedConsumer):
    """A member of an at-least-once pool (see the module docstring)."""

    def __init__(
        self,
        connection: Connection,
        pool: str,
        dispatcher: Dispatcher,
        keys: bytes | KeyRing,
        *,
        window: int = 10,
        dedup_size: int = 100_000,
    ) -> None:
        if not dispatcher.patterns:
            raise ConfigError("the dispatcher has no bindings: bind a handler before joining")
        if window < 1 or dedup_size < 1:
            raise ConfigError("window and dedup_size must be at least 1")
        self.pool = validate_name(pool, "pool name")
        # The link replaces the DEALER when libzmq gives the connection up: the new one is a
        # stranger to the pool until it says HELLO; what the old one held is redelivered.
        super().__init__(connection, dispatcher, keys, track_sequences=False, kind=zmq.DEALER,
                         endpoint=reliable_endpoint(connection.endpoints, self.pool))
        self._guard = _PoolGuard(self)
        self.core = ConsumerCore(dispatcher, keys, track_sequences=False, replay=self._guard)
        self.window = window
        self.reliable = ReliableStats()
        self._dedup: OrderedDict[bytes, None] = OrderedDict()
        self._dedup_size = dedup_size
        self._ids: dict[bytes, int] = {}  # message id -> delivery id, for deliveries handed out
        # Per delivery id (one envelope: one message, or a batch of one stream's): the ids of
        # its messages not acked yet. Its ACK goes when the last of them is done.
        self._open: dict[int, set[bytes]] = {}
        self._ready: deque[Delivery] = deque()  # a batch's messages still to hand out
        self._retry: set[bytes] = set()  # message ids NACKed, allowed through the guard once
        self._run: bytes | None = None
        self._ping_every = connection.settings.heartbeat_ivl
        self._last_sent = 0.0
        self._credited: int | None = None

    def counters(self) -> dict[str, Any]:
        return {**super().counters(), "reliable": self.reliable.as_dict()}

    def _replaced(self) -> None:
        self._hello()

    # -- talking to the pool -----------------------------------------------------------

    def _send(self, *frames: bytes) -> None:
        # DEALER queues while the pool is away (up to SNDHWM); never block the handler loop.
        with contextlib.suppress(zmq.Again):
            self._sock.send_multipart(list(frames), zmq.NOBLOCK)
        self._last_sent = time.monotonic()

    def _hello(self) -> None:
        self._send(b"HELLO", _U32.pack(self.window))

    @property
    def bindings(self) -> list[str]:
        return sorted(str(p) for p in self.core.dispatcher.patterns)

    def ready(self, timeout: float = 10.0) -> None:
        """Declare the pool (idempotent, with this member's bindings and the pool's options
        as they are), then return once its component has welcomed this member.

        Raises Timeout, or ProxyError when the proxy refuses the declaration (the name is
        taken by a fast pool, or declared with other bindings)."""
        deadline = time.monotonic() + timeout
        self.connection.declare_reliable_pool(self.pool, self.bindings, timeout)
        self._hello()
        while self._run is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Timeout(
                    f"the at-least-once pool {self.pool!r} did not answer within {timeout:g}s: "
                    "is zbus-proxy running?"
                )
            if (frames := self._read(min(left, 0.2))) is not None:
                self._handle_control(frames)
            else:
                self._hello()

    def _handle_control(self, frames: list[bytes]) -> tuple[int, int, list[bytes]] | None:
        """Act on one frame set from the pool; a MSG comes back as (id, attempt, frames)."""
        verb = frames[0] if frames else b""
        if verb == b"MSG" and len(frames) == 6 and len(frames[1]) == 8 and len(frames[2]) == 4:
            return _U64.unpack(frames[1])[0], _U32.unpack(frames[2])[0], frames[3:]
        if verb == b"WELCOME" and len(frames) == 2:
            if self._run is not None and frames[1] != self._run:
                # A new component (proxy restarted): our delivery ids mean nothing to it.
                self.reliable.pool_restarts += 1
                self._ids.clear()
            self._run = frames[1]
        elif verb == b"WHO":
            self._hello()
        elif verb == b"CREDITED" and len(frames) == 2 and len(frames[1]) == 4:
            self._credited = _U32.unpack(frames[1])[0]
        else:
            self.core.reject("bad_pool_frame", f"{len(frames)} frames from the pool, verb {verb!r}")
        return None

    # -- consuming -----------------------------------------------------------------------

    def receive(self, timeout: float | None = None) -> Delivery | None:
        """The next new delivery; call :meth:`ack` (or :meth:`nack`) for it when done.

        Rejected or unmatched messages are acknowledged here (redelivering bad input helps
        nobody) and counted; duplicates are acknowledged and counted, never returned.
        """
        if self._ready:
            return self._ready.popleft()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            now = time.monotonic()
            if now - self._last_sent >= self._ping_every:
                self._send(b"PING")
            wait = self._ping_every
            if deadline is not None:
                if now >= deadline:
                    return None
                wait = min(wait, deadline - now)
            if (frames := self._read(wait)) is None:
                continue
            got = self._handle_control(frames)
            if got is None:
                continue
            delivery = self._accept(*got)
            if delivery is not None:
                return delivery

    def _accept(self, i: int, attempt: int, frames: list[bytes]) -> Delivery | None:
        """Take delivery ``i`` (one envelope); return its first new message, the rest of a
        batch wait in ``_ready``. Its ACK goes once every message in it is done."""
        if attempt > 1:
            self.reliable.redelivered += 1
        guard = self._guard
        guard.duplicates.clear()
        guard.redelivery = attempt > 1
        self.core.feed(frames)
        held: set[bytes] = set()
        for mid in guard.duplicates:
            # Not a rejection: undo the guard's count, count it where it belongs.
            rejected = self.stats.rejected
            rejected["duplicate"] -= 1
            if not rejected["duplicate"]:
                del rejected["duplicate"]
            self.reliable.duplicates += 1
            old = self._ids.get(mid)
            if old is not None:
                # Redelivered while we still hold the first copy (its ack timed out): the
                # pool now waits for the new id; the old one's ack becomes a late ack.
                self._ids[mid] = i
                self._open.get(old, set()).discard(mid)
                held.add(mid)
        new = []
        while (delivery := self.core.next_ready()) is not None:
            mid = delivery.envelope.message_id
            self._ids[mid] = i
            held.add(mid)
            new.append(delivery)
        if not held:
            # Bad input, or only duplicates already handled: acknowledged, so that it is
            # not sent again.
            self._send(b"ACK", _U64.pack(i))
            self.reliable.acked += 1
            return None
        self._open[i] = held
        self._ready.extend(new[1:])
        return new[0] if new else None

    def ack(self, delivery: Delivery) -> None:
        """The handlers of ``delivery`` are done: the pool may forget it (once the other
        messages of its envelope, if it came in a batch, are done too)."""
        mid = delivery.envelope.message_id
        i = self._ids.pop(mid, None)
        self._remember(mid)
        if i is None:
            return
        waiting = self._open.get(i)
        if waiting is not None:
            waiting.discard(mid)
            if waiting:
                return
            del self._open[i]
        self._send(b"ACK", _U64.pack(i))
        self.reliable.acked += 1

    def nack(self, delivery: Delivery) -> None:
        """Hand ``delivery`` back for another attempt (dead-lettered after the pool's limit).

        The pool redelivers whole envelopes: a batch comes back whole, and its messages this
        member already handled are acked as duplicates without running again."""
        mid = delivery.envelope.message_id
        i = self._ids.pop(mid, None)
        if i is None:
            return
        if len(self._retry) < self._dedup_size:  # bounded like the dedup set
            self._retry.add(mid)
        for other in self._open.pop(i, set()) - {mid}:
            # Not handled yet: they come back with the envelope, and run then.
            self._ids.pop(other, None)
            if len(self._retry) < self._dedup_size:
                self._retry.add(other)
        self._ready = deque(d for d in self._ready if d.envelope.message_id in self._ids)
        self._send(b"NACK", _U64.pack(i))
        self.reliable.nacked += 1

    def _remember(self, mid: bytes) -> None:
        self._dedup[mid] = None
        if len(self._dedup) > self._dedup_size:
            self._dedup.popitem(last=False)

    def process(self, timeout: float | None = None) -> bool:
        """Receive one delivery, run its handlers, then ack it (nack if a handler raised)."""
        delivery = self.receive(timeout)
        if delivery is None:
            return False
        self._handle(delivery)
        return True

    def _handle(self, delivery: Delivery) -> None:
        errors = self.core.stats.handler_errors
        self.core.run_handlers(delivery)
        if self.core.stats.handler_errors == errors:
            self.ack(delivery)
        else:
            self.nack(delivery)

    def drain(self, timeout: float = 10.0) -> int:
        """Stop taking new messages, handle and ack those already sent, say BYE, close.

        Sets the window to 0; the pool confirms with CREDITED after the last message it sent
        this member, so when that arrives, nothing is in flight towards us. Returns how many
        were handled. Raises Timeout (after closing) when the confirmation does not come
        within ``timeout``: what this member holds un-acked is then redelivered to others.
        """
        deadline = time.monotonic() + timeout
        self._credited = None
        self._send(b"CREDIT", _U32.pack(0))
        handled = 0
        try:
            while self._credited != 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Timeout(
                        f"drain: the pool {self.pool!r} did not confirm within {timeout:g}s "
                        f"({handled} handled); un-acked messages go back to the pool"
                    )
                if (frames := self._read(min(left, 0.2))) is None:
                    continue
                got = self._handle_control(frames)
                if got is not None and (delivery := self._accept(*got)) is not None:
                    self._handle(delivery)
                    handled += 1
                while self._ready:  # the rest of a batch
                    self._handle(self._ready.popleft())
                    handled += 1
        finally:
            self.close()
        return handled

    def close(self) -> None:
        """Say BYE (the pool takes back whatever this member still holds) and close."""
        if self._sock.closed:
            return
        self._send(b"BYE")
        self._link.close()
        # Bounded linger: long enough for BYE and the last acks to leave.
        self._sock.close(linger=int(self.connection.settings.linger * 1000))
