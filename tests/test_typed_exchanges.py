"""Message classes are tied to exchanges (issue 14, item 13), without sockets.

A key allowed only on ``notifications`` signs a message of type ``charge`` (the type the
billing consumer's class decodes): the class must not decode it, whatever the routing key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

import zbus
from zbus import Delivery, Dispatcher

K_SHARED = bytes(range(32))
K_BILL = bytes(range(32, 64))


@dataclass(eq=False)
class Charge(zbus.Message):
    message_type = "charge"

    account: str
    cents: int


def ring() -> zbus.KeyRing:
    """k1 signs everywhere but billing; kb alone signs on billing."""
    return zbus.KeyRing({"k1": K_SHARED, "kb": K_BILL}, "k1", exchanges={"billing": "kb"})


def consumer() -> tuple[zbus.ConsumerCore, list[Delivery]]:
    """A billing service: Charge on billing, and a raw catch-all on notifications."""
    seen: list[Delivery] = []
    d = Dispatcher()
    d.bind("billing", "#", seen.append, message_class=Charge)
    d.bind("notifications", "#", seen.append)
    return zbus.ConsumerCore(d, ring()), seen


def feed(core: zbus.ConsumerCore, frames: list[bytes]) -> Delivery | None:
    delivery = core.accept(frames)
    if delivery is not None:
        core.run_handlers(delivery)
    return delivery


def test_a_type_sent_on_another_exchange_is_not_decoded_by_its_class() -> None:
    core, seen = consumer()
    # The attacker holds k1 (notifications' key), never kb.
    attacker = zbus.MessageFactory(zbus.KeyRing({"k1": K_SHARED}, "k1"), "svc-notify")
    forged = attacker.frames("notifications", "charge", {"account": "victim", "cents": 10**6},
                             message_type="charge")
    assert feed(core, forged) is None
    assert core.stats.rejected == {"type_not_allowed": 1}
    assert not any(isinstance(d.message, Charge) for d in seen)
    assert core.stats.lost == 0  # it did arrive: counted as rejected, not lost


def test_legitimate_typed_and_raw_messages_still_decode() -> None:
    core, seen = consumer()
    billing = zbus.MessageFactory(ring(), "svc-billing")
    d1 = feed(core, billing.frames("billing", "charge", Charge("acct-1", 250)))
    d2 = feed(core, billing.frames("notifications", "compute.end", {"plain": True}))
    assert d1 is not None and d1.message == Charge("acct-1", 250)
    assert type(d1.message) is Charge
    assert d2 is not None and d2.message == {"plain": True}
    assert core.stats.rejected == {}
    assert [d.exchange for d in seen] == ["billing", "notifications"]


def test_a_class_bound_on_two_exchanges_decodes_on_both() -> None:
    d = Dispatcher()
    got: list[Any] = []
    d.bind("billing", "#", lambda dl: got.append(dl.message), message_class=Charge)
    d.bind("audit", "#", lambda dl: got.append(dl.message), message_class=Charge)
    core = zbus.ConsumerCore(d, K_SHARED)
    f = zbus.MessageFactory(K_SHARED, "svc")
    for exchange in ("billing", "audit"):
        delivery = core.accept(f.frames(exchange, "charge", Charge("a", 1)))
        assert delivery is not None
        core.run_handlers(delivery)
    assert got == [Charge("a", 1), Charge("a", 1)]


def test_register_ties_a_class_to_the_exchanges_it_names() -> None:
    d = Dispatcher()
    d.register(Charge, exchanges=["billing"])
    d.bind("billing", "#", lambda dl: None)
    d.bind("notifications", "#", lambda dl: None)
    core = zbus.ConsumerCore(d, K_SHARED)
    f = zbus.MessageFactory(K_SHARED, "svc")
    ok = core.accept(f.frames("billing", "charge", Charge("a", 1)))
    assert ok is not None and isinstance(ok.message, Charge)
    assert core.accept(f.frames("notifications", "x", {"account": "a", "cents": 1},
                                message_type="charge")) is None
    assert core.stats.rejected == {"type_not_allowed": 1}
    with pytest.raises(zbus.ConfigError):
        d.register(Charge, exchanges=["bad exchange"])


def test_register_without_exchanges_decodes_everywhere_as_documented() -> None:
    d = Dispatcher()
    d.register(Charge)
    d.bind("notifications", "#", lambda dl: None, message_class=Charge)  # stays everywhere
    d.bind("other", "#", lambda dl: None)
    core = zbus.ConsumerCore(d, K_SHARED)
    f = zbus.MessageFactory(K_SHARED, "svc")
    delivery = core.accept(f.frames("other", "x", Charge("a", 1)))
    assert delivery is not None and isinstance(delivery.message, Charge)
