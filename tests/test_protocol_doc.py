"""docs/PROTOCOL.md's worked example is the test vector: the code and the document cannot drift.

Everything the tests compare against is parsed out of the document. The independent verifier
here uses only hmac, hashlib, struct and msgpack, never zbus, so it checks the document's
description as much as zbus's bytes.
"""

from __future__ import annotations

import ast
import hashlib
import hmac
import json
import re
import struct
from pathlib import Path
from typing import Any

import msgpack
import pytest

import zbus

DOC = Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md"

_BLOCK = re.compile(r"^```(\w+)(?: ([\w-]+))?\n(.*?)^```", re.M | re.S)


def _doc() -> str:
    return DOC.read_text(encoding="utf-8")


def _blocks() -> dict[str, tuple[str, str]]:
    """Fenced blocks that carry a label after their language: label -> (language, body)."""
    out: dict[str, tuple[str, str]] = {}
    for lang, label, body in _BLOCK.findall(_doc()):
        if label:
            assert label not in out, f"two blocks labelled {label!r} in PROTOCOL.md"
            out[label] = (lang, body)
    return out


def _hex(label: str) -> bytes:
    lang, body = _blocks()[label]
    assert lang == "hex"
    return bytes.fromhex("".join(body.split()))


def _inputs() -> dict[str, str]:
    lang, body = _blocks()["inputs"]
    assert lang == "text"
    out = {}
    for line in body.strip().splitlines():
        name, value = re.split(r"\s{2,}", line.strip(), maxsplit=1)
        out[name] = value
    return out


class Example:
    """The worked example's inputs, typed."""

    def __init__(self) -> None:
        raw = _inputs()
        self.key_id = raw["key id"]
        self.key = bytes.fromhex(raw["key (hex)"])
        self.stream_id = bytes.fromhex(raw["stream id (hex)"])
        self.sequence = int(raw["sequence"])
        self.publisher_id = raw["publisher_id"]
        self.timestamp = float(raw["timestamp"])
        self.exchange = raw["exchange"]
        self.routing_key = raw["routing key"]
        self.message_type = raw["message_type"]
        self.version = int(raw["message_type_version"])
        self.payload: Any = json.loads(raw["payload (JSON)"])


@pytest.fixture(scope="module")
def ex() -> Example:
    return Example()


@pytest.fixture(scope="module")
def doc_frames() -> list[bytes]:
    return [_hex("topic"), _hex("envelope"), _hex("signature")]


def test_the_document_has_the_blocks_this_test_reads() -> None:
    assert {"inputs", "topic", "envelope", "envelope-annotated", "mac-input", "signature",
            "beacon"} <= set(
        _blocks()
    )


# -- (a) zbus produces exactly the document's bytes ---------------------------------------


def test_message_factory_produces_the_documented_frames(
    ex: Example, doc_frames: list[bytes]
) -> None:
    factory = zbus.MessageFactory(
        zbus.KeyRing({ex.key_id: ex.key}), ex.publisher_id, clock=lambda: ex.timestamp
    )
    factory.frames(ex.exchange, ex.routing_key, None)  # opens the stream (sequence 1)
    factory._streams[f"{ex.exchange}/{ex.routing_key}".encode()].next = ex.sequence
    # The stream id is random; the document's is fixed. Set it on the stream's record.
    factory._streams[f"{ex.exchange}/{ex.routing_key}".encode()].stream_id = ex.stream_id
    frames = factory.frames(
        ex.exchange, ex.routing_key, ex.payload, message_type=ex.message_type, version=ex.version
    )
    assert [f.hex() for f in frames] == [f.hex() for f in doc_frames]


def test_zbus_consumer_accepts_the_documented_frames(ex: Example, doc_frames: list[bytes]) -> None:
    dispatcher = zbus.Dispatcher()
    dispatcher.bind(ex.exchange, "#", lambda d: None)
    core = zbus.ConsumerCore(
        dispatcher, zbus.KeyRing({ex.key_id: ex.key}), clock=lambda: ex.timestamp
    )
    delivery = core.accept(list(doc_frames))
    assert delivery is not None, core.stats.as_dict()
    assert delivery.key_id == ex.key_id
    assert delivery.envelope.timestamp == ex.timestamp
    assert delivery.payload == ex.payload
    assert delivery.envelope.message_id == ex.stream_id + struct.pack(">Q", ex.sequence)


def test_the_documented_beacon_counts_the_documented_tail(ex: Example) -> None:
    """After message 1, the document's beacon (sent up to 3) makes 2 and 3 count as lost,
    and zbus's own beacon for that stream is the same bytes."""
    ring = zbus.KeyRing({ex.key_id: ex.key})
    factory = zbus.MessageFactory(ring, ex.publisher_id, clock=lambda: ex.timestamp)
    for _ in range(3):
        factory.frames(ex.exchange, ex.routing_key, None)
    factory._streams[f"{ex.exchange}/{ex.routing_key}".encode()].stream_id = ex.stream_id
    (beacon,) = factory.beacons()
    assert beacon[1] == _hex("beacon")
    dispatcher = zbus.Dispatcher()
    dispatcher.bind(ex.exchange, "#", lambda d: None)
    core = zbus.ConsumerCore(dispatcher, ring, clock=lambda: ex.timestamp)
    assert core.accept([_hex("topic"), _hex("envelope"), _hex("signature")]) is not None
    assert core.accept(beacon) is None
    assert (core.stats.lost, core.stats.beacons) == (2, 1)


