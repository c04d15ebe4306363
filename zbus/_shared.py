"""A publisher every thread and green thread of a process can share, and that survives fork.

A :class:`zbus.Connection` belongs to the thread that first sent on it (ZeroMQ sockets are not
thread-safe), and closing one costs a flush through the proxy (~7 ms): a service that made one
per request paid that on every request. :class:`SharedPublisher` is one bounded queue drained
by one sender, the only owner of the socket and of the :class:`MessageFactory` that signs:

    callers (any thread / green thread) --put--> bounded queue --> sender: sign, send --> proxy

Invariants a maintainer must keep:

* only the sender touches the connection and the factory, so the factory's streams leave in
  the order they were numbered, and the socket never crosses a thread or green thread;
* in a process that ran ``eventlet.monkey_patch()`` the sender is a green thread on a
  ``zbus.eventlet.Connection`` (a plain one is refused there: its waits would freeze the
  hub); ``threading`` and ``queue`` are then eventlet's, so the same code serves both;
* nothing is lost in silence: a full queue makes a blocking ``send`` wait (then raise
  ``Timeout``, nothing queued) and a non-blocking one return False and count ``dropped``;
  what the sender could not hand to the proxy is counted in ``failed`` and logged; what
  ``close()`` could not deliver is in ``unsent_at_close``;
* after ``fork()`` the child gets a new queue, lock and sender, made on its first send: what
  the parent had queued stays the parent's to deliver (sending it from the child too would
  duplicate it), and the parent's connection is left untouched (zbus._transport.abandon).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import queue
import threading
import time
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import _transport
from ._connection import Connection, RetryPolicy, _eventlet_patched, _policy
from ._control import missing_proxy
from ._errors import ConfigError, ProxyError, Timeout, TransportError, ZbusError
from ._message import MessageFactory
from ._names import validate_exchange, validate_routing_key
from ._settings import Endpoints, Settings, default_run_dir

__all__ = ["SharedPublisher", "SharedStats"]

log = logging.getLogger("zbus")

# How often (seconds) drops and failures are logged again while they go on: one line per
# message would flood a log exactly when the service is overloaded.
_LOG_EVERY = 10.0


@dataclass
class SharedStats:
    """Counters of a :class:`SharedPublisher`; ``queued == sent + failed + pending``.

    ``queued``: messages callers handed over; ``sent``: taken by the proxy's queue;
    ``dropped``: refused by a non-blocking ``send`` because the queue was full (never
    queued); ``failed``: queued but not sent (the proxy took nothing within
    ``send_timeout`` and the retries, or the payload could not be signed); ``retries``:
    sends tried again; ``unsent_at_close``: still queued when ``close()`` gave up, plus what
    the proxy had not confirmed by then (``Connection.unconfirmed_at_close``).
    """

    queued: int = 0
    sent: int = 0
    dropped: int = 0
    failed: int = 0
    retries: int = 0
    unsent_at_close: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Flush:
    """A marker the sender answers once everything queued before it passed the proxy."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.done = threading.Event()
        self.error: ZbusError | None = None


_STOP = object()
_open: weakref.WeakSet[SharedPublisher] = weakref.WeakSet()


