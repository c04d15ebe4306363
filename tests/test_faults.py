"""Fault injection against a real ``zbus-proxy`` process; the books balance exactly.

Each test prints a ``FAULT`` line (run with ``-s`` to see them): fault, messages sent,
delivered, counted lost, duplicates, recovery time. docs/RELIABILITY.md has the table.
``ZBUS_SOAK_SECONDS`` lengthens the soak (default 20 s).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from .agents import Agent, Collector
from .conftest import ProxyProcess, Spawn, spawner
from .reliability_agents import RAgent, rss_bytes

BINDING = "notifications/compute.#"

@pytest.fixture
def spawn(run_dir: Path, key: bytes, collector: Collector, agents: list[Agent]) -> Spawn:
    return spawner(RAgent, run_dir, key, agents, collector)


def fault_row(fault: str, sent: int, delivered: int, lost: int, dups: int,
              recovery: float | None) -> None:
    rec = "-" if recovery is None else f"{recovery:.3f}s"
    print(f"\nFAULT | {fault} | sent {sent} | delivered {delivered} | lost {lost} | "
          f"dups {dups} | recovery {rec}")


def highest(collector: Collector, name: str, publisher: str = "pub1") -> int:
    seqs = [seq for pub, seq, _ in collector.seen[name] if pub == publisher]
    return max(seqs, default=0)


def progressed(collector: Collector, name: str, beyond: int) -> Callable[[], bool]:
    return lambda: highest(collector, name) > beyond


def finish_publisher(publisher: Agent) -> int:
    publisher.tell_stop()
    done = publisher.readline(60).split()
    assert done[0] == "DONE", done
    assert publisher.wait(10) == 0
    return int(done[1])


def assert_books(collector: Collector, name: str, sent: int) -> tuple[int, int]:
    """``name`` saw 1..sent of pub1 in order, each at most once, and counted every gap."""
    seqs = collector.sequences(name)
    assert seqs == sorted(set(seqs)), f"{name}: duplicates or reordering"
    assert seqs[0] == 1 and seqs[-1] == sent, (seqs[:3], seqs[-3:], sent)
    stats = collector.stats[name]["stats"]
    assert stats["received"] == len(seqs)
    missing = len(set(range(1, sent + 1)) - set(seqs))
    assert stats["lost"] == missing, (stats, missing)
    assert stats["received"] + stats["lost"] == sent, stats
    assert stats["rejected"] == {} and stats["reordered"] == 0, stats
    return stats["received"], stats["lost"]


def test_proxy_sigkill_mid_stream(
    proxy_process: ProxyProcess, spawn: Spawn, collector: Collector
) -> None:
    """SIGKILL the proxy under a 2,000 msg/s stream and restart it: both subscribers and the
    publisher carry on by themselves; each subscriber's received + lost == sent, exactly."""
    subs = [spawn("subscribe", f"sub{i}", "--bind", BINDING) for i in range(2)]
    for sub in subs:
        sub.wait_ready()
    publisher = spawn("publish", "pub1", "--rate", "2000", "--send-timeout", "0.5")
    publisher.wait_ready()
    for sub in subs:
        collector.until(progressed(collector, sub.name, 500), 30, "the stream to flow")

    proxy_process.stop(signal.SIGKILL)
    killed = time.monotonic()
    collector.pump(0.5)  # the outage: the publisher keeps sending into its queue meanwhile
    before = {sub.name: highest(collector, sub.name) for sub in subs}
    proxy_process.start()
    outages = []
    for sub in subs:
        line = sub.readline(30).split()  # "RESUBSCRIBED n seconds", from the subscriber
        assert line[:2] == ["RESUBSCRIBED", "1"], line
        outages.append(float(line[2]))
    for sub in subs:
        collector.until(progressed(collector, sub.name, before[sub.name]), 30, "resumption")
    resumed = time.monotonic() - killed
    for sub in subs:
        collector.until(progressed(collector, sub.name, before[sub.name] + 500), 30, "flow")

    sent = finish_publisher(publisher)
    for sub in subs:
        collector.until(progressed(collector, sub.name, sent - 1), 30, "the last message")
    collector.stop_all(subs)
    for sub in subs:
        received, lost = assert_books(collector, sub.name, sent)
        link = collector.stats[sub.name]["stats"]["link"]
        assert link["disconnects"] >= 1 and link["resubscribed"] == 1, link
        fault_row(f"proxy SIGKILL+restart ({sub.name})", sent, received, lost, 0,
                  max(outages))
    print(f"FAULT-DETAIL | kill to first delivery after restart {resumed:.3f}s | "
          f"subscriber outages {outages}")


