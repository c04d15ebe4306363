"""Dispatcher, ConsumerCore policy and sequence accounting, without sockets."""

from __future__ import annotations

import gc
import logging
import tracemalloc
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import zbus
from zbus import Delivery, Dispatcher
from zbus._names import match_words
from zbus._replay import ReplayGuard, ReplayPolicy

KEY = bytes(range(32))


def factory(publisher: str = "svc") -> zbus.MessageFactory:
    return zbus.MessageFactory(KEY, publisher)


def one_binding_core(exchange: str, pattern: str, **bind: Any) -> zbus.ConsumerCore:
    """A consumer core whose dispatcher has one binding, with a handler that does nothing."""
    d = Dispatcher()
    d.bind(exchange, pattern, lambda dl: None, **bind)
    return zbus.ConsumerCore(d, KEY)


@dataclass(eq=False)
class InstanceCreated(zbus.Message):
    message_type = "compute.instance.create.end"
    version = 2

    instance_id: str
    vcpus: int = 1

    @classmethod
    def from_payload(cls, payload: Any, version: int) -> InstanceCreated:
        if version == 1:  # version 1 called the field "id"
            payload = {"instance_id": payload["id"]}
        return super().from_payload(payload, version)  # type: ignore[return-value]


class Ping(zbus.Message):
    message_type = "ping"

    def __init__(self, n: int) -> None:
        self.n = n


# -- routing -------------------------------------------------------------------------------


def test_many_message_types_through_one_dispatcher() -> None:
    d = Dispatcher()
    got: list[tuple[str, str, Any]] = []

    def record(tag: str) -> Any:
        return lambda dl: got.append((tag, dl.routing_key, dl.payload))

    d.bind("notifications", "compute.instance.*.end", record("instance-end"))
    d.bind("notifications", "compute.#", record("compute"))
    d.bind("metering", "#", record("meter"))
    core = zbus.ConsumerCore(d, KEY)
    f = factory()
    sent = [
        ("notifications", "compute.instance.create.end", 1),
        ("notifications", "compute.volume.attach", 2),
        ("metering", "cpu.util", 3),
        ("notifications", "network.port.create", 4),  # no binding matches
        ("compute", "compute.instance.create.end", 5),  # other exchange
    ]
    for exchange, key, payload in sent:
        delivery = core.accept(f.frames(exchange, key, payload))
        if delivery is not None:
            core.run_handlers(delivery)
    assert got == [
        ("instance-end", "compute.instance.create.end", 1),
        ("compute", "compute.instance.create.end", 1),
        ("compute", "compute.volume.attach", 2),
        ("meter", "cpu.util", 3),
    ]
    assert core.stats.delivered == 3
    assert core.stats.unmatched == 2
    assert core.stats.received == 5
    assert not core.stats.rejected


def test_decorator_form_binds_and_returns_the_function() -> None:
    d = Dispatcher()

    @d.on("notifications", "a.*")
    def handler(delivery: Delivery) -> str:
        return "called"

    assert handler(None) == "called"  # type: ignore[arg-type]
    assert d.route("notifications", "a.b") == (handler,)
    assert d.route("notifications", "a") == ()
    assert d.patterns == [zbus.TopicPattern("notifications", "a.*")]


def test_route_cache_sees_later_bindings() -> None:
    d = Dispatcher()
    first = d.bind("ex", "a.b", lambda dl: None)
    assert d.route("ex", "a.b") == (first,)
    second = d.bind("ex", "a.*", lambda dl: None)
    assert d.route("ex", "a.b") == (first, second)


def test_same_pattern_twice_is_one_subscription_two_handlers() -> None:
    d = Dispatcher()
    h1 = d.bind("ex", "a.#", lambda dl: None)
    h2 = d.bind("ex", "a.#", lambda dl: None)
    assert d.patterns == [zbus.TopicPattern("ex", "a.#")]
    assert d.route("ex", "a.x") == (h1, h2)


def test_prefixes_are_the_minimal_subscriptions() -> None:
    d = Dispatcher()
    for pattern in ("compute.instance.*.end", "compute.#", "network.port.create"):
        d.bind("notifications", pattern, lambda dl: None)
    d.bind("metering", "#", lambda dl: None)
    core = zbus.ConsumerCore(d, KEY)
    assert core.prefixes() == [
        b"metering/",
        b"notifications/compute",
        b"notifications/network.port.create",
    ]


def test_bind_refuses_bad_input() -> None:
    d = Dispatcher()
    with pytest.raises(zbus.ConfigError, match="not callable"):
        d.bind("ex", "a", "not a function")  # type: ignore[type-var]
    with pytest.raises(zbus.InvalidName):
        d.bind("ex", "a..b", lambda dl: None)
    with pytest.raises(zbus.ConfigError, match="Message subclass"):
        d.register(dict)  # type: ignore[arg-type]

    class NoType(zbus.Message):
        pass

    with pytest.raises(zbus.ConfigError, match="message_type"):
        d.register(NoType)


