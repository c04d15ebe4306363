"""The Redis directory against a real redis-server the test starts on 127.0.0.1 (free port).

A proxy that joins late starts receiving; a proxy that is SIGKILLed drops out of the others'
peer lists after its TTL, while the stream between the others flows on without a gap.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from zbus_proxy._directory import PeerInfo, RedisDirectory

from .agents import Agent, Collector
from .conftest import short_tmp_dir
from .federation_agents import FedAgent, Host, make_hosts, until, wait_meshed

BINDING = "notifications/compute.#"
TTL = 2.0

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A private redis-server on 127.0.0.1, no persistence, ended after the test."""
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--protected-mode", "yes"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:  # readiness: the server answers PING
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def tmp() -> Iterator[Path]:
    with short_tmp_dir("zd-") as path:
        yield path


def test_late_join_and_sigkill_with_a_redis_directory(
    tmp: Path, key: bytes, redis_url: str
) -> None:
    hosts = make_hosts(tmp)
    a, b, c = hosts
    allow = tmp / "allow"
    allow.write_text("".join(h.keys.public.decode() + "\n" for h in hosts))
    extra = ("--directory", "redis", "--redis-url", redis_url, "--directory-ttl", str(TTL),
             "--curve-allow", str(allow))
    collector = Collector(tmp)
    agents: list[FedAgent | Agent] = []

    def consumer(host: Host, name: str) -> FedAgent:
        agent = FedAgent(host.run_dir, "subscribe", "--key", key.hex(), "--collector",
                         collector.endpoint, "--bind", BINDING, name=name)
        agents.append(agent)
        agent.wait_ready()
        return agent

    def last(name: str) -> int:
        return collector.seen[name][-1][1] if collector.seen[name] else 0

    try:
        a.start(*extra)
        b.start(*extra)
        wait_meshed([a, b])
        sub_b = consumer(b, "sub-b")
        assert sub_b.peers == [a.node]
        pub = Agent(a.run_dir, "publish", "--key", key.hex(), "--until-stop", "--interval",
                    "0.001", "--publisher-id", "pa", "--send-timeout", "2", name="pa")
        agents.append(pub)
        pub.wait_ready()
        collector.until(lambda: last("sub-b") > 100, 20, "the stream to reach b")

        # C joins late: found through Redis, linked, and its subscriber receives.
        c.start(*extra)
        wait_meshed(hosts)
        sub_c = consumer(c, "sub-c")
        assert sorted(sub_c.peers) == sorted([a.node, b.node])
        joined_at = last("sub-c")
        collector.until(lambda: last("sub-c") > joined_at + 200, 20, "the stream to reach c")
        assert c.node in a.stats()["federation"]["peers"]

        # SIGKILL C: no clean leave, its key must expire; the stream to B flows meanwhile.
        killed_at = time.monotonic()
        c.stop(signal.SIGKILL)
        sub_c.close()
        before = last("sub-b")

        def forgotten() -> bool:
            return all(c.node not in h.stats()["federation"]["peers"]
                       and f"peer-{c.node}" not in h.stats()["devices"] for h in (a, b))

        until(forgotten, TTL + 10, "A and B to drop C")
        took = time.monotonic() - killed_at
        assert took >= TTL * 0.5, took  # it went by the TTL, not by a lucky guess
        collector.until(lambda: last("sub-b") > before + 300, 20, "the stream after the kill")

        pub.tell_stop()
        done = pub.readline(30).split()
        assert done[0] == "DONE", done
        sent = int(done[2])
        collector.until(lambda: last("sub-b") >= sent, 20, "the last message at b")
        collector.stop_all([sub_b])
        seqs = collector.sequences("sub-b")
        # Ready before the first message, so B has it all, once, in order, the kill or not.
        assert seqs == list(range(1, sent + 1)), (len(seqs), sent)
        print(f'{{"test": "redis directory", "sent": {sent}, "sub-b": {len(seqs)}, '
              f'"sub-c": {len(collector.seen["sub-c"])}, "dropped_after_s": {took:.2f}}}')
    finally:
        for agent in agents:
            agent.close()
        for host in hosts:
            host.stop()
        collector.close()


