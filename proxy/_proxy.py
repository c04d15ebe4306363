"""The per-host zbus-proxy: devices wired as in ARCHITECTURE.md, plus a control socket.

This module owns the ``Proxy``: its start and stop (the order of both matters), the planes,
the pool declarations, fast and at-least-once (one name space and one ``pools.json``, under
``_pool_lock``), and the stats. Its collaborators, each in its own module: the control socket
(``_control.ControlServer``), the fast pools' members and receipts (``_members.PoolMembers``),
the federation with its peers, links and threads (``_federation.Federation``), the devices
(``_device``) and the at-least-once pool component (``_reliable``).

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

import errno
import fcntl
import json
import logging
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

import zmq

from zbus import ConfigError, Endpoints, ProxyError, Settings, TopicPattern, default_run_dir
from zbus._names import CONTROL_PREFIX, minimal_prefixes, validate_name
from zbus._settings import check_private_dir
from zbus._transport import make_socket, wait_for_probe

from ._control import ControlServer
from ._device import Device, SocketSpec
from ._directory import FederationConfig, PeerInfo
from ._federation import Federation, PoolRefusedError
from ._guard import ServiceHealth
from ._members import PoolMembers
from ._reliable import DEFAULT_ACK_TIMEOUT, DEFAULT_MAX_ATTEMPTS, DeadLetter, ReliablePool
from ._repair import RepairRouter

__all__ = ["Proxy"]

log = logging.getLogger("zbus.proxy")

POOLS_FILE = "pools.json"
MAX_ACK_TIMEOUT = 86_400.0
"""Largest ack_timeout (s) of an at-least-once pool: a day (beyond, no redelivery at all)."""
MAX_ATTEMPTS = 1000
"""Largest max_attempts of an at-least-once pool."""
MAX_DEAD_LETTER_START = 2**63 - 1
DEFAULT_MAX_POOLS = 64
"""Most pools (fast and at-least-once together) one proxy serves: a fast pool costs ~13 fds,
2 threads and 8 libzmq sockets, and 71 to 78 pools took a proxy at a 1,024 fd limit to
libzmq's abort (``limits.max_pools``, docs/OPERATING.md)."""
MAX_POOL_BINDINGS = 256
"""Most distinct bindings of one pool (duplicates are merged first): each is a subscription
of the pool's SUB and is repeated in every hello to peers (docs/OPERATING.md)."""
MAX_TOMBSTONES = 1024
"""Removed pools (tombstones, docs/OPERATING.md "Removing a pool") kept at most; beyond, the
oldest generation is forgotten (a peer that still holds that pool may bring it back)."""
MAX_GENERATION = 2**53 - 1
"""Largest pool generation (exact in JSON and msgpack floats alike)."""
MAX_POOL_BINDING_ENTRIES = 4096
"""Most entries, duplicates included, of a declaration's binding list (checked before any
is parsed, so that a huge list cannot hold the control thread)."""
LOCK_FILE = "zbus-proxy.lock"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def next_generation(now: int, *seen: int) -> int:
    """A pool declaration's or removal's generation: the wall clock in ms, but always above
    every generation seen for that name (so a removal is newer than the declaration it
    removes, and a declaration made after a removal newer than it, whatever the clocks)."""
    return min(max(now, max(seen, default=0) + 1), MAX_GENERATION)


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
        max_pools: int = DEFAULT_MAX_POOLS,
    ) -> None:
        if isinstance(max_pools, bool) or not isinstance(max_pools, int) or max_pools < 1:
            raise ConfigError(f"max_pools must be a positive integer, not {max_pools!r}")
        self.max_pools = max_pools
        """Most pools, fast and at-least-once together, declared from anywhere: this host's
        clients, a peer's request or hello, or pools.json at start."""
        self.pools_refused = 0
        """Declarations of a new pool refused because ``max_pools`` were declared."""
        self.endpoints = Endpoints(Path(run_dir) if run_dir is not None else default_run_dir())
        # Every queue of this proxy holds at most max_queue_bytes (issue 14 item 10): a
        # subscriber, member or peer that stops reading can hold no more of its memory.
        self.settings = (settings or Settings()).queue_limits()
        self.state_dir = Path(state_dir) if state_dir is not None else self.endpoints.run_dir
        self._ctx: zmq.Context[Any] | None = None
        self._devices: dict[str, Device] = {}
        self._pools: dict[str, list[str]] = {}
        # At-least-once pools: declarations (persisted) and their running components; both
        # under _pool_lock, which also keeps a name from being a fast and a reliable pool.
        self._reliable_decls: dict[str, dict[str, Any]] = {}
        self._reliable: dict[str, ReliablePool] = {}
        # Fast pools' generations, and the pools removed here (tombstones: name -> bindings,
        # generation, fabric), persisted with the declarations; both under _pool_lock.
        self._generations: dict[str, int] = {}
        self._removed: dict[str, dict[str, Any]] = {}
        self._pool_lock = threading.Lock()
        self._lock_fd: int | None = None
        self._stopping = threading.Event()
        self.health = ServiceHealth(self._stopping)
        """Service threads that failed (proxy/_guard.py); ``health.failed`` is set on the
        first, and ``zbus-proxy`` then exits with code 1 for its supervisor to restart it."""
        self.pool_startup_drops = 0
        self.federation = federation
        self.me: PeerInfo | None = federation.me if federation else None
        self._tag = f"{os.getpid()}-{id(self)}"
        # Where the control thread publishes kept beacons again (proxy/_beacons.py): into
        # this host's delivery plane only, never the origin, so pools and peers' links do
        # not hand them out again (a repeat lost there would count as an envelope lost).
        self.beacons_endpoint = f"inproc://zbus-beacons-{self._tag}"
        # Where the repair plane publishes the beacons publishing connections repeat while
        # their streams are repairable: the delivery plane only, for the same reason.
        self.tails_endpoint = f"inproc://zbus-tails-{self._tag}"
        # The federation's state and the fast pools' members and receipts, shared by the
        # control, peer and manager threads, are under _state (never take _pool_lock while
        # holding it).
        self._state = threading.Lock()
        self._pool_members = PoolMembers(self._state, self._tag)
        self._federation = Federation(federation, self) if federation is not None else None
        self._control = ControlServer(self)
        self._repair = RepairRouter(self)

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> Proxy:
        run_dir = self.endpoints.run_dir
        # Ours alone, or another user could swap our sockets or plant symlinks where we
        # write (docs/SECURITY.md, "Run directory"); a missing one is made 0700.
        check_private_dir(run_dir, "run directory", create=True)
        check_private_dir(self.state_dir, "state directory", create=True)
        check_private_dir(self.endpoints.beacons_dir, "beacons directory", create=True)
        self._acquire_lock()
        try:
            self._remove_sockets()
            self._ctx = zmq.Context()
            if self._federation is not None:
                self._federation.start_security()
            self._start_planes()
            pools, reliable = self._load_state()
            if len(pools) + len(reliable) > self.max_pools:
                raise ConfigError(
                    f"{self.state_dir / POOLS_FILE} declares {len(pools) + len(reliable)} "
                    f"pools, more than limits.max_pools ({self.max_pools}): raise "
                    f"limits.max_pools (--max-pools) or remove pools from the file"
                )
            for name, bindings in pools.items():
                self._declare_pool(name, bindings, persist=False)
            for name, decl in reliable.items():
                self._declare_reliable(name, decl.get("bindings"), persist=False,
                                       ack_timeout=decl.get("ack_timeout"),
                                       max_attempts=decl.get("max_attempts"))
            self._control.start()
            self._repair.start()
            if self._federation is not None:
                self._federation.start()
        except BaseException:
            self.stop()
            raise
        log.info("zbus-proxy ready on %s (pid %d, %d pools, %d at-least-once pools)",
                 run_dir, os.getpid(), len(self._pools), len(self._reliable))
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._control.join(5)
        self._repair.join(5)
        if self._federation is not None:
            self._federation.join()
            self._federation.stop_links()
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
        self._pool_members.close_unread()
        if self._federation is not None:
            self._federation.stop_security()
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
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise ConfigError(
                f"{path} is a symlink, which zbus-proxy never follows (it would truncate "
                "its target): remove it"
            ) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ConfigError(f"{path} is not a regular file: remove it")
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

    # -- planes and fast pools -----------------------------------------------------------

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
        ep, s, federation = self.endpoints, self.settings, self._federation
        origin: tuple[str, ...] = (ep.origin,)
        fanin: tuple[str, ...] | None = None
        if federation is not None:
            origin += (federation.me.origin,)
            fanin = (federation.fanin,)
        self._add_device(
            "origin",
            SocketSpec(zmq.PULL, bind=ep.ingress, rcvhwm=s.publish_hwm),
            SocketSpec(zmq.PUB, bind=origin, sndhwm=s.subscriber_hwm,
                       curve=federation.config.curve if federation else None),
        )
        self._add_device(
            "deliver",
            # sndhwm 0 on every XSUB: its send side carries only subscriptions, and libzmq
            # drops those silently at the HWM (libzmq #2258) when thousands go out at once.
            SocketSpec(zmq.XSUB, connect=(ep.origin, self.beacons_endpoint,
                                          self.tails_endpoint), bind=fanin,
                       rcvhwm=s.subscriber_hwm, sndhwm=0),
            SocketSpec(zmq.XPUB, bind=ep.deliver, sndhwm=s.subscriber_hwm),
        )

    def declare_pool(self, name: str, bindings: list[str]) -> None:
        """Declare (idempotently) pool ``name`` with ``bindings``, persist it, and pass it on
        to every peer that answered lately (the others get it with their next hello)."""
        created = self._declare_pool(name, bindings, persist=True)
        if self._federation is None:
            return
        with self._pool_lock:
            generation = self._generations.get(name, 0)
            wanted = self._pools.get(name, bindings)
        self._federation.pass_on_declaration(name, wanted, created, generation)

    @staticmethod
    def _check_bindings(bindings: Any) -> tuple[list[TopicPattern], list[str]]:
        """The distinct patterns of ``bindings`` and their sorted texts; ConfigError when
        they are not a list of 1 to MAX_POOL_BINDINGS distinct bindings. Called before a
        declaration makes any socket."""
        if (not isinstance(bindings, list) or not bindings
                or not all(isinstance(b, str) for b in bindings)):
            raise ConfigError("a pool needs a list of one or more bindings 'exchange/pattern'")
        if len(bindings) > MAX_POOL_BINDING_ENTRIES:
            raise ConfigError(f"a pool's binding list has at most {MAX_POOL_BINDING_ENTRIES} "
                              f"entries, not {len(bindings)}: list each binding once")
        unique = {str(p): p for p in map(TopicPattern.parse, bindings)}
        if len(unique) > MAX_POOL_BINDINGS:
            raise ConfigError(
                f"a pool has at most {MAX_POOL_BINDINGS} distinct bindings, not "
                f"{len(unique)}: bind wider patterns ('exchange/prefix.#') or split the pool"
            )
        wanted = sorted(unique)
        return [unique[text] for text in wanted], wanted

    def _declare_pool(self, name: str, bindings: list[str], *, persist: bool,
                      peer_generation: int | None = None) -> bool:
        """Declare fast pool ``name``; True when it is new. Three callers: a client here
        (``persist``: a new generation, and a tombstone of these bindings is cleared),
        ``pools.json`` at start (neither), a peer (``peer_generation``: refused with
        PoolRefusedError when a tombstone of these bindings is as new, or the name is taken)."""
        validate_name(name, "pool name")
        patterns, wanted = self._check_bindings(bindings)
        with self._pool_lock:
            if name in self._reliable_decls:
                raise PoolRefusedError(
                    "conflict",
                    f"{name!r} is an at-least-once pool (declare_reliable_pool): a name is "
                    f"either a fast pool or an at-least-once pool; use another pool name"
                )
            tomb = self._removed.get(name)
            revives = tomb is not None and tomb["bindings"] == wanted
            if peer_generation is not None and revives and tomb is not None \
                    and peer_generation <= tomb["generation"]:
                raise PoolRefusedError(
                    "removed", f"pool {name!r} with bindings {wanted} was removed here at "
                    f"generation {tomb['generation']}; a declaration from before that "
                    f"(generation {peer_generation}) does not bring it back")
            known = self._pools.get(name)
            if known is not None:
                if known != wanted:
                    raise PoolRefusedError(
                        "conflict",
                        f"pool {name!r} is declared with bindings {known}, not {wanted}: use "
                        f"another pool name, or remove it first (zbus pools remove {name} "
                        f"--fabric; docs/OPERATING.md)"
                    )
                if peer_generation is not None \
                        and peer_generation > self._generations.get(name, 0):
                    self._generations[name] = peer_generation  # converge on the newest
                    self._save_pools()
                return False
            self._check_room(name)
            try:
                self._start_pool(name, patterns)
            except BaseException:
                # Undo the half-made pool: every socket it made is closed (its device
                # threads close theirs; its member monitor is closed here), and a retry
                # finds its socket addresses free.
                device = self._devices.pop(f"pool-{name}-deliver", None)
                if device is not None:
                    device.stop()
                self._pool_members.discard(name)
                raise
            self._pool_members.hand_over(name)
            with self._state:
                if self._federation is not None:
                    self._federation.pool_endpoints[name] = \
                        self._devices[f"pool-{name}-origin"].last_endpoints[1]
                self._pool_members.counts.setdefault(name, 0)
            if peer_generation is not None:
                generation = peer_generation
            elif persist and self._federation is not None:  # single-host: no tombstones
                generation = next_generation(now_ms(), self._generations.get(name, 0),
                                             tomb["generation"] if tomb is not None else 0)
            else:
                generation = self._generations.get(name, 0)
            if revives and (persist or peer_generation is not None):
                # A declaration newer than the removal of these same bindings: it is back.
                del self._removed[name]
            self._pools[name] = wanted
            self._generations[name] = generation
            if persist:
                self._save_pools()
        log.info("pool %s declared with %s", name, wanted, extra={"generation": generation})
        return True

    # -- removing pools ------------------------------------------------------------------

    def remove_pool(self, name: str, *, fabric: bool = False) -> dict[str, Any]:
        """Remove pool ``name`` (fast or at-least-once): stop its devices or component, drop
        it from ``pools.json`` (atomically, before it stops) and free its slot under
        ``max_pools``. What it held in flight is lost; its members stay connected to
        nothing (they receive again if the pool is declared again).

        On a federated proxy a fast pool leaves a *tombstone* (its bindings and a
        generation newer than the pool's): a peer's declaration of the same bindings from
        before the removal is refused here. With ``fabric`` the tombstone goes to the peers
        too (at once to those answering, in hellos to the others), which remove the pool
        and refuse its old declarations the same way. A declaration made after it (here or
        on any host, so with a newer generation) brings the pool back. Returns what was
        removed; ConfigError for an unknown pool."""
        validate_name(name, "pool name")
        if not isinstance(fabric, bool):
            raise ConfigError("remove_pool: fabric must be true or false")
        with self._pool_lock:
            if name in self._reliable_decls:
                return self._remove_reliable(name, fabric)
            bindings = self._pools.get(name)
            if bindings is None:
                known = sorted([*self._pools, *self._reliable_decls])
                gone = self._removed.get(name)
                hint = (f" (removed at generation {gone['generation']})" if gone else "")
                raise ConfigError(f"no pool {name!r} on this proxy{hint}; declared: "
                                  f"{', '.join(known) or 'none'}")
            if fabric and self._federation is None:
                raise ConfigError("this proxy has no peers (network.bind is not set): "
                                  "remove the pool without --fabric")
            saved = (dict(self._pools), dict(self._generations), dict(self._removed))
            generation = None
            if self._federation is not None:
                old = self._removed.get(name)
                generation = next_generation(now_ms(), self._generations.get(name, 0),
                                             old["generation"] if old else 0)
                self._removed[name] = {"bindings": bindings, "generation": generation,
                                       "fabric": fabric}
                self._bound_tombstones()
            del self._pools[name]
            self._generations.pop(name, None)
            try:
                self._save_pools()
            except BaseException:
                self._pools, self._generations, self._removed = saved
                raise
            self._stop_pool(name)
        log.warning("pool removed", extra={"pool": name, "bindings": bindings,
                                           "fabric": fabric, "generation": generation})
        if self._federation is not None:
            if fabric and generation is not None:
                self._federation.pass_on_removal(name, bindings, generation)
            self._federation._wake()  # its links go at once
        return {"name": name, "kind": "fast", "bindings": bindings, "fabric": fabric,
                "generation": generation}

    def _remove_reliable(self, name: str, fabric: bool) -> dict[str, Any]:
        """Remove at-least-once pool ``name`` (caller holds _pool_lock)."""
        if fabric:
            raise ConfigError(f"{name!r} is an at-least-once pool, which lives on this host "
                              f"only: remove it without --fabric")
        decl = self._reliable_decls.pop(name)
        try:
            self._save_pools()
        except BaseException:
            self._reliable_decls[name] = decl
            raise
        self._reliable.pop(name).stop()
        log.warning("at-least-once pool removed", extra={"pool": name})
        return {"name": name, "kind": "at-least-once", "bindings": decl["bindings"],
                "fabric": False, "generation": None}

    def _stop_pool(self, name: str) -> None:
        """Stop fast pool ``name``'s devices, then forget its members (caller holds
        _pool_lock): its sockets, ipc files and inproc addresses are free for a new one."""
        with self._state:
            if self._federation is not None:
                self._federation.pool_endpoints.pop(name, None)
        for part in ("origin", "deliver"):  # the origin first: it stops taking messages
            device = self._devices.pop(f"pool-{name}-{part}", None)
            if device is not None:
                device.stop()
        self._pool_members.retire(name)
        # libzmq leaves a closed listener's ipc file: remove it, so that a member finds no
        # pool there rather than a dead socket (a new declaration binds afresh).
        for endpoint in (self.endpoints.pool(name), self.endpoints.pool_origin(name)):
            Path(endpoint[len("ipc://"):]).unlink(missing_ok=True)

    def _bound_tombstones(self) -> None:
        """Keep at most MAX_TOMBSTONES, the newest (caller holds _pool_lock)."""
        while len(self._removed) > MAX_TOMBSTONES:
            oldest = min(self._removed, key=lambda n: self._removed[n]["generation"])
            del self._removed[oldest]

    def apply_removal(self, name: Any, bindings: Any, generation: int) -> bool:
        """A peer's fabric-wide removal of ``name`` with ``bindings`` at ``generation``
        (checked by the caller): kept as this host's tombstone when newer than the one it
        has, and this host's pool of those bindings removed when not newer than it. True
        when it removed the pool here."""
        validate_name(name, "pool name")
        _, wanted = self._check_bindings(bindings)
        with self._pool_lock:
            old = self._removed.get(name)
            if old is not None and old["generation"] >= generation:
                return False
            held = self._pools.get(name)
            removes = held == wanted and self._generations.get(name, 0) <= generation
            if held == wanted and not removes:
                return False  # declared again since: that declaration stands
            saved = (dict(self._pools), dict(self._generations), dict(self._removed))
            self._removed[name] = {"bindings": wanted, "generation": generation,
                                   "fabric": True}
            self._bound_tombstones()
            if removes:
                del self._pools[name]
                self._generations.pop(name, None)
            try:
                self._save_pools()
            except BaseException:
                self._pools, self._generations, self._removed = saved
                raise
            if removes:
                self._stop_pool(name)
        if removes:
            log.warning("pool removed by a peer's fabric-wide removal",
                        extra={"pool": name, "bindings": wanted, "generation": generation})
        return removes

    @property
    def pool_generations(self) -> dict[str, int]:
        with self._pool_lock:
            return dict(self._generations)

    @property
    def removed_pools(self) -> dict[str, dict[str, Any]]:
        """The tombstones: name -> bindings, generation and fabric (carried to peers)."""
        with self._pool_lock:
            return {name: dict(t) for name, t in self._removed.items()}

    def _check_room(self, name: str) -> None:
        """Refuse new pool ``name`` when ``max_pools`` are declared (caller holds
        _pool_lock): bounded here, every path to a new pool (control, peer requests,
        hellos) is, and a proxy never runs out of fds for its own sockets."""
        declared = len(self._pools) + len(self._reliable_decls)
        if declared < self.max_pools:
            return
        with self._state:
            self.pools_refused += 1
        log.warning("pool declaration refused: limit reached",
                    extra={"pool": name, "max_pools": self.max_pools})
        raise PoolRefusedError(
            "limit",
            f"pool {name!r} refused: this proxy serves at most {self.max_pools} pools (fast "
            f"and at-least-once together) and has {declared}; reuse a pool, or raise "
            f"limits.max_pools (--max-pools) with the fd limit (docs/OPERATING.md)"
        )

    def _start_pool(self, name: str, patterns: list[TopicPattern]) -> None:
        """Start fast pool ``name``'s two devices (caller holds _pool_lock)."""
        ep, s, federation = self.endpoints, self.settings, self._federation
        pool_origin: tuple[str, ...] = (ep.pool_origin(name),)
        if federation is None:
            # The PUSH binds in _watch_members, after its member monitor is connected.
            self._add_device(
                f"pool-{name}-deliver",
                SocketSpec(zmq.PULL, connect=(ep.pool_origin(name),), rcvhwm=s.pool_hwm),
                SocketSpec(zmq.PUSH, sndhwm=s.pool_hwm),
                prepare=lambda pull, push: self._watch_members(name, push),
            )
        else:
            # The PUSH binds in _watch_members, after its member monitor is connected.
            pool_origin += (f"tcp://{federation.config.host}:*",)
            self._add_device(
                f"pool-{name}-deliver",
                SocketSpec(zmq.PULL, bind=federation.pool_in(name), rcvhwm=s.pool_hwm),
                SocketSpec(zmq.PUSH, sndhwm=s.pool_hwm),
                prepare=lambda pull, push: self._watch_members(name, push),
            )
        self._add_device(
            f"pool-{name}-origin",
            SocketSpec(zmq.SUB, connect=(ep.origin,), rcvhwm=s.pool_hwm,
                       subscribe=tuple(minimal_prefixes(patterns))),
            SocketSpec(zmq.PUSH, bind=pool_origin, sndhwm=s.pool_hwm,
                       curve=federation.config.curve if federation else None),
            prepare=self._probe_pool,
        )

    @property
    def pools(self) -> dict[str, list[str]]:
        with self._pool_lock:
            return dict(self._pools)

    def _watch_members(self, name: str, push: zmq.Socket[Any]) -> None:
        """The pool's deliver device prepares its members' PUSH: a member monitor first, then
        the bind (``PoolMembers.watch``)."""
        assert self._ctx is not None
        self._pool_members.watch(self._ctx, name, push, self.endpoints.pool(name))

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
                with self._state:  # pools start in their own device threads, maybe at once
                    self.pool_startup_drops += 1

        try:
            wait_for_probe(sub, sender, token, 10.0, keep, "pool subscription")
        finally:
            sender.close(linger=0)
            sub.unsubscribe(token)

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
        # Bounded, not only typed: a declaration persists and every stats reply repeats it,
        # so an out-of-range value there would outlive the request that sent it.
        if ack_timeout is not None and (
                isinstance(ack_timeout, bool) or not isinstance(ack_timeout, int | float)
                or not 0 < ack_timeout <= MAX_ACK_TIMEOUT):
            raise ConfigError(f"ack_timeout must be a number of seconds > 0 and <= "
                              f"{MAX_ACK_TIMEOUT:g}, not {ack_timeout!r}")
        if max_attempts is not None and (
                isinstance(max_attempts, bool) or not isinstance(max_attempts, int)
                or not 1 <= max_attempts <= MAX_ATTEMPTS):
            raise ConfigError(f"max_attempts must be an integer from 1 to {MAX_ATTEMPTS}, "
                              f"not {max_attempts!r}")
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
            self._check_room(name)
            decl: dict[str, Any] = {
                "bindings": wanted,
                "ack_timeout": float(DEFAULT_ACK_TIMEOUT if ack_timeout is None
                                     else ack_timeout),
                "max_attempts": DEFAULT_MAX_ATTEMPTS if max_attempts is None else max_attempts,
            }
            assert self._ctx is not None
            pool = ReliablePool(name, wanted, self.endpoints, self.settings, self._ctx,
                                ack_timeout=decl["ack_timeout"],
                                max_attempts=decl["max_attempts"],
                                on_failure=self.health.report)
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
            # start bounded too: the reply's next (start + what it holds) must stay a uint64
            if isinstance(value, bool) or not isinstance(value, int) \
                    or not 0 <= value <= MAX_DEAD_LETTER_START:
                raise ConfigError(f"dead_letters: {what} must be an integer from 0 to "
                                  f"{MAX_DEAD_LETTER_START}")
        # Half the largest message a client takes: room for the envelope of the reply.
        budget = max(self.settings.max_message_bytes // 2, 1)
        return self._reliable_pool(name).dead_letter_page(start, min(limit, 1000), budget)

    def _reliable_stats(self) -> dict[str, dict[str, Any]]:
        with self._pool_lock:
            running = [(name, self._reliable_decls[name], pool)
                       for name, pool in self._reliable.items()]
        return {name: {**decl, **pool.stats()} for name, decl, pool in running}

    # -- the declarations file (pools.json) ----------------------------------------------

    def _load_state(self) -> tuple[dict[str, list[str]], dict[str, dict[str, Any]]]:
        """The persisted declarations: fast pools, and at-least-once pools (a file written
        before those existed has no "reliable_pools": none). The fast pools' generations and
        the tombstones ("generations", "removed": none in an older file) go straight into
        this proxy's books."""
        path = self.state_dir / POOLS_FILE
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            with os.fdopen(fd, "rb") as f:
                data = json.loads(f.read())
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
        self._generations, self._removed = self._load_removals(path, data)
        return pools, reliable

    def _load_removals(self, path: Path, data: dict[str, Any]
                       ) -> tuple[dict[str, int], dict[str, dict[str, Any]]]:
        """``pools.json``'s "generations" and "removed" (tombstones), each entry checked."""
        generations = data.get("generations", {})
        if not isinstance(generations, dict) or not all(
                isinstance(g, int) and not isinstance(g, bool) and 0 <= g <= MAX_GENERATION
                for g in generations.values()):
            raise ConfigError(f"{path}: 'generations' must map pool names to integers from 0 "
                              f"to {MAX_GENERATION}: fix or remove the entry")
        removed = data.get("removed", {})
        if not isinstance(removed, dict):
            raise ConfigError(f"{path}: 'removed' must map pool names to tombstones: fix or "
                              f"remove the entry")
        tombs: dict[str, dict[str, Any]] = {}
        for name, tomb in removed.items():
            try:
                validate_name(name, "pool name")
                if not isinstance(tomb, dict) or set(tomb) != {"bindings", "generation",
                                                               "fabric"}:
                    raise ConfigError("a tombstone is {bindings, generation, fabric}")
                _, bindings = self._check_bindings(tomb["bindings"])
                generation, fabric = tomb["generation"], tomb["fabric"]
                if isinstance(generation, bool) or not isinstance(generation, int) \
                        or not 0 <= generation <= MAX_GENERATION or not isinstance(fabric, bool):
                    raise ConfigError("a tombstone's generation is an integer, its fabric "
                                      "true or false")
            except ConfigError as exc:
                raise ConfigError(f"{path}: removed pool {name!r}: {exc}; fix or remove the "
                                  f"entry") from None
            tombs[name] = {"bindings": bindings, "generation": generation, "fabric": fabric}
        return dict(generations), tombs

    def _save_pools(self) -> None:
        """Write every declaration (caller holds _pool_lock), atomically."""
        path = self.state_dir / POOLS_FILE
        tmp = path.with_suffix(".tmp")
        state: dict[str, Any] = {"pools": self._pools}
        # Each absent when empty: the file stays as older proxies wrote it.
        if self._reliable_decls:
            state["reliable_pools"] = self._reliable_decls
        generations = {n: g for n, g in self._generations.items() if g and n in self._pools}
        if generations:
            state["generations"] = generations
        if self._removed:
            state["removed"] = self._removed
        text = json.dumps(state, indent=2, sort_keys=True).encode()
        # A leftover tmp (a crash mid-write, or a planted symlink) is removed, never
        # followed: O_EXCL | O_NOFOLLOW creates a fresh file of ours or fails.
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(text)
        os.replace(tmp, path)

    # -- stats ---------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        devices = {name: d.statistics() for name, d in list(self._devices.items())}
        if self._federation is not None:
            devices.update(self._federation.link_statistics())
        result: dict[str, Any] = {
            "pid": os.getpid(),
            "run_dir": str(self.endpoints.run_dir),
            "devices": devices,
            # A forwarding loop that failed (libzmq error) and was started again: should stay 0.
            "device_restarts": {name: d.restarts for name, d in list(self._devices.items())},
            "pools": self.pools,
            "fast_pools": self._pool_members.stats(self.pools, devices,
                                                   federated=self._federation is not None),
            "pool_receipts_refused": self._pool_members.receipts_refused,
            "pool_startup_drops": self.pool_startup_drops,
            "max_pools": self.max_pools,
            "queues": {"max_queue_bytes": self.settings.max_queue_bytes,
                       "worst_queue_bytes": self.settings.worst_queue_bytes,
                       "max_message_bytes": self.settings.max_message_bytes,
                       "publish_hwm": self.settings.publish_hwm,
                       "subscriber_hwm": self.settings.subscriber_hwm,
                       "pool_hwm": self.settings.pool_hwm,
                       "pool_link_hwm": self.settings.pool_link_hwm},
            "pools_refused": self.pools_refused,
            "reliable_pools": self._reliable_stats(),
            "beacons": self._control.beacon_stats(),
            # Requests for gaps this host's subscribers made, and the answers they got.
            "repair": self._repair.stats(),
            # What this host asks its origin and every peer for; libzmq holds a node per
            # byte of each, on this host and on each peer (docs/SECURITY.md).
            "subscriptions": self._control.subscription_stats(),
            # Thread name -> the error it ended on; anything here means the proxy is exiting.
            "service_failures": self.health.stats(),
        }
        if self._federation is not None:
            result["federation"] = self._federation.stats()
        return result

    @property
    def reflected(self) -> int:
        """Reflect requests from peers this proxy answered (published on its origin)."""
        return self._federation.reflected if self._federation is not None else 0
