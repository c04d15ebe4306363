"""zbus and raw-pyzmq workers (each runs in its own spawned process) and the proxy process.

The raw baseline sends the same three frames zbus sends (the topic, a body as long as zbus's
envelope, a signature-sized frame) through the same ``zbus_proxy.Proxy`` devices, over
sockets with the same options (made by the same ``make_socket``), and receives them with
plain ``recv_multipart``: what is left between the two is zbus's own per-message work.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack
import zmq

import zbus
from zbus._control import wait_for_peers
from zbus._names import CONTROL_PREFIX
from zbus._transport import CurveKeys, make_socket, wait_for_probe

from ._util import (
    MEASURE,
    SPAWN,
    WARM,
    BenchError,
    Counter,
    LogHistogram,
    StopWhen,
    payload_bytes,
    publish_loop,
    reporting_failure,
)

__all__ = ["FederationProcess", "PlainProxyProcess", "ProxyProcess", "frame_sizes"]

EXCHANGE = "bench"
ROUTING_KEY = "bench.data"
POOL = "bench"
IDLE = 0.25  # seconds without a message, once the publisher is done, that end a consumer
_TS = struct.Struct(">q")
perf = time.perf_counter


def frame_sizes(key: bytes, size: int) -> tuple[int, int]:
    """(envelope bytes, signature bytes) of a zbus message with a ``size``-byte payload."""
    frames = zbus.MessageFactory(key, "bench-publisher").frames(
        EXCHANGE, ROUTING_KEY, payload_bytes(size, MEASURE)
    )
    return len(frames[1]), len(frames[2])


# -- the proxy --------------------------------------------------------------------------


def _one_hop_planes(proxy: Any) -> None:
    """An experiment for ``planes="one"`` (issue 16's one-hop lever), never the proxy's code:
    one device, ingress PULL ==> a PUB bound to both the deliver and the origin endpoints, in
    place of ingress ==> origin PUB ==> fan-in XSUB ==> deliver XPUB. Subscribers and pools
    read the same PUB. Kept beacons have no way in (no fan-in XSUB to connect to them), and
    the stats show one device: this measures the hop, it does not ship."""
    from zbus_proxy._device import SocketSpec  # type: ignore[import-not-found,unused-ignore]

    ep, s = proxy.endpoints, proxy.settings
    proxy._add_device(
        "deliver",
        SocketSpec(zmq.PULL, bind=ep.ingress, rcvhwm=s.publish_hwm),
        SocketSpec(zmq.PUB, bind=(ep.deliver, ep.origin), sndhwm=s.subscriber_hwm),
    )


def _proxy_main(run_dir: str, ready: Any, stop: Any, hwm: int, planes: str) -> None:
    from zbus_proxy import Proxy  # type: ignore[import-not-found,unused-ignore]

    settings = zbus.Settings(subscriber_hwm=hwm, pool_hwm=hwm) if hwm else None
    proxy = Proxy(run_dir, settings=settings)
    if planes == "one":
        proxy._start_planes = lambda: _one_hop_planes(proxy)  # type: ignore[method-assign]
    with proxy:
        ready.set()
        stop.wait()


class ProxyProcess:
    """A ``zbus_proxy.Proxy`` in its own process on a fresh, short run directory.

    ``hwm`` (when set) is its subscribers' and pools' high-water mark, so a trial's whole
    backlog fits (the defaults, 100,000 and 10,000, would drop a long unpaced burst at a
    slower consumer, as they should). ``planes="one"``: see :func:`_one_hop_planes`.
    """

    def __init__(self, hwm: int = 0, planes: str = "two") -> None:
        self.run_dir = tempfile.mkdtemp(prefix="zbb-", dir="/tmp")
        self._ready = SPAWN.Event()
        self._stop = SPAWN.Event()
        self._proc = SPAWN.Process(target=_proxy_main, args=(self.run_dir, self._ready,
                                                             self._stop, hwm, planes),
                                   daemon=True, name="bench-proxy")

    @property
    def pids(self) -> list[int]:
        return [self._proc.pid] if self._proc.pid else []

    def __enter__(self) -> ProxyProcess:
        self._proc.start()
        if not self._ready.wait(20):
            self.__exit__()
            raise BenchError("the proxy process did not start within 20s")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(2)
        shutil.rmtree(self.run_dir, ignore_errors=True)


def _plain_proxy_main(kind: str, front: str, back: str, ready: Any) -> None:
    """What a user would write: ``zmq.proxy`` between two sockets, high-water marks 0."""
    ctx: zmq.Context[Any] = zmq.Context()
    pair = (zmq.XSUB, zmq.XPUB) if kind == "pubsub" else (zmq.PULL, zmq.PUSH)
    socks = []
    for sock_type, endpoint in zip(pair, (front, back), strict=True):
        sock = ctx.socket(sock_type)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.bind(endpoint)
        socks.append(sock)
    ready.set()
    zmq.proxy(*socks)  # until the process is killed


class PlainProxyProcess:
    """``zmq.proxy(XSUB, XPUB)`` (``kind="pubsub"``) or ``zmq.proxy(PULL, PUSH)``
    (``"pipeline"``) in its own process: the plain raw baseline's broker."""

    def __init__(self, kind: str) -> None:
        self.dir = tempfile.mkdtemp(prefix="zbp-", dir="/tmp")
        self.kind = kind
        self.front, self.back = f"ipc://{self.dir}/in", f"ipc://{self.dir}/out"
        self._ready = SPAWN.Event()
        self._proc = SPAWN.Process(target=_plain_proxy_main,
                                   args=(kind, self.front, self.back, self._ready),
                                   daemon=True, name=f"bench-zmq-proxy-{kind}")

    @property
    def pids(self) -> list[int]:
        return [self._proc.pid] if self._proc.pid else []

    def __enter__(self) -> PlainProxyProcess:
        self._proc.start()
        if not self._ready.wait(20):
            self.__exit__()
            raise BenchError("the zmq.proxy process did not start within 20s")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc.pid is not None:
            self._proc.kill()
            self._proc.join(5)
        shutil.rmtree(self.dir, ignore_errors=True)


def _federated_proxy_main(run_dir: str, host: str, port: int, keys: tuple[bytes, bytes],
                          peer: tuple[str, int, bytes], ready: Any, stop: Any) -> None:
    from zbus_proxy import Proxy  # type: ignore[import-not-found,unused-ignore]
    from zbus_proxy._directory import (  # type: ignore[import-not-found,unused-ignore]
        FederationConfig,
        PeerInfo,
    )

    fed = FederationConfig(host=host, port=port, peers=(PeerInfo.at(*peer),),
                           curve=CurveKeys(*keys), sync_interval=0.2)
    with Proxy(run_dir, federation=fed):
        ready.set()
        stop.wait()


class FederationProcess:
    """Two federated ``zbus_proxy.Proxy`` processes, "hosts" A and B on loopback addresses
    (127.0.0.2 and 127.0.0.3), CURVE on the tcp link between them, as in production.

    ``run_dir`` is host A's (publishers), ``run_dir_b`` host B's (cross-host consumers).
    """

    HOSTS = ("127.0.0.2", "127.0.0.3")

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.pid]

    def __init__(self) -> None:
        self.run_dir = tempfile.mkdtemp(prefix="zbb-a-", dir="/tmp")
        self.run_dir_b = tempfile.mkdtemp(prefix="zbb-b-", dir="/tmp")
        self._stop = SPAWN.Event()
        self._ready = [SPAWN.Event(), SPAWN.Event()]
        from zbus_proxy._directory import (  # type: ignore[import-not-found,unused-ignore]
            free_port_pair,
        )

        ports = [free_port_pair(h) for h in self.HOSTS]
        keys = [CurveKeys.generate(), CurveKeys.generate()]
        self.nodes = [f"{h}:{p}" for h, p in zip(self.HOSTS, ports, strict=True)]
        self._procs = []
        for i, run_dir in enumerate((self.run_dir, self.run_dir_b)):
            j = 1 - i
            self._procs.append(SPAWN.Process(
                target=_federated_proxy_main,
                args=(run_dir, self.HOSTS[i], ports[i], (keys[i].public, keys[i].secret),
                      (self.HOSTS[j], ports[j], keys[j].public), self._ready[i], self._stop),
                daemon=True, name=f"bench-proxy-{'ab'[i]}"))

    def _meshed(self) -> bool:
        for run_dir, other in ((self.run_dir, self.nodes[1]), (self.run_dir_b, self.nodes[0])):
            with zbus.Connection(run_dir) as conn:
                stats = conn.control.request("stats", timeout=5)
            peers = (stats.get("federation") or {}).get("peers", {})
            if not peers.get(other, {}).get("alive") or f"peer-{other}" not in stats["devices"]:
                return False
        return True

    def __enter__(self) -> FederationProcess:
        for proc in self._procs:
            proc.start()
        try:
            for ready in self._ready:
                if not ready.wait(20):
                    raise BenchError("a federated proxy process did not start within 20s")
            deadline = time.monotonic() + 30
            while not self._meshed():
                if time.monotonic() > deadline:
                    raise BenchError("the two proxies did not link up within 30s")
                time.sleep(0.1)  # polling the proxies' stats for the link, nothing else
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for proc in self._procs:
            if proc.pid is None:
                continue
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(2)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        shutil.rmtree(self.run_dir_b, ignore_errors=True)