class SharedPublisher:
    """Publish from any thread or green thread through one sender (see the module docstring).

        >>> pub = zbus.SharedPublisher(run_dir, zbus.MessageFactory(key, "compute-host1"))
        >>> pub.send("notifications", "compute.instance.create.end", {"id": "i-1"})
        >>> pub.flush()    # everything sent so far has passed the proxy
        >>> pub.close()

    ``max_queue`` bounds the messages waiting for the sender. ``block`` (default True) is
    what ``send`` does when the queue is full: wait up to ``send_timeout`` (default
    ``settings.send_timeout``) and then raise ``Timeout``, or (False) return False at once
    and count the message in ``stats.dropped``. ``retry`` (a :class:`RetryPolicy`, or True)
    is how the sender retries a send the proxy did not take; the caller has returned by
    then, so a message still refused after it is counted in ``stats.failed`` and logged.
    ``require_proxy`` (default True) checks at construction that a proxy runs on
    ``run_dir`` (``ProxyError`` otherwise); False for a service that may start first.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str] | None,
        factory: MessageFactory,
        *,
        settings: Settings | None = None,
        max_queue: int = 10_000,
        block: bool = True,
        send_timeout: float | None = None,
        retry: RetryPolicy | bool | None = None,
        require_proxy: bool = True,
    ) -> None:
        if max_queue < 1:
            raise ConfigError("max_queue must be at least 1")
        self.run_dir = os.fspath(run_dir) if run_dir is not None else str(default_run_dir())
        self.factory = factory
        self.settings = settings or Settings()
        self.max_queue = max_queue
        self.block = block
        self.send_timeout = self.settings.send_timeout if send_timeout is None else send_timeout
        self.retry = _policy(retry)
        self._require_proxy = require_proxy
        if require_proxy:
            cause = missing_proxy(Endpoints(Path(self.run_dir)))
            if cause is not None:
                raise ProxyError(f"{cause} (to publish before it starts, make the "
                                 "SharedPublisher with require_proxy=False)")
        self._closed = False
        self._logged_at = 0.0
        self._new_process_state()
        _open.add(self)

    # -- per process ---------------------------------------------------------------------

    def _new_process_state(self) -> None:
        """The queue, lock and sender of this process (made afresh in a forked child)."""
        self._forks = _transport.forks
        self._stats = SharedStats()  # the sender's counters (only it writes them)
        # Callers' counters, under a lock: += on an attribute is not atomic across threads.
        self._queued = self._dropped = 0
        self._counting = threading.Lock()
        self._queue: queue.Queue[Any] = queue.Queue(self.max_queue)
        self._lock = threading.Lock()
        self._sender: threading.Thread | None = None
        self._connection: Connection | None = None

    def _after_fork(self) -> None:
        # Called in the child, where only the forking thread runs: the parent's sender did
        # not come along, and its queue or lock may have been held mid-operation. The
        # parent's connection is left unclosed and referenced (closing it here is unsafe).
        # The counters start at zero too: they describe this process's messages.
        _transport.abandon(self._connection)
        self._new_process_state()

    def _start_sender(self) -> None:
        with self._lock:
            if self._sender is not None:
                return
            if self._closed:
                raise TransportError("this SharedPublisher is closed")
            # Under monkey_patch() threading.Thread is a green thread: the sender then
            # waits in the hub like every other green thread.
            sender = threading.Thread(target=self._run, name="zbus-shared-publisher",
                                      daemon=True)
            sender.start()
            self._sender = sender

    # -- callers -------------------------------------------------------------------------

    def send(self, exchange: str, routing_key: str, obj: Any, *,
             message_type: str | None = None, version: int | None = None,
             block: bool | None = None, timeout: float | None = None) -> bool:
        """Queue ``obj`` for ``exchange``/``routing_key``; True once queued.

        Names are checked here (``InvalidName``), so a bad one fails in the caller. When the
        queue is full: with ``block`` (default: the publisher's), wait up to ``timeout``
        (default ``send_timeout``) and raise ``Timeout``; without, return False (counted in
        ``stats.dropped``, logged at most every 10 s)."""
        if self._closed:
            raise TransportError("this SharedPublisher is closed")
        validate_exchange(exchange)
        validate_routing_key(routing_key)
        if self._forks != _transport.forks:
            self._after_fork()
        if self._sender is None:
            self._start_sender()
        item = (exchange, routing_key, obj, message_type, version)
        wait = self.block if block is None else block
        try:
            if wait:
                self._queue.put(item, True, self.send_timeout if timeout is None else timeout)
            else:
                self._queue.put_nowait(item)
        except queue.Full:
            if wait:
                raise Timeout(
                    f"the shared publisher's queue stayed full ({self.max_queue} messages) "
                    f"for {self.send_timeout if timeout is None else timeout:g}s: the proxy at "
                    f"{self.run_dir} is not taking messages as fast as they come; the message "
                    "was not sent") from None
            with self._counting:
                self._dropped += 1
            self._log_trouble()
            return False
        with self._counting:
            self._queued += 1
        return True

    def flush(self, timeout: float = 10.0) -> None:
        """Return once everything queued before this call has passed through the proxy
        (``Connection.flush``); raises ``Timeout`` otherwise. ``stats.failed`` counts what
        the sender gave up on meanwhile."""
        if self._forks != _transport.forks:
            self._after_fork()
        if self._sender is None:
            return  # nothing was ever queued in this process
        marker = _Flush(timeout)
        deadline = time.monotonic() + timeout
        try:
            self._queue.put(marker, True, timeout)
        except queue.Full:
            raise Timeout(f"flush: the shared publisher's queue stayed full for {timeout:g}s")\
                from None
        if not marker.done.wait(max(deadline - time.monotonic(), 0.0)):
            raise Timeout(f"flush: the sender did not get through the queue within {timeout:g}s")
        if marker.error is not None:
            raise marker.error

    def close(self, timeout: float | None = None) -> None:
        """Send what is queued, flush it through the proxy and close (idempotent).

        Waits up to ``timeout`` (default ``send_timeout + settings.linger``) for the sender;
        whatever it had not sent by then, and what the proxy had not confirmed, is counted
        in ``stats.unsent_at_close`` and logged at WARNING."""
        if self._closed:
            return
        self._closed = True
        _open.discard(self)
        if self._forks != _transport.forks:
            self._after_fork()
        sender = self._sender
        if sender is None:
            return
        limit = self.send_timeout + self.settings.linger if timeout is None else timeout
        deadline = time.monotonic() + limit
        with contextlib.suppress(queue.Full):  # then join times out and counts the rest
            self._queue.put(_STOP, True, limit)
        sender.join(max(deadline - time.monotonic(), 0.0))
        if sender.is_alive():
            self._stats.unsent_at_close += self._queue.qsize()
        if self._stats.unsent_at_close:
            log.warning("zbus: closing a SharedPublisher to %s: %d messages were not "
                        "confirmed by the proxy and may be lost (subscribers count them from "
                        "the streams' beacons)", self.run_dir, self._stats.unsent_at_close)

    def __enter__(self) -> SharedPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> Any:
        raise ZbusError("a SharedPublisher cannot be pickled: its sender and sockets belong to "
                        "this process; make one in the child from the run directory and key")

    @property
    def stats(self) -> SharedStats:
        """A snapshot of the counters (:class:`SharedStats`)."""
        return SharedStats(
            queued=self._queued, dropped=self._dropped, sent=self._stats.sent,
            failed=self._stats.failed, retries=self._stats.retries,
            unsent_at_close=self._stats.unsent_at_close,
        )

    @property
    def pending(self) -> int:
        """Messages queued and not yet handed to the sender (approximate)."""
        return self._queue.qsize()

    def _log_trouble(self) -> None:
        now = time.monotonic()
        if now - self._logged_at >= _LOG_EVERY:
            self._logged_at = now
            log.warning("zbus: shared publisher to %s: %s", self.run_dir, self.stats)

    # -- the sender ----------------------------------------------------------------------

    def _connect(self) -> Connection:
        if _eventlet_patched():
            from .eventlet import Connection as GreenConnection

            conn: Connection = GreenConnection(self.run_dir, settings=self.settings)
            # zbus.eventlet.Connection takes no require_proxy yet; this was checked (or
            # waived) at construction.
            conn._check_proxy = False
            return conn
        return Connection(self.run_dir, settings=self.settings, require_proxy=False)

    def _run(self) -> None:
        mine = _transport.forks
        conn = self._connection = self._connect()
        get, get_nowait = self._queue.get, self._queue.get_nowait
        try:
            while True:
                item = get()
                while True:  # drain what is there without waking up again
                    if item is _STOP or _transport.forks != mine:
                        # A green sender survives fork with the hub (unless the child
                        # resets it): the parent's queue is the parent's to send.
                        return
                    if isinstance(item, _Flush):
                        self._flush(conn, item)
                    else:
                        self._publish(conn, item)
                    try:
                        item = get_nowait()
                    except queue.Empty:
                        break
        finally:
            if _transport.forks == mine:
                conn.close()
                self._stats.unsent_at_close += conn.unconfirmed_at_close

    def _publish(self, conn: Connection, item: tuple[str, str, Any, str | None, int | None]
                 ) -> None:
        exchange, routing_key, obj, message_type, version = item
        factory = self.factory
        waits = self.retry.intervals() if self.retry is not None else iter(())
        while True:
            try:
                frames = factory.frames(exchange, routing_key, obj,
                                        message_type=message_type, version=version)
            except Exception as exc:  # an unpackable payload: the caller has returned
                self._stats.failed += 1
                log.error("zbus: shared publisher could not sign a message for %s/%s: %s",
                          exchange, routing_key, exc)
                return
            try:
                conn.publish(factory, frames)
                self._stats.sent += 1
                return
            except (Timeout, ProxyError, TransportError) as exc:
                wait = next(waits, None)
                if wait is None:
                    self._stats.failed += 1
                    log.error("zbus: shared publisher gave up a message for %s/%s: %s",
                              exchange, routing_key, exc)
                    self._log_trouble()
                    return
                self._stats.retries += 1
                time.sleep(wait)  # green under monkey_patch(), as the sender is

    def _flush(self, conn: Connection, marker: _Flush) -> None:
        try:
            conn.flush(marker.timeout)
        except ZbusError as exc:
            marker.error = exc
        finally:
            marker.done.set()


def _children_start_afresh() -> None:
    for pub in list(_open):
        pub._after_fork()


def _close_at_exit() -> None:
    for pub in list(_open):
        if pub._forks != _transport.forks:
            continue
        try:
            pub.close()
        except Exception:  # exiting: say it, never hide the exit's own cause
            log.exception("zbus: closing a SharedPublisher at exit failed")


os.register_at_fork(after_in_child=_children_start_afresh)
atexit.register(_close_at_exit)
