"""Security against a real zbus-proxy: key rotation, retired and unknown keys, forgeries,
replays, stale and future timestamps, per-exchange keys, publisher ids bound to keys.

Every attack runs in the same test as a legitimate stream, and each test asserts both the
exact rejection counters and that every legitimate message arrived (docs/SECURITY.md lists
the attacks and their counters).

Ordering: messages sent on one socket reach a subscriber in order (one pipe end to end), so
a legitimate message sent *after* the attacks on the same socket proves the attacks before it
were received and counted. That is the synchronisation used here, never a sleep.
"""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from hypothesis import given
from hypothesis import strategies as st

import zbus
from zbus._dispatch import ConsumerCore
from zbus._envelope import decode_envelope, verify_frames
from zbus._keys import KeyNotAllowedError, PublisherNotAllowedError, format_key_file

from .conftest import ProxyProcess, collect_deliveries

K_OLD = bytes(range(32))
K_NEW = bytes(range(100, 132))
K_BILL = bytes(range(200, 232))
K_A = bytes(range(50, 82))
K_B = bytes(range(150, 182))

# The two diffs of issue 5 (MessageFactory signs per exchange and can rekey; ConsumerCore
# checks the exchange's allowed key ids) land together; these tests light up with them.
PER_EXCHANGE = hasattr(zbus.MessageFactory, "rekey")
needs_per_exchange = pytest.mark.skipif(
    not PER_EXCHANGE, reason="needs the issue-5 change to zbus/_message.py and zbus/_dispatch.py"
)


# -- KeyRing: per-exchange keys, without sockets -------------------------------------------


def billing_ring(**kwargs: Any) -> zbus.KeyRing:
    return zbus.KeyRing(
        {"k1": K_OLD, "kb": K_BILL}, "k1", exchanges={"billing": "kb"}, **kwargs
    )


def test_signing_key_is_chosen_per_exchange() -> None:
    ring = billing_ring()
    assert ring.signing_key_for("billing") == ("kb", K_BILL)
    assert ring.signing_key_for("compute") == ("k1", K_OLD)  # the active key elsewhere
    assert ring.exchanges == {"billing": ["kb"]}
    assert ring.shared_ids == ["k1"]


def test_exchange_keys_verify_only_where_they_are_allowed() -> None:
    ring = billing_ring()
    assert ring.permits("billing", "kb") and not ring.permits("billing", "k1")
    assert ring.permits("compute", "k1") and not ring.permits("compute", "kb")
    assert not ring.permits("compute", "nope")
    with pytest.raises(KeyNotAllowedError, match="'kb' is not allowed on exchange 'compute'"):
        ring.check_exchange("compute", "kb")
    ring.check_exchange("billing", "kb")  # no error
    err = KeyNotAllowedError("x")
    assert isinstance(err, zbus.SignatureError) and err.reason == "key_not_allowed"


def test_a_ring_without_exchanges_permits_every_key_everywhere() -> None:
    ring = zbus.KeyRing({"k1": K_OLD, "k2": K_NEW}, "k2")
    assert all(ring.permits(ex, k) for ex in ("a", "billing") for k in ("k1", "k2"))
    assert ring.exchanges == {} and ring.shared_ids == ["k1", "k2"]


def test_several_keys_per_exchange_the_first_signs() -> None:
    ring = zbus.KeyRing(
        {"k1": K_OLD, "kb": K_BILL, "kb2": K_NEW}, "k1", exchanges={"billing": ["kb2", "kb"]}
    )
    assert ring.signing_key_for("billing") == ("kb2", K_NEW)
    assert ring.permits("billing", "kb") and ring.permits("billing", "kb2")
    assert ring.exchanges == {"billing": ["kb2", "kb"]}


def test_the_active_key_stays_shared_even_when_an_exchange_lists_it() -> None:
    ring = zbus.KeyRing({"k1": K_OLD, "kb": K_BILL}, "k1", exchanges={"billing": ["kb", "k1"]})
    assert ring.permits("billing", "k1") and ring.permits("compute", "k1")
    assert not ring.permits("compute", "kb")


