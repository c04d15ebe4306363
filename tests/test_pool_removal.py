"""Removing pools, on one host and fabric-wide, and local policy for peers' declarations
(issue 14, item 6), against real zbus-proxy processes.

Before: no way to remove a pool but stopping every proxy and editing pools.json, and a pool
removed that way came back from any peer's hello; a peer's squat on ``billing`` with other
bindings blocked the real pool on every host; every listed peer's declaration was taken.
Traffic on 127.0.0.0/8 only.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

import zbus
from zbus._transport import CurveKeys

from .conftest import ProxyProcess, short_tmp_dir
from .federation_agents import Host, free_port_pair, make_hosts, until, wait_meshed

pytestmark = pytest.mark.timeout(120)

REAL = ["billing/charge.#"]
SQUAT = ["billing/#", "notifications/#"]


@pytest.fixture
def tmp() -> Iterator[Path]:
    with short_tmp_dir("zr-") as path:
        yield path


def pools(host: Host | Path) -> dict[str, list[str]]:
    run_dir = host.run_dir if isinstance(host, Host) else host
    with zbus.Connection(run_dir) as conn:
        reply: dict[str, list[str]] = conn.control.request("pools", timeout=5)["pools"]
        return reply


def request(host: Host, op: str, **fields: Any) -> dict[str, Any]:
    with zbus.Connection(host.run_dir) as conn:
        return conn.control.request(op, timeout=10, **fields)


def refused(host: Host) -> dict[str, int]:
    counts: dict[str, int] = host.stats()["federation"]["peer_pools_refused"]
    return counts


def hellos_since(hosts: list[Host], since: float, rounds: int = 5) -> bool:
    """Every host had a hello answered by every other one ``rounds`` sync intervals (0.2 s)
    after ``since``: each has told each its pools (and heard theirs) that often since."""
    for host in hosts:
        peers = host.stats()["federation"]["peers"]
        for other in hosts:
            if other is not host and \
                    peers.get(other.node, {}).get("last_hello", 0) < since + rounds * 0.2:
                return False
    return True


def start_mesh(hosts: list[Host], *extra: str, each: dict[str, tuple[str, ...]] | None = None
               ) -> None:
    for h in hosts:
        h.port = free_port_pair(h.address)
    for h in hosts:
        peers = [arg for other in hosts if other is not h
                 for arg in ("--peer", other.peer_spec())]
        h.start(*peers, *extra, *(each or {}).get(h.name, ()))
    wait_meshed(hosts)


def test_a_pool_removed_fabric_wide_stays_gone_whoever_held_it(tmp: Path) -> None:
    """A declares; B and C take it. C is down while A removes it fabric-wide, and comes
    back with the pool in its pools.json: C's hellos do not bring it back anywhere, and C
    removes it too; it stays gone over many hello rounds and a restart."""
    a, b, c = make_hosts(tmp)
    try:
        start_mesh([a, b, c])
        request(a, "declare_pool", name="billing", bindings=REAL)
        until(lambda: all(pools(h).get("billing") == REAL for h in (a, b, c)), 20,
              "the pool to reach every host")
        c.stop()
        reply = request(a, "remove_pool", name="billing", fabric=True)
        assert reply["kind"] == "fast" and reply["bindings"] == REAL and reply["fabric"]
        assert "billing" not in pools(a)
        until(lambda: "billing" not in pools(b), 10, "B to remove it (A passes it on)")
        assert json.loads((c.run_dir / "pools.json").read_text())["pools"] == {"billing": REAL}

        c.start(*[arg for other in (a, b) for arg in ("--peer", other.peer_spec())])
        back = time.time()
        until(lambda: hellos_since([a, b, c], back), 30, "hello rounds with C back")
        for host in (a, b, c):
            assert "billing" not in pools(host), host.name
            assert "pool-billing-origin" not in host.stats()["devices"], host.name
        tomb = request(c, "pools")["removed"]["billing"]
        assert tomb["bindings"] == REAL and tomb["fabric"] is True
        assert tomb["generation"] == reply["generation"]

        # Persisted: B restarted still holds the tombstone, and refuses an old declaration.
        b.stop()
        saved = json.loads((b.run_dir / "pools.json").read_text())
        assert saved["pools"] == {} and saved["removed"]["billing"]["bindings"] == REAL
        b.start(*[arg for other in (a, c) for arg in ("--peer", other.peer_spec())])
        wait_meshed([a, b, c])
        assert "billing" not in pools(b)

        # A declaration made after the removal brings it back everywhere.
        request(b, "declare_pool", name="billing", bindings=REAL)
        until(lambda: all(pools(h).get("billing") == REAL for h in (a, b, c)), 20,
              "the pool declared again to reach every host")
        assert all("billing" not in request(h, "pools")["removed"] for h in (a, b, c))
    finally:
        for h in (a, b, c):
            h.stop()


class PeerSocket:
    """A REQ on ``host``'s peer control socket with ``keys`` (a peer ``host`` allows)."""

    def __init__(self, ctx: zmq.Context[Any], host: Host, keys: CurveKeys, source: str) -> None:
        self.sock = ctx.socket(zmq.REQ)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.curve_publickey = keys.public
        self.sock.curve_secretkey = keys.secret
        self.sock.curve_serverkey = host.keys.public
        self.sock.connect(f"tcp://{source}:0;{host.address}:{host.port + 1}")

    def ask(self, **request: Any) -> dict[str, Any]:
        self.sock.send(msgpack.packb(request))
        assert self.sock.poll(5000), "no answer"
        reply: dict[str, Any] = msgpack.unpackb(self.sock.recv(), raw=False)
        return reply


