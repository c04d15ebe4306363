"""A fast pool's per-stream books: what its queue dropped before hand-out is counted.

The proxy's origin PUB drops silently at its high-water mark when a pool's chain is full (no
member, or members behind): the C loop cannot count it, and ``unaccounted`` (handed out minus
receipts) never sees it. The members report, per stream, how many messages they read and
the lowest and highest sequence; the proxy adds them up per stream, and ``fast_pools[P]
["lost"]`` is every sequence of a stream's span that no member reports having had
(docs/RELIABILITY.md, "Fast pools: the receipts"). Each test checks it against the payloads'
own numbers, with a real ``zbus-proxy`` process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from zbus_proxy._members import PoolMembers

import zbus
from zbus._dispatch import StreamTally

from .conftest import ProxyProcess
from .doc_client import DocClient, DocPoolMember

EX = "notifications"
KEY = "compute.instance.create.end"
BINDING = f"{EX}/compute.#"
POOL = "work"
# A small pool queue at the proxy: a few hundred envelopes fill it.
SMALL_POOL = ("--pool-hwm", "20", "--subscriber-hwm", "20")


@pytest.fixture
def tight_proxy(run_dir: Path) -> Iterator[ProxyProcess]:
    proxy = ProxyProcess(run_dir, *SMALL_POOL).start()
    try:
        yield proxy
    finally:
        proxy.stop()


def fast_pool(conn: zbus.Connection) -> dict[str, Any]:
    stats: dict[str, Any] = conn.proxy_stats()["fast_pools"][POOL]
    return stats


def collecting(numbers: list[int]) -> zbus.Dispatcher:
    dispatcher = zbus.Dispatcher()
    dispatcher.bind(EX, "compute.#", lambda d: numbers.append(d.payload["n"]))
    return dispatcher


def publish(conn: zbus.Connection, factory: zbus.MessageFactory, numbers: range,
            key: str = KEY) -> None:
    for n in numbers:
        conn.publish(factory, factory.frames(EX, key, {"n": n}))


def read_until(members: list[zbus.PoolMember], numbers: list[int], done: Any,
               timeout: float = 60.0) -> None:
    """Run every member's handlers until ``done()``; they share one thread, so a member
    that has nothing waits only briefly before the next one's turn."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out with {len(numbers)} messages read")
        for member in members:
            while member.process(0.01):
                pass


def publish_until_read(pub: zbus.Connection, factory: zbus.MessageFactory,
                       members: list[zbus.PoolMember], numbers: list[int], n: int) -> int:
    """Publish n, n+1, ... one at a time, each read for a moment, until the last one
    published has been read; return the next number. The pool's chain is first in, first
    out: everything published before it has then been handed out (or dropped), and nothing
    of this stream is in flight."""
    deadline = time.monotonic() + 60
    while True:
        publish(pub, factory, range(n, n + 1))
        for _ in range(10):
            for member in members:
                while member.process(0.01):
                    pass
            if n in numbers:
                return n + 1
        n += 1
        assert time.monotonic() < deadline, "the pool's queue never emptied"


def test_a_pool_with_no_member_counts_the_middle_its_queue_dropped(
    tight_proxy: ProxyProcess, run_dir: Path, key: bytes
) -> None:
    """Issue 13 item 6: a pool declared before any member joins keeps what fits in its
    queue, drops most of the rest at the origin PUB, and keeps what comes after a member
    joined: the payloads show a missing middle, and the proxy's ``lost`` is exactly its
    size once the member has reported."""
    first, then = 5_000, 100
    numbers: list[int] = []
    with zbus.Connection(run_dir) as conn, \
            zbus.Connection(run_dir, settings=zbus.Settings(send_timeout=10)) as pub:
        conn.declare_pool(POOL, [BINDING])
        factory = zbus.MessageFactory(key, "pub1")
        publish(pub, factory, range(first))
        pub.flush()  # every one of them has passed the proxy: queued for the pool, or dropped
        member = conn.join_pool(POOL, collecting(numbers), key)
        member.ready()
        # Each read before the next is sent: from the first one read on, nothing drops.
        end = first
        while end < first + then:
            end = publish_until_read(pub, factory, [member], numbers, end)
        assert member.report_receipts(5)
        missing = sorted(set(range(end)) - set(numbers))
        assert len(numbers) == len(set(numbers))  # at most once
        assert missing, "nothing was dropped: the pool's queue held everything"
        # In the middle: the oldest were kept, and everything from the first message read
        # after the member joined (the few before it may have found the queue still full).
        joined = min(n for n in numbers if n >= first)
        assert missing[0] > 0 and missing[-1] < joined < first + 10
        pool = fast_pool(conn)
        print(f"\nno-member pool: published {end}, read {len(numbers)}, missing "
              f"{len(missing)} (between {missing[0]} and {missing[-1]}); proxy lost "
              f"{pool.get('lost')}, unaccounted {pool['unaccounted']}")
        assert pool["lost"] == len(missing), pool
        assert pool["unaccounted"] == 0 and pool["streams"] == 1, pool
        member.close()


