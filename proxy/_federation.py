"""Federation: this proxy's part in a graph of proxies on many hosts (docs/ARCHITECTURE.md).

Owns the federation's state: the peers and their states, peers learned from hellos, the links
and the counters of retired ones, and this host's pool endpoints as told to peers; the
directory; the ZAP handler; and two threads. The peer control socket (tcp, CURVE) answers
from local state only and never makes a request of its own (no control-plane deadlock). The
manager asks the directory each ``sync_interval`` and keeps one long-lived channel (a DEALER)
to each peer's control socket, on which it sends hellos and reflects without ever waiting
for an answer (replies come back to its poll loop); it reads the pools' member monitors and
reconciles the links; links are devices, started and stopped by the manager thread only (and
by the proxy's stop, once that thread ended). docs/ARCHITECTURE.md, "Membership", has the
design and its cost model: a peer's liveness is its channel's ZMTP heartbeats (libzmq's
I/O thread, watched by a socket monitor); hellos carry versions, and a proxy's content (pool
endpoints, members, pools, removals) only to a peer that does not hold its version; idle,
a peer gets a small hello every REFRESH_SYNCS intervals; no handshake once connected.

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
import fnmatch
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import msgpack
import zmq
import zmq.utils.monitor

from zbus import ConfigError, Endpoints, ProxyError, Settings, TransportError
from zbus._names import CONTROL_PREFIX
from zbus._transport import ZAP_DOMAIN, make_socket

from ._device import Device, SocketSpec
from ._directory import (
    FederationConfig,
    PeerInfo,
    RedisDirectory,
    StaticDirectory,
    ZapHandler,
)
from ._guard import ServiceHealth
from ._members import FRAMES_PER_MESSAGE, PoolMembers

__all__ = ["LINK_CONNECT_TIMEOUT", "PEER_TIMEOUT", "PROBE_PREFIX", "REFRESH_SYNCS",
           "Federation", "FederationHost", "PoolRefusedError", "accepts_peer_pool",
           "channel_heartbeats"]

log = logging.getLogger("zbus.proxy")

PEER_TIMEOUT = 1.0
"""Seconds a pool declaration or removal passed on to peers waits for their answers."""
PROBE_PREFIX = CONTROL_PREFIX + b"probe/"
MISSED_HELLOS = 3
LINK_CONNECT_TIMEOUT = 0.5
"""Seconds a link's tcp connect may wait for an answer (ZMQ_CONNECT_TIMEOUT). Without it a
connect to a peer behind a silent drop sits in SYN-SENT under the kernel's retry back-off
(1, 2, 4, 8 ... s) and finds a healed path 12-14 s late; with it, libzmq gives the attempt up
and starts a fresh one (a SYN at once) every LINK_CONNECT_TIMEOUT + LINK_RECONNECT_IVL_MAX."""
LINK_RECONNECT_IVL = 0.1
LINK_RECONNECT_IVL_MAX = 0.5
CHANNEL_HWM = 16
"""Requests a peer channel queues while its connection is up but the peer does not read:
a hung peer costs that much memory, and hellos to it then fail at once (counted missed)."""
MAX_SOCKETS = 8192
"""The federated proxy's ZeroMQ socket limit (ZMQ_MAX_SOCKETS): LEARNED_MAX learned peers
plus hundreds of configured ones."""
STOP_SLICE_MS = 20
"""Milliseconds a wait on a peer runs before it looks at the stop event again."""
STOP_DRAIN_S = 0.1
"""Seconds a stop reads the links' monitors after the links closed (_retired_readers)."""
AWAY_SYNC = 0.25
"""Seconds between hellos while a peer leaves them unanswered (it is connected but its
control does not answer): MISSED_HELLOS in a row make it not answering."""
_LINK_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
RUNS_KEPT = 64
"""Runs of each peer whose pool-link reports are kept (a peer restarts with a new run)."""
RETIRED_READER_S = 5.0
"""Seconds a stopped link's monitor reader stays open (and read) after the link's close."""
LINK_GRACE = LINK_CONNECT_TIMEOUT + LINK_RECONNECT_IVL_MAX
"""A link not connected this long after its start is down (before that it is connecting)."""
HELLO_POOLS_SHARE = 4
"""A hello carries at most max_message_bytes / HELLO_POOLS_SHARE of pool declarations (the
rest of a hello is small): more pools go in pages over successive hellos."""
HELLO_REMOVED_SHARE = 16
"""... and at most max_message_bytes / HELLO_REMOVED_SHARE of fabric-wide pool removals
(tombstones), in pages the same way."""
GENERATION_AHEAD_MS = 3_600_000
"""A peer's pool generation (ms clock) more than this ahead of our clock is refused: a made-up
one far ahead would hold the name's generations up for that long."""
REFUSALS_LOGGED = 1024
"""Pool names whose refused peer declarations are logged (once each, per reason)."""
LEARNED_MAX = 256
"""Peers learned from hellos (not configured) kept at most: more are refused and counted."""
LEARNED_EXPIRE_SYNCS = 10
"""A learned peer neither heard from nor answering for this many sync intervals is dropped
(one whose channel is connected counts as heard: its heartbeats answer)."""
REFRESH_SYNCS = 10
"""While nothing changed, each peer gets a hello every REFRESH_SYNCS sync intervals: a small
one (versions, no content). Liveness comes from the channel's ZMTP heartbeats meanwhile."""
CHANNEL_TIMEOUT = 0.5
"""Seconds a peer has to answer a channel's ZMTP ping (libzmq answers in its I/O thread, in
C: a loaded host's Python control thread needs no share of it)."""
MANAGER_TICK = 1.0
"""Seconds the manager waits at most for something to do (it is woken for what cannot wait:
a stop, a pool, a reflect, a greet); each turn polls every peer's sockets."""
STALE_GAP = 0.01
"""Seconds at least between two hellos to a peer while it lacks our content or we lack its
(pages go one per round trip): a peer that never completes one costs 100 hellos a second
at most, not a spin."""
BOOKS_TAIL_SYNCS = 3
"""Pool-link books keep hellos at every sync interval while they move, and this many
intervals after they last moved (what a peer's links took arrives one interval late)."""


class PoolRefusedError(ConfigError):
    """A pool declaration refused for ``reason`` (counted per reason when a peer's)."""

    def __init__(self, reason: str, text: str) -> None:
        super().__init__(text)
        self.reason = reason


def accepts_peer_pool(policy: tuple[str, ...] | None, name: str) -> bool:
    """Whether ``network.pools_from_peers`` lets peers declare (and remove) pool ``name``:
    None is "all", ``()`` "none", else names and glob patterns (``billing``, ``compute-*``)."""
    if policy is None:
        return True
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in policy)


def pool_page(pools: dict[str, Any], start: int,
              budget: int) -> tuple[dict[str, Any], int]:
    """Pools from the ``start``-th name (sorted, wrapping) while their msgpack size fits
    ``budget``, and where the next page starts: however many pools are declared, a hello
    stays bounded, and successive hellos carry every pool. A pool larger than the budget on
    its own is never sent (declared pools are bounded well below it). The same pages carry
    tombstones (name -> [bindings, generation])."""
    names = sorted(pools)
    if not names:
        return {}, 0
    start %= len(names)
    page: dict[str, Any] = {}
    used = 0
    for step in range(len(names)):
        name = names[(start + step) % len(names)]
        size = len(msgpack.packb([name, pools[name]]))
        if used + size > budget:
            if page:
                return page, (start + step) % len(names)
            continue
        page[name] = pools[name]
        used += size
    return page, start


def pool_pages(pools: dict[str, Any], budget: int) -> list[dict[str, Any]]:
    """``pools`` (sorted by name) cut into pages whose msgpack size fits ``budget``; at least
    one page, empty when there is nothing. A pool larger than the budget on its own is left
    out, as in ``pool_page``."""
    pages: list[dict[str, Any]] = []
    page: dict[str, Any] = {}
    used = 0
    for name in sorted(pools):
        size = len(msgpack.packb([name, pools[name]]))
        if size > budget:
            continue
        if used + size > budget:
            pages.append(page)
            page, used = {}, 0
        page[name] = pools[name]
        used += size
    if page or not pages:
        pages.append(page)
    return pages


def _page_of(page: Any) -> tuple[int, int]:
    """A hello's ``page`` field, [index, count], checked (a bad one is page 0 of 1)."""
    if isinstance(page, list) and len(page) == 2 \
            and all(isinstance(n, int) and not isinstance(n, bool) for n in page) \
            and 0 <= page[0] < page[1] <= 1 << 16:
        return page[0], page[1]
    return 0, 1


