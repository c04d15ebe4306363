"""A client written from docs/PROTOCOL.md alone (tests/doc_client.py) works with zbus in every
mode, through a real zbus-proxy: publishing to zbus consumers, subscribing to zbus
publishers, as a fast-pool member whose receipts balance the proxy's books, and as an
at-least-once member. No false loss anywhere, under topic filters."""

from __future__ import annotations

import time
from typing import Any

import zbus

from .conftest import ProxyProcess
from .doc_client import DocClient, DocPoolMember, DocReliableMember

EX = "notifications"
TOPICS = ("compute.instance.create.end", "network.port.create.end")
KEY_ID = "k1"


def ring(key: bytes) -> zbus.KeyRing:
    return zbus.KeyRing({KEY_ID: key})


def zbus_publish(run_dir: Any, key: bytes, count: int,
                 conn: zbus.Connection | None = None) -> None:
    """``count`` messages from zbus, alternating the two topics, numbered in the payload;
    flushed (so each stream's beacon follows), and closed unless ``conn`` was given."""
    own = conn is None
    conn = zbus.Connection(run_dir) if conn is None else conn
    pub = zbus.Publisher(conn.exchange(EX), zbus.MessageFactory(ring(key), "zbus-pub"))
    for i in range(count):
        pub.send(TOPICS[i % 2], i)
    conn.flush()
    if own:
        conn.close()


def test_the_doc_client_publishes_to_a_filtered_zbus_subscriber(
    proxy_process: ProxyProcess, key: bytes
) -> None:
    seen: list[Any] = []
    dispatcher = zbus.Dispatcher()
    dispatcher.bind(EX, "compute.#", lambda d: seen.append(d.payload))
    conn = zbus.Connection(proxy_process.run_dir)
    sub = conn.subscribe(dispatcher, ring(key))
    sub.ready()
    client = DocClient(str(proxy_process.run_dir), {KEY_ID: key}, KEY_ID)
    try:
        for i in range(0, 300, 3):  # batches of 3 on compute, single messages on network
            client.publish(EX, TOPICS[0], [i, i + 1, i + 2])
            client.publish(EX, TOPICS[1], [-i])
        client.beacons()
        while sub.process(0.5):
            pass
    finally:
        client.close()
    assert seen == list(range(300))
    assert sub.stats.lost == 0 and not sub.stats.rejected and sub.stats.beacons == 1
    sub.close()
    conn.close()


def test_the_doc_client_subscribes_to_zbus_with_no_false_loss(
    proxy_process: ProxyProcess, key: bytes
) -> None:
    client = DocClient(str(proxy_process.run_dir), {KEY_ID: key}, KEY_ID)
    try:
        sub = client.subscribe([f"{EX}/compute".encode()])  # section 8's prefix of compute.#
        sub.ready()
        zbus_publish(proxy_process.run_dir, key, 400)
        sub.read()
        assert [p for _, p in sub.received] == list(range(0, 400, 2))
        assert sub.streams.lost == 0 and sub.streams.replays == 0 and not sub.rejected
        sub.close()
    finally:
        client.close()


def test_a_doc_pool_member_beside_a_zbus_member_balances_the_books(
    proxy_process: ProxyProcess, key: bytes
) -> None:
    run_dir = proxy_process.run_dir
    binding = f"{EX}/compute.#"
    client = DocClient(str(run_dir), {KEY_ID: key}, KEY_ID)
    conn = zbus.Connection(run_dir)
    try:
        theirs: list[Any] = []
        dispatcher = zbus.Dispatcher()
        dispatcher.bind(EX, "compute.#", lambda d: theirs.append(d.payload))
        member = conn.join_pool("work", dispatcher, ring(key))
        member.ready()
        doc = DocPoolMember(client, "work", [binding], [f"{EX}/compute".encode()])
        # Not closed before the books are read: a closing publisher leaves its beacons with
        # the proxy, which publishes them again for ~30 s (to the pool too).
        zbus_publish(run_dir, key, 400, conn)
        deadline = time.monotonic() + 10
        while len(doc.payloads) + len(theirs) < 200 and time.monotonic() < deadline:
            member.process(0.05)
            doc.read(0.05)
        member.process(0.2)  # reads the stream's beacon, if it came this way (no delivery)
        member.report_receipts()
        doc.read(0.2)
        assert sorted(doc.payloads + theirs) == list(range(0, 400, 2))  # each exactly once
        assert doc.payloads and theirs  # both took a share
        pool = conn.proxy_stats()["fast_pools"]["work"]
        # 200 messages and the compute stream's beacon (flush sends it; a pool hands it out
        # like any envelope, and the member that reads it reports it).
        assert pool["handed_out"] == 201 and pool["unaccounted"] == 0, pool
        doc.close()
        member.close()
    finally:
        conn.close()
        client.close()


def test_a_doc_at_least_once_member_handles_everything(
    proxy_process: ProxyProcess, key: bytes
) -> None:
    run_dir = proxy_process.run_dir
    client = DocClient(str(run_dir), {KEY_ID: key}, KEY_ID)
    conn = zbus.Connection(run_dir)
    try:
        doc = DocReliableMember(client, "billing", [f"{EX}/compute.#"], window=20)
        zbus_publish(run_dir, key, 300)
        doc.read(0.5)
        assert sorted(doc.payloads) == list(range(0, 300, 2))
        stats = conn.proxy_stats()["reliable_pools"]["billing"]
        # 150 messages and the compute stream's beacon (the publisher's flush sent it)
        assert stats["accepted"] == stats["acked"] == 151, stats
        assert stats["in_flight"] == 0 and stats["queued"] == 0
        doc.close()
    finally:
        conn.close()
        client.close()
