"""Client side of the proxy's control socket (pool declarations, stats, liveness).

Requests and replies are single msgpack maps. A request is ``{"op": NAME, ...}``; a reply is
``{"ok": true, ...}`` or ``{"ok": false, "error": TEXT}``. Each request uses a fresh REQ
socket, so a proxy that died mid-request never leaves a REQ stuck in the wrong state.
"""

from __future__ import annotations

import os
import time
from typing import Any

import msgpack
import zmq

from ._errors import ProxyError, Timeout
from ._names import CONTROL_PREFIX
from ._settings import Endpoints, Settings
from ._transport import make_socket

__all__ = ["ControlClient", "decode_reply", "encode_request", "no_answer", "wait_for_peers"]


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


def no_answer(endpoints: Endpoints, settings: Settings, op: str, timeout: float) -> Timeout:
    return Timeout(
        f"zbus-proxy did not answer {op!r} within {timeout:g}s on {endpoints.control}: is it "
        f"running with --run-dir {endpoints.run_dir}? (A reply larger than this connection's "
        f"max_message_bytes={settings.max_message_bytes}, such as a page of big dead letters, "
        "is refused the same way: ask with a connection whose limit is the proxy's.)"
    )


class ControlClient:
    def __init__(
        self, endpoints: Endpoints, settings: Settings, ctx: zmq.Context[Any]
    ) -> None:
        self.endpoints = endpoints
        self.settings = settings
        self.ctx = ctx

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
            expected = client.request("reflect", timeout=min(left, 5.0), token=token)["peers"]
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
