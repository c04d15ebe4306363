"""Cross-host helpers: a consumer agent that waits for every peer, and a federation of proxies.

Child side (``python -m tests.federation_agents subscribe|worker ...``): the same protocol as
tests/agents.py (``READY`` line, batches of ``[publisher_id, sequence, routing_key]`` to the
test's collector, ``stop`` on stdin, final stats), but a subscriber is READY only once its
subscription has reached the origin of every peer proxy (``zbus._control.wait_for_peers``),
not only its own host's. Test side: :class:`Host` (one proxy with its keys and addresses),
:func:`start_hosts`, :func:`wait_meshed`, and :class:`FedAgent`.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zbus_proxy._directory import free_port_pair

import zbus
from zbus._control import wait_for_peers
from zbus._transport import CurveKeys

from .agents import READY, Agent, ConsumerChild, _dispatcher, agent_parser
from .conftest import ProxyProcess

HERE = Path(__file__).resolve()

# -- the child side ---------------------------------------------------------------------------


def _consume(args: argparse.Namespace) -> int:
    child = ConsumerChild(args)
    dispatcher = _dispatcher(args.bind)
    consumer: zbus.Subscriber | zbus.PoolMember
    if args.role == "worker":
        consumer = child.conn.join_pool(args.pool, dispatcher, child.key)
        consumer.ready(timeout=20.0)
        peers: list[str] = []
    else:
        consumer = child.conn.subscribe(dispatcher, child.key)
        consumer.ready(timeout=20.0)
        peers = wait_for_peers(child.conn.endpoints, child.conn.settings, child.ctx,
                               timeout=20.0)
    print(READY, " ".join(peers), flush=True)
    child.forward(consumer)
    return child.finish(consumer, consumer.stats.as_dict())


def main(argv: list[str] | None = None) -> int:
    parser = agent_parser("federation_agents", ["subscribe", "worker"],
                          collector_required=True)
    parser.add_argument("--pool")
    return _consume(parser.parse_args(argv))


# -- the test side ----------------------------------------------------------------------------


@dataclass
class Host:
    """One host of a test federation: its proxy, address, port and CURVE keys."""

    name: str
    address: str
    run_dir: Path
    keys: CurveKeys
    port: int = 0
    key_dir: Path = field(default_factory=Path)
    proxy: ProxyProcess | None = None

    @property
    def node(self) -> str:
        return f"{self.address}:{self.port}"

    def peer_spec(self) -> str:
        return f"{self.node}={self.keys.public.decode()}"

    def start(self, *extra: str, curve: bool = True) -> Host:
        if not self.port:
            self.port = free_port_pair(self.address)
        if curve and not (self.key_dir / "proxy.secret").exists():
            self.keys.write(self.key_dir)
        args = ["--bind", self.node, "--sync-interval", "0.2",
                "--heartbeat-ivl", "0.5", "--heartbeat-timeout", "2"]
        args += ["--curve-secret", str(self.key_dir / "proxy.secret")] if curve \
            else ["--insecure-plain-tcp"]
        self.proxy = ProxyProcess(self.run_dir, *args, *extra).start()
        return self

    def stats(self) -> dict[str, Any]:
        with zbus.Connection(self.run_dir) as conn:
            return conn.control.request("stats", timeout=5)

    def stop(self, sig: int | None = None) -> None:
        if self.proxy is not None and self.proxy.proc is not None:
            self.proxy.stop(*([sig] if sig is not None else []))


def make_hosts(tmp: Path, count: int = 3) -> list[Host]:
    hosts = []
    for i in range(count):
        name = "abc"[i]
        run_dir = tmp / name
        run_dir.mkdir()
        key_dir = tmp / f"{name}-keys"
        hosts.append(Host(name, f"127.0.0.{i + 2}", run_dir, CurveKeys.generate(),
                          key_dir=key_dir))
    return hosts


def until(done: Callable[[], bool], timeout: float, what: str, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(step)  # polling a readiness condition, not waiting in its place


def peers_alive(host: Host) -> set[str]:
    fed = host.stats().get("federation") or {}
    return {p for p, st in fed.get("peers", {}).items() if st.get("alive")}


def wait_meshed(hosts: Sequence[Host], timeout: float = 20.0) -> None:
    """Every proxy answers hellos from every other one and has a link to its origin."""
    def meshed() -> bool:
        for host in hosts:
            stats = host.stats()
            want = {h.node for h in hosts if h is not host}
            alive = {p for p, st in stats["federation"]["peers"].items() if st.get("alive")}
            links = {d[len("peer-"):] for d in stats["devices"] if d.startswith("peer-")}
            if not (want <= alive and want <= links):
                return False
        return True

    until(meshed, timeout, "the proxies to see each other")


def wait_pool_links(hosts: Sequence[Host], pool: str, timeout: float = 20.0) -> None:
    """Each host with live members of ``pool`` has a link from every host's pool origin."""
    def linked() -> bool:
        for host in hosts:
            stats = host.stats()
            if not stats["federation"]["members"].get(pool):
                continue
            links = {d for d in stats["devices"] if d.startswith(f"pool-{pool}-from-")}
            want = {f"pool-{pool}-from-local"} | {f"pool-{pool}-from-{h.node}"
                                                  for h in hosts if h is not host}
            if not want <= links:
                return False
        return True

    until(linked, timeout, f"links of pool {pool}")


class FedAgent(Agent):
    """A consumer child process (see the child side above); ``close`` always ends it."""

    program = ("-m", "tests.federation_agents")

    def __init__(self, run_dir: Path, role: str, *args: str, name: str) -> None:
        super().__init__(run_dir, role, *args, name=name)
        self.peers: list[str] = []

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(HERE.parent.parent)}

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait for ``READY [peer ...]``; :attr:`peers` is the peers it names."""
        line = self.readline(timeout)
        if not line.startswith(READY):
            raise AssertionError(f"agent {self.name} not ready ({line!r}, exit "
                                 f"{self.proc.poll()}): {self.log.read_text()[-2000:]}")
        self.peers = line.split()[1:]


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
