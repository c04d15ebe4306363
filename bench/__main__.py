"""``python -m bench``: run the suite, print the table, optionally write JSON and a chart."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from typing import Any

import zmq

import zbus

from . import _peers
from ._report import plot, table, write_json
from ._scenarios import Config, all_scenarios, describe, run_scenario, trial_count
from ._util import Progress


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="zbus throughput, latency and CPU per message against plain pyzmq "
                    "through zmq.proxy, raw pyzmq of zbus's shape through zbus's proxy, "
                    "NATS and RabbitMQ, measured as ratios in one run.",
    )
    p.add_argument("--quick", action="store_true",
                   help="smoke run (~30 s): 1 repeat, 20,000 messages a trial")
    p.add_argument("--repeat", type=int, help="repeats per variant, median reported (3)")
    p.add_argument("--count", type=int,
                   help="measured messages per throughput trial (300000; --quick 20000)")
    p.add_argument("--peer-count", type=int,
                   help="measured messages per RabbitMQ trial (100000, at most --count)")
    p.add_argument("--latency-duration", type=float,
                   help="measured seconds per latency trial (3.0)")
    p.add_argument("--sizes", default="100",
                   help="payload sizes in bytes, comma-separated (100)")
    p.add_argument("--all", action="store_true",
                   help="also the older scenarios (pool-4, publish, batch, backends, tcp, "
                        "reliable-pool-2, latency-1k/10k); see --list --all")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help="run scenarios whose name starts with NAME (repeatable, any "
                        "scenario, --all or not), e.g. --only fanout --only latency")
    p.add_argument("--batch", type=int, default=100, help="messages per send_many (100)")
    p.add_argument("--no-peers", action="store_true", help="skip RabbitMQ and NATS")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="draw a chart (needs matplotlib)")
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quick = args.quick
    sizes = [int(s) for s in args.sizes.split(",")]
    count = args.count or (20_000 if quick else 300_000)
    cfg = Config(
        count=count,
        peer_count=min(count, args.peer_count or 100_000),
        latency_duration=args.latency_duration or (1.0 if quick else 3.0),
        repeat=args.repeat or (1 if quick else 3),
        warm=1000 if quick else 2000,
        batch=args.batch,
        peers=not args.no_peers,
    )
    scenarios = [sc for sc in all_scenarios(sizes)
                 if any(sc.name.startswith(o) for o in args.only)
                 or (not args.only and (sc.headline or args.all))]
    if args.list:
        for sc in scenarios:
            print(f"{sc.label:22} {sc.what}")
        return 0
    if not scenarios:
        print("no scenario matches --only", file=sys.stderr)
        return 2
    peers = _peers.available() if cfg.peers else {}
    for name, why in peers.items():
        if why is not None:
            print(f"skipping {name}: {why}", file=sys.stderr)
    key = zbus.generate_key()
    progress = Progress(trial_count(scenarios, cfg, peers), quiet=args.quiet)
    started = time.time()
    rows: list[dict[str, Any]] = []
    try:
        for sc in scenarios:
            rows.append(run_scenario(sc, cfg, peers, key, progress))
    except KeyboardInterrupt:
        progress.note("interrupted: reporting what finished")
    finally:
        progress.close()
    load = os.getloadavg()
    meta = {
        "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        "python": platform.python_version(),
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "zbus": zbus.__version__,
        "cpus": os.cpu_count(),
        "loadavg_at_end": [round(x, 2) for x in load],
        "peers_skipped": {k: v for k, v in peers.items() if v is not None},
        "scenarios": [describe(sc) for sc in scenarios],
    }
    print(table(rows))
    print(f"\n{meta['command']} -- {meta['seconds']:.0f}s, {meta['cpus']} CPUs, load average "
          f"{load[0]:.1f} at the end; python {meta['python']}, pyzmq {meta['pyzmq']}, "
          f"libzmq {meta['libzmq']}")
    lost = [r for r in rows if r["lost"]]
    if lost:
        print("LOSS: zbus lost messages in " + ", ".join(
            f"{r['scenario']} {r['size']} B ({r['lost']})" for r in lost))
    if args.json:
        write_json(args.json, meta, rows)
    if args.plot:
        why = plot(args.plot, rows, f"zbus bench ({meta['started']}, {meta['cpus']} CPUs)")
        if why:
            print(why, file=sys.stderr)
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
