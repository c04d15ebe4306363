"""oslo.messaging notifications over zbus:// next to rabbit://, and what a shared publisher
saves a service per request (issue 17; docs/OSLO.md).

    python -m bench.oslo_notify                      # both transports, both executors
    python -m bench.oslo_notify --count 20000 --only zbus
    python -m bench.oslo_notify --per-request        # Connection per request vs shared

Each row: a listener process (``get_notification_listener``, executor ``threading`` or
``eventlet``; the eventlet one under ``monkey_patch()``) and an emitter process (one oslo
``Notifier``, ``messagingv2``, same concurrency model) on a fresh topic. The emitter sends
``--count`` notifications as fast as ``notify()`` returns; the rate is notifications
received by the listener divided by the time from the emitter's first ``notify()`` to the
listener's last receipt (the library's own overhead on both sides included). ``lost`` is
sent minus received. zbus runs against a ``zbus-proxy`` started here on a fresh run
directory; RabbitMQ is expected on 127.0.0.1:5672 (guest/guest), and its row is skipped
with a line on stderr when it is not there.

``--per-request`` measures one request's publishing cost in a service: a
``zbus.Connection`` made, used once and closed per request (the close flushes through the
proxy) against one ``zbus.SharedPublisher`` shared by every request, threads and eventlet.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

RABBIT = "rabbit://guest:guest@127.0.0.1:5672/"


# -- child roles (run in their own process) ----------------------------------------------

def _setup(executor: str) -> None:
    if executor == "eventlet":
        import eventlet

        eventlet.monkey_patch()


def _listen(url: str, topic: str, executor: str, count: int, idle: float) -> dict[str, Any]:
    import threading

    import oslo_messaging
    from oslo_config import cfg

    conf = cfg.ConfigOpts()
    conf(args=[])
    received = [0]
    last = [0.0]
    done = threading.Event()

    class Endpoint:
        def info(self, ctxt: Any, publisher_id: str, event_type: str, payload: Any,
                 metadata: Any) -> None:
            received[0] += 1
            last[0] = time.time()
            if received[0] >= count:
                done.set()

    transport = oslo_messaging.get_notification_transport(conf, url=url)
    server = oslo_messaging.get_notification_listener(
        transport, [oslo_messaging.Target(topic=topic)], [Endpoint()], executor=executor)
    server.start()
    print("READY", flush=True)
    seen = -1
    while not done.wait(idle):  # give up once nothing arrived for `idle` seconds
        if received[0] == seen:
            break
        seen = received[0]
    server.stop()
    server.wait()
    transport.cleanup()
    return {"received": received[0], "last": last[0]}


def _emit(url: str, topic: str, executor: str, count: int) -> dict[str, Any]:
    import oslo_messaging
    from oslo_config import cfg

    conf = cfg.ConfigOpts()
    conf(args=[])
    transport = oslo_messaging.get_notification_transport(conf, url=url)
    notifier = oslo_messaging.Notifier(transport, "bench.host1", driver="messagingv2",
                                       topics=[topic])
    payload = {"instance_id": "8d2a3ba4-5d25-4a3b-9f2a-1d9b6f1e7c11", "state": "active",
               "memory_mb": 2048, "host": "compute-1"}
    notifier.info({}, "compute.instance.update", payload)  # connect before the clock starts
    start = time.time()
    if executor == "eventlet":
        import eventlet

        pool = eventlet.GreenPool(100)  # requests in green threads, as eventlet.wsgi runs them
        per = (count - 1) // 100

        def request(n: int) -> None:
            for _ in range(n):
                notifier.info({}, "compute.instance.update", payload)

        for g in range(100):
            pool.spawn_n(request, per + (1 if g < (count - 1) % 100 else 0))
        pool.waitall()
    else:
        for _ in range(count - 1):
            notifier.info({}, "compute.instance.update", payload)
    emitted = time.time()
    publisher = getattr(transport._driver, "publisher", None)  # zbus's SharedPublisher
    transport.cleanup()  # zbus: sends what is queued, flushes through the proxy
    stats = publisher.stats.as_dict() if publisher is not None else None
    return {"start": start, "emitted": emitted, "closed": time.time(), "zbus": stats}


def _per_request(run_dir: str, key_hex: str, executor: str, requests: int) -> dict[str, Any]:
    import zbus

    key = bytes.fromhex(key_hex)
    conn_class: Any = zbus.Connection
    if executor == "eventlet":
        import zbus.eventlet

        conn_class = zbus.eventlet.Connection
    payload = {"event_type": "compute.instance.update", "n": 0}
    few = max(requests // 50, 20)
    t0 = time.perf_counter()
    for n in range(few):  # what a service did per request before: its own Connection
        with conn_class(run_dir) as conn:
            zbus.Publisher(conn.exchange("notifications"),
                           zbus.MessageFactory(key, f"req-{n}")).send("api.request", payload)
    per_connection = (time.perf_counter() - t0) / few
    shared = zbus.SharedPublisher(run_dir, zbus.MessageFactory(key, "api"))
    shared.send("notifications", "api.request", payload)  # the sender starts
    shared.flush()
    t0 = time.perf_counter()
    for _ in range(requests):
        shared.send("notifications", "api.request", payload)
    queued = time.perf_counter() - t0
    shared.flush()
    drained = time.perf_counter() - t0
    shared.close()
    return {"per_connection_ms": per_connection * 1000, "connections": few,
            "shared_send_ms": queued / requests * 1000,
            "shared_through_proxy_ms": drained / requests * 1000, "requests": requests,
            "stats": shared.stats.as_dict()}


def child(argv: list[str]) -> None:
    role, executor, *rest = argv
    _setup(executor)
    if role == "listen":
        url, topic, count, idle = rest
        out = _listen(url, topic, executor, int(count), float(idle))
    elif role == "emit":
        url, topic, count = rest
        out = _emit(url, topic, executor, int(count))
    else:
        run_dir, key_hex, requests = rest
        out = _per_request(run_dir, key_hex, executor, int(requests))
    print("RESULT " + json.dumps(out), flush=True)


# -- the parent --------------------------------------------------------------------------

def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-W", "ignore", "-m", "bench.oslo_notify",
                             "--child", *args], stdout=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=timeout)
    for line in out.splitlines():
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line[7:])
            return result
    raise RuntimeError(f"child exited {proc.returncode} without a result:\n{out}")


def _wait_ready(proc: subprocess.Popen[str], timeout: float) -> None:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.strip() == "READY":
            return
        if not line and proc.poll() is not None:
            raise RuntimeError("the listener exited before it was ready")
    raise RuntimeError("the listener was not ready in time")


def row(url: str, executor: str, count: int) -> dict[str, Any]:
    topic = f"bench_{uuid.uuid4().hex[:12]}"
    listener = _spawn("listen", executor, url, topic, str(count), "5")
    try:
        _wait_ready(listener, 60)
        time.sleep(0.5)  # RabbitMQ: the listener's queue bindings settle
        emitter = _spawn("emit", executor, url, topic, str(count))
        emitted = _result(emitter, 600)
        heard = _result(listener, 600)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait()
    span = heard["last"] - emitted["start"]
    return {"received": heard["received"], "lost": count - heard["received"],
            "rate": (heard["received"] - 1) / span if span > 0 else 0.0,
            "notify_rate": (count - 1) / (emitted["emitted"] - emitted["start"]),
            "zbus": emitted["zbus"]}


def _rabbit_up() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=1).close()
        return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.oslo_notify", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=20_000, help="notifications per row")
    parser.add_argument("--rabbit-count", type=int, default=None,
                        help="notifications per rabbit:// row (default: --count)")
    parser.add_argument("--only", choices=["zbus", "rabbit"], action="append")
    parser.add_argument("--executor", choices=["threading", "eventlet"], action="append")
    parser.add_argument("--per-request", action="store_true",
                        help="Connection per request vs SharedPublisher, instead")
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    import zbus

    executors = args.executor or ["threading", "eventlet"]
    base = Path(tempfile.mkdtemp(prefix="zb-bench-", dir="/tmp"))
    base.chmod(0o700)
    run_dir, key_file = base / "run", base / "signing.key"
    key = zbus.generate_key()
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"default {key.hex()}\n")
    proxy = subprocess.Popen([sys.executable, "-m", "zbus_proxy", "--run-dir", str(run_dir)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lossless = True
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with zbus.Connection(run_dir) as conn:
                    conn.control.request("ping", timeout=0.5)
                break
            except zbus.ZbusError:
                if time.monotonic() > deadline or proxy.poll() is not None:
                    raise
                time.sleep(0.1)
        if args.per_request:
            print(f"{'executor':10} {'Connection/request':>19} {'shared send':>12} "
                  f"{'shared, through proxy':>22}")
            for executor in executors:
                proc = _spawn("per-request", executor, str(run_dir), key.hex(),
                              str(args.requests))
                r = _result(proc, 600)
                print(f"{executor:10} {r['per_connection_ms']:16.3f} ms {r['shared_send_ms']:9.4f}"
                      f" ms {r['shared_through_proxy_ms']:19.4f} ms   "
                      f"({r['connections']} connections, {r['requests']} shared sends, "
                      f"x{r['per_connection_ms'] / r['shared_through_proxy_ms']:.0f})")
            return 0
        urls = {"zbus": f"zbus:///?run_dir={run_dir}&key_file={key_file}", "rabbit": RABBIT}
        print(f"{'transport':10} {'executor':10} {'count':>7} {'received':>9} {'lost':>5} "
              f"{'notify()/s':>11} {'end-to-end/s':>13}")
        for name in args.only or ["zbus", "rabbit"]:
            if name == "rabbit" and not _rabbit_up():
                print("rabbit: nothing on 127.0.0.1:5672, skipped", file=sys.stderr)
                continue
            count = args.rabbit_count if name == "rabbit" and args.rabbit_count else args.count
            for executor in executors:
                r = row(urls[name], executor, count)
                lossless &= r["lost"] == 0 or name != "zbus"
                print(f"{name:10} {executor:10} {count:7d} {r['received']:9d} {r['lost']:5d} "
                      f"{r['notify_rate']:11,.0f} {r['rate']:13,.0f}"
                      + (f"   {r['zbus']}" if r["zbus"] else ""), flush=True)
    finally:
        proxy.terminate()
        try:
            proxy.wait(10)
        except subprocess.TimeoutExpired:
            proxy.kill()
            proxy.wait()
        shutil.rmtree(base, ignore_errors=True)
    return 0 if lossless else 1


if __name__ == "__main__":
    sys.exit(main())