def test_one_message_type_cannot_map_to_two_classes() -> None:
    d = Dispatcher()
    d.register(Ping)
    d.register(Ping)  # idempotent

    class OtherPing(zbus.Message):
        message_type = "ping"

    with pytest.raises(zbus.ConfigError, match="already registered"):
        d.register(OtherPing)


# -- handler failures ----------------------------------------------------------------------


def test_a_raising_handler_is_counted_logged_and_isolated(caplog: pytest.LogCaptureFixture) -> None:
    d = Dispatcher()
    calls: list[str] = []

    @d.on("ex", "#")
    def before(dl: Delivery) -> None:
        calls.append("before")

    @d.on("ex", "#")
    def broken(dl: Delivery) -> None:
        raise RuntimeError("handler bug")

    @d.on("ex", "#")
    def after(dl: Delivery) -> None:
        calls.append("after")

    core = zbus.ConsumerCore(d, KEY)
    f = factory()
    with caplog.at_level(logging.ERROR, logger="zbus"):
        for n in range(3):
            delivery = core.accept(f.frames("ex", "k", n))
            assert delivery is not None
            core.run_handlers(delivery)
    assert calls == ["before", "after"] * 3
    assert core.stats.handler_errors == 3
    assert core.stats.delivered == 3
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 3
    assert errors[0].exc_info is not None and "handler bug" in str(errors[0].exc_info[1])


# -- typed messages ------------------------------------------------------------------------


def test_registered_class_is_decoded() -> None:
    d = Dispatcher()
    seen: list[Any] = []
    d.bind("notifications", "compute.#", lambda dl: seen.append(dl.message),
           message_class=InstanceCreated)
    d.bind("notifications", "ping", lambda dl: seen.append(dl.message), message_class=Ping)
    d.bind("notifications", "raw.#", lambda dl: seen.append(dl.message))
    core = zbus.ConsumerCore(d, KEY)
    f = factory()
    for key, obj in [
        ("compute.instance.create.end", InstanceCreated("i-1", 4)),
        ("ping", Ping(7)),
        ("raw.thing", {"plain": True}),
    ]:
        delivery = core.accept(f.frames("notifications", key, obj))
        assert delivery is not None
        core.run_handlers(delivery)
    assert seen == [InstanceCreated("i-1", 4), Ping(7), {"plain": True}]
    assert type(seen[0]) is InstanceCreated


def test_older_version_is_passed_to_from_payload_for_upgrade() -> None:
    core = one_binding_core("notifications", "#", message_class=InstanceCreated)
    frames = factory().frames(
        "notifications", "compute.instance.create.end", {"id": "i-9"},
        message_type="compute.instance.create.end", version=1,
    )
    delivery = core.accept(frames)
    assert delivery is not None
    assert delivery.message == InstanceCreated("i-9")


def test_newer_version_than_the_registered_class_is_rejected() -> None:
    core = one_binding_core("notifications", "#", message_class=InstanceCreated)
    f = factory()
    frames = f.frames(
        "notifications", "compute.instance.create.end", {"instance_id": "x"},
        message_type="compute.instance.create.end", version=InstanceCreated.version + 1,
    )
    assert core.accept(frames) is None
    assert core.stats.rejected == {"unknown_version": 1}
    # It did arrive: the next message from the same stream shows no gap.
    assert core.accept(f.frames("notifications", "compute.instance.create.end",
                                InstanceCreated("y"))) is not None
    assert core.stats.lost == 0


def test_version_of_an_unbound_type_does_not_matter() -> None:
    d = Dispatcher()
    d.register(InstanceCreated)
    d.bind("notifications", "other", lambda dl: None)
    core = zbus.ConsumerCore(d, KEY)
    frames = factory().frames(
        "notifications", "compute.instance.create.end", {},
        message_type="compute.instance.create.end", version=99,
    )
    assert core.accept(frames) is None
    assert core.stats.unmatched == 1 and not core.stats.rejected


@pytest.mark.parametrize("payload", [["a", "list"], {"unexpected": 1}, {"id": "v1 field in v2"}])
def test_from_payload_failure_is_counted_as_bad_payload(payload: Any) -> None:
    core = one_binding_core("notifications", "#", message_class=InstanceCreated)
    frames = factory().frames(
        "notifications", "compute.instance.create.end", payload,
        message_type="compute.instance.create.end", version=2,
    )
    assert core.accept(frames) is None
    assert core.stats.rejected == {"bad_payload": 1}


def test_rejections_warn_once_per_reason_then_debug(caplog: pytest.LogCaptureFixture) -> None:
    core = one_binding_core("ex", "#")
    with caplog.at_level(logging.DEBUG, logger="zbus"):
        for _ in range(3):
            core.accept([b"ex/a"])
        core.accept([b"ex/a", b"", b""])
    levels = [(r.levelno, "frame_count" in r.getMessage()) for r in caplog.records]
    assert levels == [
        (logging.WARNING, True),
        (logging.DEBUG, True),
        (logging.DEBUG, True),
        (logging.WARNING, False),
    ]
    assert core.stats.rejected == {"frame_count": 3, "bad_signature": 1}


