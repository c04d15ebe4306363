"""Message, MessageFactory and KeyRing, without sockets."""

from __future__ import annotations

import os
from typing import Any

import msgpack
import pytest

import zbus
from zbus._envelope import decode_batch, decode_envelope

KEY = bytes(range(32))


def fields(frames: list[bytes]) -> zbus.Envelope:
    return decode_envelope(frames[1])


def catch_all(exchange: str) -> zbus.Dispatcher:
    dispatcher = zbus.Dispatcher()
    dispatcher.bind(exchange, "#", lambda delivery: None, message_class=Meter)
    return dispatcher


class Meter(zbus.Message):
    message_type = "metering.cpu"
    version = 3

    def __init__(self, host: str, value: float) -> None:
        self.host = host
        self.value = value


# -- sequences and ids -----------------------------------------------------------------------


def test_each_topic_is_its_own_stream_and_ids_are_stream_plus_sequence() -> None:
    f = zbus.MessageFactory(KEY, "svc")
    envs = [fields(f.frames("ex", "k" if n % 2 else "j", n)) for n in range(6)]
    k_stream, k_next = f.stream("ex", "k")
    j_stream, j_next = f.stream("ex", "j")
    assert len(k_stream) == len(j_stream) == 8 and k_stream != j_stream
    assert (k_next, j_next) == (4, 4)
    assert [e.sequence for e in envs] == [1, 1, 2, 2, 3, 3]
    for n, e in enumerate(envs):
        stream = k_stream if n % 2 else j_stream
        assert e.message_id == stream + e.sequence.to_bytes(8, "big")
        assert e.stream_id == stream
    # The same routing key on another exchange is another topic, so another stream.
    assert fields(f.frames("other", "k", 0)).sequence == 1
    assert f.stream("other", "k")[0] not in (k_stream, j_stream)


def test_message_ids_are_unique_across_factories() -> None:
    ids = set()
    for _ in range(50):
        f = zbus.MessageFactory(KEY, "svc")
        for _ in range(20):
            ids.add(fields(f.frames("ex", "k", None)).message_id)
    assert len(ids) == 1000


def test_forked_child_gets_a_new_run() -> None:
    f = zbus.MessageFactory(KEY, "svc")
    f.frames("ex", "k", 1)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report its run id and next sequence, then leave at once
        try:
            env = fields(f.frames("ex", "k", 1))
            os.write(write, env.message_id)
        finally:
            os._exit(0)
    os.close(write)
    child_id = os.read(read, 16)
    os.close(read)
    os.waitpid(pid, 0)
    assert len(child_id) == 16
    # otherwise parent and child would repeat message ids
    assert child_id[:8] != f.stream("ex", "k")[0]
    assert child_id[8:] == (1).to_bytes(8, "big")
    assert fields(f.frames("ex", "k", 1)).sequence == 2  # the parent's stream goes on


class Unpackable:
    pass


@pytest.mark.parametrize("payload", [Unpackable(), {"n": 2**70}, {"when": object()}, {1j}])
def test_unpackable_payload_raises_config_error_and_leaves_no_gap(payload: Any) -> None:
    f = zbus.MessageFactory(KEY, "svc")
    d = zbus.Dispatcher()
    d.bind("ex", "#", lambda dl: None)
    core = zbus.ConsumerCore(d, KEY)
    assert core.accept(f.frames("ex", "k", "first")) is not None
    with pytest.raises(zbus.ConfigError, match="cannot be packed"):
        f.frames("ex", "k", payload)
    delivery = core.accept(f.frames("ex", "k", "second"))
    assert delivery is not None
    assert delivery.sequence == 2 and delivery.payload == "second"
    assert core.stats.lost == 0 and not core.stats.rejected


def test_self_referencing_payload_raises_config_error() -> None:
    loop: list[Any] = []
    loop.append(loop)
    f = zbus.MessageFactory(KEY, "svc")
    with pytest.raises(zbus.ConfigError):
        f.frames("ex", "k", loop)
    assert fields(f.frames("ex", "k", [])).sequence == 1


