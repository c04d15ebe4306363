"""CurveZMQ on every tcp link: the allow-list admits listed keys only, and fails closed."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

import zbus
from zbus._transport import CurveKeys

from .agents import Collector
from .conftest import short_tmp_dir
from .federation_agents import FedAgent, make_hosts, until, wait_meshed

PROXY = [sys.executable, "-m", "zbus_proxy"]
BINDING = "notifications/compute.#"

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def tmp() -> Iterator[Path]:
    with short_tmp_dir("zc-") as path:
        yield path


def test_keygen_writes_a_private_secret_and_never_overwrites(tmp: Path) -> None:
    out = subprocess.run([*PROXY, "--curve-keygen", str(tmp / "k")], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    secret, public = tmp / "k" / "proxy.secret", tmp / "k" / "proxy.pub"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    keys = CurveKeys.load(secret)
    assert out.stdout.strip() == keys.public.decode()
    assert keys.public.decode() in public.read_text()
    again = subprocess.run([*PROXY, "--curve-keygen", str(tmp / "k")], capture_output=True,
                           text=True, timeout=30)
    assert again.returncode == 2 and "not overwriting" in again.stderr
    os.chmod(secret, 0o644)
    with pytest.raises(zbus.ConfigError, match="readable by others"):
        CurveKeys.load(secret)


def test_tcp_without_keys_is_refused_unless_plain_is_asked_for(tmp: Path) -> None:
    no_key = subprocess.run([*PROXY, "--run-dir", str(tmp / "r"), "--bind", "127.0.0.2:1",
                             "--check-config"], capture_output=True, text=True, timeout=30)
    assert no_key.returncode == 2 and "--insecure-plain-tcp" in no_key.stderr
    (host,) = make_hosts(tmp, 1)
    host.start(curve=False)
    try:
        log = host.run_dir / "proxy.log"
        assert any("WARNING" in line and "PLAIN" in line for line in log.read_text().splitlines())
    finally:
        host.stop()


def curve_socket(ctx: zmq.Context[Any], kind: int, endpoint: str, server: bytes,
                 keys: CurveKeys | None) -> zmq.Socket[Any]:
    sock: zmq.Socket[Any] = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        sock.curve_secretkey = keys.secret
        sock.curve_publickey = keys.public
        sock.curve_serverkey = server
    sock.connect(endpoint)
    return sock


def test_only_allow_listed_keys_can_connect_or_read(tmp: Path, key: bytes) -> None:
    a, b, c = make_hosts(tmp)
    listed = CurveKeys.generate()
    allow = tmp / "allow"
    allow.write_text(f"# listed client\n{listed.public.decode()}\n")
    collector = Collector(tmp)
    agents: list[FedAgent] = []
    ctx: zmq.Context[Any] = zmq.Context()
    socks: list[zmq.Socket[Any]] = []
    try:
        from .federation_agents import free_port_pair

        for h in (a, b, c):
            h.port = free_port_pair(h.address)
        # A allows C (a static peer) and `listed`; B knows A's key but is not on A's list.
        a.start("--peer", c.peer_spec(), "--curve-allow", str(allow))
        b.start("--peer", a.peer_spec())
        c.start("--peer", a.peer_spec())
        wait_meshed([a, c])

        origin = f"tcp://{a.node}"
        server = a.keys.public
        good = curve_socket(ctx, zmq.SUB, origin, server, listed)
        rogue = curve_socket(ctx, zmq.SUB, origin, server, CurveKeys.generate())
        plain = curve_socket(ctx, zmq.SUB, origin, server, None)
        socks += [good, rogue, plain]
        for s in (good, rogue, plain):
            s.subscribe(b"")

        subs = []
        for h in (b, c):
            agent = FedAgent(h.run_dir, "subscribe", "--key", key.hex(), "--collector",
                             collector.endpoint, "--bind", BINDING, name=f"sub-{h.name}")
            agents.append(agent)
            subs.append(agent)
        for agent in subs:
            agent.wait_ready()
        assert subs[0].peers == []  # B's hellos to A are refused: A is not its peer
        assert subs[1].peers == [a.node]

        factory = zbus.MessageFactory(key, "pa")
        with zbus.Connection(a.run_dir) as conn:
            pub = zbus.Publisher(conn.exchange("notifications"), factory)

            def good_hears() -> bool:  # readiness of the listed raw SUB: it hears a message
                pub.send("compute.ping", {"warmup": True})
                conn.flush()
                return bool(good.poll(50))

            until(good_hears, 10, "the listed client to be served")
            for n in range(100):
                pub.send("compute.instance.create.end", {"n": n})
            conn.flush()
        got_good = 0
        while good.poll(1000):
            frames = good.recv_multipart()
            if frames[0].endswith(b"create.end"):  # a batch counts each of its messages
                got_good += len(msgpack.unpackb(frames[1])[4])
            if got_good == 100:
                break
        assert got_good == 100
        assert not rogue.poll(300) and not plain.poll(0)

        # The control socket answers a listed client only.
        control = f"tcp://{a.address}:{a.port + 1}"
        ok = curve_socket(ctx, zmq.REQ, control, server, listed)
        bad = curve_socket(ctx, zmq.REQ, control, server, CurveKeys.generate())
        socks += [ok, bad]
        for s in (ok, bad):
            s.send(msgpack.packb({"op": "ping"}))
        assert ok.poll(5000) and msgpack.unpackb(ok.recv())["ok"] is True
        assert not bad.poll(500)

        collector.until(lambda: sum(1 for *_, k in collector.seen["sub-c"]
                                    if k.endswith("create.end")) >= 100, 20, "C's copy")
        collector.stop_all(subs)
        assert collector.seen["sub-b"] == []  # B never read a byte of A's stream
        zap = a.stats()["federation"]["zap"]
        assert zap["denied"] >= 3 and zap["accepted"] >= 2, zap
        print(f'{{"test": "curve", "listed": {got_good}, "rogue": 0, "plain": 0, '
              f'"zap": {zap}}}')
    finally:
        for s in socks:
            s.close(linger=0)
        ctx.term()
        for agent in agents:
            agent.close()
        for h in (a, b, c):
            h.stop()
        collector.close()
