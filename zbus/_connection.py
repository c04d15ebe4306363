"""The threads backend: the reference edge over the sans-I/O core, on plain pyzmq.

Thread-safety: a :class:`Connection` publishes from the thread that first sent on it (it
raises if another thread tries); each :class:`Subscriber` and :class:`PoolMember` owns its
socket and must be used from one thread (``stop()`` alone may be called from anywhere).
Make one Connection per thread that publishes; they share the process's ZeroMQ context.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import os
import signal
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn, cast

import msgpack
import zmq

from . import _transport
from ._control import ControlClient, encode_request, missing_proxy, wait_for_peers
from ._dispatch import ConsumerCore, ConsumerStats, Delivery, Dispatcher, StreamTally
from ._errors import ConfigError, ProxyError, Timeout, TransportError, ZbusError
from ._keeper import Keeper, Kept
from ._keys import KeyRing
from ._link import CHECK_EVERY, ConsumerLink, Linked, LinkStats
from ._message import Announcer, Message, MessageFactory, OpenBatch, OutgoingMessage, signing
from ._names import CONTROL_PREFIX, validate_exchange, validate_name
from ._repair import RepairAsker, envelope_head
from ._replay import ReplayGuard
from ._settings import Endpoints, Settings, check_private_dir, default_run_dir
from ._transport import abandon, context, make_socket, recv_frames, wait_for_probe

if TYPE_CHECKING:
    from ._reliable import ReliableMember

__all__ = [
    "Connection",
    "Exchange",
    "LinkStats",
    "PoolMember",
    "Publisher",
    "RetryPolicy",
    "Router",
    "Subscriber",
]

log = logging.getLogger("zbus")

_SNDMORE = int(zmq.SNDMORE)
# A fast-pool member reports its receipts to the proxy at most this often (seconds), or
# after this many messages, whichever comes first (docs/RELIABILITY.md).
RECEIPTS_INTERVAL = 0.5
RECEIPTS_EVERY = 1000
# At most this many streams' books in one report (the rest go in the next ones), and at
# most this many reports queued at once for a final report's streams.
RECEIPTS_STREAMS = 1000
_FINAL_REPORTS = 4


_FIRST = int(zmq.SNDMORE | zmq.NOBLOCK)
_NOBLOCK = int(zmq.NOBLOCK)
_REPAIR_POLL = 0.02
"""Seconds a subscriber with open gaps waits on its data before it looks at repairs."""


def _send(sock: zmq.Socket[Any], frames: list[bytes]) -> None:
    """send_multipart without its per-frame type checks and enum flags (half the cost).

    ZeroMQ queues a multipart message atomically (the high-water mark counts whole messages),
    so only the first frame can find the queue full: it is tried without waiting, and if it
    must wait, send_multipart does the waiting (honouring SNDTIMEO, green sockets included).
    Nothing is ever half sent.
    """
    send = sock.send
    last = len(frames) - 1
    try:
        send(frames[0], _FIRST if last else _NOBLOCK)
    except zmq.Again:
        sock.send_multipart(frames)
        return
    for frame in frames[1:last]:
        send(frame, _SNDMORE)
    if last:
        send(frames[last])


BUSY_GAP = 50e-6
"""Seconds: a publisher that sends again sooner than this after its last send is *busy*,
and its messages of one topic are gathered into one envelope (smart batching) until the
batch is full or the flusher takes it; one that sends less often sends each message alone,
at once. 50 us is 20,000 messages a second from one connection."""
SMALL_BATCH = 4
CALM = 0.005
"""A batch of fewer than ``SMALL_BATCH`` messages that the flusher had to send cost a thread
wake-up (~10-15 us) to save less than that: the sender was pacing itself (sleeping between
sends), not busy. Its connection then sends each message alone for ``CALM`` seconds."""
MAX_BATCH = 1024
"""Messages in one batch at most, whatever their size (``Settings.batch_bytes`` bounds
the bytes)."""


class _Flusher:
    """The process's thread that sends what busy connections gathered, as soon as it can run
    (Aeron's and the LMAX disruptor's *smart batching*): no timer. While the publishing
    thread keeps the interpreter busy, its batch grows until full and goes inline; once it
    pauses (waits, sleeps, does I/O), this thread takes the batch at once.

    It never waits on a connection: it sends without blocking, and takes a connection's lock
    only if free (its owner, holding it, asks again when it lets go). A batch the proxy does
    not take now is tried again every ``RETRY`` seconds (the only timer, on that path alone).
    """

    RETRY = 0.05

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._due: deque[Connection] = deque()
        self._later: list[tuple[float, Connection]] = []
        self._thread: threading.Thread | None = None

    def want(self, conn: Connection, later: bool = False) -> None:
        with self._cond:
            if later:
                self._later.append((time.monotonic() + self.RETRY, conn))
            else:
                self._due.append(conn)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="zbus-flusher",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._due:
                    if self._later:
                        now = time.monotonic()
                        due = [c for t, c in self._later if t <= now]
                        if due:
                            self._later = [(t, c) for t, c in self._later if t > now]
                            self._due.extend(due)
                            break
                        self._cond.wait(min(t for t, _ in self._later) - now)
                    else:
                        self._cond.wait()
                conn = self._due.popleft()
            try:
                conn._flush_in_background()
            except Exception:  # never end the thread: other connections rely on it
                log.exception("zbus: sending a gathered batch failed")


_flusher = _Flusher()


def _new_flusher_after_fork() -> None:
    # The parent's flusher thread does not exist in a child (and its lock may be held).
    global _flusher
    _flusher = _Flusher()


os.register_at_fork(after_in_child=_new_flusher_after_fork)


# Connections with a publishing socket, closed (flushed) at interpreter exit.
_publishing: weakref.WeakSet[Connection] = weakref.WeakSet()


def _close_at_exit() -> None:
    me = threading.get_ident()
    for conn in list(_publishing):
        if conn._forks != _transport.forks or conn._owner != me:
            continue  # another process's, or a thread's that cannot be flushed from here
        try:
            conn.close()
        except Exception:  # exiting: say it, never hide the exit's own cause
            log.exception("zbus: closing a Connection at exit failed")


atexit.register(_close_at_exit)


def exit_on_sigterm() -> None:
    """Let SIGTERM end this process as ``sys.exit`` does, so that open Connections close at
    exit (flushing within ``linger``, counting what they could not deliver, leaving their
    streams' beacons with the proxy) instead of dying with their queues.

    Python's default SIGTERM action kills the process at once, and no library code runs:
    call this early in the main thread of a program that has no SIGTERM handler of its own
    (a framework that handles SIGTERM, such as oslo.service, exits through ``sys.exit``
    already). A handler already installed is left as it is.
    """
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit_on_signal)


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


# Which backends' connections each backend's objects work over. The eventlet backend is the
# threads API on cooperative sockets: its Exchange, Publisher and Router are the threads
# ones, and its join_reliable_pool gives the threads ReliableMember; only its consumers need
# its Connection (they hand deliveries to green threads).
_WORKS_OVER = {
    "zbus": ("zbus", "zbus.eventlet"),
    "zbus.eventlet": ("zbus.eventlet",),
    "zbus.asyncio": ("zbus.asyncio",),
}


def check_backend(obj: Any, arg: Any) -> None:
    """Refuse, in ``obj``'s constructor, ``arg`` (a connection or an exchange) of a backend
    ``obj`` does not work over. Unchecked, a zbus.Publisher over a zbus.asyncio connection
    makes coroutines nobody awaits (nothing sent, no error) and a zbus.asyncio one over a
    zbus.Connection fails at its first await, after sending. ``arg`` without a ``_backend``
    (a duck-typed stand-in) is taken as it is."""
    mine: str = obj._backend
    theirs = getattr(arg, "_backend", None)
    if not isinstance(theirs, str) or theirs in _WORKS_OVER[mine]:
        return
    # The public class (an application's Router subclass is named by the class it extends).
    public = next(c.__name__ for c in type(obj).__mro__
                  if c.__module__.startswith("zbus") and not c.__name__.startswith("_"))
    if hasattr(sys.modules.get(theirs), public):
        advice = f"use {theirs}.{public} with a {theirs}.Connection"
    else:
        advice = f"{theirs} has no {public}"
    raise ConfigError(
        f"{mine}.{public} does not work over a {theirs}.Connection: {advice} (or "
        f"{mine}.{public} with a {mine}.Connection)"
    )


def check_exchange(publisher: Any, exchange: Any) -> None:
    """A Publisher's first argument is an exchange of its backend."""
    if not hasattr(exchange, "connection") or not hasattr(exchange, "name"):
        given = getattr(exchange, "_backend", type(exchange).__module__)
        raise ConfigError(
            f"{publisher._backend}.Publisher takes an exchange, not a {given}."
            f"{type(exchange).__name__}: Publisher(conn.exchange(\"metering\"), factory)"
        )
    check_backend(publisher, exchange)


def _eventlet_patched() -> bool:
    """True in a process where ``eventlet.monkey_patch()`` ran. Never imports eventlet: a
    process that has not imported it has not patched anything."""
    patcher = sys.modules.get("eventlet.patcher")
    if patcher is None:
        return False
    try:
        return any(patcher.is_monkey_patched(name) for name in ("thread", "socket", "select"))
    except Exception:  # an eventlet without this API: nothing to say
        return False


def refuse_pickling(conn: object) -> NoReturn:
    """What ``pickle`` (a Process's arguments under spawn or forkserver, a multiprocessing
    queue) meets in a connection or anything holding one (a Publisher, a consumer)."""
    name = f"{getattr(conn, '_backend', 'zbus')}.Connection"
    raise ZbusError(
        f"a {name} cannot be pickled (for a spawned process, a multiprocessing queue): its "
        f"ZeroMQ sockets belong to this process; create a Connection in the child instead, "
        f"{name}(run_dir), and a Publisher on it there"
    )


class Connection:
    """The sockets one thread uses to reach its host's zbus-proxy (no global state).

    ``run_dir`` is the proxy's run directory (default: :func:`zbus.default_run_dir`). The
    first send on a run directory with no zbus-proxy (none, a file, no proxy socket in it)
    raises ProxyError, so that a typo is not taken for a connection whose messages then
    vanish at ``close()``; once it has sent, a connection outlives its proxy's restarts.
    ``require_proxy=False`` skips the check, for a process that may start before its proxy:
    it sends into its own queue (``publish_hwm`` messages) until the proxy is up.

    After ``fork()`` (``multiprocessing``'s fork start method included), the child's first
    use makes its own context and socket; the parent's are left untouched (a ``context``
    passed in belongs to the parent too: the child uses its own process context). A
    Connection cannot be pickled (a spawned process makes its own), nor be made in an
    eventlet monkey-patched process (use ``zbus.eventlet.Connection``): both raise at once.
    """

    _backend: ClassVar[str] = "zbus"

    def __init__(
        self,
        run_dir: str | os.PathLike[str] | None = None,
        *,
        settings: Settings | None = None,
        context: zmq.Context[Any] | None = None,
        require_proxy: bool = True,
    ) -> None:
        if self._backend == "zbus" and _eventlet_patched():
            # Its waits are libzmq's (poll, send, the control REQ): under monkey_patch()
            # they would block the hub, and with it every green thread, in silence.
            raise ConfigError(
                "this process is eventlet monkey-patched: a zbus.Connection would block the "
                "eventlet hub (every green thread) while it waits in ZeroMQ; use "
                "zbus.eventlet.Connection, the same API on cooperative sockets"
            )
        self.endpoints = Endpoints(Path(run_dir) if run_dir is not None else default_run_dir())
        self._check_proxy = require_proxy  # until the first send finds one
        self.settings = settings or Settings()
        self._base_ctx = context
        self._ctx: zmq.Context[Any] | None = None
        self._push: zmq.Socket[Any] | None = None
        self._owner: int | None = None
        self._unflushed = False
        self._closed = False
        self._forks = _transport.forks  # the process the context and socket belong to
        self._announcer = Announcer()
        self._keeper: Keeper | None = None  # this process's keeper for this proxy ...
        self._kept: Kept | None = None  # ... and this connection's part: what it sent
        self._since_flush = 0  # messages sent since the last confirmed flush
        self.unconfirmed_at_close = 0
        """Messages the proxy had not confirmed taking when :meth:`close` gave up (0 when
        the close flushed everything): what this connection may have dropped."""
        # Smart batching (Settings.batch_bytes): the batch being gathered, what it is for,
        # and the lock the flusher and this thread take around it and the socket.
        self._batch: OpenBatch | None = None
        self._batch_lock = self._new_lock()
        self._batch_limit = min(self.settings.batch_bytes, self.settings.max_message_bytes)
        self._last_submit = 0.0
        self._calm_until = 0.0  # until then, each message alone (SMALL_BATCH)
        self._flush_asked = False
        self.unsent = 0
        """Messages ``send`` took into a batch that :meth:`close` could not send within
        ``linger`` (dropped with a warning, counted lost by subscribers from the streams'
        beacons)."""
        self.envelopes_sent = 0
        """Envelopes (three-frame sets) sent: fewer than messages when batches went out."""
        self.messages_sent = 0

    def _new_lock(self) -> Any:
        return threading.Lock()

    def _want_flush(self, later: bool = False) -> None:
        """Have the gathered batch sent as soon as something else can run (``later``: after
        a short wait, the proxy having taken nothing just now)."""
        _flusher.want(self, later)

    def submit(self, factory: MessageFactory, exchange: str, routing_key: str,
               obj: Message | Any, message_type: str | None = None,
               version: int | None = None) -> None:
        """Sign and send ``obj`` (what Exchange, Publisher and Router call): alone and at
        once when this connection is idle; gathered with the messages of the same stream
        that follow it when it is busy (``BUSY_GAP``), the batch sent when full
        (``Settings.batch_bytes``), when another stream's message comes, or as soon as the
        sending thread lets the flusher run. Raises Timeout, as an unbatched send does, when
        the proxy takes nothing for ``send_timeout``: this message is then not sent, and
        what was gathered before it stays to go with the next send, flush or close."""
        now = time.perf_counter()
        busy = now - self._last_submit < BUSY_GAP and now >= self._calm_until
        self._last_submit = now
        if self._batch is None and (not busy or not self._batch_limit):
            self.publish(factory, factory.frames(exchange, routing_key, obj,
                                                 message_type=message_type, version=version))
            return
        self._gather(factory, exchange, routing_key, obj, message_type, version)

    def _gather(self, factory: MessageFactory, exchange: str, routing_key: str,
                obj: Message | Any, message_type: str | None, version: int | None) -> None:
        limit = self._batch_limit
        if self._push is None or self._forks != _transport.forks:
            self._publish_socket()  # here, in the owning thread: it checks for a proxy
        self._check_owner()
        if self._keeps and self._kept is None:
            self._start_keeper()
        try:
            with self._batch_lock:
                batch = self._batch
                if batch is not None and not batch.of(factory, exchange, routing_key):
                    self._send_batch()  # another stream's: it goes first
                    batch = None
                packed = factory.pack(routing_key, obj, message_type=message_type,
                                      version=version)
                if batch is not None and batch.parts and batch.size + len(packed) > limit:
                    self._send_batch()  # full: a batch never goes past the limit
                    batch = None
                if batch is None:
                    batch = self._batch = factory.open_batch(exchange, routing_key)
                batch.add(packed)
                if batch.size >= limit or len(batch) >= MAX_BATCH:
                    try:
                        self._send_batch()
                    except Timeout:
                        batch.drop_last()  # this message: the caller is told it was not sent
                        raise
                self._announce(factory)
        finally:
            # Asked after letting go of the lock: a flusher that found it held has given up.
            if self._batch is not None and not self._flush_asked:
                self._flush_asked = True
                self._want_flush()

    def submit_many(self, factory: MessageFactory, exchange: str, routing_key: str,
                    objs: Sequence[Message | Any]) -> None:
        """Sign and send every one of ``objs`` in order, in as few envelopes as
        ``Settings.batch_bytes`` allows (each message alone when it is 0); they are sent
        when this returns. On Timeout, the messages before the one that failed were taken,
        and go with the next send, flush or close."""
        if not self._batch_limit:
            self.publish_many(factory, [factory.frames(exchange, routing_key, obj)
                                        for obj in objs])
            return
        for obj in objs:
            self._gather(factory, exchange, routing_key, obj, None, None)
        self._flush_gathered()

    def _send_batch(self, wait: bool = True) -> bool:
        """Seal and send the gathered batch (the caller holds the batch lock). Waiting, a
        batch the proxy does not take within ``send_timeout`` raises Timeout; not waiting,
        False. Either way it stays gathered: nothing taken by send() is dropped here."""
        batch, sock = self._batch, self._push
        if batch is None or sock is None:
            return True
        if not batch.parts:
            self._batch = None
            return True
        frames = batch.seal()
        try:
            if wait:
                _send(sock, frames)
            else:
                sock.send_multipart(frames, _NOBLOCK)
        except zmq.Again:
            if not wait:
                return False
            raise Timeout(
                f"the proxy at {self.endpoints.run_dir} took no message for "
                f"{self.settings.send_timeout:g}s (queue full at publish_hwm="
                f"{self.settings.publish_hwm}, or zbus-proxy not running); the message was "
                f"not sent ({len(batch)} gathered before it wait for the next send, flush "
                "or close)") from None
        self._batch = None
        self._unflushed = True
        self._since_flush += len(batch)
        self.envelopes_sent += 1
        self.messages_sent += len(batch)
        if self._kept is not None:
            self._kept.keep(time.monotonic(), batch.stream.stream_id, batch.first, len(batch),
                            frames)
        return True

    def _flush_in_background(self) -> None:
        """The flusher's turn: send the batch if the owner is not using the connection."""
        self._flush_asked = False
        lock = self._batch_lock
        if self._batch is None or not lock.acquire(blocking=False):
            return  # nothing, or the owner holds it and asks again when it lets go
        try:
            count = len(self._batch) if self._batch is not None else SMALL_BATCH
            if self._closed or self._forks != _transport.forks or self._send_batch(wait=False):
                if count < SMALL_BATCH:
                    self._calm_until = time.perf_counter() + CALM
                return
        finally:
            lock.release()
        self._flush_asked = True
        self._want_flush(later=True)

    def _flush_gathered(self) -> None:
        """From the owning thread: send the batch being gathered now (raises Timeout)."""
        if self._batch is not None:
            with self._batch_lock:
                self._send_batch()

    @property
    def ctx(self) -> zmq.Context[Any]:
        if self._forks != _transport.forks:
            self._leave_parent()
        if self._ctx is None:
            self._ctx = self._new_context()
        return self._ctx

    def __reduce__(self) -> NoReturn:
        refuse_pickling(self)

    def _new_context(self) -> zmq.Context[Any]:
        return self._base_ctx or context()

    def _leave_parent(self) -> None:
        """In a forked child: forget the parent's socket and context without touching them
        (zbus._transport.abandon says why); the next use makes this process's own. What the
        parent had queued is the parent's to deliver, not the child's."""
        abandon(self._push, self._ctx, self._base_ctx)
        self._push = self._ctx = self._base_ctx = None
        self._keeper = self._kept = None  # the parent's thread: not in this process
        self._owner = None
        self._unflushed = False
        self._since_flush = 0
        self._batch = None  # the parent's to send, not the child's
        self._batch_lock = self._new_lock()
        self._flush_asked = False
        self._forks = _transport.forks

    @property
    def control(self) -> ControlClient:
        return ControlClient(self.endpoints, self.settings, self.ctx)

    def _publish_socket(self) -> zmq.Socket[Any]:
        if self._closed:
            raise TransportError("this Connection is closed")
        if self._check_proxy:
            cause = missing_proxy(self.endpoints)
            if cause is not None:
                raise ProxyError(f"nothing sent: {cause} (to send before it starts, make the "
                                 "Connection with require_proxy=False)")
            self._check_proxy = False
        sock = make_socket(
            self.ctx, zmq.PUSH, self.settings,
            sndhwm=self.settings.publish_hwm, connect=self.endpoints.ingress,
        )
        sock.setsockopt(zmq.SNDTIMEO, int(self.settings.send_timeout * 1000))
        self._push = sock
        self._owner = threading.get_ident()
        _publishing.add(self)
        return sock

    def _check_owner(self) -> None:
        if self._owner != threading.get_ident():
            raise ZbusError(
                "this Connection publishes from another thread; ZeroMQ sockets are not "
                "thread-safe: make one Connection per publishing thread"
            )

    def send_frames(self, frames: list[bytes]) -> None:
        """Send already-signed frames (from :meth:`MessageFactory.frames`) to the proxy."""
        sock = self._push
        if sock is None or self._forks != _transport.forks:
            sock = self._publish_socket()
        self._check_owner()
        self._unflushed = True
        try:
            _send(sock, frames)
            self._since_flush += 1
            self.envelopes_sent += 1
            self.messages_sent += 1
        except zmq.Again:
            raise Timeout(
                f"the proxy at {self.endpoints.run_dir} took no message for "
                f"{self.settings.send_timeout:g}s (queue full at publish_hwm="
                f"{self.settings.publish_hwm}, or zbus-proxy not running); the message was not sent"
            ) from None

    def send_many(self, batch: list[list[bytes]]) -> None:
        """Send several already-signed messages in one call (same errors as send_frames;
        on Timeout, the messages before the one that timed out were sent)."""
        self._send_many(batch)
        self._since_flush += len(batch)

    def _send_many(self, batch: list[list[bytes]]) -> None:
        if not batch:
            return
        sock = self._push
        if sock is None or self._forks != _transport.forks:
            sock = self._publish_socket()
        self._check_owner()
        self._unflushed = True
        for frames in batch:
            try:
                _send(sock, frames)
            except zmq.Again:
                self.send_frames(frames)  # raises the same Timeout, with its explanation
            self.envelopes_sent += 1
            self.messages_sent += 1

    def publish(self, factory: MessageFactory, frames: list[bytes]) -> None:
        """Send ``frames`` made by ``factory``; the connection then also announces the
        factory's streams once they go idle, and on flush and close (their beacons:
        docs/RELIABILITY.md, "Beacons"). Exchange, Publisher and Router send this way.
        If the send fails (``Timeout``, or an interrupt such as ``SystemExit`` from a signal),
        the message's number is given back, so that consumers do not count it lost."""
        try:
            self.send_frames(frames)
        except BaseException:
            factory.withdraw()
            raise
        if self._keeps:
            kept = self._kept or self._start_keeper()
            if kept is not None:
                kept.keep_sent(factory, frames)
        self._announce(factory)

    def publish_many(self, factory: MessageFactory, batch: list[list[bytes]]) -> None:
        """:meth:`publish` for several messages of ``factory`` (as :meth:`send_many`)."""
        self.send_many(batch)
        if self._keeps:
            kept = self._kept or self._start_keeper()
            if kept is not None:
                now = time.monotonic()
                for frames in batch:
                    kept.keep(now, *envelope_head(frames[1]), frames)
        self._announce(factory)

    _keeps = True
    """Whether this connection still keeps what it sends for repairs (false once its
    settings say repair is off; docs/RELIABILITY.md, "Repair")."""

    def _start_keeper(self) -> Kept | None:
        if not self.settings.repair.on:
            self._keeps = False  # this connection's settings say off: never ask again
            return None
        context, thread = self._keeper_runs_on()
        self._keeper, self._kept = Keeper.attach(
            context, self.settings, self.endpoints, self._announcer.factories, thread)
        return self._kept

    def _keeper_runs_on(self) -> tuple[zmq.Context[Any], type[threading.Thread]]:
        """The context the keeper makes its socket in, and its thread class."""
        return self.ctx, threading.Thread

    @property
    def keeper_stats(self) -> dict[str, int] | None:
        """What this connection keeps for repairs and answered (None: repair is off)."""
        return None if self._kept is None else self._kept.stats()

    def _announce(self, factory: MessageFactory) -> None:
        due = self._announcer.after(factory, time.monotonic())
        if due:
            self._send_beacons(due)

    def _send_beacons(self, beacons: Sequence[list[bytes]]) -> None:
        """Send beacons on the data path without ever waiting: a full queue (the proxy not
        taking) drops them here, and the copies left with the proxy stand in for them."""
        sock = self._push
        assert sock is not None
        for frames in beacons:
            try:
                sock.send_multipart(frames, _NOBLOCK)
            except zmq.Again:
                return

    def _hand_over(self, beacons: list[list[bytes]], timeout: float) -> None:
        """Leave ``beacons`` with the proxy, which publishes them again after this
        connection is gone (a subscriber still behind then learns its lost tail). A proxy
        that does not answer (hung, restarting) finds them in its run directory later."""
        for start in range(0, len(beacons), _BEACONS_PER_FILE):
            chunk = beacons[start:start + _BEACONS_PER_FILE]
            try:
                self.control.request("beacons", timeout, beacons=chunk)
            except ZbusError as exc:
                log.debug("zbus: the proxy did not take %d beacons (%s): leaving them in %s",
                          len(beacons) - start, exc, self.endpoints.beacons_dir)
                leave_beacons(self.endpoints.beacons_dir, beacons[start:])
                return

    def flush(self, timeout: float = 10.0) -> None:
        """Return once everything sent on this Connection has passed through the proxy.

        A probe goes out on the publishing socket, behind the queued messages, and comes back
        through the proxy's delivery plane; one path in order, so when it is back, everything
        before it was handed to every consumer's queue at the proxy. Raises Timeout.
        """
        if self._forks != _transport.forks:
            self._leave_parent()
        if self._push is None:
            return
        self._check_owner()
        self._flush_gathered()
        if not self._unflushed:
            return
        # The streams' beacons go behind their messages, ahead of the probe.
        self._send_beacons(self._announcer.all())
        token = CONTROL_PREFIX + b"flush/" + os.urandom(8).hex().encode()
        sub = make_socket(self.ctx, zmq.SUB, self.settings, connect=self.endpoints.deliver)
        try:
            sub.subscribe(token)
            wait_for_probe(sub, self._push, token, timeout, lambda frames: None, "flush")
        finally:
            sub.close(linger=0)
        self._unflushed = False
        self._since_flush = 0

    def exchange(self, name: str) -> Exchange:
        return Exchange(name, self)

    def subscribe(self, dispatcher: Dispatcher, keys: bytes | KeyRing) -> Subscriber:
        """A fan-out subscriber for every pattern bound in ``dispatcher``."""
        return Subscriber(self, dispatcher, keys)

    def join_pool(self, pool: str, dispatcher: Dispatcher, keys: bytes | KeyRing) -> PoolMember:
        """Become a member of worker pool ``pool`` bound to ``dispatcher``'s patterns."""
        return PoolMember(self, pool, dispatcher, keys)

    def join_reliable_pool(
        self, pool: str, dispatcher: Dispatcher, keys: bytes | KeyRing, *, window: int = 10
    ) -> ReliableMember:
        """Become a member of at-least-once pool ``pool`` (docs/RELIABILITY.md): at most
        ``window`` envelopes in flight (a batch is one), each acked once its messages'
        handlers returned."""
        from ._reliable import ReliableMember  # it builds on this module

        return ReliableMember(self, pool, dispatcher, keys, window=window)

    def declare_pool(self, pool: str, bindings: list[str], timeout: float = 5.0) -> None:
        """Declare ``pool`` at the proxy with ``bindings`` (``"exchange/pattern"`` strings).

        Idempotent; a pool declared with other bindings is refused (ProxyError). Returns once
        the pool's subscription is live at the proxy: later messages are kept for it.
        """
        self.control.request("declare_pool", timeout, name=validate_name(pool, "pool name"),
                             bindings=sorted(bindings))

    def declare_reliable_pool(self, pool: str, bindings: list[str], timeout: float = 5.0,
                              **options: Any) -> bool:
        """Declare at-least-once pool ``pool`` at the proxy with ``bindings``
        (docs/RELIABILITY.md); True when this call created it.

        ``options``: ``ack_timeout`` (seconds a member may hold a message un-acked) and
        ``max_attempts`` (deliveries before a message is dead-lettered). Idempotent; other
        bindings, an option given with another value, or a fast pool of that name are
        refused (ProxyError). Returns once the pool's component takes messages; the
        declaration survives a proxy restart.
        """
        reply = self.control.request(
            "declare_reliable_pool", timeout, name=validate_name(pool, "pool name"),
            bindings=sorted(bindings), **options,
        )
        return bool(reply.get("created"))

    def dead_letters(self, pool: str, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The dead letters at-least-once pool ``pool`` holds, oldest first: each a dict with
        ``frames`` (the message's three frames, exactly as published: verify and decode them
        like any message), ``attempts``, ``reason`` (the last attempt's fate: ``nack``,
        ``ack_timeout`` or ``member_lost``), ``position`` and ``size``. Read in pages; one
        whose frames are too large for a reply has ``frames`` empty and ``truncated`` set.
        They stay at the proxy (bounded, oldest evicted) until it restarts.
        """
        name = validate_name(pool, "pool name")
        out: list[dict[str, Any]] = []
        start = 0
        while True:
            reply = self.control.request("dead_letters", timeout, name=name, start=start)
            out.extend(reply["dead_letters"])
            if not reply.get("more") or reply["next"] <= start:
                return out
            start = reply["next"]

    def proxy_stats(self, timeout: float = 5.0) -> dict[str, Any]:
        return self.control.request("stats", timeout)

    def close(self) -> None:
        """Flush for up to ``settings.linger`` seconds, then close; what is still queued then
        is dropped, with a warning (libzmq's own linger cannot be relied on: the process's
        shared context is usually never terminated, so its queue dies with the process)."""
        if self._closed:
            return
        self._closed = True
        if self._forks != _transport.forks:
            self._leave_parent()
        if self._push is None:
            return
        linger = self.settings.linger
        if self._owner == threading.get_ident():
            self._close_gathered(linger)
            flushed = True
            if self._unflushed and linger > 0:
                try:
                    self.flush(linger)
                except Timeout:
                    flushed = False
            # Left with the proxy only now: when flushed, the messages they announce have
            # passed it, so a beacon published again never overtakes its own messages; when
            # not, whatever of them is lost, subscribers count exactly from these.
            self._hand_over(self._announcer.final(), min(max(linger, 0.1), 1.0))
            if not flushed:
                self.unconfirmed_at_close = self._since_flush
                log.warning(
                    "zbus: closing a Connection to %s: %d messages sent since the last "
                    "confirmed flush were not confirmed by the proxy within linger=%gs and "
                    "are dropped if still queued here; subscribers count those lost from the "
                    "streams' beacons", self.endpoints.run_dir, self._since_flush, linger,
                )
        self._push.close(linger=0)
        self._push = None
        _publishing.discard(self)
        if self._keeper is not None and self._kept is not None:
            self._keeper.detach(self._kept)  # never waits: the keeper goes on for others
            self._keeper = self._kept = None

    def _close_gathered(self, linger: float) -> None:
        """Send what was gathered, waiting at most ``linger``; else drop it, counted in
        :attr:`unsent`. Its numbers stay taken, so the streams' beacons make subscribers
        count it lost, as they count what dies in the socket's queue."""
        batch = self._batch
        if batch is None or self._push is None:
            return
        self._push.setsockopt(zmq.SNDTIMEO, int(linger * 1000))
        with self._batch_lock:
            try:
                self._send_batch()
            except Timeout:
                self.unsent += len(batch)
                self._batch = None
                log.warning("zbus: closing a Connection to %s: %d messages gathered into a "
                            "batch were not taken by the proxy within linger=%gs and are "
                            "dropped (Connection.unsent)", self.endpoints.run_dir, len(batch),
                            linger)

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_BEACONS_PER_FILE = 1000


def leave_beacons(directory: Path, beacons: list[list[bytes]]) -> bool:
    """Write ``beacons`` to new files in the proxy's ``directory`` for it to publish later
    (proxy/_beacons.py reads them); False when the directory is missing or not safely ours
    (another user's, or writable by others: then nothing is written)."""
    try:
        os.lstat(directory)  # missing: no proxy made it, nobody would read the files
        check_private_dir(directory, "beacons directory")  # the run directory's own rule
    except (OSError, ConfigError):
        return False
    for start in range(0, len(beacons), _BEACONS_PER_FILE):
        path = directory / f"{os.getpid()}-{os.urandom(6).hex()}.beacons"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except OSError:
            return False
        with os.fdopen(fd, "wb") as out:
            out.write(msgpack.packb(beacons[start:start + _BEACONS_PER_FILE]))
    return True


@dataclass(frozen=True)
class RetryPolicy:
    """How a :class:`Publisher` or :class:`Router` retries a send the proxy did not take
    (kombu's ``retry_policy``): a ``Timeout`` (the proxy took nothing for
    ``Settings.send_timeout``: its queue is full, or it is down or restarting) or a
    ``ProxyError`` of a connection's first send (no proxy at the run directory yet).

    Waits ``interval_start`` seconds before the first retry, ``interval_step`` more before
    each next one, never more than ``interval_max``; gives up after ``max_retries`` retries
    (None: never) and raises the last error. Each retry signs the message again under the
    same sequence number (a failed send gives its number back), so consumers see neither a
    gap nor a duplicate. ``retry=True`` means ``RetryPolicy()``: up to 3 retries after
    0, 1 and 2 s (each also waits up to ``send_timeout`` when the queue is full).
    """

    max_retries: int | None = 3
    interval_start: float = 0.0
    interval_step: float = 1.0
    interval_max: float = 5.0

    def __post_init__(self) -> None:
        if self.max_retries is not None and (
                not isinstance(self.max_retries, int) or isinstance(self.max_retries, bool)
                or self.max_retries < 0):
            raise ConfigError(f"RetryPolicy.max_retries must be an int >= 0 or None (retry "
                              f"forever), not {self.max_retries!r}")
        for name in ("interval_start", "interval_step", "interval_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not 0 <= value < float("inf"):
                raise ConfigError(f"RetryPolicy.{name} must be a finite number of seconds "
                                  f">= 0, not {value!r}")

    def intervals(self) -> Iterator[float]:
        """The wait before each retry, in order (endless when ``max_retries`` is None)."""
        wait = float(self.interval_start)
        for _ in itertools.count() if self.max_retries is None else range(self.max_retries):
            yield min(wait, self.interval_max)
            wait += self.interval_step


def _policy(retry: RetryPolicy | bool | None) -> RetryPolicy | None:
    if retry is None or retry is False:
        return None
    if retry is True:
        return RetryPolicy()
    if not isinstance(retry, RetryPolicy):
        raise ConfigError(f"retry is a zbus.RetryPolicy, True (the default policy) or "
                          f"False/None (no retry), not {type(retry).__name__}")
    return retry


def _sleeper(connection: Any) -> Callable[[float], None]:
    """How a retry waits on ``connection``'s backend: a green sleep for zbus.eventlet (a
    plain one would stop every green thread with the hub), else time.sleep."""
    if getattr(connection, "_backend", None) == "zbus.eventlet":
        import eventlet  # only in a process that made a zbus.eventlet.Connection

        return cast(Callable[[float], None], eventlet.sleep)
    return time.sleep


class _Retrying:
    """Sends with a retry policy; counts the retries made (``retries``)."""

    retry: RetryPolicy | None
    retries: int

    def _send_retrying(self, connection: Any, retry: RetryPolicy | bool | None,
                       send: Callable[[], None]) -> None:
        policy = self.retry if retry is None else _policy(retry)
        if policy is None:
            send()
            return
        waits = policy.intervals()
        while True:
            try:
                send()
                return
            except (Timeout, ProxyError) as exc:  # a ProxyError here: no proxy there yet
                wait = next(waits, None)
                if wait is None:
                    raise
                self.retries += 1
                log.warning("zbus: send not taken (%s); retry %d in %gs", exc, self.retries,
                            wait)
                _sleeper(connection)(wait)


def _publish(connection: Any, factory: MessageFactory, exchange: str, routing_key: str,
             obj: Message | Any) -> None:
    """Send ``obj`` on ``connection``, signed by ``factory`` (a message from
    ``create_message`` names its own): smart-batched where the connection does it
    (``Connection.submit``), else signed alone (a duck-typed stand-in's ``publish``)."""
    factory, body, mtype, version = signing(factory, obj)
    submit = getattr(connection, "submit", None)
    if submit is not None:
        submit(factory, exchange, routing_key, body, mtype, version)
    else:
        connection.publish(factory, factory.frames(exchange, routing_key, body,
                                                   message_type=mtype, version=version))


class Exchange:
    """A message class (``compute``, ``network``, ``notifications``) on one connection."""

    _backend: ClassVar[str] = "zbus"

    def __init__(self, name: str, connection: Connection) -> None:
        check_backend(self, connection)
        self.name = validate_exchange(name)
        self.connection = connection

    def send(self, routing_key: str, obj: Message | Any,
             factory: MessageFactory | None = None) -> None:
        """Publish ``obj`` under ``routing_key``, signed by ``factory``; a message made by
        ``factory.create_message(obj)`` carries its factory, so ``send(routing_key, m)``."""
        if isinstance(obj, OutgoingMessage):
            if factory is not None and factory is not obj.factory:
                raise ConfigError("this message was created by another MessageFactory than "
                                  "the one given: send it without a factory")
            factory = obj.factory
        elif factory is None:
            raise ConfigError(
                "Exchange.send needs the factory that signs: e.send(routing_key, obj, "
                "factory), or a message made by factory.create_message(obj)")
        _publish(self.connection, factory, self.name, routing_key, obj)

    def __repr__(self) -> str:
        return f"Exchange({self.name!r})"


class Publisher(_Retrying):
    """Sends messages signed by ``factory`` to ``exchange``.

    ``retry``: a :class:`RetryPolicy` (or True for the default one) applied to every
    :meth:`send` and :meth:`publish` that does not give its own; None (default) or False:
    a send the proxy does not take raises at once. :meth:`send_many` never retries (the
    messages before the one that failed were sent: retrying all would send them twice).
    """

    _backend: ClassVar[str] = "zbus"

    def __init__(self, exchange: Exchange, factory: MessageFactory, *,
                 retry: RetryPolicy | bool | None = None) -> None:
        check_exchange(self, exchange)
        self.exchange = exchange
        self.factory = factory
        self.retry = _policy(retry)
        self.retries = 0
        """Retries made so far (each a send the proxy did not take, tried again)."""

    def send(self, routing_key: str, obj: Message | Any, *, exchange: str | None = None,
             retry: RetryPolicy | bool | None = None) -> None:
        """Publish ``obj`` under ``routing_key`` (on another ``exchange`` when given);
        ``retry`` overrides the publisher's policy for this send (False: none)."""
        name = self.exchange.name if exchange is None else exchange
        connection = self.exchange.connection

        def send() -> None:
            _publish(connection, self.factory, name, routing_key, obj)

        self._send_retrying(connection, retry, send)

    def send_many(self, routing_key: str, objs: list[Any], *, exchange: str | None = None) -> None:
        """Publish each of ``objs`` under ``routing_key``, in order, as few signed envelopes
        as ``Settings.batch_bytes`` allows (consumers deliver them one by one); they are
        sent when this returns."""
        name = self.exchange.name if exchange is None else exchange
        connection = self.exchange.connection
        submit_many = getattr(connection, "submit_many", None)
        if submit_many is not None:
            submit_many(self.factory, name, routing_key, objs)
            return
        frames = self.factory.frames
        connection.publish_many(self.factory, [frames(name, routing_key, obj) for obj in objs])

    def publish(self, message: Message, *, retry: RetryPolicy | bool | None = None) -> None:
        """Publish a :class:`Message` under its own message type as the routing key."""
        self.send(message.message_type, message, retry=retry)


class Router(_Retrying):
    """Base class for applications that want named send methods, in one of two forms.

    ``Router(publisher)``: ``send(routing_key, message)`` publishes on the publisher's
    exchange, signed by its factory, with its retry policy (the straw man's form)::

        class MeteringRouter(Router):
            def send_meter_message(self, meter: MeterMessage) -> None:
                self.send("metering", meter)   # routing key "metering"

    ``Router(connection, factory)``: ``send(exchange, message, routing_key=None)``
    publishes on ``exchange``, the routing key defaulting to the message's type. The same
    subclass thus sends ``"metering"`` as a routing key in the first form and as an exchange
    in the second: ``router.exchange`` is the publisher's exchange, or None in the second.
    """

    _backend: ClassVar[str] = "zbus"

    def __init__(self, connection: Connection | Publisher,
                 factory: MessageFactory | None = None, *,
                 retry: RetryPolicy | bool | None = None) -> None:
        self.publisher: Publisher | None = None
        self.exchange: Exchange | None = None
        self.retries = 0
        if isinstance(connection, Publisher):
            check_backend(self, connection)
            if factory is not None and factory is not connection.factory:
                raise ConfigError("Router(publisher) signs with the publisher's factory: "
                                  "give no other")
            self.publisher = connection
            self.exchange = connection.exchange
            self.connection = connection.exchange.connection
            self.factory = connection.factory
            self.retry = connection.retry if retry is None else _policy(retry)
            return
        check_backend(self, connection)
        if factory is None:
            raise ConfigError("a Router takes a Publisher, Router(publisher), or a "
                              "connection and the factory that signs, Router(conn, factory)")
        self.connection = connection
        self.factory = factory
        self.retry = _policy(retry)

    def send(self, target: str, obj: Message | Any, routing_key: str | None = None, *,
             retry: RetryPolicy | bool | None = None) -> None:
        """``Router(publisher)``: publish ``obj`` under routing key ``target`` on the
        publisher's exchange. ``Router(connection, factory)``: publish on exchange
        ``target`` under ``routing_key``, which defaults to the message's type."""
        if self.exchange is not None:
            if routing_key is not None:
                raise ConfigError(
                    f"this Router sends on its publisher's exchange {self.exchange.name!r}: "
                    f"send(routing_key, message), here send({target!r}, message)")
            exchange, routing_key = self.exchange.name, target
        else:
            exchange = target
            if routing_key is None:
                body = obj.body if isinstance(obj, OutgoingMessage) else obj
                if not isinstance(body, Message):
                    raise ConfigError("a plain payload needs an explicit routing_key")
                routing_key = body.message_type
        connection, key = self.connection, routing_key

        def send() -> None:
            _publish(connection, self.factory, exchange, key, obj)

        before = self.retries
        self._send_retrying(connection, retry, send)
        if self.publisher is not None:
            self.publisher.retries += self.retries - before


def service_repair(asker: RepairAsker, sock: zmq.Socket[Any] | None,
                   make: Callable[[], zmq.Socket[Any]]) -> zmq.Socket[Any] | None:
    """One turn of a subscriber's repair wire (every backend's; never waits): tick the book,
    send what it asks on ``sock`` (made by ``make`` at the first request), take the answers
    in. Returns the socket, to be closed with the subscriber."""
    requests = asker.due(time.monotonic())
    if requests:
        if sock is None:
            sock = make()
        for frames in requests:
            try:
                sock.send_multipart(frames, _NOBLOCK)
            except zmq.Again:
                break  # the proxy is not taking: asked again after ``retry``
    if sock is not None:
        for _ in range(64):
            try:
                answer = sock.recv_multipart(_NOBLOCK)
            except zmq.Again:
                break
            asker.take(answer)
    return sock


class _Consumer:
    """The handler loop shared by every consumer (threads backend); each kind of consumer
    brings its socket and :meth:`receive`."""

    _sock: zmq.Socket[Any]
    _backend: ClassVar[str] = "zbus"

    def __init__(self, connection: Connection, dispatcher: Dispatcher, keys: bytes | KeyRing,
                 *, track_sequences: bool, repair: bool = False) -> None:
        check_backend(self, connection)
        self.connection = connection
        self.core = ConsumerCore(dispatcher, keys, track_sequences=track_sequences,
                                 replay=ReplayGuard(connection.settings.replay),
                                 repair=connection.settings.repair if repair else None)
        self._repair_sock: zmq.Socket[Any] | None = None
        self._asker = None if self.core.book is None else RepairAsker(
            self.core, connection.settings.max_message_bytes)
        self._pending: deque[list[bytes]] = deque()
        self._stop = threading.Event()
        self._forks = _transport.forks  # a consumer's sockets never work in a forked child

    def _check_process(self) -> None:
        if self._forks != _transport.forks:
            raise TransportError(
                f"this {type(self).__name__} was made before fork(): its socket belongs to the "
                f"parent process and cannot receive here; make consumers in the process that "
                f"uses them (in the child, after the fork)"
            )

    @property
    def stats(self) -> ConsumerStats:
        return self.core.stats

    def receive(self, timeout: float | None = None) -> Delivery | None:
        """The next verified, matching delivery (handlers not run), or None after ``timeout``.

        Rejected and unmatched messages are counted and skipped.
        """
        raise NotImplementedError

    def process(self, timeout: float | None = None) -> bool:
        """Receive one delivery and run its handlers; False when ``timeout`` passed first."""
        delivery = self.receive(timeout)
        if delivery is None:
            return False
        self.core.run_handlers(delivery)
        return True

    def run(self, *, max_messages: int | None = None, idle_timeout: float | None = None) -> int:
        """Dispatch until :meth:`stop`, ``max_messages`` deliveries, or ``idle_timeout``."""
        handled = 0
        self._stop.clear()
        while not self._stop.is_set() and (max_messages is None or handled < max_messages):
            step = 0.1 if idle_timeout is None else min(0.1, idle_timeout)
            idle_since = time.monotonic()
            while not self.process(step):
                if self._stop.is_set():
                    return handled
                if idle_timeout is not None and time.monotonic() - idle_since >= idle_timeout:
                    return handled
            handled += 1
        return handled

    def stop(self) -> None:
        """Make :meth:`run` return after the message in hand (callable from any thread)."""
        self._stop.set()

    def counters(self) -> dict[str, Any]:
        """Every counter this consumer keeps, as one plain map (for logs and ``zbus stats``)."""
        return self.stats.as_dict()

    def _drain_marker(self) -> bytes:
        return CONTROL_PREFIX + b"drain/" + os.urandom(8).hex().encode()

    # -- repair (zbus._repair; a subscriber with gaps asks its proxy's repair plane) -----

    def _service_repair(self) -> None:
        """Send the core's requests, take the answers in, and give up or ask again when
        due: called by the receive loop while repair is on."""
        if self._asker is not None:
            conn = self.connection
            self._repair_sock = service_repair(
                self._asker, self._repair_sock,
                lambda: make_socket(conn.ctx, zmq.DEALER, conn.settings,
                                    connect=conn.endpoints.repair))

    def close(self) -> None:
        if self._forks != _transport.forks:
            return  # the parent's socket: not this process's to close (_transport.abandon)
        if self._repair_sock is not None:
            self._repair_sock.close(linger=0)
        self._sock.close(linger=0)

    def __enter__(self: Any) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _LinkedConsumer(_Consumer, Linked):
    """A consumer whose socket its link to the proxy looks after (zbus._link)."""

    def __init__(self, connection: Connection, dispatcher: Dispatcher, keys: bytes | KeyRing,
                 *, track_sequences: bool, kind: int, endpoint: str,
                 repair: bool = False) -> None:
        super().__init__(connection, dispatcher, keys, track_sequences=track_sequences,
                         repair=repair)
        ctx, settings = connection.ctx, connection.settings
        self._link = ConsumerLink(
            lambda kind, **options: make_socket(ctx, kind, settings, **options),
            ctx, settings, self._pending,
            kind=kind, endpoint=endpoint, ingress=connection.endpoints.ingress,
            prefixes=self.core.prefixes() if kind == zmq.SUB else None,
        )
        self._sock = self._link.sock
        self._since_check = 0

    def receive(self, timeout: float | None = None) -> Delivery | None:
        """The next verified, matching delivery (handlers not run), or None after ``timeout``.

        Rejected and unmatched messages are counted and skipped. The wait also looks after
        the link to the proxy (zbus._link), at least every 0.25 s.
        """
        if self.core.ready:  # the rest of a batch comes first
            return self.core.ready.popleft()
        deadline = None if timeout is None else time.monotonic() + timeout
        book = self.core.book
        while True:
            wait = None if deadline is None else deadline - time.monotonic()
            if book is not None and (len(book) or self._repair_sock is not None):
                self._service_repair()
                if self.core.ready:  # repaired, or released from behind a gap
                    return self.core.ready.popleft()
                if len(book):  # gaps open: look at the answers often
                    wait = _REPAIR_POLL if wait is None else min(wait, _REPAIR_POLL)
            frames = self._read(wait)
            if frames is not None:
                delivery = self.core.accept(frames)
                if delivery is not None:
                    return delivery
            if deadline is not None and time.monotonic() >= deadline:
                return None

    def _read(self, wait: float | None) -> list[bytes] | None:
        """The next message from the socket, waiting at most ``wait`` seconds (None: as long
        as the link allows before its next look), or None; the link's probes are taken out
        here."""
        if self._forks != _transport.forks:
            self._check_process()
        if self._pending:
            return self._pending.popleft()
        self._since_check += 1
        if self._since_check >= CHECK_EVERY:
            self._check_link()
        try:  # a message already waiting costs no poll
            frames = recv_frames(self._sock)
        except zmq.Again:
            self._check_link()
            if wait is not None and wait <= 0:
                return None
            most = self._link.max_wait() if wait is None else min(wait, self._link.max_wait())
            if not self._sock.poll(max(1, int(most * 1000))):
                return None
            frames = recv_frames(self._sock)  # readable: a whole message is there
        if len(frames) == 1 and self._link.took_probe(frames[0]):
            return None
        return frames

    def _check_link(self) -> None:
        self._since_check = 0
        if self._link.check():
            self._sock = self._link.sock
            self._replaced()

    def _replaced(self) -> None:
        """Called once :attr:`_sock` is a new socket (see zbus._link)."""

    def counters(self) -> dict[str, Any]:
        return {**super().counters(), "link": self.link.as_dict(), "live": self.live}

    def close(self) -> None:
        if self._forks != _transport.forks:
            return  # the parent's sockets: not this process's to close (_transport.abandon)
        self._link.close()
        super().close()


class Subscriber(_LinkedConsumer):
    """Fan-out: receives its own copy of every message matching the dispatcher's patterns.

    The subscriber watches its connection to the proxy (zbus._link): when the proxy
    restarts, libzmq reconnects and re-sends the subscriptions by itself; when libzmq gives
    the connection up (a frame above ``max_message_bytes``), the subscriber connects a new
    socket. Either way it re-probes the path to know when the subscriptions are live again
    (:attr:`live`, :attr:`link`). What was published meanwhile is counted as ``stats.lost``
    once a later message from the same publisher arrives.
    """

    def __init__(
        self, connection: Connection, dispatcher: Dispatcher, keys: bytes | KeyRing
    ) -> None:
        if not dispatcher.patterns:
            raise ConfigError("the dispatcher has no bindings: bind a handler before subscribing")
        super().__init__(
            connection, dispatcher, keys, track_sequences=True, repair=True,
            kind=zmq.SUB, endpoint=connection.endpoints.deliver,
        )

    def ready(self, timeout: float = 10.0) -> None:
        """Return once the subscription is live at this host's proxy and at every peer proxy
        that answers: nothing published after this returns, on any host, is lost to the
        slow-joiner effect. Raises Timeout."""
        self._check_process()
        deadline = time.monotonic() + timeout
        token = CONTROL_PREFIX + b"probe/" + os.urandom(8).hex().encode()
        self._sock.subscribe(token)
        conn = self.connection
        push = make_socket(conn.ctx, zmq.PUSH, conn.settings, connect=conn.endpoints.ingress)
        try:
            wait_for_probe(self._sock, push, token, timeout, self._pending.append, "subscription")
        finally:
            push.close(linger=0)
            self._sock.unsubscribe(token)
        # Live locally; a single-host proxy answers "no peers" at once.
        left = max(0.1, deadline - time.monotonic())
        wait_for_peers(conn.endpoints, conn.settings, conn.ctx, left)

    def _run_ready(self) -> int:
        """Run the handlers of every delivery accepted and not yet handled; how many."""
        handled = 0
        while (delivery := self.core.next_ready()) is not None:
            self.core.run_handlers(delivery)
            handled += 1
        return handled

    def drain(self, timeout: float = 10.0) -> int:
        """Run the handlers of every message that reached the proxy before this call, then
        close; returns how many were handled.

        A marker goes through the proxy behind them (one path, in order): once it is back,
        everything before it has been handled. The subscriptions stay until then, because a
        SUB also filters what it has already queued: unsubscribing first would discard it.
        What arrives after the marker is not taken (closed with the socket). Raises Timeout
        (after closing) when the marker is not back within ``timeout``.
        """
        self._check_process()
        deadline = time.monotonic() + timeout
        marker = self._drain_marker()
        self._sock.subscribe(marker)
        conn = self.connection
        push = make_socket(conn.ctx, zmq.PUSH, conn.settings, connect=conn.endpoints.ingress)
        handled = 0
        done = False
        try:
            handled += self._run_ready()
            while self._pending:
                self.core.feed(self._pending.popleft())
                handled += self._run_ready()
            interval, resend = 0.005, 0.0
            while not done and (left := deadline - time.monotonic()) > 0:
                if time.monotonic() >= resend:
                    with contextlib.suppress(zmq.Again):
                        push.send(marker, zmq.NOBLOCK)
                    resend = time.monotonic() + interval
                    interval = min(interval * 2, 0.2)
                if not self._sock.poll(max(1, int(min(left, interval) * 1000))):
                    continue
                frames = self._sock.recv_multipart()
                if len(frames) == 1 and frames[0] == marker:
                    done = True
                    break
                self.core.feed(frames)
                handled += self._run_ready()
            # Gaps still open (repair on): what waits behind them reached the proxy before
            # this call too, so it is handed on once they are repaired or given up.
            book = self.core.book
            while done and book is not None and len(book) and time.monotonic() < deadline:
                self._service_repair()
                handled += self._run_ready()
                if len(book) and self._repair_sock is not None:
                    self._repair_sock.poll(int(_REPAIR_POLL * 1000))  # answers come here
        finally:
            push.close(linger=0)
            self.close()
        if not done:
            raise Timeout(
                f"drain: the proxy did not confirm the end of this subscription within "
                f"{timeout:g}s ({handled} messages handled); what had not arrived is lost"
            )
        return handled



class ReceiptsReporter:
    """A fast-pool member's receipts reports to its proxy (docs/RELIABILITY.md), shared by
    the backends: fire-and-forget sends on a DEALER that only ever uses NOBLOCK (so an
    asyncio member can call it too), at most every ``RECEIPTS_INTERVAL`` seconds or
    ``RECEIPTS_EVERY`` messages; the caller decides when to wait for the replies. With a
    ``tally``, each report also carries the books of up to ``RECEIPTS_STREAMS`` streams
    changed since the last one (field ``streams``, always present, so the proxy knows this
    member keeps them)."""

    def __init__(self, pool: str, endpoints: Endpoints, settings: Settings,
                 ctx: zmq.Context[Any], tally: StreamTally | None = None) -> None:
        self.pool = pool
        self.tally = tally
        self.member_id = os.urandom(8).hex()
        self._endpoints = endpoints
        self._settings = settings
        self._ctx = ctx
        self._sock: zmq.Socket[Any] | None = None  # DEALER on the proxy's control socket
        self._unanswered = 0  # reports whose reply has not been read yet
        self._sent = 0  # frames in the last report tried
        self._reported = 0  # frames in the last report queued
        self._reported_at = time.monotonic()
        self._reconnects = 0  # the member link's count when the books last all went

    @property
    def started(self) -> bool:
        return self._sock is not None

    def after_outage(self, reconnects: int) -> None:
        """Called with the member link's ``reconnects`` before each look at :meth:`due_in`:
        after the proxy came back (perhaps restarted, its books forgotten), every stream's
        books go again, or another member's fresh report would make this one's share of
        a stream look lost."""
        if reconnects != self._reconnects:
            self._reconnects = reconnects
            if self.tally is not None:
                self.tally.mark_all()

    def due_in(self, frames: int, now: float) -> float | None:
        """Seconds until a report is due (0: now) after ``frames`` read in all, or None."""
        if frames == self._reported and not (self.tally is not None and self.tally.changed):
            return None
        if frames - self._sent >= 3 * RECEIPTS_EVERY:
            return 0.0
        return max(0.0, self._reported_at + RECEIPTS_INTERVAL - now)

    def report(self, received: int, frames: int, now: float, final: bool = False) -> bool:
        """Queue one report of the cumulative ``received`` (3-frame messages) and ``frames``
        (every frame read) without waiting (False when the proxy is not taking them: the
        next report carries the same cumulative counts, and the streams go again). A final
        report sends the streams still changed first, in up to ``_FINAL_REPORTS`` reports."""
        sock = self._sock
        if sock is None:
            # REP at the other end: a DEALER speaks to it with an empty delimiter frame,
            # and never has to wait for a reply before the next request.
            sock = self._sock = make_socket(self._ctx, zmq.DEALER, self._settings, sndhwm=8,
                                            connect=self._endpoints.control)
        self.read_replies()
        self._sent = frames
        self._reported_at = now
        tally = self.tally
        reports = 1
        if final and tally is not None:
            reports = max(1, min(_FINAL_REPORTS, -(-tally.changed // RECEIPTS_STREAMS)))
        for n in range(reports):
            fields: dict[str, Any] = {}
            if tally is not None:
                fields["streams"] = tally.take(RECEIPTS_STREAMS)
            # Only the last one is final: the proxy frees a member's slot on it.
            request = encode_request("pool_receipts", pool=self.pool, member=self.member_id,
                                     received=received, frames=frames,
                                     final=final and n == reports - 1, **fields)
            try:
                sock.send_multipart([b"", request], _NOBLOCK)
            except zmq.Again:
                if tally is not None:
                    tally.mark(fields["streams"])
                return False
            self._unanswered += 1
        self._reported = frames
        return True

    def read_replies(self, timeout: float = 0.0) -> bool:
        """Read the replies that came back (waiting up to ``timeout`` s for the last one);
        True when every report queued so far was answered."""
        sock = self._sock
        deadline = time.monotonic() + timeout
        while sock is not None and self._unanswered:
            try:
                sock.recv_multipart(_NOBLOCK)
            except zmq.Again:
                left = deadline - time.monotonic()
                if left <= 0 or not sock.poll(max(1, int(left * 1000))):
                    return False
                continue
            self._unanswered -= 1
        return True

    def close(self, linger: float = 0.0) -> None:
        """Close the DEALER; ``linger`` lets libzmq send a report still queued."""
        if self._sock is not None:
            self._sock.close(linger=int(linger * 1000))
            self._sock = None


class PoolMember(_LinkedConsumer):
    """A member of a worker pool: each matching message goes to exactly one live member.

    It reports how many messages it read from the pool (its receipts) to its proxy, which
    counts what it handed to members that never reported it (``zbus stats``: ``fast_pools``;
    docs/RELIABILITY.md). Reports are fire-and-forget, at most every ``RECEIPTS_INTERVAL``
    seconds or ``RECEIPTS_EVERY`` messages, from the receive loop; a final one on close.
    """

    def __init__(self, connection: Connection, pool: str, dispatcher: Dispatcher,
                 keys: bytes | KeyRing) -> None:
        if not dispatcher.patterns:
            raise ConfigError("the dispatcher has no bindings: bind a handler before joining")
        self.pool = validate_name(pool, "pool name")
        super().__init__(
            connection, dispatcher, keys, track_sequences=False,
            kind=zmq.PULL, endpoint=connection.endpoints.pool(self.pool),
        )
        settings = connection.settings
        self.abandoned = 0
        """Messages this member had received but dropped unhandled at drain()'s deadline."""
        self.core.tally = StreamTally()
        self._receipts = ReceiptsReporter(self.pool, connection.endpoints, settings,
                                          connection.ctx, self.core.tally)
        self.member_id = self._receipts.member_id
        """The random id this member's receipts are reported under."""
        self._dropped = 0  # 3-frame messages read by drain() and abandoned (receipts too)
        self._dropped_frames = 0  # ... and the frames of every message it abandoned

    @property
    def receipts(self) -> int:
        """Every 3-frame message this member read from the pool socket: accepted, rejected,
        or abandoned by drain() (what the proxy's ``reported`` sums)."""
        return self.core.envelopes + self._dropped

    @property
    def frames_read(self) -> int:
        """Every frame read from the pool socket, whatever the message's shape: what the
        proxy compares with the frames it handed out."""
        return 3 * self.core.envelopes + self.core.odd_frames + self._dropped_frames

    @property
    def bindings(self) -> list[str]:
        return sorted(str(p) for p in self.core.dispatcher.patterns)

    def ready(self, timeout: float = 10.0) -> None:
        """Declare the pool (idempotent) and return once this member is connected to it."""
        self._check_process()
        deadline = time.monotonic() + timeout
        self.connection.declare_pool(self.pool, self.bindings, timeout)
        while not self._link.connected:
            left = deadline - time.monotonic()
            if left <= 0 or not self._link.monitor.poll(int(left * 1000)):
                raise Timeout(f"pool member of {self.pool!r} did not connect within {timeout:g}s")
            self._check_link()

    def receive(self, timeout: float | None = None) -> Delivery | None:
        if self.core.ready:  # the rest of a batch: no frame read since the last look
            return self.core.ready.popleft()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            now = time.monotonic()
            wait = None if deadline is None else max(0.0, deadline - now)
            frames = self.frames_read
            self._receipts.after_outage(self.link.reconnects)
            due = self._receipts.due_in(frames, now)
            if due == 0:
                self._receipts.report(self.receipts, frames, now)
            elif due is not None and (wait is None or due < wait):
                wait = due  # wake up to report even when no message comes
            delivery = super().receive(wait)
            if delivery is not None:
                return delivery
            if deadline is not None and time.monotonic() >= deadline:
                return None

    def report_receipts(self, timeout: float = 1.0) -> bool:
        """Report this member's receipts now and wait up to ``timeout`` s for the proxy to
        take them; True when it did (the receive loop reports by itself: this is for a
        caller that needs the proxy's count current, e.g. before a planned stop)."""
        self._check_process()
        deadline = time.monotonic() + timeout
        reporter, tally = self._receipts, self.core.tally
        reporter.after_outage(self.link.reconnects)
        while True:  # several reports when more streams changed than one carries
            if not (reporter.report(self.receipts, self.frames_read, time.monotonic())
                    and reporter.read_replies(max(0.0, deadline - time.monotonic()))):
                return False
            if tally is None or not tally.changed:
                return True

    def drain(self, timeout: float = 10.0, *, quiet: float = 0.05) -> int:
        """Handle what this member has prefetched until the pool is quiet for ``quiet``
        seconds (or ``timeout`` passes), then close; returns how many were handled.

        The fast path cannot stop the proxy's PUSH from sending to a connected member: what
        reaches this member's pipe after the last receive is lost when it closes (ZeroMQ
        discards a closed pipe; a disconnected PULL drops its prefetch the same way). Such
        messages are counted in :attr:`abandoned` when they were already in this process;
        for a drain that loses nothing, use an at-least-once pool (``zbus.ReliableMember``).
        What never reached this process shows at the proxy as ``unaccounted``.
        """
        deadline = time.monotonic() + timeout
        handled = 0
        try:
            while (left := deadline - time.monotonic()) > 0:
                if not self.process(min(quiet, left)):
                    break
                handled += 1
            # Bounded: a busy pool keeps pushing; what comes after this is never seen here.
            for _ in range(len(self._pending) + self.connection.settings.pool_hwm):
                if not (self._pending or self._sock.poll(0)):
                    break
                frames = (self._pending.popleft() if self._pending
                          else self._sock.recv_multipart())
                self.abandoned += 1
                self._dropped_frames += len(frames)
                if len(frames) == 3:
                    self._dropped += 1
        finally:
            self.close()
        return handled

    def counters(self) -> dict[str, Any]:
        tally = self.core.tally
        return {**super().counters(), "abandoned": self.abandoned,
                "streams": len(tally) if tally is not None else 0,
                "streams_evicted": tally.evicted if tally is not None else 0}

    def close(self) -> None:
        if self._forks != _transport.forks:
            return  # the parent's sockets: not this process's to close (_transport.abandon)
        if not self._sock.closed:
            super().close()  # first: nothing more arrives, so the final count is final
            frames = self.frames_read
            if frames or self._receipts.started:
                # Waited for (briefly): the shared context is rarely terminated, so a
                # report still queued when the process exits would die with it.
                wait = min(self.connection.settings.linger, 1.0)
                if self._receipts.report(self.receipts, frames, time.monotonic(), final=True):
                    self._receipts.read_replies(wait)
        self._receipts.close()
