"""The traps a new user falls into first (issue 18, items 3, 4 and 9): objects of one backend
over another backend's connection, a test double that hides a failing handler, the threads
backend inside an eventlet-patched process, and a connection handed to a spawned process.
Each must fail at once with a ZbusError that says what to use instead."""

from __future__ import annotations

import asyncio
import pickle
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import pytest

import zbus
import zbus.asyncio
import zbus.eventlet
from zbus.testing import MemoryBus

from .conftest import ProxyProcess, short_tmp_dir

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "GUIDE.md"


@pytest.fixture(scope="module")
def live_run_dir() -> Iterator[Path]:
    """One proxy for the tests that only construct objects (a Connection wants a proxy)."""
    with short_tmp_dir("zb-new-") as path:
        proxy = ProxyProcess(path).start()
        try:
            yield path
        finally:
            proxy.stop()


def dispatcher() -> zbus.Dispatcher:
    d = zbus.Dispatcher()
    d.bind("metering", "#", lambda delivery: None)
    return d


class MeteringRouter(zbus.Router):
    def send_meter(self, volume: float) -> None:
        self.send("metering", {"volume": volume}, routing_key="meter")


# -- item 3: one backend's objects over another backend's connection -----------------------

def _mixes(run_dir: Path, key: bytes) -> dict[str, tuple[Callable[[], Any], str]]:
    """name -> (the mix, the class the error must name)."""
    factory = zbus.MessageFactory(key, "newcomer")

    def aconn() -> zbus.asyncio.Connection:
        return zbus.asyncio.Connection(run_dir)

    def tconn() -> zbus.Connection:
        return zbus.Connection(run_dir)

    return {
        "threads Publisher, asyncio exchange":
            (lambda: zbus.Publisher(aconn().exchange("metering"), factory),
             "use zbus.asyncio.Publisher with a zbus.asyncio.Connection"),
        "threads Exchange, asyncio connection":
            (lambda: zbus.Exchange("metering", aconn()),  # type: ignore[arg-type]
             "use zbus.asyncio.Exchange with a zbus.asyncio.Connection"),
        "threads Router, asyncio connection":
            (lambda: zbus.Router(aconn(), factory),  # type: ignore[arg-type]
             "use zbus.asyncio.Router with a zbus.asyncio.Connection"),
        "an application's Router subclass, asyncio connection":
            (lambda: MeteringRouter(aconn(), factory),  # type: ignore[arg-type]
             "use zbus.asyncio.Router with a zbus.asyncio.Connection"),
        "threads Subscriber, asyncio connection":
            (lambda: zbus.Subscriber(aconn(), dispatcher(), key),  # type: ignore[arg-type]
             "use zbus.asyncio.Subscriber with a zbus.asyncio.Connection"),
        "threads PoolMember, asyncio connection":
            (lambda: zbus.PoolMember(aconn(), "billing", dispatcher(), key),  # type: ignore[arg-type]
             "use zbus.asyncio.PoolMember with a zbus.asyncio.Connection"),
        "ReliableMember, asyncio connection":
            (lambda: zbus.ReliableMember(aconn(), "billing", dispatcher(), key),  # type: ignore[arg-type]
             "zbus.asyncio has no ReliableMember"),
        "asyncio Publisher, threads exchange":
            (lambda: zbus.asyncio.Publisher(tconn().exchange("metering"), factory),  # type: ignore[arg-type]
             "use zbus.Publisher with a zbus.Connection"),
        "asyncio Exchange, threads connection":
            (lambda: zbus.asyncio.Exchange("metering", tconn()),  # type: ignore[arg-type]
             "use zbus.Exchange with a zbus.Connection"),
        "asyncio Router, threads connection":
            (lambda: zbus.asyncio.Router(tconn(), factory),  # type: ignore[arg-type]
             "use zbus.Router with a zbus.Connection"),
        "asyncio Subscriber, threads connection":
            (lambda: zbus.asyncio.Subscriber(tconn(), dispatcher(), key),  # type: ignore[arg-type]
             "use zbus.Subscriber with a zbus.Connection"),
        "asyncio PoolMember, threads connection":
            (lambda: zbus.asyncio.PoolMember(tconn(), "billing", dispatcher(), key),  # type: ignore[arg-type]
             "use zbus.PoolMember with a zbus.Connection"),
        "asyncio Router, MemoryBus connection":
            (lambda: zbus.asyncio.Router(MemoryBus().connection(), factory),  # type: ignore[arg-type]
             "use zbus.Router with a zbus.Connection"),
        "eventlet Subscriber, threads connection":
            (lambda: zbus.eventlet.Subscriber(tconn(), dispatcher(), key),
             "use zbus.Subscriber with a zbus.Connection"),
        "eventlet PoolMember, asyncio connection":
            (lambda: zbus.eventlet.PoolMember(aconn(), "billing", dispatcher(), key),  # type: ignore[arg-type]
             "use zbus.asyncio.PoolMember with a zbus.asyncio.Connection"),
    }


