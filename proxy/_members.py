"""Fast pools' members and receipts (docs/RELIABILITY.md, "Fast pools: the receipts").

Owns, per fast pool: the live members, counted by a socket monitor on the members' PUSH; the
members lost (a disconnect without a goodbye) and closed; and the cumulative counts members
report having read. ``unaccounted`` in the stats is the frames the pool handed out minus the
frames reported, from counters only: no Python on the message path.

Locking: the data is guarded by the proxy's state lock (``Proxy._state``), which the
federation shares: it reads ``counts`` under it, in the same critical section as its own
state. A monitor's reading socket passes from the pool's device thread, which creates it, to
the thread that reads it (the federation's manager, or the control thread without
federation) through a queue.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterable
from typing import Any

import zmq
import zmq.utils.monitor

from zbus import ConfigError

__all__ = ["FRAMES_PER_MESSAGE", "MAX_REPORTERS", "PoolMembers"]

log = logging.getLogger("zbus.proxy")

FRAMES_PER_MESSAGE = 3
MAX_REPORTERS = 10_000
"""Member ids whose receipts one fast pool keeps (a member's final report frees its slot);
reports from further ids are refused and counted, so ``unaccounted`` can only over-state."""
_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
# What a pool's member monitor reads (see PoolMembers.event).
_MEMBER_EVENTS = zmq.EVENT_ACCEPTED | _HANDSHAKE_FAILED | zmq.EVENT_DISCONNECTED


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
        self._monitor_inbox: queue.SimpleQueue[tuple[str, zmq.Socket[Any]]] = queue.SimpleQueue()

    def watch(self, ctx: zmq.Context[Any], name: str, push: zmq.Socket[Any],
              endpoint: str) -> None:
        """In the pool's deliver device thread: count members with a socket monitor on the
        members' PUSH, connected before the PUSH binds (to ``endpoint``) so that no member
        goes uncounted. Its events are read by the manager thread (federation) or the
        control thread."""
        monitor = f"inproc://zbus-members-{name}-{self._tag}"
        push.monitor(monitor, _MEMBER_EVENTS)
        reader: zmq.Socket[Any] = ctx.socket(zmq.PAIR)
        reader.setsockopt(zmq.LINGER, 0)
        reader.connect(monitor)
        # Handed to the manager thread; the queue's lock is the memory barrier that libzmq
        # asks for when a socket moves between threads, and this thread never touches it again.
        self._monitor_inbox.put((name, reader))
        push.bind(endpoint)

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
        while True:
            try:
                _, reader = self._monitor_inbox.get_nowait()
            except queue.Empty:
                break
            reader.close(linger=0)

    def event(self, pool: str, frames: list[bytes]) -> None:
        """One event of ``pool``'s member monitor."""
        # Members are the open connections (a handshaking one counts at once: a member is
        # never missed). Any peer can connect and send garbage; when libzmq flags the failed
        # handshake (HANDSHAKE_FAILED_*, before that connection's DISCONNECTED), its end is
        # not counted as a lost member. Handshake events carry no fd, hence the credit.
        event = zmq.utils.monitor.parse_monitor_message(frames)["event"]
        with self._state:
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

    def record(self, pool: str, member: str, received: int, frames: int, final: bool) -> None:
        """Take one (checked) report of ``member`` of fast pool ``pool``; ConfigError when the
        pool already tracks MAX_REPORTERS other members."""
        with self._state:
            live = self._receipts.setdefault(pool, {})
            if member not in live and len(live) >= MAX_REPORTERS:
                self._receipts_refused[pool] = self._receipts_refused.get(pool, 0) + 1
                raise ConfigError(f"pool_receipts: pool {pool!r} already tracks "
                                  f"{MAX_REPORTERS} members")
            # Cumulative and sent in order on one socket: never let a late one go backwards.
            before = live.get(member, (0, 0))
            counts = (max(received, before[0]), max(frames, before[1]))
            if final:
                live.pop(member, None)
                closed = self._receipts_closed.get(pool, (0, 0))
                self._receipts_closed[pool] = (closed[0] + counts[0], closed[1] + counts[1])
                self._members_closed[pool] = self._members_closed.get(pool, 0) + 1
            else:
                live[member] = counts

    def stats(self, pools: Iterable[str],
              devices: dict[str, dict[str, int]]) -> dict[str, dict[str, Any]]:
        """Per fast pool, the receipts accounting (docs/RELIABILITY.md, "Fast pools: the
        receipts"): ``unaccounted`` is the frames handed out minus the frames reported, in
        messages, from counters only (the device loop's STATISTICS and the members' reports;
        no Python on the message path)."""
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
