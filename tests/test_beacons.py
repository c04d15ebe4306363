"""Beacons left with the proxy: kept per stream, published again after the publisher is gone,
and every hostile variant refused and counted."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest
from zbus_proxy._beacons import REPUBLISH_AFTER, BeaconStore

import zbus

from .conftest import ProxyProcess

KEY = bytes(range(32))


def test_the_newest_beacon_of_each_stream_is_published_again_on_schedule() -> None:
    store = BeaconStore()
    factory = zbus.MessageFactory(KEY, "svc")
    factory.frames("ex", "a", 1)
    first = factory.beacons()
    factory.frames("ex", "a", 2)
    factory.frames("ex", "b", 1)
    second = factory.beacons()
    assert store.add(first, now=0.0) == 0
    assert store.add(second, now=0.5) == 0
    assert store.add(first, now=0.6) == 0  # older than what is kept: ignored, not refused
    assert len(store) == 2  # one per stream: a's newer beacon replaced its older one
    times = [0.5 + t for t in REPUBLISH_AFTER]
    sent = [store.due(t) for t in [0.9, *times, times[-1] + 100]]
    assert sent[0] == []
    assert all(sorted(s) == sorted(second) for s in sent[1:-1])
    assert sent[-1] == [] and len(store) == 0
    assert store.stats()["republished"] == 2 * len(REPUBLISH_AFTER)


@pytest.mark.parametrize(
    "items",
    [
        "not a list",
        [[b"ex/a", b"x"]],
        [[b"ex/a", msgpack.packb([2, "svc", bytes(8), 1, []]), "str not bytes"]],
        [[b"no topic", msgpack.packb([2, "svc", bytes(8), 1, []]), bytes(36)]],
        [[b"ex/a", msgpack.packb([2, "svc", bytes(8), 1, [[1.0, "a", 1, None]]]), bytes(36)]],
        [[b"ex/a", msgpack.packb([1, "svc", bytes(8), 1, []]), bytes(36)]],
        [[b"ex/a", msgpack.packb([2, "svc", bytes(7), 1, []]), bytes(36)]],
        [[b"ex/a", msgpack.packb([2, "svc", bytes(8), 0, []]), bytes(36)]],
        [[b"ex/a", msgpack.packb([2, "svc", bytes(8), 1, []]) + b"\x00", bytes(36)]],
        [[b"ex/a", b"\xc1" * 10, bytes(36)]],
        [[b"ex/a", msgpack.packb([2, "s" * 600, bytes(8), 1, []]), bytes(36)]],
        [[b"ex/a", msgpack.packb([2, "svc", bytes(8), 1, []]), bytes(10)]],
    ],
)
def test_anything_but_a_beacon_is_refused_and_counted(items: object) -> None:
    store = BeaconStore()
    assert store.add(items, now=0.0) == 1
    assert len(store) == 0 and store.stats()["refused"] == 1


def test_the_store_is_bounded() -> None:
    store = BeaconStore(max_streams=10)
    factory = zbus.MessageFactory(KEY, "svc")
    for i in range(25):
        factory.frames("ex", f"k{i}", 1)
    store.add(factory.beacons(), now=0.0)
    assert len(store) == 10 and store.stats()["evicted"] == 15


def test_a_closed_publisher_s_tail_reaches_a_subscriber_that_was_behind(
    run_dir: Path, key: bytes
) -> None:
    """The subscriber's queue (HWM 50) is full when the publisher's own beacons pass, so it
    loses them with the tail; the proxy's copies, published again after the publisher left,
    reach it once it has caught up, and its lost count becomes exact."""
    proxy = ProxyProcess(run_dir, "--subscriber-hwm", "50").start()
    try:
        # Repair off: this is the beacons' own promise, loss counted exactly without it
        # (tests/test_repair.py has the same overflow repaired).
        conn = zbus.Connection(run_dir, settings=zbus.Settings(
            subscriber_hwm=50, repair=zbus.RepairPolicy(interval=0)))
        got: list[int] = []
        dispatcher = zbus.Dispatcher()
        dispatcher.bind("ex", "#", lambda d: got.append(d.payload[0]))
        sub = conn.subscribe(dispatcher, key)
        sub.ready()
        factory = zbus.MessageFactory(key, "svc")
        with zbus.Connection(run_dir) as pub_conn:
            # 20,000 of 1 KiB: more than the socket buffers on the way hold, so the proxy's
            # queue for the subscriber (HWM 50) must overflow.
            pad = "x" * 1024
            for i in range(1, 20_001):
                pub_conn.send_frames(factory.frames("ex", "a", [i, pad]))
            beacons = factory.beacons()
            pub_conn.send_many(beacons)  # lost with the tail: the subscriber is still full
            pub_conn.control.request("beacons", beacons=beacons)
        while sub.process(0.2):  # catch up, reading what the proxy had queued
            pass
        assert got == sorted(got) and got[-1] < 20_000  # the tail was dropped
        lost_before = sub.stats.lost
        assert lost_before == got[-1] - len(got)  # only the gaps before the last one
        # The proxy publishes the beacon again after 1 s: wait for it, at most 5 s.
        for _ in range(50):
            if sub.stats.beacons:
                break
            sub.process(0.1)
        assert sub.stats.beacons >= 1
        assert sub.stats.lost == 20_000 - len(got)  # exactly what never came
        assert conn.proxy_stats()["beacons"]["republished"] >= 1
        sub.close()
        conn.close()
    finally:
        proxy.stop()


def test_beacon_files_are_read_once_and_hostile_ones_refused(tmp_path: Path) -> None:
    from zbus._connection import leave_beacons

    directory = tmp_path / "beacons"
    directory.mkdir(mode=0o700)
    factory = zbus.MessageFactory(KEY, "svc")
    factory.frames("ex", "a", 1)
    assert leave_beacons(directory, factory.beacons())
    (directory / "garbage").write_bytes(b"\xc1\xc1")
    (directory / "huge").write_bytes(b"\x00" * ((1 << 20) + 1))
    target = tmp_path / "secret"
    target.write_bytes(b"not yours")
    (directory / "link").symlink_to(target)
    store = BeaconStore()
    store.take_files(directory, now=0.0)
    assert len(store) == 1
    assert store.stats()["refused"] == 3
    assert list(directory.iterdir()) == []  # every file taken away, the link's target kept
    assert target.read_bytes() == b"not yours"
    store.take_files(directory, now=1.0)
    assert store.stats()["stored"] == 1


def test_no_beacon_file_goes_into_a_directory_others_can_write(tmp_path: Path) -> None:
    from zbus._connection import leave_beacons

    directory = tmp_path / "beacons"
    directory.mkdir()
    directory.chmod(0o777)
    factory = zbus.MessageFactory(KEY, "svc")
    factory.frames("ex", "a", 1)
    assert not leave_beacons(directory, factory.beacons())
    assert not leave_beacons(tmp_path / "missing", factory.beacons())
    assert list(directory.iterdir()) == []
