"""The oslo.messaging notification driver (zbus/oslo.py, docs/OSLO.md; issue 17), against a
real zbus-proxy: oslo's own Notifier and listeners, a native zbus consumer of the same
stream, pools, REQUEUE, RPC refused, and an eventlet-patched service emitting.

Skipped without oslo.messaging (``pip install 'zbus-fabric[oslo]'``; tox's ``oslo`` env
installs it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import zbus

from .conftest import ProxyProcess

oslo_messaging = pytest.importorskip("oslo_messaging")
cfg = pytest.importorskip("oslo_config.cfg")
RequestContext = pytest.importorskip("oslo_context.context").RequestContext

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def key_file(tmp_path: Path, key: bytes) -> Path:
    """The key as ``zbus keygen`` writes it, in a directory only we can write."""
    tmp_path.chmod(0o700)
    path = tmp_path / "signing.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"default {key.hex()}\n")
    return path


@pytest.fixture
def url(proxy_process: ProxyProcess, run_dir: Path, key_file: Path) -> str:
    return f"zbus:///?run_dir={run_dir}&key_file={key_file}"


@pytest.fixture
def conf() -> Any:
    c = cfg.ConfigOpts()
    c(args=[])
    return c


class Endpoint:
    """Records what oslo dispatches: (priority, publisher, event type, payload, metadata)."""

    def __init__(self, requeue_first: bool = False) -> None:
        self.events: list[tuple[str, str, str, Any, dict[str, Any]]] = []
        self.lock = threading.Lock()
        self.requeue_first = requeue_first
        self.seen: set[str] = set()

    def _record(self, priority: str, publisher: str, event_type: str, payload: Any,
                metadata: dict[str, Any]) -> Any:
        if self.requeue_first and metadata["message_id"] not in self.seen:
            self.seen.add(metadata["message_id"])
            return oslo_messaging.NotificationResult.REQUEUE
        with self.lock:
            self.events.append((priority, publisher, event_type, payload, metadata))
        return oslo_messaging.NotificationResult.HANDLED

    def info(self, ctxt: Any, publisher_id: str, event_type: str, payload: Any,
             metadata: dict[str, Any]) -> Any:
        return self._record("info", publisher_id, event_type, payload, metadata)

    def error(self, ctxt: Any, publisher_id: str, event_type: str, payload: Any,
              metadata: dict[str, Any]) -> Any:
        return self._record("error", publisher_id, event_type, payload, metadata)

    def wait_for(self, count: int, timeout: float = 15.0, settle: float = 0.3) -> int:
        """How many events arrived once ``count`` did (or ``timeout`` passed), after
        ``settle`` more seconds for any extra copy."""
        deadline = time.monotonic() + timeout
        while len(self.events) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(settle)
        return len(self.events)


def transport(conf: Any, url: str) -> Any:
    return oslo_messaging.get_notification_transport(conf, url=url)


def listener(conf: Any, url: str, endpoint: Endpoint, pool: str | None = None,
             topics: tuple[str, ...] = ("notifications",), **kwargs: Any) -> Any:
    server = oslo_messaging.get_notification_listener(
        transport(conf, url), [oslo_messaging.Target(topic=t) for t in topics], [endpoint],
        executor="threading", pool=pool, **kwargs)
    server.start()
    return server


@pytest.fixture
def servers() -> Iterator[list[Any]]:
    started: list[Any] = []
    yield started
    for server in started:
        server.stop()
        server.wait()
        server.transport.cleanup()


def test_a_native_consumer_and_an_oslo_listener_get_the_same_stream(
        conf: Any, url: str, run_dir: Path, key: bytes, servers: list[Any]) -> None:
    oslo_side = Endpoint()
    servers.append(listener(conf, url, oslo_side))
    native: list[zbus.Delivery] = []
    dispatcher = zbus.Dispatcher()
    dispatcher.bind("openstack", "notifications.*.compute.instance.#", native.append)
    with zbus.Connection(run_dir) as conn, conn.subscribe(dispatcher, key) as sub:
        sub.ready()
        t = transport(conf, url)
        notifier = oslo_messaging.Notifier(t, "compute.host1", driver="messagingv2",
                                           topics=["notifications"])
        ctxt = RequestContext(request_id="req-1", user_id="u1")
        for n in range(20):
            notifier.info(ctxt, "compute.instance.create.end", {"n": n, "when": time.time()})
        notifier.error(ctxt, "compute.instance.delete.error", {"n": 20})
        notifier.info(ctxt, "image.upload", {"n": 21})  # not for the native binding
        t.cleanup()  # flushes the shared publisher through the proxy
        sub.run(max_messages=21, idle_timeout=5)
    assert oslo_side.wait_for(22) == 22
    assert [e[3]["n"] for e in oslo_side.events] == list(range(22))
    assert [d.message["payload"]["n"] for d in native] == list(range(21))
    # The same notifications, field for field: oslo's metadata is the envelope's payload.
    by_id = {e[4]["message_id"]: e for e in oslo_side.events}
    for d in native:
        body = d.message
        priority, publisher, event_type, payload, metadata = by_id[body["message_id"]]
        assert d.routing_key == f"notifications.{priority}.{event_type}"
        assert d.envelope.message_type == event_type
        assert (body["publisher_id"], body["event_type"], body["payload"]) == \
            (publisher, event_type, payload)
        assert body["priority"] == priority.upper()
        assert body["timestamp"] == metadata["timestamp"]
        assert body["context"]["request_id"] == "req-1"
        assert d.envelope.message_type_version == 2  # messagingv2
    assert sub.stats.lost == 0


def test_pools_share_and_every_pool_and_the_pool_less_listeners_get_a_copy(
        conf: Any, url: str, servers: list[Any]) -> None:
    a1, a2, b, default = Endpoint(), Endpoint(), Endpoint(), Endpoint()
    servers.extend([listener(conf, url, a1, pool="A"), listener(conf, url, a2, pool="A"),
                    listener(conf, url, b, pool="B"), listener(conf, url, default)])
    t = transport(conf, url)
    notifier = oslo_messaging.Notifier(t, "svc", driver="messaging", topics=["notifications"])
    for n in range(40):
        notifier.info({}, "compute.instance.update", {"n": n})
    t.cleanup()
    assert b.wait_for(40) == 40
    assert default.wait_for(40) == 40
    assert a1.wait_for(1) + a2.wait_for(1) == 40
    shares = sorted(e[3]["n"] for e in a1.events + a2.events)
    assert shares == list(range(40))  # each to exactly one member of pool A
    assert a1.events and a2.events  # ... and spread over both


def test_priorities_are_bindings(conf: Any, url: str, servers: list[Any]) -> None:
    class ErrorsOnly:
        def __init__(self) -> None:
            self.events: list[str] = []

        def error(self, ctxt: Any, publisher_id: str, event_type: str, payload: Any,
                  metadata: Any) -> None:
            self.events.append(event_type)

    errors = ErrorsOnly()
    server = oslo_messaging.get_notification_listener(
        transport(conf, url), [oslo_messaging.Target(topic="notifications")], [errors],
        executor="threading")
    server.start()
    servers.append(server)
    t = transport(conf, url)
    notifier = oslo_messaging.Notifier(t, "svc", driver="messagingv2",
                                       topics=["notifications"])
    notifier.info({}, "x.info", {})
    notifier.error({}, "x.error", {})
    t.cleanup()
    deadline = time.monotonic() + 10
    while not errors.events and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    assert errors.events == ["x.error"]


def test_a_fast_pool_says_it_cannot_requeue(conf: Any, url: str, servers: list[Any],
                                            caplog: pytest.LogCaptureFixture) -> None:
    endpoint = Endpoint(requeue_first=True)
    servers.append(listener(conf, url, endpoint, pool="F", allow_requeue=True))
    t = transport(conf, url)
    oslo_messaging.Notifier(t, "svc", driver="messagingv2", topics=["notifications"]).info(
        {}, "compute.instance.update", {"n": 0})
    t.cleanup()
    deadline = time.monotonic() + 10
    while not endpoint.seen and time.monotonic() < deadline:
        time.sleep(0.01)
    assert endpoint.wait_for(1, timeout=1) == 0  # refused once, never redelivered
    assert "cannot requeue" in caplog.text and "pool_mode=reliable" in caplog.text
    assert t._driver.require_features  # an oslo that asks is told at once:
    with pytest.raises(NotImplementedError, match="pool_mode=reliable"):
        t._driver.require_features(requeue=True)


def test_requeue_redelivers_in_a_reliable_pool(conf: Any, url: str, servers: list[Any]) -> None:
    reliable_url = url + "&pool_mode=reliable"
    endpoint = Endpoint(requeue_first=True)
    servers.append(listener(conf, reliable_url, endpoint, pool="R", allow_requeue=True))
    t = transport(conf, reliable_url)
    notifier = oslo_messaging.Notifier(t, "svc", driver="messagingv2",
                                       topics=["notifications"])
    for n in range(10):
        notifier.info({}, "compute.instance.update", {"n": n})
    t.cleanup()
    assert endpoint.wait_for(10, timeout=30) == 10
    assert sorted(e[3]["n"] for e in endpoint.events) == list(range(10))
    assert len(endpoint.seen) == 10  # each was refused once, then came back


def test_rpc_is_refused_at_once(conf: Any, url: str) -> None:
    with pytest.raises(zbus.ZbusError, match="notifications only"):
        oslo_messaging.get_rpc_transport(conf, url=url)
    # The deprecated get_transport serves notifications; RPC over it fails when used.
    t = oslo_messaging.get_transport(conf, url=url)
    with pytest.raises(oslo_messaging.MessagingException, match="notifications only"):
        t._send(oslo_messaging.Target(topic="t"), {}, {"method": "m"})
    with pytest.raises(oslo_messaging.MessagingException, match="notifications only"):
        t._listen(oslo_messaging.Target(topic="t", server="s"), 1, None)
    t.cleanup()


def test_bad_options_are_refused_when_the_transport_is_made(
        conf: Any, url: str, run_dir: Path, key_file: Path) -> None:
    with pytest.raises(zbus.ConfigError, match="does not know colour"):
        transport(conf, url + "&colour=red")
    with pytest.raises(zbus.ConfigError, match="key_file"):
        transport(conf, f"zbus:///?run_dir={run_dir}")
    with pytest.raises(zbus.ProxyError, match="require_proxy"):
        transport(conf, f"zbus:///?run_dir={run_dir}/none&key_file={key_file}")


GREEN_SERVICE = textwrap.dedent("""
    import eventlet
    eventlet.monkey_patch()
    import json, sys
    from oslo_config import cfg
    import oslo_messaging

    conf = cfg.ConfigOpts()
    conf(args=[])
    transport = oslo_messaging.get_notification_transport(conf, url=sys.argv[1])
    notifier = oslo_messaging.Notifier(transport, "api.host1", driver="messagingv2",
                                       topics=["notifications"])
    ticks = []

    def ticker():  # the hub keeps running while requests emit
        for _ in range(20):
            ticks.append(1)
            eventlet.sleep(0.001)

    def request(g):  # one green thread per request, as eventlet.wsgi runs them
        for n in range(25):
            notifier.info({"request_id": "req-%d" % g}, "compute.instance.update",
                          {"g": g, "n": n})
            eventlet.sleep(0)

    pool = eventlet.GreenPool()
    pool.spawn_n(ticker)
    for g in range(40):
        pool.spawn_n(request, g)
    pool.waitall()
    stats = transport._driver.publisher.stats.as_dict()
    transport.cleanup()
    print(json.dumps({"stats": stats, "ticks": len(ticks)}))
