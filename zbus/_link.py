"""A subscriber's link to its proxy: the SUB socket, watched, and replaced when libzmq gives up.

libzmq reconnects a SUB by itself after a connection error (proxy restart, heartbeat
timeout) and re-sends its subscriptions. After a protocol error -- a frame above the
socket's ZMQ_MAXMSGSIZE, as when a consumer's ``max_message_bytes`` is below its proxy's --
it ends the session for good: the socket stays open and never hears again. Both begin with
EVENT_DISCONNECTED; they differ in what follows, since libzmq announces a reconnect
(CONNECT_RETRIED, or CONNECTED) at once. A disconnect with no such sign within
``ABANDONED_AFTER`` seconds therefore means libzmq gave up: the link keeps what the old
socket had queued, closes it, and connects a new one with the same subscriptions.

After any reconnect the link sends a probe through the proxy (the one ``ready()`` uses)
until it returns: that proves the subscriptions live again. What was published meanwhile is
counted by the consumer core as sequence gaps (``ConsumerStats.lost``).

Everything here is non-blocking (``poll(0)``, NOBLOCK) on plain pyzmq sockets of the
backend's context, so the threads, eventlet and asyncio subscribers all drive it from their
receive loops; the backend only says how to make its SUB socket.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Generic, TypeVar

import zmq
from zmq.utils.monitor import parse_monitor_message

from ._names import CONTROL_PREFIX
from ._settings import Endpoints, Settings
from ._transport import make_socket

__all__ = ["ABANDONED_AFTER", "CHECK_EVERY", "LinkStats", "SubscriptionLink"]

log = logging.getLogger("zbus")

# A reconnect is announced within the same libzmq I/O step as the disconnect; this is slack
# for a busy machine, and the cost of a wrong guess is only a new socket.
ABANDONED_AFTER = 1.0
# A SUB's subscriptions travel its send pipe, which drops (silently) what exceeds SNDHWM:
# both when they are first made and when libzmq re-sends them all after a reconnect
# (libzmq #2258). Size the pipe for every subscription, plus room for probes.
_SUB_SLACK = 1000
# How often an otherwise busy subscriber looks at its link (messages between looks).
CHECK_EVERY = 256
# Longest wait a receive loop may spend without looking at the link again.
MAX_WAIT = 0.25
_BUSY_WAIT = 0.02  # ... while a probe is out or an abandoned connection is suspected
_EVENTS = (
    zmq.EVENT_DISCONNECTED
    | zmq.EVENT_CONNECT_RETRIED
    | zmq.EVENT_CONNECTED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
)

SocketT = TypeVar("SocketT", bound=zmq.Socket[Any])


@dataclass
class LinkStats:
    """What a consumer's connection to its proxy went through (see docs/RELIABILITY.md).

    ``disconnects``: the proxy went away (crash, restart, heartbeat timeout) or refused a
    frame; ``reconnects``: the connection came back; ``replaced``: libzmq gave up on the
    connection (a protocol error, such as a frame above ``max_message_bytes``) and the
    socket was replaced by a new one; ``resubscribed``: a re-probe proved the subscriptions
    live again after a reconnect; ``last_outage``: seconds from the last disconnect until
    that proof (None until the first one). Loss during an outage is in
    ``ConsumerStats.lost`` (as sequence gaps), not here.
    """

    disconnects: int = 0
    reconnects: int = 0
    replaced: int = 0
    resubscribed: int = 0
    last_outage: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class SubscriptionLink(Generic[SocketT]):
    """The SUB socket of one subscriber (:attr:`sock`, which :meth:`check` may replace)."""

    def __init__(
        self,
        new_socket: Callable[..., SocketT],
        ctx: zmq.Context[Any],
        endpoints: Endpoints,
        settings: Settings,
        prefixes: list[bytes],
        pending: deque[list[bytes]],
    ) -> None:
        """``new_socket(sndhwm=, rcvhwm=)`` makes an unconnected SUB of the backend's kind
        with zbus's options (:func:`zbus._transport.make_socket`); ``ctx`` is a plain
        context on the same libzmq context, for the monitor and probe sockets; what the old
        socket had queued when it is replaced goes to ``pending``."""
        self.stats = LinkStats()
        self._new_socket = new_socket
        self._ctx = ctx
        self._endpoints = endpoints
        self._settings = settings
        self._prefixes = prefixes
        self._pending = pending
        self._down_since: float | None = None
        self._abandoned_at: float | None = None  # when to give the connection up for lost
        self._probe: bytes | None = None
        self._probe_push: zmq.Socket[Any] | None = None
        self._probe_next = 0.0
        self._probe_interval = 0.0
        self.sock, self._monitor = self._open()

    @property
    def live(self) -> bool:
        """False from a lost connection until the subscriptions are proven live again."""
        return self._down_since is None

    def max_wait(self) -> float:
        """How long a receive loop may wait for a message before calling :meth:`check`."""
        busy = self._probe is not None or self._abandoned_at is not None
        return _BUSY_WAIT if busy else MAX_WAIT

    def _open(self) -> tuple[SocketT, zmq.Socket[Any]]:
        sock = self._new_socket(
            sndhwm=_SUB_SLACK + 2 * len(self._prefixes), rcvhwm=self._settings.subscriber_hwm
        )
        address = f"inproc://zbus-link-{os.urandom(8).hex()}"
        sock.monitor(address, _EVENTS)
        monitor = self._ctx.socket(zmq.PAIR)
        monitor.connect(address)  # before the SUB connects: no link event is missed
        sock.connect(self._endpoints.deliver)
        for prefix in self._prefixes:
            sock.subscribe(prefix)
        return sock, monitor

    def check(self) -> bool:
        """Read link events, re-send an outstanding probe when due, and replace the socket
        if libzmq gave up on it. Returns True when :attr:`sock` is a new socket."""
        now = time.monotonic()
        while self._monitor.poll(0):
            event = parse_monitor_message(self._monitor.recv_multipart())["event"]
            if event == zmq.EVENT_DISCONNECTED:
                self.stats.disconnects += 1
                if self._down_since is None:
                    self._down_since = now
                self._abandoned_at = now + ABANDONED_AFTER
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._abandoned_at = None
                if self._down_since is not None:
                    self.stats.reconnects += 1
                    self._start_probe()
            else:  # CONNECT_RETRIED, CONNECTED: libzmq is reconnecting by itself
                self._abandoned_at = None
        replaced = self._abandoned_at is not None and now >= self._abandoned_at
        if replaced:
            self._replace()
        if self._probe is not None and now >= self._probe_next:
            self._send_probe(now)
        return replaced

    def took_probe(self, frame: bytes) -> bool:
        """True when ``frame`` (a one-frame message) is this link's probe, back: the
        subscriptions are live again."""
        if frame != self._probe:
            return False
        self._end_probe()
        if self._down_since is not None:
            self.stats.last_outage = time.monotonic() - self._down_since
            self._down_since = None
        self.stats.resubscribed += 1
        return True

    def _replace(self) -> None:
        log.warning(
            "zbus: the connection to %s ended for good (a protocol error, such as a frame "
            "above this consumer's max_message_bytes=%d: keep it at least the proxy's); "
            "reconnecting with a new socket",
            self._endpoints.deliver,
            self._settings.max_message_bytes,
        )
        self.stats.replaced += 1
        self._abandoned_at = None
        self._end_probe()  # it was subscribed on the old socket
        old = self.sock
        view: zmq.Socket[Any] = zmq.Socket.shadow(old.underlying)  # plain reads, any backend
        with contextlib.suppress(zmq.Again):
            for _ in range(self._settings.subscriber_hwm):
                self._pending.append(view.recv_multipart(zmq.NOBLOCK))
        self._close_monitor()
        old.close(linger=0)
        self.sock, self._monitor = self._open()

    def _start_probe(self) -> None:
        # libzmq re-sends the subscriptions on reconnect (a new socket sends them on
        # connect); the probe, subscribed after them on the same pipe, proves they arrived.
        if self._probe is None:
            self._probe = CONTROL_PREFIX + b"probe/" + os.urandom(8).hex().encode()
            self.sock.subscribe(self._probe)
        if self._probe_push is not None:
            self._probe_push.close(linger=0)
        self._probe_push = make_socket(
            self._ctx, zmq.PUSH, self._settings, connect=self._endpoints.ingress
        )
        self._probe_interval = 0.005
        self._probe_next = 0.0

    def _send_probe(self, now: float) -> None:
        assert self._probe is not None and self._probe_push is not None
        with contextlib.suppress(zmq.Again):
            self._probe_push.send(self._probe, zmq.NOBLOCK)
        self._probe_next = now + self._probe_interval
        self._probe_interval = min(self._probe_interval * 2, 0.2)

    def _end_probe(self) -> None:
        if self._probe is not None and not self.sock.closed:
            self.sock.unsubscribe(self._probe)
        self._probe = None
        if self._probe_push is not None:
            self._probe_push.close(linger=0)
            self._probe_push = None

    def _close_monitor(self) -> None:
        if not self._monitor.closed:
            with contextlib.suppress(zmq.ZMQError):
                self.sock.disable_monitor()
            self._monitor.close(linger=0)

    def close(self) -> None:
        """Close the probe and monitor sockets (not :attr:`sock`: its owner closes it)."""
        if self._probe_push is not None:
            self._probe_push.close(linger=0)
            self._probe_push = None
        self._close_monitor()
