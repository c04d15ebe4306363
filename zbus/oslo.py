"""An oslo.messaging transport driver for notifications: ``transport_url = zbus:///?...``.

Installed with ``pip install 'zbus-fabric[oslo]'``, registered under the
``oslo.messaging.drivers`` entry point as ``zbus``. docs/OSLO.md is the user's page: every
option, the mapping of a notification onto a zbus message, and what differs from RabbitMQ.

An edge over the library, like the Kafka driver it follows: notifications only. Creating
an RPC transport on ``zbus://`` fails at once (:class:`RPCNotSupportedError`).

Invariants a maintainer must keep:

* one :class:`zbus.SharedPublisher` per driver (per transport) signs and sends for every
  thread and green thread of the service, and is re-made in a forked worker;
* the routing key is ``<topic>.<priority>.<event_type>``: a listener's (topic, priority)
  is the prefix its pool binds, so the proxy filters by priority (a ZeroMQ prefix) and
  never hands a pool what it does not listen to;
* one zbus pool per (oslo pool, exchange, topic, priorities, pool mode): the unit RabbitMQ
  shares (its queue ``topic.priority``) is per topic, so listeners on the same topic share
  even when their other targets differ (oslo's functional suite checks it);
* each pool member runs in its own thread (green thread under ``monkey_patch()``) and is
  made, made ready, run and closed in that thread: sockets never cross threads.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import queue
import re
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from types import FrameType
from typing import Any

from ._connection import Connection, PoolMember, _eventlet_patched
from ._dispatch import Delivery, Dispatcher
from ._errors import ConfigError, ZbusError
from ._keys import KeyRing
from ._reliable import ReliableMember
from ._settings import Settings, default_run_dir
from ._shared import SharedPublisher

try:
    from oslo_config import cfg
    from oslo_messaging import exceptions as oslo_exceptions
    from oslo_messaging._drivers import base
    from oslo_serialization import jsonutils
except ImportError as exc:  # pragma: no cover - the extra is not installed
    raise ImportError(
        f'the oslo.messaging driver needs oslo.messaging: pip install "zbus-fabric[oslo]" ({exc})'
    ) from None

__all__ = ["RPCNotSupportedError", "ZbusDriver", "pool_name", "routing_key"]

log = logging.getLogger("zbus.oslo")

PRIORITIES = ("audit", "critical", "debug", "error", "info", "sample", "warn")

GROUP = "oslo_messaging_zbus"
OPTIONS = [
    cfg.StrOpt("run_dir", help="The zbus-proxy's run directory (default: zbus's default, "
               "$XDG_RUNTIME_DIR/zbus or /tmp/zbus-UID)."),
    cfg.StrOpt("key_file", help="The signing key file (zbus keygen FILE); required."),
    cfg.StrOpt("key_id", help="The key of key_file that signs (default: its first)."),
    cfg.StrOpt("publisher_id", help="The zbus publisher id of this service's notifications "
               "(default: oslo@HOSTNAME)."),
    cfg.StrOpt("pool_mode", default="fast", choices=["fast", "reliable"],
               help="fast: at-most-once pools; reliable: at-least-once pools (REQUEUE)."),
    cfg.IntOpt("window", default=100, min=1,
               help="reliable pools: messages in flight per listener and topic."),
    cfg.IntOpt("max_queue", default=10000, min=1,
               help="Notifications a process queues for its sender."),
    cfg.BoolOpt("block", default=True,
                help="When the queue is full: wait send_timeout (True), or drop and count."),
    cfg.FloatOpt("send_timeout", default=5.0, help="Seconds a full queue may hold a notify."),
    cfg.BoolOpt("require_proxy", default=True,
                help="Refuse a run directory with no zbus-proxy when the transport is made."),
]


_ENVIRONMENT = {"run_dir": "ZBUS_RUN_DIR", "key_file": "ZBUS_KEY_FILE", "key_id": "ZBUS_KEY_ID"}


class RPCNotSupportedError(ZbusError, oslo_exceptions.MessagingException):  # type: ignore[misc]
    """zbus:// carries notifications only."""

    def __init__(self) -> None:
        super().__init__(
            "zbus:// carries oslo.messaging notifications only, not RPC: keep RPC on its "
            "transport ([DEFAULT] transport_url = rabbit://...) and set zbus:// as "
            "[oslo_messaging_notifications] transport_url")


