"""Envelope codec, signatures and the rejection of every kind of bad frame, without sockets."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zbus
import zbus._dispatch
from zbus._envelope import (
    Envelope,
    decode_batch,
    decode_envelope,
    encode_envelope,
    mac,
    signature_frame,
    verify_frames,
)

KEY = bytes(range(32))
RING = zbus.KeyRing({"k1": KEY})
TOPIC = b"notifications/compute.instance.create.end"
STREAM = bytes.fromhex("0102030405060708")


def envelope_fields(**change: Any) -> list[Any]:
    """An envelope's fields (format 2) carrying one message, with ``change`` applied:
    header fields by name, the message's own fields (timestamp, message_type, version,
    payload) too, or ``messages`` for the whole array."""
    message: dict[str, Any] = {
        "timestamp": 1700000000.5,
        "message_type": "compute.instance.create.end",
        "version": 1,
        "payload": {"instance_id": "i-1"},
    }
    header: dict[str, Any] = {
        "format": 2,
        "publisher_id": "svc.host1",
        "stream_id": STREAM,
        "first": 7,
        "messages": None,
    }
    for name, value in change.items():
        (message if name in message else header)[name] = value
    if header["messages"] is None:
        header["messages"] = [list(message.values())]
    return list(header.values())


def signed(topic: bytes, envelope: bytes, ring: zbus.KeyRing = RING) -> list[bytes]:
    """Frames carrying a valid signature over whatever bytes they hold."""
    return [topic, envelope, signature_frame(ring, topic, envelope)]


def consumer(pattern: str = "#", ring: zbus.KeyRing = RING) -> zbus.ConsumerCore:
    d = zbus.Dispatcher()
    d.bind("notifications", pattern, lambda delivery: None)
    return zbus.ConsumerCore(d, ring)


def good_frames() -> list[bytes]:
    return zbus.MessageFactory(RING, "svc.host1").frames(
        "notifications", "compute.instance.create.end", {"instance_id": "i-1", "vcpus": 2}
    )


def rejected_as(frames: list[bytes], ring: zbus.KeyRing = RING) -> str:
    """The one reason ``frames`` is rejected for; fails if it is accepted or counted twice."""
    core = consumer(ring=ring)
    assert core.accept(frames) is None
    assert sum(core.stats.rejected.values()) == 1, core.stats.rejected
    assert core.stats.unmatched == 0 and core.stats.lost == 0
    # and the consumer keeps serving
    assert core.accept(good_frames()) is not None
    (reason,) = core.stats.rejected
    return reason


# -- codec ---------------------------------------------------------------------------------


def test_envelope_round_trip() -> None:
    env = Envelope(STREAM + (1).to_bytes(8, "big"), "svc", 1, 1.5, "a.b", 3,
                   {"x": [1, 2.5, b"\x00", None, True]})
    assert decode_envelope(encode_envelope(env)) == env
    assert env.stream_id == STREAM


def test_a_batch_decodes_to_consecutive_messages_of_one_stream() -> None:
    batch = decode_batch(packed(envelope_fields(messages=[
        [1.5, "a", 1, "x"], [2, "b.c", 0, None], [3.0, "a", 7, [1]]])))
    envs = batch.envelopes()
    assert [e.sequence for e in envs] == [7, 8, 9]
    assert [e.message_id for e in envs] == [STREAM + n.to_bytes(8, "big") for n in (7, 8, 9)]
    assert [(e.timestamp, e.message_type, e.message_type_version, e.payload) for e in envs] == [
        (1.5, "a", 1, "x"), (2.0, "b.c", 0, None), (3.0, "a", 7, [1])]
    beacon = decode_batch(packed(envelope_fields(messages=[])))
    assert beacon.first_sequence == 7 and beacon.envelopes() == []
    with pytest.raises(zbus.EnvelopeError, match="carries 3 messages"):
        decode_envelope(packed(envelope_fields(messages=[[1.5, "a", 1, "x"]] * 3)))


def test_integer_timestamp_is_accepted_as_float() -> None:
    env = decode_envelope(msgpack.packb(envelope_fields(timestamp=17), use_bin_type=True))
    assert env.timestamp == 17.0 and type(env.timestamp) is float


# msgpack values that survive a round trip unchanged: string map keys (strict_map_key), lists
# (not tuples), 64-bit integers, and no NaN (NaN != NaN).
payloads = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@given(payloads, st.integers(1, 2**64 - 1), st.floats(allow_nan=False, allow_infinity=False))
def test_codec_round_trip_property(payload: Any, seq: int, ts: float) -> None:
    env = Envelope(STREAM + seq.to_bytes(8, "big"), "svc", seq, ts, "a.b-c", 2, payload)
    assert decode_envelope(encode_envelope(env)) == env


@given(payloads)
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_signed_round_trip_through_the_consumer(payload: Any) -> None:
    frames = zbus.MessageFactory(RING, "svc").frames("notifications", "a.b", payload)
    delivery = consumer().accept(frames)
    assert delivery is not None
    assert delivery.payload == payload
    assert delivery.envelope.message_type == "a.b"


# -- signatures ----------------------------------------------------------------------------


def test_verify_returns_the_key_id() -> None:
    topic, env, sig = good_frames()
    assert verify_frames(RING, topic, env, sig) == "k1"


def test_every_single_byte_change_in_any_frame_is_rejected() -> None:
    frames = good_frames()
    key_id_positions = range(2, 2 + len(b"k1"))
    core = consumer()
    tried = 0
    for i, frame in enumerate(frames):
        for pos in range(len(frame)):
            for flip in (0x01, 0x80):
                bad = list(frames)
                bad[i] = frame[:pos] + bytes([frame[pos] ^ flip]) + frame[pos + 1 :]
                before = sum(core.stats.rejected.values())
                assert core.accept(bad) is None, (i, pos, flip)
                assert sum(core.stats.rejected.values()) == before + 1
                tried += 1
                with pytest.raises(zbus.SignatureError) as info:
                    verify_frames(RING, *bad)
                if i == 2 and pos in key_id_positions and bad[2][pos] < 0x80:
                    assert info.value.reason == "unknown_key"
                else:
                    assert info.value.reason == "bad_signature"
    assert tried == 2 * sum(len(f) for f in frames)
    assert set(core.stats.rejected) == {"bad_signature", "unknown_key"}
    assert core.stats.delivered == 0 and core.stats.unmatched == 0


@given(st.data())
def test_tampering_property(data: st.DataObject) -> None:
    frames = good_frames()
    i = data.draw(st.integers(0, 2))
    pos = data.draw(st.integers(0, len(frames[i]) - 1))
    mask = data.draw(st.integers(1, 255))
    bad = list(frames)
    bad[i] = frames[i][:pos] + bytes([frames[i][pos] ^ mask]) + frames[i][pos + 1 :]
    core = consumer()
    assert core.accept(bad) is None
    assert set(core.stats.rejected) <= {"bad_signature", "unknown_key"}
    assert sum(core.stats.rejected.values()) == 1


@pytest.mark.parametrize(
    "change",
    [
        lambda f: [f[0] + b"x", f[1], f[2]],  # topic extended
        lambda f: [f[0][:-1], f[1], f[2]],  # topic truncated
        lambda f: [f[0], f[1] + b"\xc0", f[2]],  # envelope extended
        lambda f: [f[0], f[1][:-1], f[2]],  # envelope truncated
        lambda f: [f[0] + f[1][:1], f[1][1:], f[2]],  # a byte moved across the frame boundary
        lambda f: [f[0], f[1], f[2] + b"\x00"],
        lambda f: [f[0], f[1], f[2][:-1]],
        lambda f: [f[0], f[1], b""],
        lambda f: [f[0], f[1], b"\x02" + f[2][1:]],  # unknown scheme
        lambda f: [f[0], f[1], f[2][:1] + b"\x00" + f[2][2:]],  # key id length 0
        lambda f: [f[0], f[1], f[2][:2] + b"\xff\xfe" + f[2][4:]],  # key id not ASCII
        lambda f: [f[1], f[0], f[2]],  # frames swapped
    ],
)
def test_length_and_layout_changes_are_bad_signatures(change: Any) -> None:
    assert rejected_as(change(good_frames())) == "bad_signature"


def test_unknown_key_id_is_counted_as_unknown_key() -> None:
    other = zbus.KeyRing({"k2": KEY})  # same key bytes, but an id the consumer lacks
    frames = zbus.MessageFactory(other, "svc").frames("notifications", "a", 1)
    assert rejected_as(frames) == "unknown_key"
    with pytest.raises(zbus.UnknownKeyError, match="k2"):
        verify_frames(RING, *frames)


def test_wrong_key_under_a_known_id_is_a_bad_signature() -> None:
    forger = zbus.KeyRing({"k1": bytes(32)})
    frames = zbus.MessageFactory(forger, "svc").frames("notifications", "a", 1)
    assert rejected_as(frames) == "bad_signature"


def test_rotation_ring_verifies_old_and_new_keys() -> None:
    new_key = bytes(range(100, 132))
    ring = zbus.KeyRing({"k1": KEY, "k2": new_key}, active="k2")
    core = consumer(ring=ring)
    for signer in (RING, zbus.KeyRing({"k2": new_key})):
        delivery = core.accept(zbus.MessageFactory(signer, "svc").frames("notifications", "a", 1))
        assert delivery is not None and delivery.key_id == signer.active_id
    assert not core.stats.rejected


def test_mac_is_checked_before_anything_is_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_decode(*args: Any) -> Any:
        raise AssertionError("decoded bytes that were not authenticated")

    monkeypatch.setattr(zbus._dispatch, "decode_batch", must_not_decode)
    monkeypatch.setattr(zbus._dispatch, "decode_topic", must_not_decode)
    garbage = [b"not a topic", b"\xc1 not msgpack", signature_frame(RING, b"x", b"y")]
    core = consumer()
    assert core.accept(garbage) is None
    assert core.stats.rejected == {"bad_signature": 1}


# -- malformed input, each validly signed --------------------------------------------------


@pytest.mark.parametrize("count", [0, 1, 2, 4, 5])
def test_wrong_frame_counts(count: int) -> None:
    frames = [*good_frames(), b"extra", b"extra"][:count]
    assert rejected_as(frames) == "frame_count"


def test_control_probes_are_ignored_not_counted() -> None:
    core = consumer()
    assert core.accept([b"\x00probe/0123456789abcdef"]) is None
    assert not core.stats.rejected and core.stats.received == 0


def test_three_frame_message_with_control_topic_is_a_counted_forgery() -> None:
    core = consumer()
    assert core.accept([b"\x00probe/x", b"", b""]) is None
    assert core.stats.rejected == {"bad_signature": 1}


def packed(fields: Any) -> bytes:
    data: bytes = msgpack.packb(fields, use_bin_type=True)
    return data


@pytest.mark.parametrize(
    "envelope",
    [
        b"",
        b"\xc1",  # a byte msgpack never uses
        b"\x98\x01",  # array that ends early
        packed(envelope_fields()) + b"\xc0",  # trailing bytes
        packed({"format": 1}),
        packed([]),
        packed("just a string"),
        packed(envelope_fields()[:4]),
        packed([*envelope_fields(), "extra"]),
        packed(envelope_fields(payload=msgpack.ExtType(1, b"x"))),
        # msgpack decodes the timestamp ext (-1) by itself, in all three of its encodings
        packed(envelope_fields(payload={"at": msgpack.Timestamp(1, 0)})),
        packed(envelope_fields(payload=[msgpack.Timestamp(2**33, 5)])),
        packed(envelope_fields(payload=[msgpack.Timestamp(-1, 5)])),
        packed(envelope_fields(payload={1: "int key"})),
        packed(envelope_fields(payload={b"k": {(1, 2): 3}})),
        b"\x91" * 100_000 + b"\xc0",  # nested deeper than the decoder's stack
    ],
    ids=lambda e: e[:12].hex() or "empty",
)
def test_malformed_envelopes(envelope: bytes) -> None:
    assert rejected_as(signed(TOPIC, envelope)) == "malformed"


@pytest.mark.parametrize("fmt", [1, 3, 0, True, 2.0, "2", None, [2]])
def test_unknown_envelope_format(fmt: Any) -> None:
    assert rejected_as(signed(TOPIC, packed(envelope_fields(format=fmt)))) == "unknown_version"


def test_unknown_format_is_detected_before_the_field_count() -> None:
    # A future format may carry other fields: it must read as a version problem.
    assert rejected_as(signed(TOPIC, packed([3, "something", "else"]))) == "unknown_version"


def test_a_timestamp_ext_look_alike_inside_a_string_is_not_refused() -> None:
    """The ext scan is a fast pre-check on the bytes: the same bytes inside a str or bin are
    data, and must pass."""
    core = consumer()
    frames = zbus.MessageFactory(RING, "svc").frames(
        "notifications", "a", {"s": "\u00d6\u00ff", "b": b"\xd6\xff\xd7\xff\xc7\x0c\xff"})
    assert core.accept(frames) is not None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("stream_id", "a" * 8),
        ("stream_id", bytes(7)),
        ("stream_id", bytes(9)),
        ("stream_id", None),
        ("publisher_id", b"svc"),
        ("publisher_id", ""),
        ("publisher_id", "p" * 256),
        ("publisher_id", 5),
        ("first", -1),
        ("first", 0),
        ("first", 1.0),
        ("first", True),
        ("first", "7"),
        ("first", 2**64 - 1 + 0),  # fine alone, but a second message would pass 2^64 - 1
        ("timestamp", "now"),
        ("timestamp", None),
        ("timestamp", True),
        ("timestamp", float("nan")),  # passes both freshness comparisons: must not count
        ("timestamp", float("inf")),
        ("timestamp", float("-inf")),
        ("messages", "none"),
        ("messages", {"a": 1}),
        ("messages", [[1.5, "a", 1]]),
        ("messages", [[1.5, "a", 1, None, "extra"]]),
        ("messages", [(1.5, "a", 1, None), "not a message"]),
        ("message_type", 5),
        ("message_type", b"a.b"),
        ("message_type", "a..b"),
        ("message_type", "a b"),
        ("message_type", ""),
        ("version", -1),
        ("version", "1"),
        ("version", 1.0),
        ("version", True),
        ("version", None),
    ],
)
def test_wrong_field_types(field: str, value: Any) -> None:
    change = {field: value}
    if field == "first" and value == 2**64 - 1:
        change["messages"] = [[1.5, "a", 1, None]] * 2
    envelope = packed(envelope_fields(**change))
    assert rejected_as(signed(TOPIC, envelope)) == "wrong_type"


@pytest.mark.parametrize(
    "topic", [b"noslash", b"notifications/a..b", b"\xff/x", b"a.b/c", b"n/a/b", b"n/a b"]
)
def test_bad_topics_validly_signed(topic: bytes) -> None:
    assert rejected_as(signed(topic, packed(envelope_fields()))) == "bad_topic"


@given(st.binary(max_size=200))
def test_no_signed_garbage_escapes_accept(envelope: bytes) -> None:
    core = consumer()
    result = core.accept(signed(TOPIC, envelope))
    if result is None:
        assert sum(core.stats.rejected.values()) == 1
    else:
        assert not core.stats.rejected


@given(st.lists(st.binary(max_size=64), max_size=5))
def test_no_unsigned_garbage_escapes_accept(frames: list[bytes]) -> None:
    core = consumer()
    assert core.accept(frames) is None
    ignored = len(frames) == 1 and frames[0].startswith(b"\x00")
    assert sum(core.stats.rejected.values()) == (0 if ignored else 1)


@given(st.binary(min_size=16, max_size=200), st.binary(max_size=64), st.binary(max_size=300))
def test_mac_is_standard_hmac_sha256(key: bytes, topic: bytes, envelope: bytes) -> None:
    """The precomputed-pad HMAC must give exactly the stdlib's bytes, for any key length
    (keys longer than the 64-byte block are hashed first, per RFC 2104)."""
    import hmac
    import struct

    expected = hmac.digest(key, struct.pack(">I", len(topic)) + topic + envelope, "sha256")
    assert mac(key, topic, envelope) == expected
