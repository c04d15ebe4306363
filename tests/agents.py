"""Child-process roles for the integration tests, and the test-side handles that drive them.

Run as ``python tests/agents.py ROLE ...`` (or ``python -m tests.agents ROLE ...``):

* ``subscribe`` — a fan-out :class:`zbus.Subscriber`;
* ``worker`` — a :class:`zbus.PoolMember` of ``--pool``;
* ``publish`` — a publisher of ``--count`` messages, or, with ``--until-stop``, a paced stream
  that runs until told to stop.

Protocol with the test (kept tiny so that it cannot be the thing under test):

* a consumer prints ``READY`` on stdout once its ``ready()`` returned, i.e. once its
  subscription or pool connection is live end to end;
* every delivery is forwarded to the test's collector (a PULL socket the test binds) as a
  msgpack map ``{"kind": "seen", "name": NAME, "items": [[publisher_id, sequence, key], ...]}``,
  in batches so that forwarding stays cheaper than receiving. One agent's batches travel one
  ZeroMQ pipe, so the collector sees them in the agent's receive order;
* a line ``stop`` on stdin (or stdin closing, e.g. because the test died) makes the agent send
  ``{"kind": "stats", "name": NAME, "stats": ConsumerStats.as_dict(), ...}`` and exit 0;
* a publisher prints ``DONE <first> <last> <seconds> <timeouts>`` when it has finished.

The agents own every socket they make, from their main thread; the stdin reader thread only
sets an Event.

tests/reliability_agents.py and tests/federation_agents.py build their roles from the pieces
here: :func:`agent_parser`, :func:`_watch_stdin`, :func:`_dispatcher`, :class:`ConsumerChild`
(with its :class:`Forwarder`) and :func:`send_retrying`, and :class:`Agent` for the test side.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgpack
import zmq

import zbus

AGENTS = Path(__file__).resolve()
BATCH = 256
READY = "READY"


# -- the child side ---------------------------------------------------------------------------


def _watch_stdin(stop: threading.Event) -> None:
    """Set ``stop`` on a ``stop`` line or on EOF (the parent went away)."""

    def read() -> None:
        for line in sys.stdin:
            if line.strip() == "stop":
                break
        stop.set()

    threading.Thread(target=read, name="stdin", daemon=True).start()


def _dispatcher(bindings: Sequence[str],
                handler: Callable[[zbus.Delivery], None] = lambda delivery: None,
                ) -> zbus.Dispatcher:
    dispatcher = zbus.Dispatcher()
    for binding in bindings:
        exchange, _, pattern = binding.partition("/")
        dispatcher.bind(exchange, pattern, handler)
    return dispatcher


class Forwarder:
    """The child's PUSH socket to the test's collector, with the batch not yet sent."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str, name: str) -> None:
        self.name = name
        self.sock = ctx.socket(zmq.PUSH)
        # Bounded linger, long enough for the final stats message to reach the test.
        self.sock.setsockopt(zmq.LINGER, 5000)
        self.sock.connect(endpoint)
        self.items: list[list[Any]] = []

    def add(self, delivery: zbus.Delivery) -> None:
        self.items.append([delivery.publisher_id, delivery.sequence, delivery.routing_key])
        if len(self.items) >= BATCH:
            self.flush()

    def flush(self) -> None:
        if self.items:
            self.sock.send(msgpack.packb({"kind": "seen", "name": self.name,
                                          "items": self.items}))
            self.items.clear()

    def send_stats(self, stats: dict[str, Any], **extra: Any) -> None:
        self.sock.send(msgpack.packb({"kind": "stats", "name": self.name, "stats": stats,
                                      **extra}))


