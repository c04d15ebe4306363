"""The per-host zbus-proxy: devices wired as in ARCHITECTURE.md, plus a control socket.

Single-host wiring (docs/ARCHITECTURE.md in this repo explains each choice):

    publishers --PUSH--> ingress PULL ==device==> origin PUB
    origin PUB --> fan-in XSUB ==device==> deliver XPUB --> SUB subscribers
    pool P:  SUB (P's bindings, on origin) ==device==> PUSH pool-P.origin
             PULL (pool-P.origin)          ==device==> PUSH pool-P --> PULL members

Many hosts (``federation``): origin PUB and every pool-P.origin PUSH also bind tcp on one
configured interface (CURVE). The fan-in XSUB also binds ``inproc://zbus-fanin``, and each
peer gets a *link* device, XSUB (tcp, peer's origin) ==> XPUB (connects to the fan-in); a
pool's deliver-side PULL binds ``inproc://zbus-pool-P-in`` and pool links, PULL (this host's
or a peer's pool-P.origin) ==> PUSH (into it), exist only while this host has live members
of P. Links are devices too, started and stopped by the manager thread, so that no socket
ever changes its connections while a libzmq proxy loop in another thread owns it.

Invariants: no Python touches a message once a device runs; the proxy holds no signing keys;
pool declarations are written to ``pools.json`` before the declaration is acknowledged; the
origin carries only what this host's publishers sent (the loop-freedom of any peer graph);
peer-facing requests never make requests of their own (no control-plane deadlock).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import zmq
import zmq.utils.monitor

from zbus import ConfigError, Endpoints, ProxyError, Settings, TopicPattern, default_run_dir
from zbus._names import CONTROL_PREFIX, minimal_prefixes, validate_name
from zbus._transport import make_socket, wait_for_probe

from ._device import Device, SocketSpec
from ._directory import (
    FederationConfig,
    PeerInfo,
    RedisDirectory,
    StaticDirectory,
    ZapHandler,
)
from ._reliable import DEFAULT_ACK_TIMEOUT, DEFAULT_MAX_ATTEMPTS, DeadLetter, ReliablePool

__all__ = ["Proxy"]

log = logging.getLogger("zbus.proxy")

POOLS_FILE = "pools.json"
LOCK_FILE = "zbus-proxy.lock"
PEER_TIMEOUT = 1.0
"""Seconds a request to a peer's control socket may take before that peer counts as away."""
PROBE_PREFIX = CONTROL_PREFIX + b"probe/"
MISSED_HELLOS = 3
CONTROL_OPS = ("ping", "stats", "pools", "declare_pool", "declare_reliable_pool",
               "dead_letters", "reflect", "pool_receipts")
"""Every op the local control socket serves (named in the unknown-op error)."""
_RELIABLE_FIELDS = {"op", "name", "bindings", "ack_timeout", "max_attempts"}
MAX_REPORTERS = 10_000
"""Member ids whose receipts one fast pool keeps (a member's final report frees its slot);
reports from further ids are refused and counted, so ``unaccounted`` can only over-state."""
FRAMES_PER_MESSAGE = 3
_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
# What a pool's member monitor reads (see _member_event).
_MEMBER_EVENTS = zmq.EVENT_ACCEPTED | _HANDSHAKE_FAILED | zmq.EVENT_DISCONNECTED