def test_a_burst_into_two_members_counts_what_the_queue_dropped(
    tight_proxy: ProxyProcess, run_dir: Path, key: bytes
) -> None:
    """Issue 13 item 6: two members that fall behind a burst; what the origin dropped
    before hand-out is ``lost``, exactly the numbers no member got. A last message after the
    burst reveals a dropped tail."""
    burst = 5_000
    numbers: list[int] = []
    # The members' own queues small too, or they would take the whole burst.
    with zbus.Connection(run_dir, settings=zbus.Settings(pool_hwm=20)) as conn, \
            zbus.Connection(run_dir, settings=zbus.Settings(send_timeout=10)) as pub:
        members = [conn.join_pool(POOL, collecting(numbers), key) for _ in range(2)]
        for member in members:
            member.ready()
        factory = zbus.MessageFactory(key, "pub1")
        publish(pub, factory, range(burst))  # nobody reads: the members' queues fill
        pub.flush()
        # One more message, read, shows how far the stream went; then what the members
        # were handed is all read.
        end = publish_until_read(pub, factory, members, numbers, burst)
        read_until(members, numbers, lambda: sum(m.receipts for m in members)
                   == fast_pool(conn)["handed_out"])
        for member in members:
            assert member.report_receipts(5)
        missing = set(range(end)) - set(numbers)
        assert len(numbers) == len(set(numbers))
        assert missing, "nothing was dropped: the queues held the whole burst"
        assert all(m.receipts for m in members)  # both took a share
        pool = fast_pool(conn)
        print(f"\ntwo members, burst: published {end}, read {len(numbers)}, missing "
              f"{len(missing)}; proxy lost {pool.get('lost')}, unaccounted {pool['unaccounted']}")
        assert pool["lost"] == len(missing), pool
        assert pool["unaccounted"] == 0, pool
        for member in members:
            member.close()
        # The books outlive the members: their final reports leave the counts in place.
        assert fast_pool(conn)["lost"] == len(missing)


def test_nothing_lost_is_zero_over_many_streams(
    proxy_process: ProxyProcess, run_dir: Path, key: bytes
) -> None:
    """Two publishers, three topics each (six streams), two members: nothing is lost, so
    ``lost`` is 0 and six streams are tracked."""
    per_stream = 300
    keys = ("compute.instance.create.end", "compute.instance.delete.end", "compute.volume.x")
    numbers: list[int] = []
    with zbus.Connection(run_dir) as conn:
        members = [conn.join_pool(POOL, collecting(numbers), key) for _ in range(2)]
        for member in members:
            member.ready()
        total = 2 * len(keys) * per_stream
        for p in range(2):
            # close() flushes: the messages and each stream's beacon have passed the proxy.
            with zbus.Connection(run_dir, settings=zbus.Settings(send_timeout=10)) as pub:
                factory = zbus.MessageFactory(key, f"pub{p}")
                for k, routing_key in enumerate(keys):
                    base = (p * len(keys) + k) * per_stream
                    publish(pub, factory, range(base, base + per_stream), routing_key)
        read_until(members, numbers, lambda: len(numbers) == total)
        read_until(members, numbers, lambda: sum(m.stats.beacons for m in members) >= 6)
        for member in members:
            assert member.report_receipts(5)
        assert sorted(numbers) == list(range(total))
        pool = fast_pool(conn)
        assert pool["lost"] == 0 and pool["streams"] == 6, pool
        assert pool["unaccounted"] == 0, pool
        for member in members:
            member.close()


