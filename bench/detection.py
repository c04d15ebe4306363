"""``python -m bench.detection``: how long zbus takes to notice two faults.

* **hung proxy**: a subscriber (threads backend, this process) on a real ``zbus-proxy``; the
  proxy is SIGSTOPped for ``--stop-for`` seconds. Measured: SIGSTOP to the subscriber's
  ``live`` turning False, SIGCONT to ``live`` True again, and ``link.last_outage``.
* **killed member**: an at-least-once pool with two member processes (window ``--window``,
  a handler of ``--delay`` s), a publisher at ``--rate`` msg/s; one member is SIGKILLed
  mid-stream. Measured: SIGKILL to the pool's ``members_lost`` and to its in-flight messages
  redelivered; then every published sequence number is checked as handled (from the
  members' own records, one line per handled message).

Every process it starts it ends; every socket is ipc under a fresh /tmp directory.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zbus

BINDING = "notifications/compute.#"
KEY = "compute.instance.create.end"


def _start_proxy(run_dir: Path, *extra: str) -> subprocess.Popen[bytes]:
    log = open(run_dir / "proxy.log", "ab")  # noqa: SIM115 -- the child keeps it
    proc = subprocess.Popen([sys.executable, "-m", "zbus_proxy", "--run-dir", str(run_dir),
                             *extra], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    with zbus.Connection(run_dir) as conn:
        deadline = time.monotonic() + 15
        while True:
            try:
                conn.control.request("ping", timeout=0.5)
                return proc
            except zbus.Timeout:
                if time.monotonic() > deadline or proc.poll() is not None:
                    proc.kill()
                    raise


def _end(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _until(done: Callable[[], bool], timeout: float, step: Callable[[], None]) -> float | None:
    """Run ``step`` until ``done()``; seconds taken, or None after ``timeout``."""
    start = time.monotonic()
    while not done():
        if time.monotonic() - start > timeout:
            return None
        step()
    return time.monotonic() - start


def hung_proxy(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    proxy = _start_proxy(run_dir)
    settings = zbus.Settings(heartbeat_ivl=args.heartbeat_ivl,
                             heartbeat_timeout=args.heartbeat_timeout)
    conn = zbus.Connection(run_dir, settings=settings)
    try:
        dispatcher = zbus.Dispatcher()
        dispatcher.bind("notifications", "#", lambda d: None)
        sub = conn.subscribe(dispatcher, zbus.generate_key())
        sub.ready()

        def step() -> None:
            sub.receive(timeout=0.01)

        os.kill(proxy.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        noticed = _until(lambda: not sub.live, args.stop_for, step)
        _until(lambda: False, args.stop_for - (time.monotonic() - stopped), step)
        os.kill(proxy.pid, signal.SIGCONT)
        back = _until(lambda: sub.live, 30, step)
        result = {"noticed_after_sigstop": noticed, "live_after_sigcont": back,
                  **{f"link.{k}": v for k, v in sub.link.as_dict().items()}}
        sub.close()
        return result
    finally:
        conn.close()
        _end(proxy)


def _member(run_dir: str, out: str, key: bytes, window: int, delay: float,
            stop: Any, ready: Any) -> None:
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def handle(delivery: zbus.Delivery) -> None:
        os.write(fd, f"{delivery.payload['n']}\n".encode())  # before the ack
        if delay:
            time.sleep(delay)

    dispatcher = zbus.Dispatcher()
    dispatcher.bind("notifications", "compute.#", handle)
    conn = zbus.Connection(run_dir)
    member = conn.join_reliable_pool("billing", dispatcher, key, window=window)
    member.ready(timeout=20)
    ready.set()
    while not stop.is_set():
        member.process(timeout=0.05)
    member.close()
    conn.close()
    print(f"member {Path(out).stem}: {member.counters()}", file=sys.stderr)


def _publisher(run_dir: str, key: bytes, count: int, rate: float) -> None:
    factory = zbus.MessageFactory(key, "pub1")
    with zbus.Connection(run_dir, settings=zbus.Settings(send_timeout=30)) as conn:
        start = time.monotonic()
        for n in range(count):
            if (ahead := start + n / rate - time.monotonic()) > 0:
                time.sleep(ahead)
            conn.send_frames(factory.frames("notifications", KEY, {"n": n}))


def killed_member(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    proxy = _start_proxy(run_dir, "--heartbeat-ivl", str(args.heartbeat_ivl),
                         "--heartbeat-timeout", str(args.pool_timeout))
    mp = multiprocessing.get_context("spawn")
    key = zbus.generate_key()
    stop = mp.Event()
    outs = [run_dir / "a.out", run_dir / "b.out"]
    members = []
    publisher = None
    conn = zbus.Connection(run_dir)
    try:
        conn.declare_reliable_pool("billing", [BINDING])
        for out in outs:
            ready = mp.Event()
            proc = mp.Process(target=_member, args=(str(run_dir), str(out), key, args.window,
                                                    args.delay, stop, ready))
            proc.start()
            members.append(proc)
            if not ready.wait(30):
                raise RuntimeError("a member did not get ready")
        publisher = mp.Process(target=_publisher,
                               args=(str(run_dir), key, args.count, args.rate))
        publisher.start()

        def pool() -> dict[str, Any]:
            stats: dict[str, Any] = conn.proxy_stats()["reliable_pools"]["billing"]
            return stats

        _until(lambda: pool()["acked"] >= args.count // 3, 60, lambda: time.sleep(0.01))
        before = pool()
        assert members[0].pid is not None
        os.kill(members[0].pid, signal.SIGKILL)
        killed = time.monotonic()
        members[0].join()
        seen: dict[str, float] = {}

        def watch() -> None:
            now, stats = time.monotonic() - killed, pool()
            if stats["members_lost"] >= 1:
                seen.setdefault("noticed", now)
            if stats["redelivered"] > before["redelivered"]:
                seen.setdefault("redelivered", now)
            time.sleep(0.005)

        _until(lambda: len(seen) == 2, args.pool_timeout * 3, watch)
        noticed, redelivered = seen.get("noticed"), seen.get("redelivered")
        publisher.join(120)
        _until(lambda: pool()["acked"] + pool()["dead_lettered"] >= pool()["accepted"]
               and pool()["in_flight"] == 0, 120, lambda: time.sleep(0.05))
        after = pool()
        stop.set()
        members[1].join(20)
        handled = [int(line) for out in outs if out.exists()
                   for line in out.read_text().split()]
        missing = set(range(args.count)) - set(handled)
        return {"noticed_after_sigkill": noticed, "redelivered_after_sigkill": redelivered,
                "sent": args.count, "handled_unique": len(set(handled)),
                "never_handled": len(missing),
                **{f"pool.{k}": after[k] for k in ("accepted", "acked", "redelivered",
                                                    "members_lost", "overflow",
                                                    "dead_lettered")}}
    finally:
        conn.close()
        stop.set()
        for proc in [*members, *([publisher] if publisher else [])]:
            if proc.is_alive():
                proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        _end(proxy)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.detection", description=__doc__)
    p.add_argument("--only", choices=["hung-proxy", "killed-member"], action="append")
    p.add_argument("--heartbeat-ivl", type=float, default=0.5,
                   help="subscriber's (and the proxy's) heartbeat interval, s")
    p.add_argument("--heartbeat-timeout", type=float, default=2.0,
                   help="the subscriber's heartbeat timeout, s")
    p.add_argument("--stop-for", type=float, default=8.0, help="SIGSTOP length, s")
    p.add_argument("--pool-timeout", type=float, default=6.0,
                   help="the proxy's heartbeat timeout (member timeout), s")
    p.add_argument("--window", type=int, default=50)
    p.add_argument("--delay", type=float, default=0.002, help="member handler time, s")
    p.add_argument("--rate", type=float, default=2000.0)
    p.add_argument("--count", type=int, default=8_000)
    args = p.parse_args(argv)
    runs = {"hung-proxy": hung_proxy, "killed-member": killed_member}
    for name in args.only or list(runs):
        run_dir = Path(tempfile.mkdtemp(prefix="zbd-", dir="/tmp"))
        try:
            result = runs[name](args, run_dir)
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)
        print(name)
        for k, v in result.items():
            print(f"  {k}: {v:.3f}" if isinstance(v, float) else f"  {k}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