""")


def test_an_eventlet_patched_service_emits_through_one_green_sender(
        conf: Any, url: str, servers: list[Any]) -> None:
    endpoint = Endpoint()
    servers.append(listener(conf, url, endpoint))
    proc = subprocess.run([sys.executable, "-c", GREEN_SERVICE, url],
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["ticks"] == 20
    assert report["stats"]["dropped"] == report["stats"]["failed"] == 0
    assert endpoint.wait_for(1000) == 1000
    got = sorted((e[3]["g"], e[3]["n"]) for e in endpoint.events)
    assert got == [(g, n) for g in range(40) for n in range(25)]


def test_a_forked_worker_emits_with_the_parents_notifier(
        conf: Any, url: str, servers: list[Any]) -> None:
    from .test_fork import forked

    endpoint = Endpoint()
    servers.append(listener(conf, url, endpoint))
    t = transport(conf, url)
    notifier = oslo_messaging.Notifier(t, "svc", driver="messagingv2",
                                       topics=["notifications"])
    notifier.info({}, "compute.instance.update", {"who": "parent", "n": 0})

    def child() -> dict[str, Any]:  # oslo.service forks its workers after start-up
        for n in range(50):
            notifier.info({}, "compute.instance.update", {"who": "child", "n": n})
        t.cleanup()
        return {}

    with forked(child) as result:
        result()
    t.cleanup()
    assert endpoint.wait_for(51) == 51
    assert sorted(e[3]["n"] for e in endpoint.events if e[3]["who"] == "child") == \
        list(range(50))
