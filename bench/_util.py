"""Shared pieces of the bench: payloads, the log-bucket histogram, process orchestration.

Every trial runs its publisher and consumers in separate processes started with the
``spawn`` method (no fork after a ZeroMQ context exists). The parent only coordinates them
through a queue and two events; it never touches a message.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import queue
import socket
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BenchError",
    "Counter",
    "LogHistogram",
    "Progress",
    "StopWhen",
    "Trial",
    "WARM",
    "MEASURE",
    "median",
    "cpu_seconds",
    "payload_bytes",
    "publish_loop",
    "publish_loop_async",
    "reachable",
    "reporting_failure",
    "run_trial",
    "wait_async",
]

WARM = 0x57  # b"W": first payload byte of a warm-up message
MEASURE = 0x4D  # b"M": first payload byte of a measured message
SPAWN = mp.get_context("spawn")
perf = time.perf_counter


class BenchError(RuntimeError):
    """A trial could not run (a process failed to start, hung, or crashed)."""


def payload_bytes(size: int, marker: int) -> bytes:
    """``size`` bytes: the marker byte, then filler."""
    return bytes((marker,)) + b"x" * (size - 1)


def median(values: Iterable[float]) -> float:
    vals = list(values)
    return statistics.median(vals) if vals else 0.0


def cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU seconds of process ``pid`` (all its threads: libzmq's I/O threads
    too), from ``/proc/<pid>/stat``; 0.0 where there is no such file (not Linux, or gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
    except OSError:
        return 0.0
    # After the ")" that ends the command name: state is field 3, utime 14 and stime 15.
    return (int(fields[11]) + int(fields[12])) / _TICKS


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def reachable(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass
class Counter:
    """What one consumer saw: warm-up and measured messages, and the measured window."""

    warm: int = 0
    measured: int = 0
    first: float = 0.0
    last: float = 0.0

    def hit(self, marker: int, now: float) -> None:
        if marker == MEASURE:
            if not self.measured:
                self.first = now
            self.measured += 1
            self.last = now
        else:
            self.warm += 1

    @property
    def total(self) -> int:
        return self.warm + self.measured

    def as_dict(self) -> dict[str, Any]:
        return {"warm": self.warm, "measured": self.measured, "first": self.first,
                "last": self.last}


class StopWhen:
    """When a consumer ends: once the publisher is ``done`` (and the consumer idle), or once
    ``timeout`` seconds from now have passed whatever happens."""

    def __init__(self, done: Any, timeout: float) -> None:
        self.done = done
        self.stop_at = time.monotonic() + timeout

    def __call__(self, idle: bool = True) -> bool:
        return (idle and self.done.is_set()) or time.monotonic() > self.stop_at


def _send_report(warm: int, sent: int, t0: float) -> dict[str, Any]:
    """``first_send`` is ``perf_counter()`` (CLOCK_MONOTONIC, one clock for every process of
    the host) at the first measured send: a trial's rate runs from it to the last receive."""
    elapsed = perf() - t0
    return {"sent": warm + sent, "measured_sent": sent, "send_rate": sent / elapsed,
            "first_send": t0}


def publish_loop(args: dict[str, Any], send_warm: Callable[[int], None],
                 burst: Callable[[int], None], send_one: Any = None,
                 send_batch: Any = None) -> dict[str, Any]:
    """Warm up, then send ``count`` measured messages as fast as possible (or, with ``rate``,
    paced at ``rate`` for ``duration`` seconds).

    ``burst(n)`` sends ``n`` measured messages in a tight loop (so the loop's own overhead
    is the same few bytecodes for zbus and raw), ``send_one()`` one timestamped message
    (``rate`` runs), ``send_batch()`` one batch of ``batch`` messages (``batch`` runs).
    ``count`` is rounded up to a multiple of 100 (of ``batch`` for batches).
    """
    warm = args["warm"]
    send_warm(warm)
    rate = args.get("rate")
    if rate:
        time.sleep(0.2)  # let the warm-up burst drain before the paced, timed messages
    sent = 0
    t0 = perf()
    end = t0 + args["duration"]
    if rate:
        interval = 1.0 / rate
        due = t0
        while due < end:
            now = perf()
            if now < due:
                time.sleep(due - now)  # sleeps at least the timer slack; then catch up
                continue
            send_one()
            sent += 1
            due += interval
    else:
        batch = args.get("batch") or 0
        count = args["count"]
        if batch:
            while sent < count:
                send_batch()
                sent += batch
        else:
            while sent < count:
                burst(100)
                sent += 100
    return _send_report(warm, sent, t0)


