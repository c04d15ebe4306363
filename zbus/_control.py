"""Client side of the proxy's control socket (pool declarations, stats, liveness).

Requests and replies are single msgpack maps. A request is ``{"op": NAME, ...}``; a reply is
``{"ok": true, ...}`` or ``{"ok": false, "error": TEXT}``. Each request uses a fresh REQ
socket, so a proxy that died mid-request never leaves a REQ stuck in the wrong state.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import time
from typing import Any

import msgpack
import zmq

from ._errors import ProxyError, Timeout
from ._names import CONTROL_PREFIX
from ._settings import Endpoints, Settings
from ._transport import make_socket

__all__ = [
    "ControlClient",
    "decode_reply",
    "encode_request",
    "missing_proxy",
    "no_answer",
    "unreachable",
    "wait_for_peers",
]


def encode_request(op: str, **fields: Any) -> bytes:
    return bytes(msgpack.packb({"op": op, **fields}))


def decode_reply(op: str, raw: bytes) -> dict[str, Any]:
    """The reply's map; ProxyError when the proxy refused ``op`` or answered garbage."""
    try:
        reply = msgpack.unpackb(raw, raw=False)
    except Exception as exc:  # msgpack raises several types
        raise ProxyError(f"zbus-proxy answered {op!r} with invalid msgpack: {exc}") from None
    if not isinstance(reply, dict) or not reply.get("ok"):
        error = reply.get("error") if isinstance(reply, dict) else repr(reply)
        raise ProxyError(f"zbus-proxy refused {op!r}: {error}")
    return reply


def _start_hint(endpoints: Endpoints) -> str:
    return (f"start one with 'zbus-proxy --run-dir {endpoints.run_dir}', or use the run "
            "directory your proxy serves")


def missing_proxy(endpoints: Endpoints) -> str | None:
    """Why no zbus-proxy can be on ``endpoints`` by the files alone (no such run directory,
    a file in its place, no proxy socket in it), or None. Sockets left by a proxy that was
    killed pass: one restarting on them is served as soon as it is back."""
    run_dir = endpoints.run_dir
    try:
        info = os.stat(run_dir)
    except FileNotFoundError:
        return f"no zbus-proxy runs on {run_dir}: there is no such directory; " + \
            _start_hint(endpoints)
    except NotADirectoryError:
        return (f"no zbus-proxy runs on {run_dir}: a part of that path is a file, not a "
                "directory; " + _start_hint(endpoints))
    except OSError as exc:
        return f"cannot reach the run directory {run_dir}: {exc.strerror}"
    if not stat.S_ISDIR(info.st_mode):
        return (f"{run_dir} is a file, not a run directory: give the directory a zbus-proxy "
                "runs on")
    if not any(os.path.lexists(sock[len("ipc://"):])
               for sock in (endpoints.control, endpoints.ingress, endpoints.deliver)):
        return (f"no zbus-proxy runs on {run_dir}: it has no control.sock (a proxy removes "
                "its sockets when it stops); " + _start_hint(endpoints))
    return None


def unreachable(endpoints: Endpoints) -> str | None:
    """Why nothing can answer on ``endpoints``' control socket, found at once (no such run
    directory, no control socket, a socket this user may not open, a socket nothing listens
    on), or None when a proxy may be there.

    One connect on a unix socket tells the cases apart: ENOENT, EACCES or ECONNREFUSED
    come back at once, where ZeroMQ's connect would retry in silence until a timeout."""
    cause = missing_proxy(endpoints)
    if cause is not None:
        return cause
    run_dir = endpoints.run_dir
    path = endpoints.control[len("ipc://"):]
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)  # a full backlog (a stuck proxy) must not block the probe
    try:
        probe.connect(path)
    except FileNotFoundError:
        return (f"no zbus-proxy runs on {run_dir}: it has no control.sock (a proxy removes "
                "its sockets when it stops); " + _start_hint(endpoints))
    except PermissionError:
        try:
            sock = os.stat(path)
            owner = f" (owner uid {sock.st_uid}, mode {stat.S_IMODE(sock.st_mode):04o})"
        except OSError:
            owner = ""
        return (f"permission denied on {path}{owner}: uid {os.getuid()} may not use this "
                "proxy's sockets; run as the proxy's user, or as a member of its group with "
                "a run directory of mode 0750 (docs/OPERATING.md)")
    except ConnectionRefusedError:
        return (f"no zbus-proxy runs on {run_dir}: nothing listens on {path}, left by a "
                "proxy that was killed; " + _start_hint(endpoints))
    except TimeoutError:
        return None  # accepted no connection within the second: a stuck proxy, not absent
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
            return None  # a listener whose backlog is full: a busy proxy, not an absent one
        return f"cannot reach {path}: {exc.strerror}"
    finally:
        probe.close()
    return None


