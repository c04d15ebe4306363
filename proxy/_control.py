"""The local control socket: a REP on the run directory's ``control.sock``, in one thread.

Owns the request format (one msgpack map with an ``op``), the ops this socket serves
(``CONTROL_OPS``), the checks of each op's fields, and the error replies; each op then calls
the proxy, its pools' members or its federation. A control request never kills the proxy:
errors become ``{"ok": False, "error": ...}``.

Without federation this thread also reads the fast pools' member monitors (with federation
the manager thread reads them, and reconciles links on each event), and it publishes again
the beacons publishers left with the proxy (``_beacons``), through its own PUB into the
delivery plane.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any, TypeGuard

import msgpack
import zmq

from zbus import ConfigError, ProxyError
from zbus._transport import make_socket

from ._beacons import BeaconStore
from ._federation import PROBE_PREFIX
from ._members import FRAMES_PER_MESSAGE, MAX_FRAMES, MAX_SPAN

if TYPE_CHECKING:
    from ._proxy import Proxy

__all__ = ["CONTROL_OPS", "ControlServer"]

log = logging.getLogger("zbus.proxy")

CONTROL_OPS = ("ping", "stats", "pools", "declare_pool", "declare_reliable_pool",
               "remove_pool", "dead_letters", "replay_dead_letters", "purge_dead_letters",
               "reflect", "pool_receipts", "beacons")
"""Every op the local control socket serves (named in the unknown-op error)."""
_RELIABLE_FIELDS = {"op", "name", "bindings", "ack_timeout", "max_attempts"}
_REMOVE_FIELDS = {"op", "name", "fabric"}
_TAKE_DEAD_FIELDS = {"op", "name", "before", "limit"}
MAX_TAKE_DEAD = 1000
"""Dead letters one ``replay_dead_letters`` or ``purge_dead_letters`` request may move (a
client repeats it for more): the pool's lock is held that long, and no longer."""
MAX_DEAD_POSITION = 2**63 - 1
"""The largest ``before`` position a request may name (positions count up from 0)."""
MAX_REPORT_STREAMS = 1000
"""Streams one ``pool_receipts`` report may carry (a member sends the rest next time)."""
_MAX_SEQUENCE = 2**64 - 1
_STREAM_ENTRY = ("pool_receipts: streams must be a list of at most "
                 f"{MAX_REPORT_STREAMS} [publisher_id, stream_id, count, lowest, highest]")


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def check_streams(streams: Any) -> list[list[Any]]:
    """A report's ``streams`` field, every entry type- and range-checked (docs/PROTOCOL.md,
    section 8, "Pool receipts"); ConfigError saying what is wrong."""
    if not isinstance(streams, list):
        raise ConfigError(_STREAM_ENTRY)
    if len(streams) > MAX_REPORT_STREAMS:
        raise ConfigError(f"pool_receipts: at most {MAX_REPORT_STREAMS} streams per report, "
                          f"not {len(streams)} (send the rest in the next report)")
    for entry in streams:
        if not isinstance(entry, list) or len(entry) != 5:
            raise ConfigError(_STREAM_ENTRY)
        publisher_id, stream_id, count, lowest, highest = entry
        if not isinstance(publisher_id, str) or not 0 < len(publisher_id) <= 255:
            raise ConfigError("pool_receipts: a stream's publisher_id is a string of 1 to "
                              "255 characters")
        if not isinstance(stream_id, bytes) or len(stream_id) != 8:
            raise ConfigError("pool_receipts: a stream's stream_id is 8 bytes (msgpack bin)")
        if not _is_int(count) or count < 0:
            raise ConfigError("pool_receipts: a stream's count is an integer >= 0")
        if not _is_int(lowest) or not 1 <= lowest <= _MAX_SEQUENCE:
            raise ConfigError("pool_receipts: a stream's lowest is a sequence, 1 to 2^64-1")
        if not _is_int(highest) or not 0 <= highest <= _MAX_SEQUENCE:
            raise ConfigError("pool_receipts: a stream's highest is 0 to 2^64-1")
        if lowest > highest + 1:
            raise ConfigError("pool_receipts: a stream's lowest is at most highest + 1 "
                              "(equal to it when only a beacon was read)")
        span = highest - lowest + 1
        if span > MAX_SPAN:
            raise ConfigError(f"pool_receipts: a stream's span (highest - lowest + 1) is at "
                              f"most {MAX_SPAN}")
        if count > span:
            raise ConfigError("pool_receipts: a stream's count is at most its span, "
                              "highest - lowest + 1")
    return streams


