"""Federation: this proxy's part in a graph of proxies on many hosts (docs/ARCHITECTURE.md).

Owns the federation's state: the peers and their states, peers learned from hellos, the links
and the counters of retired ones, and this host's pool endpoints as told to peers; the
directory; the ZAP handler; and two threads. The peer control socket (tcp, CURVE) answers
from local state only and never makes a request of its own (no control-plane deadlock). The
manager asks the directory and hellos every peer each ``sync_interval``, reads the pools'
member monitors, and reconciles the links; links are devices, started and stopped by the
manager thread only (and by the proxy's stop, once that thread ended).

It uses the proxy it runs in through ``FederationHost``: its context, settings, endpoints and
stop event, the state lock, the fast pools (to read them, and to declare those peers offer),
the pools' members, and the socket factory for link devices.

Locking: the state above is guarded by the proxy's state lock (``Proxy._state``), shared with
the pools' members (whose ``counts`` are read here in the same critical sections). The pool
lock is never taken while holding it: ``Proxy._declare_pool`` takes the pool lock, then the
state lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from typing import Any, Protocol

import msgpack
import zmq

from zbus import ConfigError, Endpoints, ProxyError, Settings
from zbus._names import CONTROL_PREFIX
from zbus._transport import make_socket

from ._device import Device, SocketSpec
from ._directory import (
    FederationConfig,
    PeerInfo,
    RedisDirectory,
    StaticDirectory,
    ZapHandler,
)
from ._members import PoolMembers

__all__ = ["PEER_TIMEOUT", "PROBE_PREFIX", "Federation", "FederationHost"]

log = logging.getLogger("zbus.proxy")

PEER_TIMEOUT = 1.0
"""Seconds a request to a peer's control socket may take before that peer counts as away."""
PROBE_PREFIX = CONTROL_PREFIX + b"probe/"
MISSED_HELLOS = 3


class FederationHost(Protocol):
    """What the federation uses of the proxy it runs in (``Proxy`` is one)."""

    settings: Settings
    endpoints: Endpoints
    _ctx: zmq.Context[Any] | None
    _stopping: threading.Event
    _state: threading.Lock
    _tag: str
    _pools: dict[str, list[str]]
    _pool_members: PoolMembers

    @property
    def pools(self) -> dict[str, list[str]]: ...

    def _declare_pool(self, name: str, bindings: list[str], *, persist: bool) -> bool: ...

    def _make(self, spec: SocketSpec) -> zmq.Socket[Any]: ...