async def publish_loop_async(
    args: dict[str, Any], send_warm: Callable[[int], Awaitable[None]],
    burst: Callable[[int], Awaitable[None]],
    flush: Callable[[], Awaitable[None]] | None = None,
) -> dict[str, Any]:
    """:func:`publish_loop` for an event loop, ``count`` messages in bursts of 100 only;
    ``flush()``, if given, is awaited before the clock stops."""
    await send_warm(args["warm"])
    sent = 0
    t0 = perf()
    while sent < args["count"]:
        await burst(100)
        sent += 100
    if flush is not None:
        await flush()
    return _send_report(args["warm"], sent, t0)


async def wait_async(event: Any) -> None:
    """Wait for a multiprocessing ``event`` without blocking the event loop."""
    while not event.is_set():
        await asyncio.sleep(0.005)


class LogHistogram:
    """An HDR-style histogram of nanosecond values in log buckets (32 per power of two).

    Values below 64 ns are exact; above, each bucket spans at most 1/32 (~3%) of its value.
    Percentiles report the bucket's highest value, as HdrHistogram does.
    """

    SUB = 32

    def __init__(self, counts: dict[int, int] | None = None) -> None:
        self.counts: dict[int, int] = dict(counts or {})
        self.total = sum(self.counts.values())
        self.max = max((self.upper(b) for b in self.counts), default=0)

    @classmethod
    def bucket(cls, value: int) -> int:
        if value < 2 * cls.SUB:
            return max(value, 0)
        shift = value.bit_length() - 6  # keeps 6 significant bits: mantissa in [32, 64)
        return (shift + 1) * cls.SUB + (value >> shift) - cls.SUB

    @classmethod
    def upper(cls, bucket: int) -> int:
        if bucket < 2 * cls.SUB:
            return bucket
        shift = bucket // cls.SUB - 1
        mant = bucket % cls.SUB + cls.SUB
        return ((mant + 1) << shift) - 1

    def record(self, value: int) -> None:
        b = self.bucket(value)
        self.counts[b] = self.counts.get(b, 0) + 1
        self.total += 1

    def merge(self, other: LogHistogram) -> None:
        for b, n in other.counts.items():
            self.counts[b] = self.counts.get(b, 0) + n
        self.total += other.total
        self.max = max(self.max, other.max)

    def percentile(self, q: float) -> int:
        """The value at or below which a share ``q`` (0..100) of the values lie."""
        if not self.total:
            return 0
        rank = max(1, int(self.total * q / 100 + 0.999999))
        seen = 0
        for b in sorted(self.counts):
            seen += self.counts[b]
            if seen >= rank:
                return self.upper(b)
        return self.upper(max(self.counts))


@dataclass
class Trial:
    """One run of one publisher and its consumers; what each process reported, and the CPU
    seconds the proxies it went through spent while it ran."""

    publisher: dict[str, Any]
    consumers: list[dict[str, Any]] = field(default_factory=list)
    proxy_cpu: float = 0.0

    @property
    def sent(self) -> int:
        return int(self.publisher["sent"])

    @property
    def received(self) -> int:
        return sum(c["warm"] + c["measured"] for c in self.consumers)

    def rate(self) -> float:
        """Measured messages received per second, from the first measured send to the last
        measured receive of any consumer (so a consumer that catches up after the publisher
        is done is timed until it has); every copy counts (fan-out to 4: four per message)."""
        got = [c for c in self.consumers if c["measured"] > 1]
        if not got:
            return 0.0
        start = self.publisher.get("first_send") or min(c["first"] for c in got)
        window = max(c["last"] for c in got) - start
        return sum(c["measured"] for c in got) / window if window > 0 else 0.0

    def cpu_us(self) -> dict[str, float]:
        """CPU microseconds per message, by process: the publisher's per message sent, the
        proxies' per message sent, the consumers' (all of them) per message sent, and the
        total. Measured from each process's ready report (the proxies': from the release)
        to its result, so start-up is not counted; warm-up messages are, in both terms."""
        sent = max(self.sent, 1)
        pub = self.publisher.get("cpu_s", 0.0) / sent * 1e6
        con = sum(c.get("cpu_s", 0.0) for c in self.consumers) / sent * 1e6
        proxy = self.proxy_cpu / sent * 1e6
        return {"publisher": pub, "proxy": proxy, "consumers": con,
                "total": pub + proxy + con}


Target = Callable[..., None]


