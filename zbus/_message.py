"""Typed messages and the factory that turns them into signed frames (no I/O)."""

from __future__ import annotations

import os
import struct
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NamedTuple

import msgpack

from ._envelope import ENVELOPE_FORMAT, SIGNATURE_SCHEME, STREAM_ID_BYTES, mac
from ._errors import ConfigError
from ._keys import KeyRing
from ._names import topic_frame, validate_routing_key

__all__ = ["Message", "MessageFactory", "OpenBatch", "OutgoingMessage"]


class Message:
    """Base class of typed messages.

    A subclass declares ``message_type`` (a dotted name, usually also its routing key) and
    ``version`` (an integer, raised when the payload changes incompatibly), and converts
    itself to a payload with ``__json__`` and back with ``from_payload``. The defaults carry
    the instance ``__dict__`` and rebuild with ``cls(**payload)``, which suits dataclasses.
    """

    message_type: ClassVar[str]
    version: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "message_type" in cls.__dict__:
            validate_routing_key(cls.message_type)
        if not isinstance(cls.version, int) or isinstance(cls.version, bool) or cls.version < 0:
            raise ConfigError(f"{cls.__name__}.version must be a non-negative int")

    def __json__(self) -> Any:
        """The payload: any msgpack value (dicts, lists, str, bytes, numbers, None, bool)."""
        return dict(vars(self))

    @classmethod
    def from_payload(cls, payload: Any, version: int) -> Message:
        """Rebuild a message from a payload sent under ``version`` (<= ``cls.version``).

        Override to upgrade older versions' payloads.
        """
        if not isinstance(payload, dict):
            raise TypeError(f"{cls.__name__} payload must be a map, got {type(payload).__name__}")
        return cls(**payload)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and vars(other) == vars(self)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class OutgoingMessage(NamedTuple):
    """A message made by :meth:`MessageFactory.create_message`, not yet signed: ``body``
    (a :class:`Message` or a plain payload) and the ``factory`` that signs it when an
    exchange, publisher or router sends it. Signing waits for the send because the signature
    covers the topic (exchange and routing key) and the number is the topic's next."""

    factory: MessageFactory
    body: Message | Any
    message_type: str | None = None
    version: int | None = None


def signing(factory: MessageFactory, obj: Message | Any
            ) -> tuple[MessageFactory, Message | Any, str | None, int | None]:
    """(the factory that signs, the body, its message type, its version) of ``obj`` sent
    with ``factory``: a message from ``create_message`` names its own factory and type."""
    if isinstance(obj, OutgoingMessage):
        return obj.factory, obj.body, obj.message_type, obj.version
    return factory, obj, None, None


_factories: weakref.WeakSet[MessageFactory] = weakref.WeakSet()


def _new_runs_after_fork() -> None:
    # A forked child must not reuse its parent's stream ids, or message ids would repeat.
    for factory in list(_factories):
        factory._new_run()


os.register_at_fork(after_in_child=_new_runs_after_fork)


class _Stream:
    """One topic's stream of a factory run: its random id and its numbering."""

    __slots__ = ("exchange", "next", "sent_at", "stream_id", "topic")

    def __init__(self, exchange: str, topic: bytes) -> None:
        self.stream_id = os.urandom(STREAM_ID_BYTES)
        self.exchange = exchange
        self.topic = topic
        self.next = 1  # the sequence the next message takes
        self.sent_at = 0.0  # the clock when a message last took a number


_NOTHING_SEALED: tuple[_Stream | None, int] = (None, 0)
_U16 = struct.Struct(">BH")
_U32 = struct.Struct(">BI")


def _array_header(n: int) -> bytes:
    """msgpack's header of an array of ``n`` elements (what packb writes before them)."""
    if n < 16:
        return bytes((0x90 | n,))
    if n < 1 << 16:
        return _U16.pack(0xDC, n)
    return _U32.pack(0xDD, n)


