"""Repair within a reliability interval, with no I/O and no clock (docs/RELIABILITY.md,
"Repair").

Two halves of one promise, as TIBCO Rendezvous's reliability interval and PGM make it:
every subscriber gets each message of a stream, from the first transmission or a repair,
or learns (counted, logged) that it cannot.

* :class:`Retention`, on the publishing side: the signed frames a connection sent, kept
  for ``RepairPolicy.interval`` seconds and at most ``retain_bytes``, found again by stream
  and sequence. The frames are the ones already made for sending: a repair is verified by
  the consumer like the first copy (same MAC), so a repair plane needs no trust of its own.
* :class:`GapBook`, on the consuming side: for each stream with a gap, the sequences still
  missing (each with the time it was found missing), the messages that arrived behind the
  gap, held back so that handlers see the stream in order, and the requests to send. A gap
  is asked for at once, again every ``retry`` seconds, and given up after ``interval``
  (``unrepairable``); held messages are then handed on.

The wire between them (the proxy's ``repair.sock``) is in docs/PROTOCOL.md, section 11.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgpack

from ._errors import ConfigError

__all__ = ["Ask", "GapBook", "RepairPolicy", "Retention", "envelope_head"]

log = logging.getLogger("zbus")

MAX_RANGES = 64
"""Most sequence ranges one request names (the rest wait for the next request)."""
MAX_ASK_SEQUENCES = 100_000
"""Most sequences one request asks for (a reply is sent in parts of MAX_GIVE_BATCHES)."""
GONE_GRACE = 1.0
"""Seconds a gap nobody keeps any more stays open, for messages still on their way."""
MAX_GIVE_BATCHES = 256
"""Most retained envelopes (frame triples) in one reply message."""


@dataclass(frozen=True, slots=True)
class RepairPolicy:
    """How long gaps are repairable, and the memory that costs (docs/RELIABILITY.md).

    ``interval``: seconds within which a gap is repaired (a publisher keeps what it sent
    that long; a subscriber asks that long, then counts the gap ``unrepairable``); 0 turns
    repair off. ``retain_bytes``: most bytes of frames a publishing connection keeps (the
    oldest go first: a gap older than what is kept is unrepairable). ``max_held``: most
    messages a subscriber holds behind its gaps to hand them on in order (beyond, the oldest
    gap is given up). ``retry``: seconds before a request with no answer is sent again.
    """

    interval: float = 10.0
    retain_bytes: int = 64 << 20
    max_held: int = 100_000
    retry: float = 0.5

    def __post_init__(self) -> None:
        if not self.interval >= 0:
            raise ConfigError("RepairPolicy.interval must be >= 0 seconds (0: off)")
        if self.retain_bytes < 0 or self.max_held < 1:
            raise ConfigError("RepairPolicy.retain_bytes must be >= 0, max_held >= 1")
        if not self.retry > 0:
            raise ConfigError("RepairPolicy.retry must be > 0 seconds")

    @property
    def on(self) -> bool:
        return self.interval > 0


def envelope_head(envelope: bytes) -> tuple[bytes, int, int]:
    """(stream id, first sequence, message count) of a signed envelope made here; cheap:
    the messages themselves are skipped, not decoded."""
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(envelope)
    unpacker.read_array_header()
    unpacker.skip()  # format
    unpacker.skip()  # publisher id
    stream: bytes = unpacker.unpack()
    first: int = unpacker.unpack()
    return stream, first, unpacker.read_array_header()


class Retention:
    """What one publishing connection sent, kept for repair.

    Built for the sender's sake: :meth:`keep` (the sending thread) appends one tuple to a
    deque and notes the stream, about half a microsecond; nothing is indexed per message.
    The thread that answers requests calls :meth:`expire` (dropping the oldest, once each)
    and :meth:`find`, which scans what is kept: a request is rare (a gap), a message is not.
    Each counter has one writer (the sender: ``added_bytes``, ``streams``; the answering
    thread: ``dropped_bytes``), so no lock is needed under the GIL."""

    def __init__(self, policy: RepairPolicy) -> None:
        self.policy = policy
        self.entries: deque[tuple[float, bytes, int, int, list[bytes], int]] = deque()
        """(time sent, stream id, first, count, frames, bytes), oldest first."""
        self.streams: dict[bytes, float] = {}
        """Stream id -> when it last sent (streams offered on the repair plane)."""
        self.new_streams: list[bytes] = []
        self.added_bytes = 0
        self.dropped_bytes = 0
        self.evicted = 0  # envelopes dropped before their interval ended (over retain_bytes)

    @property
    def size(self) -> int:
        """Bytes of frames kept now."""
        return self.added_bytes - self.dropped_bytes

    def keep(self, now: float, stream: bytes, first: int, count: int,
             frames: list[bytes]) -> None:
        """From the sending thread: one envelope just sent."""
        size = len(frames[0]) + len(frames[1]) + len(frames[2])
        self.entries.append((now, stream, first, count, frames, size))
        self.added_bytes += size
        if stream not in self.streams:
            self.new_streams.append(stream)
        self.streams[stream] = now

    def expire(self, now: float) -> None:
        limit, horizon = self.policy.retain_bytes, now - self.policy.interval
        entries = self.entries
        while entries and (entries[0][0] < horizon
                           or self.added_bytes - self.dropped_bytes > limit):
            sent, *_, size = entries.popleft()
            if sent >= horizon:
                self.evicted += 1
            self.dropped_bytes += size
        for stream, last in list(self.streams.items()):
            if last < horizon:
                self.streams.pop(stream, None)

    def find(self, stream: bytes, ranges: Iterable[tuple[int, int]],
             max_bytes: int | None = None) -> tuple[list[list[bytes]], list[list[int]]]:
        """The kept envelopes that hold any sequence of ``ranges`` (each once, in order), and
        the ranges no longer kept (or kept in an envelope with a frame over ``max_bytes``,
        which the asker could not take)."""
        wanted = sorted((lo, hi) for lo, hi in ranges)
        found: dict[int, tuple[int, list[bytes]]] = {}
        for _, kept_stream, first, count, frames, _ in list(self.entries):
            if kept_stream != stream:
                continue
            last = first + count - 1
            if any(first <= hi and last >= lo for lo, hi in wanted):
                found[first] = (count, frames)
        out: list[list[bytes]] = []
        have: list[tuple[int, int]] = []
        for first in sorted(found):
            count, frames = found[first]
            if max_bytes is not None and any(len(frame) > max_bytes for frame in frames):
                continue
            out.append(frames)
            have.append((first, first + count - 1))
        gone: list[list[int]] = []
        for lo, hi in wanted:
            at = lo
            for first, last in have:
                if last < at or first > hi:
                    continue
                if first > at:
                    gone.append([at, first - 1])
                at = max(at, last + 1)
            if at <= hi:
                gone.append([at, hi])
        return out, gone


@dataclass(slots=True)
class Ask:
    """A request for the missing sequences of one stream."""

    publisher_id: str
    stream: bytes
    ranges: list[list[int]]

    def encode(self, ask_id: int, max_bytes: int) -> bytes:
        """``max_bytes``: the asker's largest frame (its ``max_message_bytes``): an envelope
        with a larger frame would end its connection, so it is answered as not kept."""
        return bytes(msgpack.packb([ask_id, self.publisher_id, self.stream, self.ranges,
                                    max_bytes]))

    @staticmethod
    def decode(body: bytes) -> tuple[int, str, bytes, list[list[int]], int]:
        """(ask_id, publisher_id, stream, ranges, max_bytes); raises ValueError on anything
        but a well-formed, bounded request."""
        try:
            fields = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)
        except Exception as exc:
            raise ValueError(f"not msgpack: {exc}") from None
        if type(fields) is not list or len(fields) != 5:
            raise ValueError("a request is [ask_id, publisher_id, stream, ranges, max_bytes]")
        ask_id, publisher_id, stream, ranges, max_bytes = fields
        if type(max_bytes) is not int or not 0 < max_bytes < 2**63:
            raise ValueError("max_bytes must be a positive integer")
        if type(ask_id) is not int or not 0 <= ask_id < 2**63:
            raise ValueError("ask_id must be an integer from 0 to 2^63-1")
        if type(publisher_id) is not str or not 0 < len(publisher_id) <= 255:
            raise ValueError("publisher_id must be 1 to 255 characters")
        if type(stream) is not bytes or len(stream) != 8:
            raise ValueError("stream must be 8 bytes")
        if type(ranges) is not list or not 0 < len(ranges) <= MAX_RANGES:
            raise ValueError(f"ranges must be a list of 1 to {MAX_RANGES} [first, last] pairs")
        total = 0
        for pair in ranges:
            if (type(pair) is not list or len(pair) != 2 or type(pair[0]) is not int
                    or type(pair[1]) is not int or not 1 <= pair[0] <= pair[1] < 2**64):
                raise ValueError("each range must be [first, last] with 1 <= first <= last")
            total += pair[1] - pair[0] + 1
        if total > MAX_ASK_SEQUENCES:
            raise ValueError(f"a request asks for at most {MAX_ASK_SEQUENCES} sequences")
        return ask_id, publisher_id, stream, ranges, max_bytes


class _Open:
    """One stream's gaps and what waits behind them."""

    __slots__ = ("asked_at", "held", "missing", "next", "publisher_id", "stream", "top")

    def __init__(self, publisher_id: str, stream: bytes, next_sequence: int) -> None:
        self.publisher_id = publisher_id
        self.stream = stream
        self.next = next_sequence  # every sequence below is handed on or given up
        self.top = next_sequence - 1  # the highest sequence known (arrived or missing)
        self.missing: list[list[float]] = []  # [first, last, found at], sorted, disjoint
        self.held: dict[int, Any] = {}
        self.asked_at = float("-inf")

    def is_missing(self, sequence: int) -> bool:
        return any(lo <= sequence <= hi for lo, hi, _ in self.missing)

    def remove(self, sequence: int) -> float | None:
        """Take ``sequence`` out of the missing ones; when it was found missing (None: it
        was not missing)."""
        for lo, hi, found in self.missing:
            if lo <= sequence <= hi:
                self.cut(sequence, sequence)
                return found
        return None

    def cut(self, first: int, last: int) -> int:
        """Take ``first..last`` out of the missing ones; how many were missing."""
        kept: list[list[float]] = []
        taken = 0
        for lo, hi, found in self.missing:
            if hi < first or lo > last:
                kept.append([lo, hi, found])
                continue
            taken += int(min(hi, last) - max(lo, first) + 1)
            if lo < first:
                kept.append([lo, first - 1, found])
            if hi > last:
                kept.append([last + 1, hi, found])
        self.missing = kept
        return taken


