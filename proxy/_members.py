"""Fast pools' members and receipts (docs/RELIABILITY.md, "Fast pools: the receipts").

Owns, per fast pool: the live members, counted by a socket monitor on the members' PUSH; the
members lost (a disconnect without a goodbye) and closed; and the cumulative counts members
report having read. ``unaccounted`` in the stats is the frames the pool handed out minus the
frames reported, from counters only: no Python on the message path.

And the pool's books per stream (``StreamBooks``): the members of a pool together receive
every message of the pool's streams that was not lost, so the messages of a stream's span
that no member reports having read were lost before hand-out (the origin PUB drops at its
high-water mark, where libzmq's C loop counts nothing) or with a member: ``lost``.

Locking: the data is guarded by the proxy's state lock (``Proxy._state``), which the
federation shares: it reads ``counts`` under it, in the same critical section as its own
state. A monitor's reading socket passes from the pool's device thread, which creates it, to
the thread that reads it (the federation's manager, or the control thread without
federation) through a queue.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import zmq
import zmq.utils.monitor

from zbus import ConfigError
from zbus._dispatch import STREAM_SPAN_LIMIT
from zbus._transport import secure_ipc

__all__ = ["FRAMES_PER_MESSAGE", "MAX_FRAMES", "MAX_REPORTERS", "MAX_SPAN", "MAX_STREAMS",
           "MAX_STREAM_ENTRIES", "PoolMembers", "StreamBooks"]

log = logging.getLogger("zbus.proxy")

FRAMES_PER_MESSAGE = 3
MAX_REPORTERS = 10_000
"""Member ids whose receipts one fast pool keeps (a member's final report frees its slot);
reports from further ids are refused and counted, so ``unaccounted`` can only over-state."""
MAX_FRAMES = 2**49
"""The largest cumulative ``frames`` a report may claim (so ``received`` is below 2^48):
far beyond any member's life, and small enough that the sums over 10,000 members still fit
the stats reply's 64-bit integers."""
MAX_STREAMS = 10_000
"""Streams one fast pool keeps books for; the least recently reported beyond it are
dropped and counted (``streams_evicted``)."""
MAX_STREAM_ENTRIES = 200_000
"""Members' counts one fast pool keeps over all its streams (a member's go when it closes);
beyond it, least recently reported streams are dropped too."""
MAX_SPAN = STREAM_SPAN_LIMIT
"""The most sequences one stream's books may span (lowest to highest, over all members):
2^48, a million messages a second for nine years; so ``lost`` over 10,000 streams fits the
stats reply's integers. A report entry beyond it is refused whole; one that would take a
stream's books, merged with the other members', beyond it is left out and counted
(``streams_refused``), the rest of the report taken."""
_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
# What a pool's member monitor reads (see PoolMembers.event).
_MEMBER_EVENTS = zmq.EVENT_ACCEPTED | _HANDSHAKE_FAILED | zmq.EVENT_DISCONNECTED


class _Stream:
    """One stream's books in a fast pool: the lowest and highest sequence any member
    reported, each member's last cumulative count, their sum, and what of the span no
    member had (``lost``, never below 0)."""

    __slots__ = ("highest", "lost", "lowest", "members", "total")

    def __init__(self, lowest: int, highest: int) -> None:
        self.lowest = lowest
        self.highest = highest
        self.total = 0
        self.lost = 0
        self.members: dict[str, int] = {}


class StreamBooks:
    """A fast pool's books per stream (publisher_id, stream_id), from its members' reports.

    ``lost`` is the sum over streams of ``highest - lowest + 1 - sum of members' counts``:
    the messages of the span that no member reports having read. Kept up to date at each
    report, so the stats read one number. Bounded by ``MAX_STREAMS`` and
    ``MAX_STREAM_ENTRIES``, least recently reported stream first (``evicted``); a member's
    counts are folded into the totals when it closes."""

    __slots__ = ("entries", "evicted", "legacy", "legacy_closed", "lost", "refused",
                 "streams")

    def __init__(self) -> None:
        self.streams: OrderedDict[tuple[str, bytes], _Stream] = OrderedDict()
        self.entries = 0  # members' counts held, over all streams
        self.lost = 0
        self.evicted = 0
        self.refused = 0  # entries left out: the stream's books would pass MAX_SPAN
        # Live member ids that report no books (an older zbus), and how many such closed:
        # their share of a stream is in no book, so ``lost`` cannot be told.
        self.legacy: set[str] = set()
        self.legacy_closed = 0

    def admissible(self, entries: list[list[Any]]) -> list[list[Any]]:
        """``entries`` (each already checked alone) but those that would take a stream's
        books beyond ``MAX_SPAN`` sequences, merged with the books kept: left out and
        counted. Such a stream's numbers jump (a publisher breaking the protocol, a key
        holder forging another's stream); the member's other books still count."""
        kept = []
        for entry in entries:
            publisher_id, stream_id, _, lowest, highest = entry
            known = self.streams.get((publisher_id, stream_id))
            if known is not None:
                lowest, highest = min(lowest, known.lowest), max(highest, known.highest)
            if highest - lowest + 1 > MAX_SPAN:
                self.refused += 1
                log.log(logging.WARNING if self.refused == 1 else logging.DEBUG,
                        "pool_receipts: left out the books of stream %s/%s, which would span "
                        "%d..%d (counted in streams_refused)", publisher_id, stream_id.hex(),
                        lowest, highest)
                continue
            kept.append(entry)
        return kept

    def add(self, member: str, entries: list[list[Any]]) -> None:
        """Take ``member``'s cumulative counts (passed :meth:`check`)."""
        streams = self.streams
        for publisher_id, stream_id, count, lowest, highest in entries:
            key = (publisher_id, stream_id)
            book = streams.get(key)
            if book is None:
                book = streams[key] = _Stream(lowest, highest)
            else:
                streams.move_to_end(key)
                book.lowest = min(book.lowest, lowest)
                book.highest = max(book.highest, highest)
            before = book.members.get(member)
            if before is None:
                self.entries += 1
                before = 0
            elif count < before:
                # Counts only grow, unless the member dropped the stream from its own books
                # (beyond its bound) and began it again: what it counts now is all new.
                before = 0
            book.total += count - before
            book.members[member] = count
            lost = max(0, book.highest - book.lowest + 1 - book.total)
            self.lost += lost - book.lost
            book.lost = lost
        while len(streams) > MAX_STREAMS or self.entries > MAX_STREAM_ENTRIES:
            _, book = streams.popitem(last=False)
            self.entries -= len(book.members)
            self.lost -= book.lost
            self.evicted += 1

    def close(self, member: str) -> None:
        """``member`` said goodbye: its counts stay in the totals, its entries go."""
        if member in self.legacy:
            self.legacy.discard(member)
            self.legacy_closed += 1
        for book in self.streams.values():
            if book.members.pop(member, None) is not None:
                self.entries -= 1

    @property
    def legacy_members(self) -> int:
        return len(self.legacy) + self.legacy_closed


class PoolMembers:
    """The members of this host's fast pools and their receipts, under ``state``."""

    def __init__(self, state: threading.Lock, tag: str) -> None:
        self._state = state
        self._tag = tag
        # Per pool: the open connections of its members' PUSH. Under _state; the federation
        # reads it (pool links exist only while a pool has live members here).
        self.counts: dict[str, int] = {}
        # Fast-pool receipts (docs/RELIABILITY.md): pool -> member id -> the cumulative count
        # of its last report; what members that said goodbye reported; disconnects seen by
        # the members' PUSH monitor; refused reports. Under _state.
        # Per pool, per live member id: its last (messages, frames) read; and the sums of
        # the members that closed. Frames, because handed_out is counted in frames.
        self._receipts: dict[str, dict[str, tuple[int, int]]] = {}
        self._receipts_closed: dict[str, tuple[int, int]] = {}
        self._members_closed: dict[str, int] = {}
        self._members_lost: dict[str, int] = {}
        # Per pool: connections whose handshake failed and whose disconnect is still to come
        # (garbage or a wrong socket type on the pool socket: never a member, never lost).
        self._not_members: dict[str, int] = {}
        self._receipts_refused: dict[str, int] = {}
        self.receipts_refused = 0  # every refused report, a pool's or not
        self._books: dict[str, StreamBooks] = {}
        self._monitor_inbox: queue.SimpleQueue[tuple[str, zmq.Socket[Any]]] = queue.SimpleQueue()
        self._pending: dict[str, zmq.Socket[Any]] = {}
        self._pending_lock = threading.Lock()
        # Per declared pool, the monitor reader of its current declaration (under _state): a
        # pool removed and declared again has a new one, and the old one's late events are
        # not its members.
        self._current: dict[str, zmq.Socket[Any]] = {}
        self._seq = itertools.count()

    def watch(self, ctx: zmq.Context[Any], name: str, push: zmq.Socket[Any],
              endpoint: str) -> None:
        """In the pool's deliver device thread: count members with a socket monitor on the
        members' PUSH, connected before the PUSH binds (to ``endpoint``) so that no member
        goes uncounted. Its events are read by the manager thread (federation) or the
        control thread."""
        # Unique per declaration: a removed pool's monitor may still hold the old address.
        monitor = f"inproc://zbus-members-{name}-{self._tag}-{next(self._seq)}"
        push.monitor(monitor, _MEMBER_EVENTS)
        reader: zmq.Socket[Any] = ctx.socket(zmq.PAIR)
        reader.setsockopt(zmq.LINGER, 0)
        reader.connect(monitor)
        # Held until the whole pool is declared (``hand_over``), or closed with it if the
        # declaration fails (``discard``): else the reading thread would keep it forever.
        # The lock is the memory barrier that libzmq asks for when a socket moves between
        # threads, and this thread never touches it again.
        with self._pending_lock:
            self._pending[name] = reader
        push.bind(endpoint)
        secure_ipc(endpoint)

    def hand_over(self, name: str) -> None:
        """Pool ``name`` is declared: its member monitor goes to the thread that reads them
        (the manager thread with federation, else the control thread)."""
        with self._pending_lock:
            reader = self._pending.pop(name, None)
        if reader is not None:
            with self._state:
                self._current[name] = reader
            self._monitor_inbox.put((name, reader))

    def retire(self, name: str) -> None:
        """Pool ``name`` was removed (its devices stopped): forget its members and receipts,
        so that a pool declared again under the name starts afresh; its monitor reader is
        now :meth:`stale`, for the thread that reads it to close."""
        with self._state:
            self._current.pop(name, None)
            kept: list[dict[str, Any]] = [
                self.counts, self._receipts, self._receipts_closed, self._members_closed,
                self._members_lost, self._not_members, self._receipts_refused, self._books]
            for books in kept:
                books.pop(name, None)

    def stale(self, readers: Iterable[zmq.Socket[Any]]) -> list[zmq.Socket[Any]]:
        """Of ``readers`` (the caller's monitor readers), those of removed pools: the
        caller closes them."""
        with self._state:
            current = {id(reader) for reader in self._current.values()}
        return [reader for reader in readers if id(reader) not in current]

    def discard(self, name: str) -> None:
        """Pool ``name``'s declaration failed, its device threads ended: close its monitor."""
        with self._pending_lock:
            reader = self._pending.pop(name, None)
        if reader is not None:
            reader.close(linger=0)

    def new_monitors(self) -> list[tuple[str, zmq.Socket[Any]]]:
        """The monitors handed over since the last call, as (pool, reading socket): from now
        on the caller's thread owns them (and closes them)."""
        taken = []
        while True:
            try:
                taken.append(self._monitor_inbox.get_nowait())
            except queue.Empty:
                return taken

    def close_unread(self) -> None:
        """Close the monitors no thread took (the proxy's stop, after those threads ended)."""
        with self._pending_lock:
            pending, self._pending = list(self._pending.values()), {}
        for reader in pending:
            reader.close(linger=0)
        while True:
            try:
                _, reader = self._monitor_inbox.get_nowait()
            except queue.Empty:
                break
            reader.close(linger=0)

    def event(self, pool: str, frames: list[bytes],
              reader: zmq.Socket[Any] | None = None) -> None:
        """One event of ``pool``'s member monitor (read from ``reader``: ignored when that
        is not the monitor of the pool's current declaration, one removed since)."""
        # Members are the open connections (a handshaking one counts at once: a member is
        # never missed). Any peer can connect and send garbage; when libzmq flags the failed
        # handshake (HANDSHAKE_FAILED_*, before that connection's DISCONNECTED), its end is
        # not counted as a lost member. Handshake events carry no fd, hence the credit.
        event = zmq.utils.monitor.parse_monitor_message(frames)["event"]
        with self._state:
            if reader is not None and self._current.get(pool) is not reader:
                return
            count = self.counts.get(pool, 0)
            if event == zmq.EVENT_ACCEPTED:
                count += 1
            elif event & _HANDSHAKE_FAILED:
                self._not_members[pool] = self._not_members.get(pool, 0) + 1
            elif event == zmq.EVENT_DISCONNECTED:
                count = max(0, count - 1)
                if self._not_members.get(pool, 0):
                    self._not_members[pool] -= 1
                else:
                    self._members_lost[pool] = self._members_lost.get(pool, 0) + 1
            self.counts[pool] = count
        log.debug("pool members", extra={"pool": pool, "members": count})

    def refused(self, pool: str | None) -> None:
        """Count one refused report (``pool``: the fast pool it named, if there is one)."""
        with self._state:
            self.receipts_refused += 1
            if pool is not None:
                self._receipts_refused[pool] = self._receipts_refused.get(pool, 0) + 1

    def record(self, pool: str, member: str, received: int, frames: int, final: bool,
               streams: list[list[Any]] | None = None) -> None:
        """Take one (checked) report of ``member`` of fast pool ``pool``, with its books of
        the ``streams`` that changed (None: a member that keeps none); ConfigError, and
        nothing taken, when the pool already tracks MAX_REPORTERS other members (the caller
        counts refusals)."""
        with self._state:
            live = self._receipts.setdefault(pool, {})
            if member not in live and len(live) >= MAX_REPORTERS:
                raise ConfigError(f"pool_receipts: pool {pool!r} already tracks "
                                  f"{MAX_REPORTERS} members")
            books = self._books.setdefault(pool, StreamBooks())
            # Cumulative and sent in order on one socket: never let a late one go backwards.
            before = live.get(member, (0, 0))
            counts = (max(received, before[0]), max(frames, before[1]))
            if streams is None:
                books.legacy.add(member)
            elif streams:
                books.add(member, books.admissible(streams))
            if final:
                live.pop(member, None)
                books.close(member)
                closed = self._receipts_closed.get(pool, (0, 0))
                self._receipts_closed[pool] = (closed[0] + counts[0], closed[1] + counts[1])
                self._members_closed[pool] = self._members_closed.get(pool, 0) + 1
            else:
                live[member] = counts

    def stats(self, pools: Iterable[str], devices: dict[str, dict[str, int]],
              federated: bool = False) -> dict[str, dict[str, Any]]:
        """Per fast pool, the receipts accounting (docs/RELIABILITY.md, "Fast pools: the
        receipts"): ``unaccounted`` is the frames handed out minus the frames reported, in
        messages, from counters only (the device loop's STATISTICS and the members' reports;
        no Python on the message path); ``lost``, from the books per stream, is None with
        ``federated`` (each host hears only its own members, so its books would show the
        other hosts' shares as loss) or when a member keeps no books."""
        out: dict[str, dict[str, Any]] = {}
        for name in pools:
            frames = devices.get(f"pool-{name}-deliver", {}).get("backend_frames_out")
            with self._state:
                live = self._receipts.get(name, {})
                reported, reported_frames = self._receipts_closed.get(name, (0, 0))
                for messages, frames_read in live.values():
                    reported += messages
                    reported_frames += frames_read
                entry: dict[str, Any] = {
                    "members": self.counts.get(name, 0),
                    "members_lost": self._members_lost.get(name, 0),
                    "members_closed": self._members_closed.get(name, 0),
                    "reporting": len(live),
                    "refused_reports": self._receipts_refused.get(name, 0),
                    "reported": reported,
                }
                books = self._books.get(name)
                if books is None:
                    entry.update(lost=None if federated else 0, streams=0, streams_evicted=0,
                                 streams_refused=0, members_without_streams=0)
                else:
                    legacy = books.legacy_members
                    entry.update(lost=None if federated or legacy else books.lost,
                                 streams=len(books.streams), streams_evicted=books.evicted,
                                 streams_refused=books.refused,
                                 members_without_streams=legacy)
            if frames is None:  # the device did not answer: no number rather than a wrong one
                entry.update(handed_out=None, unaccounted=None)
            else:
                # In frames, then rounded up to messages: frames a member read but could not
                # count as a message (a foreign client's other frame counts) cancel out
                # instead of showing as loss, and a lost message is never rounded away.
                missing = frames - reported_frames
                entry.update(handed_out=frames // FRAMES_PER_MESSAGE,
                             unaccounted=-(-missing // FRAMES_PER_MESSAGE))
            out[name] = entry
        return out