def test_a_squat_removed_fabric_wide_lets_the_real_pool_work_everywhere(
        tmp: Path, key: bytes) -> None:
    """M (host c) declares ``billing`` with other bindings; every host takes it and the
    real declaration is refused. The operator removes it fabric-wide from A, then declares
    the real one: every host has it, a member on B gets what A publishes, and M's old
    declaration sent again is refused and counted."""
    a, b, m = make_hosts(tmp)
    ctx: zmq.Context[Any] = zmq.Context()
    peer: PeerSocket | None = None
    try:
        start_mesh([a, b, m])
        request(m, "declare_pool", name="billing", bindings=SQUAT)
        until(lambda: all(pools(h).get("billing") == SQUAT for h in (a, b, m)), 20,
              "the squat to spread")
        with pytest.raises(zbus.ProxyError, match="declared with bindings"):
            request(a, "declare_pool", name="billing", bindings=REAL)

        squat = request(m, "pools")["generations"]["billing"]
        request(a, "remove_pool", name="billing", fabric=True)
        until(lambda: all("billing" not in pools(h) for h in (a, b, m)), 10,
              "the squat to go from every host")
        # M says it again (an old declaration, as its hello or a restarted M would): refused.
        peer = PeerSocket(ctx, a, m.keys, m.address)
        reply = peer.ask(op="declare_pool", name="billing", bindings=SQUAT, generation=squat)
        assert reply["ok"] is False and "was removed here" in reply["error"], reply
        assert refused(a).get("removed", 0) >= 1

        request(a, "declare_pool", name="billing", bindings=REAL)
        until(lambda: all(pools(h).get("billing") == REAL for h in (a, b, m)), 20,
              "the real pool to reach every host")
        # Still the real one after hello rounds (M's tombstone keeps the squat out).
        since = time.time()
        until(lambda: hellos_since([a, b, m], since), 20, "hello rounds")
        assert all(pools(h).get("billing") == REAL for h in (a, b, m))
        reply = peer.ask(op="declare_pool", name="billing", bindings=SQUAT, generation=squat)
        assert reply["ok"] is False, reply

        dispatcher = zbus.Dispatcher()
        got: list[Any] = []
        dispatcher.bind("billing", "charge.#", lambda d: got.append(d.payload))
        with zbus.Connection(b.run_dir) as conn_b, zbus.Connection(a.run_dir) as conn_a, \
                conn_b.join_pool("billing", dispatcher, key) as member:
            member.ready(timeout=10)
            until(lambda: any(d.startswith("pool-billing-from-")
                              and d.endswith(a.node) for d in b.stats()["devices"]),
                  20, "B's link from A's pool origin")
            publisher = zbus.Publisher(conn_a.exchange("billing"), zbus.MessageFactory(key, "a"))
            deadline = time.monotonic() + 20
            while not got and time.monotonic() < deadline:
                publisher.send("charge.card", {"n": 1})
                conn_a.flush()
                member.process(timeout=0.5)
            assert got and got[0] == {"n": 1}
    finally:
        if peer is not None:
            peer.sock.close(linger=0)
        ctx.destroy(linger=0)
        for h in (a, b, m):
            h.stop()


