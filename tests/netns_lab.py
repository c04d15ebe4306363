"""A fault lab on network namespaces: hosts, real zbus-proxy processes, agents, faults.

Each *host* is a network namespace joined to a bridge of the lab's own by a veth pair, with an
address in 10.213.0.0/24; it runs one ``zbus-proxy`` (``ip netns exec NS python3 -m
zbus_proxy``) federated with the others over tcp with CURVE (static peers, as
docs/OPERATING.md "Many hosts" describes), and agent processes in the same namespace. Every
name (namespaces, bridge, veths, directories) carries a per-run suffix, so parallel or
leftover runs never collide, and :meth:`Lab.close` tears everything down, processes first,
whatever happened. Traffic stays on the lab's bridge: nothing is routed out of it.

Counting is independent of zbus: a publisher puts its own sequence number in each payload
(``{"n": N}``) and keeps its count of sends that returned in a file (one ``pwrite`` per send,
so a SIGKILLed or SIGTERMed publisher's count survives it); a consumer appends one line per
delivery (``publisher n time``) with one ``os.write``, before an at-least-once ack, so the
kernel has it even if the consumer is SIGKILLed right after. zbus's own counters (the
subscriber's ``lost``, the proxies' ``unaccounted`` ...) are read only to compare with.

Faults: :meth:`Lab.partition` / :meth:`Lab.heal` (nftables drop in both namespaces: a silent
drop, no RST), :meth:`Lab.cable` (the host's bridge port down/up), :meth:`Lab.slow_link`
(``tc tbf``), and signals to any process (:meth:`Proc.signal`).

``python3 -m tests.netns_lab table [--long 30]`` runs every scenario and prints the fault
table of docs/RELIABILITY.md (as root, with ``ip`` and ``nft``);
``python3 -m tests.netns_lab agent ROLE ...`` is the agents' entry point (run by the lab).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zbus
from zbus._transport import CurveKeys

from .agents import _watch_stdin

REPO = Path(__file__).resolve().parent.parent
NET = "10.213.0"
PORT = 7737
EXCHANGE = "notifications"
ROUTING_KEY = "compute.instance.create.end"
BINDING = f"{EXCHANGE}/compute.#"
_COUNT = struct.Struct("=Q")


def unavailable() -> str | None:
    """Why the lab cannot run here (None: it can): root, ``ip netns`` and ``nft`` needed."""
    if os.geteuid() != 0:
        return "the namespace lab needs root (ip netns, veth, nftables)"
    for tool in ("ip", "nft", "tc"):
        if shutil.which(tool) is None:
            return f"the namespace lab needs `{tool}` (apt-get install iproute2 nftables)"
    probe = f"zlp{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    try:
        nft = subprocess.run(["ip", "netns", "exec", probe, "nft", "list", "ruleset"],
                             capture_output=True, text=True)
        if nft.returncode != 0:
            return f"nft does not work in a namespace here: {nft.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _run(*cmd: str, stdin: str | None = None) -> None:
    done = subprocess.run(cmd, input=stdin, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip() or done.returncode}")


# -- processes ----------------------------------------------------------------------------------


class Proc:
    """A process started in a host's namespace; :meth:`end` always ends it."""

    def __init__(self, ns: str, argv: Sequence[str], log: Path, name: str) -> None:
        self.name = name
        self.log = log
        with open(log, "ab") as out:
            # `ip netns exec` execs the command: the pid is the program's own.
            self.popen = subprocess.Popen(
                ["ip", "netns", "exec", ns, *argv], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=out,
                env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"},
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.popen.pid, sig)

    def readline(self, timeout: float) -> str:
        """The next stdout line; raises if none comes within ``timeout``."""
        import select

        assert self.popen.stdout is not None
        ready, _, _ = select.select([self.popen.stdout], [], [], timeout)
        line = self.popen.stdout.readline().decode() if ready else ""
        if not line:
            raise AssertionError(f"{self.name} printed nothing within {timeout:g}s (exit "
                                 f"{self.popen.poll()}): {self.log.read_text()[-2000:]}")
        return line.strip()

    def tell_stop(self) -> None:
        if self.alive() and self.popen.stdin is not None:
            try:
                self.popen.stdin.write(b"stop\n")
                self.popen.stdin.flush()
            except BrokenPipeError:
                pass

    def wait(self, timeout: float) -> int | None:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def end(self) -> None:
        if self.alive():
            os.kill(self.popen.pid, signal.SIGCONT)  # a stopped process must see the TERM
            self.popen.terminate()
            if self.wait(5) is None:
                self.popen.kill()
                self.popen.wait(5)
        for stream in (self.popen.stdin, self.popen.stdout):
            if stream is not None:
                stream.close()