def test_the_books_are_whole_again_after_a_proxy_restart(
    proxy_process: ProxyProcess, run_dir: Path, key: bytes
) -> None:
    """A restarted proxy has forgotten the books, and a member reports only the streams it
    read since: so once back, every member sends all its books again. Else the one member
    that reads the stream's next message would report it alone, and the other's share
    would show as lost."""
    numbers: list[int] = []
    with zbus.Connection(run_dir) as conn:
        members = [conn.join_pool(POOL, collecting(numbers), key) for _ in range(2)]
        for member in members:
            member.ready()
        factory = zbus.MessageFactory(key, "pub1")
        with zbus.Connection(run_dir) as pub:
            publish(pub, factory, range(100))
        read_until(members, numbers, lambda: len(numbers) == 100)
        assert all(m.report_receipts(5) for m in members)
        assert all(m.receipts for m in members)  # both took a share
        proxy_process.stop()
        proxy_process.start()
        read_until(members, numbers, lambda: all(m.link.reconnects and m.live for m in members))
        with zbus.Connection(run_dir) as pub:
            end = publish_until_read(pub, factory, members, numbers, 100)
        assert all(m.report_receipts(5) for m in members)
        missing = set(range(end)) - set(numbers)
        pool = fast_pool(conn)
        assert pool["lost"] == len(missing) == 0, pool
        for member in members:
            member.close()


@pytest.mark.parametrize("backend_name", ["threads", "asyncio", "eventlet"])
def test_every_backends_member_reports_its_books(
    backend_name: str, proxy_process: ProxyProcess, run_dir: Path, key: bytes
) -> None:
    """The threads, asyncio and eventlet members all keep books and report them, up to
    their final report on close."""
    from .test_backends import BACKENDS

    backend = BACKENDS[backend_name]()
    try:
        conn = backend.connect(run_dir)
        numbers: list[int] = []
        dispatcher = zbus.Dispatcher()
        dispatcher.bind(EX, "compute.#",
                        backend.handler(lambda d: numbers.append(d.payload["n"])))
        member = backend.pool_member(conn, POOL, dispatcher, key)
        factory = zbus.MessageFactory(key, "pub1")
        backend.publish(conn, factory, KEY, [{"n": n} for n in range(100)], exchange=EX)
        assert backend.run(member, 100) == 100
        backend.close(member, conn)
        with zbus.Connection(run_dir) as reader:
            deadline = time.monotonic() + 10
            while (pool := fast_pool(reader))["members_closed"] < 1:
                assert time.monotonic() < deadline, pool
                time.sleep(0.02)  # the final report of another socket: no event to wait on
        assert pool["lost"] == 0 and pool["streams"] == 1, pool
        assert pool["members_without_streams"] == 0 and pool["unaccounted"] == 0, pool
    finally:
        backend.shutdown()


