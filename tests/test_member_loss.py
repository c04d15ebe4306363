"""An at-least-once pool finds a dead member at once, whatever the rate (docs/RELIABILITY.md,
"At-least-once pools").

A member SIGKILLed with its window full is sent nothing more, so a failed send cannot reveal
it, and its silence shows only at the proxy's heartbeat timeout. Its ipc connection closes
at once, though: the pool's ROUTER monitor reports that, and a send to each member finds the
one gone. Here the timeout is 30 s, so only that path can pass the test. The proxy, the
members and the publisher are separate processes; members write one line per handled
message (the payload's sequence number, before the ack), so the files are the record.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

import zbus

from .agents import Agent
from .conftest import ProxyProcess, Spawn, spawner
from .reliability_agents import RAgent
from .test_at_least_once import BINDING, pool_stats, wait_for

pytestmark = pytest.mark.timeout(120)

MEMBER_TIMEOUT = 30.0  # the proxy's heartbeat timeout: far beyond what the test waits
COUNT = 4000
RATE = 2000
WINDOW = 50

MEMBER = r"""
import json, os, sys, threading, time
from argparse import ArgumentParser
import zbus
parser = ArgumentParser()
for option in ("role", "--run-dir", "--name", "--key", "--out", "--window", "--delay"):
    parser.add_argument(option)
args = parser.parse_args()
fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
def handle(delivery):
    os.write(fd, f"{delivery.payload['n']}\n".encode())  # before the ack
    time.sleep(float(args.delay))  # slower than the stream: the window stays full
dispatcher = zbus.Dispatcher()
dispatcher.bind("notifications", "compute.#", handle)
settings = zbus.Settings(heartbeat_ivl=0.2, heartbeat_timeout=1.0)
conn = zbus.Connection(args.run_dir, settings=settings)
member = conn.join_reliable_pool("billing", dispatcher, bytes.fromhex(args.key),
                                 window=int(args.window))
member.ready(timeout=20.0)
print("READY", flush=True)
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
while not stop.is_set():
    member.process(timeout=0.05)
member.close()
print(json.dumps(member.counters()), flush=True)
conn.close()
"""


class Member(Agent):
    program = ("-c", MEMBER)


@pytest.fixture
def slow_timeout_proxy(run_dir: Path) -> Any:
    proxy = ProxyProcess(run_dir, "--heartbeat-ivl", "0.2",
                         "--heartbeat-timeout", str(MEMBER_TIMEOUT)).start()
    try:
        yield proxy
    finally:
        proxy.stop()


def handled(path: Path) -> list[int]:
    return [int(n) for n in path.read_text().split()] if path.exists() else []


def test_a_killed_members_window_is_redelivered_at_once(
    slow_timeout_proxy: ProxyProcess, run_dir: Path, key: bytes, agents: list[Agent]
) -> None:
    """Two members, a publisher at 2k msg/s; one member is SIGKILLed mid-stream with its
    window full. The pool counts it lost and redelivers its window within seconds (the
    member timeout is 30 s), and every published sequence number is handled."""
    with zbus.Connection(run_dir) as conn:
        assert conn.declare_reliable_pool("billing", [BINDING]) is True
    start_member = spawner(Member, run_dir, key, agents)
    outs = [run_dir / "a.out", run_dir / "b.out"]
    a, b = (start_member("member", name, "--out", str(out), "--window", str(WINDOW),
                         "--delay", "0.001") for name, out in zip("ab", outs, strict=True))
    for member in (a, b):
        member.wait_ready()
    publish: Spawn = spawner(RAgent, run_dir, key, agents)
    publisher = publish("publish", "pub", "--rate", str(RATE), "--count", str(COUNT),
                        "--send-timeout", "10")
    publisher.wait_ready()

    def windows_full() -> bool:
        members = pool_stats(run_dir)["members"]
        return len(members) == 2 and all(m["in_flight"] == WINDOW for m in members.values())

    wait_for(lambda: len(handled(outs[0])) >= 300 and windows_full(), 30,
             "both members busy with full windows")
    before = pool_stats(run_dir)
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(10)
    killed = time.monotonic()
    # A third of the member timeout: only the disconnect can get the pool there in time.
    wait_for(lambda: pool_stats(run_dir)["members_lost"] == 1, MEMBER_TIMEOUT / 3,
             "the pool to notice the killed member")
    noticed = time.monotonic() - killed
    stats = pool_stats(run_dir)
    assert stats["redelivered"] >= before["redelivered"] + 1

    assert publisher.readline(60).startswith(f"DONE {COUNT} ")
    wait_for(lambda: pool_stats(run_dir)["acked"] == COUNT, 60, "every message acked")
    b.tell_stop()
    counters = json.loads(b.readline(15))
    assert b.wait(15) == 0

    seen = handled(outs[0]) + handled(outs[1])
    assert set(seen) == set(range(COUNT))  # every sequence number handled at least once
    stats = pool_stats(run_dir)
    assert stats["accepted"] == COUNT and stats["overflow"] == 0
    assert stats["dead_lettered"] == 0 and stats["members_lost"] == 1
    # What A held went out again, at most its window; nothing else was redelivered.
    assert 0 < stats["redelivered"] <= WINDOW
    assert counters["rejected"] == {}, counters  # none refused (as a replay, say)
    print(f"\nFAULT | at-least-once member SIGKILL, window {WINDOW} full, {RATE}/s | "
          f"sent {COUNT} | handled {len(set(seen))} | redelivered {stats['redelivered']} | "
          f"noticed {noticed:.3f}s (member timeout {MEMBER_TIMEOUT:g}s)")