def no_answer(endpoints: Endpoints, settings: Settings, op: str, timeout: float) -> Timeout:
    """The error for a control request that got no reply within ``timeout``: what
    :func:`unreachable` finds, else a proxy that took the request and did not answer."""
    cause = unreachable(endpoints)
    if cause is not None:
        return Timeout(cause)
    text = (f"zbus-proxy on {endpoints.run_dir} did not answer {op!r} within {timeout:g}s: "
            "it is busy or stuck (see its log), or it is not a zbus-proxy")
    if op == "dead_letters":
        text += (f"; or the page of dead letters is larger than this connection's "
                 f"max_message_bytes={settings.max_message_bytes}: ask with a connection "
                 "whose limit is the proxy's")
    return Timeout(text)


class ControlClient:
    def __init__(
        self, endpoints: Endpoints, settings: Settings, ctx: zmq.Context[Any]
    ) -> None:
        self.endpoints = endpoints
        self.settings = settings
        self.ctx = ctx

    def check(self) -> None:
        """Raise ProxyError at once when nothing can answer (:func:`unreachable`): for a
        command a user waits on. A service keeps to :meth:`request`, which waits for a proxy
        that is restarting."""
        cause = unreachable(self.endpoints)
        if cause is not None:
            raise ProxyError(cause)

    def request(self, op: str, timeout: float = 5.0, **fields: Any) -> dict[str, Any]:
        sock = make_socket(self.ctx, zmq.REQ, self.settings, connect=self.endpoints.control)
        try:
            sock.send(encode_request(op, **fields))
            if not sock.poll(int(timeout * 1000)):
                raise no_answer(self.endpoints, self.settings, op, timeout)
            return decode_reply(op, sock.recv())
        finally:
            sock.close(linger=0)


def wait_for_peers(
    endpoints: Endpoints, settings: Settings, ctx: zmq.Context[Any], timeout: float = 10.0
) -> list[str]:
    """Return once subscriptions made (and proven live locally) before this call have reached
    the origin of every peer proxy that answers; the peers' ids. Raises Timeout.

    Why this proves it: a subscription leaves the local proxy's fan-in on every peer link at
    once, and each link carries subscriptions upstream in order. This function subscribes a
    fresh probe topic *after* the caller's subscriptions were proven live at the local proxy
    (``Subscriber.ready()``), so on every link the probe's subscription travels behind
    them. It then asks the local proxy to have each live peer publish the probe on that
    peer's own origin; a copy that comes back from a peer means the peer's origin had the
    probe's subscription, and so the caller's too. A single-host proxy answers with no
    peers, and this returns at once.
    """
    token = CONTROL_PREFIX + b"probe/peers-" + os.urandom(8).hex().encode()
    client = ControlClient(endpoints, settings, ctx)
    sub = make_socket(ctx, zmq.SUB, settings, connect=endpoints.deliver)
    deadline = time.monotonic() + timeout
    seen: set[str] = set()
    interval = 0.01
    try:
        sub.subscribe(token)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Timeout(
                    f"the subscription did not reach every peer proxy within {timeout:g}s "
                    f"(came back from {sorted(seen)})"
                )
            # The caller's time, not a fixed cap: a busy proxy answering late still counts.
            expected = client.request("reflect", timeout=left, token=token)["peers"]
            if set(expected) <= seen:
                return sorted(expected)
            until = min(time.monotonic() + interval, deadline)
            while (wait := until - time.monotonic()) > 0 and sub.poll(int(wait * 1000) + 1):
                frames = sub.recv_multipart()
                if len(frames) == 2 and frames[0] == token:
                    seen.add(frames[1].decode(errors="replace"))
            interval = min(interval * 2, 0.25)
    finally:
        sub.close(linger=0)
