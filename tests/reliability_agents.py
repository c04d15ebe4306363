"""Child-process roles for the fault and at-least-once tests (protocol as in tests/agents.py).

Run as ``python tests/reliability_agents.py ROLE ...``:

* ``subscribe`` — a :class:`zbus.Subscriber`; forwards ``[publisher, sequence, key]`` of each
  delivery to the collector (or only its final counters with ``--count-only``), prints
  ``RESUBSCRIBED <n> <outage>`` each time its link stats prove the subscriptions live again
  after a proxy restart, and on ``stop`` sends ``{"kind": "stats", "stats": counters()}``;
  ``--bind-count N`` adds N distinct bindings ``notifications/kNNNN.x``;
* ``worker`` — a pool member (``--mode fast``: :class:`zbus.PoolMember`; ``--mode reliable``:
  :class:`zbus.ReliableMember`) that writes ``publisher sequence message-id`` to ``--out`` with
  one ``os.write`` per message *before* the ack: the kernel has the line even if this process
  is SIGKILLed right after, so the file is the exact record of what the handler did;
* ``publish`` — a paced stream (``--rate`` messages/s on a fixed schedule) until ``stop``;
  on a zbus.Timeout it resends the same signed frames, so every gap is the fabric's; prints
  ``DONE <sent> <timeouts>``.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgpack

if __name__ == "__main__":  # run as a script: make the tests package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zbus
from tests.agents import (
    READY,
    Agent,
    ConsumerChild,
    _dispatcher,
    _watch_stdin,
    agent_parser,
    send_retrying,
)

SCRIPT = Path(__file__).resolve()


def _bindings(args: argparse.Namespace) -> list[str]:
    return [*args.bind, *(f"notifications/k{i:04d}.x" for i in range(args.bind_count))]


def _subscribe(args: argparse.Namespace) -> int:
    child = ConsumerChild(args)
    sub = child.conn.subscribe(_dispatcher(_bindings(args)), child.key)
    sub.ready(timeout=30.0)
    print(READY, flush=True)
    resubscribed = 0

    def report_resubscribed() -> None:
        nonlocal resubscribed
        if sub.link.resubscribed != resubscribed:
            resubscribed = sub.link.resubscribed
            print(f"RESUBSCRIBED {resubscribed} {sub.link.last_outage:.6f}", flush=True)

    child.forward(sub, count_only=args.count_only, each_poll=report_resubscribed)
    return child.finish(sub, sub.counters())


def _worker(args: argparse.Namespace) -> int:
    key = bytes.fromhex(args.key)
    stop = threading.Event()
    _watch_stdin(stop)
    fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def handle(delivery: zbus.Delivery) -> None:
        os.write(fd, f"{delivery.publisher_id} {delivery.sequence} "
                     f"{delivery.envelope.message_id.hex()}\n".encode())
        if args.delay:
            time.sleep(args.delay)  # a slow handler: keeps messages in flight at the member

    dispatcher = _dispatcher(args.bind, handle)
    settings = zbus.Settings()
    if args.heartbeat:
        settings = zbus.Settings(heartbeat_ivl=args.heartbeat,
                                 heartbeat_timeout=5 * args.heartbeat)
    conn = zbus.Connection(args.run_dir, settings=settings)
    member: zbus.PoolMember | Any
    if args.mode == "reliable":
        member = conn.join_reliable_pool(args.pool, dispatcher, key, window=args.window)
    else:
        member = conn.join_pool(args.pool, dispatcher, key)
    member.ready(timeout=20.0)
    print(READY, flush=True)
    while not stop.is_set():
        member.process(timeout=0.05)
    handled = member.drain(timeout=10.0) if args.drain else 0
    if not args.drain:
        member.close()
    print(f"STATS {msgpack.packb(member.counters()).hex()} {handled}", flush=True)
    conn.close()
    os.close(fd)
    return 0


def _publish(args: argparse.Namespace) -> int:
    key = bytes.fromhex(args.key)
    stop = threading.Event()
    _watch_stdin(stop)
    factory = zbus.MessageFactory(key, args.publisher_id)
    timeouts = sent = 0
    settings = zbus.Settings(send_timeout=args.send_timeout)
    with zbus.Connection(args.run_dir, settings=settings) as conn:
        print(READY, flush=True)
        start = time.monotonic()
        while not stop.is_set() and (args.count == 0 or sent < args.count):
            if args.rate:
                # A fixed schedule, not a fixed sleep: the rate holds whatever a send costs.
                due = start + sent / args.rate
                if (ahead := due - time.monotonic()) > 0:
                    time.sleep(ahead)
            routing_key = args.routing_key
            if args.cycle_keys:
                routing_key = f"k{sent % args.cycle_keys:04d}.x"
            frames = factory.frames(args.exchange, routing_key, {"n": sent})
            timeouts += send_retrying(conn, frames, stop.is_set)
            sent += 1
        if args.final:
            # One message on a key every consumer has: it closes every gap before it.
            conn.send_frames(factory.frames(args.exchange, args.routing_key, {"n": sent}))
            sent += 1
        conn.flush(timeout=60)
    print(f"DONE {sent} {timeouts}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = agent_parser("reliability_agents", ["subscribe", "worker", "publish"])
    parser.add_argument("--bind-count", type=int, default=0)
    parser.add_argument("--count-only", action="store_true")
    parser.add_argument("--pool")
    parser.add_argument("--mode", choices=["fast", "reliable"], default="fast")
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--out")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--drain", action="store_true")
    parser.add_argument("--publisher-id", default="pub1")
    parser.add_argument("--exchange", default="notifications")
    parser.add_argument("--routing-key", default="compute.instance.create.end")
    parser.add_argument("--cycle-keys", type=int, default=0)
    parser.add_argument("--final", action="store_true")
    parser.add_argument("--heartbeat", type=float, default=0.0,
                        help="heartbeat interval (timeout 5x) for a worker's settings")
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--rate", type=float, default=0.0)
    parser.add_argument("--send-timeout", type=float, default=0.5)
    args = parser.parse_args(argv)
    return {"subscribe": _subscribe, "worker": _worker, "publish": _publish}[args.role](args)


class RAgent(Agent):
    """An :class:`tests.agents.Agent` running a role of this module."""

    program = (str(SCRIPT),)


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` from /proc (no psutil needed)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