class ConsumerChild:
    """A consumer role's plumbing: the stdin stop watch, a context, the forwarder to the
    collector and a connection on it; :meth:`forward` is the receive loop, :meth:`finish`
    the final stats and the teardown."""

    def __init__(self, args: argparse.Namespace, settings: zbus.Settings | None = None) -> None:
        self.key = bytes.fromhex(args.key)
        self.stop = threading.Event()
        _watch_stdin(self.stop)
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.forwarder = Forwarder(self.ctx, args.collector, args.name)
        self.conn = zbus.Connection(args.run_dir, settings=settings, context=self.ctx)

    def forward(
        self, consumer: zbus.Subscriber | zbus.PoolMember, *, count_only: bool = False,
        expect: int = 0, each_poll: Callable[[], None] | None = None,
    ) -> tuple[float, float]:
        """Receive until ``stop`` (or the ``expect``-th delivery), forwarding each delivery
        unless ``count_only``; ``each_poll`` runs after every receive. Returns the times of
        the first and the last delivery (0.0 if none came)."""
        first = last = 0.0
        got = 0
        while not self.stop.is_set():
            delivery = consumer.receive(timeout=0.05)
            if each_poll is not None:
                each_poll()
            if delivery is None:
                self.forwarder.flush()
                continue
            last = time.perf_counter()
            if not first:
                first = last
            got += 1
            if got == expect:
                self.stop.set()  # throughput runs: stop after the last expected message
            if not count_only:
                self.forwarder.add(delivery)
        self.forwarder.flush()
        return first, last

    def finish(self, consumer: zbus.Subscriber | zbus.PoolMember, stats: dict[str, Any],
               **extra: Any) -> int:
        """Send the final ``stats`` and close everything; the role's exit status."""
        self.forwarder.send_stats(stats, **extra)
        consumer.close()
        self.conn.close()
        self.forwarder.sock.close()
        self.ctx.term()
        return 0


def send_retrying(conn: zbus.Connection, frames: list[bytes],
                  give_up: Callable[[], bool]) -> int:
    """Send ``frames``, resending the same signed frames on each zbus.Timeout (the proxy is
    away, e.g. a restart test: the publisher itself loses nothing, so every gap the consumers
    count is the proxy's) until sent or ``give_up()``; returns the number of timeouts."""
    timeouts = 0
    while True:
        try:
            conn.send_frames(frames)
            return timeouts
        except zbus.Timeout:
            timeouts += 1
            if give_up():
                return timeouts


def _consume(args: argparse.Namespace) -> int:
    child = ConsumerChild(args, zbus.Settings())
    consumer: zbus.Subscriber | zbus.PoolMember
    if args.role == "worker":
        consumer = child.conn.join_pool(args.pool, _dispatcher(args.bind), child.key)
    else:
        consumer = child.conn.subscribe(_dispatcher(args.bind), child.key)
    consumer.ready(timeout=20.0)
    print(READY, flush=True)
    first, last = child.forward(consumer, count_only=args.count_only, expect=args.expect)
    return child.finish(consumer, consumer.stats.as_dict(), first=first, last=last)


def _publish(args: argparse.Namespace) -> int:
    key = bytes.fromhex(args.key)
    stop = threading.Event()
    _watch_stdin(stop)
    settings = zbus.Settings(send_timeout=args.send_timeout)
    factory = zbus.MessageFactory(key, args.publisher_id)
    timeouts = 0
    with zbus.Connection(args.run_dir, settings=settings) as conn:
        print(READY, flush=True)
        start = time.perf_counter()
        sent = 0
        while (sent < args.count if not args.until_stop else not stop.is_set()):
            frames = factory.frames(args.exchange, args.routing_key, {"n": sent})
            timeouts += send_retrying(conn, frames,
                                      lambda: stop.is_set() and args.until_stop)
            sent += 1
            if args.interval:
                time.sleep(args.interval)  # pacing, not synchronisation
        # Everything queued must have reached the proxy before this process may exit.
        conn.flush(timeout=60)
        elapsed = time.perf_counter() - start
    print(f"DONE 1 {sent} {elapsed:.6f} {timeouts}", flush=True)
    return 0