# -- (b) an independent implementation verifies the document --------------------------------


def _independent_verify(ring: dict[str, bytes], frames: list[bytes]) -> list[Any]:
    """PROTOCOL.md section 7, steps 2, 3 and 5, with no zbus code."""
    if len(frames) != 3:
        raise ValueError("frame_count")
    topic, envelope, sig = frames
    if len(sig) < 35 or sig[0] != 1 or len(sig) != 34 + sig[1]:
        raise ValueError("bad_signature")
    key_id = sig[2 : 2 + sig[1]].decode("ascii")
    if key_id not in ring:
        raise ValueError("unknown_key")
    want = hmac.new(ring[key_id], struct.pack(">I", len(topic)) + topic + envelope, hashlib.sha256)
    if not hmac.compare_digest(want.digest(), sig[2 + sig[1] :]):
        raise ValueError("bad_signature")
    fields = msgpack.unpackb(envelope, raw=False, strict_map_key=True)
    assert isinstance(fields, list)
    return fields


def test_independent_verifier_accepts_the_example(ex: Example, doc_frames: list[bytes]) -> None:
    fields = _independent_verify({ex.key_id: ex.key}, doc_frames)
    topic, _, sig = doc_frames
    assert topic == f"{ex.exchange}/{ex.routing_key}".encode("ascii")
    kid = ex.key_id.encode("ascii")
    assert sig[: 2 + len(kid)] == bytes([1, len(kid)]) + kid
    assert fields == [
        2,
        ex.publisher_id,
        ex.stream_id,
        ex.sequence,
        [[ex.timestamp, ex.message_type, ex.version, ex.payload]],
    ]
    assert type(fields[2]) is bytes  # stream_id is msgpack bin, not str


def test_independent_verifier_rejects_a_changed_example(
    ex: Example, doc_frames: list[bytes]
) -> None:
    # Without this, a verifier that accepts everything would pass the test above.
    for i in range(3):
        frames = list(doc_frames)
        frames[i] = frames[i][:-1] + bytes([frames[i][-1] ^ 1])
        with pytest.raises(ValueError, match="bad_signature"):
            _independent_verify({ex.key_id: ex.key}, frames)
    with pytest.raises(ValueError, match="unknown_key"):
        _independent_verify({"k2": ex.key}, doc_frames)
    with pytest.raises(ValueError, match="bad_signature"):
        _independent_verify({ex.key_id: bytes(32)}, doc_frames)


def test_documented_mac_input_is_what_the_signature_covers(
    ex: Example, doc_frames: list[bytes]
) -> None:
    topic, envelope, sig = doc_frames
    mac_input = _hex("mac-input")
    assert mac_input == struct.pack(">I", len(topic)) + topic + envelope
    assert sig[-32:] == hmac.new(ex.key, mac_input, hashlib.sha256).digest()


def test_annotated_envelope_spells_the_same_bytes(doc_frames: list[bytes]) -> None:
    _, body = _blocks()["envelope-annotated"]
    spelled = "".join("".join(line.split("#", 1)[0].split()) for line in body.splitlines())
    assert bytes.fromhex(spelled) == doc_frames[1]


def test_documented_lengths_match_the_bytes() -> None:
    stated = {
        label: int(n)
        for n, label in re.findall(r"(\d+) bytes(?:(?!```).)*```hex ([\w-]+)", _doc(), re.S)
    }
    assert set(stated) == {"topic", "envelope", "mac-input", "signature", "beacon"}
    for label, n in stated.items():
        assert len(_hex(label)) == n, label


# -- the document's own code sample ------------------------------------------------------------


def _doc_functions() -> dict[str, Any]:
    """The ``sign`` and ``verify`` functions of the document's Python sample (the rest of the
    sample opens sockets, so only the imports and these definitions are run)."""
    (source,) = [body for lang, _, body in _BLOCK.findall(_doc()) if lang == "python"]
    tree = ast.parse(source)
    keep: list[ast.stmt] = [
        node
        for node in tree.body
        if isinstance(node, ast.Import | ast.ImportFrom)
        or (isinstance(node, ast.FunctionDef) and node.name in ("sign", "verify"))
    ]
    namespace: dict[str, Any] = {}
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(DOC), "exec"), namespace)
    return namespace


def test_document_code_sample_signs_and_verifies_the_example(
    ex: Example, doc_frames: list[bytes]
) -> None:
    fns = _doc_functions()
    topic, envelope, sig = doc_frames
    assert fns["sign"](ex.key_id, ex.key, topic, envelope) == sig
    assert fns["verify"]({ex.key_id: ex.key}, doc_frames)[4][0][3] == ex.payload
    with pytest.raises(ValueError):
        fns["verify"]({ex.key_id: ex.key}, [topic, envelope + b"\x00", sig])
    with pytest.raises(KeyError):
        fns["verify"]({"other": ex.key}, doc_frames)
