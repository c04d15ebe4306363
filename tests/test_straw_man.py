"""Issue 18 item 8: the proposal's straw man (``mf.create_message(obj)``, ``e.send(routing_key,
m)``, ``Router(publisher).send('metering', meter)``) runs as written, with imports, a
connection and a publisher id added; docs/GUIDE.md, "The straw man", is that code, run here
against a real zbus-proxy."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import zbus
from zbus.testing import MemoryBus

from .conftest import ProxyProcess

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "GUIDE.md"


class MeterMessage(zbus.Message):
    message_type = "meter"

    def __init__(self, counter: str, volume: float) -> None:
        self.counter = counter
        self.volume = volume


def _straw_man_block() -> str:
    section = GUIDE.read_text().split("\n## The straw man", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(# straw man[^\n]*\n.*?)```", section, re.S)
    assert len(blocks) == 1, "docs/GUIDE.md's straw man section holds one '# straw man' block"
    return blocks[0]


def test_the_guides_straw_man_runs_as_written(proxy_process: ProxyProcess,
                                              run_dir: Path) -> None:
    code = _straw_man_block()
    # The proposal's own lines, verbatim, besides what the guide says it added.
    for line in ("m = mf.create_message(obj)", "e.send(routing_key, m)",
                 "r = Router(publisher)", 'r.send("metering", meter)',
                 'self.send("metering", meter)'):
        assert re.search(rf"^ *{re.escape(line)}", code, re.M), line
    assert 'RUN_DIR = "/run/zbus"' in code
    code = code.replace('RUN_DIR = "/run/zbus"', f"RUN_DIR = {str(run_dir)!r}")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "compute compute.instance.update compute.instance.update",
        "telemetry metering meter",
        "telemetry metering meter",
    ], proc.stdout


def _bus(key: bytes) -> tuple[MemoryBus, list[zbus.Delivery]]:
    bus = MemoryBus()
    seen: list[zbus.Delivery] = []
    d = zbus.Dispatcher()
    d.bind("telemetry", "#", seen.append, message_class=MeterMessage)
    d.bind("metering", "#", seen.append, message_class=MeterMessage)
    d.bind("compute", "#", seen.append)
    bus.subscribe(d, key)
    return bus, seen


def test_a_router_bound_to_a_publisher_sends_routing_keys_on_its_exchange(key: bytes) -> None:
    bus, seen = _bus(key)
    conn: Any = bus.connection()
    factory = zbus.MessageFactory(key, "host1")
    publisher = zbus.Publisher(conn.exchange("telemetry"), factory)
    router = zbus.Router(publisher)
    assert router.exchange is publisher.exchange and router.factory is factory
    router.send("metering", MeterMessage("cpu", 1.0))
    assert [(d.exchange, d.routing_key, d.message_type) for d in seen] == [
        ("telemetry", "metering", "meter")]
    assert seen[0].message == MeterMessage("cpu", 1.0)
    # A routing key given twice is a mistake the router names.
    with pytest.raises(zbus.ConfigError, match="publisher's exchange 'telemetry'"):
        router.send("metering", MeterMessage("cpu", 1.0), routing_key="meter")
    with pytest.raises(zbus.ConfigError, match="publisher's factory"):
        zbus.Router(publisher, zbus.MessageFactory(key, "other"))


def test_a_router_bound_to_a_connection_still_takes_an_exchange_first(key: bytes) -> None:
    """Backward compatible: the README's Router(conn, factory).send(exchange, message)."""
    bus, seen = _bus(key)
    conn: Any = bus.connection()
    router = zbus.Router(conn, zbus.MessageFactory(key, "host1"))
    assert router.exchange is None
    router.send("metering", MeterMessage("disk", 2.0))
    router.send("compute", {"n": 1}, routing_key="compute.x")
    assert [(d.exchange, d.routing_key) for d in seen] == [("metering", "meter"),
                                                           ("compute", "compute.x")]
    with pytest.raises(zbus.ConfigError, match="Router\\(publisher\\)"):
        zbus.Router(conn)


def test_create_message_is_signed_by_its_factory_when_sent(key: bytes) -> None:
    bus, seen = _bus(key)
    conn: Any = bus.connection()
    mf = zbus.MessageFactory(key, "host1")
    m = mf.create_message({"n": 1})
    assert isinstance(m, zbus.OutgoingMessage) and m.factory is mf
    e = zbus.Exchange("compute", conn)
    e.send("compute.instance.update", m)
    e.send("compute.instance.update", mf.create_message({"n": 2}, message_type="compute.x",
                                                       version=3))
    e.send("compute.instance.update", {"n": 3}, mf)  # the old form
    assert [(d.payload, d.message_type, d.envelope.message_type_version, d.sequence)
            for d in seen] == [({"n": 1}, "compute.instance.update", 1, 1),
                               ({"n": 2}, "compute.x", 3, 2),
                               ({"n": 3}, "compute.instance.update", 1, 3)]
    assert {d.publisher_id for d in seen} == {"host1"}
    # A created message through a publisher is signed by its own factory too.
    zbus.Publisher(conn.exchange("compute"), zbus.MessageFactory(key, "other")).send(
        "compute.y", mf.create_message({"n": 4}))
    assert seen[-1].publisher_id == "host1"
    with pytest.raises(zbus.ConfigError, match="create_message"):
        e.send("compute.instance.update", {"n": 5})
    with pytest.raises(zbus.ConfigError, match="another MessageFactory"):
        e.send("compute.instance.update", m, zbus.MessageFactory(key, "other"))
    with pytest.raises(zbus.InvalidName):
        mf.create_message({"n": 6}, message_type="not a type")