# -- hosts and the lab ----------------------------------------------------------------------------


@dataclass
class LabHost:
    index: int
    name: str
    ns: str
    veth: str
    """The host-side end of the host's veth (its port on the lab's bridge)."""
    address: str
    run_dir: Path
    key_dir: Path
    keys: CurveKeys
    proxy: Proc | None = None
    proxy_args: tuple[str, ...] = ()

    @property
    def node(self) -> str:
        return f"{self.address}:{PORT}"

    def peer_spec(self) -> str:
        return f"{self.node}={self.keys.public.decode()}"

    def stats(self, timeout: float = 5.0) -> dict[str, Any]:
        """The proxy's control ``stats`` (its ipc socket works from outside the namespace)."""
        with zbus.Connection(self.run_dir) as conn:
            return conn.control.request("stats", timeout=timeout)


class Lab:
    """N hosts on a bridge, each with a federated zbus-proxy; a context manager."""

    def __init__(self, count: int = 2, *, proxy_args: Sequence[str] = (),
                 heartbeat: tuple[float, float] | None = None, late: int = 0,
                 parallel: bool = False) -> None:
        """``late``: the last hosts are made, and listed as every proxy's peers, but their
        proxies are not started (``start_proxy`` them later); ``parallel``: the proxies
        start all at once (a cold start of the fleet) rather than one after another."""
        self.suffix = secrets.token_hex(3)
        self.bridge = f"zb{self.suffix}"
        self.tmp = Path(tempfile.mkdtemp(prefix=f"zl{self.suffix}-", dir="/tmp"))
        self.key = zbus.generate_key()
        self.procs: list[Proc] = []
        self.cut: set[tuple[int, int]] = set()
        self.proxy_args = tuple(proxy_args)
        if heartbeat is not None:
            self.proxy_args += ("--heartbeat-ivl", str(heartbeat[0]),
                                "--heartbeat-timeout", str(heartbeat[1]))
        self.late = late
        self.parallel = parallel
        self.hosts: list[LabHost] = []
        for i in range(count):
            name = "abcdefgh"[i] if i < 8 else f"h{i}"
            self.hosts.append(LabHost(
                i, name, f"zl{self.suffix}{name}", f"zv{self.suffix}{name}",
                f"{NET}.{i + 2}", self.tmp / name, self.tmp / f"{name}-keys",
                CurveKeys.generate()))

    def __enter__(self) -> Lab:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "link", "set", self.bridge, "up")
        for host in self.hosts:
            _run("ip", "netns", "add", host.ns)
            _run("ip", "link", "add", host.veth, "type", "veth", "peer", "name", "eth0",
                 "netns", host.ns)
            _run("ip", "link", "set", host.veth, "master", self.bridge, "up")
            _run("ip", "-n", host.ns, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _run("ip", "-n", host.ns, "link", "set", "eth0", "up")
            _run("ip", "-n", host.ns, "link", "set", "lo", "up")
            host.run_dir.mkdir()
            host.keys.write(host.key_dir)
        started = self.hosts[:len(self.hosts) - self.late]
        if self.parallel:
            for host in started:
                self.spawn_proxy(host)
            for host in started:
                self.wait_proxy(host, timeout=60)  # every interpreter starts at once
        else:
            for host in started:
                self.start_proxy(host)

    def close(self) -> None:
        """Everything the lab made goes, in reverse: processes, namespaces, bridge, files."""
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):  # one process's failure stops no teardown
                proc.end()
        self.procs.clear()
        for host in self.hosts:
            subprocess.run(["ip", "link", "del", host.veth], capture_output=True)
            subprocess.run(["ip", "netns", "del", host.ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- processes -----------------------------------------------------------------------

    def spawn(self, host: LabHost, argv: Sequence[str], name: str) -> Proc:
        proc = Proc(host.ns, argv, self.tmp / f"{name}.log", name)
        self.procs.append(proc)
        return proc

    def start_proxy(self, host: LabHost, *extra: str, timeout: float = 15.0) -> Proc:
        self.spawn_proxy(host, *extra)
        return self.wait_proxy(host, timeout)

    def spawn_proxy(self, host: LabHost, *extra: str) -> Proc:
        peers = [a for h in self.hosts if h is not host for a in ("--peer", h.peer_spec())]
        argv = [sys.executable, "-m", "zbus_proxy", "--run-dir", str(host.run_dir),
                "--bind", host.node, "--curve-secret", str(host.key_dir / "proxy.secret"),
                "--sync-interval", "0.5", *peers, *self.proxy_args, *extra]
        host.proxy = self.spawn(host, argv, f"proxy-{host.name}")
        return host.proxy

    def wait_proxy(self, host: LabHost, timeout: float = 15.0) -> Proc:
        """Until ``host``'s proxy answers ping."""
        assert host.proxy is not None
        deadline = time.monotonic() + timeout
        with zbus.Connection(host.run_dir) as conn:
            while True:
                if not host.proxy.alive():
                    raise RuntimeError(f"zbus-proxy on {host.name} exited: "
                                       f"{host.proxy.log.read_text()[-2000:]}")
                try:
                    conn.control.request("ping", timeout=0.5)
                    return host.proxy
                except zbus.Timeout:
                    if time.monotonic() > deadline:
                        raise

    def kill_proxy(self, host: LabHost, sig: int = signal.SIGKILL) -> None:
        assert host.proxy is not None
        host.proxy.signal(sig)
        host.proxy.wait(10)

    def agent(self, host: LabHost, role: str, name: str, *args: str) -> Agent:
        out = self.tmp / f"{name}.rec"
        argv = [sys.executable, "-m", "tests.netns_lab", "agent", role, "--run-dir",
                str(host.run_dir), "--key", self.key.hex(), "--name", name, "--out", str(out),
                *args]
        agent = Agent(self.spawn(host, argv, name), out, role)
        return agent

    # -- network -------------------------------------------------------------------------

    def meshed(self, hosts: Sequence[LabHost] | None = None) -> bool:
        """Every proxy (of ``hosts``, default all) sees every other alive, with a link to
        its origin."""
        hosts = self.hosts if hosts is None else hosts
        for host in hosts:
            stats = host.stats()
            want = {h.node for h in hosts if h is not host}
            peers = stats["federation"]["peers"]
            alive = {p for p, st in peers.items() if st.get("alive")}
            links = {d[len("peer-"):] for d in stats["devices"] if d.startswith("peer-")}
            if not (want <= alive and want <= links):
                return False
        return True

    def pool_linked(self, pool: str) -> bool:
        """Each host with members of ``pool`` has a link from every host's pool origin."""
        for host in self.hosts:
            stats = host.stats()
            if not stats["federation"]["members"].get(pool):
                continue
            links = {d for d in stats["devices"] if d.startswith(f"pool-{pool}-from-")}
            want = {f"pool-{pool}-from-local"} | {f"pool-{pool}-from-{h.node}"
                                                  for h in self.hosts if h is not host}
            if not want <= links:
                return False
        return True

    def _render_cuts(self, host: LabHost) -> None:
        others = sorted(self.hosts[j].address for i, j in self.cut if i == host.index)
        script = "table inet zlab\ndelete table inet zlab\n"
        if others:
            addrs = ", ".join(others)
            # drop, never reject: the other side learns nothing (no RST, no ICMP).
            script += ("table inet zlab {\n"
                       f"  chain in {{ type filter hook input priority 0; ip saddr {{ {addrs} }}"
                       " drop; }\n"
                       f"  chain out {{ type filter hook output priority 0; ip daddr {{ {addrs} }}"
                       " drop; }\n}\n")
        _run("ip", "netns", "exec", host.ns, "nft", "-f", "-", stdin=script)

    def partition(self, a: LabHost, b: LabHost) -> None:
        """Silently drop every packet between ``a`` and ``b``, both ways."""
        self.cut |= {(a.index, b.index), (b.index, a.index)}
        self._render_cuts(a)
        self._render_cuts(b)

    def heal(self, a: LabHost, b: LabHost) -> None:
        self.cut -= {(a.index, b.index), (b.index, a.index)}
        self._render_cuts(a)
        self._render_cuts(b)

    def cable(self, host: LabHost, up: bool) -> None:
        """Pull (or plug back) the host's cable: its port on the bridge goes down (or up)."""
        _run("ip", "link", "set", host.veth, "up" if up else "down")

    def slow_link(self, host: LabHost, rate: str | None) -> None:
        """Limit what reaches ``host`` to ``rate`` (e.g. ``"2mbit"``) with tc tbf; None
        removes the limit."""
        if rate is None:
            _run("tc", "qdisc", "del", "dev", host.veth, "root")
        else:
            _run("tc", "qdisc", "add", "dev", host.veth, "root", "tbf", "rate", rate,
                 "burst", "32kbit", "latency", "400ms")


def until(done: Callable[[], bool], timeout: float, what: str, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(step)  # polling a condition read from files and control sockets


# -- the agents, test side ----------------------------------------------------------------------


@dataclass
class Record:
    """What one consumer's file says so far (read incrementally)."""

    path: Path
    offset: int = 0
    seen: Counter[tuple[str, int]] = field(default_factory=Counter)
    arrivals: list[tuple[float, float, str, int]] = field(default_factory=list)
    """(received, published, publisher, n): times are time.time() (one kernel clock)."""
    highest: dict[str, int] = field(default_factory=dict)
    _partial: bytes = b""

    def poll(self) -> Record:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return self
        self.offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            pub, n_text, received, published = line.decode().split()
            n = int(n_text)
            self.seen[(pub, n)] += 1
            self.arrivals.append((float(received), float(published), pub, n))
            if n > self.highest.get(pub, 0):
                self.highest[pub] = n
        return self

    def distinct(self, pub: str) -> int:
        return sum(1 for p, _ in self.seen if p == pub)

    def duplicates(self) -> int:
        return sum(c - 1 for c in self.seen.values())

    def caught_up(self, moment: float) -> float | None:
        """Seconds from ``moment`` (time.time()) to the delivery of the first message
        published after it: how long until this consumer was current again."""
        later = [received for received, published, _, _ in self.arrivals if published > moment]
        return min(later) - moment if later else None

    def total(self) -> int:
        return len(self.arrivals)


class Agent:
    """A lab agent process (publisher or consumer) and its records."""

    def __init__(self, proc: Proc, out: Path, role: str) -> None:
        self.proc = proc
        self.out = out
        self.role = role
        self.record = Record(out)
        self.final: dict[str, Any] = {}

    @property
    def name(self) -> str:
        return self.proc.name

    def wait_ready(self, timeout: float = 40.0) -> None:
        line = self.proc.readline(timeout)
        if line != "READY":
            raise AssertionError(f"{self.name}: {line!r}: {self.proc.log.read_text()[-2000:]}")

    def sent(self) -> int:
        """A publisher's count of sends that returned (its file survives any signal)."""
        try:
            data = self.out.read_bytes()
        except FileNotFoundError:
            return 0
        return _COUNT.unpack(data[:8])[0] if len(data) >= 8 else 0

    def stop(self, timeout: float = 30.0, *, wait: bool = True) -> dict[str, Any]:
        """Ask it to stop; its final line (JSON) is its zbus counters. ``wait=False`` for a
        publisher started with ``--hold``: it stops sending, but keeps its connection (and
        what it keeps for repairs) until told to stop again."""
        self.proc.tell_stop()
        line = self.proc.readline(timeout)
        self.final = json.loads(line)
        if wait:
            self.proc.wait(10)
        return self.final


# -- the agents, child side -----------------------------------------------------------------------


_TERM = threading.Event()
"""A publisher agent was sent SIGTERM."""


def _publish(args: argparse.Namespace, conn: zbus.Connection, stop: threading.Event) -> int:
    factory = zbus.MessageFactory(bytes.fromhex(args.key), args.name)
    fd = os.open(args.out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    print("READY", flush=True)
    start = time.monotonic()
    sent = timeouts = 0
    while not stop.is_set():
        if args.rate:
            ahead = start + sent / args.rate - time.monotonic()
            if ahead > 0.002:
                time.sleep(ahead)  # pacing a fixed schedule, not synchronisation
        published = False
        while not published:
            # Connection.publish: the streams' beacons go out too (idle, flush, close); a
            # send that times out gives its number back, so the message is made again.
            frames = factory.frames(EXCHANGE, ROUTING_KEY, {"n": sent + 1, "t": time.time()})
            try:
                conn.publish(factory, frames)
                published = True
            except zbus.Timeout:  # the publisher itself loses nothing: it tries again
                timeouts += 1
                if stop.is_set() or _TERM.is_set():
                    break
        if published:
            sent += 1
            os.pwrite(fd, _COUNT.pack(sent), 0)
        if _TERM.is_set():
            # SIGTERM ends the publisher here, between two sends, as exit_on_sigterm would
            # (its connection closes at exit, without the flush below); raised anywhere
            # else, a message sent and not yet counted made the lab's count one short.
            raise SystemExit(128 + signal.SIGTERM)
    conn.flush(timeout=30)
    print(json.dumps({"sent": sent, "timeouts": timeouts}), flush=True)
    if args.hold:  # keep the connection, and what it keeps for repairs, until told again
        sys.stdin.readline()
    return 0


def _consume(args: argparse.Namespace, conn: zbus.Connection, stop: threading.Event) -> int:
    from zbus._control import wait_for_peers

    key = bytes.fromhex(args.key)
    fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def handle(delivery: zbus.Delivery) -> None:
        # One write per delivery, before any ack: the kernel keeps it through a SIGKILL.
        payload = delivery.payload
        os.write(fd, f"{delivery.publisher_id} {payload['n']} {time.time():.6f} "
                     f"{payload['t']:.6f}\n".encode())
        if args.delay:
            time.sleep(args.delay)  # a slow consumer, on purpose

    dispatcher = zbus.Dispatcher()
    exchange, _, pattern = BINDING.partition("/")
    dispatcher.bind(exchange, pattern, handle)
    consumer: Any
    if args.role == "subscribe":
        consumer = conn.subscribe(dispatcher, key)
        consumer.ready(timeout=30)
        wait_for_peers(conn.endpoints, conn.settings, conn.ctx, timeout=30)
    elif args.role == "worker":
        consumer = conn.join_pool(args.pool, dispatcher, key)
        consumer.ready(timeout=30)
    else:
        conn.declare_reliable_pool(args.pool, [BINDING])
        consumer = conn.join_reliable_pool(args.pool, dispatcher, key, window=args.window)
        consumer.ready(timeout=30)
    print("READY", flush=True)
    while not stop.is_set():
        consumer.process(timeout=0.1)
    counters = consumer.counters()
    consumer.close()  # a fast-pool member's close sends its final receipts report
    print(json.dumps(counters, default=str), flush=True)
    return 0


def agent_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="netns_lab agent")
    parser.add_argument("role", choices=["publish", "subscribe", "worker", "reliable"])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--rate", type=float, default=0.0, help="messages/s, 0: flat out")
    parser.add_argument("--pool", default="lab")
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--send-timeout", type=float, default=0.5)
    parser.add_argument("--hwm", type=int, default=100_000, help="Settings.subscriber_hwm")
    parser.add_argument("--hold", action="store_true",
                        help="publisher: after the first stop, keep the connection until the "
                             "next line or EOF on stdin")
    parser.add_argument("--repair-interval", type=float, default=None,
                        help="RepairPolicy.interval (default: zbus's)")
    args = parser.parse_args(argv)
    # SIGTERM ends the agent through SystemExit, so its Connection closes (the documented
    # way: Python's default SIGTERM action runs no code at all).
    zbus.exit_on_sigterm()
    if args.role == "publish":  # ends between two sends (_publish), not inside one
        signal.signal(signal.SIGTERM, lambda signum, frame: _TERM.set())
    stop = threading.Event()
    _watch_stdin(stop)
    repair = (zbus.RepairPolicy() if args.repair_interval is None
              else zbus.RepairPolicy(interval=args.repair_interval))
    settings = zbus.Settings(send_timeout=args.send_timeout, subscriber_hwm=args.hwm,
                             repair=repair)
    with zbus.Connection(args.run_dir, settings=settings) as conn:
        if args.role == "publish":
            return _publish(args, conn, stop)
        return _consume(args, conn, stop)


if __name__ == "__main__":
    if sys.argv[1:2] == ["agent"]:
        raise SystemExit(agent_main(sys.argv[2:]))
    from .netns_scenarios import main as table_main

    raise SystemExit(table_main(sys.argv[1:]))
