"""A listed (allow-listed) peer that lies in its hellos, against a real zbus-proxy (issue 14).

Item 7: M, whose key A allows, claims B's node id (A then followed M's origin), introduces
made-up peers, and points A at addresses it does not own. Node ids are bound to keys, learned
peers are bounded and expire, and a learned peer's endpoints must be where its hello came
from. Item 8: declarations past the largest message a peer takes made every hello too
large; hellos carry pools in bounded pages. Traffic on 127.0.0.0/8 only.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from zbus._transport import CurveKeys

from .conftest import short_tmp_dir
from .federation_agents import Host, free_port_pair, make_hosts, until, wait_meshed

pytestmark = pytest.mark.timeout(90)

M_ADDRESS = "127.0.0.5"


@pytest.fixture
def tmp() -> Iterator[Path]:
    with short_tmp_dir("zh-") as path:
        yield path


class Liar:
    """A REQ on A's peer control socket from ``source``, with CURVE keys A allows."""

    def __init__(self, ctx: zmq.Context[Any], host: Host, keys: CurveKeys | None,
                 source: str = M_ADDRESS) -> None:
        self.keys = keys
        self.sock = ctx.socket(zmq.REQ)
        self.sock.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            self.sock.curve_publickey = keys.public
            self.sock.curve_secretkey = keys.secret
            self.sock.curve_serverkey = host.keys.public
        self.sock.connect(f"tcp://{source}:0;{host.address}:{host.port + 1}")

    def hello(self, pid: str, address: str = M_ADDRESS, port: int = 9000) -> dict[str, Any]:
        peer = {"id": pid, "origin": f"tcp://{address}:{port}",
                "control": f"tcp://{address}:{port + 1}",
                "public_key": self.keys.public.decode() if self.keys else ""}
        self.sock.send(msgpack.packb({"op": "hello", "peer": peer, "pools": {}}))
        assert self.sock.poll(5000), "A did not answer a hello"
        reply: dict[str, Any] = msgpack.unpackb(self.sock.recv(), raw=False)
        return reply

    def close(self) -> None:
        self.sock.close(linger=0)


def _federation(host: Host) -> dict[str, Any]:
    fed: dict[str, Any] = host.stats()["federation"]
    return fed


def test_a_listed_peer_cannot_take_ids_make_up_peers_or_point_anywhere(tmp: Path) -> None:
    a, b, _ = make_hosts(tmp)
    m = CurveKeys.generate()
    allow = tmp / "allow"
    allow.write_text(m.public.decode() + "\n")
    ctx: zmq.Context[Any] = zmq.Context()
    liar: Liar | None = None
    try:
        for h in (a, b):
            h.port = free_port_pair(h.address)
        a.start("--peer", b.peer_spec(), "--curve-allow", str(allow))
        b.start("--peer", a.peer_spec())
        wait_meshed([a, b])
        liar = Liar(ctx, a, m)

        # M claims B's id (before: accepted, and A followed M's origin under B's id).
        reply = liar.hello(b.node)
        assert reply["ok"] is False and "belongs to another peer" in reply["error"], reply
        # M introduces itself: one id for its key, at its own address.
        assert liar.hello("m")["ok"] is True
        # 60 made-up peers under M's key (before: all learned, A's manager stalled).
        refused = [liar.hello(f"fake-{n}")["ok"] for n in range(60)]
        assert refused == [False] * 60
        # M points A at an address it does not own (before: A connected to it).
        reply = liar.hello("m", "127.0.0.99")
        assert reply["ok"] is False and "127.0.0.99" in reply["error"], reply

        fed = _federation(a)
        assert fed["hellos_refused"] == {"id_claimed": 61, "address": 1}
        assert fed["learned"] == 1
        assert fed["peers"][b.node]["origin"] == f"tcp://{b.node}"
        origins = {p["origin"] for p in fed["peers"].values()}
        assert origins <= {f"tcp://{b.node}", f"tcp://{M_ADDRESS}:9000"}, origins
        assert wait_meshed([a, b]) is None  # B still alive at A, and A at B

        # M goes quiet (nothing listens at its endpoints): A forgets it after
        # LEARNED_EXPIRE_SYNCS intervals of silence, and keeps B.
        until(lambda: _federation(a)["learned"] == 0
              and "m" not in _federation(a)["peers"], 40, "A to forget the silent M")
        assert b.node in _federation(a)["peers"]
    finally:
        if liar is not None:
            liar.close()
        ctx.destroy(linger=0)
        for h in (a, b):
            h.stop()