def test_local_policy_refuses_and_counts_peers_pools(tmp: Path) -> None:
    """A takes no pool from peers, B only ``compute-*``: each keeps its own declarations,
    refuses the others and counts them, and logs each refused pool once."""
    a, b, _ = make_hosts(tmp)
    try:
        start_mesh([a, b], each={"a": ("--pools-from-peers", "none"),
                                 "b": ("--pools-from-peers", "compute-*,audit")})
        request(a, "declare_pool", name="compute-1", bindings=["compute/#"])
        request(a, "declare_pool", name="billing", bindings=REAL)  # its own: unaffected
        request(b, "declare_pool", name="orders", bindings=["orders/#"])
        until(lambda: "compute-1" in pools(b), 10, "B to take compute-1")
        since = time.time()
        until(lambda: hellos_since([a, b], since), 20, "hello rounds")
        assert pools(a) == {"compute-1": ["compute/#"], "billing": REAL}
        assert pools(b) == {"compute-1": ["compute/#"], "orders": ["orders/#"]}
        # Counted each time a peer's content carries it (when that content changed, not in
        # every hello: docs/ARCHITECTURE.md, "Membership").
        assert refused(a).get("policy", 0) >= 1  # orders, from B
        assert refused(b).get("policy", 0) >= 1  # billing, from A
        assert a.stats()["federation"]["pools_from_peers"] == "none"
        assert b.stats()["federation"]["pools_from_peers"] == ["compute-*", "audit"]
        # Nor do peers' removals reach A: B's fabric-wide removal of compute-1.
        request(b, "remove_pool", name="compute-1", fabric=True)
        since = time.time()
        until(lambda: hellos_since([a, b], since), 20, "hello rounds")
        assert "compute-1" in pools(a) and "compute-1" not in pools(b)
    finally:
        for h in (a, b):
            h.stop()
    for host, pool in ((a, "orders"), (b, "billing")):
        assert host.proxy is not None
        log = host.proxy.log.read_text()
        lines = [line for line in log.splitlines()
                 if "refused a peer's pool declaration" in line and f'"{pool}"' in line]
        assert len(lines) == 1, lines


def test_remove_a_pool_with_live_members_frees_its_slot(run_dir: Path, key: bytes) -> None:
    """One slot (--max-pools 1): a fast pool with a live member is removed (its devices
    gone, its member idle), another pool takes the slot, and the first declared again is
    served on the same sockets: the member gets messages again. An at-least-once pool is
    removed the same way (not fabric-wide: it lives on one host)."""
    proxy = ProxyProcess(run_dir, "--max-pools", "1").start()
    got: list[Any] = []
    dispatcher = zbus.Dispatcher()
    dispatcher.bind("billing", "charge.#", lambda d: got.append(d.payload))
    try:
        with zbus.Connection(run_dir) as conn, \
                conn.join_pool("billing", dispatcher, key) as member:
            member.ready(timeout=10)
            until(lambda: conn.proxy_stats()["fast_pools"]["billing"]["members"] == 1, 10,
                  "the member to count")
            with pytest.raises(zbus.ProxyError, match="at most 1 pools"):
                conn.declare_pool("other", ["audit/#"])
            with pytest.raises(zbus.ProxyError, match="no peers"):
                conn.control.request("remove_pool", name="billing", fabric=True)
            reply = conn.control.request("remove_pool", name="billing")
            assert reply["kind"] == "fast" and reply["fabric"] is False
            stats = conn.proxy_stats()
            assert stats["pools"] == {} and "billing" not in stats["fast_pools"]
            assert not [d for d in stats["devices"] if d.startswith("pool-")]
            assert not (run_dir / "pool-billing.sock").exists()
            assert json.loads((run_dir / "pools.json").read_text()) == {"pools": {}}

            conn.declare_pool("other", ["audit/#"])  # the freed slot
            conn.control.request("remove_pool", name="other")
            conn.declare_pool("billing", REAL)  # again: the member connects again
            until(lambda: conn.proxy_stats()["fast_pools"]["billing"]["members"] == 1, 10,
                  "the member to reconnect")
            publisher = zbus.Publisher(conn.exchange("billing"), zbus.MessageFactory(key, "p"))
            publisher.send("charge.card", {"n": 2})
            conn.flush()
            deadline = time.monotonic() + 10
            while not got and time.monotonic() < deadline:
                member.process(timeout=0.5)
            assert got == [{"n": 2}]
            conn.control.request("remove_pool", name="billing")

            assert conn.declare_reliable_pool("jobs", ["jobs/#"]) is True
            with pytest.raises(zbus.ProxyError, match=r"at-least-once pool.*without --fabric"):
                conn.control.request("remove_pool", name="jobs", fabric=True)
            reply = conn.control.request("remove_pool", name="jobs")
            assert reply["kind"] == "at-least-once"
            assert conn.control.request("pools")["reliable_pools"] == {}
            assert conn.declare_reliable_pool("jobs", ["jobs/#"]) is True  # fresh again
    finally:
        assert proxy.stop() == 0


