"""Replay protection and loss accounting per stream, with no I/O and no clock.

A *stream* is one publisher run's messages on one topic (docs/PROTOCOL.md): a random stream
id, sequences 1, 2, 3... Each stream a consumer sees has its highest sequence, the lowest
sequence accounted for, and a bitmap of which of the last ``sequence_window`` sequences are
*missing*. That one structure answers three questions:

* was this exact message seen before (a replay or a duplicate)? -> rejected, reason ``replay``;
* how many messages are missing (gaps)? -> ``lost`` grows on a gap and shrinks when a late
  message fills it, so at every moment accepted + lost == highest - lowest + 1 per stream;
* is it too old to tell? -> sequences more than the window behind the highest are rejected.

The bitmap marks missing sequences rather than seen ones, so a stream that arrives whole, the
usual case, keeps a bitmap of 0: a few dozen bytes a stream, whatever the window. A beacon
(a signed "this stream has sent up to N") moves the highest sequence without a message, which
is how a lost tail becomes visible.

Timestamps outside ``[now - max_age, now + max_skew]`` are rejected as ``stale`` or
``future``. The stream table is bounded twice, and an evicted stream starts a new baseline
(so a replay of it within ``max_age`` could pass, and a gap across the eviction is not
counted):

* at most ``max_streams_per_publisher`` streams per publisher id: a new stream beyond that
  evicts the *oldest created* stream of the same publisher id, never another publisher's.
  With keys bound to publisher ids (``KeyRing(publishers=...)``), a key holder flooding
  stream ids therefore churns only the streams of ids its key may claim;
* at most ``max_streams`` streams in all, least recently seen evicted: size it above the
  number of live streams (publisher runs times the topics each sends) plus
  ``max_streams_per_publisher`` times the publisher ids an untrusted key may claim.

Invariant: ``_by_publisher`` indexes exactly the keys of ``_streams`` (every insertion and
both evictions update both), so ``len(self)`` is the size of either. The per-publisher index
is touched only when a stream is created or evicted, never for a message of a known stream.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from ._errors import ConfigError, ReplayError

__all__ = ["ReplayGuard", "ReplayPolicy", "StreamState"]


@dataclass(slots=True)
class StreamState:
    highest: int
    floor: int  # the lowest sequence accounted for: the span is floor..highest
    missing: int  # bit i set: sequence (highest - i) has not arrived (i < window)


@dataclass(frozen=True, slots=True)
class ReplayPolicy:
    """How consumers judge freshness and replays; give it to a connection's consumers as
    ``Settings(replay=ReplayPolicy(...))`` (docs/SECURITY.md).

    ``max_age``/``max_skew``: the accepted timestamp window, in seconds behind and ahead of
    the consumer's clock (``max_age=None`` accepts any timestamp); ``sequence_window``: how far
    behind a stream's newest sequence a message can still be told from a replay;
    ``max_streams``: streams remembered in all; ``max_streams_per_publisher``: streams
    remembered per publisher id (a stream is one run of one publisher on one topic: raise it
    if one publisher id sends on more topics at once, times its processes and threads).
    """

    max_age: float | None = 300.0
    max_skew: float = 60.0
    sequence_window: int = 4096
    max_streams: int = 100_000
    max_streams_per_publisher: int = 10_000

    def __post_init__(self) -> None:
        if min(self.sequence_window, self.max_streams, self.max_streams_per_publisher) < 1:
            raise ConfigError(
                "ReplayPolicy: sequence_window, max_streams and max_streams_per_publisher "
                "must be at least 1"
            )
        if self.max_age is not None and not self.max_age > 0:
            raise ConfigError(
                "ReplayPolicy.max_age must be positive, or None to accept any timestamp"
            )
        if not self.max_skew >= 0:
            raise ConfigError("ReplayPolicy.max_skew must be >= 0")


class ReplayGuard:
    """One consumer's replay, freshness and loss state under ``policy`` (see the module
    docstring and :class:`ReplayPolicy`)."""

    def __init__(self, policy: ReplayPolicy | None = None) -> None:
        policy = policy or ReplayPolicy()
        self.policy = policy
        self.max_age = policy.max_age
        self.max_skew = policy.max_skew
        self.window = policy.sequence_window
        self._mask = (1 << policy.sequence_window) - 1
        self._max_streams = policy.max_streams
        self._max_per_publisher = policy.max_streams_per_publisher
        self._streams: OrderedDict[tuple[str, bytes], StreamState] = OrderedDict()
        # publisher id -> its streams in order of creation (a dict used as an ordered set).
        self._by_publisher: dict[str, dict[bytes, None]] = {}

    def check_time(self, timestamp: float, now: float) -> None:
        if self.max_age is None:
            return
        if timestamp < now - self.max_age:
            raise ReplayError(
                f"message is {now - timestamp:.1f}s old, beyond max_age={self.max_age:g}s",
                reason="stale",
            )
        if timestamp > now + self.max_skew:
            raise ReplayError(
                f"message is {timestamp - now:.1f}s in the future, beyond max_skew="
                f"{self.max_skew:g}s: check the publisher's clock",
                reason="future",
            )

    def observe(self, publisher_id: str, stream: bytes, sequence: int) -> tuple[int, bool]:
        """Record ``sequence``; return (change in lost count, arrived late). Raises ReplayError.

        The change is positive for a gap, -1 when a late message fills one.
        """
        key = (publisher_id, stream)
        state = self._streams.get(key)
        if state is None:
            self._new_stream(publisher_id, stream, sequence)
            return 0, False
        self._streams.move_to_end(key)
        ahead = sequence - state.highest
        if ahead == 1:  # the usual case: next in line, nothing missing added
            state.highest = sequence
            if state.missing:
                state.missing = (state.missing << 1) & self._mask
            return 0, False
        if ahead > 0:
            self._advance(state, sequence)
            return ahead - 1, False
        behind = -ahead
        if behind >= self.window:
            raise ReplayError(
                f"sequence {sequence} of {publisher_id!r} is {behind} behind the newest; too "
                f"old to tell from a replay (window {self.window})",
                reason="replay",
            )
        bit = 1 << behind
        if sequence < state.floor:
            # Older than the first message seen from this stream: widen the span down to it,
            # counting what lies between as missing, so accepted + lost == span stays exact.
            gap = state.floor - sequence - 1
            state.missing |= ((1 << gap) - 1) << (behind - gap)
            state.floor = sequence
            return gap, True
        if not state.missing & bit:
            raise ReplayError(
                f"message {sequence} of {publisher_id!r} was already received", reason="replay"
            )
        state.missing &= ~bit
        return -1, True

    def observe_run(self, publisher_id: str, stream: bytes, first: int, count: int,
                    skip: bool = False) -> bool:
        """Record ``first`` .. ``first + count - 1`` at once if they come next in a known
        stream, exactly as observing each in turn would: nothing late, and nothing missing
        unless ``skip`` (a pool member's share of a stream: what lies between its batches
        went to other members) lets the run start beyond the next sequence, the skipped ones
        then marked missing. False, recording nothing, otherwise (observe them one by one)."""
        key = (publisher_id, stream)
        state = self._streams.get(key)
        if state is None:
            return False
        gap = first - state.highest - 1
        if gap < 0 or (gap and not skip):
            return False
        self._streams.move_to_end(key)
        shift = gap + count
        skipped = ((1 << min(gap, self.window)) - 1) << min(count, self.window)
        if shift < self.window:
            state.missing = ((state.missing << shift) | skipped) & self._mask
        else:
            state.missing = skipped & self._mask
        state.highest = first + count - 1
        return True

    def observe_beacon(self, publisher_id: str, stream: bytes, last: int) -> int:
        """A beacon says the stream sent every sequence up to ``last``: return how many more
        are now known missing (0 for a stream this consumer has no baseline for: it cannot
        know what it should have had)."""
        state = self._streams.get((publisher_id, stream))
        if state is None or last <= state.highest:
            return 0
        gap = last - state.highest
        self._advance(state, last)
        state.missing |= 1  # ``last`` itself was not received either
        return gap

    def _advance(self, state: StreamState, sequence: int) -> None:
        """Move the highest to ``sequence``, marking everything skipped as missing."""
        ahead = sequence - state.highest
        if ahead >= self.window:
            # Everything in the new window but ``sequence`` itself is missing; never shift by
            # ``ahead``, which a peer chooses (up to 2^64).
            state.missing = self._mask & ~1
        else:
            state.missing = ((state.missing << ahead) | ((1 << ahead) - 2)) & self._mask
        state.highest = sequence

    def _new_stream(self, publisher_id: str, stream: bytes, sequence: int) -> None:
        streams = self._by_publisher.get(publisher_id)
        if streams is None:
            streams = self._by_publisher[publisher_id] = {}
        elif len(streams) >= self._max_per_publisher:
            oldest = next(iter(streams))  # this publisher's own oldest stream, never another's
            del streams[oldest]
            del self._streams[(publisher_id, oldest)]
        if len(self._streams) >= self._max_streams:
            (evicted_publisher, evicted_stream), _ = self._streams.popitem(last=False)
            evicted = self._by_publisher[evicted_publisher]
            del evicted[evicted_stream]
            if not evicted and evicted_publisher != publisher_id:
                del self._by_publisher[evicted_publisher]
        streams[stream] = None
        self._streams[(publisher_id, stream)] = StreamState(sequence, sequence, 0)

    def __len__(self) -> int:
        return len(self._streams)
