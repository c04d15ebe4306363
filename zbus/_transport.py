"""The one place that creates pyzmq sockets and sets their options.

Rules kept here: every socket gets an explicit, bounded LINGER; every receiving socket a
ZMQ_MAXMSGSIZE; every connecting socket ZeroMQ heartbeats. Sockets never cross threads,
greenlets or tasks: whoever creates one owns it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import zmq

from ._errors import Timeout, TransportError
from ._settings import Settings

__all__ = ["context", "make_socket", "wait_for_probe"]

_RECEIVING = {zmq.SUB, zmq.XSUB, zmq.PULL, zmq.REP, zmq.REQ, zmq.DEALER, zmq.ROUTER, zmq.XPUB}


def context() -> zmq.Context[Any]:
    """This process's shared context, made lazily (pyzmq makes a new one after fork)."""
    ctx: zmq.Context[Any] = zmq.Context.instance()
    return ctx


def make_socket(
    ctx: zmq.Context[Any],
    kind: int,
    settings: Settings,
    *,
    sndhwm: int | None = None,
    rcvhwm: int | None = None,
    connect: str | list[str] | None = None,
    bind: str | None = None,
) -> zmq.Socket[Any]:
    sock: zmq.Socket[Any] = ctx.socket(kind)
    try:
        sock.setsockopt(zmq.LINGER, int(settings.linger * 1000))
        if kind in _RECEIVING:
            sock.setsockopt(zmq.MAXMSGSIZE, settings.max_message_bytes)
        if sndhwm is not None:
            sock.setsockopt(zmq.SNDHWM, sndhwm)
        if rcvhwm is not None:
            sock.setsockopt(zmq.RCVHWM, rcvhwm)
        if connect is not None:
            sock.setsockopt(zmq.HEARTBEAT_IVL, int(settings.heartbeat_ivl * 1000))
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(settings.heartbeat_timeout * 1000))
            for endpoint in [connect] if isinstance(connect, str) else connect:
                sock.connect(endpoint)
        if bind is not None:
            sock.bind(bind)
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        where = bind or connect
        raise TransportError(f"cannot set up a ZeroMQ socket on {where}: {exc}") from exc
    return sock


def wait_for_probe(
    receiver: zmq.Socket[Any],
    sender: zmq.Socket[Any],
    token: bytes,
    timeout: float,
    keep: Callable[[list[bytes]], None],
    what: str,
) -> None:
    """Send probe ``token`` through the proxy until ``receiver`` gets it back.

    Whatever else arrives meanwhile is handed to ``keep``, so readiness loses nothing.
    """
    deadline = time.monotonic() + timeout
    interval = 0.005
    while True:
        # Again: proxy not there yet (or queue full); the receiver's poll paces the retries.
        with contextlib.suppress(zmq.Again):
            sender.send(token, zmq.NOBLOCK)
        until = min(time.monotonic() + interval, deadline)
        while (left := until - time.monotonic()) > 0:
            if not receiver.poll(int(left * 1000) + 1):
                break
            frames = receiver.recv_multipart()
            if frames[0] == token:
                return
            keep(frames)
        if time.monotonic() >= deadline:
            raise Timeout(
                f"{what}: the probe did not come back through zbus-proxy within {timeout:g}s; "
                "is zbus-proxy running on this run directory?"
            )
        interval = min(interval * 2, 0.2)