class OpenBatch:
    """Messages of one stream, numbered and packed, not yet signed: what a connection
    gathers while its publisher is busy (smart batching), then seals as one envelope.

    Each message is packed on its own when added (a payload that cannot be packed fails
    there, for its own caller, and takes no number); sealing joins them under one array
    header, which is the same bytes msgpack would write for the whole list, and signs once.
    Sealing reads nothing that adding changes, so another thread may seal what this one
    gathered (under the connection's lock)."""

    __slots__ = ("factory", "first", "head", "key", "parts", "prefix", "routing_key", "size",
                 "stream", "topic")

    def __init__(self, factory: MessageFactory, stream: _Stream, routing_key: str,
                 head: bytes, key: bytes) -> None:
        self.factory = factory
        self.stream = stream
        self.routing_key = routing_key
        self.topic = stream.topic
        self.first = stream.next
        self.head, self.key = head, key
        self.prefix = factory._packb(ENVELOPE_FORMAT) + factory._packb(factory.publisher_id) \
            + factory._packb(stream.stream_id) + factory._packb(self.first)
        self.parts: list[bytes] = []
        self.size = 1 + len(self.prefix) + 5  # the envelope frame's, at most: array
        # headers included, topic and signature frames not (a limit applies to each frame)

    def __len__(self) -> int:
        return len(self.parts)

    def of(self, factory: MessageFactory, exchange: str, routing_key: str) -> bool:
        """Whether a message of ``factory`` to ``exchange``/``routing_key`` belongs here."""
        return (self.factory is factory and self.routing_key == routing_key
                and self.stream.exchange == exchange)

    def add(self, packed: bytes) -> None:
        """Number one message packed by :meth:`MessageFactory.pack` as the stream's next
        (only now: a payload that fails to pack leaves no gap)."""
        stream = self.stream
        stream.next += 1
        stream.sent_at = self.factory._clock()
        factory = self.factory
        factory._last_sealed = _NOTHING_SEALED  # withdraw() is for frames(); see give_back
        factory._unannounced[self.topic] = None
        self.parts.append(packed)
        self.size += len(packed)

    def seal(self) -> list[bytes]:
        """The three signed frames of every message added, in order."""
        envelope = b"".join((b"\x95", self.prefix, _array_header(len(self.parts)), *self.parts))
        return [self.topic, envelope, self.head + mac(self.key, self.topic, envelope)]

    def drop_last(self) -> None:
        """Take the last message added out again, giving its number back if nothing took
        one after it (for a message whose sender was told it was not sent)."""
        packed = self.parts.pop()
        self.size -= len(packed)
        stream = self.stream
        if stream.next == self.first + len(self.parts) + 1 and self.factory._streams.get(
                self.topic) is stream:
            stream.next -= 1