# -- names ------------------------------------------------------------------------------

_BAD = re.compile(r"[^A-Za-z0-9_-]")


def _word(text: str) -> str:
    return _BAD.sub("_", text) or "_"


@functools.lru_cache(maxsize=4096)
def _words(text: str) -> str:
    """A dotted name zbus accepts: each character outside ``A-Za-z0-9_-`` becomes ``_``."""
    return ".".join(_word(w) for w in str(text).split("."))


def _short_hash(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:8]


@functools.lru_cache(maxsize=4096)  # services send a few hundred distinct names at most
def exchange_name(exchange: str) -> str:
    """The zbus exchange of an oslo exchange (``nova``, ``openstack``: unchanged)."""
    name = _word(exchange)
    return name if len(name) <= 64 else name[:55] + "-" + _short_hash(exchange)


@functools.lru_cache(maxsize=4096)
def routing_key(topic: str, priority: str, event_type: object) -> str:
    """``<topic>.<priority>.<event_type>``, each made a valid dotted name; an event type too
    long for zbus's 255 characters is cut and ends with a hash of itself."""
    key = f"{_words(topic)}.{priority}.{_words(str(event_type or '_'))}"
    if len(key) > 255:
        key = key[:246].rstrip(".") + "." + _short_hash(event_type)
    return key


def pool_name(pool: str | None, exchange: str, topic: str, priorities: tuple[str, ...],
              mode: str) -> str:
    """The zbus pool of listeners in oslo pool ``pool`` (None: the pool-less listeners) on
    one exchange and topic: readable, and made unique by a hash of everything it stands for."""
    tag = _short_hash(pool, exchange, topic, priorities, mode)
    readable = "-".join(_word(p).replace(".", "_") for p in
                        ("oslo" if mode == "fast" else "oslor", exchange, topic,
                         pool if pool is not None else "default"))
    return f"{readable[:64 - len(tag) - 1]}-{tag}"


_SCALARS = frozenset({str, int, float, bool, type(None), bytes})


def _primitive(obj: Any) -> Any:
    """``obj`` as msgpack can carry it, as oslo's AMQP drivers make it for JSON: plain data
    is copied as it is, anything else goes through oslo's ``to_primitive`` (datetimes become
    strings, objects their dicts). The plain walk costs a fraction of ``to_primitive``'s,
    which inspects every value (most of a notify's cost when called on everything)."""
    kind = type(obj)
    if kind in _SCALARS:
        return obj
    if kind is dict:
        return {k if type(k) is str else str(k): _primitive(v) for k, v in obj.items()}
    if kind is list or kind is tuple:
        return [_primitive(v) for v in obj]
    return _primitive(jsonutils.to_primitive(obj, convert_instances=True))


