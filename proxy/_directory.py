"""Who the peers are, and who may talk to us: directories, peer addresses, the ZAP handler.

A *directory* answers one question, "which other proxies exist right now, and where": a static
list from flags or the config file (the embedded default), or Redis, where every proxy keeps a
key with a TTL that it refreshes and the others list. Nothing here keeps state of its own that
other proxies depend on: a Redis key that is not refreshed expires, and that is the only way a
proxy leaves (besides deleting its key on a clean stop). No consensus, no gossip store.

The ZAP handler is the allow-list: libzmq asks it about every CURVE handshake on a tcp
listener, and it accepts only the public keys it was given. It is started before any tcp
listener exists and answers "no" to anything it does not understand (fail closed).
"""

from __future__ import annotations

import importlib
import json
import logging
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.utils.z85

from zbus import ConfigError, TransportError
from zbus._transport import CurveKeys

__all__ = [
    "DEFAULT_PORT",
    "free_port_pair",
    "FederationConfig",
    "PeerInfo",
    "RedisDirectory",
    "StaticDirectory",
    "ZapHandler",
    "parse_address",
    "parse_peer",
]

log = logging.getLogger("zbus.proxy")

DEFAULT_PORT = 7737
"""Origin PUB on this port, the peer control socket on the next one (7738)."""

ZAP_ENDPOINT = "inproc://zeromq.zap.01"

ENTRY_MAX_BYTES = 2048
"""Largest Redis directory entry read: a PeerInfo is four short strings (about 300 bytes)."""
_ENTRY_FIELDS = frozenset({"id", "origin", "control", "public_key"})


def free_port_pair(host: str) -> int:
    """A port P on ``host`` with P and P+1 free now: a proxy's origin and its peer control
    (``--bind HOST:P``). For tests and benchmarks; another process may take them later."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind((host, 0))
            port: int = first.getsockname()[1]
            if port >= 65534:
                continue
            with socket.socket() as second:
                try:
                    second.bind((host, port + 1))
                except OSError:
                    continue
            return port
    raise TransportError(f"no two consecutive free ports on {host}")


def parse_address(text: str, what: str = "address") -> tuple[str, int]:
    """``"127.0.0.2"`` or ``"127.0.0.2:7737"`` -> (host, port); never a wildcard by accident."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep:
        host, port_text = text.strip(), str(DEFAULT_PORT)
    if not host or any(c in host for c in "/ *"):
        raise ConfigError(f"{what} {text!r}: expected HOST or HOST:PORT (e.g. 10.0.0.5:7737)")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"{what} {text!r}: port {port_text!r} is not a number") from None
    if not 1 <= port <= 65534:
        raise ConfigError(f"{what} {text!r}: port must be 1..65534 (the next one is control)")
    return host, port


@dataclass(frozen=True)
class PeerInfo:
    """One proxy as others reach it: its id and tcp endpoints, and its CURVE public key."""

    id: str
    origin: str
    control: str
    public_key: bytes = b""

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "origin": self.origin, "control": self.control,
                "public_key": self.public_key.decode()}

    @classmethod
    def from_dict(cls, data: Any) -> PeerInfo:
        if not isinstance(data, dict):
            raise ValueError("peer info is a map")
        values = [data.get(k) for k in ("id", "origin", "control", "public_key")]
        strings = [v for v in values if isinstance(v, str)]
        if len(strings) != 4:
            raise ValueError("peer info needs string id, origin, control and public_key")
        pid, origin, control, key = strings
        for endpoint in (origin, control):
            if not endpoint.startswith("tcp://") or len(endpoint) > 200:
                raise ValueError(f"peer endpoint {endpoint!r} is not a tcp endpoint")
        if key and len(key) != 40:
            raise ValueError("a peer's public key is 40 characters of Z85")
        return cls(pid[:200], origin, control, key.encode())

    @classmethod
    def at(cls, host: str, port: int, public_key: bytes = b"") -> PeerInfo:
        return cls(f"{host}:{port}", f"tcp://{host}:{port}", f"tcp://{host}:{port + 1}",
                   public_key)


def parse_peer(spec: str) -> PeerInfo:
    """``HOST[:PORT][=KEY]``: KEY is the peer's Z85 public key or a file holding it."""
    address, _, key_text = spec.partition("=")
    host, port = parse_address(address, "peer")
    key = b""
    if key_text:
        if len(key_text) == 40:
            key = key_text.encode()
        else:
            from zbus._transport import read_public_keys

            keys = read_public_keys(key_text)
            if len(keys) != 1:
                raise ConfigError(f"peer {spec!r}: {key_text!r} must hold exactly one key")
            key = keys[0]
    return PeerInfo.at(host, port, key)


