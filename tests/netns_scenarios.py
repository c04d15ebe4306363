"""The fault scenarios of the namespace lab, each returning rows of the fault table.

A row compares what the agents counted from payload sequence numbers with what zbus
counted: ``actual`` loss is sent minus the distinct sequence numbers delivered, ``counted``
is zbus's own number for that loss (a subscriber's ``lost``; for a fast pool every proxy's
``unaccounted`` plus the pool-link loss the origin proxy counts; for an at-least-once pool
``dead_lettered`` + ``overflow``), and ``unexplained = actual - counted`` is what nobody
counted. ``recovery`` is the time from the end of a fault (heal, cable back, restart,
SIGCONT) to the delivery of the first message published after it.

Used by tests/test_netns_faults.py (short faults) and by ``python3 -m tests.netns_lab table``
(which adds the 30 s partition), which prints the table of docs/RELIABILITY.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zbus

from .netns_lab import Agent, Lab, LabHost, Record, until

POOL = "lab"


@dataclass
class Row:
    fault: str
    sent: int
    delivered: int
    counted: int
    duplicates: int
    recovery: float | None
    note: str = ""

    @property
    def actual(self) -> int:
        return self.sent - self.delivered

    @property
    def unexplained(self) -> int:
        return self.actual - self.counted

    def markdown(self) -> str:
        rec = "-" if self.recovery is None else f"{self.recovery:.2f} s"
        return (f"| {self.fault} | {self.sent:,} | {self.delivered:,} | {self.actual:,} | "
                f"{self.counted:,} | {self.unexplained:,} | {self.duplicates:,} | {rec} | "
                f"{self.note} |")


HEADER = ("| fault | sent | delivered | actual loss | zbus-counted loss | unexplained | "
          "duplicates | recovery | notes |\n" + "| --- " * 9 + "|")


def settle(records: Sequence[Record], quiet: float = 1.0, timeout: float = 30.0) -> None:
    """Until no consumer has recorded anything for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    sizes = [-1] * len(records)
    still = time.monotonic()
    while time.monotonic() < deadline:
        now = [r.poll().total() for r in records]
        if now != sizes:
            sizes, still = now, time.monotonic()
        elif time.monotonic() - still >= quiet:
            return
        time.sleep(0.05)  # polling the consumers' files
    raise AssertionError(f"consumers still receiving after {timeout:g}s")


def flowing(agents: Sequence[Agent], beyond: int) -> Callable[[], bool]:
    return lambda: sum(a.record.poll().total() for a in agents) > beyond


def pool_counted(hosts: Sequence[LabHost], pool: str) -> tuple[int, str]:
    """Every proxy's ``unaccounted`` for fast pool ``pool`` plus the loss on its pool links
    counted at the origin (``federation.pool_links``), and the parts as a note."""
    parts = []
    total = 0
    for host in hosts:
        stats = host.stats()
        unaccounted = stats["fast_pools"].get(pool, {}).get("unaccounted") or 0
        links = ((stats.get("federation") or {}).get("pool_links") or {}).get(pool, {})
        lost_links = links.get("unaccounted") or 0
        total += unaccounted + lost_links
        parts.append(f"{host.name}: unaccounted {unaccounted}, links {lost_links}")
    return total, "; ".join(parts)


def subscriber_row(fault: str, sub: Agent, pub: str, sent: int,
                   recovery: float | None, note: str = "") -> Row:
    rec = sub.record.poll()
    # What zbus says the handlers did not get: the gaps not filled (lost) and what arrived
    # behind them, held for stream order, when the subscriber stopped (held).
    held = int(sub.final.get("held", 0))
    if held:
        note = f"{note}; {held:,} held behind gaps at stop".lstrip("; ")
    return Row(fault, sent, rec.distinct(pub), int(sub.final.get("lost", 0)) + held,
               rec.duplicates(), recovery, note)


def alive_after(lab: Lab, moment: float, timeout: float = 30.0) -> float:
    """Seconds from ``moment`` until every proxy reports every peer alive."""
    def all_alive() -> bool:
        for host in lab.hosts:
            peers = host.stats()["federation"]["peers"]
            if not all(st.get("alive") for st in peers.values()) or \
                    len(peers) < len(lab.hosts) - 1:
                return False
        return True

    until(all_alive, timeout, "the peers to be alive again", step=0.02)
    return time.time() - moment


# -- scenarios ------------------------------------------------------------------------------------


