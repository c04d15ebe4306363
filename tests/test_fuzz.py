"""Fuzzing: hostile bytes to every socket a real zbus-proxy binds, and to its consumers.

Each test runs a hypothesis-driven barrage against a live proxy process and then, in the same
test, proves that the proxy is alive and answers ``ping``, that the consumers' rejection
counters moved (exactly as an in-process oracle ``ConsumerCore`` fed the same bytes predicts),
and that a legitimate stream sent alongside arrived complete and in order.

Budget: the default run is small (seconds). ``ZBUS_FUZZ_EXAMPLES=N`` multiplies the examples
of every test here by ``N / 10``; docs/SECURITY.md gives the long-run commands, e.g.

    ZBUS_FUZZ_EXAMPLES=10000 python3 -m pytest -q -p no:timeout tests/test_fuzz.py

The hypothesis-generated barrages are sent from inside the test (a ``@given`` function
called by the test), so one proxy takes every example, and all assertions come after them.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zbus_proxy import Proxy
from zmq.utils.monitor import recv_monitor_message

import zbus
from zbus._envelope import signature_frame
from zbus._names import validate_routing_key

from .conftest import SMALL_PROXY_LIMIT, ProxyProcess, collect_deliveries

KEY = bytes(range(32))
RING = zbus.KeyRing({"k1": KEY})
PREFIX = b"notifications/"  # what the consumers here subscribe to: garbage with it reaches them
SCALE = max(1, int(os.environ.get("ZBUS_FUZZ_EXAMPLES", "10"))) / 10


def examples(n: int) -> int:
    return max(1, int(n * SCALE))


def fuzz_settings(n: int) -> Callable[[Any], Any]:
    return settings(
        max_examples=examples(n),
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


# -- garbage ---------------------------------------------------------------------------------

_VALID = zbus.MessageFactory(RING, "fuzz.victim").frames(
    "notifications", "fuzz.victim", {"n": 1, "pad": "x" * 20}
)


def valid_frames() -> list[bytes]:
    """A genuine message (always the same one), never sent as is: the base for mutations."""
    return list(_VALID)


@st.composite
def mutated(draw: st.DrawFn) -> list[bytes]:
    """A valid message changed in one way, so it is never valid."""
    frames = valid_frames()
    op = draw(st.sampled_from(["truncate", "extend", "flip", "drop", "add", "replace", "swap"]))
    i = draw(st.integers(0, 2))
    if op == "truncate":
        cut = draw(st.integers(1, len(frames[i])))
        frames[i] = frames[i][:-cut]
    elif op == "extend":
        frames[i] += draw(st.binary(min_size=1, max_size=64))
    elif op == "flip":
        pos = draw(st.integers(0, len(frames[i]) - 1))
        mask = draw(st.integers(1, 255))
        frames[i] = frames[i][:pos] + bytes([frames[i][pos] ^ mask]) + frames[i][pos + 1 :]
    elif op == "drop":
        del frames[i]
    elif op == "add":
        frames.insert(i, draw(st.binary(max_size=64)))
    elif op == "replace":
        old = frames[i]
        frames[i] = draw(st.binary(max_size=128).filter(lambda b: b != old))
    else:
        j = draw(st.integers(0, 2).filter(lambda j: frames[j] != frames[i]))
        frames[i], frames[j] = frames[j], frames[i]
    return frames


def _ts() -> float:
    return time.time()


_FIELD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(),
    st.text(max_size=20), st.binary(max_size=20),
    st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(-(2**63), 2**63 - 1), max_size=3),
)


@st.composite
def bad_envelope(draw: st.DrawFn) -> bytes:
    """Envelope bytes an insider (a holder of the key) might sign: all of them invalid."""
    good = [1, bytes(8) + (1).to_bytes(8, "big"), "fuzz.insider", 1, _ts(), "a.b", 1, {}]
    kind = draw(st.sampled_from([
        "deep", "deep_payload", "huge_length", "ext", "int_key", "field_type", "count",
        "format", "trailing", "random", "truncated",
    ]))
    if kind == "deep":  # nested beyond the decoder's stack
        return b"\x91" * draw(st.integers(1100, 4000)) + b"\xc0"
    if kind == "deep_payload":
        head: bytes = msgpack.packb(good[:7], use_bin_type=True)
        return b"\x98" + head[1:] + b"\x91" * draw(st.integers(1100, 4000)) + b"\xc0"
    if kind == "huge_length":  # declared lengths far beyond the frame
        marker = draw(st.sampled_from([b"\xdd", b"\xdf", b"\xdb", b"\xc6", b"\xdc", b"\xde"]))
        size = draw(st.sampled_from([b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\xff\xff"]))
        bomb = marker + size[: 2 if marker in (b"\xdc", b"\xde") else 4]
        if draw(st.booleans()):
            return bomb
        head = msgpack.packb(good[:7], use_bin_type=True)
        return b"\x98" + bytes(head[1:]) + bomb
    if kind == "ext":
        good[7] = msgpack.ExtType(draw(st.integers(0, 127)), draw(st.binary(max_size=8)))
    elif kind == "int_key":
        good[7] = {draw(st.integers(-(2**63), 2**63 - 1)): "v"}
    elif kind == "field_type":
        index = draw(st.integers(1, 6))
        good[index] = draw(_FIELD_VALUES.filter(lambda v: not _valid_field(index, v)))
    elif kind == "count":
        n = draw(st.sampled_from([0, 1, 7, 9, 20]))
        good = (good + [None] * 20)[:n] if n else []
        if n == 0:
            return msgpack.packb([])  # type: ignore[no-any-return]
    elif kind == "format":
        good[0] = draw(st.sampled_from([0, 2, 255, True, 1.0, "1", None, -1]))
    elif kind == "trailing":
        return msgpack.packb(good, use_bin_type=True) + draw(st.binary(min_size=1, max_size=8))  # type: ignore[no-any-return]
    elif kind == "truncated":
        data: bytes = msgpack.packb(good, use_bin_type=True)
        return data[: draw(st.integers(0, len(data) - 1))]
    else:  # random bytes that are not, by chance, one complete valid envelope
        return draw(st.binary(max_size=300).filter(lambda b: not b.startswith(b"\x98\x01")))
    packed: bytes = msgpack.packb(good, use_bin_type=True)
    return packed


def _valid_field(index: int, value: Any) -> bool:
    if index == 1:
        return type(value) is bytes and len(value) == 16
    if index == 2:
        return type(value) is str and 0 < len(value) <= 255
    if index == 3 or index == 6:
        return type(value) is int and value >= 0
    if index == 4:
        return type(value) in (int, float)
    if index == 5:  # only a valid routing key passes
        try:
            validate_routing_key(value)
        except Exception:
            return False
        return True
    return True


@st.composite
def insider(draw: st.DrawFn) -> list[bytes]:
    """Validly signed frames with a bad envelope or topic: reach the decoder, then rejected."""
    topic = PREFIX + draw(st.sampled_from([b"fuzz.insider", b"a..b", b"", b"x/y", b"\xff"]))
    envelope = draw(bad_envelope()) if topic == PREFIX + b"fuzz.insider" else draw(
        st.binary(max_size=64)
    )
    return [topic, envelope, signature_frame(RING, topic, envelope)]


garbage = st.one_of(
    st.lists(st.binary(max_size=300), min_size=1, max_size=6),  # mostly filtered by topic
    st.builds(lambda t, rest: [PREFIX + t, *rest], st.binary(max_size=40),
              st.lists(st.binary(max_size=300), max_size=5)),
    mutated(),
    insider(),
    st.builds(lambda b: [b"\x00" + b], st.binary(max_size=40)),  # control-looking
    st.builds(lambda b: [PREFIX, b"", b], st.binary(max_size=98)),
)


def consumer_core(track_sequences: bool = True) -> zbus.ConsumerCore:
    dispatcher = zbus.Dispatcher()
    dispatcher.bind("notifications", "#", lambda delivery: None)
    return zbus.ConsumerCore(dispatcher, RING, track_sequences=track_sequences)


# -- the decoder alone (fast; the CI fuzz of ConsumerCore.accept) ----------------------------


@fuzz_settings(300)
@given(st.lists(garbage, min_size=1, max_size=20))
def test_accept_never_raises_and_counts_each_message_once(batch: list[list[bytes]]) -> None:
    core = consumer_core()
    for frames in batch:
        before = (sum(core.stats.rejected.values()), core.stats.unmatched)
        result = core.accept(frames)
        after = (sum(core.stats.rejected.values()), core.stats.unmatched)
        control = len(frames) == 1 and frames[0].startswith(b"\x00")
        assert result is None  # nothing in `garbage` is valid
        if control:  # a readiness probe: ignored, not counted
            assert after == before
        else:  # exactly one counter moved, whatever the bytes
            assert sum(after) == sum(before) + 1, frames
    assert core.stats.delivered == 0 and core.stats.lost == 0


# -- against a real proxy --------------------------------------------------------------------


@pytest.fixture
def conn(proxy_process: ProxyProcess, run_dir: Path) -> Iterator[zbus.Connection]:
    with zbus.Connection(run_dir) as connection:
        yield connection


def dispatcher() -> zbus.Dispatcher:
    d = zbus.Dispatcher()
    d.bind("notifications", "#", lambda delivery: None)
    return d


def collect(consumer: Any, count: int, timeout: float = 30.0) -> list[zbus.Delivery]:
    return collect_deliveries(consumer, count, timeout)


def raw(conn: zbus.Connection, kind: int, endpoint: str) -> zmq.Socket[Any]:
    sock: zmq.Socket[Any] = conn.ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(endpoint)
    return sock


def send_raw_bytes(path: Path, data: bytes) -> None:
    """``data`` on a fresh unix connection to socket ``path``, read until libzmq hangs up."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            while s.recv(4096):  # until libzmq closes on us
                pass
        except OSError:  # reset (or timed out): refused either way
            pass


