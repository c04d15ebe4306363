"""At-least-once pools, the proxy side: credit-based distribution, acks, redelivery, dead letters.

Beside the fast path (PUSH/PULL, at most once), a pool can run in this mode. One
:class:`ReliablePool` per pool owns a thread and two sockets:

    origin PUB --> SUB (the pool's binding prefixes) --> [queue, in flight] --> ROUTER
                                                              ROUTER <--DEALER-- members

Wire protocol on ``rpool-NAME.sock`` (every frame count and type checked; anything else is
counted under ``stats()["refused"]`` and dropped, the member is never trusted further):

    member -> pool: HELLO u32 window | CREDIT u32 window | ACK u64... | NACK u64... | PING | BYE
    pool -> member: WELCOME run(8) | CREDITED u32 window | WHO | MSG u64 id, u32 attempt,
                    topic, envelope, signature   (the message's three frames, untouched)

WELCOME also comes unasked, with the same run, to a member already welcomed: the pool checks
which members' connections are still there after one closed (a member ignores it).

Invariants a maintainer must keep:

* a member has at most ``window`` messages in flight (credit): it only receives what it asked
  for; ``CREDIT 0`` stops the flow, and ``CREDITED`` is sent after the last MSG it will get;
* a message leaves this component's memory only by an ACK, or into the dead letters after
  ``max_attempts`` deliveries without one (each NACK, ack timeout or member death is an
  attempt); a dead letter leaves only the oldest first (evicted, replayed back into the queue
  with ``max_attempts`` more attempts, or purged), so its position stays its name;
* everything is bounded: queued + in flight <= ``max_pending`` (beyond: the newest message is
  dropped and counted as ``overflow``), dead letters <= ``dead_letter_max`` (the oldest is
  evicted and counted);
* the state lives in this process's memory only: a proxy crash loses what was queued or in
  flight (docs/RELIABILITY.md); members then see a new ``run`` in WELCOME;
* a member is lost (its in-flight messages go back to the front of the queue) when a send to
  it finds its connection gone, or when it was silent for ``member_timeout``. A send is
  made on purpose when the ROUTER's monitor reports a closed connection (a repeated
  WELCOME to every member: ROUTER_MANDATORY answers EHOSTUNREACH for the one gone), so a
  dead member is found at once even with its window full, when nothing else is sent to
  it; the timeout remains for a member that hangs with its connection open.

The daemon runs one per declared at-least-once pool (``Proxy.declare_reliable_pool``, the
control op ``declare_reliable_pool``; re-created from ``pools.json`` on start).
:class:`ReliableCore` is the logic with no sockets and no clock (``now`` is passed in);
:class:`ReliablePool` is the edge. The proxy never parses a message: it has no keys.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import zmq

from zbus import ConfigError, Endpoints, Settings, TopicPattern
from zbus._names import CONTROL_PREFIX, minimal_prefixes, validate_name
from zbus._reliable import reliable_endpoint
from zbus._transport import make_socket, wait_for_probe

from ._device import start_thread

__all__ = ["DEFAULT_ACK_TIMEOUT", "DEFAULT_MAX_ATTEMPTS", "DeadLetter", "ReliableCore",
           "ReliablePool"]

log = logging.getLogger("zbus.proxy")

# When a member connection closes, the check for which member it was runs at once and again
# after these delays (s): libzmq takes the ROUTER's route to a closed connection away only
# once the socket has processed the pipe's termination, a few I/O-thread steps after the
# monitor's event.
_GONE_CHECKS = (0.0, 0.002, 0.01, 0.05, 0.25, 1.0)

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")

DEFAULT_ACK_TIMEOUT = 30.0
"""Seconds a member may hold a message without acking it before it is handed out again."""
DEFAULT_MAX_ATTEMPTS = 5
"""Deliveries without an ack before a message goes to the dead letters."""


@dataclass(slots=True)
class _Entry:
    id: int
    frames: list[bytes]
    attempts: int = 0
    granted: int = 0  # attempts given back by replays of it from the dead letters


@dataclass(slots=True)
class _Member:
    window: int
    last_seen: float
    inflight: dict[int, float] = field(default_factory=dict)  # id -> ack deadline


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message no member acknowledged within ``max_attempts`` deliveries."""

    frames: list[bytes]
    attempts: int
    reason: str  # the last attempt's fate: "nack", "ack_timeout" or "member_lost"


