"""End to end against a real ``zbus-proxy`` process, over ipc, with consumers in processes.

Accounting is exact: every consumer forwards (publisher, sequence) of each delivery to a
collector socket owned by the test (tests/agents.py), and the test checks the multisets.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

import zbus

from .agents import Agent, Collector
from .conftest import ProxyProcess, Spawn, spawner

EXCHANGE = "notifications"
KEY = "compute.instance.create.end"
BINDING = f"{EXCHANGE}/compute.#"

@pytest.fixture
def spawn(run_dir: Path, key: bytes, collector: Collector, agents: list[Agent]) -> Spawn:
    return spawner(Agent, run_dir, key, agents, collector)


def subscribers(spawn: Spawn, count: int, binding: str = BINDING) -> list[Agent]:
    agents = [spawn("subscribe", f"sub{i}", "--bind", binding) for i in range(count)]
    for agent in agents:
        agent.wait_ready()
    return agents


def workers(spawn: Spawn, pool: str, count: int, binding: str = BINDING) -> list[Agent]:
    agents = [spawn("worker", f"{pool}-w{i}", "--pool", pool, "--bind", binding)
              for i in range(count)]
    for agent in agents:
        agent.wait_ready()
    return agents


def publish(spawn: Spawn, count: int, publisher_id: str = "pub1") -> Agent:
    """A publisher process sending ``count`` messages; returns once it has sent them all."""
    agent = spawn("publish", publisher_id, "--count", str(count), "--publisher-id",
                  publisher_id, "--send-timeout", "10")
    agent.wait_ready()
    done = agent.readline(60).split()
    assert done[:3] == ["DONE", "1", str(count)], done
    assert agent.wait(10) == 0
    return agent


def deliver_all(collector: Collector, subs: list[Agent], pool: list[Agent], count: int,
                what: str) -> tuple[list[str], list[str]]:
    """Wait until each of ``subs`` got ``count`` and the ``pool`` members ``count`` between
    them, then stop them all; the names of the subscribers and of the members."""
    sub_names = [a.name for a in subs]
    pool_names = [a.name for a in pool]
    collector.until(
        lambda: all(len(collector.seen[n]) >= count for n in sub_names)
        and sum(len(collector.seen[n]) for n in pool_names) >= count,
        60, what,
    )
    collector.stop_all(subs + pool)
    return sub_names, pool_names


def assert_in_order(collector: Collector, name: str, count: int, publisher: str) -> None:
    """``name`` got sequences 1..count of ``publisher``, each once, strictly in order."""
    seqs = [seq for pub, seq, _ in collector.seen[name] if pub == publisher]
    assert seqs == list(range(1, count + 1)), (
        f"{name}: {len(seqs)} messages, first wrong index "
        f"{next((i for i, s in enumerate(seqs) if s != i + 1), None)}"
    )
    stats = collector.stats[name]["stats"]
    assert stats["lost"] == 0 and stats["reordered"] == 0, stats


def assert_exactly_once(collector: Collector, names: list[str], count: int,
                        publisher: str) -> dict[str, int]:
    """The members ``names`` of one pool got 1..count of ``publisher`` exactly once in total."""
    got = collector.multiset(names)
    assert got == Counter((publisher, seq) for seq in range(1, count + 1)), (
        f"missing {count - len(got)}, duplicated {sum(n - 1 for n in got.values() if n > 1)}"
    )
    return {name: len(collector.seen[name]) for name in names}


def test_fanout_and_pool_get_every_message(
    proxy_process: ProxyProcess, spawn: Spawn, collector: Collector
) -> None:
    """3 subscribers each get all 10,000 in order; a pool of 3 gets them once, shared."""
    count = 10_000
    subs = subscribers(spawn, 3)
    pool = workers(spawn, "billing", 3)
    publish(spawn, count)

    sub_names, pool_names = deliver_all(collector, subs, pool, count, "all deliveries")
    for name in sub_names:
        assert_in_order(collector, name, count, "pub1")
        stats = collector.stats[name]["stats"]
        assert stats["received"] == count
        assert stats["rejected"] == {}
    shares = assert_exactly_once(collector, pool_names, count, "pub1")
    assert all(share > 0 for share in shares.values()), shares
    assert sum(collector.stats[n]["stats"]["received"] for n in pool_names) == count


def test_subscriber_and_two_pools_on_one_type(
    proxy_process: ProxyProcess, spawn: Spawn, collector: Collector
) -> None:
    """A subscriber and two pools bound to the same type consume it independently."""
    count = 3_000
    (sub,) = subscribers(spawn, 1, f"{EXCHANGE}/{KEY}")
    pool_a = workers(spawn, "audit", 2, f"{EXCHANGE}/compute.instance.*.end")
    pool_b = workers(spawn, "metering", 2, f"{EXCHANGE}/#")
    publish(spawn, count)

    names_a = [a.name for a in pool_a]
    names_b = [a.name for a in pool_b]
    collector.until(
        lambda: len(collector.seen[sub.name]) >= count
        and sum(len(collector.seen[n]) for n in names_a) >= count
        and sum(len(collector.seen[n]) for n in names_b) >= count,
        60, "all deliveries",
    )
    collector.stop_all([sub, *pool_a, *pool_b])
    assert_in_order(collector, sub.name, count, "pub1")
    for names in (names_a, names_b):
        shares = assert_exactly_once(collector, names, count, "pub1")
        assert all(share > 0 for share in shares.values()), shares


def forged_frames(key: bytes, legit: list[bytes], n: int) -> tuple[list[bytes], str]:
    """The ``n``-th forgery (cycling through the kinds) and the reason it must be counted as."""
    topic = legit[0]
    other = zbus.generate_key()
    kind = n % 7
    if kind == 0:  # another key under another key id
        ring = zbus.KeyRing({"mallory": other})
        return zbus.MessageFactory(ring, "mallory").frames(EXCHANGE, KEY, {"evil": n}), \
            "unknown_key"
    if kind == 1:  # the right key id, the wrong key
        return zbus.MessageFactory(other, "mallory").frames(EXCHANGE, KEY, {"evil": n}), \
            "bad_signature"
    if kind == 2:  # a correctly signed message whose envelope was altered in flight
        frames = zbus.MessageFactory(key, "mallory").frames(EXCHANGE, KEY, {"evil": n})
        envelope = bytearray(frames[1])
        envelope[-1] ^= 0x01
        return [frames[0], bytes(envelope), frames[2]], "bad_signature"
    if kind == 3:  # garbage envelope and signature under a topic the subscribers want
        return [topic, os.urandom(60), os.urandom(40)], "bad_signature"
    if kind == 4:  # validly signed garbage: must be refused at decoding, not crash
        from zbus._envelope import signature_frame

        junk = b"\xc1" + os.urandom(30)  # 0xc1 is never valid msgpack
        return [topic, junk, signature_frame(zbus.KeyRing.of(key), topic, junk)], "malformed"
    if kind == 5:  # too few frames
        return [topic, legit[1]], "frame_count"
    return [*legit, b"extra"], "frame_count"  # too many frames


def test_forged_messages_are_counted_and_dropped(
    proxy_process: ProxyProcess, run_dir: Path, key: bytes, spawn: Spawn, collector: Collector
) -> None:
    """Forgeries interleaved with a real stream: each counted by reason, none delivered."""
    count = 2_000
    subs = subscribers(spawn, 2)
    pool = workers(spawn, "billing", 2)
    factory = zbus.MessageFactory(key, "pub1")
    expected: Counter[str] = Counter()
    with zbus.Connection(run_dir, settings=zbus.Settings(send_timeout=10)) as conn:
        for i in range(count):
            legit = factory.frames(EXCHANGE, KEY, {"n": i})
            if i % 10 == 5:
                frames, reason = forged_frames(key, legit, i // 10)
                conn.send_frames(frames)
                expected[reason] += 1
            conn.send_frames(legit)  # the stream ends with a legit message: see below
    # Everything travels one path in order, so once the last legit message is in, every
    # forgery before it has been judged.
    sub_names, pool_names = deliver_all(collector, subs, pool, count, "all legit deliveries")
    forged = sum(expected.values())
    three_frame = forged - expected["frame_count"]
    for name in sub_names:
        assert_in_order(collector, name, count, "pub1")
        assert all(pub == "pub1" for pub, _, _ in collector.seen[name])
        stats = collector.stats[name]["stats"]
        assert stats["rejected"] == dict(expected), stats
        assert stats["received"] == count + three_frame, stats
    # In a pool each forgery reaches one member: the rejections add up across the members.
    assert_exactly_once(collector, pool_names, count, "pub1")
    total: Counter[str] = Counter()
    for name in pool_names:
        total.update(collector.stats[name]["stats"]["rejected"])
    assert total == expected


def test_proxy_restart_streams_resume(
    proxy_process: ProxyProcess, spawn: Spawn, collector: Collector, run_dir: Path
) -> None:
    """Stop the proxy under a live stream, start it again: everyone comes back by itself.

    The subscriber's books balance exactly: what it received plus the gaps it counted is the
    whole span it was live for (it was ready before the first message, so 1..last).
    """
    (sub,) = subscribers(spawn, 1)
    (worker,) = workers(spawn, "billing", 1)
    publisher = spawn("publish", "pub1", "--until-stop", "--interval", "0.0005",
                      "--publisher-id", "pub1", "--send-timeout", "0.5")
    publisher.wait_ready()

    def progressed(name: str, beyond: int) -> Callable[[], bool]:
        return lambda: bool(collector.seen[name]) and collector.seen[name][-1][1] > beyond

    collector.until(progressed(sub.name, 300), 30, "the stream to flow")
    collector.until(progressed(worker.name, 300), 30, "the pool to flow")

    assert proxy_process.stop(signal.SIGTERM) == 0
    collector.pump(0.2)
    sub_before = collector.seen[sub.name][-1][1]
    worker_before = collector.seen[worker.name][-1][1]
    proxy_process.start()

    # The pool is back from pools.json before any member could have declared it again (the
    # worker declares only in ready(), which it called once, before the restart).
    with zbus.Connection(run_dir) as conn:
        assert conn.control.request("pools")["pools"] == {"billing": [BINDING]}

    collector.until(progressed(sub.name, sub_before + 300), 30, "the stream to resume")
    collector.until(progressed(worker.name, worker_before + 300), 30, "the pool to resume")
    publisher.tell_stop()
    done = publisher.readline(30).split()
    assert done[0] == "DONE", done
    last = int(done[2])
    assert publisher.wait(10) == 0
    collector.until(progressed(sub.name, last - 1), 30, "the last message")
    collector.stop_all([sub, worker])

    seqs = collector.sequences(sub.name)
    assert seqs == sorted(set(seqs)), "subscriber saw duplicates or reordering"
    stats = collector.stats[sub.name]["stats"]
    assert seqs[0] == 1 and seqs[-1] == last
    assert stats["received"] == len(seqs)
    assert stats["received"] + stats["lost"] == last, stats
    assert stats["lost"] == len(set(range(1, last + 1)) - set(seqs))
    assert stats["rejected"] == {} and stats["reordered"] == 0

    # The worker got every message at most once, and messages from both sides of the restart.
    wseqs = collector.sequences(worker.name)
    assert len(wseqs) == len(set(wseqs))
    assert min(wseqs) <= worker_before < max(wseqs)


def test_replayed_messages_are_counted_and_dropped(
    proxy_process: ProxyProcess, run_dir: Path, key: bytes, spawn: Spawn, collector: Collector
) -> None:
    """Validly signed copies of earlier messages, re-injected, are rejected as replays.

    (Subscribers only: a pool member that never saw the original cannot tell a replay from
    the first copy; replay state is per consumer by design.)
    """
    count = 1_000
    subs = subscribers(spawn, 2)
    factory = zbus.MessageFactory(key, "pub1")
    sent: list[list[bytes]] = []
    replays = 0
    with zbus.Connection(run_dir, settings=zbus.Settings(send_timeout=10)) as conn:
        for i in range(count):
            sent.append(factory.frames(EXCHANGE, KEY, {"n": i}))
            conn.send_frames(sent[-1])
            if i % 10 == 9:
                conn.send_frames(sent[i - 3])  # an old message, byte for byte
                replays += 1
        conn.send_frames(factory.frames(EXCHANGE, KEY, {"n": count}))  # ends the stream
    names = [a.name for a in subs]
    collector.until(lambda: all(len(collector.seen[n]) >= count + 1 for n in names), 60,
                    "all legit deliveries")
    collector.stop_all(subs)
    for name in names:
        assert_in_order(collector, name, count + 1, "pub1")
        stats = collector.stats[name]["stats"]
        assert stats["rejected"] == {"replay": replays}, stats