def assert_proxy_serves(proxy: ProxyProcess, conn: zbus.Connection) -> None:
    assert proxy.proc is not None and proxy.proc.poll() is None, proxy.log.read_text()
    assert conn.control.request("ping", timeout=5)["pid"] == proxy.pid


def legit_stream(conn: zbus.Connection, count: int, publisher: str = "fuzz.legit") -> None:
    factory = zbus.MessageFactory(RING, publisher)
    for n in range(count):
        conn.send_frames(factory.frames("notifications", "fuzz.legit", {"n": n}))
    conn.flush()


def check_legit(got: list[zbus.Delivery], count: int, publisher: str = "fuzz.legit") -> None:
    assert [(d.publisher_id, d.payload["n"]) for d in got] == [(publisher, n) for n in range(count)]


def assert_legit_traffic_flows(conn: zbus.Connection, count: int) -> None:
    """A fresh subscriber gets a legit stream of ``count`` messages, whole and in order."""
    sub = conn.subscribe(dispatcher(), RING)
    sub.ready(timeout=10)
    legit_stream(conn, count)
    check_legit(collect(sub, count), count)
    sub.close()


def test_ingress_barrage_reaches_subscriber_and_pool_and_legit_traffic_flows(
    proxy_process: ProxyProcess, conn: zbus.Connection
) -> None:
    sub = conn.subscribe(dispatcher(), RING)
    member = conn.join_pool("fuzz", dispatcher(), RING)
    sub.ready(timeout=10)
    member.ready(timeout=10)
    attacker = raw(conn, zmq.PUSH, conn.endpoints.ingress)
    legit = zbus.MessageFactory(RING, "fuzz.legit")
    oracle, pool_oracle = consumer_core(), consumer_core(track_sequences=False)
    sent = Counter[str]()

    @fuzz_settings(40)
    @given(st.lists(garbage, min_size=1, max_size=10))
    def barrage(batch: list[list[bytes]]) -> None:
        for frames in batch:
            attacker.send_multipart(frames)
            sent["garbage"] += 1
            if frames[0].startswith(PREFIX):  # what the subscriptions let through
                oracle.accept(frames)
                pool_oracle.accept(frames)
        # legitimate traffic interleaved with the attack
        conn.send_frames(legit.frames("notifications", "fuzz.legit", {"n": sent["legit"]}))
        sent["legit"] += 1

    try:
        barrage()
        # The attacker's own last message is genuine: when it arrives, all before it did.
        marker = zbus.MessageFactory(RING, "fuzz.marker")
        attacker.send_multipart(marker.frames("notifications", "fuzz.marker", {"n": 0}))
        conn.flush()
        for consumer, model in ((sub, oracle), (member, pool_oracle)):
            got = collect(consumer, sent["legit"] + 1)
            assert Counter(d.publisher_id for d in got) == {
                "fuzz.legit": sent["legit"], "fuzz.marker": 1
            }
            check_legit([d for d in got if d.publisher_id == "fuzz.legit"], sent["legit"])
            assert consumer.stats.rejected == model.stats.rejected  # exactly as predicted
            assert sum(consumer.stats.rejected.values()) > 0
        assert sub.stats.lost == 0
        assert_proxy_serves(proxy_process, conn)
    finally:
        attacker.close(linger=0)
        sub.close()
        member.close()


