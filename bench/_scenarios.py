"""The scenarios, and running one: zbus, its raw-pyzmq baseline and the peers, interleaved.

Each repeat runs every variant of a scenario one after the other (zbus, raw, rabbitmq,
nats), so a busy machine slows them alike; the reported figure is the median over repeats.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import zbus

from . import _asyncio, _peers, _zmq
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

    @property
    def label(self) -> str:
        return f"{self.name} {self.size}B"

    @property
    def kind(self) -> str:
        return "latency" if self.rate else "throughput"


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
        ]
    for size in sizes:
        for rate in (1000, 10_000):
            out.append(Scenario(f"latency-{rate // 1000}k", size,
                                f"one-way latency at {rate} msg/s, 1 subscriber", rate=rate))
    return out


Variant = tuple[Callable[..., None], Callable[..., None]]


def _variants(sc: Scenario, peers: dict[str, str | None]) -> dict[str, Variant]:
    if sc.backend == "asyncio":
        return {"zbus": (_asyncio.zbus_async_publisher, _asyncio.zbus_async_consumer),
                "raw": (_asyncio.raw_async_publisher, _asyncio.raw_async_consumer)}
    out: dict[str, Variant] = {
        "zbus": (_zmq.zbus_publisher,
                 _zmq.zbus_consumer if sc.zbus_consumer else _zmq.raw_consumer),
        "raw": (_zmq.raw_publisher, _zmq.raw_consumer),
    }
    if sc.peers:
        if "rabbitmq" in peers and peers["rabbitmq"] is None:
            out["rabbitmq"] = (_peers.rabbit_publisher, _peers.rabbit_consumer)
        if "nats" in peers and peers["nats"] is None:
            out["nats"] = (_peers.nats_publisher, _peers.nats_consumer)
    return out


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
    with _zmq.ProxyProcess() as proxy:
        for rep in range(cfg.repeat):
            for name, (pub, con) in variants.items():
                progress.step(f"{sc.label} {name} ({rep + 1}/{cfg.repeat})")
                if name in failures:
                    continue
                args: dict[str, Any] = {
                    "run_dir": proxy.run_dir, "key": key, "size": sc.size,
                    "duration": duration, "warm": min(cfg.warm, 200) if sc.rate else cfg.warm,
                    "batch": cfg.batch if sc.batch and name == "zbus" else 0,
                    "rate": sc.rate, "pool": sc.pool, "timeout": duration + 60,
                    "body_bytes": body_bytes, "sig_bytes": sig_bytes,
                }
                try:
                    trial = run_trial((pub, args), [(con, args)] * sc.consumers,
                                      timeout=duration + 90)
                except Exception as exc:  # report it; the other variants still run
                    failures[name] = f"{type(exc).__name__}: {exc}"
                    progress.note(f"  {sc.label} {name}: FAILED ({failures[name]})")
                    continue
                trials[name].append(trial)
    results = {name: _summary(sc, ts) for name, ts in trials.items() if ts}
    zb, raw = results.get("zbus"), results.get("raw")
    out: dict[str, Any] = {
        "scenario": sc.name, "size": sc.size, "kind": sc.kind, "what": sc.what,
        "transport": "ipc", "backend": sc.backend,
        "zbus_msgs_per_s": zb["msgs_per_s"] if zb else None,
        "raw_msgs_per_s": raw["msgs_per_s"] if raw else None,
        "ratio": zb["msgs_per_s"] / raw["msgs_per_s"] if zb and raw and raw["msgs_per_s"]
        else None,
        "lost": zb["lost"] if zb else None,
        "results": results,
        "failures": failures,
        "settings": {
            **asdict(cfg), "duration": duration, "consumers": sc.consumers, "pool": sc.pool,
            "rate": sc.rate, "batch": cfg.batch if sc.batch else None,
            "zbus_consumer": sc.zbus_consumer, "envelope_bytes": body_bytes,
            "signature_bytes": sig_bytes, "zbus_settings": asdict(zbus.Settings()),
        },
    }
    for peer in ("rabbitmq", "nats"):
        if zb and peer in results and results[peer]["msgs_per_s"]:
            out[f"ratio_vs_{peer}"] = zb["msgs_per_s"] / results[peer]["msgs_per_s"]
    return out


def describe(sc: Scenario) -> dict[str, Any]:
    return {**asdict(sc), "label": sc.label, "kind": sc.kind}

