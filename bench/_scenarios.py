"""The scenarios, and running one: zbus, its raw-pyzmq baseline and the peers, interleaved.

Each repeat runs every variant of a scenario one after the other (zbus, raw, rabbitmq,
nats; or the backends, or cross-host and single-host, or the pool modes), so a busy machine
slows them alike; the reported figure is the median over repeats.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import zbus

from . import _asyncio, _eventlet, _peers, _zmq
from ._util import LogHistogram, Progress, Trial, median, run_trial

__all__ = ["Config", "Scenario", "all_scenarios", "describe", "run_scenario", "trial_count"]


@dataclass(frozen=True)
class Config:
    duration: float = 1.0
    """Seconds each publisher sends measured messages (after its warm-up)."""
    latency_duration: float = 3.0
    repeat: int = 3
    warm: int = 2000
    """Warm-up messages sent (and received, not counted) before the measured ones."""
    batch: int = 100
    peers: bool = True
    pool_count: int = 8000
    """Measured messages per at-least-once pool trial: warm-up + these stay below the pool's
    ``max_pending`` (``pool_hwm``, 10,000), beyond which the proxy drops the newest."""


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
    """main; backend-publish / backend-consume (threads, asyncio, eventlet and raw side by
    side); tcp (two federated proxies); reliable (at-least-once pool vs fast pool vs raw)."""
    windows: tuple[int, ...] = ()
    """reliable: the members' windows, one variant each."""

    @property
    def label(self) -> str:
        return f"{self.name} {self.size}B"

    @property
    def kind(self) -> str:
        if self.rate:
            return "latency"
        return "throughput" if self.family == "main" else self.family


def all_scenarios(sizes: list[int]) -> list[Scenario]:
    out: list[Scenario] = []
    for size in sizes:
        out += [
            Scenario("fanout-1", size, "signed publish -> proxy -> 1 subscriber", peers=True),
            Scenario("fanout-4", size, "-> 4 subscribers, each gets every message",
                     consumers=4, peers=True),
            Scenario("pool-2", size, "-> pool of 2 workers, each message to one",
                     consumers=2, pool=True, peers=True),
            Scenario("pool-4", size, "-> pool of 4 workers", consumers=4, pool=True,
                     peers=True),
            Scenario("publish", size, "zbus Publisher.send -> raw SUB (publish side only)",
                     zbus_consumer=False),
            Scenario("batch", size, "zbus Publisher.send_many -> raw SUB vs raw per-message",
                     batch=True, zbus_consumer=False),
            Scenario("fanout-1-asyncio", size,
                     "zbus.asyncio publisher and subscriber vs raw zmq.asyncio",
                     backend="asyncio"),
            Scenario("backend-publish", size,
                     "threads / asyncio / eventlet Publisher.send -> raw SUB, vs raw PUSH",
                     zbus_consumer=False, family="backend-publish"),
            Scenario("backend-consume", size,
                     "threads publisher -> threads / asyncio / eventlet Subscriber, vs raw",
                     family="backend-consume"),
            Scenario("tcp-fanout-1", size,
                     "publisher on host A -> CURVE tcp -> subscriber on host B, and both "
                     "on A", family="tcp"),
            Scenario("reliable-pool-2", size,
                     "at-least-once pool of 2 (window 10, 100) vs fast pool of 2 vs raw",
                     consumers=2, pool=True, family="reliable", windows=(10, 100)),
        ]
    for size in sizes:
        for rate in (1000, 10_000):
            out.append(Scenario(f"latency-{rate // 1000}k", size,
                                f"one-way latency at {rate} msg/s, 1 subscriber", rate=rate))
    return out


@dataclass(frozen=True)
class Variant:
    publisher: Callable[..., None]
    consumer: Callable[..., None]
    pub_args: dict[str, Any] = field(default_factory=dict)
    con_args: dict[str, Any] = field(default_factory=dict)
    cross: bool = False
    """tcp: the consumers run on host B (the publisher always on host A)."""


