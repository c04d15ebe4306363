"""The per-host zbus-proxy: devices wired as in ARCHITECTURE.md, plus a control socket.

Single-host wiring (docs/ARCHITECTURE.md in this repo explains each choice):

    publishers --PUSH--> ingress PULL ==device==> origin PUB
    origin PUB --> fan-in XSUB ==device==> deliver XPUB --> SUB subscribers
    pool P:  SUB (P's bindings, on origin) ==device==> PUSH pool-P.origin
             PULL (pool-P.origin)          ==device==> PUSH pool-P --> PULL members

Invariants: no Python touches a message once a device runs; the proxy holds no signing keys;
pool declarations are written to ``pools.json`` before the declaration is acknowledged.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import msgpack
import zmq

from zbus import ConfigError, Endpoints, ProxyError, Settings, TopicPattern, default_run_dir
from zbus._names import CONTROL_PREFIX, minimal_prefixes, validate_name
from zbus._transport import make_socket, wait_for_probe

from ._device import Device, SocketSpec

__all__ = ["Proxy"]

log = logging.getLogger("zbus.proxy")

POOLS_FILE = "pools.json"
LOCK_FILE = "zbus-proxy.lock"


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
    ) -> None:
        self.endpoints = Endpoints(Path(run_dir) if run_dir is not None else default_run_dir())
        self.settings = settings or Settings()
        self.state_dir = Path(state_dir) if state_dir is not None else self.endpoints.run_dir
        self._ctx: zmq.Context[Any] | None = None
        self._devices: dict[str, Device] = {}
        self._pools: dict[str, list[str]] = {}
        self._pool_lock = threading.Lock()
        self._lock_fd: int | None = None
        self._stopping = threading.Event()
        self._control_thread: threading.Thread | None = None
        self._control_ready = threading.Event()
        self.pool_startup_drops = 0

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> Proxy:
        run_dir = self.endpoints.run_dir
        run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._acquire_lock()
        try:
            self._remove_sockets()
            self._ctx = zmq.Context()
            self._start_planes()
            for name, bindings in self._load_pools().items():
                self._declare_pool(name, bindings, persist=False)
            self._control_thread = threading.Thread(
                target=self._serve_control, name="zbus-control", daemon=True
            )
            self._control_thread.start()
            if not self._control_ready.wait(10):
                raise ProxyError("the control socket did not start")
        except BaseException:
            self.stop()
            raise
        log.info("zbus-proxy ready on %s (pid %d, %d pools)",
                 run_dir, os.getpid(), len(self._pools))
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._control_thread is not None:
            self._control_thread.join(5)
        for device in reversed(list(self._devices.values())):
            device.stop()
        self._devices.clear()
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
        ep, s = self.endpoints, self.settings
        self._add_device(
            "origin",
            SocketSpec(zmq.PULL, bind=ep.ingress, rcvhwm=s.publish_hwm),
            SocketSpec(zmq.PUB, bind=ep.origin, sndhwm=s.subscriber_hwm),
        )
        self._add_device(
            "deliver",
            SocketSpec(zmq.XSUB, connect=(ep.origin,), rcvhwm=s.subscriber_hwm),
            SocketSpec(zmq.XPUB, bind=ep.deliver, sndhwm=s.subscriber_hwm),
        )

    def declare_pool(self, name: str, bindings: list[str]) -> None:
        """Declare (idempotently) pool ``name`` with ``bindings`` and persist it."""
        self._declare_pool(name, bindings, persist=True)

    def _declare_pool(self, name: str, bindings: list[str], *, persist: bool) -> None:
        validate_name(name, "pool name")
        if (not isinstance(bindings, list) or not bindings
                or not all(isinstance(b, str) for b in bindings)):
            raise ConfigError("a pool needs a list of one or more bindings 'exchange/pattern'")
        patterns = [TopicPattern.parse(b) for b in bindings]
        wanted = sorted(str(p) for p in patterns)
        with self._pool_lock:
            known = self._pools.get(name)
            if known is not None:
                if known != wanted:
                    raise ConfigError(
                        f"pool {name!r} is declared with bindings {known}, not {wanted}: use "
                        f"another pool name, or stop the proxy and remove it from "
                        f"{self.state_dir / POOLS_FILE}"
                    )
                return
            ep, s = self.endpoints, self.settings
            self._add_device(
                f"pool-{name}-deliver",
                SocketSpec(zmq.PULL, connect=(ep.pool_origin(name),), rcvhwm=s.pool_hwm),
                SocketSpec(zmq.PUSH, bind=ep.pool(name), sndhwm=s.pool_hwm),
            )
            try:
                self._add_device(
                    f"pool-{name}-origin",
                    SocketSpec(zmq.SUB, connect=(ep.origin,), rcvhwm=s.pool_hwm,
                               subscribe=tuple(minimal_prefixes(patterns))),
                    SocketSpec(zmq.PUSH, bind=ep.pool_origin(name), sndhwm=s.pool_hwm),
                    prepare=self._probe_pool,
                )
            except BaseException:
                # Undo the half-made pool, or a retry would find its socket address taken.
                self._devices.pop(f"pool-{name}-deliver").stop()
                raise
            self._pools[name] = wanted
            if persist:
                self._save_pools()
        log.info("pool %s declared with %s", name, wanted)

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

    def _load_pools(self) -> dict[str, list[str]]:
        path = self.state_dir / POOLS_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read pool declarations from {path}: {exc}") from None
        pools = data.get("pools") if isinstance(data, dict) else None
        if not isinstance(pools, dict):
            raise ConfigError(f"{path} has no 'pools' map: fix or remove the file")
        return pools

    def _save_pools(self) -> None:
        path = self.state_dir / POOLS_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pools": self._pools}, indent=2, sort_keys=True))
        os.replace(tmp, path)

    @property
    def pools(self) -> dict[str, list[str]]:
        with self._pool_lock:
            return dict(self._pools)

    def stats(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "run_dir": str(self.endpoints.run_dir),
            "devices": {name: d.statistics() for name, d in list(self._devices.items())},
            "pools": self.pools,
            "pool_startup_drops": self.pool_startup_drops,
        }

    # -- control socket ------------------------------------------------------------------

    def _serve_control(self) -> None:
        assert self._ctx is not None
        sock = make_socket(self._ctx, zmq.REP, self.settings, bind=self.endpoints.control)
        self._control_ready.set()
        try:
            while not self._stopping.is_set():
                if not sock.poll(100):
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
                return {"ok": True, "pools": self.pools}
            if op == "declare_pool":
                self.declare_pool(request.get("name"), request.get("bindings"))  # type: ignore[arg-type]
                return {"ok": True}
            raise ConfigError(
                f"unknown control op {op!r} (known: ping, stats, pools, declare_pool)"
            )
        except (ConfigError, ValueError, TypeError) as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a control request must never kill the proxy
            log.exception("control request failed")
            return {"ok": False, "error": f"internal error: {exc}"}