class Proxy:
    """A zbus proxy for one host's run directory; usable in-process as a context manager.

    >>> with Proxy("/tmp/zbus-demo") as proxy:
    ...     ...  # connect zbus.Connection("/tmp/zbus-demo") from any process
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str] | None = None,
        *,
        settings: Settings | None = None,
        state_dir: str | os.PathLike[str] | None = None,
        federation: FederationConfig | None = None,
    ) -> None:
        self.endpoints = Endpoints(Path(run_dir) if run_dir is not None else default_run_dir())
        self.settings = settings or Settings()
        self.state_dir = Path(state_dir) if state_dir is not None else self.endpoints.run_dir
        self._ctx: zmq.Context[Any] | None = None
        self._devices: dict[str, Device] = {}
        self._pools: dict[str, list[str]] = {}
        # At-least-once pools: declarations (persisted) and their running components; both
        # under _pool_lock, which also keeps a name from being a fast and a reliable pool.
        self._reliable_decls: dict[str, dict[str, Any]] = {}
        self._reliable: dict[str, ReliablePool] = {}
        self._pool_lock = threading.Lock()
        self._lock_fd: int | None = None
        self._stopping = threading.Event()
        self._control_thread: threading.Thread | None = None
        self._control_ready = threading.Event()
        self.pool_startup_drops = 0
        self.federation = federation
        self.me: PeerInfo | None = federation.me if federation else None
        tag = f"{os.getpid()}-{id(self)}"
        self._fanin = f"inproc://zbus-fanin-{tag}"
        self._tag = tag
        self._zap: ZapHandler | None = None
        self._directory: StaticDirectory | RedisDirectory | None = None
        self._threads: list[threading.Thread] = []
        # Federation state, shared by the control, peer and manager threads (under _state).
        self._state = threading.Lock()
        self._peers: dict[str, PeerInfo] = {}
        self._learned: dict[str, PeerInfo] = {}
        self._peer_state: dict[str, dict[str, Any]] = {}
        self._pool_endpoints: dict[str, str] = {}
        self._members: dict[str, int] = {}
        # Fast-pool receipts (docs/RELIABILITY.md): pool -> member id -> the cumulative count
        # of its last report; what members that said goodbye reported; disconnects seen by
        # the members' PUSH monitor; refused reports. Under _state.
        # Per pool, per live member id: its last (messages, frames) read; and the sums of
        # the members that closed. Frames, because handed_out is counted in frames.
        self._receipts: dict[str, dict[str, tuple[int, int]]] = {}
        self._receipts_closed: dict[str, tuple[int, int]] = {}
        self._members_closed: dict[str, int] = {}
        self._members_lost: dict[str, int] = {}
        # Per pool: connections whose handshake failed and whose disconnect is still to come
        # (garbage or a wrong socket type on the pool socket: never a member, never lost).
        self._not_members: dict[str, int] = {}
        self._receipts_refused: dict[str, int] = {}
        self._links: dict[str, tuple[tuple[Any, ...], Device]] = {}
        self._retired: dict[str, dict[str, int]] = {}
        self._monitor_inbox: queue.SimpleQueue[tuple[str, zmq.Socket[Any]]] = queue.SimpleQueue()
        self.reflected = 0

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> Proxy:
        run_dir = self.endpoints.run_dir
        run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._acquire_lock()
        try:
            self._remove_sockets()
            self._ctx = zmq.Context()
            fed = self.federation
            if fed is not None:
                self._start_security(fed)
            self._start_planes()
            pools, reliable = self._load_state()
            for name, bindings in pools.items():
                self._declare_pool(name, bindings, persist=False)
            for name, decl in reliable.items():
                self._declare_reliable(name, decl.get("bindings"), persist=False,
                                       ack_timeout=decl.get("ack_timeout"),
                                       max_attempts=decl.get("max_attempts"))
            self._control_thread = threading.Thread(
                target=self._serve_control, name="zbus-control", daemon=True
            )
            self._control_thread.start()
            if not self._control_ready.wait(10):
                raise ProxyError("the control socket did not start")
            if fed is not None:
                self._start_federation(fed)
        except BaseException:
            self.stop()
            raise
        log.info("zbus-proxy ready on %s (pid %d, %d pools, %d at-least-once pools)",
                 run_dir, os.getpid(), len(self._pools), len(self._reliable))
        return self

    def _start_security(self, fed: FederationConfig) -> None:
        assert self._ctx is not None
        if fed.curve is None:
            log.warning("tcp links are PLAIN: no encryption, no authentication "
                        "(--insecure-plain-tcp); anyone who reaches %s can read and inject",
                        fed.host)
            return
        # Before any tcp listener exists: libzmq accepts every CURVE client when no ZAP
        # handler is bound, so starting it first is what makes the allow-list fail closed.
        self._zap = ZapHandler(self._ctx, fed.allowed)
        self._zap.start()

    def _start_federation(self, fed: FederationConfig) -> None:
        assert self.me is not None
        if fed.directory == "redis":
            self._directory = RedisDirectory(fed.redis_url, self.me, ttl=fed.ttl,
                                             prefix=fed.redis_prefix)
        else:
            self._directory = StaticDirectory(fed.peers, self.me)
        ready = threading.Event()
        for target, name in ((self._serve_peers, "zbus-peers"), (self._manage, "zbus-links")):
            thread = threading.Thread(target=target, args=(ready,), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
            if not ready.wait(10):
                raise ProxyError(f"the {name} thread did not start")
            ready.clear()
        log.info("federation on", extra={"node": self.me.id, "origin": self.me.origin,
                                         "directory": fed.directory})

    def stop(self) -> None:
        self._stopping.set()
        if self._control_thread is not None:
            self._control_thread.join(5)
        for thread in self._threads:
            thread.join(10)
        self._threads.clear()
        for _, link in list(self._links.values()):
            link.stop()
        self._links.clear()
        # Before the devices: a component's SUB reads from the origin device's PUB.
        for pool in list(self._reliable.values()):
            pool.stop()
        self._reliable.clear()
        for device in reversed(list(self._devices.values())):
            device.stop()
        self._devices.clear()
        # A pool declared just before the stop may have left its member monitor in the
        # inbox, never taken by the (now ended) thread that reads them: close it here, or
        # the context's term() below waits for it forever.
        while True:
            try:
                _, reader = self._monitor_inbox.get_nowait()
            except queue.Empty:
                break
            reader.close(linger=0)
        if self._zap is not None:
            self._zap.stop()
            self._zap = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        if self._lock_fd is not None:
            self._remove_sockets()
            (self.endpoints.run_dir / LOCK_FILE).unlink(missing_ok=True)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _acquire_lock(self) -> None:
        path = self.endpoints.run_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            owner = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise ProxyError(
                    f"another zbus-proxy (pid {owner}) already serves {self.endpoints.run_dir}: "
                    "stop it first, or give this one another --run-dir"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def _remove_sockets(self) -> None:
        # Only called while holding the lock, so these are a dead proxy's leftovers or ours.
        for sock in self.endpoints.run_dir.glob("*.sock"):
            sock.unlink(missing_ok=True)

    # -- planes and pools ----------------------------------------------------------------

    def _make(self, spec: SocketSpec) -> zmq.Socket[Any]:
        assert self._ctx is not None
        sock = make_socket(
            self._ctx, spec.kind, self.settings,
            sndhwm=spec.sndhwm, rcvhwm=spec.rcvhwm,
            connect=list(spec.connect) or None, bind=spec.bind,
            curve=spec.curve, server_key=spec.server_key,
        )
        for prefix in spec.subscribe:
            sock.subscribe(prefix)
        return sock

    def _add_device(self, name: str, frontend: SocketSpec, backend: SocketSpec,
                    prepare: Any = None) -> None:
        assert self._ctx is not None
        device = Device(name, self._ctx, self._make, frontend, backend, prepare)
        device.start()
        self._devices[name] = device

    def _start_planes(self) -> None:
        ep, s, fed = self.endpoints, self.settings, self.federation
        origin: tuple[str, ...] = (ep.origin,)
        fanin: tuple[str, ...] | None = None
        if fed is not None and self.me is not None:
            origin += (self.me.origin,)
            fanin = (self._fanin,)
        self._add_device(
            "origin",
            SocketSpec(zmq.PULL, bind=ep.ingress, rcvhwm=s.publish_hwm),
            SocketSpec(zmq.PUB, bind=origin, sndhwm=s.subscriber_hwm,
                       curve=fed.curve if fed else None),
        )
        self._add_device(
            "deliver",
            # sndhwm 0 on every XSUB: its send side carries only subscriptions, and libzmq
            # drops those silently at the HWM (libzmq #2258) when thousands go out at once.
            SocketSpec(zmq.XSUB, connect=(ep.origin,), bind=fanin, rcvhwm=s.subscriber_hwm,
                       sndhwm=0),
            SocketSpec(zmq.XPUB, bind=ep.deliver, sndhwm=s.subscriber_hwm),
        )

    def declare_pool(self, name: str, bindings: list[str]) -> None:
        """Declare (idempotently) pool ``name`` with ``bindings``, persist it, and pass it on
        to every peer that answered lately (the others get it with their next hello)."""
        created = self._declare_pool(name, bindings, persist=True)
        if self.federation is None:
            return
        with self._state:
            live = [self._peers[p] for p, st in self._peer_state.items()
                    if st.get("alive") and p in self._peers]
        for peer in live:
            reply = self._peer_request(peer, "declare_pool", name=name, bindings=bindings)
            if reply is None or not reply.get("ok"):
                log.warning("a peer did not take a pool declaration; its next hello will", extra={
                    "peer": peer.id, "pool": name,
                    "error": (reply or {}).get("error", "no answer")})
        if created:
            self._wake()

    @staticmethod
    def _check_bindings(bindings: Any) -> tuple[list[TopicPattern], list[str]]:
        if (not isinstance(bindings, list) or not bindings
                or not all(isinstance(b, str) for b in bindings)):
            raise ConfigError("a pool needs a list of one or more bindings 'exchange/pattern'")
        patterns = [TopicPattern.parse(b) for b in bindings]
        return patterns, sorted(str(p) for p in patterns)

    def _declare_pool(self, name: str, bindings: list[str], *, persist: bool) -> bool:
        validate_name(name, "pool name")
        patterns, wanted = self._check_bindings(bindings)
        with self._pool_lock:
            if name in self._reliable_decls:
                raise ConfigError(
                    f"{name!r} is an at-least-once pool (declare_reliable_pool): a name is "
                    f"either a fast pool or an at-least-once pool; use another pool name"
                )
            known = self._pools.get(name)
            if known is not None:
                if known != wanted:
                    raise ConfigError(
                        f"pool {name!r} is declared with bindings {known}, not {wanted}: use "
                        f"another pool name, or stop the proxy and remove it from "
                        f"{self.state_dir / POOLS_FILE}"
                    )
                return False
            ep, s, fed = self.endpoints, self.settings, self.federation
            pool_origin: tuple[str, ...] = (ep.pool_origin(name),)
            if fed is None:
                # The PUSH binds in _watch_members, after its member monitor is connected.
                self._add_device(
                    f"pool-{name}-deliver",
                    SocketSpec(zmq.PULL, connect=(ep.pool_origin(name),), rcvhwm=s.pool_hwm),
                    SocketSpec(zmq.PUSH, sndhwm=s.pool_hwm),
                    prepare=lambda pull, push: self._watch_members(name, push),
                )
            else:
                # The PUSH binds in _watch_members, after its member monitor is connected.
                pool_origin += (f"tcp://{fed.host}:*",)
                self._add_device(
                    f"pool-{name}-deliver",
                    SocketSpec(zmq.PULL, bind=self._pool_in(name), rcvhwm=s.pool_hwm),
                    SocketSpec(zmq.PUSH, sndhwm=s.pool_hwm),
                    prepare=lambda pull, push: self._watch_members(name, push),
                )
            try:
                self._add_device(
                    f"pool-{name}-origin",
                    SocketSpec(zmq.SUB, connect=(ep.origin,), rcvhwm=s.pool_hwm,
                               subscribe=tuple(minimal_prefixes(patterns))),
                    SocketSpec(zmq.PUSH, bind=pool_origin, sndhwm=s.pool_hwm,
                               curve=fed.curve if fed else None),
                    prepare=self._probe_pool,
                )
            except BaseException:
                # Undo the half-made pool, or a retry would find its socket address taken.
                self._devices.pop(f"pool-{name}-deliver").stop()
                raise
            with self._state:
                if fed is not None:
                    self._pool_endpoints[name] = \
                        self._devices[f"pool-{name}-origin"].last_endpoints[1]
                self._members.setdefault(name, 0)
            self._pools[name] = wanted
            if persist:
                self._save_pools()
        log.info("pool %s declared with %s", name, wanted)
        return True

    # -- at-least-once pools -------------------------------------------------------------

    def declare_reliable_pool(self, name: str, bindings: list[str], *,
                              ack_timeout: float | None = None,
                              max_attempts: int | None = None) -> bool:
        """Declare (idempotently) at-least-once pool ``name``: start its component
        (``_reliable.ReliablePool``) and persist the declaration; True when it was new.

        Options left at None take the defaults on creation and match anything on a
        re-declaration; other bindings, or an option given with another value, are refused
        (ConfigError). Returns once the pool's subscription is live at the origin.
        Local only: the component takes what this host's publishers send (no peer learns
        of it; docs/RELIABILITY.md)."""
        return self._declare_reliable(name, bindings, persist=True,
                                      ack_timeout=ack_timeout, max_attempts=max_attempts)

    def _declare_reliable(self, name: str, bindings: Any, *, persist: bool,
                          ack_timeout: Any = None, max_attempts: Any = None) -> bool:
        validate_name(name, "pool name")
        _, wanted = self._check_bindings(bindings)
        if ack_timeout is not None and (
                isinstance(ack_timeout, bool) or not isinstance(ack_timeout, int | float)
                or not 0 < ack_timeout < float("inf")):
            raise ConfigError(f"ack_timeout must be a positive number of seconds, "
                              f"not {ack_timeout!r}")
        if max_attempts is not None and (
                isinstance(max_attempts, bool) or not isinstance(max_attempts, int)
                or max_attempts < 1):
            raise ConfigError(f"max_attempts must be an integer >= 1, not {max_attempts!r}")
        with self._pool_lock:
            if name in self._pools:
                raise ConfigError(
                    f"{name!r} is a fast pool (declare_pool): a name is either a fast pool "
                    f"or an at-least-once pool; use another pool name"
                )
            known = self._reliable_decls.get(name)
            if known is not None:
                if known["bindings"] != wanted:
                    raise ConfigError(
                        f"at-least-once pool {name!r} is declared with bindings "
                        f"{known['bindings']}, not {wanted}: use another pool name, or stop "
                        f"the proxy and remove it from {self.state_dir / POOLS_FILE}"
                    )
                for option, value in (("ack_timeout", ack_timeout),
                                      ("max_attempts", max_attempts)):
                    if value is not None and value != known[option]:
                        raise ConfigError(
                            f"at-least-once pool {name!r} is declared with {option}="
                            f"{known[option]!r}, not {value!r}: leave the option out to "
                            f"take the pool as it is, or use another pool name"
                        )
                return False
            decl: dict[str, Any] = {
                "bindings": wanted,
                "ack_timeout": float(DEFAULT_ACK_TIMEOUT if ack_timeout is None
                                     else ack_timeout),
                "max_attempts": DEFAULT_MAX_ATTEMPTS if max_attempts is None else max_attempts,
            }
            assert self._ctx is not None
            pool = ReliablePool(name, wanted, self.endpoints, self.settings, self._ctx,
                                ack_timeout=decl["ack_timeout"],
                                max_attempts=decl["max_attempts"])
            try:
                pool.start()
            except BaseException:
                pool.stop()
                raise
            self._reliable[name] = pool
            self._reliable_decls[name] = decl
            if persist:
                self._save_pools()
        log.info("at-least-once pool %s declared with %s", name, wanted,
                 extra={"ack_timeout": decl["ack_timeout"],
                        "max_attempts": decl["max_attempts"]})
        return True

    @property
    def reliable_pools(self) -> dict[str, dict[str, Any]]:
        """The at-least-once pools' declarations: name -> bindings and options."""
        with self._pool_lock:
            return {name: dict(decl) for name, decl in self._reliable_decls.items()}

    def _reliable_pool(self, name: Any) -> ReliablePool:
        validate_name(name, "pool name")
        with self._pool_lock:
            pool = self._reliable.get(name)
            known = sorted(self._reliable)
        if pool is None:
            raise ConfigError(f"no at-least-once pool {name!r} (declared: {known or 'none'})")
        return pool

    def dead_letters(self, name: str) -> list[DeadLetter]:
        """At-least-once pool ``name``'s dead letters, oldest first."""
        return self._reliable_pool(name).dead_letters()

    def _dead_letter_page(self, name: Any, start: Any, limit: Any) -> dict[str, Any]:
        for what, value in (("start", start), ("limit", limit)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"dead_letters: {what} must be an integer >= 0")
        # Half the largest message a client takes: room for the envelope of the reply.
        budget = max(self.settings.max_message_bytes // 2, 1)
        return self._reliable_pool(name).dead_letter_page(start, min(limit, 1000), budget)

    def _pool_in(self, name: str) -> str:
        return f"inproc://zbus-pool-{name}-in-{self._tag}"

    def _watch_members(self, name: str, push: zmq.Socket[Any]) -> None:
        """In the pool's deliver device thread: count members with a socket monitor on the
        members' PUSH, connected before the PUSH binds so that no member goes uncounted.
        Its events are read by the manager thread (federation) or the control thread."""
        assert self._ctx is not None
        endpoint = f"inproc://zbus-members-{name}-{self._tag}"
        push.monitor(endpoint, _MEMBER_EVENTS)
        reader: zmq.Socket[Any] = self._ctx.socket(zmq.PAIR)
        reader.setsockopt(zmq.LINGER, 0)
        reader.connect(endpoint)
        # Handed to the manager thread; the queue's lock is the memory barrier that libzmq
        # asks for when a socket moves between threads, and this thread never touches it again.
        self._monitor_inbox.put((name, reader))
        push.bind(self.endpoints.pool(name))

    def _probe_pool(self, sub: zmq.Socket[Any], push: zmq.Socket[Any]) -> None:
        """Runs in the pool's device thread before its loop: the subscription is live."""
        assert self._ctx is not None
        token = CONTROL_PREFIX + b"probe/pool-" + os.urandom(8).hex().encode()
        sub.subscribe(token)
        sender = make_socket(self._ctx, zmq.PUSH, self.settings, connect=self.endpoints.ingress)

        def keep(frames: list[bytes]) -> None:
            try:
                push.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:
                self.pool_startup_drops += 1

        try:
            wait_for_probe(sub, sender, token, 10.0, keep, "pool subscription")
        finally:
            sender.close(linger=0)
            sub.unsubscribe(token)

    def _load_state(self) -> tuple[dict[str, list[str]], dict[str, dict[str, Any]]]:
        """The persisted declarations: fast pools, and at-least-once pools (a file written
        before those existed has no "reliable_pools": none)."""
        path = self.state_dir / POOLS_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {}, {}
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read pool declarations from {path}: {exc}") from None
        pools = data.get("pools") if isinstance(data, dict) else None
        if not isinstance(pools, dict):
            raise ConfigError(f"{path} has no 'pools' map: fix or remove the file")
        reliable = data.get("reliable_pools", {})
        if not isinstance(reliable, dict) or not all(
                isinstance(decl, dict) for decl in reliable.values()):
            raise ConfigError(f"{path}: 'reliable_pools' must map each pool name to "
                              f"{{bindings, ack_timeout, max_attempts}}: fix or remove the file")
        return pools, reliable

    def _save_pools(self) -> None:
        """Write every declaration (caller holds _pool_lock), atomically."""
        path = self.state_dir / POOLS_FILE
        tmp = path.with_suffix(".tmp")
        state: dict[str, Any] = {"pools": self._pools}
        if self._reliable_decls:  # absent when none: the file stays as older proxies wrote it
            state["reliable_pools"] = self._reliable_decls
        tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
        os.replace(tmp, path)

    @property
    def pools(self) -> dict[str, list[str]]:
        with self._pool_lock:
            return dict(self._pools)

    def stats(self) -> dict[str, Any]:
        devices = {name: d.statistics() for name, d in list(self._devices.items())}
        devices.update({name: d.statistics() for name, (_, d) in list(self._links.items())})
        result: dict[str, Any] = {
            "pid": os.getpid(),
            "run_dir": str(self.endpoints.run_dir),
            "devices": devices,
            # A forwarding loop that failed (libzmq error) and was started again: should stay 0.
            "device_restarts": {name: d.restarts for name, d in list(self._devices.items())},
            "pools": self.pools,
            "fast_pools": self._fast_pool_stats(devices),
            "pool_startup_drops": self.pool_startup_drops,
            "reliable_pools": self._reliable_stats(),
        }
        if self.federation is not None and self.me is not None:
            with self._state:
                result["federation"] = {
                    "node": self.me.id,
                    "origin": self.me.origin,
                    "peers": {p: {"origin": info.origin, **self._peer_state.get(p, {})}
                              for p, info in self._peers.items()},
                    "members": dict(self._members),
                    "pool_endpoints": dict(self._pool_endpoints),
                    "retired_links": {k: dict(v) for k, v in self._retired.items()},
                    "reflected": self.reflected,
                    "zap": self._zap.stats() if self._zap else None,
                    "directory_failures": getattr(self._directory, "failures", 0),
                }
        return result

    def _fast_pool_stats(self, devices: dict[str, dict[str, int]]) -> dict[str, dict[str, Any]]:
        """Per fast pool, the receipts accounting (docs/RELIABILITY.md, "Fast pools: the
        receipts"): ``unaccounted`` is the frames handed out minus the frames reported, in
        messages, from counters only (the device loop's STATISTICS and the members' reports;
        no Python on the message path)."""
        out: dict[str, dict[str, Any]] = {}
        for name in self.pools:
            frames = devices.get(f"pool-{name}-deliver", {}).get("backend_frames_out")
            with self._state:
                live = self._receipts.get(name, {})
                reported, reported_frames = self._receipts_closed.get(name, (0, 0))
                for messages, frames_read in live.values():
                    reported += messages
                    reported_frames += frames_read
                entry: dict[str, Any] = {
                    "members": self._members.get(name, 0),
                    "members_lost": self._members_lost.get(name, 0),
                    "members_closed": self._members_closed.get(name, 0),
                    "reporting": len(live),
                    "refused_reports": self._receipts_refused.get(name, 0),
                    "reported": reported,
                }
            if frames is None:  # the device did not answer: no number rather than a wrong one
                entry.update(handed_out=None, unaccounted=None)
            else:
                # In frames, then rounded up to messages: frames a member read but could not
                # count as a message (a foreign client's other frame counts) cancel out
                # instead of showing as loss, and a lost message is never rounded away.
                missing = frames - reported_frames
                entry.update(handed_out=frames // FRAMES_PER_MESSAGE,
                             unaccounted=-(-missing // FRAMES_PER_MESSAGE))
            out[name] = entry
        return out

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
        if pool not in self.pools:
            raise ConfigError(f"pool_receipts: no fast pool {pool!r}")
        with self._state:
            live = self._receipts.setdefault(pool, {})
            if member not in live and len(live) >= MAX_REPORTERS:
                self._receipts_refused[pool] = self._receipts_refused.get(pool, 0) + 1
                raise ConfigError(f"pool_receipts: pool {pool!r} already tracks "
                                  f"{MAX_REPORTERS} members")
            # Cumulative and sent in order on one socket: never let a late one go backwards.
            before = live.get(member, (0, 0))
            counts = (max(received, before[0]), max(frames, before[1]))
            if final:
                live.pop(member, None)
                closed = self._receipts_closed.get(pool, (0, 0))
                self._receipts_closed[pool] = (closed[0] + counts[0], closed[1] + counts[1])
                self._members_closed[pool] = self._members_closed.get(pool, 0) + 1
            else:
                live[member] = counts

    def _reliable_stats(self) -> dict[str, dict[str, Any]]:
        with self._pool_lock:
            running = [(name, self._reliable_decls[name], pool)
                       for name, pool in self._reliable.items()]
        return {name: {**decl, **pool.stats()} for name, decl, pool in running}

    # -- control socket ------------------------------------------------------------------

    def _serve_control(self) -> None:
        assert self._ctx is not None
        sock = make_socket(self._ctx, zmq.REP, self.settings, bind=self.endpoints.control)
        # Without federation there is no manager thread: the pools' member monitors are read
        # here (with federation the manager reads them, and reconciles links on each event).
        monitors: dict[zmq.Socket[Any], str] = {}
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        self._control_ready.set()
        try:
            while not self._stopping.is_set():
                if self.federation is None:
                    while True:
                        try:
                            name, reader = self._monitor_inbox.get_nowait()
                        except queue.Empty:
                            break
                        monitors[reader] = name
                        poller.register(reader, zmq.POLLIN)
                ready = dict(poller.poll(100))
                for reader, name in monitors.items():
                    while reader in ready:
                        try:
                            self._member_event(name, reader.recv_multipart(zmq.NOBLOCK))
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

    def _handle(self, raw: bytes) -> dict[str, Any]:
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
                return {"ok": True, **self.stats()}
            if op == "pools":
                return {"ok": True, "pools": self.pools, "reliable_pools": self.reliable_pools}
            if op == "declare_pool":
                self.declare_pool(request.get("name"), request.get("bindings"))  # type: ignore[arg-type]
                return {"ok": True}
            if op == "declare_reliable_pool":
                unknown = sorted(set(request) - _RELIABLE_FIELDS)
                if unknown:
                    raise ConfigError(
                        f"declare_reliable_pool takes name, bindings, ack_timeout and "
                        f"max_attempts, not {', '.join(map(str, unknown))}"
                    )
                created = self.declare_reliable_pool(
                    request.get("name"), request.get("bindings"),  # type: ignore[arg-type]
                    ack_timeout=request.get("ack_timeout"),
                    max_attempts=request.get("max_attempts"),
                )
                return {"ok": True, "created": created}
            if op == "dead_letters":
                return {"ok": True, **self._dead_letter_page(
                    request.get("name"), request.get("start", 0), request.get("limit", 100))}
            if op == "reflect":
                return {"ok": True, "peers": self._reflect(request.get("token"))}
            if op == "pool_receipts":
                self._pool_receipts(request)
                return {"ok": True}
            raise ConfigError(
                f"unknown control op {op!r} (known: {', '.join(CONTROL_OPS)})"
            )
        except (ConfigError, ValueError, TypeError) as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a control request must never kill the proxy
            log.exception("control request failed")
            return {"ok": False, "error": f"internal error: {exc}"}

    # -- federation: requests to peers ---------------------------------------------------

    def _peer_request(self, peer: PeerInfo, op: str, timeout: float = PEER_TIMEOUT, /,
                      **fields: Any) -> dict[str, Any] | None:
        """One request to ``peer``'s control socket on a fresh REQ; None when it did not
        answer (a REQ never stays stuck waiting for a peer that went away)."""
        assert self._ctx is not None and self.federation is not None
        fed = self.federation
        try:
            sock = make_socket(self._ctx, zmq.REQ, self.settings, connect=peer.control,
                               curve=fed.curve, server_key=peer.public_key or None)
        except Exception:
            log.debug("cannot reach peer", extra={"peer": peer.id}, exc_info=True)
            return None
        try:
            sock.send(msgpack.packb({"op": op, **fields}))
            if not sock.poll(int(timeout * 1000)):
                return None
            reply = msgpack.unpackb(sock.recv(), raw=False, strict_map_key=True)
        except Exception:
            log.debug("peer request failed", extra={"peer": peer.id, "op": op}, exc_info=True)
            return None
        finally:
            sock.close(linger=0)
        return reply if isinstance(reply, dict) else None

    def _reflect(self, token: Any) -> list[str]:
        """Ask every live peer to publish ``token`` (plus its id) on its own origin; the
        caller waits for one copy per returned peer id on the delivery plane."""
        if not isinstance(token, bytes) or not token.startswith(PROBE_PREFIX) \
                or len(token) > 128:
            raise ConfigError(f"a reflect token is bytes starting with {PROBE_PREFIX!r}")
        if self.federation is None:
            return []
        with self._state:
            live = [self._peers[p] for p, st in self._peer_state.items()
                    if st.get("alive") and p in self._peers]
        acked = []
        for peer in live:
            reply = self._peer_request(peer, "reflect", token=token)
            if reply is not None and reply.get("ok"):
                acked.append(peer.id)
        return acked

    def _wake(self) -> None:
        """Make the manager reconcile links now rather than at its next tick."""
        assert self._ctx is not None
        sock = self._ctx.socket(zmq.PUSH)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"inproc://zbus-manager-{self._tag}")
            with contextlib.suppress(zmq.Again):
                sock.send(b"", zmq.NOBLOCK)
        finally:
            sock.close(linger=100)

    # -- federation: the peer control socket ---------------------------------------------

    def _serve_peers(self, ready: threading.Event) -> None:
        """The tcp control socket other proxies talk to (CURVE, allow-listed by ZAP).

        It answers from local state only and never sends a request itself, so two proxies
        asking each other at once can never wait on each other."""
        assert self._ctx is not None and self.federation is not None and self.me is not None
        sock = make_socket(self._ctx, zmq.REP, self.settings, bind=self.me.control,
                           curve=self.federation.curve)
        push = make_socket(self._ctx, zmq.PUSH, self.settings, connect=self.endpoints.ingress)
        ready.set()
        try:
            while not self._stopping.is_set():
                if not sock.poll(100):
                    continue
                try:
                    frames = sock.recv_multipart(copy=False)
                    user = ""
                    if self.federation.curve is not None:
                        user = str(frames[0].get("User-Id"))
                    if len(frames) == 1:
                        reply = self._handle_peer(frames[0].bytes, user, push)
                    else:
                        reply = {"ok": False, "error": "a request is one frame"}
                    sock.send(msgpack.packb(reply))
                except zmq.ZMQError:
                    log.debug("peer control socket error", exc_info=True)
        finally:
            push.close(linger=0)
            sock.close(linger=0)

    def _handle_peer(self, raw: bytes, user: str, push: zmq.Socket[Any]) -> dict[str, Any]:
        assert self.me is not None and self.federation is not None
        try:
            try:
                request = msgpack.unpackb(raw, raw=False, strict_map_key=True)
            except Exception:
                raise ConfigError("a peer request is a msgpack map") from None
            if not isinstance(request, dict):
                raise ConfigError("a peer request is a msgpack map")
            op = request.get("op")
            if op == "ping":
                return {"ok": True, "id": self.me.id}
            if op == "hello":
                return self._hello_from(request, user)
            if op == "declare_pool":
                # Never passed on from here: declarations spread one hop, from the proxy
                # a client asked; a peer that missed it catches up through hello.
                self._declare_pool(request.get("name"), request.get("bindings"),  # type: ignore[arg-type]
                                   persist=True)
                self._wake()
                return {"ok": True}
            if op == "reflect":
                token = request.get("token")
                if not isinstance(token, bytes) or not token.startswith(PROBE_PREFIX) \
                        or len(token) > 128:
                    raise ConfigError("bad reflect token")
                try:
                    push.send_multipart([token, self.me.id.encode()], zmq.NOBLOCK)
                except zmq.Again:
                    return {"ok": False, "error": "ingress full"}
                self.reflected += 1
                return {"ok": True}
            raise ConfigError(f"unknown peer op {op!r}")
        except (ConfigError, ValueError, TypeError) as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a peer's request must never kill the proxy
            log.exception("peer request failed")
            return {"ok": False, "error": f"internal error: {exc}"}

    def _hello_from(self, request: dict[str, Any], user: str) -> dict[str, Any]:
        assert self.me is not None and self.federation is not None
        info = PeerInfo.from_dict(request.get("peer"))
        if self.federation.curve is not None and info.public_key.decode() != user:
            raise ConfigError("the hello's public key is not the key this connection used")
        self._adopt_pools(request.get("pools"), info.id)
        if self.federation.directory == "static" and info.id != self.me.id:
            configured = self._directory.refresh() if self._directory is not None else {}
            with self._state:
                if info.id not in configured and info.id not in self._learned:
                    log.info("a peer not in our list introduced itself; linking to it",
                             extra={"peer": info.id})
                self._learned[info.id] = info
        return self._hello_reply()

    def _hello_reply(self) -> dict[str, Any]:
        assert self.me is not None
        pools = self.pools  # before _state: _declare_pool takes _pool_lock, then _state
        with self._state:
            return {"ok": True, "peer": self.me.as_dict(), "pools": pools,
                    "pool_endpoints": dict(self._pool_endpoints),
                    "members": dict(self._members)}

    def _adopt_pools(self, pools: Any, source: str) -> None:
        if not isinstance(pools, dict):
            return
        for name, bindings in pools.items():
            if name in self._pools:
                continue
            try:
                self._declare_pool(name, bindings, persist=True)
            except (ConfigError, ValueError, TypeError) as exc:
                log.warning("refused a peer's pool declaration",
                            extra={"peer": source, "pool": name, "error": str(exc)})

    # -- federation: the manager (directory, hellos, links) ------------------------------

    def _manage(self, ready: threading.Event) -> None:
        assert self._ctx is not None and self.federation is not None
        wake = self._ctx.socket(zmq.PULL)
        wake.setsockopt(zmq.LINGER, 0)
        wake.bind(f"inproc://zbus-manager-{self._tag}")
        monitors: dict[zmq.Socket[Any], str] = {}
        interval = self.federation.sync_interval
        next_sync = 0.0
        ready.set()
        try:
            while not self._stopping.is_set():
                while True:
                    try:
                        name, reader = self._monitor_inbox.get_nowait()
                    except queue.Empty:
                        break
                    monitors[reader] = name
                poller = zmq.Poller()
                poller.register(wake, zmq.POLLIN)
                for reader in monitors:
                    poller.register(reader, zmq.POLLIN)
                wait = max(0.0, min(next_sync - time.monotonic(), 0.1))
                for sock, _ in poller.poll(int(wait * 1000)):
                    if sock is wake:
                        wake.recv()
                        continue
                    self._member_event(monitors[sock], sock.recv_multipart())
                if time.monotonic() >= next_sync:
                    try:
                        self._sync()
                    except Exception:
                        log.exception("peer sync failed; retrying")
                    next_sync = time.monotonic() + interval
                try:
                    self._reconcile()
                except Exception:
                    log.exception("link reconcile failed; retrying")
        finally:
            for reader in monitors:
                reader.close(linger=0)
            wake.close(linger=0)
            if self._directory is not None:
                self._directory.close()

    def _member_event(self, pool: str, frames: list[bytes]) -> None:
        # Members are the open connections (a handshaking one counts at once: a member is
        # never missed). Any peer can connect and send garbage; when libzmq flags the failed
        # handshake (HANDSHAKE_FAILED_*, before that connection's DISCONNECTED), its end is
        # not counted as a lost member. Handshake events carry no fd, hence the credit.
        event = zmq.utils.monitor.parse_monitor_message(frames)["event"]
        with self._state:
            count = self._members.get(pool, 0)
            if event == zmq.EVENT_ACCEPTED:
                count += 1
            elif event & _HANDSHAKE_FAILED:
                self._not_members[pool] = self._not_members.get(pool, 0) + 1
            elif event == zmq.EVENT_DISCONNECTED:
                count = max(0, count - 1)
                if self._not_members.get(pool, 0):
                    self._not_members[pool] -= 1
                else:
                    self._members_lost[pool] = self._members_lost.get(pool, 0) + 1
            self._members[pool] = count
        log.debug("pool members", extra={"pool": pool, "members": count})

    def _sync(self) -> None:
        """Ask the directory who is there, then hello each one (learning its pools and pool
        endpoints, and telling it ours)."""
        assert self._directory is not None and self.me is not None
        fed = self.federation
        assert fed is not None
        found = self._directory.refresh()
        with self._state:
            for pid, info in self._learned.items():
                found.setdefault(pid, info)
        allowed = fed.allowed
        peers: dict[str, PeerInfo] = {}
        for pid, info in found.items():
            if fed.curve is not None and info.public_key not in allowed:
                if pid not in self._peer_state or self._peer_state[pid].get("alive") is not None:
                    log.warning("ignoring a peer whose key is not on the allow-list",
                                extra={"peer": pid})
                self._peer_state[pid] = {"alive": None, "refused": True}
                continue
            peers[pid] = info
        hello = {"peer": self.me.as_dict(), "pools": self.pools}
        states: dict[str, dict[str, Any]] = {}
        for pid, info in peers.items():
            reply = self._peer_request(info, "hello", PEER_TIMEOUT, **hello)
            old = self._peer_state.get(pid, {})
            if reply is None or not reply.get("ok"):
                # One slow answer on a loaded host is not a dead peer: it counts as away after
                # MISSED_HELLOS in a row (links stay regardless; heartbeats own the data path).
                missed = old.get("missed", 0) + 1
                states[pid] = {**old, "missed": missed,
                               "alive": bool(old.get("alive")) and missed < MISSED_HELLOS}
                if old.get("alive") and not states[pid]["alive"]:
                    log.warning("peer stopped answering", extra={"peer": pid})
                continue
            if not old.get("alive"):
                log.info("peer answering", extra={"peer": pid, "origin": info.origin})
            self._adopt_pools(reply.get("pools"), pid)
            endpoints = reply.get("pool_endpoints")
            members = reply.get("members")
            states[pid] = {
                "alive": True,
                "missed": 0,
                "last_hello": time.time(),
                "pool_endpoints": {k: v for k, v in (endpoints or {}).items()
                                   if isinstance(v, str) and v.startswith("tcp://")},
                "members": members if isinstance(members, dict) else {},
            }
        with self._state:
            gone = set(self._peers) - set(peers)
            self._peers = peers
            for pid in gone:
                log.info("peer left the directory", extra={"peer": pid})
            self._peer_state = {p: st for p, st in self._peer_state.items()
                                if st.get("refused")} | states

    def _reconcile(self) -> None:
        """Start the links that should exist and stop those that should not (manager only)."""
        fed, s, ep = self.federation, self.settings, self.endpoints
        assert fed is not None
        want: dict[str, tuple[tuple[Any, ...], SocketSpec, SocketSpec]] = {}
        with self._state:
            peers = dict(self._peers)
            states = {p: dict(st) for p, st in self._peer_state.items()}
            members = dict(self._members)
        for pid, info in peers.items():
            want[f"peer-{pid}"] = (
                ("origin", info.origin, info.public_key),
                SocketSpec(zmq.XSUB, connect=(info.origin,), rcvhwm=s.subscriber_hwm,
                           sndhwm=0, curve=fed.curve, server_key=info.public_key or None),
                SocketSpec(zmq.XPUB, connect=(self._fanin,), sndhwm=s.subscriber_hwm),
            )
        for pool in self.pools:
            if members.get(pool, 0) <= 0:
                continue  # no live member here: take none of this pool's messages
            sources: dict[str, tuple[str, bytes]] = {"local": (ep.pool_origin(pool), b"")}
            for pid, info in peers.items():
                endpoint = states.get(pid, {}).get("pool_endpoints", {}).get(pool)
                if endpoint:
                    sources[pid] = (endpoint, info.public_key)
            for source, (endpoint, public) in sources.items():
                want[f"pool-{pool}-from-{source}"] = (
                    ("pool", pool, endpoint, public),
                    SocketSpec(zmq.PULL, connect=(endpoint,), rcvhwm=s.pool_link_hwm,
                               curve=fed.curve if public else None, server_key=public or None),
                    # Linger: what this link already took is flushed into the pool on stop.
                    SocketSpec(zmq.PUSH, connect=(self._pool_in(pool),),
                               sndhwm=s.pool_link_hwm, close_linger=max(s.linger, 0.5)),
                )
        for name, (key, device) in list(self._links.items()):
            if name not in want or want[name][0] != key:
                self._retire(name, key, device)
        for name, (key, front, back) in want.items():
            if name in self._links:
                continue
            assert self._ctx is not None
            device = Device(name, self._ctx, self._make, front, back)
            try:
                device.start()
            except Exception as exc:
                log.warning("cannot start a link", extra={"link": name, "error": str(exc)})
                continue
            with self._state:
                self._links[name] = (key, device)
            log.info("link up", extra={"link": name, "endpoint": key[-2]})

    def _retire(self, name: str, key: tuple[Any, ...], device: Device) -> None:
        stats = device.statistics()
        device.stop()
        with self._state:
            self._links.pop(name, None)
            if key[0] == "pool":
                total = self._retired.setdefault(key[1], {})
                for counter, value in stats.items():
                    total[counter] = total.get(counter, 0) + value
        log.info("link down", extra={"link": name})
