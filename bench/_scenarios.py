"""The scenarios, and running one: zbus, its raw-pyzmq baseline and the peers, interleaved.

Each repeat runs every variant of a scenario one after the other (zbus, raw, rabbitmq,
nats; or the backends, or cross-host and single-host, or the pool modes), so a busy machine
slows them alike; the reported figure is the median over repeats.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from typing import Any

import zbus

from . import _asyncio, _eventlet, _peers, _zmq
from ._util import LogHistogram, Progress, Trial, median, run_trial

__all__ = ["Config", "Scenario", "all_scenarios", "describe", "run_scenario", "trial_count"]


@dataclass(frozen=True)
class Config:
    count: int = 300_000
    """Measured messages per throughput trial (after the warm-up); each trial is timed from
    its first measured send to its last measured receive, so catching up counts."""
    peer_count: int = 100_000
    """Measured messages per RabbitMQ trial (pika's publisher is the bottleneck there)."""
    latency_duration: float = 3.0
    repeat: int = 3
    warm: int = 2000
    """Warm-up messages sent (and received, not counted) before the measured ones."""
    batch: int = 100
    peers: bool = True
    pool_count: int = 8000
    """Measured messages per ``reliable-pool-2`` trial (the older scenario, on a proxy with
    the default ``pool_hwm``): warm-up + these stay below the pool's ``max_pending``
    (10,000), beyond which the proxy drops the newest."""

    @property
    def hwm(self) -> int:
        """The bench proxy's subscriber and pool high-water mark: a whole trial's backlog."""
        return self.count + self.warm + 10_000


@dataclass(frozen=True)
class Scenario:
    name: str
    size: int
    what: str
    consumers: int = 1
    pool: bool = False
    batch: bool = False
    rate: int | None = None
    zbus_consumer: bool = True
    """False: zbus publishes, a plain pyzmq consumer counts (isolates the publish side)."""
    peers: bool = False
    backend: str = "threads"
    family: str = "main"
    """main (the headline table: zbus, plain raw through zmq.proxy, raw of zbus's shape
    through zbus's proxy, NATS, RabbitMQ); publisher (a backend's publisher vs its raw
    counterpart); hops (the proxy's one-hop experiment); older: throughput (zbus vs raw of
    its shape), backend-publish / backend-consume, tcp, reliable."""
    windows: tuple[int, ...] = ()
    """reliable: the members' windows, one variant each."""
    headline: bool = True
    """Run by default; the others with ``--all`` or by name (``--only``)."""

    @property
    def label(self) -> str:
        return f"{self.name} {self.size}B"

    @property
    def kind(self) -> str:
        if self.rate:
            return "latency"
        return self.family


def all_scenarios(sizes: list[int]) -> list[Scenario]:
    out: list[Scenario] = []
    for size in sizes:
        out += [
            Scenario("fanout-1", size, "signed publish -> proxy -> 1 subscriber, vs plain "
                     "pyzmq through zmq.proxy, NATS and RabbitMQ", peers=True),
            Scenario("fanout-4", size, "-> 4 subscribers, each gets every message",
                     consumers=4, peers=True),
            Scenario("pool-2", size, "-> fast and at-least-once pools of 2 vs a NATS queue "
                     "group of 2, PUSH/PULL through zmq.proxy, RabbitMQ", consumers=2,
                     pool=True, peers=True),
            Scenario("eventlet-publish", size, "zbus.eventlet Publisher.send vs a raw "
                     "eventlet.green.zmq PUSH, -> raw SUB", zbus_consumer=False,
                     family="publisher"),
            Scenario("asyncio-publish", size, "zbus.asyncio Publisher.send vs a raw "
                     "zmq.asyncio PUSH, -> raw SUB", zbus_consumer=False, family="publisher"),
            Scenario("latency-5k", size, "one-way latency at 5,000 msg/s, 1 subscriber, vs "
                     "plain pyzmq through zmq.proxy", rate=5000),
            Scenario("one-hop", size, "the proxy's planes as built (two devices) vs one "
                     "device (an experiment), zbus and raw of its shape", family="hops"),
        ]
    for size in sizes:
        out += [
            Scenario("pool-4", size, "-> a pool of 4 workers, vs raw of zbus's shape",
                     consumers=4, pool=True, family="throughput", headline=False),
            Scenario("publish", size, "zbus Publisher.send -> raw SUB (publish side only)",
                     zbus_consumer=False, family="throughput", headline=False),
            Scenario("batch", size, "zbus Publisher.send_many -> raw SUB vs raw per-message",
                     batch=True, zbus_consumer=False, family="throughput", headline=False),
            Scenario("fanout-1-asyncio", size,
                     "zbus.asyncio publisher and subscriber vs raw zmq.asyncio",
                     backend="asyncio", family="throughput", headline=False),
            Scenario("backend-publish", size,
                     "threads / asyncio / eventlet Publisher.send -> raw SUB, vs raw PUSH",
                     zbus_consumer=False, family="backend-publish", headline=False),
            Scenario("backend-consume", size,
                     "threads publisher -> threads / asyncio / eventlet Subscriber, vs raw",
                     family="backend-consume", headline=False),
            Scenario("tcp-fanout-1", size,
                     "publisher on host A -> CURVE tcp -> subscriber on host B, and both "
                     "on A", family="tcp", headline=False),
            Scenario("reliable-pool-2", size,
                     "at-least-once pool of 2 (window 10, 100) vs fast pool of 2 vs raw, "
                     "default pool_hwm", consumers=2, pool=True, family="reliable",
                     windows=(10, 100), headline=False),
        ]
        for rate in (1000, 10_000):
            out.append(Scenario(f"latency-{rate // 1000}k", size,
                                f"one-way latency at {rate} msg/s, 1 subscriber", rate=rate,
                                headline=False))
    return out


@dataclass(frozen=True)
class Variant:
    publisher: Callable[..., None]
    consumer: Callable[..., None]
    pub_args: dict[str, Any] = field(default_factory=dict)
    con_args: dict[str, Any] = field(default_factory=dict)
    cross: bool = False
    """tcp: the consumers run on host B (the publisher always on host A)."""
    proxy: str = "zbus"
    """Which broker process it goes through: zbus (the scenario's zbus proxy), plain
    (zmq.proxy), one-hop (a zbus proxy with one device), none (a peer's own server)."""


RAW = Variant(_zmq.raw_publisher, _zmq.raw_consumer)
PLAIN = Variant(_zmq.plain_publisher, _zmq.plain_consumer, proxy="plain")
BACKENDS = ("threads", "asyncio", "eventlet")
NOT_ZBUS = ("raw", "raw-same", "raw-same-1hop", "raw-local", "rabbitmq", "nats")


def _peer_variants(peers: dict[str, str | None], rabbit: bool = True) -> dict[str, Variant]:
    out: dict[str, Variant] = {}
    if rabbit and peers.get("rabbitmq", "absent") is None:
        out["rabbitmq"] = Variant(_peers.rabbit_publisher, _peers.rabbit_consumer,
                                  proxy="none")
    if peers.get("nats", "absent") is None:
        out["nats"] = Variant(_peers.nats_publisher, _peers.nats_consumer, proxy="none")
    return out


def _variants(sc: Scenario, peers: dict[str, str | None]) -> dict[str, Variant]:
    zbus_pair = Variant(_zmq.zbus_publisher, _zmq.zbus_consumer)
    if sc.family == "main" and sc.rate:
        return {"zbus": zbus_pair, "raw": PLAIN, "raw-same": RAW}
    if sc.family == "main":
        out = {"zbus": zbus_pair}
        if sc.pool:
            # A declared pool keeps taking its topic's messages between trials, members or
            # not: the at-least-once pool gets its own pool and topic (a key of the same
            # length: the same frame sizes).
            own = {"routing_key": "bench.r010", "pool_name": "rbench10"}
            out["at-least-once"] = Variant(_zmq.zbus_publisher, _zmq.zbus_consumer,
                                           pub_args=own, con_args={**own, "window": 10})
        out.update({"raw": PLAIN, "raw-same": RAW})
        out.update(_peer_variants(peers, rabbit=sc.consumers == 1 or sc.pool))
        return out
    if sc.family == "publisher":
        zb = {"eventlet-publish": _eventlet.zbus_green_publisher,
              "asyncio-publish": _asyncio.zbus_async_publisher}[sc.name]
        raw = {"eventlet-publish": _eventlet.raw_green_publisher,
               "asyncio-publish": _asyncio.raw_async_publisher}[sc.name]
        return {"zbus": Variant(zb, _zmq.raw_consumer), "raw": Variant(raw, _zmq.raw_consumer)}
    if sc.family == "hops":
        return {"zbus": zbus_pair, "zbus-1hop": Variant(zbus_pair.publisher, zbus_pair.consumer,
                                                        proxy="one-hop"),
                "raw-same": RAW, "raw-same-1hop": Variant(RAW.publisher, RAW.consumer,
                                                          proxy="one-hop")}
    if sc.family == "backend-publish":
        return {"threads": Variant(_zmq.zbus_publisher, _zmq.raw_consumer),
                "asyncio": Variant(_asyncio.zbus_async_publisher, _zmq.raw_consumer),
                "eventlet": Variant(_eventlet.zbus_green_publisher, _zmq.raw_consumer),
                "raw": RAW}
    if sc.family == "backend-consume":
        return {"threads": Variant(_zmq.zbus_publisher, _zmq.zbus_consumer),
                "asyncio": Variant(_zmq.zbus_publisher, _asyncio.zbus_async_consumer),
                "eventlet": Variant(_zmq.zbus_publisher, _eventlet.zbus_green_consumer),
                "raw": RAW}
    if sc.family == "tcp":
        cross = {"cross": True}
        return {"zbus": Variant(zbus_pair.publisher, zbus_pair.consumer, con_args=cross,
                                cross=True),
                "raw": Variant(RAW.publisher, RAW.consumer, con_args=cross, cross=True),
                "zbus-local": zbus_pair, "raw-local": RAW}
    if sc.family == "reliable":
        def own(rk: str, pool: str, **extra: Any) -> dict[str, Any]:
            return {"routing_key": rk, "pool_name": pool, **extra}

        out = {f"reliable-w{w}": Variant(
            _zmq.zbus_publisher, _zmq.zbus_consumer,
            pub_args=own(f"bench.r{w:03d}", f"rbench{w}"),
            con_args=own(f"bench.r{w:03d}", f"rbench{w}", window=w)) for w in sc.windows}
        fast = own("bench.fast", "bfast")
        return {**out,
                "fast": Variant(_zmq.zbus_publisher, _zmq.zbus_consumer, fast, fast),
                "raw": RAW}
    if sc.backend == "asyncio":
        return {"zbus": Variant(_asyncio.zbus_async_publisher, _asyncio.zbus_async_consumer),
                "raw": Variant(_asyncio.raw_async_publisher, _asyncio.raw_async_consumer)}
    return {
        "zbus": Variant(_zmq.zbus_publisher,
                        _zmq.zbus_consumer if sc.zbus_consumer else _zmq.raw_consumer),
        "raw": RAW,
    }


def _summary(sc: Scenario, trials: list[Trial]) -> dict[str, Any]:
    fan = 1 if sc.pool else sc.consumers
    lost = [max(0, t.sent * fan - t.received) for t in trials]
    cpus = [t.cpu_us() for t in trials]
    out: dict[str, Any] = {
        "msgs_per_s": median(t.rate() for t in trials),
        "per_consumer_msgs_per_s": median(t.rate() for t in trials) / (
            1 if sc.pool else sc.consumers),
        "send_msgs_per_s": median(t.publisher["send_rate"] for t in trials),
        "cpu_us_per_msg": {part: median(c[part] for c in cpus) for part in cpus[0]},
        "lost": sum(lost),
        "sent": sum(t.sent * fan for t in trials),
        "trials": [round(t.rate()) for t in trials],
    }
    reliable = [c["reliable"] for t in trials for c in t.consumers if "reliable" in c]
    if reliable:
        out["reliable"] = {k: sum(r[k] for r in reliable) for k in reliable[0]}
    gaps = [c.get("zbus_lost") for t in trials for c in t.consumers]
    if any(g is not None for g in gaps):
        out["sequence_gaps"] = sum(g or 0 for g in gaps)
    errors = sorted({e for t in trials for c in t.consumers for e in c.get("errors", [])})
    if errors:
        out["errors"] = errors
    if sc.rate:
        hists = []
        for t in trials:
            h = LogHistogram()
            for c in t.consumers:
                h.merge(LogHistogram({int(b): n for b, n in c["hist"].items()}))
            hists.append(h)
        for q, key in ((50, "p50_us"), (99, "p99_us"), (99.9, "p99_9_us")):
            out[key] = median(h.percentile(q) / 1000 for h in hists)
        out["max_us"] = max(h.max for h in hists) / 1000
        merged = LogHistogram()
        for h in hists:
            merged.merge(h)
        out["histogram_ns"] = {str(LogHistogram.upper(b)): n
                               for b, n in sorted(merged.counts.items())}
    return out


def trial_count(scenarios: list[Scenario], cfg: Config, peers: dict[str, str | None]) -> int:
    return sum(len(_variants(sc, peers if cfg.peers else {})) * cfg.repeat for sc in scenarios)


def _brokers(sc: Scenario, cfg: Config, variants: dict[str, Variant]) -> dict[str, Any]:
    """The broker processes the scenario's variants go through, not started yet."""
    needed = {v.proxy for v in variants.values()}
    out: dict[str, Any] = {}
    # The older scenarios keep the proxy's default HWMs (reliable-pool-2 measures against
    # them); the headline ones hold a whole trial's backlog, as zmq.proxy's HWM 0 does.
    hwm = cfg.hwm if sc.headline else 0
    if sc.family == "tcp":
        out["zbus"] = _zmq.FederationProcess()
    elif "zbus" in needed:
        out["zbus"] = _zmq.ProxyProcess(hwm=hwm)
    if "one-hop" in needed:
        out["one-hop"] = _zmq.ProxyProcess(hwm=hwm, planes="one")
    if "plain" in needed:
        out["plain"] = _zmq.PlainProxyProcess("pipeline" if sc.pool else "pubsub")
    return out


def run_scenario(sc: Scenario, cfg: Config, peers: dict[str, str | None], key: bytes,
                 progress: Progress) -> dict[str, Any]:
    variants = _variants(sc, peers if cfg.peers else {})
    body_bytes, sig_bytes = _zmq.frame_sizes(key, sc.size)
    trials: dict[str, list[Trial]] = {name: [] for name in variants}
    failures: dict[str, str] = {}
    warm = cfg.warm
    count = cfg.count
    if sc.rate:
        warm = min(cfg.warm, 200)
    elif sc.family == "reliable":
        warm, count = min(cfg.warm, 1000), cfg.pool_count
    # Generous: a trial that runs into it has hung; 2,000 msg/s is 20x slower than zbus.
    timeout = (cfg.latency_duration if sc.rate else count / 2000) + 60
    brokers = _brokers(sc, cfg, variants)
    with ExitStack() as stack:
        for broker in brokers.values():
            stack.enter_context(broker)
        for rep in range(cfg.repeat):
            for name, v in variants.items():
                progress.step(f"{sc.label} {name} ({rep + 1}/{cfg.repeat})")
                if name in failures:
                    continue
                broker = brokers.get(v.proxy)
                run_dir = broker.run_dir if isinstance(
                    broker, _zmq.ProxyProcess | _zmq.FederationProcess) else None
                args: dict[str, Any] = {
                    "run_dir": run_dir, "key": key, "size": sc.size,
                    "duration": cfg.latency_duration, "warm": warm, "count": count,
                    "peer_count": min(count, cfg.peer_count),
                    "batch": cfg.batch if sc.batch and name == "zbus" else 0,
                    "rate": sc.rate, "pool": sc.pool, "timeout": timeout,
                    "body_bytes": body_bytes, "sig_bytes": sig_bytes,
                }
                if isinstance(broker, _zmq.PlainProxyProcess):
                    args.update(plain_in=broker.front, plain_out=broker.back)
                con_args = {**args, **v.con_args}
                if v.cross and isinstance(broker, _zmq.FederationProcess):
                    con_args["run_dir"] = broker.run_dir_b
                try:
                    trial = run_trial((v.publisher, {**args, **v.pub_args}),
                                      [(v.consumer, con_args)] * sc.consumers,
                                      timeout=timeout + 30,
                                      proxies=broker.pids if broker is not None
                                      else _peers.server_pids(name))
                except Exception as exc:  # report it; the other variants still run
                    failures[name] = f"{type(exc).__name__}: {exc}"
                    progress.note(f"  {sc.label} {name}: FAILED ({failures[name]})")
                    continue
                trials[name].append(trial)
    results = {name: _summary(sc, ts) for name, ts in trials.items() if ts}
    main = {"backend-publish": "threads", "backend-consume": "threads",
            "reliable": f"reliable-w{sc.windows[0]}" if sc.windows else ""}.get(sc.family, "zbus")
    zb, raw = results.get(main), results.get("raw")
    zbus_lost = [r["lost"] for n, r in results.items() if n not in NOT_ZBUS]
    out: dict[str, Any] = {
        "scenario": sc.name, "size": sc.size, "kind": sc.kind, "what": sc.what,
        "consumers": sc.consumers, "pool": sc.pool, "headline": sc.headline,
        "transport": "tcp" if sc.family == "tcp" else "ipc",
        "backend": sc.backend, "family": sc.family,
        "zbus_variant": main,
        "zbus_msgs_per_s": zb["msgs_per_s"] if zb else None,
        "raw_msgs_per_s": raw["msgs_per_s"] if raw else None,
        "ratio": _div(zb, raw),
        "lost": sum(zbus_lost) if zbus_lost else None,
        "results": results,
        "failures": failures,
        "settings": {
            **asdict(cfg), "count": count, "consumers": sc.consumers, "pool": sc.pool,
            "proxy_hwm": cfg.hwm if sc.headline else None,
            "rate": sc.rate, "batch": cfg.batch if sc.batch else None,
            "zbus_consumer": sc.zbus_consumer, "envelope_bytes": body_bytes,
            "warm": warm,
            "windows": list(sc.windows) or None,
            "signature_bytes": sig_bytes, "zbus_settings": asdict(zbus.Settings()),
        },
    }
    for peer in ("rabbitmq", "nats"):
        if zb and peer in results and results[peer]["msgs_per_s"]:
            out[f"ratio_vs_{peer}"] = zb["msgs_per_s"] / results[peer]["msgs_per_s"]
    if sc.family.startswith("backend"):
        out["backends"] = {
            b: {"msgs_per_s": results[b]["msgs_per_s"],
                "ratio_vs_threads": _div(results[b], results.get("threads")),
                "ratio_vs_raw": _div(results[b], raw)}
            for b in BACKENDS if b in results
        }
    elif sc.family == "tcp":
        local, raw_local = results.get("zbus-local"), results.get("raw-local")
        out.update({
            "zbus_local_msgs_per_s": local["msgs_per_s"] if local else None,
            "raw_local_msgs_per_s": raw_local["msgs_per_s"] if raw_local else None,
            "ratio_local": _div(local, raw_local),
            "zbus_cross_vs_local": _div(zb, local),
            "raw_cross_vs_local": _div(raw, raw_local),
        })
    elif sc.family == "reliable":
        fast = results.get("fast")
        out["fast_msgs_per_s"] = fast["msgs_per_s"] if fast else None
        out["windows"] = {
            w: {"msgs_per_s": results[f"reliable-w{w}"]["msgs_per_s"],
                "ratio_vs_fast": _div(results[f"reliable-w{w}"], fast),
                "ratio_vs_raw": _div(results[f"reliable-w{w}"], raw)}
            for w in sc.windows if f"reliable-w{w}" in results
        }
        out["ratio_vs_fast"] = _div(zb, fast)
    return out


def _div(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    """a's median rate over b's (None when either is missing or b is zero)."""
    if not a or not b or not b["msgs_per_s"]:
        return None
    return float(a["msgs_per_s"] / b["msgs_per_s"])


def describe(sc: Scenario) -> dict[str, Any]:
    return {**asdict(sc), "label": sc.label, "kind": sc.kind}