def refused_and_dropped(conn: zbus.Connection, kind: int, endpoint: str,
                        frames: list[bytes], timeout: float = 10.0) -> None:
    """Send ``frames`` from a fresh socket and block until the proxy drops its connection:
    the readiness check that an oversize frame was refused by libzmq, never given to Python."""
    sock: zmq.Socket[Any] = conn.ctx.socket(kind)
    monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        sock.connect(endpoint)
        sock.send_multipart(frames)
        assert monitor.poll(int(timeout * 1000)), f"the proxy kept a peer sending {kind}"
        assert recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)


def zmtp_send(path: Path, socket_type: bytes, *frames: bytes, timeout: float = 10.0) -> str:
    """Speak ZMTP 3.0 (NULL mechanism) by hand as ``socket_type`` over unix socket ``path``,
    send ``frames`` as one message, then wait until the proxy closes the connection
    ("dropped") or, after our own end-of-stream, lets it be ("kept")."""
    greeting = b"\xff" + bytes(8) + b"\x7f\x03\x00" + b"NULL".ljust(20, b"\x00") + bytes(32)
    ready = b"\x05READY\x0bSocket-Type" + struct.pack(">I", len(socket_type)) + socket_type
    wire = greeting + b"\x04" + bytes([len(ready)]) + ready
    for i, frame in enumerate(frames):
        more = 0x01 if i < len(frames) - 1 else 0
        wire += bytes([more | 0x02]) + struct.pack(">Q", len(frame)) + frame
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        try:
            s.sendall(wire)
        except (BrokenPipeError, ConnectionResetError):
            return "dropped"  # refused before we finished sending
        try:
            while s.recv(65536):  # the proxy's greeting, then nothing until it hangs up
                pass
        except ConnectionResetError:
            pass
        except TimeoutError:
            return "kept"
        return "dropped"