# -- options ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Options:
    run_dir: str
    key_file: str
    key_id: str | None
    publisher_id: str
    pool_mode: str
    window: int
    max_queue: int
    block: bool
    send_timeout: float
    require_proxy: bool

    @classmethod
    def read(cls, conf: Any, url: Any) -> Options:
        """The URL's query wins over the ``[oslo_messaging_zbus]`` group, which wins over
        ``ZBUS_RUN_DIR``, ``ZBUS_KEY_FILE`` and ``ZBUS_KEY_ID`` (the zbus CLI's)."""
        conf.register_opts(OPTIONS, group=GROUP)
        group = conf[GROUP]
        query: dict[str, str] = dict(getattr(url, "query", {}) or {})
        known = {opt.dest for opt in OPTIONS}
        unknown = sorted(set(query) - known)
        if unknown:
            raise ConfigError(f"zbus:// does not know {', '.join(unknown)}: the options are "
                              f"{', '.join(sorted(known))} (docs/OSLO.md)")

        def get(name: str) -> Any:
            if name in query:
                return query[name]
            value = group[name]
            if value is None and name in _ENVIRONMENT:  # as the zbus CLI reads them
                value = os.environ.get(_ENVIRONMENT[name]) or None
            return value

        def flag(name: str) -> bool:
            value = get(name)
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"zbus:// {name}={value!r}: say true or false")

        def number(name: str, kind: type[Any]) -> Any:
            try:
                value = kind(get(name))
            except (TypeError, ValueError):
                raise ConfigError(f"zbus:// {name}={get(name)!r} is not a number") from None
            if value <= 0:
                raise ConfigError(f"zbus:// {name} must be positive, not {value}")
            return value

        key_file = get("key_file")
        if not key_file:
            raise ConfigError("zbus:// needs the signing key: transport_url = "
                              "zbus:///?key_file=/etc/zbus/signing.key (make one with "
                              "'zbus keygen FILE'), or key_file in [oslo_messaging_zbus]")
        mode = str(get("pool_mode"))
        if mode not in ("fast", "reliable"):
            raise ConfigError(f"zbus:// pool_mode={mode!r}: fast or reliable")
        hosts = [h for h in getattr(url, "hosts", []) or [] if getattr(h, "hostname", None)]
        if hosts:
            raise ConfigError("zbus:// names no host (each host runs its own zbus-proxy): "
                              "zbus:///?run_dir=...")
        return cls(
            run_dir=str(get("run_dir") or default_run_dir()),
            key_file=str(key_file),
            key_id=get("key_id") or None,
            publisher_id=str(get("publisher_id") or f"oslo@{socket.gethostname()}"),
            pool_mode=mode,
            window=number("window", int),
            max_queue=number("max_queue", int),
            block=flag("block"),
            send_timeout=number("send_timeout", float),
            require_proxy=flag("require_proxy"),
        )


def _refuse_rpc_transport() -> None:
    """Raise when the driver is made by ``get_rpc_transport``: oslo makes the driver before
    it wraps it in an RPC or a notification transport, so the caller's frame is the only
    place that says which. The deprecated ``get_transport`` (which services used for
    notifications too, and oslo's functional notification suite still calls) is let through:
    RPC over it fails at its first call or listen, as the Kafka driver's does."""
    frame: FrameType | None = sys._getframe(1)
    for _ in range(12):
        if frame is None:
            return
        if frame.f_code.co_name == "get_rpc_transport" and \
                frame.f_globals.get("__name__", "").startswith("oslo_messaging"):
            raise RPCNotSupportedError()
        frame = frame.f_back


# -- the driver -------------------------------------------------------------------------