# -- publishers -------------------------------------------------------------------------


def _connection(args: dict[str, Any]) -> zbus.Connection:
    """The threads backend's Connection, or (``backend="eventlet"``) its green twin: the
    same API, so one worker serves both."""
    if args.get("backend") == "eventlet":
        from zbus import eventlet as green  # imported only in eventlet workers

        return green.Connection(args["run_dir"])
    return zbus.Connection(args["run_dir"])


def zbus_publisher(args: dict[str, Any], index: int, results: Any, go: Any, done: Any) -> None:
    with reporting_failure(results, index):
        conn = _connection(args)
        factory = zbus.MessageFactory(args["key"], "bench-publisher")
        pub = zbus.Publisher(conn.exchange(EXCHANGE), factory)
        warm = payload_bytes(args["size"], WARM)
        body = payload_bytes(args["size"], MEASURE)
        batch = [body] * (args.get("batch") or 1)
        send = pub.send
        rk = args.get("routing_key", ROUTING_KEY)

        def send_warm(n: int) -> None:
            for _ in range(n):
                send(rk, warm)

        def burst(n: int) -> None:
            for _ in range(n):
                send(rk, body)

        results.put(("ready", index, None))
        go.wait()
        report = publish_loop(args, send_warm, burst, lambda: send(rk, body),
                              lambda: pub.send_many(rk, batch))
        results.put(("result", index, report))
        done.set()
        conn.close()


