"""The local control socket: a REP on the run directory's ``control.sock``, in one thread.

Owns the request format (one msgpack map with an ``op``), the ops this socket serves
(``CONTROL_OPS``), the checks of each op's fields, and the error replies; each op then calls
the proxy, its pools' members or its federation. A control request never kills the proxy:
errors become ``{"ok": False, "error": ...}``.

Without federation this thread also reads the fast pools' member monitors (with federation
the manager thread reads them, and reconciles links on each event), and it publishes again
the beacons publishers left with the proxy (``_beacons``), through its own PUSH on the
ingress.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

import msgpack
import zmq

from zbus import ConfigError, ProxyError
from zbus._transport import make_socket

from ._beacons import BeaconStore
from ._federation import PROBE_PREFIX
from ._members import FRAMES_PER_MESSAGE

if TYPE_CHECKING:
    from ._proxy import Proxy

__all__ = ["CONTROL_OPS", "ControlServer"]

log = logging.getLogger("zbus.proxy")

CONTROL_OPS = ("ping", "stats", "pools", "declare_pool", "declare_reliable_pool",
               "dead_letters", "reflect", "pool_receipts", "beacons")
"""Every op the local control socket serves (named in the unknown-op error)."""
_RELIABLE_FIELDS = {"op", "name", "bindings", "ack_timeout", "max_attempts"}


class ControlServer:
    """The control socket's thread and request handling, for ``proxy``."""

    def __init__(self, proxy: Proxy) -> None:
        self._proxy = proxy
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self.beacons = BeaconStore()
        self.beacons_dropped = 0  # due again, but the ingress took nothing (proxy overloaded)
        self._next_scan = 0.0  # when to look for beacon files again

    def start(self) -> None:
        """Start the thread; return once the socket is bound."""
        self._thread = threading.Thread(target=self._serve, name="zbus-control", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise ProxyError("the control socket did not start")

    def join(self, timeout: float) -> None:
        """Wait for the thread to end (the proxy's stop event is set)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def _serve(self) -> None:
        proxy = self._proxy
        assert proxy._ctx is not None
        sock = make_socket(proxy._ctx, zmq.REP, proxy.settings, bind=proxy.endpoints.control)
        # Beacons go out again through the ingress, like any publisher's message.
        again = make_socket(proxy._ctx, zmq.PUSH, proxy.settings, sndhwm=1000,
                            connect=proxy.endpoints.ingress)
        # Without federation there is no manager thread: the pools' member monitors are read
        # here (with federation the manager reads them, and reconciles links on each event).
        monitors: dict[zmq.Socket[Any], str] = {}
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        self._ready.set()
        try:
            while not proxy._stopping.is_set():
                if proxy.federation is None:
                    for name, reader in proxy._pool_members.new_monitors():
                        monitors[reader] = name
                        poller.register(reader, zmq.POLLIN)
                ready = dict(poller.poll(100))
                self._publish_beacons(again)
                for reader, name in monitors.items():
                    while reader in ready:
                        try:
                            proxy._pool_members.event(name, reader.recv_multipart(zmq.NOBLOCK))
                        except zmq.Again:
                            break
                if sock not in ready:
                    continue
                try:
                    # All frames: REP refuses to reply (EFSM) until the whole request is read,
                    # so a multi-frame request read with recv() would kill this thread.
                    frames = sock.recv_multipart()
                    if len(frames) == 1:
                        reply = self._handle(frames[0])
                    else:
                        reply = {"ok": False, "error": f"a control request is one frame, "
                                                       f"not {len(frames)}"}
                    sock.send(msgpack.packb(reply))
                except zmq.ZMQError:
                    # Peer gone mid-request (REP drops the reply itself): keep serving.
                    log.debug("control socket error", exc_info=True)
        finally:
            for reader in monitors:
                reader.close(linger=0)
            sock.close(linger=0)
            again.close(linger=0)

    def _publish_beacons(self, again: zmq.Socket[Any]) -> None:
        now = time.monotonic()
        if now >= self._next_scan:
            self._next_scan = now + 1.0
            self.beacons.take_files(self._proxy.endpoints.beacons_dir, now)
        for frames in self.beacons.due(now):
            try:
                again.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:
                self.beacons_dropped += 1

    def beacon_stats(self) -> dict[str, int]:
        return {**self.beacons.stats(), "dropped": self.beacons_dropped}

    def _handle(self, raw: bytes) -> dict[str, Any]:
        proxy = self._proxy
        try:
            try:
                request = msgpack.unpackb(raw, raw=False, strict_map_key=True)
            except Exception as exc:  # msgpack raises several types, some with no text
                raise ConfigError(
                    f"a control request is a msgpack map with an 'op', and this is not "
                    f"valid msgpack ({type(exc).__name__}: {exc})"
                ) from None
            if not isinstance(request, dict):
                raise ConfigError("a control request is a msgpack map with an 'op'")
            op = request.get("op")
            if op == "ping":
                return {"ok": True, "pid": os.getpid()}
            if op == "stats":
                return {"ok": True, **proxy.stats()}
            if op == "pools":
                return {"ok": True, "pools": proxy.pools, "reliable_pools": proxy.reliable_pools}
            if op == "declare_pool":
                proxy.declare_pool(request.get("name"), request.get("bindings"))  # type: ignore[arg-type]
                return {"ok": True}
            if op == "declare_reliable_pool":
                unknown = sorted(set(request) - _RELIABLE_FIELDS)
                if unknown:
                    raise ConfigError(
                        f"declare_reliable_pool takes name, bindings, ack_timeout and "
                        f"max_attempts, not {', '.join(map(str, unknown))}"
                    )
                created = proxy.declare_reliable_pool(
                    request.get("name"), request.get("bindings"),  # type: ignore[arg-type]
                    ack_timeout=request.get("ack_timeout"),
                    max_attempts=request.get("max_attempts"),
                )
                return {"ok": True, "created": created}
            if op == "dead_letters":
                return {"ok": True, **proxy._dead_letter_page(
                    request.get("name"), request.get("start", 0), request.get("limit", 100))}
            if op == "reflect":
                return {"ok": True, "peers": self._reflect(request.get("token"))}
            if op == "pool_receipts":
                self._pool_receipts(request)
                return {"ok": True}
            if op == "beacons":
                refused = self.beacons.add(request.get("beacons"), time.monotonic())
                return {"ok": True, "refused": refused}
            raise ConfigError(
                f"unknown control op {op!r} (known: {', '.join(CONTROL_OPS)})"
            )
        except (ConfigError, ValueError, TypeError) as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a control request must never kill the proxy
            log.exception("control request failed")
            return {"ok": False, "error": f"internal error: {exc}"}

    def _reflect(self, token: Any) -> list[str]:
        """Ask every live peer to publish ``token`` (plus its id) on its own origin
        (``Federation.reflect``); none without federation."""
        if not isinstance(token, bytes) or not token.startswith(PROBE_PREFIX) \
                or len(token) > 128:
            raise ConfigError(f"a reflect token is bytes starting with {PROBE_PREFIX!r}")
        federation = self._proxy._federation
        if federation is None:
            return []
        return federation.reflect(token)

    def _pool_receipts(self, request: dict[str, Any]) -> None:
        """A fast-pool member's report: the cumulative counts of messages (``received``) and
        frames (``frames``, optional: 3 per message if absent) it read from the pool socket,
        under its random ``member`` id; ``final`` when it closes."""
        pool, member = request.get("pool"), request.get("member")
        received, final = request.get("received"), request.get("final", False)
        if not isinstance(member, str) or not 0 < len(member) <= 64:
            raise ConfigError("pool_receipts: member must be a string of 1 to 64 characters")
        if isinstance(received, bool) or not isinstance(received, int) or received < 0:
            raise ConfigError("pool_receipts: received must be an integer >= 0")
        frames = request.get("frames", received * FRAMES_PER_MESSAGE)
        if (isinstance(frames, bool) or not isinstance(frames, int)
                or frames < received * FRAMES_PER_MESSAGE):
            raise ConfigError("pool_receipts: frames must be an integer >= 3 * received")
        if not isinstance(final, bool):
            raise ConfigError("pool_receipts: final must be true or false")
        if pool not in self._proxy.pools:
            raise ConfigError(f"pool_receipts: no fast pool {pool!r}")
        self._proxy._pool_members.record(pool, member, received, frames, final)
