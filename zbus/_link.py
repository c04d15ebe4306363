"""A consumer's link to its proxy: its socket, watched, and replaced when libzmq gives up.

A subscriber reads from a SUB, a fast-pool member from a PULL, an at-least-once member from
a DEALER. libzmq reconnects each by itself after a connection error (proxy restart,
the proxy dropping it), and a SUB re-sends its subscriptions. After a protocol error -- a frame
above the socket's ZMQ_MAXMSGSIZE, as when a consumer's ``max_message_bytes`` is below its
proxy's -- it ends the session for good: the socket stays open and never hears again. Both
begin with EVENT_DISCONNECTED; they differ in what follows, since libzmq announces a reconnect
(CONNECT_RETRIED, or CONNECTED) at once. A disconnect with no such sign within
``ABANDONED_AFTER`` seconds therefore means libzmq gave up: the link keeps what the old
socket had queued, closes it, and connects a new one (with the same subscriptions).

A proxy that hangs (SIGSTOP, a stuck host) closes nothing, so the consumer's socket alone
would never hear of it. The consumer's socket cannot time its peer out either: libzmq reads
no input while the socket's receive queue is full (a slow consumer), so a ZMTP heartbeat
timeout would cut a healthy connection, and a SUB reading on after that reconnect aborts
the process (libzmq #3937). That socket therefore only pings (IVL, and TTL: the proxy drops
a consumer that stops pinging), and the link keeps a second connection to the same proxy
with the full heartbeats: a PUSH to the proxy's ingress that never carries data (only this
link's probes), so nothing ever fills its queues. Its heartbeat timeout, or a disconnect of
either socket, is one outage: ``disconnects`` counts it and :attr:`ConsumerLink.live` is
False until both connections are up again and, for a subscriber, the probe came back.

After any reconnect a subscriber's link sends a probe through the proxy (the one
``ready()`` uses) until it returns: that proves the subscriptions live again; a pool
member's link is live again when both connections are (an at-least-once member then greets
its pool again if its socket was replaced: the consumer's ``_replaced`` hook). What was
published meanwhile is counted by the consumer core as sequence gaps
(``ConsumerStats.lost``), or for a pool by the proxy (``unaccounted``).

Everything here is non-blocking (``poll(0)``, NOBLOCK) on plain pyzmq sockets of the
backend's context, so the threads, eventlet and asyncio consumers all drive it from their
receive loops; the backend only says how to make its socket.
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
from ._settings import Settings
from ._transport import make_socket

__all__ = ["ABANDONED_AFTER", "CHECK_EVERY", "ConsumerLink", "Linked", "LinkStats"]

log = logging.getLogger("zbus")

# A reconnect is announced within the same libzmq I/O step as the disconnect; this is slack
# for a busy machine, and the cost of a wrong guess is only a new socket.
ABANDONED_AFTER = 1.0
# A SUB's subscriptions travel its send pipe, which drops (silently) what exceeds SNDHWM:
# both when they are first made and when libzmq re-sends them all after a reconnect
# (libzmq #2258). Size the pipe for every subscription, plus room for probes.
_SUB_SLACK = 1000
# How often an otherwise busy consumer looks at its link (messages between looks).
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

    ``disconnects``: outages: the proxy went away (crash, restart), stopped answering
    heartbeats (hung), or this socket refused a frame; ``reconnects``: the connections
    came back (the proxy answers again); ``replaced``: libzmq
    gave up on the connection (a protocol error, such as a frame above
    ``max_message_bytes``) and the socket was replaced by a new one; ``resubscribed``
    (subscribers): a re-probe proved the subscriptions live again after a reconnect;
    ``last_outage``: seconds from the last outage's start until the link was live again
    (subscribers: that proof; pool members: the handshakes), None until the first one.
    Loss during an outage is in ``ConsumerStats.lost`` (as sequence gaps), not here.
    """

    disconnects: int = 0
    reconnects: int = 0
    replaced: int = 0
    resubscribed: int = 0
    last_outage: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class ConsumerLink(Generic[SocketT]):
    """The socket a consumer reads from its proxy (:attr:`sock`, which :meth:`check` may
    replace): a subscriber's SUB (``prefixes`` are its subscriptions), a fast-pool member's
    PULL, or an at-least-once member's DEALER (which must greet its pool again on a new
    socket: :meth:`check` says when it was replaced)."""

    def __init__(
        self,
        new_socket: Callable[..., SocketT],
        ctx: zmq.Context[Any],
        settings: Settings,
        pending: deque[list[bytes]],
        *,
        kind: int,
        endpoint: str,
        ingress: str,
        prefixes: list[bytes] | None = None,
    ) -> None:
        """``new_socket(**options)`` makes an unconnected socket of the backend's kind with
        zbus's options (:func:`zbus._transport.make_socket`); ``ctx`` is a plain context on
        the same libzmq context, for the monitor and probe sockets; ``endpoint`` is where
        the socket connects, ``ingress`` where probes are sent; what the old socket had
        queued when it is replaced goes to ``pending``."""
        self.stats = LinkStats()
        self._new_socket = new_socket
        self._ctx = ctx
        self._settings = settings
        self._pending = pending
        self._endpoint = endpoint
        self._ingress = ingress
        self._kind = kind
        self._prefixes = prefixes or []
        self.connected = False
        """True from the first handshake with the proxy on."""
        self._down_since: float | None = None
        self._abandoned_at: float | None = None  # when to give the connection up for lost
        self._probe: bytes | None = None
        self._probe_next = 0.0
        self._probe_interval = 0.0
        self._up = False  # the consumer's socket has a live connection
        self._beat_up = False  # ... and so has the heartbeat socket
        self._returning = False  # both came back after an outage (a probe may be out)
        self._beat, self._beat_monitor = self._open_beat()
        self.sock, self.monitor = self._open()

    @property
    def live(self) -> bool:
        """False from a lost connection until it is proven live again (a subscriber's
        probe came back; other kinds: the handshake)."""
        return self._down_since is None

    def max_wait(self) -> float:
        """How long a receive loop may wait for a message before calling :meth:`check`."""
        busy = self._probe is not None or self._abandoned_at is not None
        return _BUSY_WAIT if busy else MAX_WAIT

    def _open(self) -> tuple[SocketT, zmq.Socket[Any]]:
        if self._kind == zmq.SUB:
            sock = self._new_socket(
                kind=zmq.SUB, sndhwm=_SUB_SLACK + 2 * len(self._prefixes),
                rcvhwm=self._settings.subscriber_hwm, heartbeat_timeout=False,
            )
        elif self._kind == zmq.PULL:
            sock = self._new_socket(kind=zmq.PULL, rcvhwm=self._settings.pool_hwm,
                                    heartbeat_timeout=False)
        else:
            sock = self._new_socket(kind=self._kind, heartbeat_timeout=False)
        monitor = self._watch(sock)
        sock.connect(self._endpoint)
        for prefix in self._prefixes:
            sock.subscribe(prefix)
        return sock, monitor

    def _open_beat(self) -> tuple[zmq.Socket[Any], zmq.Socket[Any]]:
        beat = make_socket(self._ctx, zmq.PUSH, self._settings, heartbeat_timeout=True)
        monitor = self._watch(beat)
        beat.connect(self._ingress)
        return beat, monitor

    def _watch(self, sock: zmq.Socket[Any]) -> zmq.Socket[Any]:
        """A monitor on ``sock``, connected before ``sock`` connects: no event is missed."""
        address = f"inproc://zbus-link-{os.urandom(8).hex()}"
        sock.monitor(address, _EVENTS)
        monitor: zmq.Socket[Any] = self._ctx.socket(zmq.PAIR)
        monitor.connect(address)
        return monitor

    def check(self) -> bool:
        """Read link events, re-send an outstanding probe when due, and replace the socket
        if libzmq gave up on it. Returns True when :attr:`sock` is a new socket."""
        now = time.monotonic()
        # Each monitor's events are in order, but not the two monitors' against each other
        # (one may hold events older than the other's): whether both connections are up is
        # decided once both are read. Only the consumer's own socket can come back and be
        # lost again within one look (a new socket cut at once): that is two outages.
        back_unseen = False  # this socket's handshake, during an outage, not acted on yet
        while self.monitor.poll(0):
            event = parse_monitor_message(self.monitor.recv_multipart())["event"]
            if event == zmq.EVENT_DISCONNECTED:
                self._up = False
                if back_unseen:
                    self.stats.reconnects += 1
                    self.stats.disconnects += 1
                    back_unseen = False
                self._lost(now)
                self._abandoned_at = now + ABANDONED_AFTER
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._abandoned_at = None
                self.connected = self._up = True
                back_unseen = self._down_since is not None
            else:  # CONNECT_RETRIED, CONNECTED: libzmq is reconnecting by itself
                self._abandoned_at = None
        while self._beat_monitor.poll(0):
            event = parse_monitor_message(self._beat_monitor.recv_multipart())["event"]
            if event == zmq.EVENT_DISCONNECTED:  # the proxy hung, or went away
                self._beat_up = False
                self._lost(now)
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._beat_up = True
        self._rejoin(now)
        replaced = self._abandoned_at is not None and now >= self._abandoned_at
        if replaced:
            self._replace()
        if self._probe is not None and self._returning and now >= self._probe_next:
            self._send_probe(now)
        return replaced

    def _rejoin(self, now: float) -> None:
        """After an outage, both connections are up: a member is back; a subscriber probes."""
        if self._down_since is None or self._returning or not (self._up and self._beat_up):
            return
        self._returning = True
        self.stats.reconnects += 1
        if self._kind == zmq.SUB:
            self._start_probe()
        else:
            self._back(now)

    def _lost(self, now: float) -> None:
        """One of the two connections went down: an outage begins, unless one is on."""
        self._returning = False
        if self._down_since is None:
            self._down_since = now
            self.stats.disconnects += 1

    def took_probe(self, frame: bytes) -> bool:
        """True when ``frame`` (a one-frame message) is this link's probe, back: the
        subscriptions are live again."""
        if frame != self._probe:
            return False
        self._end_probe()
        self._back(time.monotonic())
        self.stats.resubscribed += 1
        return True

    def _back(self, now: float) -> None:
        self._returning = False
        if self._down_since is not None:
            self.stats.last_outage = now - self._down_since
            self._down_since = None

    def _replace(self) -> None:
        log.warning(
            "zbus: the connection to %s ended for good (a protocol error, such as a frame "
            "above this consumer's max_message_bytes=%d: keep it at least the proxy's); "
            "reconnecting with a new socket",
            self._endpoint,
            self._settings.max_message_bytes,
        )
        self.stats.replaced += 1
        self._abandoned_at = None
        self._end_probe()  # it was subscribed on the old socket
        old = self.sock
        view: zmq.Socket[Any] = zmq.Socket.shadow(old.underlying)  # plain reads, any backend
        with contextlib.suppress(zmq.Again):
            for _ in range(self._settings.subscriber_hwm + self._settings.pool_hwm):
                self._pending.append(view.recv_multipart(zmq.NOBLOCK))
        self._close_monitor()
        old.close(linger=0)
        self._up = self._returning = False
        self.sock, self.monitor = self._open()

    def _start_probe(self) -> None:
        # libzmq re-sends the subscriptions on reconnect (a new socket sends them on
        # connect); the probe, subscribed after them on the same pipe, proves they arrived.
        # The heartbeat socket carries it to the proxy's ingress: it is up, as we are here.
        if self._probe is None:
            self._probe = CONTROL_PREFIX + b"probe/" + os.urandom(8).hex().encode()
            self.sock.subscribe(self._probe)
        self._probe_interval = 0.005
        self._probe_next = 0.0

    def _send_probe(self, now: float) -> None:
        assert self._probe is not None
        with contextlib.suppress(zmq.Again):
            self._beat.send(self._probe, zmq.NOBLOCK)
        self._probe_next = now + self._probe_interval
        self._probe_interval = min(self._probe_interval * 2, 0.2)

    def _end_probe(self) -> None:
        if self._probe is not None and not self.sock.closed:
            self.sock.unsubscribe(self._probe)
        self._probe = None

    def _close_monitor(self) -> None:
        if not self.monitor.closed:
            with contextlib.suppress(zmq.ZMQError):
                self.sock.disable_monitor()
            self.monitor.close(linger=0)

    def close(self) -> None:
        """Close the heartbeat and monitor sockets (not :attr:`sock`: its owner closes it)."""
        if not self._beat.closed:
            with contextlib.suppress(zmq.ZMQError):
                self._beat.disable_monitor()
            self._beat_monitor.close(linger=0)
            self._beat.close(linger=0)
        self._close_monitor()


class Linked:
    """What every backend's consumers show of their link (mixed into their base classes)."""

    _link: ConsumerLink[Any]

    @property
    def live(self) -> bool:
        """False from a lost connection to the proxy until it is proven live again."""
        return self._link.live

    @property
    def link(self) -> LinkStats:
        """What the connection to the proxy went through (docs/RELIABILITY.md)."""
        return self._link.stats