RAW = Variant(_zmq.raw_publisher, _zmq.raw_consumer)
BACKENDS = ("threads", "asyncio", "eventlet")
NOT_ZBUS = ("raw", "raw-local", "rabbitmq", "nats")


def _variants(sc: Scenario, peers: dict[str, str | None]) -> dict[str, Variant]:
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
        zb = Variant(_zmq.zbus_publisher, _zmq.zbus_consumer)
        cross = {"cross": True}
        return {"zbus": Variant(zb.publisher, zb.consumer, con_args=cross, cross=True),
                "raw": Variant(RAW.publisher, RAW.consumer, con_args=cross, cross=True),
                "zbus-local": zb, "raw-local": RAW}
    if sc.family == "reliable":
        # A declared pool keeps taking its topic's messages between trials, members or not:
        # each variant gets its own pool and topic (keys of one length: same frame sizes), so
        # no trial finds another's messages queued for it.
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
    variants: dict[str, Variant] = {
        "zbus": Variant(_zmq.zbus_publisher,
                        _zmq.zbus_consumer if sc.zbus_consumer else _zmq.raw_consumer),
        "raw": RAW,
    }
    if sc.peers:
        if "rabbitmq" in peers and peers["rabbitmq"] is None:
            variants["rabbitmq"] = Variant(_peers.rabbit_publisher, _peers.rabbit_consumer)
        if "nats" in peers and peers["nats"] is None:
            variants["nats"] = Variant(_peers.nats_publisher, _peers.nats_consumer)
    return variants


def _summary(sc: Scenario, trials: list[Trial]) -> dict[str, Any]:
    fan = 1 if sc.pool else sc.consumers
    lost = [max(0, t.sent * fan - t.received) for t in trials]
    out: dict[str, Any] = {
        "msgs_per_s": median(t.rate() for t in trials),
        "send_msgs_per_s": median(t.publisher["send_rate"] for t in trials),
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


def run_scenario(sc: Scenario, cfg: Config, peers: dict[str, str | None], key: bytes,
                 progress: Progress) -> dict[str, Any]:
    variants = _variants(sc, peers if cfg.peers else {})
    body_bytes, sig_bytes = _zmq.frame_sizes(key, sc.size)
    duration = cfg.latency_duration if sc.rate else cfg.duration
    trials: dict[str, list[Trial]] = {name: [] for name in variants}
    failures: dict[str, str] = {}
    warm = cfg.warm
    if sc.rate:
        warm = min(cfg.warm, 200)
    elif sc.family == "reliable":
        warm = min(cfg.warm, 1000)
    proxy: _zmq.ProxyProcess | _zmq.FederationProcess
    proxy = _zmq.FederationProcess() if sc.family == "tcp" else _zmq.ProxyProcess()
    with proxy:
        for rep in range(cfg.repeat):
            for name, v in variants.items():
                progress.step(f"{sc.label} {name} ({rep + 1}/{cfg.repeat})")
                if name in failures:
                    continue
                args: dict[str, Any] = {
                    "run_dir": proxy.run_dir, "key": key, "size": sc.size,
                    "duration": duration, "warm": warm,
                    "batch": cfg.batch if sc.batch and name == "zbus" else 0,
                    "rate": sc.rate, "pool": sc.pool, "timeout": duration + 60,
                    "body_bytes": body_bytes, "sig_bytes": sig_bytes,
                    "count": cfg.pool_count if sc.family == "reliable" else 0,
                }
                con_args = {**args, **v.con_args}
                if v.cross and isinstance(proxy, _zmq.FederationProcess):
                    con_args["run_dir"] = proxy.run_dir_b
                try:
                    trial = run_trial((v.publisher, {**args, **v.pub_args}),
                                      [(v.consumer, con_args)] * sc.consumers,
                                      timeout=duration + 90)
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
            **asdict(cfg), "duration": duration, "consumers": sc.consumers, "pool": sc.pool,
            "rate": sc.rate, "batch": cfg.batch if sc.batch else None,
            "zbus_consumer": sc.zbus_consumer, "envelope_bytes": body_bytes,
            "warm": warm, "count": cfg.pool_count if sc.family == "reliable" else None,
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