def test_explicit_shared_ids() -> None:
    ring = zbus.KeyRing(
        {"k0": K_NEW, "k1": K_OLD, "kb": K_BILL}, "k1",
        exchanges={"billing": ["kb", "k0", "k1"]}, shared=["k0", "k1"],
    )
    assert ring.permits("compute", "k0") and ring.permits("billing", "k0")
    assert not ring.permits("compute", "kb")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"exchanges": {"billing": "missing"}}, "names key id 'missing'"),
        ({"exchanges": {"billing": []}}, "lists no key id"),
        ({"exchanges": {"bad/name": "kb"}}, "bad/name"),
        ({"shared": ["missing"]}, "shared names key id 'missing'"),
    ],
)
def test_bad_exchange_configuration_is_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(zbus.ConfigError, match=message):
        zbus.KeyRing({"k1": K_OLD, "kb": K_BILL}, "k1", **kwargs)


def test_rotation_helpers_make_new_rings() -> None:
    consumer = zbus.KeyRing({"old": K_OLD, "new": K_NEW}, "old")
    switched = consumer.with_active("new")
    assert switched.active_id == "new" and consumer.active_id == "old"  # immutable
    retired = switched.without("old")
    assert retired.ids() == ["new"] and "old" in switched
    with pytest.raises(zbus.ConfigError, match="active key"):
        switched.without("new")
    with pytest.raises(zbus.ConfigError, match="no key with id"):
        retired.without("old")
    with pytest.raises(zbus.ConfigError, match="only key of exchange 'billing'"):
        billing_ring().without("kb")
    kept = zbus.KeyRing(
        {"k1": K_OLD, "kb": K_BILL, "kb2": K_NEW}, "k1", exchanges={"billing": ["kb2", "kb"]}
    ).without("kb")
    assert kept.exchanges == {"billing": ["kb2"]}