_ABSENT = object()


class GapBook:
    """A subscriber's open gaps (see the module docstring); fed by :class:`ConsumerCore`.

    Counters: ``requested`` (sequences asked for, once each), ``repaired`` (missing ones
    that then arrived), ``unrepairable`` (given up: older than the interval, over
    ``max_held``, or no longer kept by the publisher), ``duplicates`` (repairs of
    sequences already had: dropped silently, never counted as replays).
    """

    def __init__(self, policy: RepairPolicy) -> None:
        self.policy = policy
        self._open: dict[tuple[str, bytes], _Open] = {}
        self.held = 0
        self.asks: list[Ask] = []
        self.requested = 0
        self.repaired = 0
        self.unrepairable = 0
        self.duplicates = 0
        self.latencies: deque[float] = deque(maxlen=10_000)
        """Seconds from a gap found to each of its messages arriving (the latest 10,000)."""
        self.out: list[Any] = []
        """Deliveries handed on, in stream order, for the consumer to take."""

    def __len__(self) -> int:
        return len(self._open)

    def is_open(self, key: tuple[str, bytes]) -> bool:
        return key in self._open

    def wants(self, key: tuple[str, bytes], sequence: int) -> bool:
        """Is ``sequence`` a missing one of an open gap (so a repair of it is welcome)?"""
        state = self._open.get(key)
        return state is not None and state.is_missing(sequence)

    def gap(self, key: tuple[str, bytes], first: int, last: int, now: float) -> None:
        """Sequences ``first..last`` were found missing (a later message or a beacon)."""
        state = self._open.get(key)
        if state is None:
            state = self._open[key] = _Open(key[0], key[1], first)
        if last <= state.top:
            return
        first = max(first, state.top + 1)
        state.missing.append([first, last, now])
        state.top = last
        self.requested += last - first + 1
        self._ask(state, now)

    def arrived(self, key: tuple[str, bytes], sequence: int, item: Any, now: float) -> None:
        """A message of an open stream arrived (``item``: its delivery, or None when it
        delivers nothing): hold it, and hand on whatever is now in order."""
        state = self._open[key]
        found = state.remove(sequence)
        if found is not None:
            self.repaired += 1
            self.latencies.append(now - found)
        if sequence < state.next:
            # Given up already (and counted): it still goes to the handlers, late.
            if item is not None:
                self.out.append(item)
            return
        state.held[sequence] = item
        state.top = max(state.top, sequence)
        self.held += 1
        self._release(key, state)
        if self.held > self.policy.max_held:
            self._give_up_oldest(now)

    def tick(self, now: float) -> None:
        """Give up gaps older than the interval; ask again for the others when due."""
        horizon = now - self.policy.interval
        for key, state in list(self._open.items()):
            expired = sum(int(hi - lo + 1) for lo, hi, found in state.missing
                          if found <= horizon)
            if expired:
                state.missing = [r for r in state.missing if r[2] > horizon]
                self._count(state, expired, "older than the reliability interval "
                                            f"({self.policy.interval:g}s)")
            if state.missing and now - state.asked_at >= self.policy.retry:
                self._ask(state, now)
            self._release(key, state)

    def give_up_soon(self, key: tuple[str, bytes], ranges: Iterable[list[int]], now: float,
                     grace: float) -> None:
        """Nobody keeps ``ranges`` any more (their publisher is gone): give them up after
        ``grace`` seconds, not at once, for what is still on its way (a beacon can overtake
        messages queued at the proxy, and those are not lost)."""
        state = self._open.get(key)
        if state is None:
            return
        horizon = now + grace - self.policy.interval
        for lo, hi in ranges:
            for missing in state.missing:
                if missing[0] <= hi and missing[1] >= lo:
                    missing[2] = min(missing[2], horizon)

    def not_kept(self, key: tuple[str, bytes], ranges: Iterable[list[int]], now: float) -> None:
        """The publisher no longer keeps ``ranges``: give them up now."""
        state = self._open.get(key)
        if state is None:
            return
        for lo, hi in ranges:
            taken = state.cut(lo, hi)
            if taken:
                self._count(state, taken, "no longer kept by its publisher")
        self._release(key, state)

    # -- internals -----------------------------------------------------------------------

    def _ask(self, state: _Open, now: float) -> None:
        # At most what one request may name: a gap a peer chose (a far jump) is asked for
        # from its start, the rest once that is answered or given up.
        ranges: list[list[int]] = []
        room = MAX_ASK_SEQUENCES
        for lo, hi, _ in state.missing[:MAX_RANGES]:
            if room <= 0:
                break
            first, last = int(lo), min(int(hi), int(lo) + room - 1)
            ranges.append([first, last])
            room -= last - first + 1
        if ranges:
            state.asked_at = now
            self.asks.append(Ask(state.publisher_id, state.stream, ranges))

    def _count(self, state: _Open, count: int, why: str) -> None:
        self.unrepairable += count
        log.warning("zbus: %d messages of %s's stream %s are lost for good (DATALOSS): %s",
                    count, state.publisher_id, state.stream.hex(), why)

    def _release(self, key: tuple[str, bytes], state: _Open) -> None:
        """Hand on, in order, what is held up to the first sequence still missing; a
        sequence neither held nor missing was given up and is passed over."""
        held, out = state.held, self.out
        stop = min((int(lo) for lo, _, _ in state.missing), default=state.top + 1)
        while state.next < stop:
            item = held.pop(state.next, _ABSENT)
            if item is not _ABSENT:
                self.held -= 1
                if item is not None:
                    out.append(item)
            state.next += 1
        if not state.missing and not held:
            del self._open[key]

    def _give_up_oldest(self, now: float) -> None:
        key, state = min(self._open.items(), key=lambda kv: min(
            (found for _, _, found in kv[1].missing), default=now))
        lost = sum(int(hi - lo + 1) for lo, hi, _ in state.missing)
        state.missing = []
        if lost:
            self._count(state, lost, f"more than max_held={self.policy.max_held} messages "
                                     "waited behind gaps")
        self._release(key, state)


