"""The asyncio backend: the sans-I/O core on ``zmq.asyncio`` sockets.

    >>> import zbus.asyncio
    >>> conn = zbus.asyncio.Connection(run_dir)
    >>> await zbus.asyncio.Publisher(conn.exchange("compute"), factory).send("a.b", {...})
    >>> async with conn.subscribe(dispatcher, key) as sub:
    ...     await sub.ready()
    ...     await sub.run()                      # or: async for delivery in sub: ...

Same wire format and the same :class:`~zbus.ConsumerCore` as the threads backend: messages
cross between backends freely. Only waiting differs, and it is all ``await``.

Invariants a maintainer must keep:

* a socket belongs to the task that uses it; make one :class:`Connection` per publishing
  task (or accept that its sends are serialised on one socket), and never receive on one
  :class:`Subscriber` from two tasks at once;
* handlers may be coroutine functions (awaited) or plain functions (called on the loop, so
  keep them short); a handler that raises is counted by
  :meth:`ConsumerCore.handler_failed` and the loop goes on;
* ``stop()`` makes ``run()``/iteration return after the delivery in hand; ``aclose()`` stops,
  then runs the handlers of everything already read (set aside by ``ready()`` or queued in
  the socket, bounded by the socket's HWM) before closing; ``close()`` drops it;
* cancelling ``run()`` or an ``async for`` over a consumer closes the consumer's socket: a
  cancelled consumer is finished, and leaks nothing. ``ready()`` always closes its probe
  socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import time
from collections import deque
from pathlib import Path
from typing import Any, ClassVar, NoReturn, cast

import zmq
import zmq.asyncio

from . import _transport
from ._connection import (
    _BEACONS_PER_FILE,
    BUSY_GAP,
    CALM,
    MAX_BATCH,
    SMALL_BATCH,
    ReceiptsReporter,
    _Flusher,
    check_backend,
    check_exchange,
    leave_beacons,
    refuse_pickling,
    service_repair,
)
from ._control import decode_reply, encode_request, no_answer, wait_for_peers
from ._dispatch import ConsumerCore, ConsumerStats, Delivery, Dispatcher, StreamTally
from ._errors import ConfigError, Timeout, TransportError, ZbusError
from ._keeper import Keeper, Kept
from ._keys import KeyRing
from ._link import CHECK_EVERY, ConsumerLink, Linked
from ._message import Announcer, Message, MessageFactory, OpenBatch, signing
from ._names import CONTROL_PREFIX, validate_exchange, validate_name
from ._repair import RepairAsker
from ._replay import ReplayGuard
from ._settings import Endpoints, Settings, default_run_dir
from ._transport import abandon, make_socket, recv_frames
from ._transport import context as _process_context

__all__ = ["Connection", "Exchange", "PoolMember", "Publisher", "Router", "Subscriber"]

log = logging.getLogger("zbus")

_REPAIR_POLL = 0.02
_NOBLOCK, _SNDMORE = int(zmq.NOBLOCK), int(zmq.SNDMORE)
_plain_send = zmq.Socket.send
"""Seconds a subscriber with open gaps waits on its data before it looks at repairs."""


class Connection:
    """The sockets one task uses to reach its host's zbus-proxy.

    ``context`` (any pyzmq context; default the process's) is shadowed by a
    ``zmq.asyncio.Context``: asyncio and plain sockets share libzmq's I/O thread.

    After ``fork()``, the child's first use makes its own context and socket, leaving the
    parent's untouched (as :class:`zbus.Connection` does). It cannot be pickled: a spawned
    process makes its own.
    """

    _backend: ClassVar[str] = "zbus.asyncio"

    def __init__(
        self,
        run_dir: str | os.PathLike[str] | None = None,
        *,
        settings: Settings | None = None,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        self.endpoints = Endpoints(Path(run_dir) if run_dir is not None else default_run_dir())
        self.settings = settings or Settings()
        self._base_ctx = context
        self._ctx: zmq.asyncio.Context | None = None
        self._push: zmq.asyncio.Socket | None = None
        self._closed = False
        self._forks = _transport.forks  # the process the context and socket belong to
        self._announcer = Announcer()  # the factories' streams, for their beacons
        self._keeper: Keeper | None = None  # this process's keeper for this proxy ...
        self._kept: Kept | None = None  # ... and this connection's part: what it sent
        # Smart batching (as zbus.Connection): the batch being gathered and what it is for;
        # no lock: one task uses a connection, and the loop's callback never awaits.
        self._batch: OpenBatch | None = None
        self._batch_limit = min(self.settings.batch_bytes, self.settings.max_message_bytes)
        self._flush_scheduled = False
        self._last_submit = 0.0
        self._calm_until = 0.0
        self.unsent = 0
        """Messages gathered into a batch that :meth:`close` could not send (dropped, with a
        warning; subscribers count them lost from the streams' beacons)."""
        self.envelopes_sent = 0
        self.messages_sent = 0

    @property
    def ctx(self) -> zmq.asyncio.Context:
        if self._forks != _transport.forks:
            self._leave_parent()
        if self._ctx is None:
            self._ctx = zmq.asyncio.Context(self._base_ctx or _process_context())
        return self._ctx

    def __reduce__(self) -> NoReturn:
        refuse_pickling(self)

    def _leave_parent(self) -> None:
        """In a forked child: forget the parent's socket and context untouched
        (zbus._transport.abandon says why); the next use makes this process's own."""
        abandon(self._push, self._ctx, self._base_ctx)
        self._push = self._ctx = self._base_ctx = None
        self._keeper = self._kept = None  # the parent's thread: not in this process
        self._batch = None  # the parent's to send
        self._forks = _transport.forks

    def _keep(self, factory: MessageFactory, frames: list[bytes]) -> None:
        """Keep ``frames`` for repairs (docs/RELIABILITY.md, "Repair"): a keeper thread of
        this connection's, an OS thread on plain sockets, so the event loop never waits."""
        kept = self._kept
        if kept is None:
            if not self.settings.repair.on:
                return
            self._keeper, kept = Keeper.attach(
                self._base_ctx or _process_context(), self.settings, self.endpoints,
                self._announcer.factories)
            self._kept = kept
        kept.keep_sent(factory, frames)

    @property
    def keeper_stats(self) -> dict[str, int] | None:
        """What this connection keeps for repairs and answered (None: nothing yet)."""
        return None if self._kept is None else self._kept.stats()

    def socket(self, kind: int, **options: Any) -> zmq.asyncio.Socket:
        """A new asyncio socket set up by :func:`zbus._transport.make_socket`; caller owns it."""
        return cast(zmq.asyncio.Socket, make_socket(self.ctx, kind, self.settings, **options))

    def _publish_socket(self) -> zmq.asyncio.Socket:
        sock = self._push
        if sock is None or self._forks != _transport.forks:
            if self._closed:
                raise TransportError("this Connection is closed")
            sock = self._push = self.socket(
                zmq.PUSH, sndhwm=self.settings.publish_hwm, connect=self.endpoints.ingress
            )
            sock.setsockopt(zmq.SNDTIMEO, int(self.settings.send_timeout * 1000))
        return sock

    async def send_frames(self, frames: list[bytes]) -> None:
        """Send already-signed frames; Timeout after ``settings.send_timeout`` when stuck."""
        sock = self._publish_socket()
        try:
            await sock.send_multipart(frames)
        except zmq.Again:
            raise Timeout(
                f"zbus-proxy at {self.endpoints.run_dir} took no message for "
                f"{self.settings.send_timeout:g}s; the message was not sent"
            ) from None
        self.envelopes_sent += 1
        self.messages_sent += 1

    async def submit(self, factory: MessageFactory, exchange: str, routing_key: str,
                     obj: Message | Any, message_type: str | None = None,
                     version: int | None = None) -> None:
        """Sign and send ``obj``, smart-batched as :meth:`zbus.Connection.submit`: alone and
        at once when idle; while busy, gathered with the next messages of its stream and
        sent when the batch is full, another stream's message comes, or the task next lets
        the event loop run (a callback scheduled with ``call_soon``: no timer)."""
        now = time.perf_counter()
        busy = now - self._last_submit < BUSY_GAP and now >= self._calm_until
        self._last_submit = now
        if self._batch is None and (not busy or not self._batch_limit):
            await self.publish(factory, factory.frames(exchange, routing_key, obj,
                                                       message_type=message_type,
                                                       version=version))
            return
        await self._gather(factory, exchange, routing_key, obj, message_type, version)

    async def _gather(self, factory: MessageFactory, exchange: str, routing_key: str,
                      obj: Message | Any, message_type: str | None,
                      version: int | None) -> None:
        self._publish_socket()
        if self._batch is not None and not self._batch.of(factory, exchange, routing_key):
            await self._send_batch()  # another stream's: it goes first
        packed = factory.pack(routing_key, obj, message_type=message_type, version=version)
        batch = self._batch
        if batch is not None and batch.parts and batch.size + len(packed) > self._batch_limit:
            await self._send_batch()  # full: a batch never goes past the limit
            batch = None
        if batch is None:
            batch = self._batch = factory.open_batch(exchange, routing_key)
        batch.add(packed)
        if batch.size >= self._batch_limit or len(batch) >= MAX_BATCH:
            try:
                await self._send_batch()
            except Timeout:
                batch.drop_last()  # this message: the caller is told it was not sent
                raise
        self._announce(factory)
        if self._batch is not None and not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_soon)

    def _announce(self, factory: MessageFactory) -> None:
        push = self._push
        for beacon in self._announcer.after(factory, time.monotonic()):
            with contextlib.suppress(zmq.Again):  # never wait on a full queue for a beacon
                _sync_send(push, beacon)

    def _sent(self, batch: OpenBatch, frames: list[bytes]) -> None:
        self.envelopes_sent += 1
        self.messages_sent += len(batch)
        if self._kept is None and self.settings.repair.on:
            self._keeper, self._kept = Keeper.attach(
                self._base_ctx or _process_context(), self.settings, self.endpoints,
                self._announcer.factories)
        if self._kept is not None:
            self._kept.keep(time.monotonic(), batch.stream.stream_id, batch.first, len(batch),
                            frames)

    async def _send_batch(self) -> None:
        """Send the gathered batch, waiting up to ``send_timeout`` (Timeout: it stays
        gathered, nothing taken by send is dropped)."""
        batch, sock = self._batch, self._push
        if batch is None or sock is None:
            return
        self._batch = None  # taken while awaiting: the loop's callback finds nothing
        if not batch.parts:
            return
        frames = batch.seal()
        try:
            await sock.send_multipart(frames)
        except zmq.Again:
            self._batch = batch
            raise Timeout(
                f"zbus-proxy at {self.endpoints.run_dir} took no message for "
                f"{self.settings.send_timeout:g}s; the message was not sent ({len(batch)} "
                "gathered before it wait for the next send, flush or close)") from None
        except BaseException:
            self._batch = batch  # cancelled: still gathered
            raise
        self._sent(batch, frames)

    def _flush_soon(self) -> None:
        """The loop's turn: send the gathered batch without waiting; if the proxy takes
        nothing now, try again shortly (the only timer, on that path alone)."""
        self._flush_scheduled = False
        batch, sock = self._batch, self._push
        if batch is None or sock is None or self._closed or not batch.parts:
            return
        frames = batch.seal()
        try:
            _sync_send(sock, frames)
        except zmq.Again:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_later(_Flusher.RETRY, self._flush_soon)
            return
        self._batch = None
        self._sent(batch, frames)
        if len(batch) < SMALL_BATCH:  # the task paces itself: no gain in gathering now
            self._calm_until = time.perf_counter() + CALM

    async def _flush_gathered(self) -> None:
        if self._batch is not None:
            await self._send_batch()

    async def publish(self, factory: MessageFactory, frames: list[bytes]) -> None:
        """Send ``frames`` made by ``factory``, and announce the factory's streams once they
        go idle and on flush (as :meth:`zbus.Connection.publish`)."""
        try:
            await self.send_frames(frames)
        except BaseException:  # cancelled or timed out: never sent, so not counted lost
            factory.withdraw()
            raise
        self._keep(factory, frames)
        push = self._push
        for beacon in self._announcer.after(factory, time.monotonic()):
            with contextlib.suppress(zmq.Again):  # never wait on a full queue for a beacon
                await cast(zmq.asyncio.Socket, push).send_multipart(beacon, zmq.NOBLOCK)

    def exchange(self, name: str) -> Exchange:
        return Exchange(name, self)

    def subscribe(self, dispatcher: Dispatcher, keys: bytes | KeyRing) -> Subscriber:
        return Subscriber(self, dispatcher, keys)

    def join_pool(self, pool: str, dispatcher: Dispatcher, keys: bytes | KeyRing) -> PoolMember:
        return PoolMember(self, pool, dispatcher, keys)

    async def request(self, op: str, timeout: float = 5.0, **fields: Any) -> dict[str, Any]:
        """One control request (see :mod:`zbus._control`) on a fresh asyncio REQ socket."""
        sock = self.socket(zmq.REQ, connect=self.endpoints.control)
        try:
            await sock.send(encode_request(op, **fields))
            if not await sock.poll(int(timeout * 1000)):
                raise no_answer(self.endpoints, self.settings, op, timeout)
            return decode_reply(op, await sock.recv())
        finally:
            sock.close(linger=0)

    async def declare_pool(self, pool: str, bindings: list[str], timeout: float = 5.0) -> None:
        """As :meth:`zbus.Connection.declare_pool`, awaited."""
        await self.request("declare_pool", timeout, name=validate_name(pool, "pool name"),
                           bindings=sorted(bindings))

    async def proxy_stats(self, timeout: float = 5.0) -> dict[str, Any]:
        return await self.request("stats", timeout)

    async def flush(self, timeout: float = 10.0) -> None:
        """Return once everything sent on this Connection has passed through the proxy (as
        :meth:`zbus.Connection.flush`: a probe behind the queue, back through the proxy)."""
        if self._forks != _transport.forks:
            self._leave_parent()
        if self._push is None:
            return
        await self._flush_gathered()
        for beacon in self._announcer.all():  # behind their messages, ahead of the probe
            with contextlib.suppress(zmq.Again):  # never wait on a full queue for a beacon
                await self._push.send_multipart(beacon, zmq.NOBLOCK)
        token = CONTROL_PREFIX + b"flush/" + os.urandom(8).hex().encode()
        sub = self.socket(zmq.SUB, connect=self.endpoints.deliver)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        interval = 0.005
        try:
            sub.subscribe(token)
            while True:
                with contextlib.suppress(zmq.Again):
                    await self._push.send(token, zmq.NOBLOCK)
                until = loop.time() + interval
                while (left := until - loop.time()) > 0 and await sub.poll(int(left * 1000) + 1):
                    if (await sub.recv_multipart())[0] == token:
                        return
                if loop.time() > deadline:
                    raise Timeout(f"flush: the proxy took nothing within {timeout:g}s")
                interval = min(interval * 2, 0.2)
        finally:
            sub.close(linger=0)

    async def _hand_over(self, beacons: list[list[bytes]]) -> None:
        """Leave ``beacons`` with the proxy as :meth:`zbus.Connection.close` does (in its run
        directory when it does not answer)."""
        for start in range(0, len(beacons), _BEACONS_PER_FILE):
            try:
                await self.request("beacons", 1.0, beacons=beacons[start:start + _BEACONS_PER_FILE])
            except ZbusError as exc:
                log.debug("zbus: the proxy did not take %d beacons: %s", len(beacons), exc)
                leave_beacons(self.endpoints.beacons_dir, beacons[start:])
                return

    async def aclose(self) -> None:
        """Flush for up to ``settings.linger`` seconds, then close; what is still queued is
        dropped with a warning. (``close()`` closes at once: a process that exits right
        after it loses what libzmq had not yet sent.)"""
        if self._push is not None and not self._closed and self.settings.linger > 0:
            try:
                await self.flush(self.settings.linger)
            except Timeout:
                log.warning(
                    "zbus: closing a Connection to %s with messages the proxy did not take "
                    "within linger=%gs: they are dropped; subscribers count those lost from "
                    "the streams' beacons", self.endpoints.run_dir, self.settings.linger,
                )
        if self._push is not None and not self._closed:
            await self._hand_over(self._announcer.final())
        self.close()

    def close(self) -> None:
        self._closed = True
        if self._forks != _transport.forks:
            self._leave_parent()
        batch = self._batch
        if batch is not None and batch.parts and self._push is not None:
            try:  # what aclose() did not flush: now, or never
                _sync_send(self._push, batch.seal())
            except zmq.Again:
                self.unsent += len(batch)
                log.warning("zbus: closing a Connection to %s: %d messages gathered into a "
                            "batch were not taken by the proxy and are dropped "
                            "(Connection.unsent)", self.endpoints.run_dir, len(batch))
            self._batch = None
        if self._push is not None:
            self._push.close()
            self._push = None
        if self._keeper is not None and self._kept is not None:
            self._keeper.detach(self._kept)  # never waits: the keeper goes on for others
            self._keeper = self._kept = None

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _sync_send(sock: Any, frames: list[bytes]) -> None:
    """Send ``frames`` now or raise zmq.Again, never waiting: the plain pyzmq send on an
    asyncio socket (its own send returns a future), for a loop callback that cannot await."""
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        _plain_send(sock, frame, _NOBLOCK | (_SNDMORE if i < last else 0))


async def _publish(connection: Any, factory: MessageFactory, exchange: str, routing_key: str,
                   obj: Message | Any) -> None:
    """As zbus._connection._publish, awaited: smart-batched where the connection does it."""
    factory, body, mtype, version = signing(factory, obj)
    submit = getattr(connection, "submit", None)
    if submit is not None:
        await submit(factory, exchange, routing_key, body, mtype, version)
    else:
        await connection.publish(factory, factory.frames(exchange, routing_key, body,
                                                         message_type=mtype, version=version))


class Exchange:
    """A message class on one asyncio connection."""

    _backend: ClassVar[str] = "zbus.asyncio"

    def __init__(self, name: str, connection: Connection) -> None:
        check_backend(self, connection)
        self.name = validate_exchange(name)
        self.connection = connection

    async def send(self, routing_key: str, obj: Message | Any, factory: MessageFactory) -> None:
        await _publish(self.connection, factory, self.name, routing_key, obj)

    def __repr__(self) -> str:
        return f"zbus.asyncio.Exchange({self.name!r})"


class Publisher:
    """Sends messages signed by ``factory`` to ``exchange`` (see :class:`zbus.Publisher`)."""

    _backend: ClassVar[str] = "zbus.asyncio"

    def __init__(self, exchange: Exchange, factory: MessageFactory) -> None:
        check_exchange(self, exchange)
        self.exchange = exchange
        self.factory = factory

    async def send(self, routing_key: str, obj: Message | Any, *,
                   exchange: str | None = None) -> None:
        name = self.exchange.name if exchange is None else exchange
        await _publish(self.exchange.connection, self.factory, name, routing_key, obj)

    async def send_many(self, routing_key: str, objs: list[Any], *,
                        exchange: str | None = None) -> None:
        """Publish each of ``objs`` in order, in as few envelopes as ``batch_bytes``
        allows; they are sent when this returns."""
        name = self.exchange.name if exchange is None else exchange
        conn = self.exchange.connection
        if not hasattr(conn, "_gather") or not conn._batch_limit:
            for obj in objs:
                await _publish(conn, self.factory, name, routing_key, obj)
            return
        for obj in objs:
            await conn._gather(self.factory, name, routing_key, obj, None, None)
        await conn._flush_gathered()

    async def publish(self, message: Message) -> None:
        await self.send(message.message_type, message)


class Router:
    """Base class for applications that want named async send methods."""

    _backend: ClassVar[str] = "zbus.asyncio"

    def __init__(self, connection: Connection, factory: MessageFactory) -> None:
        check_backend(self, connection)
        self.connection = connection
        self.factory = factory

    async def send(self, exchange: str, obj: Message | Any, routing_key: str | None = None) -> None:
        if routing_key is None:
            if not isinstance(obj, Message):
                raise ConfigError("a plain payload needs an explicit routing_key")
            routing_key = obj.message_type
        await _publish(self.connection, self.factory, exchange, routing_key, obj)


class _Consumer(Linked):
    """Receive loop shared by subscribers and pool members (asyncio backend)."""

    _hwm: int
    _backend: ClassVar[str] = "zbus.asyncio"

    def __init__(self, connection: Connection, dispatcher: Dispatcher, keys: bytes | KeyRing,
                 *, track_sequences: bool, kind: int, endpoint: str,
                 repair: bool = False) -> None:
        check_backend(self, connection)
        if not dispatcher.patterns:
            raise ConfigError("the dispatcher has no bindings: bind a handler first")
        self.connection = connection
        self.core = ConsumerCore(dispatcher, keys, track_sequences=track_sequences,
                                 replay=ReplayGuard(connection.settings.replay),
                                 repair=connection.settings.repair if repair else None)
        # Repair (zbus._repair): a subscriber's requests for its gaps and their answers.
        self._asker = None if self.core.book is None else RepairAsker(
            self.core, connection.settings.max_message_bytes)
        self._repair_sock: zmq.Socket[Any] | None = None  # a plain one: never awaited
        self._pending: deque[list[bytes]] = deque()
        self._stopping = False
        self._wake: asyncio.Future[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._runner: asyncio.Task[Any] | None = None
        self._link: ConsumerLink[zmq.asyncio.Socket] = ConsumerLink(
            lambda kind, **options: connection.socket(kind, **options),
            zmq.Context.shadow(connection.ctx.underlying),  # plain sockets for the link
            connection.settings, self._pending,
            kind=kind, endpoint=endpoint, ingress=connection.endpoints.ingress,
            prefixes=self.core.prefixes() if kind == zmq.SUB else None,
        )
        self._sock = self._link.sock
        # The same socket for non-blocking reads: no future per message, and zbus's faster
        # multipart read (the asyncio socket still does the waiting).
        self._plain: zmq.Socket[Any] = zmq.Socket.shadow(self._sock.underlying)
        self._since_check = 0

    @property
    def stats(self) -> ConsumerStats:
        return self.core.stats

    def counters(self) -> dict[str, Any]:
        """Every counter this consumer keeps, as one plain map."""
        return {**self.stats.as_dict(), "link": self.link.as_dict(), "live": self.live}

    @property
    def closed(self) -> bool:
        return bool(self._sock.closed)

    async def _read(self, deadline: float | None, *, stoppable: bool = True) -> list[bytes] | None:
        """The next message from the socket (the link's probes taken out); None at
        ``deadline`` (loop time), once closed, or (when ``stoppable``) once stopped."""
        self._since_check += 1
        if self._since_check >= CHECK_EVERY:  # a busy stream never waits: look now and then
            self._watch_link()
        while (frames := await self._next(deadline, stoppable)) is not None:
            if not (len(frames) == 1 and self._link.took_probe(frames[0])):
                break
        return frames

    async def _next(self, deadline: float | None, stoppable: bool) -> list[bytes] | None:
        loop = asyncio.get_running_loop()
        while not (stoppable and self._stopping) and not self._sock.closed:
            try:
                return recv_frames(self._plain)
            except zmq.Again:
                pass
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                return None
            most = self._watch_link()
            left = most if left is None else min(left, most)
            readable = cast("asyncio.Future[int]",
                            self._sock.poll(-1 if left is None else int(left * 1000) + 1))
            self._wake = loop.create_future()
            try:
                await asyncio.wait((readable, self._wake), return_when=asyncio.FIRST_COMPLETED)
            finally:
                readable.cancel()
                self._wake = None
        return None

    def _watch_link(self) -> float:
        """Look after the link to the proxy (zbus._link); the longest wait until the next
        look."""
        self._since_check = 0
        if self._link.check():
            self._sock = self._link.sock
            self._plain = zmq.Socket.shadow(self._sock.underlying)
        return self._link.max_wait()

    async def receive(self, timeout: float | None = None) -> Delivery | None:
        """The next verified, matching delivery (handlers not run); None after ``timeout``
        or once stopped. Rejected and unmatched messages are counted and skipped."""
        if self.core.ready:  # the rest of a batch comes first
            return self.core.ready.popleft()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        book = self.core.book
        while True:
            wait_until = deadline
            if book is not None and (len(book) or self._repair_sock is not None):
                self._service_repair()
                if self.core.ready:  # repaired, or released from behind a gap
                    return self.core.ready.popleft()
                if len(book):  # gaps open: look at the answers often
                    soon = loop.time() + _REPAIR_POLL
                    wait_until = soon if deadline is None else min(deadline, soon)
            frames = self._pending.popleft() if self._pending else await self._read(wait_until)
            if frames is not None:
                delivery = self.core.accept(frames)
                if delivery is not None:
                    return delivery
            elif wait_until == deadline or self._stopping or self._sock.closed:
                break
            if deadline is not None and loop.time() >= deadline:
                break
        return None

    def _service_repair(self) -> None:
        """As the threads backend's, on a plain socket: a request or an answer never waits."""
        if self._asker is not None:
            conn = self.connection
            self._repair_sock = service_repair(
                self._asker, self._repair_sock,
                lambda: make_socket(zmq.Context.shadow(conn.ctx.underlying), zmq.DEALER,
                                    conn.settings, connect=conn.endpoints.repair))

    async def dispatch(self, delivery: Delivery) -> None:
        """Run ``delivery``'s handlers in turn, awaiting coroutine handlers."""
        for handler in delivery.handlers:
            try:
                result = handler(delivery)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                self.core.handler_failed(handler, delivery)
        self.core.stats.delivered += 1

    async def process(self, timeout: float | None = None) -> bool:
        """Receive one delivery and run its handlers; False when ``timeout`` passed first."""
        delivery = await self.receive(timeout)
        if delivery is None:
            return False
        await self.dispatch(delivery)
        return True

    async def run(self, *, max_messages: int | None = None,
                  idle_timeout: float | None = None) -> int:
        """Dispatch until :meth:`stop`, ``max_messages`` deliveries, or ``idle_timeout``.

        Cancelling it closes this consumer.
        """
        handled = 0
        self._stopping = False
        self._idle.clear()
        self._runner = asyncio.current_task()
        try:
            while not self._stopping and (max_messages is None or handled < max_messages):
                if not await self.process(idle_timeout):
                    break
                handled += 1
        except asyncio.CancelledError:
            self.close()
            raise
        finally:
            self._idle.set()
            self._runner = None
        return handled

    def __aiter__(self) -> _Consumer:
        self._stopping = False
        return self

    async def __anext__(self) -> Delivery:
        try:
            delivery = await self.receive()
        except asyncio.CancelledError:
            self.close()
            raise
        if delivery is None:
            raise StopAsyncIteration
        return delivery

    def stop(self) -> None:
        """Make :meth:`run` and iteration return after the delivery in hand (and
        :meth:`receive` return None) until ``run()`` or ``async for`` starts again."""
        self._stopping = True
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def aclose(self, *, drain: bool = True) -> int:
        """Stop, let the delivery in hand finish, run the handlers of what was already read
        (when ``drain``), then close. Returns how many messages the drain dispatched."""
        self.stop()
        if self._runner is not asyncio.current_task():  # not from a handler of run() itself
            await self._idle.wait()
        drained = 0
        if drain and not self._sock.closed:
            while (delivery := self.core.next_ready()) is not None:
                await self.dispatch(delivery)
                drained += 1
            for _ in range(self._hwm + len(self._pending)):
                if self._pending:
                    frames = self._pending.popleft()
                else:
                    try:
                        frames = await self._sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                self.core.feed(frames)
                while (delivery := self.core.next_ready()) is not None:
                    await self.dispatch(delivery)
                    drained += 1
        self.close()
        return drained

    def close(self) -> None:
        """Close now, dropping what was read and not dispatched."""
        self.stop()
        if self._repair_sock is not None:
            self._repair_sock.close(linger=0)
        self._link.close()
        if not self._sock.closed:
            self._sock.close(linger=0)

    async def __aenter__(self: Any) -> Any:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            await self.aclose()
        else:
            self.close()


class Subscriber(_Consumer):
    """Fan-out: receives its own copy of every message matching the dispatcher's patterns.

    Watches and repairs its connection to the proxy like :class:`zbus.Subscriber`
    (:attr:`live`, :attr:`link`), from its receive loop.
    """

    def __init__(self, connection: Connection, dispatcher: Dispatcher,
                 keys: bytes | KeyRing) -> None:
        self._hwm = connection.settings.subscriber_hwm
        super().__init__(connection, dispatcher, keys, track_sequences=True, repair=True,
                         kind=zmq.SUB, endpoint=connection.endpoints.deliver)

    async def ready(self, timeout: float = 10.0) -> None:
        """Return once the subscription is live at the proxy (see :meth:`zbus.Subscriber.ready`).

        Sends a unique probe topic through the proxy until it comes back; what arrives
        meanwhile is kept for :meth:`receive`. Raises Timeout.
        """
        token = CONTROL_PREFIX + b"probe/" + os.urandom(8).hex().encode()
        self._sock.subscribe(token)
        conn = self.connection
        push = conn.socket(zmq.PUSH, connect=conn.endpoints.ingress)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        interval = 0.005
        try:
            while not await self._probe_returned(push, token, loop.time() + interval):
                if loop.time() > deadline:
                    raise Timeout(f"subscription was not live end to end within {timeout:g}s: "
                                  "is zbus-proxy running?")
                interval = min(interval * 2, 0.2)
        finally:
            push.close(linger=0)
            if not self._sock.closed:
                self._sock.unsubscribe(token)
        # Live locally; now at every peer proxy (a single-host proxy answers "no peers" at
        # once). wait_for_peers blocks, so it runs in a worker thread on its own sockets.
        left = max(0.1, deadline - loop.time())
        await asyncio.to_thread(
            wait_for_peers, conn.endpoints, conn.settings, _process_context(), left
        )

    async def _probe_returned(self, push: zmq.asyncio.Socket, token: bytes, until: float) -> bool:
        if self._sock.closed:
            raise TransportError("this subscriber was closed while getting ready")
        with contextlib.suppress(zmq.Again):  # proxy not there yet: the wait paces us
            await push.send(token, zmq.NOBLOCK)
        while (frames := await self._read(until, stoppable=False)) is not None:
            if frames[0] == token:
                return True
            self._pending.append(frames)
        return False


class PoolMember(_Consumer):
    """A member of a worker pool: each matching message goes to exactly one live member.

    Like :class:`zbus.PoolMember`, it reports its receipts to the proxy (fast-pool loss
    accounting, docs/RELIABILITY.md); ``aclose()`` waits briefly for the final report.
    """

    def __init__(self, connection: Connection, pool: str, dispatcher: Dispatcher,
                 keys: bytes | KeyRing) -> None:
        self.pool = validate_name(pool, "pool name")
        self._hwm = connection.settings.pool_hwm
        super().__init__(connection, dispatcher, keys, track_sequences=False,
                         kind=zmq.PULL, endpoint=connection.endpoints.pool(self.pool))
        # A plain socket used only with NOBLOCK: reporting never waits on the event loop.
        tally = self.core.tally = StreamTally()
        self._receipts = ReceiptsReporter(self.pool, connection.endpoints, connection.settings,
                                          _process_context(), tally)
        self.member_id = self._receipts.member_id
        self._awaited_close = False

    @property
    def bindings(self) -> list[str]:
        return sorted(str(p) for p in self.core.dispatcher.patterns)

    async def ready(self, timeout: float = 10.0) -> None:
        """Declare the pool (idempotent) and return once this member is connected to it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        await self.connection.declare_pool(self.pool, self.bindings, timeout)
        while not self._link.connected:
            left = deadline - loop.time()
            # the link's monitor is a plain socket: wait on it through an asyncio view
            events = zmq.asyncio.Socket.from_socket(self._link.monitor)
            if left <= 0 or not await events.poll(int(left * 1000)):
                raise Timeout(f"pool member of {self.pool!r} did not connect within {timeout:g}s")
            self._watch_link()

    async def receive(self, timeout: float | None = None) -> Delivery | None:
        if self.core.ready and not self._stopping:  # the rest of a batch: nothing read since
            return self.core.ready.popleft()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not (self._stopping or self._sock.closed):
            wait = None if deadline is None else max(0.0, deadline - loop.time())
            received, frames = self._read_counts()
            self._receipts.after_outage(self.link.reconnects)
            due = self._receipts.due_in(frames, time.monotonic())
            if due == 0:
                self._receipts.report(received, frames, time.monotonic())
            elif due is not None and (wait is None or due < wait):
                wait = due  # wake up to report even when no message comes
            delivery = await super().receive(wait)
            if delivery is not None:
                return delivery
            if deadline is not None and loop.time() >= deadline:
                break
        return None

    def counters(self) -> dict[str, Any]:
        tally = self.core.tally
        return {**super().counters(), "streams": len(tally) if tally is not None else 0,
                "streams_evicted": tally.evicted if tally is not None else 0}

    def _read_counts(self) -> tuple[int, int]:
        """3-frame messages (envelopes), and frames of any message, read from the pool
        socket."""
        received = self.core.envelopes
        return received, 3 * received + self.core.odd_frames

    async def aclose(self, *, drain: bool = True) -> int:
        self._awaited_close = True  # close() leaves the final report's reply to us
        drained = await super().aclose(drain=drain)
        if self._receipts.started:
            wait = min(self.connection.settings.linger, 1.0)
            await asyncio.to_thread(self._receipts.read_replies, wait)
        self._receipts.close()
        return drained

    def close(self) -> None:
        if not self._sock.closed:
            super().close()  # first: nothing more arrives, so the final count is final
            received, frames = self._read_counts()
            if frames or self._receipts.started:
                self._receipts.report(received, frames, time.monotonic(), final=True)
        if not self._awaited_close:
            # close() never blocks the loop: libzmq sends the final report in the background
            # for up to linger (aclose() waits for the proxy's reply instead).
            self._receipts.close(linger=min(self.connection.settings.linger, 1.0))
