"""Consuming, with no I/O: verify, decode, count, route to bound handlers.

A backend (threads, asyncio, eventlet) reads frames from its socket and hands them to
:meth:`ConsumerCore.accept`; it gets back a :class:`Delivery` (with the handlers that match)
or ``None`` when the message was rejected or matched nothing. Every outcome is counted in
:class:`ConsumerStats`. Nothing a peer sends can raise out of ``accept``.

Policy (docs/GUIDE.md repeats it for users):

* rejected (bad signature, unknown key, key not allowed on the exchange, malformed, wrong
  types, key not allowed to sign for the claimed publisher id, stale, future, replay, unknown
  version): dropped,
  counted under ``rejected[reason]``, logged at WARNING the first time per reason, then DEBUG;
* unmatched (ZeroMQ prefix filtering is coarser than patterns): dropped, counted;
* a handler that raises: logged with its traceback, counted in ``handler_errors``; the other
  handlers of the message and the loop go on;
* dispatch never looks up a name carried in a message: only patterns bound with ``bind``.

Invariant: nothing a message claims reaches the replay guard (which keeps per-run state)
before the message is proved to come from a key allowed on its exchange *and* for its
publisher id; a rejected message must leave the guard untouched, or a key holder could move
another publisher's replay window (docs/SECURITY.md).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, TypeVar

from ._envelope import (
    Batch,
    Envelope,
    decode_batch,
    decode_topic,
    message_id,
    signature_key_id,
    verify_frames,
)
from ._errors import ConfigError, EnvelopeError, ReplayError, VersionError
from ._keys import KeyRing
from ._message import Message
from ._names import CONTROL_PREFIX, TopicMatcher, TopicPattern, minimal_prefixes
from ._repair import GapBook, RepairPolicy
from ._replay import ReplayGuard

__all__ = [
    "Binding",
    "ConsumerCore",
    "ConsumerStats",
    "Delivery",
    "Dispatcher",
    "Handler",
    "STREAM_SPAN_LIMIT",
    "StreamTally",
]

log = logging.getLogger("zbus")

Handler = Callable[["Delivery"], Any]
H = TypeVar("H", bound=Handler)


@dataclass(slots=True)
class Delivery:
    """One received, verified message."""

    exchange: str
    routing_key: str
    envelope: Envelope
    key_id: str
    message: Any
    """The decoded :class:`Message` when its class is registered, else the raw payload."""
    handlers: tuple[Handler, ...] = ()
    verified: bool = True
    """False only for consumers made without keys (diagnostic tools such as ``zbus tap``)."""

    @property
    def payload(self) -> Any:
        return self.envelope.payload

    @property
    def message_type(self) -> str:
        return self.envelope.message_type

    @property
    def publisher_id(self) -> str:
        return self.envelope.publisher_id

    @property
    def sequence(self) -> int:
        return self.envelope.sequence


@dataclass(frozen=True, slots=True)
class Binding:
    pattern: TopicPattern
    handler: Handler


class Dispatcher:
    """Handlers bound explicitly to topic patterns; one dispatcher serves many message types.

    >>> d = Dispatcher()
    >>> @d.on("notifications", "compute.instance.*.end")
    ... def instance_done(delivery): ...
    """

    def __init__(self) -> None:
        self._bindings: list[Binding] = []
        self._classes: dict[str, type[Message]] = {}
        # message type -> the exchanges its class decodes on (None: every exchange, for a
        # class registered without exchanges). A key allowed only on one exchange must not
        # get its messages decoded by a class another exchange's binding asked for.
        self._class_exchanges: dict[str, frozenset[str] | None] = {}
        # Rebuilt on bind (bindings are few and made at start-up); routing never fills a
        # per-key cache, so its cost and memory do not grow with the keys seen (issue 13).
        self._matcher: TopicMatcher[Handler] = TopicMatcher()

    def bind(
        self,
        exchange: str,
        pattern: str,
        handler: H,
        *,
        message_class: type[Message] | None = None,
    ) -> H:
        """Call ``handler(delivery)`` for messages on ``exchange`` whose key matches ``pattern``.

        With ``message_class``, messages of its type are decoded into it on ``exchange``
        (and on the exchanges of its other bindings) only: see :meth:`register`."""
        if not callable(handler):
            raise ConfigError(f"handler {handler!r} is not callable")
        binding = Binding(TopicPattern(exchange, pattern), handler)
        if message_class is not None:
            self.register(message_class, exchanges=[exchange])
        self._bindings.append(binding)
        self._matcher = TopicMatcher((b.pattern, b.handler) for b in self._bindings)
        return handler

    def on(
        self, exchange: str, pattern: str, *, message_class: type[Message] | None = None
    ) -> Callable[[H], H]:
        """Decorator form of :meth:`bind`."""

        def decorate(handler: H) -> H:
            return self.bind(exchange, pattern, handler, message_class=message_class)

        return decorate

    def register(self, message_class: type[Message], *,
                 exchanges: Iterable[str] | None = None) -> None:
        """Decode payloads of ``message_class.message_type`` into instances of it, on
        ``exchanges`` only (added to those it has); None: on every exchange.

        A message of that type on another exchange is rejected as ``type_not_allowed``
        (docs/SECURITY.md): the key that signed it may be one allowed on that exchange
        only, and the class's consumers trust its fields as the other exchange's."""
        if not (isinstance(message_class, type) and issubclass(message_class, Message)):
            raise ConfigError(f"{message_class!r} is not a zbus.Message subclass")
        mtype = getattr(message_class, "message_type", None)
        if mtype is None:
            raise ConfigError(f"{message_class.__name__} declares no message_type")
        known = self._classes.get(mtype)
        if known is not None and known is not message_class:
            raise ConfigError(
                f"message type {mtype!r} is already registered to {known.__name__}"
            )
        where = None if exchanges is None else frozenset(exchanges)
        if where is not None:
            for exchange in where:
                TopicPattern(exchange, "#")  # the exchange's name is checked here
        if known is not None:
            before = self._class_exchanges.get(mtype)
            where = None if before is None or where is None else before | where
        self._classes[mtype] = message_class
        self._class_exchanges[mtype] = where

    @property
    def patterns(self) -> list[TopicPattern]:
        seen: dict[TopicPattern, None] = {}
        for b in self._bindings:
            seen.setdefault(b.pattern, None)
        return list(seen)

    def route(self, exchange: str, routing_key: str) -> tuple[Handler, ...]:
        """The handlers bound to patterns matching the key, in binding order."""
        return self._matcher.match(exchange, routing_key)

    def decode(self, envelope: Envelope, exchange: str | None = None) -> Any:
        """The registered message class's instance for ``envelope`` (received on
        ``exchange``), or its raw payload when no class is registered for its type.

        Raises EnvelopeError (reason ``type_not_allowed``) when the type's class is
        registered for other exchanges only; ``exchange`` None skips that check (a caller
        decoding outside any exchange)."""
        cls = self._classes.get(envelope.message_type)
        if cls is None:
            return envelope.payload
        allowed = self._class_exchanges.get(envelope.message_type)
        if exchange is not None and allowed is not None and exchange not in allowed:
            raise EnvelopeError(
                f"message type {envelope.message_type!r} arrived on exchange {exchange!r}, "
                f"but {cls.__name__} is registered for {sorted(allowed)} only",
                reason="type_not_allowed",
            )
        if envelope.message_type_version > cls.version:
            raise VersionError(
                f"{envelope.message_type!r} version {envelope.message_type_version} is newer "
                f"than {cls.__name__}.version {cls.version}: upgrade this consumer"
            )
        try:
            return cls.from_payload(envelope.payload, envelope.message_type_version)
        except Exception as exc:
            raise EnvelopeError(
                f"{cls.__name__}.from_payload rejected the payload: {exc}", reason="bad_payload"
            ) from None


@dataclass
class ConsumerStats:
    """What a consumer saw. ``lost`` counts messages that never arrived: gaps in a stream
    (one publisher run's messages on one topic, numbered 1, 2, 3...), revealed by a later
    message of the same stream or by the stream's beacon.

    ``received`` counts messages read: every message of a verified envelope (an envelope may
    carry a batch of one stream's messages), and one for each 3-frame envelope rejected
    before its messages could be told apart. A message with another frame count is counted
    only as ``rejected["frame_count"]``, so ``received == delivered + unmatched +
    sum(rejected.values()) - rejected["frame_count"]`` once handlers have run. ``beacons``
    counts the streams' signed "sent up to N" announcements read (no message in them).
    """

    received: int = 0
    delivered: int = 0
    unmatched: int = 0
    handler_errors: int = 0
    lost: int = 0
    reordered: int = 0
    beacons: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    repair_requested: int = 0
    """Sequences found missing and asked for (each once), with repair on."""
    repaired: int = 0
    """Missing sequences that then arrived, by a repair or late (``lost`` went down again)."""
    unrepairable: int = 0
    """Missing sequences given up: older than the reliability interval, no longer kept by
    the publisher, or over ``max_held`` (each logged as DATALOSS)."""
    repair_duplicates: int = 0
    """Repairs of sequences already had (asked twice, or answered twice): dropped."""
    held: int = 0
    """Now: messages received and waiting behind a gap of their stream (handed on once it is
    repaired or given up). A consumer stopped meanwhile never delivers them."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "delivered": self.delivered,
            "unmatched": self.unmatched,
            "handler_errors": self.handler_errors,
            "lost": self.lost,
            "reordered": self.reordered,
            "beacons": self.beacons,
            "rejected": dict(self.rejected),
            "repair_requested": self.repair_requested,
            "repaired": self.repaired,
            "unrepairable": self.unrepairable,
            "repair_duplicates": self.repair_duplicates,
            "held": self.held,
        }



StreamKey = tuple[str, bytes]
"""(publisher_id, stream_id): one stream (docs/PROTOCOL.md, section 5)."""
STREAM_SPAN_LIMIT = 2**48
"""The most sequences a stream's books may span, lowest to highest: a million messages a
second for nine years. Only a stream whose numbers jump (a publisher that breaks the
protocol, or a key holder forging another's stream) goes beyond; its books are not
reported (``StreamTally.unreportable``), so they cannot get the rest of a report refused."""


class StreamTally:
    """A fast-pool member's books per stream: how many of its messages this member read,
    and the lowest and highest sequence it knows of (docs/RELIABILITY.md, "Fast pools: the
    receipts"). The members of a pool together receive every message of the pool's streams
    that was not lost, so the proxy, adding the members' tallies up, counts what was
    dropped before hand-out, where nothing else can.

    Each entry is ``[count, lowest, highest]``; a beacon (``first_sequence = n``, nothing
    read) raises ``highest`` to ``n - 1``, and on a stream this member has not read from it
    makes the empty range ``[0, n, n - 1]``: another member may hold the stream's messages,
    and the beacon still tells the proxy how far the stream went. Bounded: at most ``limit``
    streams, the least recently updated dropped (counted in :attr:`evicted`). Cumulative:
    :meth:`take` hands out the streams changed since it was last called.
    """

    __slots__ = ("_changed", "_streams", "evicted", "limit", "unreportable")

    def __init__(self, limit: int = 10_000) -> None:
        self.limit = limit
        self.evicted = 0
        self.unreportable = 0  # streams left out of a report: beyond STREAM_SPAN_LIMIT
        self._streams: OrderedDict[StreamKey, list[int]] = OrderedDict()
        self._changed: dict[StreamKey, list[int]] = {}

    def __len__(self) -> int:
        return len(self._streams)

    @property
    def changed(self) -> int:
        """Streams changed since they were last taken."""
        return len(self._changed)

    def add(self, publisher_id: str, stream: bytes, first: int, count: int) -> None:
        """``count`` messages read from ``first`` on (0: a beacon for ``first - 1``)."""
        key = (publisher_id, stream)
        streams = self._streams
        entry = streams.get(key)
        last = first + count - 1
        if entry is None:
            entry = streams[key] = [count, first, last]
            if len(streams) > self.limit:
                old, _ = streams.popitem(last=False)
                self._changed.pop(old, None)
                self.evicted += 1
        else:
            streams.move_to_end(key)
            entry[0] += count
            if count and first < entry[1]:
                entry[1] = first
            if last > entry[2]:
                entry[2] = last
        self._changed[key] = entry

    def uncount(self, publisher_id: str, stream: bytes) -> None:
        """One message counted by :meth:`add` was a replay: this member had it already."""
        entry = self._streams.get((publisher_id, stream))
        if entry is not None and entry[0]:
            entry[0] -= 1

    def take(self, most: int) -> list[list[Any]]:
        """Up to ``most`` changed streams as ``[publisher_id, stream_id, count, lowest,
        highest]``, no longer marked changed."""
        changed = self._changed
        out: list[list[Any]] = []
        for key in list(islice(changed, most)):
            count, lowest, highest = changed.pop(key)
            if highest - lowest + 1 > STREAM_SPAN_LIMIT:
                self.unreportable += 1
                continue
            out.append([key[0], key[1], count, lowest, highest])
        return out

    def mark_all(self) -> None:
        """Mark every stream changed: a restarted proxy has forgotten the books."""
        self._changed = dict(self._streams)

    def mark(self, entries: list[list[Any]]) -> None:
        """Mark the streams of ``entries`` changed again (their report was not sent)."""
        for entry in entries:
            key = (entry[0], entry[1])
            current = self._streams.get(key)
            if current is not None:
                self._changed[key] = current


class ConsumerCore:
    """The I/O-free heart of every subscriber and pool member, whatever the backend.

    Bytes in, deliveries out (as h11 does it): :meth:`feed` takes one received multipart
    message and appends its deliveries (several when its envelope carries a batch) to
    :attr:`ready`; :meth:`next_ready` takes them out. A backend empties :attr:`ready` before
    it reads its socket again, so deliveries keep their stream order. :meth:`accept` is
    both in one call, returning the first delivery.
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        keys: bytes | KeyRing | None,
        *,
        track_sequences: bool = True,
        replay: ReplayGuard | None = None,
        clock: Callable[[], float] = time.time,
        repair: RepairPolicy | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        # keys=None checks everything but the HMAC: for diagnostic taps, never for services.
        self.keys = None if keys is None else KeyRing.of(keys)
        self.stats = ConsumerStats()
        # Replay state is per consumer, never shared: one history shared by several
        # consumers raises false duplicates (jupyter_client #252).
        self._guard = replay if replay is not None else ReplayGuard()
        self._count_gaps = track_sequences
        self.ready: deque[Delivery] = deque()
        # 3-frame envelopes read, whatever became of them, and the frames of messages that
        # were not 3 frames long: what a fast-pool member reports (docs/RELIABILITY.md,
        # "Fast pools: the receipts"), counted in the proxy's units.
        self.envelopes = 0
        self.odd_frames = 0
        self.tally: StreamTally | None = None
        """Per-stream books, kept by fast-pool members only (set by the member)."""
        self._clock = clock
        self._warned: set[str] = set()
        self.book: GapBook | None = None
        """Open gaps and what waits behind them (zbus._repair), for a subscriber with
        repair on: its backend sends ``book.asks`` and feeds the answers back with
        ``feed(frames, repaired=True)``, and calls :meth:`tick` now and then."""
        if repair is not None and repair.on and track_sequences:
            self.book = GapBook(repair)

    def reject(self, reason: str, detail: str) -> None:
        self.stats.rejected[reason] += 1
        level = logging.DEBUG if reason in self._warned else logging.WARNING
        self._warned.add(reason)
        log.log(level, "zbus: rejected a message (%s): %s", reason, detail)

    def next_ready(self) -> Delivery | None:
        """The next delivery of a batch already accepted, or None."""
        return self.ready.popleft() if self.ready else None

    def accept(self, frames: list[bytes]) -> Delivery | None:
        """Verify, decode, account and route one received multipart message; return its
        first delivery (the rest of a batch wait in :attr:`ready`)."""
        self.feed(frames)
        return self.ready.popleft() if self.ready else None

    def tick(self) -> None:
        """Give up gaps past the reliability interval and ask again where due (a consumer
        with repair on calls this every ``RepairPolicy.retry`` seconds or so)."""
        book = self.book
        if book is not None and len(book):
            book.tick(self._clock())
            self._settle(book)

    def _settle(self, book: GapBook) -> None:
        """Take what the book handed on, in order, and its counters."""
        if book.out:
            self.ready.extend(book.out)
            book.out.clear()
        stats = self.stats
        stats.repair_requested = book.requested
        stats.repaired = book.repaired
        stats.unrepairable = book.unrepairable
        stats.repair_duplicates = book.duplicates
        stats.held = book.held

    def feed(self, frames: list[bytes], repaired: bool = False) -> None:
        """Verify, decode, account and route one received multipart message, appending its
        deliveries to :attr:`ready`. ``repaired``: the frames answer a repair request (a
        sequence already had is then a duplicate answer, dropped, not a replay)."""
        if len(frames) != 3:
            self.odd_frames += len(frames)
            if len(frames) == 1 and frames[0].startswith(CONTROL_PREFIX):
                return  # a one-frame readiness probe, seen by a catch-all subscription
            self.reject("frame_count", f"{len(frames)} frames, expected 3")
            return
        # A three-frame message is a user message whatever its topic: a forged one whose
        # topic starts with NUL is rejected and counted like any other forgery.
        topic, raw, signature = frames
        self.envelopes += 1
        stats = self.stats
        keys = self.keys
        try:
            if keys is not None:
                key_id = verify_frames(keys, topic, raw, signature)
            else:
                key_id = signature_key_id(signature)
            exchange, routing_key = decode_topic(topic)
            if keys is not None:  # a genuine signature, but by a key allowed here?
                keys.check_exchange(exchange, key_id)
            batch = decode_batch(raw)
            # ... and allowed to speak for this publisher? Before the replay guard sees the
            # stream. An unbound ring (the default) pays one truth test here.
            if keys is not None and keys._bound:
                keys.check_publisher(batch.publisher_id, key_id)
        except EnvelopeError as exc:
            stats.received += 1
            self.reject(exc.reason, str(exc))
            return
        publisher_id, stream, first, entries = batch
        guard = self._guard
        tally = self.tally
        if tally is not None:  # counted before judging: a rejected message was still had
            tally.add(publisher_id, stream, first, len(entries))
        book = self.book
        key = (publisher_id, stream)
        if not entries:
            stats.beacons += 1
            if self._count_gaps:
                gap = guard.observe_beacon(publisher_id, stream, first - 1)
                stats.lost += gap
                if gap and book is not None:  # a lost tail: ask for it
                    book.gap(key, first - gap, first - 1, self._clock())
                    self._settle(book)
            return
        stats.received += len(entries)
        handlers = self.dispatcher.route(exchange, routing_key)
        now = self._clock()
        open_stream = book is not None and book.is_open(key)
        if not open_stream and not repaired and self._in_order(
                guard, batch, now, skip=not self._count_gaps and book is None):
            # The usual case: the stream's next messages, fresh, nothing held: account the
            # whole batch at once and only build the deliveries.
            if not handlers:
                stats.unmatched += len(entries)
                if book is not None:
                    self._settle(book)
                return
            decode, ready, check = self.dispatcher.decode, self.ready.append, keys is not None
            for sequence, (timestamp, message_type, version, payload) in enumerate(entries,
                                                                                   first):
                envelope = Envelope(message_id(stream, sequence), publisher_id, sequence,
                                    float(timestamp), message_type, version, payload)
                try:
                    ready(Delivery(exchange, routing_key, envelope, key_id,
                                   decode(envelope, exchange), handlers, check))
                except EnvelopeError as exc:
                    self.reject(exc.reason, str(exc))
            if book is not None:
                self._settle(book)
            return
        for sequence, (timestamp, message_type, version, payload) in enumerate(entries, first):
            # Account the sequence before the payload is judged: a verified message rejected
            # for its type version or payload did arrive, and must not also count as lost.
            wanted = open_stream and book is not None and book.wants(key, sequence)
            try:
                guard.check_time(timestamp, now)
                try:
                    missing, late = guard.observe(publisher_id, stream, sequence)
                except ReplayError:
                    if not wanted:
                        raise
                    # Missing by the book, but beyond the guard's sequence window (shorter
                    # than the interval): the guard counted it lost when it passed.
                    missing, late = -1, True
            except ReplayError as exc:
                if repaired and exc.reason == "replay":
                    if book is not None:
                        book.duplicates += 1  # asked or answered twice: not an attack
                    continue
                self.reject(exc.reason, str(exc))
                if tally is not None and exc.reason == "replay":
                    tally.uncount(publisher_id, stream)  # a second copy, not a second message
                continue
            if self._count_gaps:  # a pool member sees a share of each stream: gaps mean nothing
                stats.lost += missing
                stats.reordered += late
            if book is not None and missing > 0 and not late:  # a gap ahead: ask for it
                book.gap(key, sequence - missing, sequence - 1, now)
                open_stream = True
            item: Delivery | None = None
            if not handlers:
                stats.unmatched += 1
            else:
                envelope = Envelope(message_id(stream, sequence), publisher_id, sequence,
                                    float(timestamp), message_type, version, payload)
                try:
                    message = self.dispatcher.decode(envelope, exchange)
                    item = Delivery(exchange, routing_key, envelope, key_id, message,
                                    handlers, keys is not None)
                except EnvelopeError as exc:
                    self.reject(exc.reason, str(exc))
            if open_stream and book is not None:
                # Held behind the stream's gap until it is repaired or given up: handlers
                # see each stream in order.
                book.arrived(key, sequence, item, now)
                open_stream = book.is_open(key)
            elif item is not None:
                self.ready.append(item)
        if book is not None:
            self._settle(book)

    @staticmethod
    def _in_order(guard: ReplayGuard, batch: Batch, now: float, skip: bool) -> bool:
        """Every message of ``batch`` fresh, and the batch next in its known stream (or, with
        ``skip``, anywhere ahead: a pool member's share): then recorded at once
        (ReplayGuard.observe_run)."""
        entries = batch.entries
        if guard.max_age is not None:
            oldest, newest = now - guard.max_age, now + guard.max_skew
            for entry in entries:
                if not oldest <= entry[0] <= newest:
                    return False
        return guard.observe_run(batch.publisher_id, batch.stream_id, batch.first_sequence,
                                 len(entries), skip)

    def run_handlers(self, delivery: Delivery) -> None:
        """Call each handler in turn; one that raises is logged and counted, never fatal."""
        for handler in delivery.handlers:
            try:
                handler(delivery)
            except Exception:
                self.handler_failed(handler, delivery)
        self.stats.delivered += 1

    def handler_failed(self, handler: Handler, delivery: Delivery) -> None:
        self.stats.handler_errors += 1
        log.exception(
            "zbus: handler %r raised on %s/%s (message %s from %s)",
            handler,
            delivery.exchange,
            delivery.routing_key,
            delivery.envelope.message_id.hex(),
            delivery.publisher_id,
        )

    def prefixes(self) -> list[bytes]:
        """The ZeroMQ subscriptions that cover every bound pattern."""
        return minimal_prefixes(self.dispatcher.patterns)