def test_sigstopped_subscriber_does_not_slow_the_others(
    run_dir: Path, spawn: Spawn, collector: Collector
) -> None:
    """A subscriber frozen with SIGSTOP: the publisher keeps its rate (no Timeout), the other
    subscriber gets everything; the proxy drops for the frozen one alone (subscriber_hwm),
    and after SIGCONT it counts exactly what it missed."""
    proxy = ProxyProcess(run_dir, "--subscriber-hwm", "2000").start()
    try:
        fast, slow = (spawn("subscribe", name, "--bind", BINDING) for name in ("fast", "slow"))
        fast.wait_ready()
        slow.wait_ready()
        rate = 4000
        publisher = spawn("publish", "pub1", "--rate", str(rate), "--send-timeout", "0.5")
        publisher.wait_ready()
        started = time.monotonic()
        collector.until(progressed(collector, slow.name, 500), 30, "the stream to flow")

        os.kill(slow.proc.pid, signal.SIGSTOP)
        mark = highest(collector, fast.name)
        # Frozen while 12,000 messages go by: far beyond what its queues can hold.
        collector.until(progressed(collector, fast.name, mark + 12_000), 30, "the fast one")
        os.kill(slow.proc.pid, signal.SIGCONT)
        continued = time.monotonic()
        # The fast subscriber kept pace with the publisher's schedule while the other froze.
        elapsed = time.monotonic() - started
        assert highest(collector, fast.name) >= 0.8 * rate * elapsed - 2000
        frozen = highest(collector, slow.name)
        collector.until(progressed(collector, slow.name, frozen + 1000), 30, "the slow one")
        resumed = time.monotonic()
        sent = finish_publisher(publisher)
        assert publisher.lines[-1].split()[2] == "0", "the publisher was held up"
        for sub in (fast, slow):
            collector.until(progressed(collector, sub.name, sent - 1), 30, "the last message")
        collector.stop_all([fast, slow])
        received, lost = assert_books(collector, fast.name, sent)
        assert lost == 0
        fault_row("subscriber SIGSTOP (other subscriber)", sent, received, 0, 0, None)
        received, lost = assert_books(collector, slow.name, sent)
        assert lost > 0, "the frozen subscriber lost nothing: the test did not overflow it"
        fault_row("subscriber SIGSTOP (frozen one, after SIGCONT)", sent, received, lost, 0,
                  resumed - continued)
    finally:
        proxy.stop()


def test_resubscription_of_3000_patterns_after_a_proxy_restart(
    proxy_process: ProxyProcess, spawn: Spawn, collector: Collector
) -> None:
    """3,000 distinct bindings (libzmq #2258: >1,000 subscriptions at once were dropped at the
    SUB's own SNDHWM, and at the proxy's fan-in XSUB's): every pattern delivers before and
    after a SIGKILL + restart."""
    patterns = 3000
    (sub,) = (spawn("subscribe", "sub", "--bind", BINDING, "--bind-count", str(patterns)),)
    sub.wait_ready(60)
    keys = {f"k{i:04d}.x" for i in range(patterns)}

    def round_trip(publisher_id: str) -> tuple[int, int]:
        pub = spawn("publish", publisher_id, "--publisher-id", publisher_id, "--count",
                    str(patterns), "--cycle-keys", str(patterns), "--final",
                    "--send-timeout", "10")
        pub.wait_ready()
        done = pub.readline(60).split()
        assert done[:2] == ["DONE", str(patterns + 1)], done
        assert pub.wait(10) == 0
        # The final message (a compute key, the last sent) arrives after every other.
        collector.until(
            lambda: any(p == publisher_id and k == "compute.instance.create.end"
                        for p, _, k in collector.seen[sub.name]),
            30, f"the final message of {publisher_id}",
        )
        got = {k for p, _, k in collector.seen[sub.name] if p == publisher_id}
        return len(got - {"compute.instance.create.end"}), patterns - len(got & keys)

    first = round_trip("pubA")
    proxy_process.stop(signal.SIGKILL)
    proxy_process.start()
    line = sub.readline(30).split()
    assert line[:2] == ["RESUBSCRIBED", "1"], line
    second = round_trip("pubB")
    collector.stop_all([sub])
    stats = collector.stats[sub.name]["stats"]
    # The books balance whatever happened: each round is 3,001 streams of one message each.
    assert stats["received"] + stats["lost"] == 2 * (patterns + 1), stats
    fault_row("proxy SIGKILL with 3,000 patterns", 2 * (patterns + 1), stats["received"],
              stats["lost"], 0, float(line[2]))
    assert first == (patterns, 0) and second == (patterns, 0)
    assert stats["lost"] == 0


def test_soak_memory_stays_flat_and_books_balance(
    proxy_process: ProxyProcess, spawn: Spawn, collector: Collector
) -> None:
    """A fixed-rate stream for ZBUS_SOAK_SECONDS (default 20): proxy and subscriber RSS,
    sampled every 0.5 s, grow by less than 4 MiB after the first quarter; nothing is lost."""
    seconds = float(os.environ.get("ZBUS_SOAK_SECONDS", "20"))
    rate = 2000
    (sub,) = (spawn("subscribe", "sub", "--bind", BINDING, "--count-only"),)
    sub.wait_ready()
    publisher = spawn("publish", "pub1", "--rate", str(rate), "--send-timeout", "5")
    publisher.wait_ready()
    samples: dict[str, list[int]] = {"proxy": [], "subscriber": []}
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        samples["proxy"].append(rss_bytes(proxy_process.pid))
        samples["subscriber"].append(rss_bytes(sub.proc.pid))
        collector.pump(0.5)  # pacing the sampler (the agents report only at the end)
    sent = finish_publisher(publisher)
    collector.stop_all([sub])
    stats = collector.stats[sub.name]["stats"]
    assert stats["received"] == sent and stats["lost"] == 0, (stats, sent)
    warm = len(samples["proxy"]) // 4
    for who, rss in samples.items():
        growth = max(rss[warm:]) - rss[warm]
        print(f"\nRSS {who}: start {rss[0] >> 10} KiB, after warm-up {rss[warm] >> 10} KiB, "
              f"max {max(rss) >> 10} KiB, end {rss[-1] >> 10} KiB, growth {growth >> 10} KiB")
        assert growth < 4 << 20, f"{who} grew {growth >> 10} KiB after warm-up"
    fault_row(f"soak {seconds:g}s at {rate}/s", sent, stats["received"], 0, 0, None)