class ReliableCore:
    """The bookkeeping of one at-least-once pool, with no I/O (``now`` passed in)."""

    def __init__(
        self,
        *,
        max_pending: int = 10_000,
        max_attempts: int = 5,
        ack_timeout: float = 30.0,
        member_timeout: float = 6.0,
        dead_letter_max: int = 1000,
        max_window: int = 1000,
    ) -> None:
        if min(max_pending, max_attempts, dead_letter_max, max_window) < 1:
            raise ConfigError("max_pending, max_attempts, dead_letter_max and max_window >= 1")
        if ack_timeout <= 0 or member_timeout <= 0:
            raise ConfigError("ack_timeout and member_timeout must be positive")
        self.max_pending = max_pending
        self.max_attempts = max_attempts
        self.ack_timeout = ack_timeout
        self.member_timeout = member_timeout
        self.max_window = max_window
        self._next_id = 1
        self._queue: deque[_Entry] = deque()
        self._inflight: dict[int, tuple[_Entry, bytes]] = {}  # id -> (entry, member)
        self._members: dict[bytes, _Member] = {}
        self._rotation: deque[bytes] = deque()
        self.dead: deque[DeadLetter] = deque(maxlen=dead_letter_max)
        self.counters: dict[str, int] = dict.fromkeys(
            ("accepted", "delivered", "redelivered", "acked", "nacked", "ack_timeouts",
             "members_lost", "dead_lettered", "dead_letters_evicted", "overflow",
             "unknown_acks", "refused", "dead_letters_replayed", "dead_letters_purged",
             "dead_letter_requests_refused"), 0)

    # -- input ---------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        return len(self._queue) + len(self._inflight)

    def offer(self, frames: list[bytes]) -> bool:
        """Queue one message from the pool's subscription; False (counted) when full."""
        if self.pending >= self.max_pending:
            self.counters["overflow"] += 1
            return False
        self._queue.append(_Entry(self._next_id, frames))
        self._next_id += 1
        self.counters["accepted"] += 1
        return True

    # -- members -------------------------------------------------------------------------

    def known(self, member: bytes) -> bool:
        return member in self._members

    def members(self) -> list[bytes]:
        return list(self._members)

    def hello(self, member: bytes, window: int, now: float) -> None:
        state = self._members.get(member)
        if state is None:
            self._members[member] = _Member(min(window, self.max_window), now)
            self._rotation.append(member)
        else:
            state.window, state.last_seen = min(window, self.max_window), now

    def credit(self, member: bytes, window: int, now: float) -> None:
        state = self._members[member]
        state.window, state.last_seen = min(window, self.max_window), now

    def seen(self, member: bytes, now: float) -> None:
        self._members[member].last_seen = now

    def _settle(self, member: bytes, ids: list[int], now: float) -> Iterator[int]:
        """The ids of ``ids`` that ``member`` really holds, taken off its in-flight list."""
        state = self._members[member]
        state.last_seen = now
        for i in ids:
            held = self._inflight.get(i)
            if held is None or held[1] != member:
                # Settled after its ack timeout (it went to someone else) or after a restart.
                self.counters["unknown_acks"] += 1
                continue
            del state.inflight[i]
            yield i

    def ack(self, member: bytes, ids: list[int], now: float) -> None:
        for i in self._settle(member, ids, now):
            del self._inflight[i]
            self.counters["acked"] += 1

    def nack(self, member: bytes, ids: list[int], now: float) -> None:
        for i in self._settle(member, ids, now):
            self.counters["nacked"] += 1
            self._retry(i, "nack")

    def remove(self, member: bytes, reason: str = "member_lost") -> None:
        """A member said BYE, timed out, or cannot be reached: its in-flight go back."""
        state = self._members.pop(member, None)
        if state is None:
            return
        self._rotation.remove(member)
        if reason == "member_lost":
            self.counters["members_lost"] += 1
        # Front of the queue, in their original order: they are the oldest.
        for i in sorted(state.inflight, reverse=True):
            self._retry(i, "member_lost")

    def _retry(self, i: int, reason: str) -> None:
        entry, _ = self._inflight.pop(i)
        if entry.attempts >= self.max_attempts + entry.granted:
            if len(self.dead) == self.dead.maxlen:
                self.counters["dead_letters_evicted"] += 1
            self.dead.append(DeadLetter(entry.frames, entry.attempts, reason))
            self.counters["dead_lettered"] += 1
        else:
            self._queue.appendleft(entry)

    # -- dead letters --------------------------------------------------------------------

    @property
    def dead_base(self) -> int:
        """The position of the oldest dead letter held: every one that ever left the front
        (evicted, replayed or purged) moved it on, so positions never change meaning."""
        c = self.counters
        return c["dead_letters_evicted"] + c["dead_letters_replayed"] + c["dead_letters_purged"]

    def take_dead(self, before: int | None, limit: int, *, replay: bool) -> dict[str, Any]:
        """Replay (back to the queue's end, with ``max_attempts`` more attempts) or purge
        the oldest dead letters, those at positions below ``before`` (None: every one held
        now), at most ``limit``. A replay stops when the queue is full (``max_pending``):
        what it could not take stays a dead letter, and ``full`` says so."""
        moved, full = 0, False
        counter = "dead_letters_replayed" if replay else "dead_letters_purged"
        while moved < limit and self.dead and (before is None or self.dead_base < before):
            if replay and self.pending >= self.max_pending:
                full = True
                break
            dead = self.dead.popleft()
            self.counters[counter] += 1
            moved += 1
            if replay:
                # Its attempt count goes on (a member sees attempt > 1: a redelivery, which
                # its replay guard lets through), with max_attempts more before it dies again.
                self._queue.append(_Entry(self._next_id, dead.frames, dead.attempts,
                                          dead.attempts))
                self._next_id += 1
        base = self.dead_base
        return {"replayed" if replay else "purged": moved, "next": base,
                "end": base + len(self.dead), "held": len(self.dead), "full": full}

    # -- time and distribution -----------------------------------------------------------

    def tick(self, now: float) -> list[bytes]:
        """Expire ack deadlines and silent members; returns the members removed."""
        lost = [m for m, s in self._members.items() if now - s.last_seen > self.member_timeout]
        for member in lost:
            self.remove(member)
        for state in self._members.values():
            expired = [i for i, deadline in state.inflight.items() if deadline <= now]
            for i in expired:
                del state.inflight[i]
                self.counters["ack_timeouts"] += 1
                self._retry(i, "ack_timeout")
        return lost

    def dispatch(self, now: float) -> Iterator[tuple[bytes, int, int, list[bytes]]]:
        """(member, id, attempt, frames) for each message a member has credit for.

        Round robin over members with credit; stops when the queue or the credit runs out.
        """
        while self._queue:
            for _ in range(len(self._rotation)):
                member = self._rotation[0]
                self._rotation.rotate(-1)
                state = self._members[member]
                if len(state.inflight) < state.window:
                    break
            else:
                return
            entry = self._queue.popleft()
            entry.attempts += 1
            self.counters["delivered"] += 1
            if entry.attempts > 1:
                self.counters["redelivered"] += 1
            state.inflight[entry.id] = now + self.ack_timeout
            self._inflight[entry.id] = (entry, member)
            yield member, entry.id, entry.attempts, entry.frames

    def snapshot(self) -> dict[str, Any]:
        return {
            **self.counters,
            "queued": len(self._queue),
            "in_flight": len(self._inflight),
            "members": {m.hex(): {"window": s.window, "in_flight": len(s.inflight)}
                        for m, s in self._members.items()},
            "dead_letters": len(self.dead),
        }