# -- sequences -----------------------------------------------------------------------------


def test_consumer_counts_lost_and_reordered() -> None:
    core = one_binding_core("ex", "#")
    f = factory()
    frames = [f.frames("ex", "k", n) for n in range(10)]
    order = [0, 1, 2, 5, 3, 6, 9]  # 4, 7, 8 never come; 3 comes late
    for i in order:
        assert core.accept(frames[i]) is not None
    # 3 and 4 counted when 5 came, 7 and 8 when 9 came; 3 then arrived late and was un-counted.
    assert core.stats.lost == 3
    assert core.stats.reordered == 1


def test_consumer_rejects_replays_and_keeps_serving() -> None:
    core = one_binding_core("ex", "#")
    f = factory()
    frames = [f.frames("ex", "k", n) for n in range(3)]
    for fr in frames:
        assert core.accept(fr) is not None
    assert core.accept(frames[1]) is None  # the same signed bytes, sent again
    assert core.stats.rejected == {"replay": 1}
    assert core.accept(f.frames("ex", "k", 3)) is not None
    assert core.stats.lost == 0


def test_consumer_rejects_stale_and_future_timestamps() -> None:
    d = Dispatcher()
    d.bind("ex", "#", lambda dl: None)
    now = 1_700_000_000.0
    guard = ReplayGuard(ReplayPolicy(max_age=300, max_skew=60))
    core = zbus.ConsumerCore(d, KEY, replay=guard, clock=lambda: now)
    old = zbus.MessageFactory(KEY, "old", clock=lambda: now - 301)
    ahead = zbus.MessageFactory(KEY, "ahead", clock=lambda: now + 61)
    fine = zbus.MessageFactory(KEY, "fine", clock=lambda: now - 299)
    assert core.accept(old.frames("ex", "k", 1)) is None
    assert core.accept(ahead.frames("ex", "k", 1)) is None
    assert core.accept(fine.frames("ex", "k", 1)) is not None
    assert core.stats.rejected == {"stale": 1, "future": 1}


def test_pool_members_do_not_count_gaps() -> None:
    d = Dispatcher()
    d.bind("ex", "#", lambda dl: None)
    core = zbus.ConsumerCore(d, KEY, track_sequences=False)
    f = factory()
    frames = [f.frames("ex", "k", n) for n in range(5)]
    for i in (0, 4, 2):
        assert core.accept(frames[i]) is not None
    assert core.stats.lost == 0 and core.stats.reordered == 0


def test_stats_as_dict() -> None:
    core = one_binding_core("ex", "a")
    core.accept(factory().frames("ex", "b", 1))
    core.accept([b"x"])
    assert core.stats.as_dict() == {
        "received": 1,
        "delivered": 0,
        "unmatched": 1,
        "handler_errors": 0,
        "lost": 0,
        "reordered": 0,
        "beacons": 0,
        "rejected": {"frame_count": 1},
        "repair_requested": 0,
        "repaired": 0,
        "unrepairable": 0,
        "repair_duplicates": 0,
        "held": 0,
    }


# -- routing over many bindings and many keys (issue 13, item 7) ---------------------------

ROUTE_PATTERNS = ["compute.#", "compute.instance.*.end", "network.#", "#.error", "*.*.error",
                  "compute.#", "#"]


@given(st.lists(st.tuples(st.sampled_from(["n", "m"]), st.sampled_from(ROUTE_PATTERNS)),
                min_size=1, max_size=8),
       st.lists(st.lists(st.sampled_from(["compute", "instance", "network", "end", "error",
                                          "i-42", "host1"]), min_size=1, max_size=5),
                min_size=1, max_size=8))
def test_route_is_every_matching_binding_in_binding_order(
    binds: list[tuple[str, str]], keys: list[list[str]]
) -> None:
    d = Dispatcher()
    handlers = [d.bind(ex, pattern, lambda dl: None) for ex, pattern in binds]
    for words in keys:
        for exchange in ("n", "m", "other"):
            expected = tuple(
                h for h, (ex, pattern) in zip(handlers, binds, strict=True)
                if ex == exchange and match_words(tuple(pattern.split(".")), tuple(words))
            )
            assert d.route(exchange, ".".join(words)) == expected


def test_routing_many_distinct_keys_keeps_nothing_per_key() -> None:
    # The old route cache kept up to 4,096 keys, then was cleared wholesale, and each
    # message past it cost a pattern-by-pattern match: memory bounded, time not.
    d = Dispatcher()
    for pattern in ("compute.#", "compute.instance.*.end", "network.#", "#.error"):
        d.bind("notifications", pattern, lambda dl: None)

    def route(i: int) -> None:
        assert len(d.route("notifications", f"compute.instance.i{i}.end")) == 2

    route(-1)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(20_000):
            route(i)
        gc.collect()
        retained = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert retained < 32_768