def channel_heartbeats(interval: float) -> tuple[float, float, float]:
    """A peer channel's ZMTP heartbeats for sync interval T, in seconds (IVL, TIMEOUT, TTL):
    a ping every 2T; the connection dropped when nothing came back within CHANNEL_TIMEOUT
    of a ping; and the far side asked to drop it when our pings stop for IVL + TIMEOUT
    (more than IVL, or it would drop a live channel between two pings).

    So a peer that went silent (hung, cut off, gone) is not answering CHANNEL_TIMEOUT to
    2T + CHANNEL_TIMEOUT later, 0.5-2.5 s at T = 1 s, whatever the number of silent peers:
    within the bound of a hello every T (T + 0.5 s to 2T + 0.5 s). Pings are the dominant
    per-peer cost of an idle proxy (libzmq's I/O thread and the kernel, per packet), hence
    one every 2T rather than every T (docs/ARCHITECTURE.md, "Membership")."""
    ivl = 2 * interval
    return ivl, CHANNEL_TIMEOUT, ivl + CHANNEL_TIMEOUT


class FederationHost(Protocol):
    """What the federation uses of the proxy it runs in (``Proxy`` is one)."""

    settings: Settings
    endpoints: Endpoints
    _ctx: zmq.Context[Any] | None
    _stopping: threading.Event
    _state: threading.Lock
    _tag: str
    _pools: dict[str, list[str]]
    _generations: dict[str, int]
    _removed: dict[str, dict[str, Any]]
    _pool_members: PoolMembers
    _devices: dict[str, Device]
    health: ServiceHealth

    @property
    def pools(self) -> dict[str, list[str]]: ...

    @property
    def pool_generations(self) -> dict[str, int]: ...

    @property
    def removed_pools(self) -> dict[str, dict[str, Any]]: ...

    def _declare_pool(self, name: str, bindings: list[str], *, persist: bool,
                      peer_generation: int | None = None) -> bool: ...

    def apply_removal(self, name: Any, bindings: Any, generation: int) -> bool: ...

    def _make(self, spec: SocketSpec) -> zmq.Socket[Any]: ...