def raw_publisher(args: dict[str, Any], index: int, results: Any, go: Any, done: Any) -> None:
    with reporting_failure(results, index):
        endpoints = zbus.Endpoints(Path(args["run_dir"]))
        settings = zbus.Settings()
        sock = make_socket(zmq.Context.instance(), zmq.PUSH, settings,
                           sndhwm=settings.publish_hwm, connect=endpoints.ingress)
        topic = f"{EXCHANGE}/{args.get('routing_key', ROUTING_KEY)}".encode()
        body_len, sig_len = args["body_bytes"], args["sig_bytes"]
        sig = b"s" * sig_len
        size = args["size"]
        # The payload sits at the end of the body, as it does in zbus's envelope, so a raw
        # consumer finds the marker at index -size in either.
        fill = b"x" * (body_len - size)
        warm = [topic, fill + payload_bytes(size, WARM), sig]
        frames = [topic, fill + payload_bytes(size, MEASURE), sig]
        pad = fill[_TS.size:] + payload_bytes(size, MEASURE)
        send = sock.send_multipart
        pack, now_ns = _TS.pack, time.time_ns

        def send_warm(n: int) -> None:
            for _ in range(n):
                send(warm)

        def burst(n: int) -> None:
            for _ in range(n):
                send(frames)

        def one() -> None:  # a latency run: the body carries the send time
            send([topic, pack(now_ns()) + pad, sig])

        results.put(("ready", index, None))
        go.wait()
        report = publish_loop(args, send_warm, burst, one, None)
        # A process that exits with messages still queued in libzmq loses them unless its
        # context is terminated: close with a bounded linger, then term() to flush.
        sock.close(linger=10_000)
        zmq.Context.instance().term()
        results.put(("result", index, report))
        done.set()


# -- consumers --------------------------------------------------------------------------


