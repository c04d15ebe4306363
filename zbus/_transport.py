"""The one place that creates pyzmq sockets and sets their options.

Rules kept here: every socket gets an explicit, bounded LINGER; every receiving socket a
ZMQ_MAXMSGSIZE; every connecting socket (including one its caller connects, who says so),
and every tcp listener, ZeroMQ heartbeats. Sockets never cross threads, greenlets or tasks:
whoever creates one owns it.

CURVE is per endpoint, not per socket: libzmq copies a socket's options into each listener or
connecter when ``bind``/``connect`` is called. ``make_socket`` therefore binds ipc and inproc
endpoints first, with no security (the run directory's file mode guards them), then switches
CURVE (and the ZAP domain, so the proxy's allow-list is consulted) on before any tcp bind.
A tcp endpoint never gets a socket without CURVE unless the caller passed ``curve=None``
deliberately (the proxy does so only under ``--insecure-plain-tcp``).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from ._errors import ConfigError, Timeout, TransportError
from ._settings import Settings, check_private_dir, ipc_socket_mode

__all__ = [
    "ZAP_DOMAIN", "CurveKeys", "abandon", "context", "forks", "make_socket", "read_public_keys",
    "recv_frames", "secure_ipc", "wait_for_probe",
]

ZAP_DOMAIN = b"zbus"
"""The ZAP domain of every CURVE listener; the proxy's ZAP handler answers for it."""

_RECEIVING = {zmq.SUB, zmq.XSUB, zmq.PULL, zmq.REP, zmq.REQ, zmq.DEALER, zmq.ROUTER}
# What PUB/XPUB sockets receive is subscriptions, and libzmq 4.3.5 walks a subscription
# recursively, one level per byte: a ~200 KB subscription crashes the process (SIGSEGV).
# Subscriptions are topic prefixes (at most 64 + 1 + 255 bytes, plus a probe), so cap them.
# Two caps, because a subscription a host takes goes on over every CURVE link to its peers'
# origins, and there CURVE's framing counts against the limit too: ZMTP 3.1 sends a
# subscription as a SUBSCRIBE command (10 bytes more than the topic), CURVE wraps it in a
# MESSAGE command (33 more). A host's XPUBs, which take its clients' subscriptions, keep a
# cap low enough that whatever they took passes every PUB behind a link (a peer's origin,
# this or an older zbus): one subscription a host took once cut it off from its peers.
_SUBSCRIBED = {zmq.PUB, zmq.XPUB}
SUBSCRIPTION_MAX_BYTES = 512
"""ZMQ_MAXMSGSIZE of every XPUB (a host's clients subscribe there): a longer subscription
ends the connection that sent it, and that connection alone."""
SUBSCRIPTION_MAX_TOPIC = SUBSCRIPTION_MAX_BYTES - len(b"\x09SUBSCRIBE")
"""The longest prefix a client may subscribe to (502 bytes; zbus's own are at most 321)."""
LINK_SUBSCRIPTION_MAX_BYTES = 1024
"""ZMQ_MAXMSGSIZE of every PUB (an origin: peers' links subscribe there, under CURVE)."""


