"""Client side of the proxy's control socket (pool declarations, stats, liveness).

Requests and replies are single msgpack maps. A request is ``{"op": NAME, ...}``; a reply is
``{"ok": true, ...}`` or ``{"ok": false, "error": TEXT}``. Each request uses a fresh REQ
socket, so a proxy that died mid-request never leaves a REQ stuck in the wrong state.
"""

from __future__ import annotations

from typing import Any

import msgpack
import zmq

from ._errors import ProxyError, Timeout
from ._settings import Endpoints, Settings
from ._transport import make_socket

__all__ = ["ControlClient"]


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
            sock.send(msgpack.packb({"op": op, **fields}))
            if not sock.poll(int(timeout * 1000)):
                raise Timeout(
                    f"zbus-proxy did not answer {op!r} within {timeout:g}s on "
                    f"{self.endpoints.control}: is it running with "
                    f"--run-dir {self.endpoints.run_dir}?"
                )
            reply = msgpack.unpackb(sock.recv(), raw=False)
        finally:
            sock.close(linger=0)
        if not isinstance(reply, dict) or not reply.get("ok"):
            error = reply.get("error") if isinstance(reply, dict) else repr(reply)
            raise ProxyError(f"zbus-proxy refused {op!r}: {error}")
        return reply