MIXES = list(_mixes(Path("/nonexistent"), b"k" * 32))


@pytest.mark.parametrize("mix", MIXES)
def test_another_backends_connection_fails_at_construction_naming_the_right_class(
        mix: str, live_run_dir: Path, key: bytes) -> None:
    make, advice = _mixes(live_run_dir, key)[mix]
    with pytest.raises(zbus.ConfigError) as caught:
        make()
    assert advice in str(caught.value)


def test_the_silent_trap_itself_is_gone(live_run_dir: Path, key: bytes) -> None:
    """What a newcomer wrote: zbus.Publisher over a zbus.asyncio.Connection. It used to make
    a coroutine nobody awaited (nothing sent, a RuntimeWarning at best)."""
    async def main() -> None:
        conn = zbus.asyncio.Connection(live_run_dir)
        try:
            publisher = zbus.Publisher(conn.exchange("metering"),
                                       zbus.MessageFactory(key, "newcomer"))
            publisher.send("meter", {"volume": 1.0})
        finally:
            conn.close()

    with pytest.raises(zbus.ConfigError, match=r"use zbus\.asyncio\.Publisher"):
        asyncio.run(main())


def test_objects_shared_by_backends_still_work_together(live_run_dir: Path,
                                                        key: bytes) -> None:
    """The eventlet backend is the threads API on cooperative sockets: its Exchange,
    Publisher and Router are the threads ones, and join_reliable_pool gives the threads
    ReliableMember; MemoryBus connections take the threads publishing objects."""
    factory = zbus.MessageFactory(key, "newcomer")
    green = zbus.eventlet.Connection(live_run_dir)
    assert zbus.eventlet.Publisher is zbus.Publisher
    zbus.Publisher(green.exchange("metering"), factory)
    MeteringRouter(green, factory)
    zbus.ReliableMember(green, "billing", dispatcher(), key).close()
    zbus.Subscriber(green, dispatcher(), key).close()
    green.subscribe(dispatcher(), key).close()
    bus = MemoryBus()
    zbus.Publisher(bus.connection().exchange("metering"), factory)
    MeteringRouter(bus.connection(), factory)  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", [zbus, zbus.asyncio])
def test_a_publisher_given_a_connection_instead_of_an_exchange_says_so(
        backend: Any, live_run_dir: Path, key: bytes) -> None:
    conn = backend.Connection(live_run_dir)
    with pytest.raises(zbus.ConfigError, match=r"conn\.exchange\("):
        backend.Publisher(conn, zbus.MessageFactory(key, "newcomer"))


def _guide_backend_examples() -> dict[str, str]:
    section = GUIDE.read_text().split("## Choosing a backend", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n# (\w+)[^\n]*\n(.*?)```", section, re.S)
    return {name: code for name, code in blocks}


def test_the_guide_shows_each_backends_code_side_by_side() -> None:
    assert set(_guide_backend_examples()) == {"threads", "asyncio", "eventlet"}


@pytest.mark.parametrize("backend", ["threads", "asyncio", "eventlet"])
def test_the_guides_backend_examples_run_as_written(backend: str, proxy_process: Any,
                                                    run_dir: Path) -> None:
    """Each in its own process: the eventlet one patches its process, as real programs do."""
    code = _guide_backend_examples()[backend]
    assert 'RUN_DIR = "/run/zbus"' in code
    code = code.replace('RUN_DIR = "/run/zbus"', f"RUN_DIR = {str(run_dir)!r}")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["cpu", "disk"], proc.stdout


# -- item 4: MemoryBus fails the test by default ----------------------------------------------

def test_memory_bus_raises_a_failing_handlers_error_by_default(key: bytes) -> None:
    def handler(delivery: zbus.Delivery) -> None:
        assert delivery.payload == {"n": 2}, "the handler's own assertion"

    d = zbus.Dispatcher()
    d.bind("metering", "#", handler)
    bus = MemoryBus()
    sub = bus.subscribe(d, key)
    publisher = zbus.Publisher(bus.connection().exchange("metering"),
                               zbus.MessageFactory(key, "t"))
    with pytest.raises(AssertionError, match="the handler's own assertion"):
        publisher.send("meter", {"n": 1})
    assert sub.stats.handler_errors == 1 and sub.stats.delivered == 1
    publisher.send("meter", {"n": 2})  # the bus goes on after a raise
    assert sub.stats.handler_errors == 1 and sub.stats.delivered == 2


def test_memory_bus_isolates_handler_errors_when_asked(key: bytes) -> None:
    def handler(delivery: zbus.Delivery) -> None:
        raise AssertionError("counted, not raised")

    d = zbus.Dispatcher()
    d.bind("metering", "#", handler)
    bus = MemoryBus(raise_handler_errors=False)
    sub = bus.subscribe(d, key)
    zbus.Publisher(bus.connection().exchange("metering"),
                   zbus.MessageFactory(key, "t")).send("meter", 1)
    assert sub.stats.handler_errors == 1 and sub.stats.delivered == 1


def test_a_raising_handler_does_not_keep_the_message_from_other_consumers(key: bytes) -> None:
    def boom(delivery: zbus.Delivery) -> None:
        raise RuntimeError("first subscriber's bug")

    failing, other = zbus.Dispatcher(), zbus.Dispatcher()
    failing.bind("metering", "#", boom)
    failing.bind("metering", "#", lambda d: None)  # a second handler of the same consumer
    got: list[zbus.Delivery] = []
    other.bind("metering", "#", got.append)
    bus = MemoryBus()
    first, second = bus.subscribe(failing, key), bus.subscribe(other, key)
    with pytest.raises(RuntimeError, match="first subscriber's bug"):
        zbus.Publisher(bus.connection().exchange("metering"),
                       zbus.MessageFactory(key, "t")).send("meter", 1)
    assert len(got) == 1 and second.stats.delivered == 1
    assert first.stats.delivered == 1 and first.stats.handler_errors == 1


def test_a_pytest_test_whose_handler_assertion_fails_fails(tmp_path: Path) -> None:
    """The issue's own case, run by pytest as a user would write it."""
    test = tmp_path / "test_user_handler.py"
    test.write_text(textwrap.dedent("""
        import zbus, zbus.testing

        def test_meter_handler():
            key = zbus.generate_key()
            bus = zbus.testing.MemoryBus()
            d = zbus.Dispatcher()
            def handler(delivery):
                assert delivery.payload["volume"] == 2.0
            d.bind("metering", "meter", handler)
            bus.subscribe(d, key)
            zbus.Publisher(bus.connection().exchange("metering"),
                           zbus.MessageFactory(key, "t")).send("meter", {"volume": 1.5})
    """))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir",
         str(tmp_path), "-c", "/dev/null", str(test)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 failed" in proc.stdout and "assert 1.5 == 2.0" in proc.stdout


# -- item 9: the threads backend in an eventlet-patched process; pickling ---------------------

def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=30)