@dataclasses.dataclass
class _Channel:
    """One peer's long-lived control connection, a DEALER to its peer control socket
    (manager thread only): hellos and reflects go on it, so a peer costs one CURVE
    handshake per tcp connection rather than one per request (issue 19). Its ZMTP
    heartbeats, watched by a socket monitor, say whether the peer is there; hellos carry
    what changed."""

    sock: zmq.Socket[Any]
    key: tuple[str, bytes]
    """The control endpoint and key it was made for: another is another channel."""
    reader: zmq.Socket[Any] | None = None
    """The reader of its socket monitor (handshake succeeded, disconnected)."""
    connected: bool = False
    """A connection completed its handshake and has not been dropped since."""
    due: float = 0.0
    """When its next hello goes (monotonic), if nothing makes it go sooner."""
    waiting: float | None = None
    """When the hello not answered yet went; None once answered (one at a time)."""
    sent_at: float = 0.0
    """When the last hello went."""
    missed: int = 0
    """Hellos in a row it left unanswered."""
    acked: int | None = None
    """Our content version the peer holds, as its last reply said."""
    page: tuple[int, int] = (0, 0)
    """(version, page): the next page of our content to send while the peer lacks it."""
    peer_version: int | None = None
    """The peer's content version, as its last reply said."""
    peer_pages: tuple[int | None, frozenset[int]] = (None, frozenset())
    """The pages of the peer's content at that version we have (complete: all of them)."""
    held: int | None = None
    """The peer's content version we hold complete."""
    legacy: bool = False
    """The peer's replies carry no versions (a zbus-proxy from before them): a full hello
    every sync interval, as it expects."""
    busy_until: float = 0.0
    """Hellos go every sync interval until then: the pool-link books are moving."""
    taken: Any = None
    """What the peer's pool links took from ours, as its last reply said."""


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
        # A learned peer's id -> when it last said hello or answered one (monotonic).
        self._heard: dict[str, float] = {}
        # Who may go by which id: the first id an authenticated key (or, on plain tcp, a
        # source address) said hello with. A hello claiming another's id is refused.
        self._id_of: dict[bytes, str] = {}
        self.hellos_refused: dict[str, int] = {}
        # Peers' pool declarations and removals refused, per reason (policy, removed,
        # conflict, generation, invalid, limit); the (reason, pool) pairs logged. Under _state.
        self.peer_pools_refused: dict[str, int] = {}
        self._refusals_logged: set[tuple[str, str]] = set()
        # Where our next reply's pages of pool declarations and of removals start, per peer
        # id, for a peer from before versions (under _state).
        self._reply_page_start: dict[str, tuple[int, int]] = {}
        # What hellos carry (docs/ARCHITECTURE.md, "Membership"): our content (pool
        # endpoints, members, pool declarations and removals) as pages, and its version,
        # changed (by the manager) whenever the content does; a peer that holds the version
        # gets none of it again. Read under _state by the peer thread for replies.
        self._version = int.from_bytes(os.urandom(6), "big")
        self._digest = b""
        self._content: tuple[int, list[dict[str, Any]]] = (self._version, [])
        # Per asking peer (its key, or address on plain tcp, and id): the version of its
        # content we hold, the pages of it we have, its pool endpoints and run (for its
        # books), and which page of ours our next reply carries. Under _state.
        self._askers: dict[tuple[bytes, str], dict[str, Any]] = {}
        # Hellos sent and served, and how many of each carried content; channels whose
        # connection dropped (a heartbeat timeout, a reset). Under _state.
        self.hellos = {"sent": 0, "sent_full": 0, "served": 0, "served_full": 0}
        self.channel_drops = 0
        # origin -> the id the proxy there gave itself in a hello reply (its node id): a
        # static entry names a peer by address, its reflected probes carry its own id.
        self._named: dict[str, str] = {}
        self._peer_state: dict[str, dict[str, Any]] = {}
        # Pool name -> this host's tcp pool-P.origin, set by the proxy when it declares a pool.
        self.pool_endpoints: dict[str, str] = {}
        self._links: dict[str, tuple[tuple[Any, ...], Device]] = {}
        self._retired: dict[str, dict[str, int]] = {}
        self.reflected = 0
        # This proxy's run: peers key what their pool links took from us by it.
        self.run = os.urandom(8).hex()
        # Per link: its tcp connection is up (handshake done, no disconnect since); a link
        # with no tcp side (from this host's own pool origin) is always up. Under _state.
        self._link_up: dict[str, bool] = {}
        self.link_restarts = 0
        self.link_disconnects = 0
        """Data links that lost their connection (libzmq reconnects them): a link that keeps
        dropping shows here, where a peer that refuses what it is sent would otherwise only
        log (issue 14 item 2)."""
        # Pool-link books (docs/RELIABILITY.md): frames that stopped pool links took, by
        # (source endpoint, source run); and per peer origin, per run of that peer, the frames
        # its pool links took from our pool origins, as its last hello reply said. Under _state.
        self._taken_retired: dict[tuple[str, str], int] = {}
        self._peer_taken: dict[str, dict[str, dict[str, int]]] = {}
        # Manager thread only: each link's monitor reader, the peer it comes from, and when
        # its current connection was made (monotonic).
        self._link_monitors: dict[str, zmq.Socket[Any]] = {}
        self._link_source: dict[str, str] = {}
        self._link_since: dict[str, float] = {}
        self._link_started: dict[str, float] = {}
        # Monitor readers of stopped links, closed RETIRED_READER_S later: libzmq sends a
        # socket's monitor events from its I/O thread, blocking, until the socket is gone
        # (after its close); a reader closed first leaves a late event (a handshake that
        # completes during the close) with no peer, and the I/O thread, every connection
        # of the proxy with it, waits forever.
        self._retired_readers: list[tuple[float, zmq.Socket[Any]]] = []
        self._link_seq = 0
        # Manager thread only: each peer's channel, and whether the links need reconciling
        # (reconciling on every event would cost O(N) per reply, O(N^2) per round).
        self._channels: dict[str, _Channel] = {}
        self._dirty = True
        # Manager thread only: the poller is made again only when its sockets change; the
        # pool origins' sent total at the last sync tick (books moving: hellos go faster).
        self._poller: zmq.Poller | None = None
        self._polled: dict[zmq.Socket[Any], tuple[str, str]] = {}
        self._books_sent: int | None = None

    # -- lifecycle (the proxy calls these in the order of its start and stop) ------------

    def start_security(self) -> None:
        ctx = self._host._ctx
        assert ctx is not None
        # Before the first socket (libzmq sizes its table then): each peer takes about six
        # (its channel, its link's two and their monitor and steering pairs), and libzmq's
        # default of 1,023 ends near 170 peers with EMFILE ("Too many open files").
        ctx.set(zmq.MAX_SOCKETS, MAX_SOCKETS)
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
                                             prefix=fed.redis_prefix, configured=fed.peers)
        else:
            self._directory = StaticDirectory(fed.peers, self.me)
        self._update_content()  # what the first hellos and replies carry
        ready = threading.Event()
        for target, name in ((self._serve_peers, "zbus-peers"), (self._manage, "zbus-links")):
            thread = threading.Thread(target=self._host.health.guard(name, target),
                                      args=(ready,), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
            if not ready.wait(10):
                raise ProxyError(f"the {name} thread did not start")
            ready.clear()
        log.info("federation on", extra={"node": self.me.id, "origin": self.me.origin,
                                         "directory": fed.directory})

    def join(self) -> None:
        """Wait for the threads to end (the proxy's stop event is set)."""
        if any(thread.is_alive() for thread in self._threads):
            with contextlib.suppress(zmq.ZMQError):
                self._wake()  # the manager may be waiting up to MANAGER_TICK
        for thread in self._threads:
            thread.join(10)
        self._threads.clear()

    def stop_links(self) -> None:
        """Stop every link, then close the monitor readers (the manager thread ended)."""
        for _, link in list(self._links.values()):
            link.stop()
        self._links.clear()
        # Read a moment longer: a late event of a link closing (see _retired_readers).
        self._retired_readers += [(0.0, reader) for reader in self._link_monitors.values()]
        self._link_monitors.clear()
        until = time.monotonic() + STOP_DRAIN_S
        while self._retired_readers and time.monotonic() < until:
            self._close_retired_readers(-1.0)  # read them all, close none yet
            time.sleep(STOP_SLICE_MS / 1000)  # the readers' events come by themselves
        for _, reader in self._retired_readers:
            reader.close(linger=0)
        self._retired_readers.clear()

    def stop_security(self) -> None:
        if self._zap is not None:
            self._zap.stop()
            self._zap = None

    # -- what the proxy reports and asks -------------------------------------------------

    def link_statistics(self) -> dict[str, dict[str, int]]:
        return {name: d.statistics() for name, (_, d) in list(self._links.items())}

    def _alive(self, pid: str, state: dict[str, Any]) -> bool:
        """A peer is alive when it answers hellos *and* its data link is connected (caller
        holds _state): a peer that answers while its data cannot flow is not."""
        return bool(state.get("answering")) and self._link_up.get(f"peer-{pid}", False)

    def stats(self) -> dict[str, Any]:
        books = self._pool_link_books()
        with self._host._state:
            peers = {}
            for p, info in self._peers.items():
                state = self._peer_state.get(p, {})
                peers[p] = {"origin": info.origin,
                            **{k: v for k, v in state.items() if k != "away_since"},
                            "alive": self._alive(p, state),
                            "link_up": self._link_up.get(f"peer-{p}", False)}
            return {
                "node": self.me.id,
                "origin": self.me.origin,
                "run": self.run,
                "peers": peers,
                "link_restarts": self.link_restarts,
                "link_disconnects": self.link_disconnects,
                "pool_links": books,
                "members": dict(self._host._pool_members.counts),
                "pool_endpoints": dict(self.pool_endpoints),
                "retired_links": {k: dict(v) for k, v in self._retired.items()},
                "reflected": self.reflected,
                "hellos": dict(self.hellos),
                "content_version": self._content[0],
                "channel_drops": self.channel_drops,
                "learned": len(self._learned),
                "hellos_refused": dict(self.hellos_refused),
                "peer_pools_refused": dict(self.peer_pools_refused),
                "pools_from_peers": ("all" if self.config.pools_from_peers is None
                                      else list(self.config.pools_from_peers) or "none"),
                "zap": self._zap.stats() if self._zap else None,
                "directory_failures": getattr(self._directory, "failures", 0),
                "directory_rejected": getattr(self._directory, "rejected", 0),
                "directory_conflicts": getattr(self._directory, "conflicts", 0),
            }

    def pool_in(self, name: str) -> str:
        """Where pool ``name``'s deliver-side PULL binds, and its pool links push into."""
        return f"inproc://zbus-pool-{name}-in-{self._host._tag}"

    def _taken(self, endpoint: str, run: str) -> int:
        """Frames this host's pool links took from pool origin ``endpoint`` (of that proxy's
        ``run``), stopped links included."""
        with self._host._state:
            total = self._taken_retired.get((endpoint, run), 0)
            live = [device for key, device in self._links.values()
                    if key[0] == "pool" and key[2] == endpoint and key[4] == run]
        for device in live:
            total += device.statistics().get("frontend_frames_in", 0)
        return total

    def _pool_link_books(self) -> dict[str, dict[str, Any]]:
        """Per pool: what this host's pool origin handed to pool links (its own and the
        peers'), what those links took in, as they last said, and the difference:
        messages that died between the two (a partitioned peer's connection and queues, a
        link stopped with messages in it), in flight until quiet."""
        ep = self._host.endpoints
        with self._host._state:
            endpoints = dict(self.pool_endpoints)
            reports = [dict(runs) for runs in self._peer_taken.values()]
        out: dict[str, dict[str, Any]] = {}
        for pool in endpoints:
            device = self._host._devices.get(f"pool-{pool}-origin")
            sent = device.statistics().get("backend_frames_out") if device else None
            if sent is None:  # the device did not answer: no number rather than a wrong one
                out[pool] = {"sent": None, "taken": None, "unaccounted": None}
                continue
            taken = self._taken(ep.pool_origin(pool), self.run)
            taken += sum(pools.get(pool, 0) for runs in reports for pools in runs.values())
            out[pool] = {"sent": sent // FRAMES_PER_MESSAGE, "taken": taken // FRAMES_PER_MESSAGE,
                         "unaccounted": -(-(sent - taken) // FRAMES_PER_MESSAGE)}
        return out

    def _taken_for(self, endpoints: Any, run: Any) -> dict[str, int]:
        """For a hello: frames our pool links took from the asking peer's pool origins."""
        if not isinstance(endpoints, dict) or not isinstance(run, str):
            return {}
        return {pool: self._taken(endpoint, run) for pool, endpoint in endpoints.items()
                if isinstance(pool, str) and isinstance(endpoint, str)}

    def pass_on_declaration(self, name: str, bindings: list[str], created: bool,
                            generation: int = 0) -> None:
        """Pass a pool declaration a client made here on to every peer that answered lately
        (the others get it with their next hello), all at once: one PEER_TIMEOUT at most,
        however many peers went silent."""
        peers = self._answering()
        replies = self._peer_requests(peers, "declare_pool", name=name, bindings=bindings,
                                      generation=generation)
        for peer, reply in zip(peers, replies, strict=True):
            if reply is None or not reply.get("ok"):
                log.warning("a peer did not take a pool declaration; its next hello will", extra={
                    "peer": peer.id, "pool": name,
                    "error": (reply or {}).get("error", "no answer")})
        if created:
            self._wake()

    def pass_on_removal(self, name: str, bindings: list[str], generation: int) -> None:
        """Pass a fabric-wide removal made here on to every peer that answered lately (the
        others get it with their next hello, like every host's tombstones)."""
        peers = self._answering()
        replies = self._peer_requests(peers, "remove_pool", name=name, bindings=bindings,
                                      generation=generation)
        for peer, reply in zip(peers, replies, strict=True):
            if reply is None or not reply.get("ok"):
                log.warning("a peer did not take a pool removal; its next hello will", extra={
                    "peer": peer.id, "pool": name,
                    "error": (reply or {}).get("error", "no answer")})

    def _answering(self) -> list[PeerInfo]:
        with self._host._state:
            return [self._peers[p] for p, st in self._peer_state.items()
                    if st.get("answering") and p in self._peers]

    # -- requests to peers ---------------------------------------------------------------

    def _peer_requests(self, peers: list[PeerInfo], op: str, timeout: float = PEER_TIMEOUT,
                       /, **fields: Any) -> list[dict[str, Any] | None]:
        """One request to each of ``peers``' control sockets, on fresh REQs, all in flight at
        once; each reply, None for a peer that did not answer within ``timeout`` (or when
        the proxy stops: it looks every STOP_SLICE_MS). For the rare requests a client's
        call waits on (pool declarations and removals); hellos and reflects go on the
        manager's channels."""
        ctx = self._host._ctx
        assert ctx is not None
        fed = self.config
        request = msgpack.packb({"op": op, **fields})
        socks: dict[zmq.Socket[Any], int] = {}
        replies: list[dict[str, Any] | None] = [None] * len(peers)
        poller = zmq.Poller()
        try:
            for i, peer in enumerate(peers):
                try:
                    sock = make_socket(ctx, zmq.REQ, self._host.settings,
                                       connect=self._from_us(peer.control), curve=fed.curve,
                                       server_key=peer.public_key or None)
                except Exception:
                    log.debug("cannot reach peer", extra={"peer": peer.id}, exc_info=True)
                    continue
                socks[sock] = i
                sock.send(request)
                poller.register(sock, zmq.POLLIN)
            deadline = time.monotonic() + timeout
            waiting = len(socks)
            while waiting and not self._host._stopping.is_set() \
                    and time.monotonic() < deadline:
                for sock, _ in poller.poll(STOP_SLICE_MS):
                    poller.unregister(sock)
                    waiting -= 1
                    try:
                        reply = msgpack.unpackb(sock.recv(), raw=False, strict_map_key=True)
                    except Exception:
                        log.debug("peer request failed", extra={
                            "peer": peers[socks[sock]].id, "op": op}, exc_info=True)
                        continue
                    replies[socks[sock]] = reply if isinstance(reply, dict) else None
        finally:
            for sock in socks:
                sock.close(linger=0)
        return replies

    def _from_us(self, endpoint: str) -> str:
        """``endpoint`` connected to from the address we bind: a peer that learns us from a
        hello checks that our endpoints are on the address it came from."""
        source = self.config.host
        if source and ":" not in source and source not in ("0.0.0.0", "*") \
                and endpoint.startswith("tcp://"):
            return f"tcp://{source}:0;{endpoint[len('tcp://'):]}"
        return endpoint

    def reflect(self, token: bytes) -> list[str]:
        """Have every live peer publish ``token`` (plus its id) on its own origin; the ids
        of the peers asked, at once. The manager sends the requests on its peer channels:
        nothing here waits on a peer, and a peer known to be away is not asked. The caller
        waits for one copy per id and asks again; a peer that went silent leaves the list
        when its hellos go unanswered (MISSED_HELLOS), in the same time however many did."""
        with self._host._state:
            live = [p for p, st in self._peer_state.items()
                    if p in self._peers and self._alive(p, st)]
        if live:
            self._tell_manager([b"reflect", token])
        return live

    def _wake(self) -> None:
        """Make the manager reconcile links now rather than at its next tick."""
        self._tell_manager([b""])

    def _tell_manager(self, frames: list[bytes]) -> None:
        ctx = self._host._ctx
        assert ctx is not None
        sock = ctx.socket(zmq.PUSH)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"inproc://zbus-manager-{self._host._tag}")
            with contextlib.suppress(zmq.Again):
                sock.send_multipart(frames, zmq.NOBLOCK)
        finally:
            sock.close(linger=100)

    # -- the peer control socket ---------------------------------------------------------

    def _serve_peers(self, ready: threading.Event) -> None:
        """The tcp control socket other proxies talk to (CURVE, allow-listed by ZAP).

        It answers from local state only and never sends a request itself, so two proxies
        asking each other at once can never wait on each other."""
        host = self._host
        assert host._ctx is not None
        # No heartbeats of its own: every peer's channel pings it every sync interval and
        # asks (ZMTP TTL) to be dropped when its pings stop; this side pinging each channel
        # back would double what an idle fabric costs in libzmq's I/O thread.
        sock = make_socket(host._ctx, zmq.REP, host.settings)
        try:
            if self.config.curve is not None:
                sock.curve_secretkey = self.config.curve.secret
                sock.curve_server = True
                sock.zap_domain = ZAP_DOMAIN
            sock.bind(self.me.control)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise TransportError(f"cannot bind the peer control socket on "
                                 f"{self.me.control}: {exc}") from exc
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
                    address = str(frames[0].get("Peer-Address"))
                    if len(frames) == 1:
                        reply = self._handle_peer(frames[0].bytes, user, push, address)
                    else:
                        reply = {"ok": False, "error": "a request is one frame"}
                    sock.send(msgpack.packb(reply))
                except zmq.ZMQError:
                    log.debug("peer control socket error", exc_info=True)
        finally:
            push.close(linger=0)
            sock.close(linger=0)

    def _handle_peer(self, raw: bytes, user: str, push: zmq.Socket[Any],
                     address: str = "") -> dict[str, Any]:
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
                return self._hello_from(request, user, address)
            if op == "declare_pool":
                # Never passed on from here: declarations spread one hop, from the proxy
                # a client asked; a peer that missed it catches up through hello.
                self._adopt_pool(request.get("name"), request.get("bindings"),
                                 request.get("generation", 0), user or address, raising=True)
                self._wake()
                return {"ok": True}
            if op == "remove_pool":
                self._adopt_removal(request.get("name"), [request.get("bindings"),
                                                          request.get("generation")],
                                    user or address, raising=True)
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

    def _refuse_hello(self, reason: str, text: str, info: PeerInfo, address: str) -> None:
        with self._host._state:
            self.hellos_refused[reason] = self.hellos_refused.get(reason, 0) + 1
        log.warning("refused a peer's hello", extra={"peer": info.id, "reason": reason,
                                                     "address": address})
        raise ConfigError(text)

    def _hello_from(self, request: dict[str, Any], user: str,
                    address: str = "") -> dict[str, Any]:
        info = PeerInfo.from_dict(request.get("peer"))
        if self.config.curve is not None and info.public_key.decode() != user:
            raise ConfigError("the hello's public key is not the key this connection used")
        # The directory as last read (no I/O: with Redis a read per hello would cost each
        # proxy O(N) requests per hello, O(N^2) per round).
        configured = self._directory.known() if self._directory is not None else {}
        # Who says hello: its authenticated key; on plain tcp only its source address.
        who = info.public_key if self.config.curve is not None else address.encode()
        with self._host._state:
            # Ids held by the configuration: each configured peer's (and the id its proxy
            # gave itself in a hello reply), under the configured key.
            owners = {p.id: self._identity(p) for p in configured.values()}
            for p in configured.values():
                if p.origin in self._named:
                    owners[self._named[p.origin]] = self._identity(p)
            owners[self.me.id] = self._identity(self.me)
            trusted = self.config.curve is not None \
                and any(p.public_key == who for p in configured.values())
            first = self._id_of.get(who)
            holder = next((k for k, i in self._id_of.items() if i == info.id), None)
            known = info.id in self._learned
            count = len(self._learned)
        claimed = info.id in owners and owners[info.id] != who
        if claimed or (not trusted and first is not None and first != info.id) \
                or (holder is not None and holder != who):
            self._refuse_hello("id_claimed", f"node id {info.id!r} belongs to another peer "
                               "(ids are bound to the key that first used them)", info, address)
        learn = self.config.directory == "static" and not trusted
        if learn:
            for endpoint in (info.origin, info.control):
                endpoint_host = endpoint[len("tcp://"):].rpartition(":")[0].strip("[]")
                if endpoint_host != address:
                    self._refuse_hello(
                        "address", f"endpoint {endpoint!r} is not on {address}, where this "
                        "hello came from: a peer introduces itself at its own address", info,
                        address)
            if not known and count >= LEARNED_MAX:
                self._refuse_hello("learned_full", f"this proxy knows {LEARNED_MAX} peers "
                                   "from hellos already; list this one in its config", info,
                                   address)
        version = request.get("v")
        legacy = isinstance(version, bool) or not isinstance(version, int)
        content = legacy or "page" in request
        if content:  # a small hello (nothing changed) carries no pools
            self._adopt_pools(request, info.id)
        with self._host._state:
            if not trusted and len(self._id_of) < 16 * LEARNED_MAX:
                self._id_of.setdefault(who, info.id)
            if learn:
                if info.id not in configured and not known:
                    log.info("a peer not in our list introduced itself; linking to it",
                             extra={"peer": info.id})
                self._learned[info.id] = info
                self._heard[info.id] = time.monotonic()
            asker = self._asker((who, info.id), request,
                                version if content and not legacy else None)
            endpoints, run, have = asker["endpoints"], asker["run"], asker["have"]
            if legacy:
                endpoints, run = request.get("pool_endpoints"), request.get("run")
        taken = self._taken_for(endpoints, run)
        reply: dict[str, Any] = {"ok": True, "peer": self.me.as_dict(), "run": self.run,
                                 "pool_taken": taken}
        declared = self._declarations() if legacy else None  # before _state: pool lock first
        with self._host._state:
            mine, pages = self._content
            pid = info.id if info.id in self._peers else next(
                (q for q, p in self._peers.items() if p.origin == info.origin), None)
            state = self._peer_state.get(pid, {}) if pid is not None else {}
            # A peer we count away greets us, or its content changed (we hold another
            # version of it): hello it now, not at its next turn, and its reply tells us.
            back = pid is not None and (not state.get("answering")
                                        or (not legacy and state.get("version") != version))
            if declared is not None:  # a peer from before versions: every reply is full
                start, removed_start = self._reply_page_start.get(info.id, (0, 0))
                page, after = self._pages(declared, start, removed_start)
                if info.id not in self._reply_page_start \
                        and len(self._reply_page_start) >= 4 * LEARNED_MAX:
                    self._reply_page_start.pop(next(iter(self._reply_page_start)))
                self._reply_page_start[info.id] = after
                reply.update(page, pool_endpoints=dict(self.pool_endpoints),
                             members=dict(self._host._pool_members.counts))
            else:
                reply.update(v=mine, have=have)
                if request.get("have") != mine and pages:  # it lacks ours: the next page
                    at, i = asker["page"]
                    i = (i if at == mine else 0) % len(pages)
                    asker["page"] = (mine, i + 1)
                    reply.update(pages[i], page=[i, len(pages)])
            self.hellos["served"] += 1
            self.hellos["served_full"] += int("pools" in reply)
        if back:
            self._tell_manager([b"greet", info.origin.encode()])
        return reply

    def _asker(self, who: tuple[bytes, str], request: dict[str, Any], version: int | None
               ) -> dict[str, Any]:
        """What we know of the peer ``who`` (its key, or on plain tcp its address, and its
        id) from its hellos (caller holds _state): its run,
        its pool endpoints, and the version of its content we hold; a hello carrying page
        ``request["page"]`` of its content at ``version`` is recorded (the version is held
        once every page of it came)."""
        asker = self._askers.get(who)
        if asker is None:
            if len(self._askers) >= 16 * LEARNED_MAX:
                self._askers.pop(next(iter(self._askers)))
            asker = self._askers[who] = {"v": None, "pages": frozenset(), "have": None,
                                         "endpoints": {}, "run": "", "page": (None, 0)}
        run = request.get("run")
        if isinstance(run, str):
            asker["run"] = run[:64]
        if version is None:
            return asker
        endpoints = request.get("pool_endpoints")
        if isinstance(endpoints, dict):
            asker["endpoints"] = endpoints
        index, count = _page_of(request.get("page"))
        got = asker["pages"] if asker["v"] == version else frozenset()
        got |= {index}
        asker["v"], asker["pages"] = version, got
        if len(got) >= count:
            asker["have"] = version
        return asker

    def _pools_budget(self) -> int:
        return max(self._host.settings.max_message_bytes // HELLO_POOLS_SHARE, 1)

    def _declarations(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """For a hello: each fast pool as [bindings, generation], and each fabric-wide
        removal as [bindings, generation] (call without _state: the pool lock is first)."""
        host = self._host
        pools, generations = host.pools, host.pool_generations
        removed = host.removed_pools
        return ({name: [bindings, generations.get(name, 0)] for name, bindings in pools.items()},
                {name: [t["bindings"], t["generation"]] for name, t in removed.items()
                 if t["fabric"]})

    def _pages(self, declared: tuple[dict[str, Any], dict[str, Any]], start: int,
               removed_start: int) -> tuple[dict[str, Any], tuple[int, int]]:
        """A hello's pages: "pools" (name -> bindings, as every zbus-proxy reads them),
        "pool_generations" and "removed" (name -> [bindings, generation]); each bounded."""
        max_bytes = self._host.settings.max_message_bytes
        pools, after = pool_page(declared[0], start, self._pools_budget())
        removed, removed_after = pool_page(declared[1], removed_start,
                                           max(max_bytes // HELLO_REMOVED_SHARE, 1))
        return ({"pools": {name: entry[0] for name, entry in pools.items()},
                 "pool_generations": {name: entry[1] for name, entry in pools.items()},
                 "removed": removed}, (after, removed_after))

    def _identity(self, peer: PeerInfo) -> bytes:
        """What a configured peer's hellos are known by: its key, or on plain tcp its host."""
        if self.config.curve is not None:
            return peer.public_key
        return peer.origin[len("tcp://"):].rpartition(":")[0].strip("[]").encode()

    def _adopt_pools(self, hello: dict[str, Any], source: str) -> None:
        """Take the pool removals, then the declarations, a hello (or its reply) carries."""
        removed = hello.get("removed")
        if isinstance(removed, dict):
            for name, entry in removed.items():
                self._adopt_removal(name, entry, source)
        pools = hello.get("pools")
        if not isinstance(pools, dict):
            return
        generations = hello.get("pool_generations")
        if not isinstance(generations, dict):
            generations = {}  # an older peer: its declarations are generation 0
        for name, bindings in pools.items():
            self._adopt_pool(name, bindings, generations.get(name, 0), source)

    def _adopt_pool(self, name: Any, bindings: Any, generation: Any, source: str, *,
                    raising: bool = False) -> None:
        """A peer's declaration of pool ``name``: taken if local policy accepts the name,
        it is not older than this host's removal of the same bindings, and the name is
        free; else refused, counted and logged once per pool and reason (and, with
        ``raising``, the ConfigError raised for the peer's reply)."""
        host = self._host
        known = host._generations.get(name) if isinstance(name, str) else None
        if known is not None and host._pools.get(name) == bindings \
                and isinstance(generation, int) and generation <= known:
            return  # what every hello repeats: nothing to do (read without the lock)
        try:
            self._check_peer_pool(name, generation)
            host._declare_pool(name, bindings, persist=True, peer_generation=generation)
        except (ConfigError, ValueError, TypeError) as exc:
            reason = exc.reason if isinstance(exc, PoolRefusedError) else "invalid"
            self._refused(reason, name, source, str(exc), "declaration")
            if raising:
                raise

    def _adopt_removal(self, name: Any, entry: Any, source: str, *,
                       raising: bool = False) -> None:
        """A peer's fabric-wide removal (``entry``: [bindings, generation]): taken when
        local policy accepts the name (``Proxy.apply_removal`` then decides); else refused
        and counted like a declaration."""
        try:
            if not isinstance(entry, list) or len(entry) != 2:
                raise PoolRefusedError("invalid", "a pool removal is [bindings, generation]")
            bindings, generation = entry
            self._check_peer_pool(name, generation)
            old = self._host._removed.get(name)
            if old is not None and old["generation"] >= generation:
                return  # known already (read without the lock; apply_removal checks again)
            if self._host.apply_removal(name, bindings, generation):
                self._wake()
        except (ConfigError, ValueError, TypeError) as exc:
            reason = exc.reason if isinstance(exc, PoolRefusedError) else "invalid"
            self._refused(reason, name, source, str(exc), "removal")
            if raising:
                raise

    def _check_peer_pool(self, name: Any, generation: Any) -> None:
        """Local policy (``network.pools_from_peers``) and a sane generation, before any
        lock: PoolRefusedError."""
        if not isinstance(name, str) or not accepts_peer_pool(self.config.pools_from_peers,
                                                              name):
            raise PoolRefusedError("policy", f"this proxy does not take pool {name!r} from peers "
                              f"(network.pools_from_peers)")
        if isinstance(generation, bool) or not isinstance(generation, int) or generation < 0 \
                or generation > time.time_ns() // 1_000_000 + GENERATION_AHEAD_MS:
            raise PoolRefusedError("generation", f"pool {name!r}: generation {generation!r} is not "
                              f"an integer from 0 to this host's clock (ms) + "
                              f"{GENERATION_AHEAD_MS}")

    def _refused(self, reason: str, name: Any, source: str, text: str, what: str) -> None:
        with self._host._state:
            self.peer_pools_refused[reason] = self.peer_pools_refused.get(reason, 0) + 1
            key = (reason, name if isinstance(name, str) else repr(name)[:80])
            first = key not in self._refusals_logged \
                and len(self._refusals_logged) < REFUSALS_LOGGED
            if first:
                self._refusals_logged.add(key)
        if first:  # once per pool and reason: a hello repeats it every sync interval
            log.warning(f"refused a peer's pool {what}", extra={
                "peer": source, "pool": key[1], "reason": reason, "error": text})

    # -- the manager (directory, hellos, links) ------------------------------------------

    def _manage(self, ready: threading.Event) -> None:
        host = self._host
        assert host._ctx is not None
        wake = host._ctx.socket(zmq.PULL)
        wake.setsockopt(zmq.LINGER, 0)
        wake.bind(f"inproc://zbus-manager-{host._tag}")
        monitors: dict[zmq.Socket[Any], str] = {}
        interval = self.config.sync_interval
        next_refresh = 0.0
        next_hello = 0.0
        ready.set()
        try:
            while not host._stopping.is_set():
                for name, reader in host._pool_members.new_monitors():
                    monitors[reader] = name
                    self._poller = None
                if self._poller is None:
                    self._build_poller(wake, monitors)
                assert self._poller is not None
                wait = max(0.0, min(next_refresh, next_hello) - time.monotonic())
                for sock, _ in self._poller.poll(int(min(wait, MANAGER_TICK) * 1000)):
                    kind, name = self._polled.get(sock, ("", ""))
                    if not isinstance(sock, zmq.Socket) or sock.closed:
                        continue  # a channel dropped by an event just before
                    if kind == "wake":
                        self._manager_command(wake.recv_multipart())
                    elif kind == "link":
                        self._link_event(name, sock.recv_multipart())
                    elif kind == "channel":
                        self._channel_event(sock)
                    elif kind == "peer":
                        self._peer_replies(sock)
                    elif kind == "members":
                        host._pool_members.event(monitors[sock], sock.recv_multipart(), sock)
                        self._dirty = True
                for reader in host._pool_members.stale(list(monitors)):
                    del monitors[reader]  # a removed pool's
                    reader.close(linger=0)
                    self._poller = None
                self._close_retired_readers(time.monotonic())
                if host._stopping.is_set():
                    break
                if time.monotonic() >= next_refresh:
                    try:
                        self._refresh_peers()
                        self._check_books(time.monotonic())
                    except Exception:
                        log.exception("peer directory refresh failed; retrying")
                    next_refresh = time.monotonic() + interval
                    self._dirty = True  # and a link that failed to start is tried again
                if self._dirty:
                    self._dirty = False
                    try:
                        self._update_content()
                        self._reconcile()
                    except Exception:
                        log.exception("link reconcile failed; retrying")
                if host._stopping.is_set():
                    break
                try:
                    next_hello = self._send_hellos(time.monotonic())
                except Exception:
                    log.exception("peer hellos failed; retrying")
                    next_hello = time.monotonic() + interval
        finally:
            # The links' readers stay open until the links are stopped (stop_links).
            for reader in monitors:
                reader.close(linger=0)
            for channel in self._channels.values():
                self._close_channel(channel)
            self._channels.clear()
            wake.close(linger=0)
            if self._directory is not None:
                self._directory.close()

    def _build_poller(self, wake: zmq.Socket[Any], monitors: dict[zmq.Socket[Any], str]
                      ) -> None:
        """The manager's poller, made again only when its sockets change (making it is O(N);
        the loop turns at every reply and at least ten times a second)."""
        polled: dict[zmq.Socket[Any], tuple[str, str]] = {wake: ("wake", "")}
        polled.update((reader, ("members", name)) for reader, name in monitors.items())
        polled.update((reader, ("link", name)) for name, reader in self._link_monitors.items())
        for pid, channel in self._channels.items():
            polled[channel.sock] = ("peer", pid)
            if channel.reader is not None:
                polled[channel.reader] = ("channel", pid)
        poller = zmq.Poller()
        for sock in polled:
            poller.register(sock, zmq.POLLIN)
        self._poller, self._polled = poller, polled

    def _channel_of(self, sock: zmq.Socket[Any]) -> tuple[str, _Channel] | None:
        """The peer whose channel (or channel monitor) ``sock`` is (it may have been renamed
        since the poller was made)."""
        for pid, channel in self._channels.items():
            if channel.sock is sock or channel.reader is sock:
                return pid, channel
        return None

    def _channel_event(self, reader: zmq.Socket[Any]) -> None:
        """The events of a channel's monitor: a connection that completed its handshake
        gets a hello at once (with our content: the far side may be a new run); a dropped
        one (ZMTP heartbeat timeout, reset, the peer gone) makes the peer not answering at
        once, whatever the other peers do (manager only)."""
        found = self._channel_of(reader)
        while True:
            try:
                frames = reader.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if found is None:
                continue
            pid, channel = found
            event = zmq.utils.monitor.parse_monitor_message(frames)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                channel.connected = True
                channel.acked = None
                channel.waiting = None
                channel.due = 0.0
                with self._host._state:
                    if pid in self._peer_state:
                        self._peer_state[pid] = {**self._peer_state[pid], "channel_up": True}
            elif event == zmq.EVENT_DISCONNECTED:
                channel.connected = False
                channel.waiting = None
                with self._host._state:
                    self.channel_drops += 1
                    old = self._peer_state.get(pid)
                    if old is not None:
                        self._peer_state[pid] = {
                            **old, "answering": False, "channel_up": False,
                            "missed": max(int(old.get("missed", 0)), MISSED_HELLOS)}
                if old is not None and old.get("answering"):
                    log.warning("peer stopped answering (its channel dropped)",
                                extra={"peer": pid})
                    self._dirty = True

    def _close_channel(self, channel: _Channel) -> None:
        """Close a channel (manager only). Its monitor is switched off first (libzmq then
        sends no more events), and its reader kept RETIRED_READER_S all the same, as links'
        are (see _retired_readers)."""
        with contextlib.suppress(zmq.ZMQError):
            channel.sock.disable_monitor()
        channel.sock.close(linger=0)
        if channel.reader is not None:
            self._retired_readers.append((time.monotonic() + RETIRED_READER_S, channel.reader))
        self._poller = None

    def _update_content(self) -> None:
        """What our hellos carry, as pages, and its version: a new version when the content
        changed (manager only, or start before the threads)."""
        declared = self._declarations()  # before _state: the pool lock comes first
        with self._host._state:
            endpoints = dict(self.pool_endpoints)
            members = dict(self._host._pool_members.counts)
        digest = msgpack.packb([sorted(endpoints.items()), sorted(members.items()),
                                sorted(declared[0].items()), sorted(declared[1].items())])
        if digest == self._digest:
            return
        max_bytes = self._host.settings.max_message_bytes
        pools = pool_pages(declared[0], self._pools_budget())
        removed = pool_pages(declared[1], max(max_bytes // HELLO_REMOVED_SHARE, 1))
        pages = []
        for i in range(max(len(pools), len(removed))):
            page = pools[i] if i < len(pools) else {}
            pages.append({"pools": {name: entry[0] for name, entry in page.items()},
                          "pool_generations": {name: entry[1] for name, entry in page.items()},
                          "removed": removed[i] if i < len(removed) else {},
                          "pool_endpoints": endpoints, "members": members})
        if self._digest:
            self._version += 1
        self._digest = digest
        with self._host._state:
            self._content = (self._version, pages)

    def _check_books(self, now: float) -> None:
        """At each sync tick: when our pool origins handed anything out since the last,
        hellos go every sync interval for a while, so that what the peers' pool links took
        comes back as it does (docs/RELIABILITY.md, the pool-link books) (manager only)."""
        with self._host._state:
            pools = list(self.pool_endpoints)
        if not pools:
            return
        sent = 0
        for pool in pools:
            device = self._host._devices.get(f"pool-{pool}-origin")
            if device is not None:
                sent += device.statistics().get("backend_frames_out", 0)
        if self._books_sent is not None and sent != self._books_sent:
            until = now + BOOKS_TAIL_SYNCS * self.config.sync_interval
            for channel in self._channels.values():
                channel.busy_until = until
                channel.due = min(channel.due, now)
        self._books_sent = sent

    def _close_retired_readers(self, now: float) -> None:
        """Read what stopped links' monitors still sent (nothing waits on a full queue
        either), and close the readers whose time came (manager only)."""
        kept = []
        for until, reader in self._retired_readers:
            with contextlib.suppress(zmq.Again):
                while True:
                    reader.recv(zmq.NOBLOCK)
            if until <= now:
                reader.close(linger=0)
                self._poller = None  # no closed socket stays in it
            else:
                kept.append((until, reader))
        self._retired_readers = kept

    def _manager_command(self, frames: list[bytes]) -> None:
        """A wake (reconcile now), a reflect to send to every live peer, or a greet: a peer
        we count away said hello (manager only)."""
        self._dirty = True
        if len(frames) == 2 and frames[0] == b"greet":
            self._greet(frames[1].decode(errors="replace"))
        if len(frames) != 2 or frames[0] != b"reflect":
            return
        request = msgpack.packb({"op": "reflect", "token": frames[1]})
        with self._host._state:
            live = [p for p, st in self._peer_state.items()
                    if p in self._peers and self._alive(p, st)]
        for pid in live:
            channel = self._channels.get(pid)
            if channel is not None:
                with contextlib.suppress(zmq.Again):  # unconnected or full: asked again
                    channel.sock.send_multipart([b"reflect", b"", request], zmq.NOBLOCK)

    def _greet(self, origin: str) -> None:
        """The peer at ``origin`` said hello while we count it away (it started late, or its
        path healed): hello it now rather than at its next turn. (Its channel is not made
        afresh: two proxies doing that to each other while their handshakes are slow would
        never keep a connection.)"""
        now = time.monotonic()
        for pid, channel in self._channels.items():
            info = self._peers.get(pid)
            if info is not None and info.origin == origin:
                channel.due = min(channel.due, now)

    def _refresh_peers(self) -> None:
        """Ask the directory who is there: a channel for each new peer (and afresh for one
        whose endpoint or key changed), none for those that left. Nothing waits on a peer."""
        assert self._directory is not None
        fed = self.config
        found = self._own_names(self._directory.refresh())
        with self._host._state:
            # A learned peer silent for LEARNED_EXPIRE_SYNCS intervals (no hello from it, no
            # answer to ours) is forgotten: made-up peers do not stay to be asked forever.
            horizon = time.monotonic() - LEARNED_EXPIRE_SYNCS * max(fed.sync_interval,
                                                                     PEER_TIMEOUT)
            now = time.monotonic()
            for pid in self._heard:  # its channel is connected: its heartbeats answer
                channel = self._channels.get(pid)
                if channel is not None and channel.connected:
                    self._heard[pid] = now
            for pid in [p for p, t in self._heard.items() if t < horizon]:
                log.info("forgetting a learned peer that went silent", extra={"peer": pid})
                self._learned.pop(pid, None)
                del self._heard[pid]
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
                if pid not in self._peer_state or \
                        self._peer_state[pid].get("answering") is not None:
                    log.warning("ignoring a peer whose key is not on the allow-list",
                                extra={"peer": pid})
                with self._host._state:  # others iterate it under the lock (stats, reflect)
                    self._peer_state[pid] = {"answering": None, "alive": None, "refused": True}
                continue
            peers[pid] = info
        with self._host._state:
            for pid in set(self._peers) - set(peers):
                log.info("peer left the directory", extra={"peer": pid})
            self._peers = peers
            self._peer_state = {p: st for p, st in self._peer_state.items()
                                if (st.get("refused") and p not in peers)
                                or (p in peers and not st.get("refused"))}
        for pid in [p for p in self._channels if p not in peers]:
            self._close_channel(self._channels.pop(pid))
        for pid, info in peers.items():
            key = (info.control, info.public_key)
            channel = self._channels.get(pid)
            if channel is not None and channel.key == key:
                continue
            if channel is not None:
                self._close_channel(self._channels.pop(pid))
            try:
                sock, reader = self._open_channel(info)
                self._channels[pid] = _Channel(sock, key, reader)
            except Exception as exc:
                log.warning("cannot open a channel to a peer", extra={"peer": pid,
                                                                       "error": str(exc)})
            self._poller = None

    def _open_channel(self, peer: PeerInfo) -> tuple[zmq.Socket[Any], zmq.Socket[Any]]:
        """A DEALER to ``peer``'s control socket, from the address we bind (a peer that
        learns us from a hello checks that our endpoints are on the address it came from),
        and the reader of its monitor. Its ZMTP heartbeats (``channel_heartbeats``) are the
        peer's liveness, in libzmq's I/O thread, with no Python work per ping."""
        host = self._host
        assert host._ctx is not None
        fed = self.config
        endpoint = self._from_us(peer.control)
        self._link_seq += 1
        monitor = f"inproc://zbus-channel-{self._link_seq}-{host._tag}"
        # The reader connects before the channel binds the monitor (inproc allows it), so
        # the first handshake is never missed.
        reader = host._ctx.socket(zmq.PAIR)
        reader.setsockopt(zmq.LINGER, 0)
        reader.connect(monitor)
        # connect=[]: CURVE client keys, the rest set before the connect.
        try:
            sock = make_socket(host._ctx, zmq.DEALER, host.settings, sndhwm=CHANNEL_HWM,
                               connect=[], curve=fed.curve, server_key=peer.public_key or None)
        except Exception:
            reader.close(linger=0)
            raise
        try:
            # Queue only on a connection that completed its handshake: a hello to a peer
            # that is not there fails at once instead of piling up.
            sock.setsockopt(zmq.IMMEDIATE, 1)
            sock.setsockopt(zmq.CONNECT_TIMEOUT, int(LINK_CONNECT_TIMEOUT * 1000))
            sock.setsockopt(zmq.RECONNECT_IVL, int(LINK_RECONNECT_IVL * 1000))
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, int(LINK_RECONNECT_IVL_MAX * 1000))
            ivl, timeout, ttl = channel_heartbeats(fed.sync_interval)
            sock.setsockopt(zmq.HEARTBEAT_IVL, max(int(ivl * 1000), 1))
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(int(timeout * 1000), 1))
            sock.setsockopt(zmq.HEARTBEAT_TTL, min(int(ttl * 1000), 6_553_500))
            sock.monitor(monitor, _LINK_EVENTS)
            sock.connect(endpoint)
        except zmq.ZMQError:
            with contextlib.suppress(zmq.ZMQError):
                sock.disable_monitor()
            sock.close(linger=0)
            reader.close(linger=0)
            raise
        return sock, reader

    def _send_hellos(self, now: float) -> float:
        """Hello each peer whose turn it is, on its channel, one hello in flight at a time,
        without waiting for the answer (it comes back to ``_peer_replies``); when the next
        turn comes.

        A peer gets a hello at once when it lacks our content's version or we lack its
        (the hello, or its reply, carries the next page of what is missing); every sync
        interval while the pool-link books move; else every REFRESH_SYNCS intervals, a small
        one. A hello unanswered a sync interval later is a miss, and the peer is asked
        again every AWAY_SYNC: MISSED_HELLOS in a row and it is not answering although its
        channel is connected (a hung control thread). A channel that drops is a peer not
        answering at once (``_channel_event``). Manager only."""
        interval = self.config.sync_interval
        version, pages = self._content
        base: dict[str, Any] | None = None
        sent = full = 0
        soonest = now + interval
        for pid, channel in list(self._channels.items()):
            if channel.waiting is not None:
                limit = min(AWAY_SYNC, interval) if channel.missed else interval
                if now - channel.waiting < limit:
                    soonest = min(soonest, channel.waiting + limit)
                    continue
                channel.waiting = None
                channel.missed = self._missed(pid)
                channel.due = now
            stale = channel.connected and not channel.legacy and (
                channel.acked != version or channel.held != channel.peer_version)
            if stale and now - channel.sent_at < STALE_GAP:
                soonest = min(soonest, channel.sent_at + STALE_GAP)
                continue
            if not stale and channel.due > now:
                # On the manager's next sync tick (or sooner turn): the hellos of a round
                # go together, and their replies wake the manager together.
                continue
            if base is None:
                base = {"op": "hello", "peer": self.me.as_dict(), "run": self.run,
                        "v": version}
            hello = {**base, "have": channel.held}
            if (channel.legacy or channel.acked != version) and pages:
                at, i = channel.page
                i = (i if at == version else 0) % len(pages)
                channel.page = (version, i + 1)
                hello.update(pages[i], page=[i, len(pages)])
            try:
                channel.sock.send_multipart([b"hello", b"", msgpack.packb(hello)],
                                            zmq.NOBLOCK)
            except zmq.Again:
                if not channel.connected:  # its handshake will bring the hello
                    channel.due = now + interval / 2
                    continue
                # Connected but its queue is full (the peer does not read): unanswered.
            else:
                sent += 1
                full += int("page" in hello)
            channel.waiting = channel.sent_at = now
            # Half an interval early: the tick that comes about then sends it.
            channel.due = now - interval / 2 + (
                interval if channel.legacy or now < channel.busy_until
                else REFRESH_SYNCS * interval)
            soonest = min(soonest, now + (min(AWAY_SYNC, interval) if channel.missed
                                          else interval))
        if sent:
            with self._host._state:
                self.hellos["sent"] += sent
                self.hellos["sent_full"] += full
        return soonest

    def _missed(self, pid: str) -> int:
        """``pid`` did not answer its last hello: one slow answer on a loaded host is not a
        dead peer, it counts as away after MISSED_HELLOS in a row (links stay regardless;
        heartbeats own the data path). How many it missed in a row."""
        with self._host._state:
            old = self._peer_state.get(pid, {})
            missed = int(old.get("missed", 0)) + 1
            answering = bool(old.get("answering")) and missed < MISSED_HELLOS
            self._peer_state[pid] = {**old, "missed": missed, "answering": answering}
        if old.get("answering") and not answering:
            log.warning("peer stopped answering", extra={"peer": pid})
            self._dirty = True
        return missed

    def _peer_replies(self, sock: zmq.Socket[Any]) -> None:
        """Every reply waiting on a peer's channel (manager only)."""
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            found = self._channel_of(sock)
            if found is None:
                continue  # a channel closed meanwhile
            pid = found[0]
            if len(frames) != 3 or frames[1] != b"":
                continue
            try:
                reply = msgpack.unpackb(frames[2], raw=False, strict_map_key=True)
            except Exception:
                log.debug("a peer's reply is not msgpack", extra={"peer": pid})
                continue
            if not isinstance(reply, dict) or not reply.get("ok"):
                log.debug("a peer refused a request", extra={
                    "peer": pid, "op": frames[0][:16].decode(errors="replace"),
                    "error": str(reply.get("error") if isinstance(reply, dict) else reply)})
                continue  # a refused hello stays unanswered: a miss when it is due
            if frames[0] == b"hello":
                self._hello_reply(pid, reply)

    def _hello_reply(self, pid: str, reply: dict[str, Any]) -> str:
        """A peer's answer to our hello: its versions, and the pages of its content we
        lack (pools, pool endpoints, members), its books; it is answering (again). The
        peer's id from here on (it may name itself)."""
        channel = self._channels[pid]
        asked = channel.waiting
        channel.waiting = None
        channel.missed = 0
        own = reply.get("peer")
        named = own.get("id") if isinstance(own, dict) else None
        own_id = named[:200] if isinstance(named, str) else None
        with self._host._state:
            if pid in self._heard:
                self._heard[pid] = time.monotonic()
            learned = pid in self._learned
        if not learned and own_id is not None and own_id != pid and own_id in self._learned:
            # A configured peer names itself with an id a learned one took: the
            # configuration wins, the learned peer goes (its link with it).
            with self._host._state:
                self._learned.pop(own_id, None)
                self._heard.pop(own_id, None)
                self._peers.pop(own_id, None)
                self._peer_state.pop(own_id, None)
            dropped = self._channels.pop(own_id, None)
            if dropped is not None:
                self._close_channel(dropped)
        if own_id and own_id != pid and own_id not in self._peers:
            # Known by address until now: from here on by the id it gives itself (what its
            # reflected probes carry), under the origin and key configured here.
            with self._host._state:
                info = dataclasses.replace(self._peers.pop(pid), id=own_id)
                self._peers[own_id] = info
                self._peer_state[own_id] = self._peer_state.pop(pid, {})
                self._named[info.origin] = own_id
            self._channels[own_id] = self._channels.pop(pid)
            self._poller = None
            pid = own_id
            self._dirty = True
        with self._host._state:
            info = self._peers[pid]
            old = dict(self._peer_state.get(pid, {}))
        if not old.get("answering"):
            log.info("peer answering", extra={"peer": pid, "origin": info.origin})
        version = reply.get("v")
        channel.legacy = isinstance(version, bool) or not isinstance(version, int)
        have = reply.get("have")
        channel.acked = have if isinstance(have, int) and not isinstance(have, bool) else None
        content = channel.legacy or "page" in reply
        if content:
            self._adopt_pools(reply, pid)
            endpoints = reply.get("pool_endpoints")
            members = reply.get("members")
            pool_endpoints = {k: v for k, v in (endpoints or {}).items()
                              if isinstance(v, str) and v.startswith("tcp://")}
            members = members if isinstance(members, dict) else {}
        else:
            pool_endpoints = old.get("pool_endpoints", {})
            members = old.get("members", {})
        if channel.legacy:
            channel.held = channel.peer_version = None
        else:
            assert isinstance(version, int)
            if content:
                index, count = _page_of(reply.get("page"))
                at, got = channel.peer_pages
                got = (got if at == version else frozenset()) | {index}
                channel.peer_pages = (version, got)
                if len(got) >= count:
                    channel.held = version
            channel.peer_version = version
        run = reply.get("run")
        run = run[:64] if isinstance(run, str) else ""
        taken = reply.get("pool_taken")
        self._record_taken(info.origin, run, taken)
        now = time.monotonic()
        if taken != channel.taken and (channel.taken is not None or taken):
            # Its pool links are taking ours: the books move, hellos every interval.
            channel.busy_until = now + BOOKS_TAIL_SYNCS * self.config.sync_interval
            if asked is not None:
                channel.due = min(channel.due, asked + self.config.sync_interval)
        channel.taken = taken
        state = {
            "answering": True,
            "run": run,
            "missed": 0,
            "last_hello": time.time(),
            "pool_endpoints": pool_endpoints,
            "members": members,
            "version": channel.held,
            "channel_up": channel.connected,
        }
        if any(old.get(k) != state[k] for k in ("answering", "run", "pool_endpoints",
                                                 "members")):
            self._dirty = True
        with self._host._state:
            if pid in self._peers:
                self._peer_state[pid] = state
        if old.get("missed"):
            self._restart_down_links(pid)
        return pid

    def _record_taken(self, origin: str, run: str, taken: Any) -> None:
        """Keep a peer's report of what its pool links took from our pool origins."""
        if not isinstance(taken, dict):
            return  # a proxy from before pool-link books: its share shows as unaccounted
        clean = {pool: frames for pool, frames in taken.items()
                 if isinstance(pool, str) and isinstance(frames, int) and frames >= 0}
        with self._host._state:
            runs = self._peer_taken.setdefault(origin, {})
            runs[run] = clean
            while len(runs) > RUNS_KEPT:
                del runs[next(iter(runs))]

    def _restart_down_links(self, pid: str) -> None:
        """``pid`` answers again after missing hellos: a link of its that is not connected
        now is given a fresh socket (a connect at once) rather than left to libzmq's retry,
        so its data flows as soon as its control does (manager only)."""
        connecting = time.monotonic() - LINK_GRACE
        with self._host._state:
            # Not one still making its first connection: a fresh socket would only start
            # that again.
            down = [(name, key, device) for name, (key, device) in self._links.items()
                    if self._link_source.get(name) == pid and not self._link_up.get(name)
                    and self._link_started.get(name, 0.0) < connecting]
        for name, key, device in down:
            log.info("peer back while its link is down: restarting the link",
                     extra={"peer": pid, "link": name})
            self._retire(name, key, device)
            with self._host._state:
                self.link_restarts += 1

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
        sources: dict[str, str] = {}
        with host._state:
            peers = dict(self._peers)
            states = {p: dict(st) for p, st in self._peer_state.items()}
            members = dict(host._pool_members.counts)
        for pid, info in peers.items():
            sources[f"peer-{pid}"] = pid
            want[f"peer-{pid}"] = (
                ("origin", info.origin, info.public_key),
                SocketSpec(zmq.XSUB, connect=(info.origin,), rcvhwm=s.subscriber_hwm,
                           sndhwm=0, curve=fed.curve, server_key=info.public_key or None),
                SocketSpec(zmq.XPUB, connect=(self.fanin,), sndhwm=s.subscriber_hwm),
            )
        for pool in host.pools:
            if members.get(pool, 0) <= 0:
                continue  # no live member here: take none of this pool's messages
            origins: dict[str, tuple[str, bytes, str]] = {
                "local": (ep.pool_origin(pool), b"", self.run)}
            for pid, info in peers.items():
                state = states.get(pid, {})
                endpoint = state.get("pool_endpoints", {}).get(pool)
                if endpoint:
                    origins[pid] = (endpoint, info.public_key, state.get("run", ""))
            for source, (endpoint, public, run) in origins.items():
                sources[f"pool-{pool}-from-{source}"] = source
                # The source's run is part of the key: a restarted origin is a new link, and
                # what a link took is booked against the run it took it from.
                want[f"pool-{pool}-from-{source}"] = (
                    ("pool", pool, endpoint, public, run),
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
            if host._stopping.is_set():
                return  # the proxy is stopping: a link started now would start into it
            assert host._ctx is not None
            tcp = any(endpoint.startswith("tcp://") for endpoint in front.connect)
            make: Callable[[SocketSpec], zmq.Socket[Any]] = host._make
            reader: zmq.Socket[Any] | None = None
            if tcp:
                # The reader connects before the link's socket binds the monitor (inproc
                # allows it), so the first handshake is never missed.
                self._link_seq += 1
                monitor = f"inproc://zbus-link-{self._link_seq}-{host._tag}"
                reader = host._ctx.socket(zmq.PAIR)
                reader.setsockopt(zmq.LINGER, 0)
                reader.connect(monitor)
                make = self._link_factory(monitor)
            device = Device(name, host._ctx, make, front, back)
            try:
                device.start()
            except Exception as exc:
                if reader is not None:
                    reader.close(linger=0)
                log.warning("cannot start a link", extra={"link": name, "error": str(exc)})
                continue
            if reader is not None:
                self._link_monitors[name] = reader
                self._poller = None
            self._link_started[name] = time.monotonic()
            self._link_source[name] = sources[name]
            with host._state:
                self._links[name] = (key, device)
                self._link_up[name] = not tcp
            log.info("link started", extra={"link": name, "endpoint": key[2]})

    def _link_factory(self, monitor: str) -> Callable[[SocketSpec], zmq.Socket[Any]]:
        """A link device's socket factory: its tcp side gets bounded connect and reconnect
        times and a monitor on ``monitor``, attached before it connects."""
        host = self._host

        def make(spec: SocketSpec) -> zmq.Socket[Any]:
            if not any(endpoint.startswith("tcp://") for endpoint in spec.connect):
                return host._make(spec)
            assert host._ctx is not None
            # connect=[]: every option of a connecting socket (heartbeats, CURVE client
            # keys), but no connection before the monitor and the timeouts are in place.
            sock = make_socket(host._ctx, spec.kind, host.settings, sndhwm=spec.sndhwm,
                               rcvhwm=spec.rcvhwm, connect=[], curve=spec.curve,
                               server_key=spec.server_key)
            try:
                sock.setsockopt(zmq.CONNECT_TIMEOUT, int(LINK_CONNECT_TIMEOUT * 1000))
                sock.setsockopt(zmq.RECONNECT_IVL, int(LINK_RECONNECT_IVL * 1000))
                sock.setsockopt(zmq.RECONNECT_IVL_MAX, int(LINK_RECONNECT_IVL_MAX * 1000))
                sock.monitor(monitor, _LINK_EVENTS)
                for endpoint in spec.connect:
                    sock.connect(endpoint)
            except zmq.ZMQError:
                sock.close(linger=0)
                raise
            return sock

        return make

    def _link_event(self, name: str, frames: list[bytes]) -> None:
        """One event of link ``name``'s monitor (manager only)."""
        event = zmq.utils.monitor.parse_monitor_message(frames)["event"]
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            up = True
            self._link_since[name] = time.monotonic()
        elif event == zmq.EVENT_DISCONNECTED:
            up = False
        else:
            return
        with self._host._state:
            if not up:
                self.link_disconnects += 1
            if name in self._links:
                self._link_up[name] = up
        log.info("link connected" if up else "link disconnected", extra={"link": name})

    def _retire(self, name: str, key: tuple[Any, ...], device: Device) -> None:
        # Read once paused: what a running link took between a reading and its stop would
        # count as taken by nobody (a loss over-stated).
        stats = device.final_statistics()
        device.stop()
        reader = self._link_monitors.pop(name, None)
        if reader is not None:
            self._retired_readers.append((time.monotonic() + RETIRED_READER_S, reader))
            self._poller = None
        self._link_source.pop(name, None)
        self._link_since.pop(name, None)
        self._link_started.pop(name, None)
        with self._host._state:
            self._links.pop(name, None)
            self._link_up.pop(name, None)
            if key[0] == "pool":
                total = self._retired.setdefault(key[1], {})
                for counter, value in stats.items():
                    total[counter] = total.get(counter, 0) + value
                taken = (key[2], key[4])
                self._taken_retired[taken] = (self._taken_retired.get(taken, 0)
                                              + stats.get("frontend_frames_in", 0))
        log.info("link stopped", extra={"link": name})