def control(run_dir: Path, request: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """One raw request on the proxy's control socket (a fresh REQ each time)."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(f"ipc://{run_dir}/control.sock")
        sock.send(msgpack.packb(request))
        assert sock.poll(int(timeout * 1000)), f"no answer to {request.get('op')!r}"
        reply: dict[str, Any] = msgpack.unpackb(sock.recv(), raw=False)
        return reply
    finally:
        sock.close()


STREAM = b"\x01" * 8
BIG = 2**64 - 1


@pytest.mark.parametrize(("streams", "why"), [
    ("many", "streams must be"),
    ([["pub", STREAM, 1, 1]], "streams must be"),
    ([["pub", STREAM, 1, 1, 1, 1]], "streams must be"),
    ([[1, STREAM, 1, 1, 1]], "publisher_id"),
    ([["", STREAM, 1, 1, 1]], "publisher_id"),
    ([["p" * 256, STREAM, 1, 1, 1]], "publisher_id"),
    ([["pub", "01234567", 1, 1, 1]], "stream_id"),
    ([["pub", b"\x01" * 7, 1, 1, 1]], "stream_id"),
    ([["pub", STREAM, -1, 1, 1]], "count"),
    ([["pub", STREAM, True, 1, 1]], "count"),
    ([["pub", STREAM, 1.0, 1, 1]], "count"),
    ([["pub", STREAM, 1, 0, 1]], "lowest"),
    ([["pub", STREAM, 1, 1, -1]], "highest"),
    ([["pub", STREAM, BIG, 1, BIG]], "span"),
    ([["pub", STREAM, 0, 1, BIG]], "span"),
    ([["pub", STREAM, 1, 10, 5]], "lowest"),
    ([["pub", STREAM, 3, 1, 2]], "count"),
    ([["pub", STREAM, 1, 1, 1]] * 1001, "at most 1000"),
    ({"pub": 1}, "streams must be"),
])
def test_hostile_stream_receipts_are_refused_and_counted(
    proxy_process: ProxyProcess, run_dir: Path, streams: Any, why: str
) -> None:
    """Every field of a report is checked before anything is taken: a refused report
    changes no book, is counted, and the control thread keeps answering."""
    with zbus.Connection(run_dir) as conn:
        conn.declare_pool(POOL, [BINDING])
        report = {"op": "pool_receipts", "pool": POOL, "member": "m1", "received": 1,
                  "streams": streams}
        reply = control(run_dir, report)
        assert reply["ok"] is False and why in reply["error"], reply
        assert control(run_dir, {"op": "ping"})["ok"] is True
        pool = fast_pool(conn)
        assert pool["refused_reports"] == 1 and pool["reported"] == 0, pool
        assert pool["lost"] == 0 and pool["streams"] == 0, pool


def test_huge_counts_and_foreign_reports_never_break_the_stats(
    proxy_process: ProxyProcess, run_dir: Path
) -> None:
    """Counts that would not fit the stats reply's integers are refused; a stream entry
    that would take the books beyond their span is left out and counted; a member that
    reports no streams (an older zbus) makes ``lost`` unknown (None) rather than wrong. The
    control thread answers throughout."""
    with zbus.Connection(run_dir) as conn:
        conn.declare_pool(POOL, [BINDING])
        base = {"op": "pool_receipts", "pool": POOL}
        for fields, why in (({"member": "m1", "received": BIG}, "received must"),
                            ({"member": "m1", "received": 1, "frames": BIG}, "frames must"),
                            ({"member": "m1", "received": 1, "final": "yes"}, "final must")):
            reply = control(run_dir, {**base, **fields})
            assert reply["ok"] is False and why in reply["error"], reply
        # Two reports each within bounds whose merged span is not (a stream whose numbers
        # jump: a key holder forging another's stream): that entry is left out and
        # counted, the rest of the report taken.
        assert control(run_dir, {**base, "member": "m1", "received": 1,
                                 "streams": [["pub", STREAM, 1, 1, 1]]})["ok"]
        assert control(run_dir, {**base, "member": "m2", "received": 1,
                                 "streams": [["pub", STREAM, 1, BIG, BIG],
                                             ["pub", b"\x02" * 8, 1, 1, 1]]})["ok"]
        # An unknown pool is counted too, proxy-wide.
        reply = control(run_dir, {**base, "pool": "nope", "member": "m1", "received": 1})
        assert reply["ok"] is False and "no fast pool" in reply["error"]
        assert control(run_dir, {"op": "ping"})["ok"] is True
        stats = conn.proxy_stats()
        pool = stats["fast_pools"][POOL]
        assert pool["refused_reports"] == 3 and pool["reported"] == 2, pool
        assert pool["streams_refused"] == 1, pool
        assert pool["lost"] == 0 and pool["streams"] == 2, pool
        assert stats["pool_receipts_refused"] == 4, stats["pool_receipts_refused"]
        # A report with no "streams" field: that member's share is in no stream's book.
        assert control(run_dir, {**base, "member": "old", "received": 1})["ok"]
        pool = fast_pool(conn)
        assert pool["lost"] is None and pool["members_without_streams"] == 1, pool


def test_a_doc_member_beside_a_zbus_member_keeps_the_books_even(
    proxy_process: ProxyProcess, run_dir: Path, key: bytes
) -> None:
    """A member written from docs/PROTOCOL.md alone (tests/doc_client.py) keeps and reports
    its stream books as section 8 says: beside a zbus member, nothing lost shows as 0."""
    numbers: list[int] = []
    client = DocClient(str(run_dir), {"k1": key}, "k1")
    try:
        with zbus.Connection(run_dir) as conn:
            member = conn.join_pool(POOL, collecting(numbers), zbus.KeyRing({"k1": key}))
            member.ready()
            doc = DocPoolMember(client, POOL, [BINDING], [f"{EX}/compute".encode()])
            with zbus.Connection(run_dir) as pub:
                factory = zbus.MessageFactory(zbus.KeyRing({"k1": key}), "pub1")
                publish(pub, factory, range(0, 400, 2), "compute.a")
                publish(pub, factory, range(1, 400, 2), "compute.b")
            deadline = time.monotonic() + 30
            while len(numbers) + len(doc.payloads) < 400:
                assert time.monotonic() < deadline, "the messages did not all arrive"
                member.process(0.02)
                doc.read(0.02)
            assert member.report_receipts(5)
            doc.report()
            assert sorted(numbers + [p["n"] for p in doc.payloads]) == list(range(400))
            assert numbers and doc.payloads  # both took a share
            pool = fast_pool(conn)
            assert pool["lost"] == 0 and pool["streams"] == 2, pool
            assert pool["members_without_streams"] == 0, pool
            doc.close()
            member.close()
    finally:
        client.close()


def test_books_add_members_up_per_stream() -> None:
    """StreamBooks without a proxy: shares add up, a beacon read by another member
    reveals a dropped tail, a count that starts again (the member dropped the stream from
    its own bounded books) is new, a closing member's counts stay, and federation or a
    member without books makes ``lost`` unknown."""
    state = threading.Lock()
    members = PoolMembers(state, "t")
    a, b = ("pub", b"\x01" * 8), ("pub", b"\x02" * 8)
    members.record(POOL, "m1", 3, 9, False, [[*a, 3, 1, 5]])  # 1..5, three of them
    members.record(POOL, "m2", 3, 9, False, [[*a, 1, 2, 2], [*b, 2, 1, 2]])
    assert book(members)["lost"] == 1 and book(members)["streams"] == 2  # a's 1..5: 4 had
    members.record(POOL, "m2", 4, 12, False, [[*a, 1, 8, 7]])  # a beacon: a sent up to 7
    assert book(members)["lost"] == 3  # 6 and 7 too
    members.record(POOL, "m1", 4, 12, False, [[*a, 1, 6, 6]])  # counting a again: 6 is new
    assert book(members)["lost"] == 2
    members.record(POOL, "m1", 4, 12, True, [])  # closes: what it had stays had
    assert book(members)["lost"] == 2 and book(members)["members_closed"] == 1
    assert book(members, federated=True)["lost"] is None
    members.record(POOL, "old", 1, 3, False, None)
    assert book(members)["lost"] is None and book(members)["members_without_streams"] == 1


def test_a_member_tally_reads_beacons_replays_and_keeps_its_bound() -> None:
    tally = StreamTally(limit=2)
    tally.add("p", b"s1", 11, 0)  # a beacon first: nothing had, the stream went to 10
    assert tally.take(10) == [["p", b"s1", 0, 11, 10]]
    tally.add("p", b"s1", 11, 3)
    tally.add("p", b"s1", 20, 0)
    tally.uncount("p", b"s1")  # one of them was a second copy
    tally.add("p", b"s2", 1, 1)
    assert tally.changed == 2
    assert tally.take(1) == [["p", b"s1", 2, 11, 19]] and tally.changed == 1
    tally.add("p", b"s3", 1, 1)  # s1 is the least recently updated: dropped
    assert len(tally) == 2 and tally.evicted == 1
    assert tally.take(10) == [["p", b"s2", 1, 1, 1], ["p", b"s3", 1, 1, 1]]
    tally.mark_all()  # after a proxy restart: all of them again
    assert tally.changed == 2
    tally.take(10)
    tally.add("p", b"s3", 2**60, 1)  # numbers that jump: never reported, counted
    assert tally.take(10) == [] and tally.unreportable == 1


def book(members: PoolMembers, federated: bool = False) -> dict[str, Any]:
    stats: dict[str, Any] = members.stats([POOL], {}, federated)[POOL]
    return stats