def zbus_consumer(args: dict[str, Any], index: int, results: Any, go: Any, done: Any) -> None:
    """A zbus Subscriber (``pool`` unset) or PoolMember counting what its handler gets."""
    with reporting_failure(results, index):
        conn = _connection(args)
        count = Counter()
        hist = LogHistogram()
        latency = args.get("rate") is not None

        def handler(delivery: zbus.Delivery) -> None:
            now = perf()
            if latency:
                lag = int((time.time() - delivery.envelope.timestamp) * 1e9)
                if delivery.payload[0] == MEASURE:
                    hist.record(lag)
            count.hit(delivery.payload[0], now)

        dispatcher = zbus.Dispatcher()
        dispatcher.bind(EXCHANGE, args.get("routing_key", ROUTING_KEY), handler)
        pool = args.get("pool_name", POOL)
        consumer: Any
        if args.get("window"):  # an at-least-once pool member
            consumer = conn.join_reliable_pool(pool, dispatcher, args["key"],
                                               window=args["window"])
        elif args.get("pool"):
            consumer = conn.join_pool(pool, dispatcher, args["key"])
        else:
            consumer = conn.subscribe(dispatcher, args["key"])
        consumer.ready()
        if args.get("cross"):  # live at the publishers' host too, not only at ours
            wait_for_peers(conn.endpoints, conn.settings, conn.ctx, timeout=20.0)
        results.put(("ready", index, None))
        process = consumer.process
        stop = StopWhen(done, args["timeout"])
        # An at-least-once member's messages come from a Python component that can pause
        # for longer than IDLE with a deep queue: a member that left then would look like
        # loss. It waits longer once idle (its rate is timed to its last receive anyway).
        idle = IDLE * 8 if args.get("window") else IDLE
        while True:
            if process(idle):
                continue
            if stop():
                break
        if hasattr(consumer, "wait_handlers"):  # eventlet: handlers run in green threads
            consumer.wait_handlers()
        report = count.as_dict()
        report["zbus_lost"] = consumer.stats.lost
        report["rejected"] = sum(consumer.stats.rejected.values())
        report["hist"] = hist.counts
        if args.get("window"):
            report["reliable"] = consumer.reliable.as_dict()
        results.put(("result", index, report))
        consumer.close()
        conn.close()


_ZBUS_BATCH_HEAD = b"\x95\x02"  # a zbus envelope: a 5-array of format 2
unpackb = msgpack.unpackb


def raw_consumer(args: dict[str, Any], index: int, results: Any, go: Any, done: Any) -> None:
    """Plain pyzmq: a SUB on the deliver socket, or a PULL on the pool's socket."""
    with reporting_failure(results, index):
        ctx: zmq.Context[Any] = zmq.Context.instance()
        settings = zbus.Settings()
        endpoints = zbus.Endpoints(Path(args["run_dir"]))
        topic = f"{EXCHANGE}/{args.get('routing_key', ROUTING_KEY)}"
        pool = args.get("pool_name", POOL)
        if args.get("pool"):
            conn = zbus.Connection(args["run_dir"])
            conn.declare_pool(pool, [topic])
            conn.close()
            sock = make_socket(ctx, zmq.PULL, settings, rcvhwm=settings.pool_hwm)
            monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
            sock.connect(endpoints.pool(pool))
            if not monitor.poll(10_000):
                raise BenchError("raw pool member did not connect")
            sock.disable_monitor()
            monitor.close(linger=0)
        else:
            sock = make_socket(ctx, zmq.SUB, settings, rcvhwm=settings.subscriber_hwm,
                               connect=endpoints.deliver)
            sock.subscribe(topic.encode())
            token = CONTROL_PREFIX + b"probe/" + os.urandom(8).hex().encode()
            sock.subscribe(token)
            push = make_socket(ctx, zmq.PUSH, settings, connect=endpoints.ingress)
            wait_for_probe(sock, push, token, 10.0, lambda frames: None, "raw subscription")
            push.close(linger=0)
            sock.unsubscribe(token)
            if args.get("cross"):  # the subscription has reached the publishers' host
                wait_for_peers(endpoints, settings, ctx, timeout=20.0)
        results.put(("ready", index, None))
        count = Counter()
        hist = LogHistogram()
        latency = args.get("rate") is not None
        sock.setsockopt(zmq.RCVTIMEO, int(IDLE * 1000))
        recv = sock.recv_multipart
        unpack, now_ns = _TS.unpack_from, time.time_ns
        size = args["size"]
        at = -size
        stop = StopWhen(done, args["timeout"])
        while True:
            try:
                frames = recv()
            except zmq.Again:
                if stop():
                    break
                continue
            now = perf()
            body = frames[1]
            if len(body) < size:  # a beacon the proxy repeats for a zbus variant's streams
                continue
            if body[:2] == _ZBUS_BATCH_HEAD and len(body) > 2 * size:
                # A zbus publisher's batch (smart batching): count each message in it.
                for entry in unpackb(body)[4]:
                    count.hit(entry[3][0], now)
                continue
            marker = body[at]
            if latency and marker == MEASURE:
                hist.record(now_ns() - unpack(body)[0])
            count.hit(marker, now)
        report = count.as_dict()
        report["hist"] = hist.counts
        results.put(("result", index, report))
        sock.close(linger=0)