@pytest.mark.parametrize(("exchange", "key"), [("bad.exchange", "k"), ("ex", "bad..key")])
def test_bad_names_raise_before_a_sequence_is_used(exchange: str, key: str) -> None:
    f = zbus.MessageFactory(KEY, "svc")
    with pytest.raises(zbus.InvalidName):
        f.frames(exchange, key, 1)
    assert fields(f.frames("ex", "k", 1)).sequence == 1


# -- envelope fields ---------------------------------------------------------------------------


def test_plain_payload_type_defaults_to_routing_key() -> None:
    f = zbus.MessageFactory(KEY, "svc", clock=lambda: 12.25)
    env = fields(f.frames("ex", "a.b", {"x": 1}))
    assert (env.message_type, env.message_type_version, env.payload) == ("a.b", 1, {"x": 1})
    assert env.timestamp == 12.25 and env.publisher_id == "svc"
    env = fields(f.frames("ex", "a.b", {"x": 1}, message_type="other.type", version=4))
    assert (env.message_type, env.message_type_version) == ("other.type", 4)


def test_integer_clock_is_sent_as_a_float() -> None:
    f = zbus.MessageFactory(KEY, "svc", clock=lambda: 17)
    envelope = f.frames("ex", "k", None)[1]
    raw = msgpack.unpackb(envelope, raw=False)
    timestamp = raw[4][0][0]  # the first (only) message's first element
    assert type(timestamp) is float and timestamp == 17.0


@pytest.mark.parametrize("version", [-1, "2", 1.5, True])
def test_bad_explicit_version_is_refused(version: Any) -> None:
    f = zbus.MessageFactory(KEY, "svc")
    with pytest.raises(zbus.ConfigError, match="version"):
        f.frames("ex", "k", 1, version=version)
    assert fields(f.frames("ex", "k", 1)).sequence == 1


def test_bad_explicit_message_type_is_refused() -> None:
    with pytest.raises(zbus.InvalidName):
        zbus.MessageFactory(KEY, "svc").frames("ex", "k", 1, message_type="a b")


def test_message_subclass_carries_its_type_and_version() -> None:
    f = zbus.MessageFactory(KEY, "svc")
    env = fields(f.frames("metering", "metering.cpu", Meter("h1", 0.5)))
    assert env.message_type == "metering.cpu"
    assert env.message_type_version == 3
    assert env.payload == {"host": "h1", "value": 0.5}
    assert Meter.from_payload(env.payload, 3) == Meter("h1", 0.5)


def test_message_without_type_is_refused() -> None:
    class Untyped(zbus.Message):
        pass

    with pytest.raises(zbus.ConfigError, match="message_type"):
        zbus.MessageFactory(KEY, "svc").frames("ex", "k", Untyped())


def test_message_version_must_be_a_non_negative_int() -> None:
    for bad in (-1, "1", True):
        with pytest.raises(zbus.ConfigError):
            type("Bad", (zbus.Message,), {"message_type": "x", "version": bad})


def test_message_equality_and_repr() -> None:
    assert Meter("h", 1.0) == Meter("h", 1.0)
    assert Meter("h", 1.0) != Meter("h", 2.0)
    assert repr(Meter("h", 1.0)) == "Meter(host='h', value=1.0)"


@pytest.mark.parametrize("publisher_id", ["", "p" * 256, None, b"svc"])
def test_publisher_id_is_checked(publisher_id: Any) -> None:
    with pytest.raises(zbus.ConfigError, match="publisher_id"):
        zbus.MessageFactory(KEY, publisher_id)


# -- keys ----------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [b"", b"short", bytes(15)])
def test_key_ring_refuses_short_keys(key: bytes) -> None:
    with pytest.raises(zbus.ConfigError, match="at least 16"):
        zbus.KeyRing({"k": key})
    with pytest.raises(zbus.ConfigError):
        zbus.MessageFactory(key, "svc")


def test_key_ring_refuses_non_bytes_and_bad_shapes() -> None:
    with pytest.raises(zbus.ConfigError, match="bytes"):
        zbus.KeyRing({"k": "a string of 32 characters, not b"})  # type: ignore[dict-item]
    with pytest.raises(zbus.ConfigError):
        zbus.KeyRing({})
    with pytest.raises(zbus.ConfigError, match="active"):
        zbus.KeyRing({"a": KEY, "b": KEY})
    with pytest.raises(zbus.ConfigError, match="not in the ring"):
        zbus.KeyRing({"a": KEY}, active="b")


