"""zbus.testing.MemoryBus: the in-memory double keeps the fabric's dispatch and signing rules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

import zbus
from zbus.testing import MemoryBus

EX = "notifications"


@dataclass
class InstanceCreated(zbus.Message):
    message_type = "compute.instance.create.end"
    version = 2

    instance_id: str
    flavor: str = "small"


def collecting(*patterns: str, exchange: str = EX) -> tuple[zbus.Dispatcher, list[zbus.Delivery]]:
    seen: list[zbus.Delivery] = []
    dispatcher = zbus.Dispatcher()
    for pattern in patterns:
        dispatcher.bind(exchange, pattern, seen.append)
    return dispatcher, seen


def publisher(bus: MemoryBus, key: bytes, publisher_id: str = "pub") -> zbus.Publisher:
    return zbus.Publisher(bus.connection().exchange(EX), zbus.MessageFactory(key, publisher_id))


def test_fan_out_every_subscriber_gets_every_match_in_order(key: bytes) -> None:
    bus = MemoryBus()
    d1, seen1 = collecting("compute.#")
    d2, seen2 = collecting("compute.*.create.end")
    bus.subscribe(d1, key)
    s2 = bus.subscribe(d2, key)
    pub = publisher(bus, key)
    for i in range(10):
        pub.send("compute.instance.create.end" if i % 2 else "compute.volume.delete.end", {"i": i})
    assert [d.payload["i"] for d in seen1] == list(range(10))
    assert [d.payload["i"] for d in seen2] == [1, 3, 5, 7, 9]
    # Each topic is numbered as its own stream.
    assert [d.sequence for d in seen1] == [i // 2 + 1 for i in range(10)]
    # The prefix 'notifications/compute.' lets deletes through; the exact match drops them.
    assert s2.stats.unmatched == 5 and s2.stats.delivered == 5 and s2.stats.lost == 0


def test_forged_and_malformed_messages_are_rejected_as_the_core_rejects_them(key: bytes) -> None:
    bus = MemoryBus()
    dispatcher, seen = collecting("#")
    sub = bus.subscribe(dispatcher, key)
    conn = bus.connection()
    good = zbus.MessageFactory(key, "pub")
    forger = zbus.MessageFactory(zbus.generate_key(), "pub")
    stranger = zbus.MessageFactory(zbus.KeyRing({"other": zbus.generate_key()}), "pub")

    conn.send_frames(forger.frames(EX, "a.b", 1))
    conn.send_frames(stranger.frames(EX, "a.b", 1))
    topic, env, sig = good.frames(EX, "a.b", 1)
    conn.send_frames([topic, env[:-1] + bytes([env[-1] ^ 1]), sig])  # one flipped bit
    conn.send_frames([topic, env])  # two frames
    conn.send_frames(good.frames(EX, "a.b", 2))  # and the stream goes on

    assert [d.payload for d in seen] == [2]
    assert sub.stats.rejected == {
        "bad_signature": 2, "unknown_key": 1, "frame_count": 1,
    }
    # Same verdicts as a bare ConsumerCore on the same frames.
    core = zbus.ConsumerCore(dispatcher, key)
    for frames in bus.sent:
        core.accept(frames)
    assert core.stats.rejected == sub.stats.rejected


def test_pool_shares_round_robin_exactly_once_beside_a_subscriber(key: bytes) -> None:
    bus = MemoryBus()
    members = []
    shares: list[list[zbus.Delivery]] = []
    for _ in range(3):
        dispatcher, seen = collecting("compute.#")
        members.append(bus.join_pool("workers", dispatcher, key))
        shares.append(seen)
    sub_d, everything = collecting("compute.#")
    bus.subscribe(sub_d, key)
    pub = publisher(bus, key)
    for i in range(30):
        pub.send("compute.instance.create.end", {"i": i})
    assert [len(s) for s in shares] == [10, 10, 10]
    got = sorted(d.payload["i"] for s in shares for d in s)
    assert got == list(range(30))
    assert len(everything) == 30
    members[0].close()
    for i in range(30, 34):
        pub.send("compute.instance.create.end", {"i": i})
    assert len(shares[0]) == 10 and len(shares[1]) + len(shares[2]) == 24


def test_two_pools_each_get_every_message_once(key: bytes) -> None:
    bus = MemoryBus()
    a, seen_a = collecting("#")
    b, seen_b = collecting("compute.#")
    bus.join_pool("audit", a, key)
    bus.join_pool("billing", b, key)
    publisher(bus, key).send("compute.x", 1)
    publisher(bus, key).send("network.y", 2)
    assert [d.payload for d in seen_a] == [1, 2]
    assert [d.payload for d in seen_b] == [1]


def test_pool_with_other_bindings_is_refused_like_the_proxy(key: bytes) -> None:
    bus = MemoryBus()
    bus.join_pool("workers", collecting("compute.#")[0], key)
    with pytest.raises(zbus.ConfigError, match="declared with bindings"):
        bus.join_pool("workers", collecting("network.#")[0], key)


def test_pool_keeps_messages_until_a_member_joins(key: bytes) -> None:
    bus = MemoryBus(settings=zbus.Settings(pool_hwm=2))
    bus.declare_pool("workers", [f"{EX}/compute.#"])
    pub = publisher(bus, key)
    for i in range(3):
        pub.send("compute.x", i)
    assert bus.pools["workers"].dropped == 1 and bus.unrouted == 0
    dispatcher, seen = collecting("compute.#")
    bus.join_pool("workers", dispatcher, key)
    assert [d.payload for d in seen] == [0, 1]


def test_manual_drain_and_handlers_that_publish(key: bytes) -> None:
    bus = MemoryBus(autodrain=False)
    pub = publisher(bus, key)
    order: list[str] = []
    dispatcher = zbus.Dispatcher()

    @dispatcher.on(EX, "order.placed")
    def placed(delivery: zbus.Delivery) -> None:
        order.append("placed")
        pub.send("order.billed", delivery.payload)

    @dispatcher.on(EX, "order.billed")
    def billed(delivery: zbus.Delivery) -> None:
        order.append("billed")

    bus.subscribe(dispatcher, key)
    pub.send("order.placed", {"id": 7})
    assert order == [] and bus.pending() == 1
    assert bus.drain() == 2
    assert order == ["placed", "billed"] and bus.pending() == 0


def test_handler_errors_are_isolated_or_reraised(key: bytes) -> None:
    def boom(delivery: zbus.Delivery) -> None:
        raise RuntimeError("handler bug")

    bus = MemoryBus(raise_handler_errors=False)
    dispatcher, seen = collecting("a.#")
    dispatcher.bind(EX, "a.#", boom)
    sub = bus.subscribe(dispatcher, key)
    publisher(bus, key).send("a.b", 1)
    assert len(seen) == 1 and sub.stats.handler_errors == 1

    strict = MemoryBus()  # raising is the default: a failing handler fails the test
    d2 = zbus.Dispatcher()
    d2.bind(EX, "a.#", boom)
    sub2 = strict.subscribe(d2, key)
    with pytest.raises(RuntimeError, match="handler bug"):
        publisher(strict, key).send("a.b", 1)
    assert sub2.stats.handler_errors == 1


def test_typed_messages_and_router_work_against_a_memory_connection(key: bytes) -> None:
    bus = MemoryBus()
    dispatcher = zbus.Dispatcher()
    got: list[Any] = []
    dispatcher.bind(EX, "compute.instance.*.end", lambda d: got.append(d.message),
                    message_class=InstanceCreated)
    bus.subscribe(dispatcher, key)

    class ComputeRouter(zbus.Router):
        def instance_created(self, msg: InstanceCreated) -> None:
            self.send(EX, msg)

    router = ComputeRouter(bus.connection(), zbus.MessageFactory(key, "nova"))  # type: ignore[arg-type]
    router.instance_created(InstanceCreated("vm-1", "large"))
    assert got == [InstanceCreated("vm-1", "large")]

    # A newer version than this consumer knows is rejected, as on the wire.
    class InstanceCreatedV3(zbus.Message):
        message_type = "compute.instance.create.end"
        version = 3

    factory = zbus.MessageFactory(key, "nova")
    bus.connection().send_frames(factory.frames(EX, "compute.instance.create.end",
                                                InstanceCreatedV3()))
    (sub,) = bus.subscribers
    assert sub.stats.rejected == {"unknown_version": 1}


def test_oversize_messages_never_reach_a_consumer(key: bytes) -> None:
    bus = MemoryBus(settings=zbus.Settings(max_message_bytes=200))
    dispatcher, seen = collecting("#")
    bus.subscribe(dispatcher, key)
    pub = publisher(bus, key)
    pub.send("a", "x" * 500)
    pub.send("a", "small")
    assert bus.oversize == 1 and [d.payload for d in seen] == ["small"]


def test_sequence_gaps_are_counted_when_a_test_drops_a_message(key: bytes) -> None:
    bus = MemoryBus()
    dispatcher, seen = collecting("#")
    sub = bus.subscribe(dispatcher, key)
    factory = zbus.MessageFactory(key, "pub")
    frames = [factory.frames(EX, "a", i) for i in range(5)]
    for i in (0, 1, 3, 4):
        bus.send_frames(frames[i])
    assert sub.stats.lost == 1 and len(seen) == 4


def test_closed_connection_and_consumer(key: bytes) -> None:
    bus = MemoryBus()
    dispatcher, seen = collecting("#")
    sub = bus.subscribe(dispatcher, key)
    sub.ready()
    sub.close()
    conn = bus.connection()
    conn.send_frames(zbus.MessageFactory(key, "p").frames(EX, "a", 1))
    assert seen == [] and bus.unrouted == 1
    conn.close()
    with pytest.raises(zbus.TransportError):
        conn.send_frames([b"x"])
