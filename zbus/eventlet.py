"""The eventlet backend: the threads backend's classes on cooperative green sockets.

    >>> import zbus.eventlet
    >>> conn = zbus.eventlet.Connection(run_dir)       # one per green thread that publishes
    >>> sub = conn.subscribe(dispatcher, key); sub.ready(); sub.run()

Why this module is so thin: every point where the threads backend can wait is a call on a
pyzmq socket (``poll``, ``recv``, ``send``, the control REQ, the pool's monitor socket). Give
those sockets a cooperative implementation and the same code never blocks the eventlet hub,
with or without ``eventlet.monkey_patch()``. ``eventlet.green.zmq`` makes ``send``/``recv``
cooperative; it leaves ``poll`` on libzmq's blocking ``zmq_poll`` and its ``send`` ignores
``SNDTIMEO``. :func:`_green` adds both, waiting on the socket's own hub listener, so the
edge-triggered ``ZMQ_FD`` is re-checked (``ZMQ_EVENTS``) before every wait.

Invariants a maintainer must keep:

* nothing here imports eventlet at module level: ``import zbus.eventlet`` works without it,
  and :class:`Connection` raises :class:`zbus.ConfigError` naming the extra to install;
* a socket belongs to the green thread that made it (eventlet lets one green thread wait on
  a socket at a time); make one :class:`Connection` per publishing green thread;
* handlers run in green threads of a bounded ``GreenPool`` (``handler_pool_size``): a slow
  handler never stalls receiving, and a full pool makes receiving wait (back-pressure), so
  memory stays bounded. ``run()`` and ``close()`` return once their handlers have finished.
  Handlers start in arrival order; ones that yield (I/O, sleep) may finish out of order.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Any, ClassVar, cast

import zmq

from . import _connection as _threads
from ._connection import Exchange, Publisher, Router
from ._dispatch import Delivery, Dispatcher
from ._errors import ConfigError
from ._keys import KeyRing
from ._settings import Settings
from ._transport import context as _process_context

__all__ = ["Connection", "Exchange", "PoolMember", "Publisher", "Router", "Subscriber"]

# Plain ints and the unpatched pyzmq methods: the green socket's hot path avoids enum
# arithmetic and eventlet's per-call wake-ups (a socket here has one green thread).
_POLLIN, _POLLOUT, _NOBLOCK = int(zmq.POLLIN), int(zmq.POLLOUT), int(zmq.NOBLOCK)
_EVENTS, _RCVMORE, _RCVTIMEO, _SNDTIMEO = (
    int(zmq.EVENTS), int(zmq.RCVMORE), int(zmq.RCVTIMEO), int(zmq.SNDTIMEO))
_getsockopt = zmq.Socket.getsockopt
_recv = zmq.Socket.recv

INSTALL_HINT = 'the eventlet backend needs eventlet: pip install "zbus-fabric[eventlet]"'


@functools.cache
def _green() -> tuple[type[zmq.Context[Any]], Any]:
    """(the cooperative Context class, the eventlet module); ConfigError without eventlet."""
    try:
        import eventlet  # type: ignore[import-untyped,unused-ignore]
        import eventlet.green.zmq as gzmq  # type: ignore[import-untyped,unused-ignore]
    except ImportError as exc:
        raise ConfigError(f"{INSTALL_HINT} ({exc})") from None

    class GreenSocket(gzmq.Socket):  # type: ignore[misc]
        def poll(self, timeout: int | None = None, flags: int = _POLLIN) -> int:
            """Cooperative poll: wait in the hub, never in zmq_poll. Timeout in ms."""
            clock = self._eventlet_clock
            deadline = None if timeout is None or timeout < 0 else clock() + timeout / 1000
            waiter = self._eventlet_recv_event if flags & _POLLIN else self._eventlet_send_event
            while True:
                ready = cast(int, _getsockopt(self, _EVENTS)) & flags  # re-arms the FD
                if ready or (deadline is not None and clock() >= deadline):
                    return ready
                waiter.block(deadline=deadline)

        def recv_multipart(self, flags: int = 0, copy: bool = True, track: bool = False) -> Any:
            """Wait cooperatively (honouring RCVTIMEO), then read the parts without waiting."""
            if not flags & _NOBLOCK and not self.poll(cast(int, _getsockopt(self, _RCVTIMEO))):
                raise zmq.Again()
            parts = [_recv(self, _NOBLOCK, copy, track)]
            while _getsockopt(self, _RCVMORE):
                parts.append(_recv(self, _NOBLOCK, copy, track))
            return parts

        def send_multipart(self, msg_parts: Any, flags: int = 0, copy: bool = True,
                           track: bool = False) -> Any:
            """Honour SNDTIMEO (raise zmq.Again), as a plain pyzmq socket does."""
            if not flags & _NOBLOCK:
                limit = cast(int, _getsockopt(self, _SNDTIMEO))
                if limit >= 0 and not self.poll(limit, _POLLOUT):
                    raise zmq.Again()
            return super().send_multipart(msg_parts, flags, copy, track)

    class GreenContext(gzmq.Context):  # type: ignore[misc]
        def socket(self, socket_type: int, **kwargs: Any) -> GreenSocket:
            if self.closed:
                raise zmq.ZMQError(zmq.ENOTSUP)
            return GreenSocket(self, socket_type)

    return GreenContext, eventlet


class Connection(_threads.Connection):
    """A threads-backend :class:`zbus.Connection` whose sockets are cooperative.

    ``context`` (any pyzmq context; default the process's) is shadowed, not replaced: green
    and plain sockets of one process share libzmq's I/O thread. ``handler_pool_size`` bounds
    the green threads that run handlers, per subscriber or pool member.
    """

    _backend: ClassVar[str] = "zbus.eventlet"

    def __init__(
        self,
        run_dir: str | os.PathLike[str] | None = None,
        *,
        settings: Settings | None = None,
        context: zmq.Context[Any] | None = None,
        handler_pool_size: int = 100,
        require_proxy: bool = True,
    ) -> None:
        self._green_context, self.eventlet = _green()
        if handler_pool_size < 1:
            raise ConfigError("handler_pool_size must be at least 1")
        super().__init__(run_dir, settings=settings, context=context,
                         require_proxy=require_proxy)
        self.handler_pool_size = handler_pool_size

    def _new_lock(self) -> Any:
        # A green lock: the flusher is a green thread, and a plain lock held across a
        # cooperative send would block the hub.
        return self.eventlet.semaphore.Semaphore(1)

    def _want_flush(self, later: bool = False) -> None:
        # Smart batching on the hub: the gathered batch goes out as soon as the sending
        # green thread yields (no timer), from a green thread that owns nothing else.
        if later:
            self.eventlet.spawn_after(_threads._Flusher.RETRY, self._flush_in_background)
        else:
            self.eventlet.spawn_n(self._flush_in_background)

    def _keeper_runs_on(self) -> tuple[zmq.Context[Any], type[threading.Thread]]:
        # The keeper (what this connection sent, for repairs) is an OS thread with plain
        # sockets: it waits in libzmq, which would block the hub from a green thread, and
        # green sockets belong to the hub's thread. Under monkey_patch() threading.Thread is
        # green, so the original is asked for.
        original = self.eventlet.patcher.original("threading")
        return self._base_ctx or _process_context(), original.Thread

    def _new_context(self) -> zmq.Context[Any]:
        # Also asked in a forked child, once the base class has dropped the parent's green
        # context untouched (the child should reset its hub: eventlet.hubs.use_hub()).
        return self._green_context(self._base_ctx or _process_context())

    def subscribe(self, dispatcher: Dispatcher, keys: bytes | KeyRing) -> Subscriber:
        return Subscriber(self, dispatcher, keys)

    def join_pool(self, pool: str, dispatcher: Dispatcher, keys: bytes | KeyRing) -> PoolMember:
        return PoolMember(self, pool, dispatcher, keys)


class _GreenConsumer(_threads._Consumer):
    """Hands deliveries to handler green threads: at most ``handler_pool_size`` of them, from
    a ``GreenPool``, fed through a queue of at most as many deliveries (back-pressure).

    Workers loop over the queue rather than one green thread per delivery: starting a green
    thread costs more than receiving, verifying and decoding a message.
    """

    _backend: ClassVar[str] = "zbus.eventlet"  # needs a zbus.eventlet.Connection
    _work: Any = None  # eventlet.queue.Queue of deliveries, made on first use
    _workers: Any = None  # eventlet.GreenPool of _handle loops

    def _hand_over(self, delivery: Delivery) -> None:
        if self._work is None:
            conn = cast(Connection, self.connection)
            self._work = conn.eventlet.queue.Queue(conn.handler_pool_size)
            self._workers = conn.eventlet.GreenPool(conn.handler_pool_size)
        self._work.put(delivery)  # waits while handler_pool_size deliveries are queued
        if not self._work.getting() and self._workers.free():
            self._workers.spawn_n(self._handle)  # no idle worker: start one more

    def _handle(self) -> None:
        while (delivery := self._work.get()) is not None:
            try:
                self.core.run_handlers(delivery)
            finally:
                self._work.task_done()
        self._work.task_done()

    def process(self, timeout: float | None = None) -> bool:
        """Receive one delivery and queue it for the handler green threads."""
        delivery = self.receive(timeout)
        if delivery is None:
            return False
        self._hand_over(delivery)
        return True

    def wait_handlers(self) -> None:
        """Return once the handlers of every delivery queued so far have finished."""
        if self._work is not None:
            self._work.join()

    def run(self, *, max_messages: int | None = None, idle_timeout: float | None = None) -> int:
        try:
            return super().run(max_messages=max_messages, idle_timeout=idle_timeout)
        finally:
            self.wait_handlers()

    def close(self) -> None:
        """Finish the handlers of what was queued, end the handler green threads, close."""
        if self._work is not None:
            for _ in range(self._workers.running()):
                self._work.put(None)
            self._workers.waitall()
        super().close()


class Subscriber(_GreenConsumer, _threads.Subscriber):
    """Fan-out subscriber (see :class:`zbus.Subscriber`) on a cooperative socket."""


class PoolMember(_GreenConsumer, _threads.PoolMember):
    """Worker-pool member (see :class:`zbus.PoolMember`) on a cooperative socket."""
