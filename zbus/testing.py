"""An in-memory zbus for unit tests: no sockets, no proxy, the same dispatch and signing.

>>> import zbus, zbus.testing
>>> key = zbus.generate_key()
>>> bus = zbus.testing.MemoryBus()
>>> seen = []
>>> d = zbus.Dispatcher()
>>> _ = d.bind("notifications", "compute.#", seen.append)
>>> sub = bus.subscribe(d, key)
>>> exchange = bus.connection().exchange("notifications")
>>> zbus.Publisher(exchange, zbus.MessageFactory(key, "me")).send("compute.x", {"n": 1})
>>> seen[0].payload
{'n': 1}

What is the same as on the real fabric (and must stay so; the tests pin it):

* Messages are the frames :class:`MessageFactory` signs; consumers run them through
  :class:`ConsumerCore`, so a forged, malformed or oversize message is rejected and counted
  under the same reason, and handlers see the same :class:`Delivery`.
* Fan-out: every subscriber whose ZeroMQ prefixes cover the topic gets its own copy; exact
  pattern matching (and the ``unmatched`` counter) happens in the consumer, as on the wire.
* Pools: a pool receives what its bindings' prefixes cover and hands each message to exactly
  one member, round robin over the members joined (and not closed) at that moment. A pool
  with no member keeps its messages (up to ``settings.pool_hwm``, then counts ``dropped``)
  until one joins. A member joining with other bindings than the pool's is refused, as the
  proxy refuses it.
* Handler exceptions are counted as on the wire (``handler_errors``) and, unlike on the
  wire, raised out of the ``send`` that delivered the message: a test double must fail the
  test whose handler's ``assert`` fails, not log it and pass. ``raise_handler_errors=False``
  isolates them as the real consumers do (logged and counted, the next handler runs), for a
  test of that isolation itself.

What differs: delivery is synchronous (during ``send_frames``) or, with
``autodrain=False``, on :meth:`MemoryBus.drain`; nothing is lost, so ``lost`` stays 0 unless
a test injects gaps; ``ready()`` returns at once.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Iterator
from typing import cast

from ._connection import Connection, Exchange
from ._dispatch import ConsumerCore, ConsumerStats, Delivery, Dispatcher
from ._errors import ConfigError, TransportError
from ._keys import KeyRing
from ._message import MessageFactory
from ._names import TopicPattern, minimal_prefixes, validate_name
from ._replay import ReplayGuard
from ._settings import Settings

__all__ = ["MemoryBus", "MemoryConnection", "MemoryConsumer", "MemoryPool"]

log = logging.getLogger("zbus")


class MemoryConsumer:
    """A subscriber or pool member on a :class:`MemoryBus` (same counters as the real ones)."""

    def __init__(self, bus: MemoryBus, dispatcher: Dispatcher, keys: bytes | KeyRing, *,
                 track_sequences: bool, pool: str | None = None) -> None:
        if not dispatcher.patterns:
            raise ConfigError("the dispatcher has no bindings: bind a handler before subscribing")
        self.bus = bus
        self.pool = pool
        self.core = ConsumerCore(dispatcher, keys, track_sequences=track_sequences,
                                 replay=ReplayGuard(bus.settings.replay))
        self.prefixes = self.core.prefixes()
        self.deliveries: list[Delivery] = []
        """Every delivery this consumer accepted, in order (handlers already run)."""
        self.closed = False

    @property
    def stats(self) -> ConsumerStats:
        return self.core.stats

    @property
    def bindings(self) -> list[str]:
        return sorted(str(p) for p in self.core.dispatcher.patterns)

    def ready(self, timeout: float = 10.0) -> None:
        """Live at once: the memory bus has no slow joiners."""
        if self.closed:
            raise TransportError("this consumer is closed")

    def covers(self, topic: bytes) -> bool:
        return any(topic.startswith(prefix) for prefix in self.prefixes)

    def deliver(self, frames: list[bytes]) -> None:
        """Run the handlers of every delivery in ``frames`` (a batch may hold several); with
        ``raise_handler_errors``, raise the first handler exception once all have run."""
        self.core.feed(frames)
        failure: Exception | None = None
        while (delivery := self.core.next_ready()) is not None:
            self.deliveries.append(delivery)
            if not self.bus.raise_handler_errors:
                self.core.run_handlers(delivery)
                continue
            for handler in delivery.handlers:
                try:
                    handler(delivery)
                except Exception as exc:
                    if failure is None:
                        self.core.stats.handler_errors += 1
                        failure = exc
                    else:  # one raises; the others are logged and counted, as on the wire
                        self.core.handler_failed(handler, delivery)
            self.core.stats.delivered += 1
        if failure is not None:
            raise failure

    def close(self) -> None:
        self.closed = True
        self.bus._remove(self)

    def __enter__(self) -> MemoryConsumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MemoryPool:
    """A declared pool: its bindings and members, handing out messages round robin."""

    def __init__(self, name: str, bindings: list[str], prefixes: list[bytes],
                 hwm: int) -> None:
        self.name = name
        self.bindings = bindings
        self.prefixes = prefixes
        self.members: list[MemoryConsumer] = []
        self.backlog: deque[list[bytes]] = deque()
        """Messages waiting for a first member (the proxy's queue, bounded by pool_hwm)."""
        self.dropped = 0
        self._hwm = hwm
        self._turn = itertools.count()

    def offer(self, frames: list[bytes]) -> MemoryConsumer | None:
        """The member to deliver ``frames`` to now, or None when it was queued or dropped."""
        if self.members:
            return self.members[next(self._turn) % len(self.members)]
        if len(self.backlog) >= self._hwm:
            self.dropped += 1
        else:
            self.backlog.append(frames)
        return None

    def covers(self, topic: bytes) -> bool:
        return any(topic.startswith(prefix) for prefix in self.prefixes)



class MemoryConnection:
    """The publishing surface of :class:`zbus.Connection`, backed by a :class:`MemoryBus`.

    ``exchange()`` returns a real :class:`zbus.Exchange`, so ``Publisher`` and ``Exchange``
    work unchanged; ``Router`` takes this object in place of a Connection.
    """

    _backend = "zbus"  # the threads backend's surface: zbus.asyncio objects refuse it

    def __init__(self, bus: MemoryBus) -> None:
        self.bus = bus
        self.settings = bus.settings
        self._closed = False

    def send_frames(self, frames: list[bytes]) -> None:
        if self._closed:
            raise TransportError("this Connection is closed")
        self.bus.send_frames(frames)

    def send_many(self, batch: list[list[bytes]]) -> None:
        for frames in batch:
            self.send_frames(frames)

    def publish(self, factory: MessageFactory, frames: list[bytes]) -> None:
        """As :meth:`zbus.Connection.publish`: on the memory bus nothing is lost, so no
        beacon is needed; a send that fails gives the message's number back."""
        if self._closed:
            factory.withdraw()
            raise TransportError("this Connection is closed")
        # Sent from here on: a handler's exception raised through this call must not give
        # the number back, or the next message would reuse it (rejected as a replay).
        self.bus.send_frames(frames)

    def publish_many(self, factory: MessageFactory, batch: list[list[bytes]]) -> None:
        self.send_many(batch)

    def exchange(self, name: str) -> Exchange:
        # Exchange only calls publish and send_frames on its connection, which this provides.
        return Exchange(name, cast(Connection, self))

    def subscribe(self, dispatcher: Dispatcher, keys: bytes | KeyRing) -> MemoryConsumer:
        return self.bus.subscribe(dispatcher, keys)

    def join_pool(self, pool: str, dispatcher: Dispatcher,
                  keys: bytes | KeyRing) -> MemoryConsumer:
        return self.bus.join_pool(pool, dispatcher, keys)

    def declare_pool(self, pool: str, bindings: list[str], timeout: float = 5.0) -> None:
        self.bus.declare_pool(pool, bindings)

    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> MemoryConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MemoryBus:
    """One in-memory host: publishers, fan-out subscribers and worker pools, no sockets.

    ``autodrain`` (default) delivers each message while ``send_frames`` runs (a handler that
    publishes queues its message behind the current one, so there is no recursion);
    ``autodrain=False`` queues until :meth:`drain`. ``settings.max_message_bytes`` is applied
    per frame as ZMQ_MAXMSGSIZE would: a larger message never reaches a consumer and is
    counted in ``oversize``. A handler's exception propagates out of the ``send`` (or
    :meth:`drain`) that delivered its message, after being counted; the messages queued
    behind it stay queued for the next send or drain. ``raise_handler_errors=False`` logs
    and counts it instead, as the real consumers do.
    """

    def __init__(self, *, autodrain: bool = True, raise_handler_errors: bool = True,
                 settings: Settings | None = None) -> None:
        self.autodrain = autodrain
        self.raise_handler_errors = raise_handler_errors
        self.settings = settings or Settings()
        self.subscribers: list[MemoryConsumer] = []
        self.pools: dict[str, MemoryPool] = {}
        self.sent: list[list[bytes]] = []
        """Every message sent on the bus, in order (frames as published)."""
        self.oversize = 0
        self.unrouted = 0
        """Messages that no subscriber or pool prefix covered (the proxy drops those too)."""
        self._queue: deque[list[bytes]] = deque()
        self._draining = False

    # -- the publishing side ------------------------------------------------------------

    def connection(self) -> MemoryConnection:
        return MemoryConnection(self)

    def send_frames(self, frames: list[bytes]) -> None:
        """Put one multipart message (signed, or forged by a test) on the bus."""
        frames = [bytes(f) for f in frames]
        self.sent.append(frames)
        self._queue.append(frames)
        if self.autodrain:
            self.drain()

    # -- the consuming side -------------------------------------------------------------

    def subscribe(self, dispatcher: Dispatcher, keys: bytes | KeyRing) -> MemoryConsumer:
        """A fan-out subscriber for every pattern bound in ``dispatcher``."""
        sub = MemoryConsumer(self, dispatcher, keys, track_sequences=True)
        self.subscribers.append(sub)
        return sub

    def declare_pool(self, pool: str, bindings: list[str]) -> MemoryPool:
        """Declare ``pool`` with ``bindings`` (``"exchange/pattern"``); idempotent."""
        validate_name(pool, "pool name")
        if not bindings:
            raise ConfigError("a pool needs at least one binding 'exchange/pattern'")
        patterns = [TopicPattern.parse(b) for b in bindings]
        wanted = sorted(str(p) for p in patterns)
        known = self.pools.get(pool)
        if known is not None:
            if known.bindings != wanted:
                raise ConfigError(
                    f"pool {pool!r} is declared with bindings {known.bindings}, not {wanted}: "
                    "use another pool name"
                )
            return known
        declared = MemoryPool(pool, wanted, minimal_prefixes(patterns), self.settings.pool_hwm)
        self.pools[pool] = declared
        return declared

    def join_pool(self, pool: str, dispatcher: Dispatcher,
                  keys: bytes | KeyRing) -> MemoryConsumer:
        """Become a member of worker pool ``pool``, declaring it with the dispatcher's
        patterns as the real ``PoolMember.ready`` does."""
        member = MemoryConsumer(self, dispatcher, keys, track_sequences=False, pool=pool)
        declared = self.declare_pool(pool, member.bindings)
        declared.members.append(member)
        if declared.backlog and self.autodrain:
            self.drain()
        return member

    def _remove(self, consumer: MemoryConsumer) -> None:
        if consumer in self.subscribers:
            self.subscribers.remove(consumer)
        for pool in self.pools.values():
            if consumer in pool.members:
                pool.members.remove(consumer)

    # -- delivery -------------------------------------------------------------------------

    def pending(self) -> int:
        """Messages queued and not yet delivered."""
        return len(self._queue)

    def drain(self) -> int:
        """Deliver every queued message (and those handlers publish meanwhile); return how
        many messages were taken off the queue."""
        if self._draining:
            return 0  # a handler published: the outer drain delivers it next
        self._draining = True
        moved = 0
        try:
            while True:
                if self._queue:
                    self._route(self._queue.popleft())
                    moved += 1
                    continue
                waiting = next((p for p in self.pools.values() if p.backlog and p.members), None)
                if waiting is None:
                    break
                frames = waiting.backlog.popleft()
                member = waiting.offer(frames)
                assert member is not None
                member.deliver(frames)
                moved += 1
        finally:
            self._draining = False
        return moved

    def _route(self, frames: list[bytes]) -> None:
        if any(len(f) > self.settings.max_message_bytes for f in frames):
            self.oversize += 1
            return
        topic = frames[0] if frames else b""
        targets = [s for s in self.subscribers if s.covers(topic)]
        pooled = False
        for pool in self.pools.values():
            if pool.covers(topic):
                pooled = True
                member = pool.offer(frames)
                if member is not None:
                    targets.append(member)
        if not targets and not pooled:
            self.unrouted += 1
        # Every target gets the message even when one's handler raises (fan-out does not
        # depend on another consumer's handlers); the first failure is raised after.
        failure: Exception | None = None
        for consumer in targets:
            try:
                consumer.deliver(frames)
            except Exception as exc:
                if failure is None:
                    failure = exc
                else:
                    log.error("zbus.testing: another consumer's handler also raised",
                              exc_info=exc)
        if failure is not None:
            raise failure

    def consumers(self) -> Iterator[MemoryConsumer]:
        yield from self.subscribers
        for pool in self.pools.values():
            yield from pool.members

    def __repr__(self) -> str:
        return (f"MemoryBus({len(self.subscribers)} subscribers, pools {sorted(self.pools)}, "
                f"{len(self.sent)} sent)")