def network_fault(kind: str, seconds: float, rate: int = 2000,
                  heartbeat: tuple[float, float] | None = None) -> list[Row]:
    """A partition (silent drop) or a pulled cable between host A (publisher, a pool member)
    and host B (a subscriber, a pool member) for ``seconds``; ``heartbeat`` (interval,
    timeout) for the proxies, default theirs (2 s, 6 s)."""
    with Lab(2, heartbeat=heartbeat) as lab:
        a, b = lab.hosts
        until(lab.meshed, 30, "the mesh")
        sub = lab.agent(b, "subscribe", "subB")
        workers = [lab.agent(h, "worker", f"w{h.name}", "--pool", POOL) for h in (a, b)]
        for agent in (sub, *workers):
            agent.wait_ready()
        until(lambda: lab.pool_linked(POOL), 30, "the pool links")
        pub = lab.agent(a, "publish", "pubA", "--rate", str(rate))
        pub.wait_ready()
        until(flowing([sub], rate // 2), 30, "the stream to flow")
        if kind == "partition":
            lab.partition(a, b)
        else:
            lab.cable(b, up=False)
        time.sleep(seconds)  # the fault's duration
        if kind == "partition":
            lab.heal(a, b)
        else:
            lab.cable(b, up=True)
        healed = time.time()
        alive = alive_after(lab, healed)
        until(lambda: sub.record.poll().caught_up(healed) is not None, 30, "recovery")
        until(lambda: workers[1].record.poll().caught_up(healed) is not None, 30,
              "the pool member on B to get work again")
        until(flowing([sub], sub.record.total() + rate), 30, "a second of flow")
        sent = pub.stop()["sent"]
        records = [sub.record, *(w.record for w in workers)]
        settle(records)
        sub.stop()
        for w in workers:
            w.stop()
        counted, parts = pool_counted(lab.hosts, POOL)
        delivered: set[int] = set()
        dups = 0
        for w in workers:
            delivered |= {n for (_, n) in w.record.poll().seen}
            dups += w.record.duplicates()
        dups += len(workers[0].record.seen.keys() & workers[1].record.seen.keys())
        what = "partition" if kind == "partition" else "cable pull"
        if heartbeat is not None:
            what += f" (heartbeat timeout {heartbeat[1]:g} s)"
        rec_pool = workers[1].record.caught_up(healed)
        return [
            subscriber_row(f"{what} {seconds:g} s: subscriber across it", sub, "pubA", sent,
                           sub.record.caught_up(healed),
                           f"peers alive again {alive:.2f} s after the heal"),
            Row(f"{what} {seconds:g} s: fast pool, a member on each side", sent,
                len(delivered), counted, dups, rec_pool, parts),
        ]


def proxy_signal(kind: str, seconds: float = 3.0, rate: int = 2000) -> list[Row]:
    """Host A's proxy (the publisher's host) SIGKILLed and restarted after 1 s, or SIGSTOPped
    for ``seconds`` and continued; subscribers on A and on B."""
    with Lab(2) as lab:
        a, b = lab.hosts
        until(lab.meshed, 30, "the mesh")
        subs = [lab.agent(h, "subscribe", f"sub{h.name.upper()}") for h in (a, b)]
        for sub in subs:
            sub.wait_ready()
        pub = lab.agent(a, "publish", "pubA", "--rate", str(rate))
        pub.wait_ready()
        until(flowing(subs, rate), 30, "the stream to flow")
        if kind == "SIGKILL":
            lab.kill_proxy(a)
            time.sleep(1.0)  # the proxy is down this long
            lab.start_proxy(a)
            what = "proxy SIGKILL + restart after 1 s"
        else:
            assert a.proxy is not None
            a.proxy.signal(signal.SIGSTOP)
            time.sleep(seconds)  # the proxy is frozen this long
            a.proxy.signal(signal.SIGCONT)
            what = f"proxy SIGSTOP {seconds:g} s"
        back = time.time()
        for sub in subs:
            until(lambda s=sub: s.record.poll().caught_up(back) is not None, 30, "recovery")
        until(flowing(subs, sum(s.record.total() for s in subs) + rate), 30, "more flow")
        sent = pub.stop()["sent"]
        settle([s.record for s in subs])
        rows = []
        for sub, where in zip(subs, ("on A", "on B"), strict=True):
            sub.stop()
            rows.append(subscriber_row(f"{what} (publisher's host): subscriber {where}", sub,
                                       "pubA", sent, sub.record.caught_up(back)))
        return rows


def member_sigkill(mode: str, rate: int = 5000) -> list[Row]:
    """One of two members of a pool on one host SIGKILLed under ``rate`` msg/s."""
    with Lab(1) as lab:
        (a,) = lab.hosts
        role = "worker" if mode == "fast" else "reliable"
        workers = [lab.agent(a, role, f"w{i}", "--pool", POOL) for i in range(2)]
        for w in workers:
            w.wait_ready()
        pub = lab.agent(a, "publish", "pubA", "--rate", str(rate))
        pub.wait_ready()
        until(flowing(workers, rate), 30, "the stream to flow")
        started = time.monotonic()
        workers[0].proc.signal(signal.SIGKILL)
        killed = time.time()
        at_kill = pub.sent()
        time.sleep(2.0)  # the survivor carries the load this long
        sent = pub.stop()["sent"]
        took = time.monotonic() - started
        settle([w.record for w in workers], quiet=1.5, timeout=60)
        if mode == "reliable":
            # The component redelivers the dead member's messages once it notices the death
            # (heartbeat timeout, 6 s by default): books are read once it holds nothing.
            def idle() -> bool:
                rp = a.stats()["reliable_pools"][POOL]
                return bool(rp["members_lost"]) and not rp["in_flight"] and not rp["queued"]

            until(idle, 30, "the at-least-once pool to be idle")
            settle([w.record for w in workers], quiet=1.0, timeout=60)
        workers[1].stop()
        stats = a.stats()
        seen = workers[0].record.poll().seen + workers[1].record.poll().seen
        delivered = len({n for (_, n) in seen})
        dups = sum(c - 1 for c in seen.values())
        arrivals = {n: t for w in workers for t, _, _, n in reversed(w.record.arrivals)}
        before = [arrivals[n] for n in range(1, at_kill + 1) if n in arrivals]
        recovery = max(before) - killed if before and max(before) > killed else None
        achieved = (sent - at_kill) / took
        if mode == "fast":
            counted, note = pool_counted(lab.hosts, POOL)
            note += f"; {achieved:,.0f} msg/s after the kill"
            return [Row(f"fast pool member SIGKILL at {rate:,} msg/s", sent, delivered,
                        counted, dups, None, note)]
        rp = stats["reliable_pools"][POOL]
        counted = rp["dead_lettered"] + rp["overflow"]
        note = (f"redelivered {rp['redelivered']}, members_lost {rp['members_lost']}; "
                f"duplicates are at-least-once's (handled, not acked); "
                f"{achieved:,.0f} msg/s after the kill")
        return [Row(f"at-least-once member SIGKILL at {rate:,} msg/s", sent, delivered,
                    counted, dups, recovery, note)]


def subscriber_fault(kind: str, seconds: float = 4.0, rate: int = 4000) -> list[Row]:
    """A subscriber too slow for the stream (handler 1 ms), or SIGSTOPped for ``seconds``,
    beside a normal one; ``subscriber_hwm`` is 2,000 in the proxy and that subscriber."""
    with Lab(1, proxy_args=("--subscriber-hwm", "2000")) as lab:
        (a,) = lab.hosts
        extra = ("--hwm", "2000", *(("--delay", "0.001") if kind == "slow" else ()))
        odd = lab.agent(a, "subscribe", "subX", *extra)
        normal = lab.agent(a, "subscribe", "subN")
        for sub in (odd, normal):
            sub.wait_ready()
        pub = lab.agent(a, "publish", "pubA", "--rate", str(rate))
        pub.wait_ready()
        until(flowing([odd], 500), 30, "the stream to flow")
        back: float | None = None
        if kind == "stopped":
            odd.proc.signal(signal.SIGSTOP)
            time.sleep(seconds)  # frozen this long
            odd.proc.signal(signal.SIGCONT)
            back = time.time()
            until(lambda: odd.record.poll().caught_up(back) is not None, 30, "recovery")
        else:
            time.sleep(seconds)  # slow for this long
        sent = pub.stop()["sent"]
        settle([odd.record, normal.record], quiet=1.5, timeout=60)
        odd.stop()
        normal.stop()
        what = f"subscriber SIGSTOP {seconds:g} s" if kind == "stopped" \
            else "slow subscriber (1 ms per message)"
        return [
            subscriber_row(f"{what} at {rate:,} msg/s: that subscriber", odd, "pubA", sent,
                           odd.record.caught_up(back) if back else None),
            subscriber_row(f"{what}: the other subscriber", normal, "pubA", sent, None),
        ]


def publisher_sigterm(rate: int = 5000) -> list[Row]:
    """A publisher SIGTERMed with messages queued: its proxy was frozen for 1 s, so its
    queue held about ``rate`` messages. The agent calls ``zbus.exit_on_sigterm()`` (Python's
    default action runs no code: nothing could count the loss)."""
    with Lab(1) as lab:
        (a,) = lab.hosts
        assert a.proxy is not None
        sub = lab.agent(a, "subscribe", "subA")
        sub.wait_ready()
        pub = lab.agent(a, "publish", "pubA", "--rate", str(rate), "--send-timeout", "5")
        pub.wait_ready()
        until(flowing([sub], rate), 30, "the stream to flow")
        a.proxy.signal(signal.SIGSTOP)
        time.sleep(1.0)  # the publisher's queue fills this long
        pub.proc.signal(signal.SIGTERM)
        pub.proc.wait(10)
        a.proxy.signal(signal.SIGCONT)
        sent = pub.sent()
        settle([sub.record], quiet=1.5)
        sub.stop()
        return [subscriber_row(f"publisher SIGTERM at {rate:,} msg/s, ~1 s queued", sub,
                               "pubA", sent, None,
                               "sent: sends that returned, from the publisher's own file")]


# -- the fleet: what a fabric of N hosts costs (issue 19) ------------------------------------------


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "Threads"):
            out[key] = int(value.split()[0])
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


def _handshakes(hosts: Sequence[LabHost]) -> int:
    """CURVE handshakes the proxies served: each one is one ZAP request (accepted)."""
    return sum(((h.stats().get("federation") or {}).get("zap") or {}).get("accepted", 0)
               for h in hosts)


def _time_wait(host: LabHost) -> int:
    done = subprocess.run(["ip", "netns", "exec", host.ns, "ss", "-Htan", "state", "time-wait"],
                          capture_output=True, text=True)
    return len(done.stdout.splitlines())


def _own_stop(log: str) -> float:
    """Seconds a proxy's log says its stop took (signal received to stopped): the rest of
    a wall-clock stop is the machine scheduling processes that all stop at once."""
    from datetime import datetime

    def at(text: str) -> float:
        line = [ln for ln in log.splitlines() if text in ln][-1]
        return datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")).timestamp()

    return at("zbus-proxy stopped") - at("signal received")


def _ready_time(host: LabHost, timeout: float = 20.0) -> float | str:
    """Seconds a new subscriber's ready() takes on ``host`` (local probe and every live
    peer's origin), or why it failed."""
    dispatcher = zbus.Dispatcher()
    dispatcher.bind("notifications", "fleet.#", lambda delivery: None)
    with zbus.Connection(host.run_dir) as conn:
        sub = conn.subscribe(dispatcher, zbus.generate_key())
        started = time.monotonic()
        try:
            sub.ready(timeout=timeout)
        except zbus.Timeout as exc:
            return f"failed after {time.monotonic() - started:.1f}s: {str(exc)[:90]}"
        finally:
            sub.close()
        return round(time.monotonic() - started, 3)


def fleet(count: int, idle: float = 10.0, sync_interval: float = 1.0) -> dict[str, Any]:
    """``count`` hosts (one more joins late): cold-start convergence, idle cost per proxy,
    handshakes/s, the late joiner, ready() and detection with a third of the peers cut off
    (silent drop), and stop times."""
    out: dict[str, Any] = {"n": count}
    args = ("--sync-interval", str(sync_interval))
    with Lab(count + 1, late=1, parallel=True, proxy_args=args) as lab:
        *hosts, late = lab.hosts
        started = time.monotonic()
        until(lambda: lab.meshed(hosts), 120, "the fleet to mesh")
        out["converged_s"] = round(time.monotonic() - started, 2)
        time.sleep(2.0)  # past the start: what follows is the idle fleet
        pids = [h.proxy.pid for h in hosts if h.proxy is not None]
        cpu = [_cpu_seconds(pid) for pid in pids]
        shakes = _handshakes(hosts)
        began = time.monotonic()
        time.sleep(idle)  # the idle window measured
        window = time.monotonic() - began
        cpu = [_cpu_seconds(pid) - c for pid, c in zip(pids, cpu, strict=True)]
        out["handshakes_per_s"] = round((_handshakes(hosts) - shakes) / window, 2)
        out["idle_cpu_pct_mean"] = round(100 * sum(cpu) / len(cpu) / window, 2)
        out["idle_cpu_pct_max"] = round(100 * max(cpu) / window, 2)
        out["idle_cpu_pct_fleet"] = round(100 * sum(cpu) / window, 1)
        status = [_status(pid) for pid in pids]
        out["rss_mib"] = round(sum(s["VmRSS"] for s in status) / len(status) / 1024, 1)
        out["threads"] = max(s["Threads"] for s in status)
        out["fds"] = max(s["fds"] for s in status)
        out["time_wait"] = max(_time_wait(h) for h in hosts)
        # A late joiner (listed by everyone, started now): until it and every other proxy
        # see each other alive and linked.
        began = time.monotonic()
        lab.start_proxy(late)
        answering = time.monotonic()
        until(lab.meshed, 60, "the late joiner to mesh")
        out["late_joiner_s"] = round(time.monotonic() - answering, 2)
        out["late_joiner_from_exec_s"] = round(time.monotonic() - began, 2)
        # A third of the peers cut off from the first host by a silent drop.
        first = hosts[0]
        cut = lab.hosts[-max(1, (count + 1) // 3):]
        for host in cut:
            lab.partition(first, host)
        began = time.monotonic()
        out["ready_during_cut_s"] = _ready_time(first)
        nodes = {h.node for h in cut}

        def away() -> bool:
            peers = first.stats()["federation"]["peers"]
            return not any(peers.get(n, {}).get("alive") for n in nodes)

        until(away, 60, "the cut-off peers to be away")
        out["cut"] = len(cut)
        out["detected_s"] = round(time.monotonic() - began, 2)
        tries = [_ready_time(first) for _ in range(3)]
        times = [t for t in tries if isinstance(t, float)]
        out["ready_cut_s"] = min(times) if times else tries[0]
        assert first.proxy is not None
        began = time.monotonic()
        first.proxy.signal(signal.SIGTERM)
        first.proxy.wait(30)
        out["stop_cut_s"] = round(time.monotonic() - began, 2)
        rest = [h for h in lab.hosts if h is not first]
        began = time.monotonic()
        for host in rest:
            assert host.proxy is not None
            host.proxy.signal(signal.SIGTERM)
        for host in rest:
            assert host.proxy is not None
            host.proxy.wait(30)
        out["stop_all_s"] = round(time.monotonic() - began, 2)
        out["stop_all_own_max_s"] = round(max(
            _own_stop(h.proxy.log.read_text()) for h in rest if h.proxy is not None), 2)
        out["link_warnings"] = sum(h.proxy.log.read_text().count("cannot start a link")
                                   for h in lab.hosts if h.proxy is not None)
    return out


SCENARIOS: dict[str, Callable[[], list[Row]]] = {
    "partition": lambda: network_fault("partition", 3.0),
    "cable": lambda: network_fault("cable", 3.0),
    "proxy-sigkill": lambda: proxy_signal("SIGKILL"),
    "proxy-sigstop": lambda: proxy_signal("SIGSTOP"),
    "member-fast": lambda: member_sigkill("fast"),
    "member-reliable": lambda: member_sigkill("reliable"),
    "slow-subscriber": lambda: subscriber_fault("slow"),
    "stopped-subscriber": lambda: subscriber_fault("stopped"),
    "publisher-sigterm": publisher_sigterm,
}


def main(argv: Sequence[str]) -> int:
    from .netns_lab import unavailable

    parser = argparse.ArgumentParser(prog="python3 -m tests.netns_lab")
    parser.add_argument("command", choices=["table", "fleet"],
                        help="table: the fault table; fleet: what N hosts cost (one JSON "
                             "line per N, docs/ARCHITECTURE.md 'Membership')")
    parser.add_argument("--sizes", default="4,8,16,24", help="fleet: the Ns, comma-separated")
    parser.add_argument("--idle", type=float, default=10.0,
                        help="fleet: seconds of idle fleet measured")
    parser.add_argument("--sync-interval", type=float, default=1.0,
                        help="fleet: the proxies' network.sync_interval")
    parser.add_argument("--long", type=float, default=30.0,
                        help="the long partition's seconds (0: leave it out)")
    parser.add_argument("--only", action="append", default=[],
                        help=f"scenario (repeatable): {', '.join(SCENARIOS)}, long-partition")
    args = parser.parse_args(argv)
    reason = unavailable()
    if reason:
        print(reason)
        return 2
    if args.command == "fleet":
        for size in (int(n) for n in args.sizes.split(",")):
            print(json.dumps(fleet(size, args.idle, args.sync_interval)), flush=True)
        return 0
    runs: dict[str, Callable[[], list[Row]]] = {}
    if args.long and (not args.only or "long-partition" in args.only):
        runs["long-partition"] = lambda: network_fault("partition", args.long)
    runs |= {k: v for k, v in SCENARIOS.items() if not args.only or k in args.only}
    print(HEADER, flush=True)
    for name, run in runs.items():
        try:
            for row in run():
                print(row.markdown(), flush=True)
        except Exception as exc:  # one failed scenario must not hide the others' rows
            print(f"| {name} | failed: {exc!s:.300} |||||||", flush=True)
    return 0