# -- the plain raw baseline: 2 frames through zmq.proxy, HWM 0 --------------------------


def plain_publisher(args: dict[str, Any], index: int, results: Any, go: Any,
                    done: Any) -> None:
    """A user's publisher: [topic, payload] on a socket with SNDHWM 0 into ``zmq.proxy``.

    Fan-out: an XPUB used as a PUB (the same send path), so it can tell when the proxy's
    subscription has reached it instead of sleeping through the slow-joiner window. A pool:
    a PUSH into the proxy's PULL.
    """
    with reporting_failure(results, index):
        ctx: zmq.Context[Any] = zmq.Context()
        pool = bool(args.get("pool"))
        sock = ctx.socket(zmq.PUSH if pool else zmq.XPUB)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.connect(args["plain_in"])
        topic = ROUTING_KEY.encode()
        size = args["size"]
        warm = [topic, payload_bytes(size, WARM)]
        frames = [topic, payload_bytes(size, MEASURE)]
        body = payload_bytes(size, MEASURE)
        send = sock.send_multipart
        pack, now_ns = _TS.pack, time.time_ns
        results.put(("ready", index, None))
        go.wait()
        if not pool:  # the consumers are subscribed at the proxy; wait until it tells us
            wanted = b"\x01" + topic
            while True:  # the consumers' probes come and go on the same path
                if not sock.poll(10_000):
                    raise BenchError("the zmq.proxy's subscription never reached the "
                                     "publisher")
                if sock.recv() == wanted:
                    break

        def send_warm(n: int) -> None:
            for _ in range(n):
                send(warm)

        def burst(n: int) -> None:
            for _ in range(n):
                send(frames)

        def one() -> None:  # a latency run: the send time, then the payload
            send([topic, pack(now_ns()) + body])

        report = publish_loop(args, send_warm, burst, one, None)
        sock.close(linger=10_000)
        ctx.term()  # flushes what is still queued before the report says "sent"
        results.put(("result", index, report))
        done.set()


def plain_consumer(args: dict[str, Any], index: int, results: Any, go: Any,
                   done: Any) -> None:
    """A user's consumer: a SUB (RCVHWM 0) on ``zmq.proxy``'s XPUB, ready once a probe sent
    through the proxy came back; or a PULL on its PUSH, ready once connected."""
    with reporting_failure(results, index):
        ctx: zmq.Context[Any] = zmq.Context()
        pool = bool(args.get("pool"))
        sock = ctx.socket(zmq.PULL if pool else zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, 0)
        if pool:
            monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
            sock.connect(args["plain_out"])
            if not monitor.poll(10_000):
                raise BenchError("plain pool member did not connect")
            sock.disable_monitor()
            monitor.close(linger=0)
        else:
            sock.connect(args["plain_out"])
            sock.subscribe(ROUTING_KEY.encode())
            token = b"probe/" + os.urandom(8).hex().encode()
            sock.subscribe(token)
            probe = ctx.socket(zmq.PUB)
            probe.connect(args["plain_in"])
            wait_for_probe(sock, probe, token, 10.0, lambda frames: None, "plain subscription")
            probe.close(linger=0)
            sock.unsubscribe(token)
        results.put(("ready", index, None))
        count = Counter()
        hist = LogHistogram()
        latency = args.get("rate") is not None
        sock.setsockopt(zmq.RCVTIMEO, int(IDLE * 1000))
        recv = sock.recv_multipart
        unpack, now_ns = _TS.unpack_from, time.time_ns
        at = -args["size"]
        stop = StopWhen(done, args["timeout"])
        while True:
            try:
                frames = recv()
            except zmq.Again:
                if stop():
                    break
                continue
            now = perf()
            body = frames[1]
            marker = body[at]
            if latency and marker == MEASURE:
                hist.record(now_ns() - unpack(body)[0])
            count.hit(marker, now)
        report = count.as_dict()
        report["hist"] = hist.counts
        results.put(("result", index, report))
        sock.close(linger=0)
        ctx.term()