def test_removing_an_unknown_pool_says_so(proxy_process: ProxyProcess, run_dir: Path) -> None:
    with zbus.Connection(run_dir) as conn:
        conn.declare_pool("audit", ["audit/#"])
        with pytest.raises(zbus.ProxyError, match=r"no pool 'nope' on this proxy; declared: "
                                                  r"audit"):
            conn.control.request("remove_pool", name="nope")
        with pytest.raises(zbus.ProxyError, match="remove_pool takes name and fabric"):
            conn.control.request("remove_pool", name="audit", force=True)
        with pytest.raises(zbus.ProxyError, match="fabric must be true or false"):
            conn.control.request("remove_pool", name="audit", fabric="yes")
        with pytest.raises(zbus.ProxyError, match="invalid pool name"):
            conn.control.request("remove_pool", name="../x")
        assert conn.control.request("pools")["pools"] == {"audit": ["audit/#"]}


def zbus_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "zbus", *args], capture_output=True,
                          text=True, timeout=60)


def test_cli_pools_list_declare_remove(proxy_process: ProxyProcess, run_dir: Path) -> None:
    where = ("--run-dir", str(run_dir))
    out = zbus_cli("pools", "list", *where)
    assert out.returncode == 0 and "no pools declared" in out.stdout, out
    out = zbus_cli("pools", "declare", "billing", "billing/charge.#", "billing/refund",
                   "billing/refund", *where)
    assert out.returncode == 0, out.stderr
    assert "pool billing declared with billing/charge.# billing/refund" in out.stdout
    out = zbus_cli("pools", "list", *where)
    assert out.returncode == 0
    assert any(line.split()[:2] == ["billing", "fast"] for line in out.stdout.splitlines())
    out = zbus_cli("pools", "list", "--json", *where)
    assert json.loads(out.stdout)["pools"] == {"billing": ["billing/charge.#", "billing/refund"]}
    out = zbus_cli("pools", "declare", "billing", "billing/#", *where)
    assert out.returncode == 1 and "zbus pools remove billing" in out.stderr, out
    out = zbus_cli("pools", "declare", "billing", "not-a-binding", *where)
    assert out.returncode == 2, out
    out = zbus_cli("pools", "remove", "billing", *where)
    assert out.returncode == 0 and "fast pool billing" in out.stdout, out
    out = zbus_cli("pools", "remove", "billing", *where)
    assert out.returncode == 1 and "no pool 'billing' on this proxy" in out.stderr, out
    out = zbus_cli("pools", "remove", "billing", "--fabric", *where)
    assert out.returncode == 1
    assert zbus_cli("pools", "list", *where).stdout.strip() == "no pools declared"


def test_pools_from_peers_config() -> None:
    from zbus_proxy._config import build_config
    from zbus_proxy._federation import accepts_peer_pool

    base = {"network": {"bind": "127.0.0.1:7737", "insecure_tcp": True}}

    def policy(value: Any) -> tuple[str, ...] | None:
        config = build_config({"network": {**base["network"], "pools_from_peers": value}})
        assert config.federation is not None
        return config.federation.pools_from_peers

    assert build_config(base).federation.pools_from_peers is None  # type: ignore[union-attr]
    assert policy("all") is None and policy("none") == ()
    assert policy(["billing", "compute-*"]) == ("billing", "compute-*")
    assert policy("billing, compute-*") == ("billing", "compute-*")  # as the flag gives it
    for bad in ([], [""], "bill/ing", 3, ["a b"]):
        with pytest.raises(zbus.ConfigError, match="pools_from_peers"):
            policy(bad)
    with pytest.raises(zbus.ConfigError, match=r"needs network\.bind"):
        build_config({"network": {"pools_from_peers": "none"}})
    assert accepts_peer_pool(None, "x") and not accepts_peer_pool((), "x")
    assert accepts_peer_pool(("compute-*",), "compute-1")
    assert not accepts_peer_pool(("compute-*",), "billing")


def test_generations_order_removals_and_declarations() -> None:
    from zbus_proxy._proxy import MAX_GENERATION, next_generation

    assert next_generation(1000) == 1000
    assert next_generation(1000, 5000) == 5001  # a clock behind: still newer than seen
    assert next_generation(1000, 5000, 7000) == 7001
    assert next_generation(MAX_GENERATION, MAX_GENERATION) == MAX_GENERATION