def agent_parser(prog: str, roles: list[str], *,
                 collector_required: bool = False) -> argparse.ArgumentParser:
    """The options every agent program takes; each adds those of its own roles."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("role", choices=roles)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--key", required=True, help="signing key, hex")
    parser.add_argument("--name", default="agent")
    parser.add_argument("--collector", required=collector_required,
                        help="endpoint of the test's PULL socket")
    parser.add_argument("--bind", action="append", default=[], help="exchange/pattern")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = agent_parser("agents", ["subscribe", "worker", "publish"])
    parser.add_argument("--pool")
    parser.add_argument("--count-only", action="store_true",
                        help="forward nothing, only the final stats (throughput runs)")
    parser.add_argument("--expect", type=int, default=0,
                        help="stop by itself after this many deliveries (0: on 'stop')")
    parser.add_argument("--publisher-id", default="agent-publisher")
    parser.add_argument("--exchange", default="notifications")
    parser.add_argument("--routing-key", default="compute.instance.create.end")
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--until-stop", action="store_true")
    parser.add_argument("--interval", type=float, default=0.0)
    parser.add_argument("--send-timeout", type=float, default=1.0)
    args = parser.parse_args(argv)
    if args.role == "publish":
        return _publish(args)
    return _consume(args)


# -- the test side ----------------------------------------------------------------------------


class Agent:
    """One agent child process. ``close`` always ends it (stop, then kill).

    A subclass runs the roles of another program by overriding :attr:`program` (the
    arguments to the interpreter before the role) and, if it needs one, :meth:`env`.
    """

    program: tuple[str, ...] = (str(AGENTS),)

    def __init__(self, run_dir: Path, role: str, *args: str, name: str = "agent") -> None:
        self.name = name
        self.log = run_dir / f"agent-{name}.log"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, *self.program, role, "--run-dir", str(run_dir), "--name", name,
                 *args],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=self.env(),
            )
        self.lines: list[str] = []

    def env(self) -> dict[str, str] | None:
        """The child's environment (None: this process's)."""
        return None

    def readline(self, timeout: float) -> str:
        """The next stdout line; raises if none comes within ``timeout`` or the agent died."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline().decode() if ready else ""
        if not line:
            raise AssertionError(
                f"agent {self.name} printed nothing within {timeout:g}s "
                f"(exit {self.proc.poll()}): {self.log.read_text()[-2000:]}"
            )
        self.lines.append(line.rstrip("\n"))
        return self.lines[-1]

    def wait_ready(self, timeout: float = 20.0) -> None:
        line = self.readline(timeout)
        assert line == READY, f"agent {self.name}: expected READY, got {line!r}"

    def tell_stop(self) -> None:
        assert self.proc.stdin is not None
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(b"stop\n")
                self.proc.stdin.flush()
            except BrokenPipeError:
                pass

    def wait(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        """End the process whatever state it is in (never leaves it behind)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)  # a SIGSTOPped agent must hear "stop"
            self.tell_stop()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


class Collector:
    """The test's PULL socket that agents report to (owned by the test's thread)."""

    def __init__(self, run_dir: Path) -> None:
        # Not '*.sock': the proxy clears those from its run directory when it starts.
        self.endpoint = f"ipc://{run_dir}/collector.ipc"
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PULL)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(self.endpoint)
        self.seen: dict[str, list[tuple[str, int, str]]] = defaultdict(list)
        self.stats: dict[str, dict[str, Any]] = {}

    def pump(self, timeout: float) -> bool:
        """Take in whatever arrives within ``timeout``; True if anything came."""
        got = False
        while self.sock.poll(int(timeout * 1000)):
            report = msgpack.unpackb(self.sock.recv(), raw=False)
            got = True
            if report["kind"] == "seen":
                self.seen[report["name"]].extend(tuple(item) for item in report["items"])
            else:
                self.stats[report["name"]] = report
            timeout = 0
        return got

    def until(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                counts = {name: len(items) for name, items in self.seen.items()}
                raise AssertionError(f"timed out waiting for {what}; seen so far: {counts}")
            self.pump(min(left, 0.1))

    def sequences(self, name: str) -> list[int]:
        return [seq for _, seq, _ in self.seen[name]]

    def stop_all(self, agents: Sequence[Agent], timeout: float = 15.0) -> None:
        """Tell ``agents`` to stop and collect each one's final stats."""
        for agent in agents:
            agent.tell_stop()
        names = [agent.name for agent in agents]
        self.until(lambda: all(n in self.stats for n in names), timeout, f"stats of {names}")
        for agent in agents:
            assert agent.wait(10) == 0, agent.log.read_text()[-2000:]

    def multiset(self, names: Sequence[str]) -> Counter[tuple[str, int]]:
        return Counter((pub, seq) for n in names for pub, seq, _ in self.seen[n])

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