def test_long_subscriptions_cannot_crash_the_proxy(
    proxy_process: ProxyProcess, conn: zbus.Connection, run_dir: Path
) -> None:
    for name in ("deliver.sock", "origin.sock"):
        zmtp_send(run_dir / name, b"SUB", b"\x01" + b"a" * 300_000, timeout=1)
        zmtp_send(run_dir / name, b"XSUB", b"\x01" + PREFIX + b"b" * 300_000, timeout=1)
        assert_proxy_serves(proxy_process, conn)
    assert_legit_traffic_flows(conn, 100)


LIMIT = SMALL_PROXY_LIMIT


def test_oversize_frames_never_reach_python(small_proxy: ProxyProcess, run_dir: Path) -> None:
    limits = zbus.Settings(max_message_bytes=LIMIT)
    with zbus.Connection(run_dir, settings=limits) as conn:
        sub = conn.subscribe(dispatcher(), RING)
        sub.ready(timeout=10)
        legit_stream(conn, 50, "fuzz.before")
        # An oversize frame at each receiving socket the proxy binds: libzmq drops the sender.
        big = os.urandom(LIMIT + 1)
        for kind, endpoint, frames in [
            (zmq.PUSH, conn.endpoints.ingress, [PREFIX + big, b"", b""]),
            (zmq.PUSH, conn.endpoints.ingress, [PREFIX + b"x", big, b""]),
            (zmq.REQ, conn.endpoints.control, [big]),
        ]:
            refused_and_dropped(conn, kind, endpoint, frames)
        # A subscription frame (raw ZMTP: a pyzmq XSUB here would store it in this process's
        # own subscription trie first) is refused at the deliver XPUB the same way.
        assert zmtp_send(run_dir / "deliver.sock", b"SUB", b"\x01" + big) == "dropped"
        assert_proxy_serves(small_proxy, conn)
        legit_stream(conn, 50, "fuzz.after")
        got = collect(sub, 100)
        check_legit(got[:50], 50, "fuzz.before")
        check_legit(got[50:], 50, "fuzz.after")
        # Nothing oversize reached the subscriber: it received exactly the legit messages.
        assert sub.stats.received == 100 and sub.stats.rejected == {}
        sub.close()