def test_learned_peers_are_bounded_on_plain_tcp(tmp: Path) -> None:
    """On plain tcp ids bind to source addresses: 257 addresses each introducing a peer at
    its own address; A learns 256 and refuses the next, and still stops promptly."""
    from zbus_proxy._federation import LEARNED_MAX

    (a,) = make_hosts(tmp, 1)
    ctx: zmq.Context[Any] = zmq.Context()
    liars: list[Liar] = []
    try:
        a.start(curve=False)
        oks = []
        for n in range(LEARNED_MAX + 1):
            source = f"127.0.{1 + n // 250}.{1 + n % 250}"
            liar = Liar(ctx, a, None, source)
            liars.append(liar)
            oks.append(liar.hello(f"made-up-{n}", source)["ok"])
            liar.close()
        assert oks == [True] * LEARNED_MAX + [False]
        fed = _federation(a)
        assert fed["learned"] == LEARNED_MAX
        assert fed["hellos_refused"] == {"learned_full": 1}
        started = time.monotonic()
        a.stop()
        print(f'{{"test": "learned cap", "stop_s": {time.monotonic() - started:.2f}}}')
    finally:
        for liar in liars:
            liar.close()
        ctx.destroy(linger=0)
        a.stop()


def test_hellos_stay_bounded_whatever_is_declared(tmp: Path) -> None:
    """Issue 14, item 8: pool declarations adding up past the largest message a peer takes
    (1 MiB by default; here 256 KiB, 16 pools of 256 bindings of ~100 bytes: 430 KB) made
    every hello too large: peers refused each other's hellos and marked each other not
    alive. Hellos carry the pools in bounded pages: both stay alive, and B, started after
    the declarations (so no pass-on reached it), gets every pool from the pages."""
    import zbus

    a, b, _ = make_hosts(tmp)
    limit = ("--max-message-bytes", str(256 * 1024))
    try:
        for h in (a, b):
            h.port = free_port_pair(h.address)
        a.start("--peer", b.peer_spec(), *limit)
        pools = {f"big{n}": [f"notifications/p{n}.b{i}." + "x" * 80 for i in range(256)]
                 for n in range(16)}
        assert sum(len(msgpack.packb([k, v])) for k, v in pools.items()) > 400_000
        with zbus.Connection(a.run_dir) as conn:
            for name, bindings in pools.items():
                conn.declare_pool(name, bindings, timeout=30)
        b.start("--peer", a.peer_spec(), *limit)
        started = time.time()

        def fresh_hellos() -> bool:
            # Each has had hellos answered since B started and counts the other alive
            # (before: none got through, so never alive).
            for host, other in ((a, b), (b, a)):
                peer = _federation(host)["peers"].get(other.node, {})
                if not peer.get("alive") or peer.get("last_hello", 0) < started + 1:
                    return False
            return True

        until(fresh_hellos, 40, "hellos to flow both ways with 430 KB of declarations")

        def b_has_all() -> bool:
            with zbus.Connection(b.run_dir) as conn:
                return set(pools) <= set(conn.control.request("pools", timeout=5)["pools"])

        until(b_has_all, 20, "every pool to reach B in hello pages")
        assert fresh_hellos()
    finally:
        for h in (a, b):
            h.stop()


def test_pool_pages_are_bounded_and_cover_every_pool() -> None:
    from zbus_proxy._federation import pool_page

    pools = {f"p{n:02}": [f"notifications/k{n}.{i}" for i in range(50)] for n in range(40)}
    seen: set[str] = set()
    start = 0
    for _ in range(40):
        page, start = pool_page(pools, start, 4096)
        assert page and len(msgpack.packb(page)) <= 4096 + 8
        seen |= set(page)
    assert seen == set(pools)
    assert pool_page(pools, 0, 10**9) == (pools, 0)  # all fit: every hello carries all
    assert pool_page({}, 3, 10) == ({}, 0)