class RepairAsker:
    """A subscriber's side of the repair plane's wire (docs/PROTOCOL.md section 11), without
    the socket: the request messages for what its core's book asks, and the answers fed back
    to the core. Every backend's subscriber drives one with its own socket and clock.

    Only the request id of an answer is believed (ids start at random): the stream an answer
    names is the one this subscriber asked about, whatever the answer claims, and its
    envelopes go through the core like any received message (verified first)."""

    MAX_ASKED = 4096
    """Requests remembered, to match answers to the streams they asked about."""

    def __init__(self, core: Any, max_bytes: int) -> None:
        self.core = core  # a ConsumerCore with a book (not imported: no import cycle)
        self.max_bytes = max_bytes
        self._asked: dict[int, tuple[tuple[str, bytes], list[list[int]]]] = {}
        self._next = int.from_bytes(os.urandom(6), "big")
        self._next_tick = 0.0

    def due(self, now: float) -> list[list[bytes]]:
        """Tick the book when due (``now``: a monotonic time), then the request messages to
        send for what it asks now."""
        book: GapBook = self.core.book
        if now >= self._next_tick:
            self._next_tick = now + min(0.1, book.policy.retry / 2)
            self.core.tick()
        out = []
        for ask in book.asks:
            self._next += 1
            self._asked[self._next] = ((ask.publisher_id, ask.stream), ask.ranges)
            if len(self._asked) > self.MAX_ASKED:
                del self._asked[next(iter(self._asked))]
            out.append([b"ASK", ask.encode(self._next, self.max_bytes)])
        book.asks.clear()
        return out

    def take(self, frames: list[bytes]) -> None:
        """One message from the repair plane (an answer, or "nobody here keeps it")."""
        if len(frames) < 2 or frames[0] not in (b"GIVE", b"GONE"):
            return
        try:
            head = msgpack.unpackb(frames[1], raw=False, use_list=True)
            asked = self._asked.get(head[0]) if type(head) is list and head else None
        except Exception:
            asked = None
        if asked is None or (frames[0] == b"GIVE" and (len(frames) - 2) % 3):
            return
        key, ranges = asked
        core = self.core
        book: GapBook = core.book
        if frames[0] == b"GONE":
            # No publishing connection on that host keeps the stream (it closed): final,
            # unless the proxy has just restarted or can ask peers (then false). Given up
            # after a grace, for what is still queued on its way here.
            if len(head) == 3 and head[2] is True:
                book.give_up_soon(key, ranges, core._clock(), GONE_GRACE)
        elif len(head) == 4 and type(head[3]) is list:
            gone = [r for r in head[3] if type(r) is list and len(r) == 2
                    and all(type(x) is int for x in r)]
            if gone:
                book.not_kept(key, gone, core._clock())
            for i in range(2, len(frames), 3):
                core.feed(frames[i:i + 3], repaired=True)
        core._settle(book)
