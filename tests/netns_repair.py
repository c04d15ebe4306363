"""Repair's fault table on network namespaces (issue 15): after each fault, does every
subscriber end with delivered == sent, counted from the payloads' own sequence numbers?

Host A runs the publisher, host B the subscriber (plus, where said, one on A); the proxies
are federated under CURVE on the lab's bridge (tests/netns_lab.py). ``repaired`` and
``unrepairable`` are the subscriber's own counters, read only to compare with the payloads.

``python3 -m tests.netns_repair [--long]`` prints the table (``--long`` adds the 30 s
partition with a 60 s interval); tests/test_netns_repair.py runs the short faults.
"""

from __future__ import annotations

import argparse
import signal
import time
from dataclasses import dataclass

from .netns_lab import Agent, Lab, until
from .netns_scenarios import flowing, settle


@dataclass
class RepairRow:
    fault: str
    sent: int
    delivered: int
    repaired: int
    unrepairable: int
    duplicates: int
    recovery: float | None
    note: str = ""

    @property
    def lost(self) -> int:
        return self.sent - self.delivered

    def markdown(self) -> str:
        rec = "-" if self.recovery is None else f"{self.recovery:.2f} s"
        return (f"| {self.fault} | {self.sent:,} | {self.delivered:,} | {self.repaired:,} | "
                f"{self.unrepairable:,} | {self.lost:,} | {self.duplicates:,} | {rec} | "
                f"{self.note} |")


HEADER = ("| fault | sent | delivered | repaired | unrepairable | lost (sent - delivered) | "
          "duplicates | recovery | notes |\n| --- | --- | --- | --- | --- | --- | --- | --- | "
          "--- |")


def _row(fault: str, sub: Agent, sent: int, recovery: float | None, note: str = ""
         ) -> RepairRow:
    rec = sub.record.poll()
    final = sub.final
    return RepairRow(fault, sent, rec.distinct("pubA"), int(final.get("repaired", 0)),
                     int(final.get("unrepairable", 0)), rec.duplicates(), recovery, note)


def _finish(pub: Agent, subs: list[Agent], interval: float) -> int:
    """Stop the publisher's sending, let repairs finish (at most the interval) while it
    still keeps what it sent, stop the subscribers, then the publisher; what it sent."""
    sent = int(pub.stop(wait=False)["sent"])

    def all_there() -> bool:
        return all(s.record.poll().distinct("pubA") >= sent for s in subs)

    # Repairs come within the interval, or the gaps are given up: wait for either.
    deadline = time.monotonic() + interval + 5
    while not all_there() and time.monotonic() < deadline:
        time.sleep(0.1)  # polling the subscribers' files
    settle([s.record for s in subs])
    for s in subs:
        s.stop()
    pub.proc.tell_stop()
    pub.proc.wait(10)
    return sent


def _start(lab: Lab, rate: int, interval: float, *sub_args: str,
           on_a: bool = False) -> tuple[Agent, list[Agent]]:
    a, b = lab.hosts
    until(lab.meshed, 30, "the mesh")
    hosts = [b, a] if on_a else [b]
    subs = [lab.agent(h, "subscribe", f"sub{h.name.upper()}", "--repair-interval",
                      str(interval), *sub_args) for h in hosts]
    for sub in subs:
        sub.wait_ready()
    pub = lab.agent(a, "publish", "pubA", "--rate", str(rate), "--repair-interval",
                    str(interval), "--hold")
    pub.wait_ready()
    until(flowing(subs, rate // 2 * len(subs)), 30, "the stream to flow")
    return pub, subs


def partition(seconds: float, interval: float, rate: int = 2000) -> list[RepairRow]:
    with Lab(2) as lab:
        a, b = lab.hosts
        pub, subs = _start(lab, rate, interval)
        lab.partition(a, b)
        time.sleep(seconds)  # the fault's duration
        lab.heal(a, b)
        healed = time.time()
        until(lambda: subs[0].record.poll().caught_up(healed) is not None, 60, "recovery")
        sent = _finish(pub, subs, interval)
        return [_row(f"partition {seconds:g} s, interval {interval:g} s: subscriber across it",
                     subs[0], sent, subs[0].record.caught_up(healed))]


def proxy_restart(host: str, rate: int = 3000, interval: float = 10.0) -> list[RepairRow]:
    """SIGKILL the publisher's (A) or the subscriber's (B) proxy, restart it after 1 s."""
    with Lab(2) as lab:
        a, b = lab.hosts
        pub, subs = _start(lab, rate, interval, on_a=True)
        target = a if host == "publisher's" else b
        lab.kill_proxy(target, signal.SIGKILL)
        time.sleep(1.0)  # the proxy is down this long
        lab.start_proxy(target)
        back = time.time()
        for sub in subs:
            until(lambda s=sub: s.record.poll().caught_up(back) is not None, 60, "recovery")
        sent = _finish(pub, subs, interval)
        return [_row(f"{host} proxy SIGKILL + restart at {rate:,} msg/s: subscriber on "
                     f"{sub.name[-1]}", sub, sent, sub.record.caught_up(back)) for sub in subs]


def stopped_subscriber(seconds: float = 5.0, rate: int = 4000, hwm: int = 1000,
                       interval: float = 10.0) -> list[RepairRow]:
    """The subscriber SIGSTOPped while far more than its high-water mark (at its proxy and
    in itself) piles up."""
    with Lab(2, proxy_args=("--subscriber-hwm", str(hwm))) as lab:
        pub, subs = _start(lab, rate, interval, "--hwm", str(hwm))
        sub = subs[0]
        sub.proc.signal(signal.SIGSTOP)
        time.sleep(seconds)  # stopped this long
        sub.proc.signal(signal.SIGCONT)
        resumed = time.time()
        until(lambda: sub.record.poll().caught_up(resumed) is not None, 60, "recovery")
        sent = _finish(pub, subs, interval)
        return [_row(f"subscriber SIGSTOP {seconds:g} s at {rate:,} msg/s (hwm {hwm:,}, "
                     f"{int(seconds * rate):,} messages past it)", sub, sent,
                     sub.record.caught_up(resumed))]


def beyond_the_interval(seconds: float = 8.0, interval: float = 3.0,
                        rate: int = 2000) -> list[RepairRow]:
    """A partition longer than the interval: what cannot be repaired is counted, exactly."""
    rows = partition(seconds, interval, rate)
    rows[0].note = "unrepairable must equal sent - delivered"
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tests.netns_repair")
    parser.add_argument("--long", action="store_true", help="add the 30 s partition")
    args = parser.parse_args(argv)
    print(HEADER, flush=True)
    runs = [lambda: partition(3, 60), lambda: proxy_restart("subscriber's"),
            lambda: proxy_restart("publisher's"), stopped_subscriber, beyond_the_interval]
    if args.long:
        runs.insert(1, lambda: partition(30, 60))
    for run in runs:
        for row in run():
            print(row.markdown(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