class ZbusDriver(base.BaseDriver):  # type: ignore[misc]
    """oslo.messaging's ``zbus`` driver (notifications only)."""

    def __init__(self, conf: Any, url: Any, default_exchange: str | None = None,
                 allowed_remote_exmods: list[str] | None = None) -> None:
        _refuse_rpc_transport()
        super().__init__(conf, url, default_exchange, allowed_remote_exmods)
        self.options = Options.read(conf, url)
        ring = KeyRing.from_file(self.options.key_file)
        self.keys = ring.with_active(self.options.key_id) if self.options.key_id else ring
        self.settings = Settings(send_timeout=self.options.send_timeout)
        self._publisher: SharedPublisher | None = None
        self._publisher_lock = threading.Lock()
        self._listeners: list[_Listener] = []
        if self.options.require_proxy:
            self._shared()  # refuses a run directory with no proxy now, not at first notify

    def _shared(self) -> SharedPublisher:
        pub = self._publisher
        if pub is None:
            with self._publisher_lock:
                if self._publisher is None:
                    from ._message import MessageFactory

                    self._publisher = SharedPublisher(
                        self.options.run_dir,
                        MessageFactory(self.keys, self.options.publisher_id),
                        settings=self.settings, max_queue=self.options.max_queue,
                        block=self.options.block, require_proxy=self.options.require_proxy)
                pub = self._publisher
        return pub

    @property
    def publisher(self) -> SharedPublisher:
        """The driver's shared publisher (its ``stats`` count what was sent and lost)."""
        return self._shared()

    def require_features(self, requeue: bool = False) -> None:
        if requeue and self.options.pool_mode != "reliable":
            raise NotImplementedError(
                "zbus:// fast pools deliver at most once and cannot requeue: set "
                "pool_mode=reliable in the transport URL for NotificationResult.REQUEUE")

    def send(self, *args: Any, **kwargs: Any) -> Any:
        raise RPCNotSupportedError()

    def listen(self, *args: Any, **kwargs: Any) -> Any:
        raise RPCNotSupportedError()

    def send_notification(self, target: Any, ctxt: Any, message: Any, version: float,
                          retry: int | None = None) -> None:
        """Queue one notification for the shared sender (returns once queued; a full queue
        waits ``send_timeout`` then raises, or drops and counts with ``block=false``).
        ``retry`` is not used: the sender owns delivery to the local proxy."""
        topic, _, priority = target.topic.rpartition(".")
        if not topic:
            topic, priority = priority, "info"
        body = _primitive(message)
        if not isinstance(body, dict):
            body = {"payload": body}
        # A RequestContext travels as its dict, as oslo's AMQP drivers pack it.
        context = ctxt.to_dict() if hasattr(ctxt, "to_dict") else (ctxt or {})
        body["context"] = _primitive(context)
        event_type = body.get("event_type")
        exchange = exchange_name(target.exchange or self._default_exchange or "openstack")
        self._shared().send(
            exchange, routing_key(topic, priority, event_type), body,
            message_type=_words(str(event_type or "notification"))[:255],
            version=int(version))

    def listen_for_notifications(self, targets_and_priorities: Any, pool: str | None,
                                 batch_size: int, batch_timeout: float | None) -> Any:
        groups: dict[tuple[str, str], set[str]] = {}
        for target, priority in targets_and_priorities:
            exchange = exchange_name(target.exchange or self._default_exchange or "openstack")
            groups.setdefault((exchange, target.topic), set()).add(priority)
        listener = _Listener(self, pool, groups)
        self._listeners.append(listener)
        return base.PollStyleListenerAdapter(listener, batch_size, batch_timeout)

    def cleanup(self) -> None:
        for listener in self._listeners:
            listener.cleanup()
        self._listeners = []
        if self._publisher is not None:
            self._publisher.close()


# -- listening --------------------------------------------------------------------------

class _Incoming(base.IncomingMessage):  # type: ignore[misc]
    def __init__(self, delivery: Delivery, member: _Member) -> None:
        body = dict(delivery.message)
        ctxt = body.pop("context", {})
        super().__init__(ctxt, body, body.get("message_id"))
        self._delivery = delivery
        self._member = member

    def acknowledge(self) -> None:
        self._member.outcome(self._delivery, True)

    def requeue(self) -> None:
        self._member.outcome(self._delivery, False)


_WAKE = object()