def test_threads_connection_in_a_monkey_patched_process_names_zbus_eventlet(
        live_run_dir: Path) -> None:
    run_dir = live_run_dir
    proc = _python(f"""
        import eventlet
        eventlet.monkey_patch()
        import zbus, zbus.eventlet
        zbus.eventlet.Connection({str(run_dir)!r}).close()  # the green backend is fine
        try:
            zbus.Connection({str(run_dir)!r})
        except zbus.ConfigError as exc:
            print(exc)
        else:
            print("accepted")
    """)
    assert proc.returncode == 0, proc.stderr
    assert "monkey-patched" in proc.stdout and "zbus.eventlet.Connection" in proc.stdout


def test_detecting_a_patched_process_never_imports_eventlet(live_run_dir: Path) -> None:
    run_dir = live_run_dir
    proc = _python(f"""
        import sys, zbus
        zbus.Connection({str(run_dir)!r}).close()
        print("eventlet" in sys.modules)
    """)
    assert (proc.returncode, proc.stdout.strip()) == (0, "False"), proc.stderr


def test_eventlet_imported_but_not_patched_keeps_the_threads_backend(
        live_run_dir: Path) -> None:
    pytest.importorskip("eventlet")  # imported in pytest's process, which is never patched
    zbus.Connection(live_run_dir).close()


@pytest.mark.parametrize("make", [
    lambda rd: zbus.Connection(rd),
    lambda rd: zbus.asyncio.Connection(rd),
    lambda rd: zbus.eventlet.Connection(rd),
    lambda rd: zbus.Publisher(zbus.Connection(rd).exchange("metering"),
                              zbus.MessageFactory(zbus.generate_key(), "p")),
], ids=["threads", "asyncio", "eventlet", "publisher"])
def test_a_connection_cannot_be_pickled_and_says_why(make: Callable[[Path], Any],
                                                     live_run_dir: Path) -> None:
    with pytest.raises(zbus.ZbusError, match=r"cannot be pickled.*create a Connection in the"):
        pickle.dumps(make(live_run_dir))


def test_a_publisher_handed_to_a_spawned_process_fails_with_a_zbus_error(
        live_run_dir: Path, key: bytes) -> None:
    """What multiprocessing's spawn and forkserver start methods do with a Process's
    arguments (ForkingPickler, in the parent, before any child runs); a live socket, as in
    the issue, used to fail inside pyzmq naming neither zbus nor the object."""
    conn = zbus.Connection(live_run_dir)
    try:
        publisher = zbus.Publisher(conn.exchange("metering"), zbus.MessageFactory(key, "p"))
        publisher.send("meter", 0)
        with pytest.raises(zbus.ZbusError, match=r"zbus\.Connection cannot be pickled"):
            ForkingPickler.dumps(publisher)
    finally:
        conn.close()