@dataclass(frozen=True)
class FederationConfig:
    """Everything a proxy needs to join other hosts (None of it: a single-host proxy)."""

    host: str
    port: int = DEFAULT_PORT
    peers: tuple[PeerInfo, ...] = ()
    curve: CurveKeys | None = None
    """This proxy's key pair; None only with ``insecure_plain_tcp``."""
    allow: frozenset[bytes] = frozenset()
    """Public keys allowed to connect (the static peers' keys are added to it)."""
    insecure_plain_tcp: bool = False
    directory: str = "static"
    redis_url: str = ""
    redis_prefix: str = "zbus:proxy:"
    ttl: float = 10.0
    sync_interval: float = 1.0
    node_id: str = ""
    pools_from_peers: tuple[str, ...] | None = None
    """Pool names (and glob patterns) peers may declare and remove here: None all, () none."""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.curve is None and not self.insecure_plain_tcp:
            raise ConfigError(
                "tcp links need CURVE keys: give curve.secret_key (make one with "
                "`zbus-proxy --curve-keygen DIR`), or ask for plain tcp explicitly with "
                "--insecure-plain-tcp"
            )
        if self.directory not in ("static", "redis"):
            raise ConfigError(f"directory.kind must be static or redis, not {self.directory!r}")
        if self.directory == "redis" and not self.redis_url:
            raise ConfigError("directory.kind = redis needs directory.redis_url")
        if self.curve is not None:
            for peer in self.peers:
                if not peer.public_key:
                    raise ConfigError(
                        f"peer {peer.id}: with CURVE every static peer needs its public key "
                        f"(HOST:PORT=KEY or HOST:PORT=FILE)"
                    )

    @property
    def me(self) -> PeerInfo:
        info = PeerInfo.at(self.host, self.port, self.curve.public if self.curve else b"")
        if self.node_id:
            info = PeerInfo(self.node_id, info.origin, info.control, info.public_key)
        return info

    @property
    def allowed(self) -> frozenset[bytes]:
        return self.allow | {p.public_key for p in self.peers if p.public_key}


# -- directories -------------------------------------------------------------------------------