class _Member:
    """One pool member (one exchange and topic of a listener) in its own thread."""

    def __init__(self, listener: _Listener, pool: str, bindings: list[tuple[str, str]]) -> None:
        self.listener = listener
        self.pool = pool
        self.bindings = bindings
        self.reliable = listener.driver.options.pool_mode == "reliable"
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.stopping = threading.Event()
        self.released = threading.Event()  # every message handed out was acked or requeued
        self.outcomes: deque[tuple[Delivery, bool]] = deque()
        self.handed = 0
        self.consumer: PoolMember | ReliableMember | None = None
        self.thread = threading.Thread(target=self._run, name=f"zbus-oslo-{pool}", daemon=True)
        self.thread.start()

    def outcome(self, delivery: Delivery, ok: bool) -> None:
        if self.reliable:
            self.outcomes.append((delivery, ok))  # applied by the member's thread
        elif not ok:
            log.warning("zbus: a fast pool cannot requeue (pool_mode=reliable can): the "
                        "notification %s is dropped", delivery.envelope.message_id.hex())

    def _connect(self) -> Connection:
        driver = self.listener.driver
        if _eventlet_patched():
            from .eventlet import Connection as GreenConnection

            # One handler green thread: notifications reach oslo in the order received.
            return GreenConnection(driver.options.run_dir, settings=driver.settings,
                                   handler_pool_size=1)
        return Connection(driver.options.run_dir, settings=driver.settings)

    def _hand(self, delivery: Delivery) -> None:
        self.handed += 1
        self.listener.incoming.put(_Incoming(delivery, self))

    def _run(self) -> None:
        try:
            conn = self._connect()
            dispatcher = Dispatcher()
            for exchange, pattern in self.bindings:
                dispatcher.bind(exchange, pattern, self._hand)
            keys = self.listener.driver.keys
            if self.reliable:
                consumer: PoolMember | ReliableMember = conn.join_reliable_pool(
                    self.pool, dispatcher, keys, window=self.listener.driver.options.window)
            else:
                consumer = conn.join_pool(self.pool, dispatcher, keys)
            self.consumer = consumer
            consumer.ready()
        except BaseException as exc:
            self.error = exc
            self.ready.set()
            return
        self.ready.set()
        try:
            if isinstance(consumer, ReliableMember):
                self._run_reliable(consumer)
            else:
                # receive() rather than run(): deliveries go straight to oslo's queue, not
                # through the eventlet backend's handler green threads first.
                while not self.stopping.is_set():
                    delivery = consumer.receive(timeout=0.1)
                    if delivery is not None:
                        self._hand(delivery)
                consumer.drain(timeout=5.0)  # what it prefetched goes to oslo too
        except Exception:
            log.exception("zbus: the listener of pool %s failed", self.pool)
        finally:
            consumer.close()
            conn.close()

    def _run_reliable(self, member: ReliableMember) -> None:
        acked = 0

        def settle() -> int:
            done = 0
            while self.outcomes:
                delivery, ok = self.outcomes.popleft()
                (member.ack if ok else member.nack)(delivery)
                done += 1
            return done

        while not self.stopping.is_set():
            acked += settle()
            delivery = member.receive(timeout=0.02)
            if delivery is not None:
                self._hand(delivery)
        # Stopped: take nothing new; settle what oslo still holds (it acks as it finishes)
        # until released, then BYE gives back whatever the pool sent and we never read.
        deadline = time.monotonic() + 30.0
        while acked < self.handed and time.monotonic() < deadline and \
                not self.released.is_set():
            acked += settle()
            time.sleep(0.01)
        settle()


class _Listener(base.PollStyleListener):  # type: ignore[misc]
    """The poll side oslo's adapter reads; one :class:`_Member` per (exchange, topic)."""

    def __init__(self, driver: ZbusDriver, pool: str | None,
                 groups: dict[tuple[str, str], set[str]]) -> None:
        super().__init__()
        self.driver = driver
        # Bounded: a slow oslo executor makes members wait, and the proxy's pool queue holds
        # the rest (pool_hwm), as a slow RabbitMQ consumer leaves messages in its queue.
        self.incoming: queue.Queue[Any] = queue.Queue(1000)
        self.stopped = False
        mode = driver.options.pool_mode
        self.members: list[_Member] = []
        for (exchange, topic), priorities in sorted(groups.items()):
            prios = tuple(sorted(priorities))
            name = pool_name(pool, exchange, topic, prios, mode)
            bindings = [(exchange, f"{_words(topic)}.{p}.#") for p in prios]
            self.members.append(_Member(self, name, bindings))
        for member in self.members:
            member.ready.wait(30.0)
            if member.error is not None or not member.ready.is_set():
                self.stop()
                self.cleanup()
                error = member.error or TimeoutError("not ready within 30 s")
                raise ConfigError(f"zbus:// cannot listen on pool {member.pool}: {error}")\
                    from member.error

    def _poll_one(self, timeout: float | None = None) -> Any:
        while True:
            if self.stopped:
                # Return what members still hand over (a fast member drains its prefetch),
                # then None once they are all done and nothing is left.
                try:
                    item = self.incoming.get(timeout=0.05)
                except queue.Empty:
                    if any(m.thread.is_alive() and not m.reliable for m in self.members):
                        continue
                    return None
            else:
                try:
                    item = self.incoming.get(timeout=timeout)
                except queue.Empty:
                    return None
            if item is not _WAKE:
                return item
            if not self.stopped:
                return None

    poll = base.batch_poll_helper(_poll_one)  # oslo's batching around one message's poll

    def stop(self) -> None:
        self.stopped = True
        for member in self.members:
            member.stopping.set()
        with contextlib.suppress(queue.Full):
            self.incoming.put_nowait(_WAKE)

    def cleanup(self) -> None:
        for member in self.members:
            member.stopping.set()
            member.released.set()
        for member in self.members:
            member.thread.join(10.0)