class MessageFactory:
    """Creates signed messages for one publisher.

    ``publisher_id`` names the publishing service (e.g. ``"ceilometer.host1"``). A factory
    numbers each topic (exchange and routing key) it publishes on as its own *stream*: a
    random 8-byte stream id, chosen afresh for each factory and in a child after ``fork``,
    and sequences 1, 2, 3... ``message_id`` is stream id + sequence, unique without a uuid4
    per message. Consumers count gaps per stream, which is what they can check whatever
    topics they filter (docs/PROTOCOL.md).

    A factory's streams must leave in order: use one factory per sending thread, greenlet or
    task.

    If the ring binds a key to publisher ids (``KeyRing(publishers=...)``), the factory
    refuses to sign for a ``publisher_id`` that key may not claim, with :class:`ConfigError`:
    for the active key at construction and on :meth:`rekey`; for an exchange's own key
    (``KeyRing(exchanges=...)``) at the first message to that exchange, before a sequence
    number is used. Consumers would reject those messages as ``publisher_not_allowed``.

    Memory: one small record per topic the factory has published on (about 150 bytes).
    """

    _last_sealed: tuple[_Stream | None, int]  # the stream and first number of the last frames

    def __init__(
        self,
        signing_key: bytes | KeyRing,
        publisher_id: str,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(publisher_id, str) or not publisher_id or len(publisher_id) > 255:
            raise ConfigError("publisher_id must be a non-empty string of at most 255 characters")
        self.publisher_id = publisher_id
        self._clock = clock
        self.rekey(signing_key)
        self._packb = msgpack.Packer(use_bin_type=True).pack
        self._new_run()
        _factories.add(self)

    def rekey(self, signing_key: bytes | KeyRing) -> None:
        """Sign from now on with ``signing_key`` (rotation): the streams and their sequence
        numbers go on unchanged, so consumers see no gap.

        Raises :class:`ConfigError`, keeping the current keys, if the new ring's active key is
        bound to publisher ids that do not include this factory's ``publisher_id``."""
        keys = KeyRing.of(signing_key)
        self._check_binding(keys, keys.active_id, "the active key")
        self.keys = keys
        # exchange -> (signature head, key): the per-message cost stays one dict lookup.
        self._signers: dict[str, tuple[bytes, bytes]] = {}

    def _check_binding(self, keys: KeyRing, key_id: str, role: str) -> None:
        if not keys.permits_publisher(self.publisher_id, key_id):
            raise ConfigError(
                f"publisher id {self.publisher_id!r} may not be signed for with key id "
                f"{key_id!r} ({role}), which the key ring binds to publisher ids "
                f"{keys.publishers[key_id]}: use a key bound to this publisher id, or a "
                "publisher id that key may sign for (consumers would reject every message "
                "as publisher_not_allowed)"
            )

    def _signer(self, exchange: str) -> tuple[bytes, bytes]:
        key_id, key = self.keys.signing_key_for(exchange)
        self._check_binding(self.keys, key_id, f"the signing key of exchange {exchange!r}")
        kid = key_id.encode("ascii")
        if len(self._signers) >= 1024:  # exchanges come from the caller; bound it anyway
            self._signers.clear()
        signer = self._signers[exchange] = (bytes((SIGNATURE_SCHEME, len(kid))) + kid, key)
        return signer

    def withdraw(self) -> None:
        """Give back the numbers the last frames made took, if nothing took a number after
        them: for a sender whose send failed (``Timeout``, an interrupt), so that a message
        never sent is not counted lost by consumers. Frames sent later, after all, would be
        rejected as replays of the numbers reused; so call it only for frames never sent."""
        sealed, first = self._last_sealed
        self._last_sealed = _NOTHING_SEALED
        if sealed is not None and self._streams.get(sealed.topic) is sealed:
            sealed.next = first  # else: nothing sealed since, or a run from before a fork

    def _new_run(self) -> None:
        self._last_sealed = _NOTHING_SEALED
        self._streams: dict[bytes, _Stream] = {}
        # Topics that took a number since their last beacon (a dict as an ordered set).
        self._unannounced: dict[bytes, None] = {}

    def stream(self, exchange: str, routing_key: str) -> tuple[bytes, int]:
        """(stream id, next sequence) of the stream ``exchange``/``routing_key``."""
        stream = self._streams.get(topic_frame(exchange, routing_key))
        return (b"", 1) if stream is None else (stream.stream_id, stream.next)

    def _entry(self, routing_key: str, obj: Message | Any, message_type: str | None,
               version: int | None, now: float) -> list[Any]:
        if isinstance(obj, Message):
            mtype = getattr(obj, "message_type", None)
            if mtype is None:
                raise ConfigError(f"{type(obj).__name__} declares no message_type")
            return [now, mtype, obj.version, obj.__json__()]
        mtype = routing_key if message_type is None else validate_routing_key(message_type)
        mversion = 1 if version is None else version
        if type(mversion) is not int or mversion < 0:
            # Consumers reject anything else; fail here, where the caller can fix it.
            raise ConfigError(f"version must be a non-negative int, not {mversion!r}")
        return [now, mtype, mversion, obj]

    def create_message(self, obj: Message | Any, *, message_type: str | None = None,
                       version: int | None = None) -> OutgoingMessage:
        """``obj`` ready for ``Exchange.send(routing_key, message)``, which signs it with this
        factory (the straw man's ``mf.create_message(obj)``; docs/GUIDE.md). A plain
        payload's type is ``message_type``, else the routing key it is sent under."""
        if isinstance(obj, Message):
            if getattr(obj, "message_type", None) is None:
                raise ConfigError(f"{type(obj).__name__} declares no message_type")
        elif message_type is not None:
            validate_routing_key(message_type)
        return OutgoingMessage(self, obj, message_type, version)

    def frames(
        self,
        exchange: str,
        routing_key: str,
        obj: Message | Any,
        *,
        message_type: str | None = None,
        version: int | None = None,
    ) -> list[bytes]:
        """The three signed frames of ``obj`` published under ``exchange``/``routing_key``.

        ``obj`` is a :class:`Message` or a plain payload; a plain payload's message type is
        ``message_type`` or else the routing key, and its version ``version`` or else 1.
        """
        now = float(self._clock())  # always a msgpack float 64 (PROTOCOL.md)
        return self._seal(exchange, routing_key,
                          [self._entry(routing_key, obj, message_type, version, now)], now)

    def batch(
        self,
        exchange: str,
        routing_key: str,
        objs: list[Message | Any],
        *,
        message_type: str | None = None,
        version: int | None = None,
    ) -> list[bytes]:
        """The three signed frames of one envelope carrying every one of ``objs``, in order,
        as consecutive messages of the stream ``exchange``/``routing_key``: one signature
        and one frame set for all of them. Consumers deliver them one by one."""
        if not objs:
            raise ConfigError("a batch needs at least one message")
        now = float(self._clock())
        entries = [self._entry(routing_key, obj, message_type, version, now) for obj in objs]
        return self._seal(exchange, routing_key, entries, now)

    def open_batch(self, exchange: str, routing_key: str) -> OpenBatch:
        r"""An empty batch of the stream ``exchange``/``routing_key`` starting at its next
        number; add messages :meth:`pack`\ ed for it, then ``seal()`` it (smart batching)."""
        topic = topic_frame(exchange, routing_key)
        head, key = self._signers.get(exchange) or self._signer(exchange)
        stream = self._streams.get(topic)
        if stream is None:
            stream = self._streams[topic] = _Stream(exchange, topic)
        return OpenBatch(self, stream, routing_key, head, key)

    def pack(self, routing_key: str, obj: Message | Any, *, message_type: str | None = None,
             version: int | None = None) -> bytes:
        """``obj`` as one packed message of a batch (:meth:`OpenBatch.add` numbers it)."""
        entry = self._entry(routing_key, obj, message_type, version, float(self._clock()))
        try:
            packed: bytes = self._packb(entry)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ConfigError(
                f"payload of {entry[1]!r} cannot be packed as msgpack ({exc}); make "
                "__json__ return dicts, lists, strings, bytes, numbers, booleans or None"
            ) from None
        return packed

    def _seal(self, exchange: str, routing_key: str, entries: list[list[Any]],
              now: float) -> list[bytes]:
        topic = topic_frame(exchange, routing_key)
        # The signer first: a key that may not sign here must fail before a sequence is used.
        head, key = self._signers.get(exchange) or self._signer(exchange)
        stream = self._streams.get(topic)
        if stream is None:
            stream = self._streams[topic] = _Stream(exchange, topic)
        first = stream.next
        try:
            envelope = self._packb(
                [ENVELOPE_FORMAT, self.publisher_id, stream.stream_id, first, entries]
            )
        except (TypeError, ValueError, OverflowError) as exc:
            raise ConfigError(
                f"payload of {entries[0][1]!r} cannot be packed as msgpack ({exc}); make "
                "__json__ return dicts, lists, strings, bytes, numbers, booleans or None"
            ) from None
        stream.next = first + len(entries)  # only now: a payload that fails leaves no gap
        stream.sent_at = now
        self._last_sealed = (stream, first)
        self._unannounced[topic] = None
        return [topic, envelope, head + mac(key, topic, envelope)]

    def beacons(self, idle: float = 0.0, now: float | None = None) -> list[list[bytes]]:
        """Signed beacons ("this stream sent up to N") for every stream that took a number
        since its last beacon and has been idle ``idle`` seconds or more (by the factory's
        clock): send them behind the messages, so that a consumer that lost a stream's tail
        learns it (docs/RELIABILITY.md, "Beacons"). Each stream is announced once per idle
        spell; 0 announces every stream with news."""
        if not self._unannounced:
            return []
        now = float(self._clock()) if now is None else now
        out: list[list[bytes]] = []
        for topic in list(self._unannounced):
            stream = self._streams[topic]
            if now - stream.sent_at < idle:
                continue
            del self._unannounced[topic]
            out.append(self._beacon(stream))
        return out

    def tail_beacons(self, idle: float, within: float) -> list[list[bytes]]:
        """The beacon of every stream idle for ``idle`` seconds that sent within the last
        ``within`` (news or not): what a keeper repeats while a stream's messages can still
        be repaired, so that a lost tail shows even if the first beacon was lost too."""
        now = float(self._clock())
        return [self._beacon(stream) for stream in list(self._streams.values())
                if idle <= now - stream.sent_at <= within]

    def final_beacons(self) -> list[list[bytes]]:
        """The beacon of every stream of this run, news or not: what a closing connection
        leaves with its proxy to publish again after it is gone."""
        return [self._beacon(stream) for stream in self._streams.values()]

    def _beacon(self, stream: _Stream) -> list[bytes]:
        head, key = self._signers.get(stream.exchange) or self._signer(stream.exchange)
        envelope = self._packb(
            [ENVELOPE_FORMAT, self.publisher_id, stream.stream_id, stream.next, []]
        )
        return [stream.topic, envelope, head + mac(key, stream.topic, envelope)]

    def __repr__(self) -> str:
        return f"MessageFactory(publisher_id={self.publisher_id!r}, keys={self.keys!r})"


BEACON_IDLE = 1.0
"""Seconds a stream must have been idle before its beacon goes out (docs/RELIABILITY.md)."""


class Announcer:
    """The factories one connection has published for, and their streams' beacons when due
    (no I/O, no clock: ``now`` is a monotonic time passed in).

    A connection calls :meth:`after` for each message it sends and sends what it returns,
    :meth:`all` when it flushes, and leaves :meth:`final` with the proxy when it closes.
    """

    MAX_FACTORIES = 64

    def __init__(self) -> None:
        self._factories: dict[int, MessageFactory] = {}
        self._last: MessageFactory | None = None
        self._next = 0.0

    def after(self, factory: MessageFactory, now: float) -> Sequence[list[bytes]]:
        """The beacons to send after a message of ``factory`` (usually none): those of the
        streams idle for ``BEACON_IDLE``, looked for at most every ``BEACON_IDLE / 2``
        seconds, and those of a factory forgotten to stay bounded (its last word here)."""
        out: Sequence[list[bytes]] = ()
        if factory is not self._last:
            self._last = factory
            if id(factory) not in self._factories:
                self._factories[id(factory)] = factory
                if len(self._factories) > self.MAX_FACTORIES:
                    out = self._factories.pop(next(iter(self._factories))).beacons()
        if now >= self._next:
            self._next = now + BEACON_IDLE / 2
            out = [*out, *(b for f in self._factories.values() for b in f.beacons(BEACON_IDLE))]
        return out

    def all(self) -> list[list[bytes]]:
        return [b for f in self._factories.values() for b in f.beacons()]

    def factories(self) -> list[MessageFactory]:
        """The factories now (a copy: another thread may call this while one sends)."""
        return list(self._factories.values())

    def final(self) -> list[list[bytes]]:
        return [b for f in self._factories.values() for b in f.final_beacons()]