class _Reports:
    """The results queue as a worker sees it: ``ready`` starts its CPU clock, ``result``
    adds the CPU seconds spent since (``cpu_s``)."""

    def __init__(self, results: Any) -> None:
        self._results = results
        self._since = cpu_seconds()

    def put(self, item: tuple[str, int, Any]) -> None:
        kind, index, data = item
        if kind == "ready":
            self._since = cpu_seconds()
        elif kind == "result" and isinstance(data, dict):
            data = {**data, "cpu_s": cpu_seconds() - self._since}
        self._results.put((kind, index, data))


def _worker(target: Target, args: dict[str, Any], index: int, results: Any, go: Any,
            done: Any) -> None:
    target(args, index, _Reports(results), go, done)


def run_trial(
    publisher: tuple[Target, dict[str, Any]],
    consumers: list[tuple[Target, dict[str, Any]]],
    *,
    timeout: float,
    proxies: Iterable[int] = (),
) -> Trial:
    """Start consumers and publisher as processes, release the publisher once all are ready.

    A worker is ``target(args, index, results_queue, go_event, done_event)``; it puts
    ``("ready", index, None)`` once set up and ``("result", index, dict)`` at the end. The
    publisher is index -1: it waits for ``go``, publishes, reports, then sets ``done``.
    ``proxies`` are the pids of the proxy processes in the path, whose CPU is sampled at the
    release and once every result is in.
    """
    results: Any = SPAWN.Queue()
    go = SPAWN.Event()
    done = SPAWN.Event()
    procs: list[Any] = []
    watched = list(proxies)
    try:
        for index, (target, args) in [(-1, publisher), *enumerate(consumers)]:
            proc = SPAWN.Process(target=_worker, args=(target, args, index, results, go, done),
                                 daemon=True, name=f"bench-{index}")
            proc.start()
            procs.append(proc)
        deadline = time.monotonic() + timeout
        ready: set[int] = set()
        reports: dict[int, dict[str, Any]] = {}

        def collect(until: Callable[[], bool], what: str) -> None:
            while not until():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(f"timed out waiting for {what}")
                try:
                    kind, index, data = results.get(timeout=min(left, 0.5))
                except queue.Empty:
                    dead = [p for p in procs if p.exitcode not in (None, 0)]
                    if dead:
                        raise BenchError(
                            f"{dead[0].name} exited with {dead[0].exitcode} waiting for {what}"
                        ) from None
                    continue
                if kind == "ready":
                    ready.add(index)
                elif kind == "result":
                    reports[index] = data
                else:
                    raise BenchError(f"worker {index} failed: {data}")

        collect(lambda: len(ready) == len(procs), "the processes to be ready")
        proxy_cpu = -sum(cpu_seconds(pid) for pid in watched)
        go.set()
        collect(lambda: len(reports) == len(procs), "the results")
        proxy_cpu += sum(cpu_seconds(pid) for pid in watched)
        for proc in procs:
            proc.join(5)
        return Trial(reports[-1], [reports[i] for i in range(len(consumers))], proxy_cpu)
    finally:
        done.set()
        for proc in procs:
            if proc.is_alive():
                proc.join(1)
            if proc.is_alive():
                proc.kill()
                proc.join(1)
        results.close()


def report_failure(results: Any, index: int, exc: BaseException) -> None:
    """For a worker's ``except``: tell the parent why, so it raises instead of timing out."""
    results.put(("error", index, f"{type(exc).__name__}: {exc}"))


@contextmanager
def reporting_failure(results: Any, index: int) -> Iterator[None]:
    """A worker's body: whatever it raises is reported to the parent (then raised on)."""
    try:
        yield
    except BaseException as exc:
        report_failure(results, index, exc)
        raise


class Progress:
    """A one-line progress indicator on stderr (plain lines when stderr is not a tty)."""

    def __init__(self, total: int, *, quiet: bool = False) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.start = time.monotonic()

    def step(self, label: str) -> None:
        self.done += 1
        if self.quiet:
            return
        width = 24
        filled = int(width * self.done / self.total)
        elapsed = time.monotonic() - self.start
        bar = "#" * filled + "." * (width - filled)
        line = f"[{bar}] {self.done:3d}/{self.total} {elapsed:5.0f}s  {label}"
        if self.tty:
            sys.stderr.write("\r\x1b[2K" + line[:150])
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def note(self, text: str) -> None:
        if self.quiet:
            return
        if self.tty:
            sys.stderr.write("\r\x1b[2K")
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty and not self.quiet:
            sys.stderr.write("\n")
            sys.stderr.flush()