control_requests = st.one_of(
    st.lists(st.binary(max_size=200), min_size=1, max_size=3),
    st.builds(
        lambda op, extra: [msgpack.packb({"op": op, **extra})],
        st.sampled_from(["ping", "stats", "pools", "declare_pool", "shutdown", "", "x" * 300]),
        st.dictionaries(st.sampled_from(["name", "bindings", "op", "x"]), _FIELD_VALUES,
                        max_size=3),
    ),
    st.builds(lambda v: [msgpack.packb(v)], _FIELD_VALUES),
)


def test_control_socket_barrage(proxy_process: ProxyProcess, conn: zbus.Connection) -> None:
    replies = Counter[str]()

    @fuzz_settings(60)
    @given(control_requests)
    def barrage(frames: list[bytes]) -> None:
        req = raw(conn, zmq.REQ, conn.endpoints.control)
        try:
            req.send_multipart(frames)
            assert req.poll(5000), f"no reply to {frames!r}"
            reply = msgpack.unpackb(req.recv(), raw=False)
        finally:
            req.close(linger=0)
        assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool)
        replies["ok" if reply["ok"] else "refused"] += 1

    barrage()
    # A DEALER skips REQ's envelope: REP drops such requests without a reply, and goes on.
    dealer = raw(conn, zmq.DEALER, conn.endpoints.control)
    try:
        for junk in ([b"garbage"], [b"", b"\xc1"], [b"a", b"b", b"c"], [b"\x00" * 100]):
            dealer.send_multipart(junk)
        dealer.send_multipart([b"", msgpack.packb({"op": "ping"})])  # a well-formed one
        answers: list[dict[str, Any]] = []
        while not answers or answers[-1]["ok"] is not True:
            assert dealer.poll(5000), answers
            answers.append(msgpack.unpackb(dealer.recv_multipart()[-1], raw=False))
        # [b"", b"\xc1"] is a well-framed request with bad content: refused; the rest dropped
        assert [a["ok"] for a in answers] == [False, True]
    finally:
        dealer.close(linger=0)
    assert replies["refused"] > 0
    assert_proxy_serves(proxy_process, conn)
    assert_legit_traffic_flows(conn, 100)


subscription_frames = st.lists(
    st.one_of(
        st.builds(lambda b: b"\x01" + b, st.binary(max_size=64)),  # subscribe
        st.builds(lambda b: b"\x00" + b, st.binary(max_size=64)),  # unsubscribe
        st.binary(max_size=64),  # neither
    ),
    min_size=1, max_size=4,
)