@dataclass(frozen=True)
class CurveKeys:
    """A CURVE key pair, both halves Z85 text (40 bytes) as libzmq takes them."""

    public: bytes
    secret: bytes = b""

    def __repr__(self) -> str:  # never show the secret half in a log or a traceback
        return f"CurveKeys(public={self.public!r})"

    @classmethod
    def generate(cls) -> CurveKeys:
        public, secret = zmq.curve_keypair()
        return cls(public, secret)

    @classmethod
    def from_secret(cls, secret: bytes) -> CurveKeys:
        secret = secret.strip()
        return cls(zmq.curve_public(secret), secret)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CurveKeys:
        """Read a secret key file written by :meth:`write` (refused if group/world-readable)."""
        p = Path(path)
        try:
            mode = p.stat().st_mode
            text = p.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read CURVE secret key {str(p)!r}: {exc}") from None
        if mode & 0o077:
            raise ConfigError(
                f"CURVE secret key {str(p)!r} is readable by others (mode {mode & 0o777:o}): "
                f"chmod 600 it"
            )
        secret = _key_line(text)
        if secret is None:
            raise ConfigError(f"{str(p)!r} holds no 40-character Z85 CURVE key")
        try:
            return cls.from_secret(secret)
        except (zmq.ZMQError, ValueError) as exc:
            raise ConfigError(f"{str(p)!r} is not a CURVE secret key: {exc}") from None

    def write(self, directory: str | os.PathLike[str], name: str = "proxy") -> tuple[Path, Path]:
        """``NAME.pub`` (0644) and ``NAME.secret`` (0600) in ``directory``; never overwrites."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        secret_path, public_path = d / f"{name}.secret", d / f"{name}.pub"
        header = b"# zbus CURVE key (Z85)\n"
        fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(header + self.secret + b"\n")
        fd = os.open(public_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(header + self.public + b"\n")
        return public_path, secret_path


def _key_line(text: bytes) -> bytes | None:
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(b"#"):
            return line if len(line) == 40 else None
    return None


def read_public_keys(path: str | os.PathLike[str]) -> list[bytes]:
    """Every Z85 public key in a file (one a line, ``#`` comments) or a directory's ``*.pub``."""
    p = Path(path)
    files = sorted(p.glob("*.pub")) if p.is_dir() else [p]
    keys: list[bytes] = []
    for f in files:
        try:
            lines = f.read_bytes().splitlines()
        except OSError as exc:
            raise ConfigError(f"cannot read CURVE public keys from {str(f)!r}: {exc}") from None
        for line in lines:
            line = line.strip()
            if not line or line.startswith(b"#"):
                continue
            if len(line) != 40:
                raise ConfigError(f"{str(f)!r}: {line[:12]!r}... is not a 40-character Z85 key")
            keys.append(line)
    return keys


def context() -> zmq.Context[Any]:
    """This process's shared context, made lazily (pyzmq makes a new one after fork)."""
    ctx: zmq.Context[Any] = zmq.Context.instance()
    return ctx


forks = 0
"""How many forks separate this process from the one that imported zbus: a socket or a
context made while it had another value belongs to an ancestor process. An object compares
the value it recorded with this one (an int, unlike ``os.getpid()``, which is a system call
on every publish)."""

_inherited: list[object] = []


def _forked() -> None:
    global forks
    forks += 1


os.register_at_fork(after_in_child=_forked)


def abandon(*objects: object) -> None:
    """Keep an ancestor process's sockets and contexts referenced in this child, never
    closed nor finalised here.

    libzmq's state does not survive fork: the I/O thread stays in the parent, so a child's
    send queues where nothing reads it, and once the queue is full libzmq's fork guard answers
    EINTR, which pyzmq retries for ever (a busy loop that ignores SNDTIMEO). Closing is no
    cure: pyzmq skips ``zmq_close`` in another process, and a green socket's close would
    unregister its fd from the epoll set the child shares with its parent. Dropping the last
    reference would close them, so they stay here for the child's life.
    """
    _inherited.extend(obj for obj in objects if obj is not None)


_RECV_NOBLOCK = int(zmq.NOBLOCK)


def recv_frames(sock: zmq.Socket[Any]) -> list[bytes]:
    """recv_multipart(NOBLOCK) without its getsockopt(RCVMORE) per part, most of its cost
    (about 1 us of 2.7 for 3 small parts): a zero-copy Frame carries its own "more" flag.
    ZeroMQ delivers a multipart message whole, so only the first part can be missing
    (zmq.Again, as from recv_multipart)."""
    frame = sock.recv(_RECV_NOBLOCK, copy=False)
    frames = [frame.bytes]
    while frame.more:
        frame = sock.recv(_RECV_NOBLOCK, copy=False)
        frames.append(frame.bytes)
    return frames


def make_socket(
    ctx: zmq.Context[Any],
    kind: int,
    settings: Settings,
    *,
    sndhwm: int | None = None,
    rcvhwm: int | None = None,
    connect: str | Sequence[str] | None = None,
    bind: str | Sequence[str] | None = None,
    curve: CurveKeys | None = None,
    server_key: bytes | None = None,
    heartbeat_timeout: bool | None = None,
) -> zmq.Socket[Any]:
    """A socket with zbus's options. With ``curve``, tcp binds are CURVE servers; with
    ``curve`` and ``server_key``, connects are CURVE clients of that server.

    Heartbeats: by default a socket gets them when it connects here or listens on tcp. A
    caller that connects the socket itself (after attaching a monitor) says which it needs:
    ``heartbeat_timeout=True``, a connecting socket's (ping, and time the peer out);
    ``False``, the pings (IVL) and their TTL only, so that the far side drops this socket
    when it goes silent, but never a timeout here: for a socket whose receive queue fills in
    normal use (a consumer's), which watches its peer another way (zbus._link)."""
    connects = [connect] if isinstance(connect, str) else list(connect or ())
    for endpoint in connects:
        if endpoint.startswith("ipc://"):
            # Before any byte goes there: another user's (or a shared writable) run
            # directory may hold their proxy, or sockets they swapped in.
            check_private_dir(Path(endpoint[6:]).parent, "run directory",
                              owner=settings.run_dir_owner)
    sock: zmq.Socket[Any] = ctx.socket(kind)
    binds = [bind] if isinstance(bind, str) else list(bind or ())
    # ipc/inproc first: they must not inherit the CURVE server options set for tcp below.
    binds.sort(key=lambda endpoint: endpoint.startswith("tcp://"))
    try:
        sock.setsockopt(zmq.LINGER, int(settings.linger * 1000))
        if kind in _SUBSCRIBED:
            # Not tied to max_message_bytes: hosts with other message limits still agree
            # on what a subscription may be.
            sock.setsockopt(zmq.MAXMSGSIZE, SUBSCRIPTION_MAX_BYTES if kind == zmq.XPUB
                            else LINK_SUBSCRIPTION_MAX_BYTES)
        elif kind in _RECEIVING:
            sock.setsockopt(zmq.MAXMSGSIZE, settings.max_message_bytes)
        if kind in (zmq.XPUB, zmq.XSUB):
            # Only a message's first part may be a (un)subscription. By default libzmq also
            # reads later parts as subscriptions, so a peer's [data, duplicate-subscription]
            # reaches the proxy loop as a first part flagged MORE whose continuation never
            # comes: the device's loop fails (EAGAIN) and that plane stops delivering.
            sock.setsockopt(zmq.ONLY_FIRST_SUBSCRIBE, 1)
        if sndhwm is not None:
            sock.setsockopt(zmq.SNDHWM, sndhwm)
        if rcvhwm is not None:
            sock.setsockopt(zmq.RCVHWM, rcvhwm)
        if heartbeat_timeout is not None:
            _heartbeats(sock, settings, timeout=heartbeat_timeout)
        elif connect is not None or any(b.startswith("tcp://") for b in binds):
            _heartbeats(sock, settings, timeout=True)
        for endpoint in binds:
            if endpoint.startswith("tcp://") and curve is not None and not sock.curve_server:
                sock.curve_secretkey = curve.secret
                sock.curve_server = True
                sock.zap_domain = ZAP_DOMAIN
            sock.bind(endpoint)
            if endpoint.startswith("ipc://"):
                secure_ipc(endpoint)
        if connect is not None:
            if curve is not None and server_key is not None:
                sock.curve_secretkey = curve.secret
                sock.curve_publickey = curve.public
                sock.curve_serverkey = server_key
            for endpoint in [connect] if isinstance(connect, str) else connect:
                sock.connect(endpoint)
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        where = bind or connect
        raise TransportError(f"cannot set up a ZeroMQ socket on {where}: {exc}") from exc
    return sock


def secure_ipc(endpoint: str) -> None:
    """Give a just-bound ipc socket its mode (``ipc_socket_mode``), whatever the umask made
    it (libzmq creates it 0777 minus the umask: 0777 under umask 000)."""
    path = Path(endpoint[6:])
    os.chmod(path, ipc_socket_mode(path.parent))


def _heartbeats(sock: zmq.Socket[Any], settings: Settings, *, timeout: bool) -> None:
    # IVL: ping when idle; TIMEOUT: drop the connection when no traffic came for that long;
    # TTL: tells the far side to drop us when our pings stop (a half-open peer goes away).
    sock.setsockopt(zmq.HEARTBEAT_IVL, int(settings.heartbeat_ivl * 1000))
    # Without a timeout, 0, never libzmq's default (-1: the interval). libzmq 4.3.5 reads no
    # input while a socket's receive queue is full, so a slow consumer's connection times
    # out although its peer is fine; for a SUB, reading on after that reconnect aborts the
    # process (assertion "_input_stopped", libzmq #3937, open).
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT,
                    int(settings.heartbeat_timeout * 1000) if timeout else 0)
    # TTL is carried in deciseconds on the wire (max 6553.5 s).
    sock.setsockopt(zmq.HEARTBEAT_TTL, min(int(settings.heartbeat_timeout * 1000), 6_553_500))


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