def test_key_ring_never_shows_key_bytes() -> None:
    key = bytes.fromhex("deadbeef" * 8)
    ring = zbus.KeyRing({"old": KEY, "new": key}, active="new")
    factory = zbus.MessageFactory(ring, "svc")
    for text in (repr(ring), str(ring), repr(factory), str(factory)):
        for secret in (key, KEY):
            assert secret.hex() not in text
            assert repr(secret) not in text
            assert repr(secret)[2:-1][:16] not in text
        assert "old" in text or "svc" in text
    assert ring.ids() == ["new", "old"]


def test_key_ring_lookup() -> None:
    ring = zbus.KeyRing({"a": KEY})
    assert zbus.KeyRing.of(ring) is ring
    assert zbus.KeyRing.of(KEY).active_id == "default"
    assert "a" in ring and "b" not in ring
    assert ring.get("a") == KEY
    with pytest.raises(zbus.UnknownKeyError) as info:
        ring.get("b")
    assert isinstance(info.value, zbus.SignatureError)
    assert info.value.reason == "unknown_key"


def test_generate_key_is_random_and_long_enough() -> None:
    a, b = zbus.generate_key(), zbus.generate_key()
    assert len(a) == 32 and a != b
    zbus.KeyRing({"k": a})


# -- batches and beacons ------------------------------------------------------------------------


def test_a_batch_is_one_signed_range_of_one_stream() -> None:
    f = zbus.MessageFactory(KEY, "svc")
    f.frames("ex", "k", "before")
    frames = f.batch("ex", "k", [Meter("h", 1.0), {"plain": True}, 3])
    batch = decode_batch(frames[1])
    assert batch.first_sequence == 2 and len(batch.entries) == 3
    assert [e.sequence for e in batch.envelopes()] == [2, 3, 4]
    assert [e.message_type for e in batch.envelopes()] == ["metering.cpu", "k", "k"]
    assert f.stream("ex", "k")[1] == 5
    core = zbus.ConsumerCore(catch_all("ex"), KEY)
    first = core.accept(frames)
    rest = [core.next_ready(), core.next_ready()]
    assert first is not None and first.message == Meter("h", 1.0)
    assert [d.payload for d in rest if d] == [{"plain": True}, 3]
    assert core.next_ready() is None
    # "before" never arrived, but the consumer joined the stream after it: no loss to count
    assert core.stats.received == 3 and core.stats.lost == 0
    with pytest.raises(zbus.ConfigError, match="at least one"):
        f.batch("ex", "k", [])


def test_beacons_announce_each_stream_once_per_idle_spell() -> None:
    now = [100.0]
    f = zbus.MessageFactory(KEY, "svc", clock=lambda: now[0])
    f.frames("ex", "a", 1)
    f.frames("ex", "b", 1)
    now[0] += 0.5
    f.frames("ex", "a", 2)
    assert [b[0] for b in f.beacons(idle=1.0)] == []  # nobody idle long enough
    now[0] += 0.6
    beacons = f.beacons(idle=1.0)
    assert [b[0] for b in beacons] == [b"ex/b"]  # 'a' sent 0.6 s ago
    assert decode_batch(beacons[0][1])[2:] == (2, [])  # next sequence 2: sent up to 1
    assert f.beacons(idle=1.0) == []  # announced: nothing new since
    assert [b[0] for b in f.beacons()] == [b"ex/a"]
    assert f.beacons() == []


def test_a_withdrawn_message_gives_its_number_back() -> None:
    f = zbus.MessageFactory(KEY, "svc")
    f.frames("ex", "a", 1)
    f.frames("ex", "a", 2)  # say its send failed
    f.withdraw()
    assert fields(f.frames("ex", "a", 2)).sequence == 2
    f.withdraw()
    f.withdraw()  # twice: only the last frames' numbers, once
    assert f.stream("ex", "a")[1] == 2
    f.batch("ex", "b", [1, 2, 3])
    f.withdraw()
    assert f.stream("ex", "b")[1] == 1