def _entry(pid: str, port: int, key: bytes) -> str:
    return json.dumps(PeerInfo(pid, f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{port + 1}",
                               key).as_dict())


def test_hostile_directory_entries_are_skipped_and_shadow_no_peer(redis_url: str) -> None:
    """Issue 14, item 11: a writable Redis. One entry nested 100,000 deep made every refresh
    raise RecursionError (hosts never linked); entries claiming a real peer's id and key with
    a sink origin took its place. Each is skipped and counted; the real peers stay."""
    import redis

    prefix = "zbus:proxy:"
    me_key, b_key, c_key = (zmq.curve_keypair()[0] for _ in range(3))
    me = PeerInfo("a", "tcp://127.0.0.1:7001", "tcp://127.0.0.1:7002", me_key)
    client = redis.Redis.from_url(redis_url)
    directory = RedisDirectory(redis_url, me, ttl=30, prefix=prefix)
    try:
        client.set(prefix + "b", _entry("b", 7003, b_key))
        client.set(prefix + "c", _entry("c", 7005, c_key))
        bad = {
            "deep": b"[" * 100_000 + b"]" * 100_000,
            "deep-map": b'{"id": ' + b"[" * 5000 + b"]" * 5000 + b"}",
            "huge": json.dumps({"id": "huge", "origin": "tcp://127.0.0.1:1",
                                "control": "tcp://127.0.0.1:2",
                                "public_key": "x" * 100_000}).encode(),
            "extra": json.dumps({**json.loads(_entry("extra", 7007, b"")), "x": 1}).encode(),
            "notjson": b"\xff{",
            "list": b"[1, 2]",
        }
        for name, value in bad.items():
            client.set(prefix + name, value)
        assert directory.refresh().keys() == {"b", "c"}
        assert directory.rejected == len(bad)
        assert directory.conflicts == 0
        client.delete(*(prefix + name for name in bad))

        # 20 entries claiming b's id and key at a sink; 20 more with ids of their own and
        # b's key; one claiming this proxy's key. None shadows b or us.
        for n in range(20):
            client.set(f"{prefix}sink-{n}", _entry("b", 7999, b_key))
            client.set(f"{prefix}b{n}", _entry(f"b{n}", 7999, b_key))
        client.set(prefix + "m", _entry("m", 7999, me_key))
        found = directory.refresh()
        assert found.keys() == {"b", "c"}
        assert found["b"].origin == "tcp://127.0.0.1:7003"
        assert directory.conflicts == 41
        assert directory.rejected == len(bad)

        # The real b's own key rewritten to point at the sink: b's id is bound to its key,
        # so a new key under it is refused; the sink only succeeds by holding b's key.
        client.set(prefix + "b", _entry("b", 7999, c_key))
        for _ in range(2):  # and stays refused: no b<n> takes b's key meanwhile
            assert directory.refresh().keys() == {"c"}
        assert directory.conflicts == 41 + 2 * 42
        # b's key expires (b left): its id is free for a new key.
        client.delete(prefix + "b", *(f"{prefix}b{n}" for n in range(20)))
        directory.refresh()
        client.set(prefix + "b", _entry("b", 7003, c_key.swapcase()))
        assert directory.refresh().keys() == {"b", "c"}
    finally:
        directory.close()
        client.close()


def test_an_entry_shadows_no_configured_peer(redis_url: str) -> None:
    """A peer also named in the config keeps its configured key against a Redis entry."""
    import redis

    prefix = "zbus:proxy:"
    me_key, b_key, m_key = (zmq.curve_keypair()[0] for _ in range(3))
    me = PeerInfo("a", "tcp://127.0.0.1:7001", "tcp://127.0.0.1:7002", me_key)
    b = PeerInfo("b", "tcp://127.0.0.1:7003", "tcp://127.0.0.1:7004", b_key)
    client = redis.Redis.from_url(redis_url)
    directory = RedisDirectory(redis_url, me, ttl=30, prefix=prefix, configured=[b])
    try:
        client.set(prefix + "b", _entry("b", 7999, m_key))
        client.set(prefix + "m", _entry("m", 7999, b_key))
        assert directory.refresh() == {}
        assert directory.conflicts == 2
    finally:
        directory.close()
        client.close()
