"""``python -m bench.paced``: what smart batching costs a publisher that paces itself.

A publisher that sleeps between sends is not busy, but a sleep that overshoots makes it catch
up with a few sends back to back; those would be gathered and handed to the flusher thread,
a thread wake-up for one or two messages. This measures the publishing process's CPU per
message (``getrusage``: all its threads) at paced rates, with smart batching (the default)
and without (``Settings(batch_bytes=0)``), against a real proxy. The difference is the cost
of batching where it cannot pay (docs/GUIDE.md, "Batches"; zbus._connection.SMALL_BATCH).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import zbus

KEY = b"k" * 32


def run(run_dir: str, rate: int, seconds: float, batch_bytes: int) -> tuple[float, int, int]:
    """(CPU us per message, envelopes sent, messages sent) of one paced run."""
    settings = zbus.Settings(batch_bytes=batch_bytes)
    with zbus.Connection(run_dir, settings=settings) as conn:
        pub = zbus.Publisher(conn.exchange("bench"), zbus.MessageFactory(KEY, "paced"))
        body = b"x" * 100
        count = int(rate * seconds)
        before = resource.getrusage(resource.RUSAGE_SELF)
        due = time.perf_counter()
        for _ in range(count):
            now = time.perf_counter()
            if now < due:
                time.sleep(due - now)
            pub.send("bench.paced", body)
            due += 1 / rate
        conn.flush()
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        return cpu / count * 1e6, conn.envelopes_sent, conn.messages_sent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="5000,15000,25000,40000")
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    run_dir = tempfile.mkdtemp(prefix="zbp-", dir="/tmp")
    proxy = subprocess.Popen([sys.executable, "-m", "zbus_proxy", "--run-dir", run_dir],
                             stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        probe = zbus.Connection(run_dir, require_proxy=False)
        deadline = time.monotonic() + 15
        while True:
            try:
                probe.control.request("ping", 0.5)
                break
            except zbus.ZbusError:
                if time.monotonic() > deadline or proxy.poll() is not None:
                    raise
        probe.close()
        print("| msg/s | batching | publisher CPU us/msg | envelopes / messages |")
        print("|---:|---|---:|---:|")
        for rate in (int(r) for r in args.rates.split(",")):
            for label, batch_bytes in (("on", zbus.Settings().batch_bytes), ("off", 0)):
                cpu, envelopes, messages = run(run_dir, rate, args.seconds, batch_bytes)
                print(f"| {rate:,} | {label} | {cpu:.1f} | {envelopes:,} / {messages:,} |",
                      flush=True)
    finally:
        proxy.terminate()
        proxy.wait(10)
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