def subscription_barrage(
    proxy: ProxyProcess, conn: zbus.Connection, endpoint: str
) -> None:
    attacker = raw(conn, zmq.XSUB, endpoint)
    try:
        @fuzz_settings(60)
        @given(subscription_frames)
        def barrage(frames: list[bytes]) -> None:
            attacker.send_multipart(frames)

        barrage()
        for i in range(3000):  # and thousands of distinct filters at once
            attacker.send(b"\x01" + PREFIX + os.urandom(8) + str(i).encode())
        assert_proxy_serves(proxy, conn)
        sub = conn.subscribe(dispatcher(), RING)
        sub.ready(timeout=5)  # goes through the same deliver XPUB, after the barrage
        legit_stream(conn, 200)
        check_legit(collect(sub, 200), 200)
        assert sub.stats.rejected == {} and sub.stats.lost == 0
        assert_proxy_serves(proxy, conn)
        sub.close()
    finally:
        attacker.close(linger=0)


def test_subscription_barrage_on_origin(
    proxy_process: ProxyProcess, conn: zbus.Connection
) -> None:
    subscription_barrage(proxy_process, conn, conn.endpoints.origin)


def test_subscription_barrage_on_deliver(
    proxy_process: ProxyProcess, conn: zbus.Connection
) -> None:
    subscription_barrage(proxy_process, conn, conn.endpoints.deliver)


def test_data_then_duplicate_subscription_cannot_stop_delivery(run_dir: Path) -> None:
    """The barrage above, minimised: [data, duplicate subscription] from a peer on
    deliver.sock used to end the deliver device's loop (EAGAIN on a continuation that never
    came), silencing delivery while the proxy still answered ping."""
    with Proxy(run_dir), zbus.Connection(run_dir) as conn:
        attacker = raw(conn, zmq.XSUB, conn.endpoints.deliver)
        try:
            attacker.send(b"\x01dup")
            assert conn.control.request("ping")["ok"]  # the subscription is in, then:
            attacker.send_multipart([b"data", b"\x01dup"])  # its second part: a duplicate
            assert conn.control.request("ping")["ok"]
            assert_legit_traffic_flows(conn, 100)
        finally:
            attacker.close(linger=0)


def test_non_zmtp_bytes_and_wrong_peers_on_every_bound_socket(
    proxy_process: ProxyProcess, conn: zbus.Connection, run_dir: Path
) -> None:
    conn.declare_pool("fz", ["notifications/#"])
    paths = sorted(run_dir.glob("*.sock"))
    assert {p.name for p in paths} >= {
        "ingress.sock", "deliver.sock", "control.sock", "origin.sock",
        "pool-fz.sock", "pool-fz.origin.sock",
    }
    greeting = b"\xff" + bytes(8) + b"\x7f\x03\x00" + b"NULL".ljust(20, b"\x00") + bytes(31)

    @fuzz_settings(20)
    @given(st.one_of(st.binary(min_size=1, max_size=512),
                     st.builds(lambda b: greeting + b, st.binary(max_size=256)),
                     st.builds(lambda n: greeting[:n], st.integers(1, len(greeting)))))
    def barrage(data: bytes) -> None:
        for path in paths:
            send_raw_bytes(path, data)

    barrage()
    # ZeroMQ peers of an incompatible type: the handshake fails, nothing is delivered
    # (what they send stays queued in their own socket).
    wrong = [raw(conn, zmq.PUSH, f"ipc://{run_dir}/pool-fz.sock"),
             raw(conn, zmq.PUB, conn.endpoints.ingress),
             raw(conn, zmq.PUSH, conn.endpoints.deliver),
             raw(conn, zmq.PUSH, conn.endpoints.control)]
    try:
        for sock in wrong:
            with contextlib.suppress(zmq.Again):
                sock.send_multipart([PREFIX + b"x", b"", b""], zmq.NOBLOCK)
        assert_proxy_serves(proxy_process, conn)
        sub = conn.subscribe(dispatcher(), RING)
        member = conn.join_pool("fz", dispatcher(), RING)
        sub.ready(timeout=10)
        member.ready(timeout=10)
        legit_stream(conn, 100)
        check_legit(collect(sub, 100), 100)
        check_legit(collect(member, 100), 100)
        assert sub.stats.rejected == {} and member.stats.rejected == {}
        sub.close()
        member.close()
    finally:
        for sock in wrong:
            sock.close(linger=0)
