"""One forwarding device: two sockets joined by libzmq's steerable proxy loop in a thread.

The sockets are created inside the device's own thread (libzmq sockets are not thread-safe),
and no Python code touches a message once the loop runs. Statistics and termination go
through the loop's control socket, so reading counters never copies a message.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from zbus import TransportError
from zbus._transport import CurveKeys

__all__ = ["Device", "SocketSpec"]

log = logging.getLogger("zbus.proxy")

_U64 = struct.Struct("=Q")
STAT_NAMES = (
    "frontend_frames_in",
    "frontend_bytes_in",
    "frontend_frames_out",
    "frontend_bytes_out",
    "backend_frames_in",
    "backend_bytes_in",
    "backend_frames_out",
    "backend_bytes_out",
)


@dataclass(frozen=True)
class SocketSpec:
    kind: int
    bind: str | tuple[str, ...] | None = None
    connect: tuple[str, ...] = ()
    subscribe: tuple[bytes, ...] = ()
    sndhwm: int | None = None
    rcvhwm: int | None = None
    curve: CurveKeys | None = None
    """Our CURVE keys: tcp binds become CURVE servers; with ``server_key``, connects clients."""
    server_key: bytes | None = None
    close_linger: float = 0.0
    """Seconds the socket may flush when the device stops; >0 where what is queued must not
    be thrown away (a pool link's PUSH into its pool), 0 elsewhere for a prompt stop."""


Prepare = Callable[[zmq.Socket[Any], zmq.Socket[Any]], None]


def start_thread(thread: threading.Thread, ready: threading.Event,
                 error: Callable[[], BaseException | None], what: str, timeout: float) -> None:
    """Start ``thread`` and wait for it to set ``ready``; raise what it failed with (it sets
    its error before ``ready``), or TransportError if it never got ready."""
    thread.start()
    if not ready.wait(timeout):
        raise TransportError(f"{what} did not start within {timeout:g}s")
    failure = error()
    if failure is not None:
        raise failure


class Device:
    """Frontend -> backend through ``zmq.proxy_steerable`` in a daemon thread."""

    def __init__(
        self,
        name: str,
        ctx: zmq.Context[Any],
        make: Callable[[SocketSpec], zmq.Socket[Any]],
        frontend: SocketSpec,
        backend: SocketSpec,
        prepare: Prepare | None = None,
    ) -> None:
        self.name = name
        self._ctx = ctx
        self._make = make
        self._specs = (frontend, backend)
        self._prepare = prepare
        self._control = f"inproc://zbus-device-{name}-{id(self)}"
        self._ready = threading.Event()
        self.last_endpoints: tuple[str, str] = ("", "")
        """Each socket's last bound endpoint (tcp binds come last: the port chosen for ``*``)."""
        self._error: BaseException | None = None
        self.restarts = 0
        """How often the forwarding loop failed and was restarted (logged at ERROR)."""
        self._thread = threading.Thread(target=self._run, name=f"zbus-{name}", daemon=True)

    def start(self, timeout: float = 10.0) -> None:
        start_thread(self._thread, self._ready, lambda: self._error, f"device {self.name}",
                     timeout)

    def _run(self) -> None:
        socks: list[zmq.Socket[Any]] = []
        try:
            control = self._ctx.socket(zmq.REP)
            socks.append(control)
            control.bind(self._control)
            frontend = self._make(self._specs[0])
            socks.append(frontend)
            backend = self._make(self._specs[1])
            socks.append(backend)
            self.last_endpoints = (_last(frontend), _last(backend))
            if self._prepare is not None:
                self._prepare(frontend, backend)
        except BaseException as exc:  # reported to start(), which raises it in the caller
            self._error = exc
            self._ready.set()
            for sock in socks:
                sock.close(linger=0)
            return
        self._ready.set()
        try:
            while True:
                try:
                    zmq.proxy_steerable(frontend, backend, None, control)
                    break  # TERMINATE
                except zmq.ContextTerminated:
                    break
                except zmq.ZMQError as exc:
                    # Whatever a peer made the loop fail on, a plane must not go silent
                    # while the proxy still answers ping: log, count, and forward again.
                    self.restarts += 1
                    log.error("device %s: forwarding loop failed (%s); restarting it (%d)",
                              self.name, exc, self.restarts)
                    time.sleep(min(0.01 * self.restarts, 1.0))  # no hot spin on a repeat
        finally:
            control.close(linger=0)
            for sock, spec in zip((frontend, backend), self._specs, strict=True):
                sock.close(linger=int(spec.close_linger * 1000))

    def _command(self, command: bytes, timeout: float = 2.0) -> list[bytes] | None:
        if not self._thread.is_alive():
            return None
        req = self._ctx.socket(zmq.REQ)
        try:
            req.setsockopt(zmq.LINGER, 0)
            req.connect(self._control)
            req.send(command)
            if not req.poll(int(timeout * 1000)):
                return None
            reply: list[bytes] = req.recv_multipart()
            return reply
        finally:
            req.close(linger=0)

    def statistics(self) -> dict[str, int]:
        reply = self._command(b"STATISTICS")
        if reply is None or len(reply) != len(STAT_NAMES):
            return {}
        return {name: _U64.unpack(frame)[0] for name, frame in zip(STAT_NAMES, reply, strict=True)}

    def final_statistics(self) -> dict[str, int]:
        """Pause the loop (it forwards nothing more), then read its counters: final ones, for a
        device about to stop, so that nothing it moves after the reading goes uncounted."""
        self._command(b"PAUSE")
        return self.statistics()

    def stop(self, timeout: float = 5.0) -> None:
        self._command(b"TERMINATE")
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()


def _last(sock: zmq.Socket[Any]) -> str:
    value = sock.getsockopt(zmq.LAST_ENDPOINT)
    return value.decode() if isinstance(value, bytes) else str(value)