class ControlServer:
    """The control socket's thread and request handling, for ``proxy``."""

    def __init__(self, proxy: Proxy) -> None:
        self._proxy = proxy
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self.beacons = BeaconStore()
        self._next_scan = 0.0  # when to look for beacon files again
        self.subscriptions = 0
        """Distinct prefixes this host's subscribers hold (the fan-in's subscriptions)."""
        self.subscription_bytes = 0

    def start(self) -> None:
        """Start the thread; return once the socket is bound."""
        # Guarded: an error out of the loop ends the proxy (proxy/_guard.py), never just
        # this thread, after which every Subscriber.ready() and pool member timed out.
        self._thread = threading.Thread(
            target=self._proxy.health.guard("zbus-control", self._serve),
            name="zbus-control", daemon=True)
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
        # Beacons go out again into this host's delivery plane (its fan-in subscribes here):
        # to its subscribers, filtered by their subscriptions, and to nothing else. An XPUB,
        # so that the subscriptions the fan-in passes up (each distinct prefix this host's
        # subscribers hold, as it asks the origin and every peer for it) are counted here.
        again = make_socket(proxy._ctx, zmq.XPUB, proxy.settings, sndhwm=10_000,
                            bind=proxy.beacons_endpoint)
        # Without federation there is no manager thread: the pools' member monitors are read
        # here (with federation the manager reads them, and reconciles links on each event).
        monitors: dict[zmq.Socket[Any], str] = {}
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(again, zmq.POLLIN)
        self._ready.set()
        try:
            while not proxy._stopping.is_set():
                if proxy.federation is None:
                    for name, reader in proxy._pool_members.new_monitors():
                        monitors[reader] = name
                        poller.register(reader, zmq.POLLIN)
                    # A removed pool's (removed by a request this thread handled: its
                    # events were all read before, and none of a new pool's are lost).
                    for reader in proxy._pool_members.stale(list(monitors)):
                        poller.unregister(reader)
                        del monitors[reader]
                        reader.close(linger=0)
                ready = dict(poller.poll(100))
                if again in ready:
                    self._count_subscriptions(again)
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
                    sock.send(self._encode(reply))
                except zmq.ZMQError:
                    # Peer gone mid-request (REP drops the reply itself): keep serving.
                    log.debug("control socket error", exc_info=True)
        finally:
            for reader in monitors:
                reader.close(linger=0)
            sock.close(linger=0)
            again.close(linger=0)

    @staticmethod
    def _encode(reply: dict[str, Any]) -> bytes:
        """``reply`` as msgpack; a reply that does not encode (a number beyond 64 bits)
        becomes an error reply, never an exception out of this thread."""
        try:
            return bytes(msgpack.packb(reply))
        except (OverflowError, ValueError, TypeError) as exc:
            log.exception("control reply did not encode")
            return bytes(msgpack.packb({"ok": False, "error": f"internal error: the reply "
                                                              f"did not encode ({exc})"}))

    def _publish_beacons(self, again: zmq.Socket[Any]) -> None:
        now = time.monotonic()
        if now >= self._next_scan:
            self._next_scan = now + 1.0
            self.beacons.take_files(self._proxy.endpoints.beacons_dir, now)
        for frames in self.beacons.due(now):
            again.send_multipart(frames, zmq.NOBLOCK)  # a PUB never waits

    def _count_subscriptions(self, again: zmq.Socket[Any]) -> None:
        # The fan-in passes a prefix up when the first subscriber takes it and its
        # cancellation when the last one leaves: these counts are the distinct prefixes
        # held now. Drained to the end: an XPUB keeps what it was not asked for.
        while True:
            try:
                frame = again.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if not frame or frame[0] not in (0, 1):
                continue
            sign = 1 if frame[0] == 1 else -1
            self.subscriptions += sign
            self.subscription_bytes += sign * (len(frame) - 1)

    def subscription_stats(self) -> dict[str, int]:
        return {"prefixes": self.subscriptions, "bytes": self.subscription_bytes}

    def beacon_stats(self) -> dict[str, int]:
        return self.beacons.stats()

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
                return {"ok": True, "pools": proxy.pools, "reliable_pools": proxy.reliable_pools,
                        "generations": proxy.pool_generations, "removed": proxy.removed_pools}
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
            if op == "remove_pool":
                unknown = sorted(set(request) - _REMOVE_FIELDS)
                if unknown:
                    raise ConfigError(f"remove_pool takes name and fabric, not "
                                      f"{', '.join(map(str, unknown))}")
                removed = proxy.remove_pool(request.get("name"),  # type: ignore[arg-type]
                                            fabric=request.get("fabric", False))
                return {"ok": True, **removed}
            if op == "dead_letters":
                return {"ok": True, **proxy._dead_letter_page(
                    request.get("name"), request.get("start", 0), request.get("limit", 100))}
            if op in ("replay_dead_letters", "purge_dead_letters"):
                return {"ok": True, **self._take_dead_letters(
                    request, replay=op == "replay_dead_letters")}
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

    def _take_dead_letters(self, request: dict[str, Any], *, replay: bool) -> dict[str, Any]:
        """``replay_dead_letters`` / ``purge_dead_letters``: the oldest dead letters of pool
        ``name`` at positions below ``before`` (absent: every one held now), at most ``limit``
        (1 to ``MAX_TAKE_DEAD``, default that), back into the pool's queue or gone. Every
        field is checked before anything moves; a refused request for a pool that exists is
        counted in its ``dead_letter_requests_refused``."""
        op = request.get("op")
        pool = self._proxy._reliable_pool(request.get("name"))  # names the pools if unknown
        try:
            unknown = sorted(set(request) - _TAKE_DEAD_FIELDS)
            if unknown:
                raise ConfigError(f"{op} takes name, before and limit, not "
                                  f"{', '.join(map(str, unknown))}")
            before = request.get("before")
            if before is not None and (not _is_int(before)
                                       or not 0 <= before <= MAX_DEAD_POSITION):
                raise ConfigError(f"{op}: before must be a position from 0 to "
                                  f"{MAX_DEAD_POSITION} (or absent: every one held now)")
            limit = request.get("limit", MAX_TAKE_DEAD)
            if not _is_int(limit) or not 1 <= limit <= MAX_TAKE_DEAD:
                raise ConfigError(f"{op}: limit must be an integer from 1 to {MAX_TAKE_DEAD} "
                                  "(repeat the request for more)")
        except ConfigError:
            pool.refused_request()
            raise
        taken = pool.take_dead_letters(before, limit, replay=replay)
        log.info("%s: %s of at-least-once pool %s", op,
                 taken.get("replayed", taken.get("purged")), pool.name)
        return taken

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
        under its random ``member`` id; ``final`` when it closes; ``streams`` (optional),
        its books of the streams that changed. Every field is checked before anything is
        taken; a refused report is counted (per pool when it names one)."""
        members = self._proxy._pool_members
        pool = request.get("pool")
        known = pool if isinstance(pool, str) and pool in self._proxy.pools else None
        try:
            if known is None:
                raise ConfigError(f"pool_receipts: no fast pool {pool!r}")
            member = request.get("member")
            received, final = request.get("received"), request.get("final", False)
            if not isinstance(member, str) or not 0 < len(member) <= 64:
                raise ConfigError(
                    "pool_receipts: member must be a string of 1 to 64 characters")
            if not _is_int(received) or not 0 <= received <= MAX_FRAMES // FRAMES_PER_MESSAGE:
                raise ConfigError(f"pool_receipts: received must be an integer >= 0 and "
                                  f"<= {MAX_FRAMES // FRAMES_PER_MESSAGE}")
            frames = request.get("frames", received * FRAMES_PER_MESSAGE)
            if not _is_int(frames) or not received * FRAMES_PER_MESSAGE <= frames <= MAX_FRAMES:
                raise ConfigError(f"pool_receipts: frames must be an integer >= 3 * received "
                                  f"and <= {MAX_FRAMES}")
            if not isinstance(final, bool):
                raise ConfigError("pool_receipts: final must be true or false")
            streams = request.get("streams")
            if streams is not None:
                streams = check_streams(streams)
            members.record(known, member, received, frames, final, streams)
        except ConfigError:
            members.refused(known)
            raise