class Federation:
    """The peers, links, directory, ZAP handler and threads of a federated proxy."""

    def __init__(self, config: FederationConfig, host: FederationHost) -> None:
        self.config = config
        self.me: PeerInfo = config.me
        self._host = host
        self.fanin = f"inproc://zbus-fanin-{host._tag}"
        self._zap: ZapHandler | None = None
        self._directory: StaticDirectory | RedisDirectory | None = None
        self._threads: list[threading.Thread] = []
        # Shared by the control, peer and manager threads (under the proxy's _state).
        self._peers: dict[str, PeerInfo] = {}
        self._learned: dict[str, PeerInfo] = {}
        # origin -> the id the proxy there gave itself in a hello reply (its node id): a
        # static entry names a peer by address, its reflected probes carry its own id.
        self._named: dict[str, str] = {}
        self._peer_state: dict[str, dict[str, Any]] = {}
        # Pool name -> this host's tcp pool-P.origin, set by the proxy when it declares a pool.
        self.pool_endpoints: dict[str, str] = {}
        self._links: dict[str, tuple[tuple[Any, ...], Device]] = {}
        self._retired: dict[str, dict[str, int]] = {}
        self.reflected = 0

    # -- lifecycle (the proxy calls these in the order of its start and stop) ------------

    def start_security(self) -> None:
        ctx = self._host._ctx
        assert ctx is not None
        fed = self.config
        if fed.curve is None:
            log.warning("tcp links are PLAIN: no encryption, no authentication "
                        "(--insecure-plain-tcp); anyone who reaches %s can read and inject",
                        fed.host)
            return
        # Before any tcp listener exists: libzmq accepts every CURVE client when no ZAP
        # handler is bound, so starting it first is what makes the allow-list fail closed.
        self._zap = ZapHandler(ctx, fed.allowed)
        self._zap.start()

    def start(self) -> None:
        fed = self.config
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

    def join(self) -> None:
        """Wait for the threads to end (the proxy's stop event is set)."""
        for thread in self._threads:
            thread.join(10)
        self._threads.clear()

    def stop_links(self) -> None:
        for _, link in list(self._links.values()):
            link.stop()
        self._links.clear()

    def stop_security(self) -> None:
        if self._zap is not None:
            self._zap.stop()
            self._zap = None

    # -- what the proxy reports and asks -------------------------------------------------

    def link_statistics(self) -> dict[str, dict[str, int]]:
        return {name: d.statistics() for name, (_, d) in list(self._links.items())}

    def stats(self) -> dict[str, Any]:
        with self._host._state:
            return {
                "node": self.me.id,
                "origin": self.me.origin,
                "peers": {p: {"origin": info.origin, **self._peer_state.get(p, {})}
                          for p, info in self._peers.items()},
                "members": dict(self._host._pool_members.counts),
                "pool_endpoints": dict(self.pool_endpoints),
                "retired_links": {k: dict(v) for k, v in self._retired.items()},
                "reflected": self.reflected,
                "zap": self._zap.stats() if self._zap else None,
                "directory_failures": getattr(self._directory, "failures", 0),
            }

    def pool_in(self, name: str) -> str:
        """Where pool ``name``'s deliver-side PULL binds, and its pool links push into."""
        return f"inproc://zbus-pool-{name}-in-{self._host._tag}"

    def pass_on_declaration(self, name: str, bindings: list[str], created: bool) -> None:
        """Pass a pool declaration a client made here on to every peer that answered lately
        (the others get it with their next hello)."""
        with self._host._state:
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

    # -- requests to peers ---------------------------------------------------------------

    def _peer_request(self, peer: PeerInfo, op: str, timeout: float = PEER_TIMEOUT, /,
                      **fields: Any) -> dict[str, Any] | None:
        """One request to ``peer``'s control socket on a fresh REQ; None when it did not
        answer (a REQ never stays stuck waiting for a peer that went away)."""
        ctx = self._host._ctx
        assert ctx is not None
        fed = self.config
        try:
            sock = make_socket(ctx, zmq.REQ, self._host.settings, connect=peer.control,
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

    def reflect(self, token: bytes) -> list[str]:
        """Ask every live peer to publish ``token`` (plus its id) on its own origin; the
        caller waits for one copy per returned peer id on the delivery plane."""
        with self._host._state:
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
        ctx = self._host._ctx
        assert ctx is not None
        sock = ctx.socket(zmq.PUSH)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"inproc://zbus-manager-{self._host._tag}")
            with contextlib.suppress(zmq.Again):
                sock.send(b"", zmq.NOBLOCK)
        finally:
            sock.close(linger=100)

    # -- the peer control socket ---------------------------------------------------------

    def _serve_peers(self, ready: threading.Event) -> None:
        """The tcp control socket other proxies talk to (CURVE, allow-listed by ZAP).

        It answers from local state only and never sends a request itself, so two proxies
        asking each other at once can never wait on each other."""
        host = self._host
        assert host._ctx is not None
        sock = make_socket(host._ctx, zmq.REP, host.settings, bind=self.me.control,
                           curve=self.config.curve)
        push = make_socket(host._ctx, zmq.PUSH, host.settings, connect=host.endpoints.ingress)
        ready.set()
        try:
            while not host._stopping.is_set():
                if not sock.poll(100):
                    continue
                try:
                    frames = sock.recv_multipart(copy=False)
                    user = ""
                    if self.config.curve is not None:
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
                self._host._declare_pool(request.get("name"), request.get("bindings"),  # type: ignore[arg-type]
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
        info = PeerInfo.from_dict(request.get("peer"))
        if self.config.curve is not None and info.public_key.decode() != user:
            raise ConfigError("the hello's public key is not the key this connection used")
        self._adopt_pools(request.get("pools"), info.id)
        if self.config.directory == "static" and info.id != self.me.id:
            configured = self._directory.refresh() if self._directory is not None else {}
            with self._host._state:
                if info.id not in configured and info.id not in self._learned:
                    log.info("a peer not in our list introduced itself; linking to it",
                             extra={"peer": info.id})
                self._learned[info.id] = info
        return self._hello_reply()

    def _hello_reply(self) -> dict[str, Any]:
        pools = self._host.pools  # before _state: _declare_pool takes _pool_lock, then _state
        with self._host._state:
            return {"ok": True, "peer": self.me.as_dict(), "pools": pools,
                    "pool_endpoints": dict(self.pool_endpoints),
                    "members": dict(self._host._pool_members.counts)}

    def _adopt_pools(self, pools: Any, source: str) -> None:
        if not isinstance(pools, dict):
            return
        for name, bindings in pools.items():
            if name in self._host._pools:
                continue
            try:
                self._host._declare_pool(name, bindings, persist=True)
            except (ConfigError, ValueError, TypeError) as exc:
                log.warning("refused a peer's pool declaration",
                            extra={"peer": source, "pool": name, "error": str(exc)})

    # -- the manager (directory, hellos, links) ------------------------------------------

    def _manage(self, ready: threading.Event) -> None:
        host = self._host
        assert host._ctx is not None
        wake = host._ctx.socket(zmq.PULL)
        wake.setsockopt(zmq.LINGER, 0)
        wake.bind(f"inproc://zbus-manager-{host._tag}")
        monitors: dict[zmq.Socket[Any], str] = {}
        interval = self.config.sync_interval
        next_sync = 0.0
        ready.set()
        try:
            while not host._stopping.is_set():
                for name, reader in host._pool_members.new_monitors():
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
                    host._pool_members.event(monitors[sock], sock.recv_multipart())
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

    def _sync(self) -> None:
        """Ask the directory who is there, then hello each one (learning its pools and pool
        endpoints, and telling it ours)."""
        assert self._directory is not None
        fed = self.config
        found = self._own_names(self._directory.refresh())
        with self._host._state:
            # A peer that introduced itself is also in the directory when static peers name
            # it: same origin, same proxy, and two links would carry each of its messages
            # twice. One entry per origin.
            origins = {info.origin for info in found.values()}
            for pid, info in self._learned.items():
                if pid not in found and info.origin not in origins:
                    found[pid] = info
                    origins.add(info.origin)
        allowed = fed.allowed
        peers: dict[str, PeerInfo] = {}
        for pid, info in found.items():
            if fed.curve is not None and info.public_key not in allowed:
                if pid not in self._peer_state or self._peer_state[pid].get("alive") is not None:
                    log.warning("ignoring a peer whose key is not on the allow-list",
                                extra={"peer": pid})
                with self._host._state:  # others iterate it under the lock (stats, reflect)
                    self._peer_state[pid] = {"alive": None, "refused": True}
                continue
            peers[pid] = info
        hello = {"peer": self.me.as_dict(), "pools": self._host.pools}
        states: dict[str, dict[str, Any]] = {}
        named: dict[str, PeerInfo] = {}
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
                named[pid] = info
                continue
            own = reply.get("peer")
            if (isinstance(own, dict) and isinstance(own.get("id"), str) and own["id"]
                    and own["id"][:200] != pid and own["id"][:200] not in peers):
                # Known by address until now: from here on by the id it gives itself (what
                # its reflected probes carry), under the origin and key configured here.
                pid = own["id"][:200]
                info = dataclasses.replace(info, id=pid)
                old = self._peer_state.get(pid, old)
                with self._host._state:
                    self._named[info.origin] = pid
            named[pid] = info
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
        peers = named
        with self._host._state:
            gone = set(self._peers) - set(peers)
            self._peers = peers
            for pid in gone:
                log.info("peer left the directory", extra={"peer": pid})
            self._peer_state = {p: st for p, st in self._peer_state.items()
                                if st.get("refused")} | states

    def _own_names(self, found: dict[str, PeerInfo]) -> dict[str, PeerInfo]:
        """``found`` keyed, and its entries named, by the ids their proxies gave themselves
        when that is known (the configured origin and key stay: the config is trusted, not
        the reply)."""
        with self._host._state:
            named = dict(self._named)
        out: dict[str, PeerInfo] = {}
        for info in found.values():
            name = named.get(info.origin, info.id)
            out[name] = info if name == info.id else dataclasses.replace(info, id=name)
        return out

    def _reconcile(self) -> None:
        """Start the links that should exist and stop those that should not (manager only)."""
        host = self._host
        fed, s, ep = self.config, host.settings, host.endpoints
        want: dict[str, tuple[tuple[Any, ...], SocketSpec, SocketSpec]] = {}
        with host._state:
            peers = dict(self._peers)
            states = {p: dict(st) for p, st in self._peer_state.items()}
            members = dict(host._pool_members.counts)
        for pid, info in peers.items():
            want[f"peer-{pid}"] = (
                ("origin", info.origin, info.public_key),
                SocketSpec(zmq.XSUB, connect=(info.origin,), rcvhwm=s.subscriber_hwm,
                           sndhwm=0, curve=fed.curve, server_key=info.public_key or None),
                SocketSpec(zmq.XPUB, connect=(self.fanin,), sndhwm=s.subscriber_hwm),
            )
        for pool in host.pools:
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
                    SocketSpec(zmq.PUSH, connect=(self.pool_in(pool),),
                               sndhwm=s.pool_link_hwm, close_linger=max(s.linger, 0.5)),
                )
        for name, (key, device) in list(self._links.items()):
            if name not in want or want[name][0] != key:
                self._retire(name, key, device)
        for name, (key, front, back) in want.items():
            if name in self._links:
                continue
            assert host._ctx is not None
            device = Device(name, host._ctx, host._make, front, back)
            try:
                device.start()
            except Exception as exc:
                log.warning("cannot start a link", extra={"link": name, "error": str(exc)})
                continue
            with host._state:
                self._links[name] = (key, device)
            log.info("link up", extra={"link": name, "endpoint": key[-2]})

    def _retire(self, name: str, key: tuple[Any, ...], device: Device) -> None:
        stats = device.statistics()
        device.stop()
        with self._host._state:
            self._links.pop(name, None)
            if key[0] == "pool":
                total = self._retired.setdefault(key[1], {})
                for counter, value in stats.items():
                    total[counter] = total.get(counter, 0) + value
        log.info("link down", extra={"link": name})