def _depth(raw: bytes) -> int:
    """How deep ``raw``'s JSON arrays and objects nest, strings skipped (before parsing it:
    json.loads recurses, and 100,000 levels raise RecursionError)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif byte in b"]}":
            depth -= 1
    return deepest


def parse_entry(raw: bytes) -> PeerInfo:
    """One Redis directory entry: a JSON map of exactly id, origin, control and public_key.
    ValueError when it is anything else."""
    if len(raw) > ENTRY_MAX_BYTES:
        raise ValueError(f"a directory entry is at most {ENTRY_MAX_BYTES} bytes, not {len(raw)}")
    if _depth(raw) != 1:
        raise ValueError("a directory entry is one flat JSON map")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise ValueError("a directory entry is JSON") from None
    if not isinstance(data, dict) or set(data) != _ENTRY_FIELDS:
        raise ValueError(f"a directory entry is a map of exactly {sorted(_ENTRY_FIELDS)}")
    info = PeerInfo.from_dict(data)
    if not info.id or data["id"] != info.id:
        raise ValueError("a directory entry's id is 1 to 200 characters")
    return info




class StaticDirectory:
    """The peers from the configuration; it never forgets one (heartbeats and reconnects
    handle a peer that goes away and comes back)."""

    def __init__(self, peers: Iterable[PeerInfo], me: PeerInfo) -> None:
        self._peers = {p.id: p for p in peers if p.id != me.id}

    def refresh(self) -> dict[str, PeerInfo]:
        return dict(self._peers)

    def known(self) -> dict[str, PeerInfo]:
        return dict(self._peers)

    def close(self) -> None:
        pass


class RedisDirectory:
    """Proxies register ``PREFIX<id>`` = JSON PeerInfo with a TTL and list each other by SCAN.

    Polling (every sync interval) rather than keyspace notifications: notifications need a
    server setting (``notify-keyspace-events``) a site's Redis may not have, and a missed one
    would be silent, while a poll converges by itself. A dead proxy's key expires after the
    TTL and then it drops out of every other proxy's list.
    """

    def __init__(self, url: str, me: PeerInfo, *, ttl: float, prefix: str,
                 configured: Iterable[PeerInfo] = ()) -> None:
        configured = tuple(configured)
        try:
            redis = importlib.import_module("redis")
        except ModuleNotFoundError:
            raise ConfigError("the Redis directory needs redis-py: pip install redis") from None
        self._client: Any = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self.me = me
        self.ttl = ttl
        self.prefix = prefix
        self._known: dict[str, PeerInfo] = {}
        self.failures = 0
        self.rejected = 0
        """Entries refused as malformed (too big, too deep, not the exact schema)."""
        self.conflicts = 0
        """Entries refused for claiming an id or key this proxy or another peer holds."""
        self._configured_ids = {me.id: me.public_key, **{p.id: p.public_key for p in configured}}
        self._configured_keys = {p.public_key: p.id for p in (me, *configured) if p.public_key}
        self._ids: dict[str, bytes] = dict(self._configured_ids)
        self._keys: dict[bytes, str] = dict(self._configured_keys)

    def refresh(self) -> dict[str, PeerInfo]:
        """Re-register (renewing the TTL) and list the others. On a Redis error, keep the last
        list: a directory outage must not cut hosts that can still reach each other."""
        try:
            self._client.set(self.prefix + self.me.id, json.dumps(self.me.as_dict()),
                             px=int(self.ttl * 1000))
            keys = list(self._client.scan_iter(match=self.prefix + "*", count=500))
            values = self._client.mget(keys) if keys else []
        except self._errors as exc:
            self.failures += 1
            log.warning("redis directory unreachable, keeping the last peer list",
                        extra={"error": str(exc)})
            return dict(self._known)
        # First wins: this proxy and the configured peers, then what earlier refreshes
        # kept, then this refresh's entries in key order. A writable Redis must not let an
        # entry shadow a peer already known, by its id or by its key.
        ids = dict(self._ids)
        owners = dict(self._keys)
        peers: dict[str, PeerInfo] = {}
        for name, value in sorted(zip(keys, values, strict=True), key=lambda kv: bytes(kv[0])):
            if value is None:
                continue  # expired between SCAN and MGET
            try:
                info = parse_entry(bytes(value))
            except ValueError as exc:
                self.rejected += 1
                log.warning("ignoring a malformed directory entry",
                            extra={"error": str(exc)[:200]})
                continue
            if info.id == self.me.id and info.public_key == self.me.public_key:
                continue  # our own entry
            key = info.public_key
            # An entry lives at PREFIX<its id>: one under another name claims an id it
            # does not hold (twenty such could each say they are the same peer).
            if bytes(name) != (self.prefix + info.id).encode() \
                    or ids.get(info.id, key) != key \
                    or (key and owners.get(key, info.id) != info.id):
                self.conflicts += 1
                log.warning("ignoring a directory entry claiming a peer's id or key that "
                            "another entry or the configuration holds",
                            extra={"peer": info.id})
                continue
            ids[info.id] = key
            if key:
                owners[key] = info.id
            peers[info.id] = info
        # A binding lasts while its id's key exists: the real peer's entry overwritten by
        # a squatter keeps it bound, and an id whose key expired (the peer left) is free
        # again, for that peer to come back under a new key.
        listed = {bytes(name)[len(self.prefix):].decode(errors="replace") for name in keys}
        self._ids = {**{i: k for i, k in ids.items() if i in listed}, **self._configured_ids}
        self._keys = {**{k: i for k, i in owners.items() if i in listed},
                      **self._configured_keys}
        self._known = peers
        return dict(peers)

    def known(self) -> dict[str, PeerInfo]:
        """The peers as the last refresh listed them, without asking Redis."""
        return dict(self._known)

    def close(self) -> None:
        """Leave at once on a clean stop, rather than after the TTL."""
        try:
            self._client.delete(self.prefix + self.me.id)
            self._client.close()
        except self._errors:
            pass


# -- the ZAP handler ---------------------------------------------------------------------------


class ZapHandler:
    """ZAP (RFC 27) in a thread: CURVE clients whose key is on the allow-list, nothing else.

    The reply's user id is the client's Z85 public key, so a server socket can tell which
    peer sent a request (``frame.get("User-Id")``).
    """

    def __init__(self, ctx: zmq.Context[Any], allowed: Iterable[bytes]) -> None:
        self._ctx = ctx
        self._allowed = {zmq.utils.z85.decode(k) for k in allowed}
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.accepted = 0
        self.denied = 0
        self._thread = threading.Thread(target=self._run, name="zbus-zap", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(5)
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        try:
            sock = self._ctx.socket(zmq.REP)
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stop.is_set():
                if not sock.poll(100):
                    continue
                frames = sock.recv_multipart()
                sock.send_multipart(self._answer(frames))
        except zmq.ZMQError:
            log.exception("the ZAP handler failed: tcp handshakes will now fail")
        finally:
            sock.close(linger=0)

    def _answer(self, frames: list[bytes]) -> list[bytes]:
        request_id = frames[1] if len(frames) > 1 else b""
        # version, request id, domain, address, routing id, mechanism, credentials...
        if len(frames) >= 7 and frames[0] == b"1.0" and frames[5] == b"CURVE":
            key = frames[6]
            if key in self._allowed:
                self.accepted += 1
                return [b"1.0", request_id, b"200", b"OK", zmq.utils.z85.encode(key), b""]
        self.denied += 1
        address = frames[3].decode(errors="replace") if len(frames) > 3 else "?"
        log.warning("refused a tcp peer: its key is not on the allow-list",
                    extra={"address": address})
        return [b"1.0", request_id, b"400", b"not on the allow-list", b"", b""]

    def stats(self) -> dict[str, int]:
        return {"accepted": self.accepted, "denied": self.denied}