class ReliablePool:
    """One at-least-once pool: a thread with the pool's SUB and its members' ROUTER.

    >>> pool = ReliablePool("billing", ["notifications/compute.#"], endpoints, settings, ctx)
    >>> pool.start(); ...; pool.stats(); pool.dead_letters(); pool.stop()
    """

    def __init__(
        self,
        name: str,
        bindings: list[str],
        endpoints: Endpoints,
        settings: Settings,
        ctx: zmq.Context[Any],
        *,
        ack_timeout: float = DEFAULT_ACK_TIMEOUT,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        max_pending: int | None = None,
        dead_letter_max: int = 1000,
        on_failure: Callable[[str, BaseException], None] | None = None,
    ) -> None:
        self.name = validate_name(name, "pool name")
        if not bindings:
            raise ConfigError("a pool needs one or more bindings 'exchange/pattern'")
        self.prefixes = minimal_prefixes(TopicPattern.parse(b) for b in bindings)
        self.endpoints = endpoints
        self.settings = settings
        self.endpoint = reliable_endpoint(endpoints, self.name)
        self._ctx = ctx
        self.core = ReliableCore(
            max_pending=max_pending or settings.pool_hwm, max_attempts=max_attempts,
            ack_timeout=ack_timeout, member_timeout=settings.heartbeat_timeout,
            dead_letter_max=dead_letter_max,
        )
        self.run_id = os.urandom(8)
        self._lock = threading.Lock()  # guards core against stats()/dead_letters() readers
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        # Told when the loop ends on an error: the proxy exits rather than keep a pool that
        # takes nothing (proxy/_guard.py).
        self._on_failure = on_failure
        self._thread = threading.Thread(target=self._run, name=f"zbus-rpool-{name}", daemon=True)

    def start(self, timeout: float = 10.0) -> ReliablePool:
        """Start the thread; returns once the pool's subscription is live at the origin."""
        start_thread(self._thread, self._ready, lambda: self._error,
                     f"reliable pool {self.name}", timeout)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"name": self.name, "run": self.run_id.hex(), **self.core.snapshot()}

    def dead_letters(self) -> list[DeadLetter]:
        """The dead letters held (oldest first); they stay until evicted by newer ones."""
        with self._lock:
            return list(self.core.dead)

    def dead_letter_page(self, start: int = 0, limit: int = 100,
                         max_bytes: int = 512 * 1024) -> dict[str, Any]:
        """Dead letters from absolute position ``start`` on (0 is the first ever dead-lettered;
        evicted ones are skipped), at most ``limit`` of them and about ``max_bytes`` of frames.

        Positions stay valid while newer dead letters evict older ones, so a reader pages with
        ``next`` and never sees one twice. A dead letter whose frames alone exceed
        ``max_bytes`` comes back without them (``frames`` empty, ``size`` set), so that one
        huge message cannot stop the rest from being read.
        """
        with self._lock:
            evicted = self.core.counters["dead_letters_evicted"]
            base = self.core.dead_base
            begin = max(start - base, 0)
            held = len(self.core.dead)
            out: list[dict[str, Any]] = []
            used = 0
            i = begin
            while i < held and len(out) < limit:
                dead = self.core.dead[i]
                size = sum(len(f) for f in dead.frames)
                if out and used + size > max_bytes:
                    break
                entry: dict[str, Any] = {"position": base + i, "attempts": dead.attempts,
                                         "reason": dead.reason, "size": size}
                if size > max_bytes:
                    entry["frames"] = []
                    entry["truncated"] = True
                else:
                    entry["frames"] = list(dead.frames)
                    used += size
                out.append(entry)
                i += 1
            return {"dead_letters": out, "next": base + i, "more": i < held,
                    "evicted": evicted}

    def take_dead_letters(self, before: int | None, limit: int, *,
                          replay: bool) -> dict[str, Any]:
        """:meth:`ReliableCore.take_dead` under the pool's lock (the control thread asks)."""
        with self._lock:
            return self.core.take_dead(before, limit, replay=replay)

    def refused_request(self) -> None:
        """Count a dead-letter request for this pool that was refused (a field out of
        bounds or of the wrong type)."""
        with self._lock:
            self.core.counters["dead_letter_requests_refused"] += 1

    # -- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        s = self.settings
        socks: list[zmq.Socket[Any]] = []
        try:
            sub = make_socket(self._ctx, zmq.SUB, s, rcvhwm=s.subscriber_hwm,
                              sndhwm=1000 + 2 * len(self.prefixes),
                              connect=self.endpoints.origin)
            socks.append(sub)
            for prefix in self.prefixes:
                sub.subscribe(prefix)
            router = make_socket(self._ctx, zmq.ROUTER, s, bind=self.endpoint)
            socks.append(router)
            # Sending to a member that is gone raises instead of dropping in silence.
            router.setsockopt(zmq.ROUTER_MANDATORY, 1)
            # libzmq reports a closed connection to the monitor attached at that moment,
            # whenever it was made: none is missed, even one made before this line.
            address = f"inproc://zbus-rpool-{self.name}-{os.urandom(8).hex()}"
            router.monitor(address, zmq.EVENT_DISCONNECTED)
            closed = self._ctx.socket(zmq.PAIR)
            socks.insert(0, closed)
            closed.setsockopt(zmq.LINGER, 0)
            closed.connect(address)
            self._probe(sub)
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._ready.set()
            for sock in socks:
                sock.close(linger=0)
            return
        self._ready.set()
        try:
            self._loop(sub, router, closed)
        except zmq.ContextTerminated:
            pass
        except Exception as exc:
            log.exception("reliable pool %s stopped on an error", self.name)
            if self._on_failure is not None:
                self._on_failure(f"zbus-rpool-{self.name}", exc)
        finally:
            with contextlib.suppress(zmq.ZMQError):
                router.disable_monitor()
            for sock in socks:
                sock.close(linger=0)

    def _probe(self, sub: zmq.Socket[Any]) -> None:
        token = CONTROL_PREFIX + b"probe/rpool-" + os.urandom(8).hex().encode()
        sub.subscribe(token)
        sender = make_socket(self._ctx, zmq.PUSH, self.settings, connect=self.endpoints.ingress)
        try:
            wait_for_probe(sub, sender, token, 10.0, self._offer, "reliable pool subscription")
        finally:
            sender.close(linger=0)
            sub.unsubscribe(token)

    def _offer(self, frames: list[bytes]) -> None:
        if len(frames) == 3:  # anything else is not a message; the members judge the rest
            with self._lock:
                self.core.offer(frames)

    def _loop(self, sub: zmq.Socket[Any], router: zmq.Socket[Any],
              closed: zmq.Socket[Any]) -> None:
        poller = zmq.Poller()
        poller.register(sub, zmq.POLLIN)
        poller.register(router, zmq.POLLIN)
        poller.register(closed, zmq.POLLIN)
        next_tick = 0.0
        checks: list[float] = []  # when to look for members whose connection is gone
        while not self._stopping.is_set():
            wait = 50 if not checks else max(0, int((checks[0] - time.monotonic()) * 1000) + 1)
            events = dict(poller.poll(min(wait, 50)))
            now = time.monotonic()
            if closed in events:
                while closed.poll(0):
                    closed.recv_multipart()  # only DISCONNECTED is asked for
                checks = sorted({*checks, *(now + delay for delay in _GONE_CHECKS)})
            with self._lock:
                if sub in events:
                    # Bounded batch: members' acks must not starve behind a busy stream.
                    for _ in range(1000):
                        try:
                            frames = sub.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        if len(frames) == 3:
                            self.core.offer(frames)
                read_all = True
                if router in events:
                    for _ in range(1000):
                        try:
                            frames = router.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._member_said(router, frames, now)
                    else:
                        read_all = False
                # What a dead member said before it died (its last acks) is read first.
                if checks and now >= checks[0] and read_all:
                    checks = [t for t in checks if t > now]
                    self._find_gone(router)
                if now >= next_tick:
                    self.core.tick(now)
                    next_tick = now + 0.05
                for member, i, attempt, msg in list(self.core.dispatch(now)):
                    if not self.core.known(member):
                        continue  # removed by a failed send earlier in this batch
                    try:
                        router.send_multipart(
                            [member, b"MSG", _U64.pack(i), _U32.pack(attempt), *msg],
                            zmq.NOBLOCK,
                        )
                    except zmq.ZMQError:  # EHOSTUNREACH: gone; EAGAIN: not reading
                        self.core.remove(member)

    def _find_gone(self, router: zmq.Socket[Any]) -> None:
        """Remove the members whose connection is gone: a send to each tells."""
        for member in self.core.members():
            try:
                router.send_multipart([member, b"WELCOME", self.run_id], zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                if exc.errno == zmq.EHOSTUNREACH:
                    self.core.remove(member)
                # EAGAIN: its queue is full, so it is there (and not reading just now)

    def _member_said(self, router: zmq.Socket[Any], frames: list[bytes], now: float) -> None:
        core = self.core
        if len(frames) < 2:
            core.counters["refused"] += 1
            return
        member, verb, args = frames[0], frames[1], frames[2:]
        try:
            if verb == b"HELLO" and len(args) == 1 and len(args[0]) == 4:
                core.hello(member, _U32.unpack(args[0])[0], now)
                router.send_multipart([member, b"WELCOME", self.run_id], zmq.NOBLOCK)
                return
            if not core.known(member):
                # A member of a previous run of this pool (proxy restarted), or one we
                # timed out: it must say HELLO again before it gets anything.
                if verb != b"BYE":
                    router.send_multipart([member, b"WHO"], zmq.NOBLOCK)
                return
            if verb == b"CREDIT" and len(args) == 1 and len(args[0]) == 4:
                window = _U32.unpack(args[0])[0]
                core.credit(member, window, now)
                # Everything this member will get under the old window was sent before this.
                router.send_multipart([member, b"CREDITED", args[0]], zmq.NOBLOCK)
            elif verb in (b"ACK", b"NACK") and args and all(len(a) == 8 for a in args):
                ids = [_U64.unpack(a)[0] for a in args]
                (core.ack if verb == b"ACK" else core.nack)(member, ids, now)
            elif verb == b"PING" and not args:
                core.seen(member, now)
            elif verb == b"BYE" and not args:
                core.remove(member, "bye")
            else:
                core.counters["refused"] += 1
        except zmq.ZMQError:
            core.remove(member)