def test_key_file_with_exchanges(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(format_key_file(K_OLD, "k1") + format_key_file(K_BILL, "kb"))
    path.chmod(0o600)
    ring = zbus.KeyRing.from_file(path, exchanges={"billing": "kb"})
    assert ring.signing_key_for("billing") == ("kb", K_BILL)
    assert not ring.permits("compute", "kb")
    assert K_BILL.hex() not in repr(ring) and K_OLD.hex() not in repr(ring)
    assert "billing" in repr(ring)


def test_verify_then_check_exchange_with_today_s_primitives() -> None:
    """The consumer side's two steps, as _dispatch.py runs them with the issue-5 change."""
    consumer = billing_ring()
    compute_only = zbus.KeyRing({"k1": K_OLD})  # a compute publisher's ring
    frames = zbus.MessageFactory(compute_only, "svc").frames("billing", "invoice.paid", 1)
    assert verify_frames(consumer, *frames) == "k1"  # a genuine signature ...
    with pytest.raises(KeyNotAllowedError):
        consumer.check_exchange("billing", "k1")  # ... by a key not allowed on billing


# -- publisher ids bound to keys, without sockets -------------------------------------------


def identity_ring(bound: bool = True) -> zbus.KeyRing:
    """A consumer's ring: key "a" is svc-a's, key "b" is svc-b's (when bound)."""
    publishers = {"a": "svc-a*", "b": "svc-b*"} if bound else None
    return zbus.KeyRing({"a": K_A, "b": K_B}, "a", publishers=publishers)


def consumer_core(ring: zbus.KeyRing) -> ConsumerCore:
    dispatcher = zbus.Dispatcher()
    dispatcher.bind("notifications", "#", lambda delivery: None)
    return ConsumerCore(dispatcher, ring)


def forge(key_id: str, key: bytes, victim: zbus.MessageFactory, sequence: int,
          publisher_id: str | None = None, stream_id: bytes | None = None,
          routing_key: str = "compute.tick") -> list[bytes]:
    """A message genuinely signed by ``key_id`` that claims ``victim``'s publisher id and its
    stream on ``notifications/routing_key`` (or the ones given) at ``sequence``: what any
    holder of a key can make."""
    forger = zbus.MessageFactory(
        zbus.KeyRing({key_id: key}), publisher_id or victim.publisher_id
    )
    forger.frames("notifications", routing_key, None)  # opens the stream's record
    record = forger._streams[f"notifications/{routing_key}".encode()]
    victims = victim.stream("notifications", routing_key)[0] or os.urandom(8)
    record.stream_id = victims if stream_id is None else stream_id
    record.next = sequence
    return forger.frames("notifications", routing_key, {"forged": True})


def run_identity_attack(bound: bool) -> tuple[ConsumerCore, list[zbus.Delivery]]:
    """svc-a sends 0..4; key "b" claims svc-a's run at sequence 10**9; svc-a sends 5..9;
    svc-b (key "b", for itself) sends one message."""
    core = consumer_core(identity_ring(bound))
    victim = zbus.MessageFactory(zbus.KeyRing({"a": K_A}, publishers={"a": "svc-a*"}), "svc-a")
    honest_b = zbus.MessageFactory(zbus.KeyRing({"b": K_B}), "svc-b")
    got: list[zbus.Delivery] = []
    stream = [victim.frames("notifications", "compute.tick", {"n": n}) for n in range(5)]
    stream.append(forge("b", K_B, victim, 10**9))
    stream += [victim.frames("notifications", "compute.tick", {"n": n}) for n in range(5, 10)]
    stream.append(honest_b.frames("notifications", "compute.tick", {"n": "b"}))
    for frames in stream:
        delivery = core.accept(frames)
        if delivery is not None:
            got.append(delivery)
    return core, got


def test_a_bound_key_cannot_claim_another_publishers_stream() -> None:
    core, got = run_identity_attack(bound=True)
    assert [(d.publisher_id, d.key_id, d.payload) for d in got] == [
        *(("svc-a", "a", {"n": n}) for n in range(10)), ("svc-b", "b", {"n": "b"})
    ]
    assert core.stats.rejected == {"publisher_not_allowed": 1}
    assert core.stats.rejected["replay"] == 0 and core.stats.lost == 0
    assert core.stats.reordered == 0
    assert len(core._guard) == 2  # svc-a's run and svc-b's: the forgery created nothing


def test_unbound_keys_let_any_key_holder_stall_another_publisher() -> None:
    """The limit of the default (no ``publishers=``), and proof that the test above can fail:
    the same forgery moves svc-a's replay window, and svc-a's real messages become replays."""
    core, got = run_identity_attack(bound=False)
    assert [(d.publisher_id, d.payload) for d in got] == [
        *(("svc-a", {"n": n}) for n in range(5)), ("svc-a", {"forged": True}),
        ("svc-b", {"n": "b"}),
    ]
    assert core.stats.rejected == {"replay": 5}
    assert core.stats.lost == 10**9 - 6


def test_bound_keys_reject_every_claim_outside_their_patterns() -> None:
    core = consumer_core(identity_ring())
    victim = zbus.MessageFactory(zbus.KeyRing({"a": K_A}), "svc-a")
    cases = [
        (forge("b", K_B, victim, 1, publisher_id="svc-a.new"), "publisher_not_allowed"),
        (forge("a", K_A, victim, 1, publisher_id="svc-b"), "publisher_not_allowed"),
        (forge("b", K_B, victim, 1, publisher_id="svc-bee"), None),  # a prefix: allowed
        (forge("a", K_A, victim, 7, publisher_id="svc-a.worker"), None),
    ]
    for frames, reason in cases:
        accepted = core.accept(frames) is not None
        assert accepted == (reason is None)
    assert core.stats.rejected == {"publisher_not_allowed": 2}


def test_keys_left_out_of_publishers_stay_unbound() -> None:
    ring = zbus.KeyRing({"a": K_A, "c": K_OLD}, "a", publishers={"a": "svc-a"})
    assert ring.publishers == {"a": ["svc-a"]}
    assert ring.permits_publisher("anyone", "c") and not ring.permits_publisher("svc-b", "a")
    core = consumer_core(ring)
    victim = zbus.MessageFactory(zbus.KeyRing({"a": K_A}), "svc-a")
    assert core.accept(forge("c", K_OLD, victim, 5)) is not None  # today's behaviour
    assert core.stats.rejected == {}


@given(
    st.lists(
        st.one_of(
            st.none(),  # svc-a's next real message
            st.tuples(  # key "b" claiming some other publisher's id, stream and sequence
                st.text("absv-.*", min_size=1, max_size=8).filter(
                    lambda pid: not pid.startswith("svc-b")
                ),
                st.one_of(st.none(), st.binary(min_size=8, max_size=8)),
                st.integers(min_value=1, max_value=2**63 - 1),
            ),
        ),
        max_size=30,
    )
)
def test_no_forgery_by_a_bound_key_disturbs_another_stream(
    events: list[tuple[str, bytes | None, int] | None],
) -> None:
    core = consumer_core(identity_ring())
    victim = zbus.MessageFactory(zbus.KeyRing({"a": K_A}), "svc-a")
    delivered = 0
    for event in events:
        if event is None:
            frames = victim.frames("notifications", "compute.tick", {"n": delivered})
            delivery = core.accept(frames)
            assert delivery is not None and delivery.payload == {"n": delivered}
            delivered += 1
        else:
            publisher_id, stream_id, sequence = event
            assert core.accept(forge("b", K_B, victim, sequence, publisher_id, stream_id)) is None
    forged = len(events) - delivered
    assert core.stats.rejected == ({"publisher_not_allowed": forged} if forged else {})
    assert core.stats.lost == 0 and core.stats.reordered == 0
    assert len(core._guard) == (1 if delivered else 0)


@pytest.mark.parametrize(
    ("patterns", "publisher_id", "allowed"),
    [
        ("svc-a", "svc-a", True),
        ("svc-a", "svc-ab", False),  # exact: no prefix match
        ("svc-a", "svc-a.1", False),
        ("svc-a*", "svc-a", True),  # a prefix matches itself
        ("svc-a*", "svc-ab", True),
        ("compute.*", "compute.host1", True),
        ("compute.*", "compute.a.b", True),  # any rest, unlike a topic pattern's "*"
        ("compute.*", "compute", False),
        ("compute.*", "computer.x", False),
        ("compute.*", "Compute.x", False),  # case matters
        ("*", "anything at all", True),
        (["svc-a", "billing.*"], "billing.eu", True),
        (["svc-a", "billing.*"], "svc-b", False),
        (["svc-a", "*"], "svc-b", True),
    ],
)
def test_publisher_patterns(patterns: str | list[str], publisher_id: str, allowed: bool) -> None:
    ring = zbus.KeyRing({"k": K_OLD}, publishers={"k": patterns})
    assert ring.permits_publisher(publisher_id, "k") is allowed
    if allowed:
        ring.check_publisher(publisher_id, "k")
    else:
        with pytest.raises(PublisherNotAllowedError):
            ring.check_publisher(publisher_id, "k")


def reference_match(patterns: list[str], publisher_id: str) -> bool:
    """An independent reading of the rule: a pattern is an exact id, or "prefix*"."""
    return any(
        re.fullmatch(re.escape(p[:-1]) + ".*" if p.endswith("*") else re.escape(p),
                     publisher_id, re.S)
        for p in patterns
    )


_pattern = st.builds(
    lambda body, star: body + ("*" if star else ""),
    st.text("ab.", max_size=4), st.booleans(),
).filter(bool)


@given(st.lists(_pattern, min_size=1, max_size=4), st.text("ab.", min_size=1, max_size=6))
def test_publisher_patterns_agree_with_a_reference(patterns: list[str], publisher_id: str) -> None:
    ring = zbus.KeyRing({"k": K_OLD}, publishers={"k": patterns})
    assert ring.permits_publisher(publisher_id, "k") == reference_match(patterns, publisher_id)


@pytest.mark.parametrize(
    ("publishers", "message"),
    [
        ({"missing": "svc"}, "publishers names key id 'missing', which is not in the ring"),
        ({"k1": []}, r"publishers\['k1'\] lists no pattern"),
        ({"k1": ""}, "a pattern is a publisher id such as"),
        ({"k1": ["svc", ""]}, "a pattern is a publisher id such as"),
        ({"k1": [5]}, "holds 5"),
        ({"k1": 5}, "must be a pattern or a list of patterns, not int"),
        ({"k1": "svc*a"}, "has a '\\*' before its end"),
        ({"k1": "*svc"}, "has a '\\*' before its end"),
        ({"k1": "**"}, "has a '\\*' before its end"),
        (["k1"], "publishers must map key ids to publisher id patterns"),
    ],
)
def test_bad_publisher_bindings_are_refused(publishers: Any, message: str) -> None:
    with pytest.raises(zbus.ConfigError, match=message):
        zbus.KeyRing({"k1": K_OLD, "kb": K_BILL}, "k1", publishers=publishers)


def test_publisher_not_allowed_says_who_signed_what_claimed_and_what_is_allowed() -> None:
    ring = identity_ring()
    with pytest.raises(PublisherNotAllowedError) as err:
        ring.check_publisher("svc-a", "b")
    assert str(err.value) == (
        "key id 'b' signed a message claiming publisher id 'svc-a', but it may sign only "
        "for ['svc-b*']"
    )
    assert err.value.reason == "publisher_not_allowed"
    assert isinstance(err.value, KeyNotAllowedError)  # one except catches both misuses
    assert isinstance(err.value, zbus.SignatureError)
    assert zbus.PublisherNotAllowedError is PublisherNotAllowedError


def test_rotation_helpers_keep_publisher_bindings() -> None:
    ring = zbus.KeyRing(
        {"a": K_A, "a2": K_NEW, "b": K_B}, "a",
        publishers={"a": "svc-a*", "a2": ["svc-a*"], "b": ["svc-b", "svc-b.*"]},
    )
    switched = ring.with_active("a2")
    assert switched.publishers == ring.publishers
    assert not switched.permits_publisher("svc-b", "a2")
    retired = switched.without("a")
    assert retired.publishers == {"a2": ["svc-a*"], "b": ["svc-b", "svc-b.*"]}
    assert retired.permits_publisher("svc-b.x", "b") and not retired.permits_publisher("x", "b")
    assert ring.publishers["a"] == ["svc-a*"]  # immutable: the original keeps its bindings
    assert "publishers={'a': ['svc-a*']" in repr(ring)
    assert K_A.hex() not in repr(ring)


def test_key_file_with_publisher_bindings(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(format_key_file(K_A, "a") + format_key_file(K_B, "b"))
    path.chmod(0o600)
    ring = zbus.KeyRing.from_file(path, publishers={"a": "svc-a*", "b": "svc-b*"})
    assert ring.publishers == {"a": ["svc-a*"], "b": ["svc-b*"]}
    assert ring.permits_publisher("svc-a.1", "a") and not ring.permits_publisher("svc-a", "b")
    with pytest.raises(zbus.ConfigError, match="key id 'c'"):
        zbus.KeyRing.from_file(path, publishers={"c": "svc"})


def test_factory_refuses_a_publisher_id_its_active_key_may_not_claim() -> None:
    ring = zbus.KeyRing({"a": K_A}, publishers={"a": "svc-a*"})
    zbus.MessageFactory(ring, "svc-a.worker1")  # fine
    with pytest.raises(zbus.ConfigError, match=(
        "publisher id 'svc-b' may not be signed for with key id 'a' \\(the active key\\), "
        "which the key ring binds to publisher ids \\['svc-a\\*'\\]"
    )):
        zbus.MessageFactory(ring, "svc-b")


def test_factory_checks_an_exchange_key_at_its_first_message() -> None:
    ring = zbus.KeyRing(
        {"a": K_A, "kb": K_BILL}, "a", exchanges={"billing": "kb"},
        publishers={"kb": "billing.*"},
    )
    factory = zbus.MessageFactory(ring, "svc-a")  # signs with "a" unless it uses billing
    first = factory.frames("notifications", "compute.tick", 1)
    with pytest.raises(zbus.ConfigError, match="signing key of exchange 'billing'"):
        factory.frames("billing", "invoice.paid", 2)
    second = factory.frames("notifications", "compute.tick", 3)
    # The refused message used no sequence number: consumers see no gap.
    assert [decode_envelope(f[1]).sequence for f in (first, second)] == [1, 2]
    billing = zbus.MessageFactory(ring, "billing.eu")
    assert verify_frames(ring, *billing.frames("billing", "invoice.paid", 1)) == "kb"


def test_rekey_rechecks_the_binding_and_keeps_the_old_keys_on_refusal() -> None:
    factory = zbus.MessageFactory(zbus.KeyRing({"a": K_A}), "svc-a")
    old = factory.keys
    factory.frames("notifications", "compute.tick", 1)
    wrong = zbus.KeyRing({"a": K_A, "b": K_B}, "b", publishers={"b": "svc-b*"})
    with pytest.raises(zbus.ConfigError, match="key id 'b' \\(the active key\\)"):
        factory.rekey(wrong)
    assert factory.keys is old
    assert verify_frames(old, *factory.frames("notifications", "compute.tick", 2)) == "a"
    factory.rekey(zbus.KeyRing({"a2": K_NEW}, publishers={"a2": ["svc-a"]}))
    frames = factory.frames("notifications", "compute.tick", 3)
    assert frames[2][2:4] == b"a2" and decode_envelope(frames[1]).sequence == 3


# -- against a real proxy --------------------------------------------------------------------


@pytest.fixture
def conn(proxy_process: ProxyProcess, run_dir: Path) -> Iterator[zbus.Connection]:
    with zbus.Connection(run_dir) as connection:
        yield connection


def subscriber(
    conn: zbus.Connection, keys: zbus.KeyRing, *exchanges: str
) -> zbus.Subscriber:
    dispatcher = zbus.Dispatcher()
    for exchange in exchanges or ("notifications",):
        dispatcher.bind(exchange, "#", lambda delivery: None)
    sub = conn.subscribe(dispatcher, keys)
    sub.ready(timeout=10)
    return sub


def collect(sub: zbus.Subscriber, count: int, timeout: float = 20.0) -> list[zbus.Delivery]:
    return collect_deliveries(sub, count, timeout)


def send(conn: zbus.Connection, factory: zbus.MessageFactory, n: int,
         exchange: str = "notifications", key: str = "compute.tick") -> list[bytes]:
    frames = factory.frames(exchange, key, {"n": n})
    conn.send_frames(frames)
    return frames


def raw_push(conn: zbus.Connection) -> zmq.Socket[Any]:
    """An attacker's own PUSH into ingress.sock (any local user who can reach the socket)."""
    sock: zmq.Socket[Any] = conn.ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(conn.endpoints.ingress)
    return sock


@pytest.mark.parametrize("mode", ["restart", "rekey"])
def test_key_rotation_mid_stream_loses_nothing(conn: zbus.Connection, mode: str) -> None:
    if mode == "rekey" and not PER_EXCHANGE:
        pytest.skip("MessageFactory.rekey is the issue-5 change to zbus/_message.py")
    # Step 1 of the procedure: every consumer holds old and new.
    sub = subscriber(conn, zbus.KeyRing({"old": K_OLD, "new": K_NEW}, "new"))
    factory = zbus.MessageFactory(zbus.KeyRing({"old": K_OLD}), "svc.rotating")
    half = 300
    for n in range(half):
        send(conn, factory, n)
    # Step 2: the publisher switches its active key, between two halves of its stream.
    new_ring = zbus.KeyRing({"old": K_OLD, "new": K_NEW}, "new")
    if mode == "rekey":
        factory.rekey(new_ring)  # type: ignore[attr-defined]
    else:  # a service restarted with the new key file: a new run of the same publisher
        factory = zbus.MessageFactory(new_ring, "svc.rotating")
    for n in range(half, 2 * half):
        send(conn, factory, n)
    conn.flush()
    got = collect(sub, 2 * half)
    assert [d.payload["n"] for d in got] == list(range(2 * half))
    assert Counter(d.key_id for d in got) == {"old": half, "new": half}
    assert [d.key_id for d in got[half - 1 : half + 1]] == ["old", "new"]
    assert sub.stats.rejected == {} and sub.stats.lost == 0
    streams = {d.envelope.stream_id for d in got}
    assert len(streams) == (1 if mode == "rekey" else 2)
    sub.close()


def test_retired_key_is_rejected_while_the_stream_continues(conn: zbus.Connection) -> None:
    both = zbus.KeyRing({"old": K_OLD, "new": K_NEW}, "new")
    sub = subscriber(conn, both)
    laggard = zbus.MessageFactory(zbus.KeyRing({"old": K_OLD}), "svc.laggard")  # missed it
    current = zbus.MessageFactory(zbus.KeyRing({"new": K_NEW}), "svc.current")
    for n in range(10):
        send(conn, laggard, n)
        send(conn, current, n)
    conn.flush()
    assert len(collect(sub, 20)) == 20 and sub.stats.rejected == {}
    # Step 3 of the procedure: the consumer retires the old key.
    sub.core.keys = both.without("old")
    for n in range(10, 30):
        send(conn, laggard, n)  # still signed with the retired key
        send(conn, current, n)
    got = collect(sub, 20)  # the last message sent is current's: everything before is counted
    assert [(d.publisher_id, d.payload["n"]) for d in got] == [
        ("svc.current", n) for n in range(10, 30)
    ]
    assert sub.stats.rejected == {"unknown_key": 20}
    assert sub.stats.lost == 0
    sub.close()


def test_forgeries_unknown_key_and_wrong_key_are_rejected(conn: zbus.Connection) -> None:
    ring = zbus.KeyRing({"k1": K_OLD})
    sub = subscriber(conn, ring)
    legit = zbus.MessageFactory(ring, "svc.legit")
    stranger = zbus.MessageFactory(zbus.KeyRing({"k9": K_NEW}), "svc.stranger")
    forger = zbus.MessageFactory(zbus.KeyRing({"k1": K_NEW}), "svc.legit")  # guessed the id
    for n in range(50):
        send(conn, stranger, n)
        send(conn, forger, n)
        send(conn, legit, n)
    got = collect(sub, 50)
    assert [d.payload["n"] for d in got] == list(range(50))
    assert {d.publisher_id for d in got} == {"svc.legit"}
    assert sub.stats.rejected == {"unknown_key": 50, "bad_signature": 50}
    assert sub.stats.lost == 0
    sub.close()


def test_replayed_messages_are_rejected(conn: zbus.Connection) -> None:
    ring = zbus.KeyRing({"k1": K_OLD})
    sub = subscriber(conn, ring)
    victim = zbus.MessageFactory(ring, "svc.victim")
    captured = [send(conn, victim, n) for n in range(20)]
    conn.flush()
    assert len(collect(sub, 20)) == 20
    # The attacker re-sends the exact captured frames through its own socket: each one
    # once, one of them five times, then a legitimate marker of its own (same socket, so the
    # marker arrives after every replay).
    attacker = raw_push(conn)
    try:
        for frames in captured:
            attacker.send_multipart(frames)
        for _ in range(5):
            attacker.send_multipart(captured[7])
        marker = zbus.MessageFactory(ring, "svc.marker").frames("notifications", "m", "end")
        attacker.send_multipart(marker)
        for n in range(20, 40):  # the victim's stream goes on meanwhile
            send(conn, victim, n)
        got = collect(sub, 21)
    finally:
        attacker.close()
    assert Counter(d.publisher_id for d in got) == {"svc.victim": 20, "svc.marker": 1}
    assert [d.payload["n"] for d in got if d.publisher_id == "svc.victim"] == list(range(20, 40))
    assert sub.stats.rejected == {"replay": 25}
    assert sub.stats.lost == 0 and sub.stats.delivered == 0  # receive() runs no handlers
    sub.close()


def test_stale_and_future_timestamps_are_rejected(conn: zbus.Connection) -> None:
    ring = zbus.KeyRing({"k1": K_OLD})
    sub = subscriber(conn, ring)  # default window: 300 s old, 60 s ahead
    legit = zbus.MessageFactory(ring, "svc.legit")
    stale = zbus.MessageFactory(ring, "svc.stale", clock=lambda: time.time() - 3600)
    future = zbus.MessageFactory(ring, "svc.future", clock=lambda: time.time() + 3600)
    for n in range(30):
        send(conn, stale, n)
        send(conn, future, n)
        send(conn, legit, n)
    got = collect(sub, 30)
    assert [(d.publisher_id, d.payload["n"]) for d in got] == [("svc.legit", n) for n in range(30)]
    assert sub.stats.rejected == {"stale": 30, "future": 30}
    assert sub.stats.lost == 0
    sub.close()


@needs_per_exchange
def test_per_exchange_keys_end_to_end(conn: zbus.Connection) -> None:
    consumer = zbus.KeyRing({"k1": K_OLD, "kb": K_BILL}, "k1", exchanges={"billing": "kb"})
    sub = subscriber(conn, consumer, "notifications", "billing")
    # A service that publishes on both holds both keys and signs each exchange with its own.
    both = zbus.MessageFactory(
        zbus.KeyRing({"k1": K_OLD, "kb": K_BILL}, "k1", exchanges={"billing": "kb"}), "svc.both"
    )
    compute_only = zbus.MessageFactory(zbus.KeyRing({"k1": K_OLD}), "svc.compute")
    billing_only = zbus.MessageFactory(zbus.KeyRing({"kb": K_BILL}), "svc.billing")
    # A leaked billing key used off billing (its own stream: a stream whose messages are
    # refused in between shows gaps, as refused messages are never accounted).
    astray = zbus.MessageFactory(zbus.KeyRing({"kb": K_BILL}), "svc.billing")
    for n in range(20):
        send(conn, compute_only, n, "billing", "invoice.paid")  # k1 on billing: refused
        send(conn, astray, n, "notifications")  # kb off billing: refused
        send(conn, billing_only, n, "billing", "invoice.paid")  # kb on billing: fine
        send(conn, both, 2 * n, "notifications")
        send(conn, both, 2 * n + 1, "billing", "invoice.paid")
    got = collect(sub, 60)
    assert Counter((d.publisher_id, d.exchange, d.key_id) for d in got) == {
        ("svc.billing", "billing", "kb"): 20,
        ("svc.both", "notifications", "k1"): 20,
        ("svc.both", "billing", "kb"): 20,
    }
    assert [d.payload["n"] for d in got if d.publisher_id == "svc.both"] == list(range(40))
    assert sub.stats.rejected == {"key_not_allowed": 40}
    assert sub.stats.lost == 0
    sub.close()


@needs_per_exchange
def test_factory_caches_one_signer_per_exchange() -> None:
    ring = zbus.KeyRing({"k1": K_OLD, "kb": K_BILL}, "k1", exchanges={"billing": "kb"})
    factory = zbus.MessageFactory(ring, "svc")
    for _ in range(3):
        for exchange, key_id in (("billing", "kb"), ("compute", "k1")):
            frames = factory.frames(exchange, "a.b", 1)
            assert verify_frames(ring, *frames) == key_id
    assert len(factory._signers) == 2  # type: ignore[attr-defined]


@pytest.mark.parametrize("bound", [True, False], ids=["bound", "unbound"])
def test_publisher_bindings_end_to_end(conn: zbus.Connection, bound: bool) -> None:
    """Key "b" keeps claiming svc-a's live run far ahead, through the proxy, while svc-a and
    svc-b publish. Bound: every forgery is counted and svc-a's stream arrives whole. Unbound
    (the default's limit): the far jump is a gap of svc-a's stream, which svc-a's real
    messages fill, so they are delivered; the forgeries wait behind it (held) and are
    delivered once it is given up (the reliability interval). Without repair the real ones
    were refused as replays. Either way a key holder speaks for svc-a: bind keys."""
    sub = subscriber(conn, identity_ring(bound))
    victim = zbus.MessageFactory(zbus.KeyRing({"a": K_A}), "svc-a")
    honest_b = zbus.MessageFactory(zbus.KeyRing({"b": K_B}), "svc-b")
    for n in range(20):
        send(conn, victim, n)
    for n in range(20):
        conn.send_frames(forge("b", K_B, victim, 10**9 + n))
        send(conn, honest_b, n)
        send(conn, victim, 20 + n)
    send(conn, honest_b, 20)  # the last message sent: everything before it is counted
    got = collect(sub, 61)
    svc_a = [d.payload.get("n", "forged") for d in got if d.publisher_id == "svc-a"]
    assert [d.payload["n"] for d in got if d.publisher_id == "svc-b"] == list(range(21))
    if bound:
        assert svc_a == list(range(40))
        assert {d.key_id for d in got if d.publisher_id == "svc-a"} == {"a"}
        assert sub.stats.rejected == {"publisher_not_allowed": 20}
        assert sub.stats.lost == 0 and sub.stats.reordered == 0
    else:
        assert svc_a == list(range(40))
        assert sub.stats.held == 20 and not sub.stats.rejected  # the forgeries, held
    sub.close()


def test_the_freshness_window_is_configured_per_connection(
    conn: zbus.Connection, run_dir: Path
) -> None:
    """``Settings(replay=ReplayPolicy(...))`` reaches the consumers: a subscriber with a 30 s
    ``max_age`` refuses messages stamped 100 s ago as ``stale``, while one with the default
    (300 s) on the same proxy accepts them; fresh messages pass both."""
    ring = zbus.KeyRing({"k": bytes(range(32))})
    strict_conn = zbus.Connection(run_dir, settings=zbus.Settings(
        replay=zbus.ReplayPolicy(max_age=30, max_skew=5)))
    try:
        strict, lenient = subscriber(strict_conn, ring), subscriber(conn, ring)
        late = zbus.MessageFactory(ring, "svc-late", clock=lambda: time.time() - 100)
        ahead = zbus.MessageFactory(ring, "svc-ahead", clock=lambda: time.time() + 20)
        fresh = zbus.MessageFactory(ring, "svc-fresh")
        for n in range(5):
            send(conn, late, n)
            send(conn, ahead, n)
        for n in range(5):
            send(conn, fresh, n)
        conn.flush()
        assert [d.publisher_id for d in collect(lenient, 15)] == (
            ["svc-late", "svc-ahead"] * 5 + ["svc-fresh"] * 5)
        assert [d.publisher_id for d in collect(strict, 5)] == ["svc-fresh"] * 5
        assert strict.stats.rejected == {"stale": 5, "future": 5}
        assert lenient.stats.rejected == {}
        strict.close()
        lenient.close()
    finally:
        strict_conn.close()
