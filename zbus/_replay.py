"""Replay protection and loss accounting per publisher run, with no I/O and no clock.

Each publisher run (publisher id + 8-byte run id) has a highest sequence seen and a bitmap of
the last ``sequence_window`` sequence numbers. That one structure answers three questions:

* was this exact message seen before (a replay or a duplicate)? -> rejected, reason ``replay``;
* how many messages are missing (gaps)? -> ``lost`` grows on a gap and shrinks when a late
  message fills it, so at every moment accepted + lost == highest - lowest + 1 per run;
* is it too old to tell? -> sequences more than the window behind the highest are rejected.

Timestamps outside ``[now - max_age, now + max_skew]`` are rejected as ``stale`` or
``future``. The run table is bounded twice, and an evicted run starts a new baseline (so a
replay of it within ``max_age`` could pass, and a gap across the eviction is not counted):

* at most ``max_runs_per_publisher`` runs per publisher id: a new run beyond that evicts the
  *oldest created* run of the same publisher id, never another publisher's. With keys bound
  to publisher ids (``KeyRing(publishers=...)``), a key holder flooding run ids therefore
  churns only the runs of ids its key may claim;
* at most ``max_runs`` runs in all, least recently seen evicted — size it above the number of
  live runs plus ``max_runs_per_publisher`` times the publisher ids an untrusted key may claim.

Invariant: ``_by_publisher`` indexes exactly the keys of ``_runs`` (every insertion and both
evictions update both), so ``len(self)`` is the size of either. The per-publisher index is
touched only when a run is created or evicted, never for a message of a known run.
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
    seen: int  # bit i set: sequence (highest - i) was seen


@dataclass(frozen=True, slots=True)
class ReplayPolicy:
    """How consumers judge freshness and replays; give it to a connection's consumers as
    ``Settings(replay=ReplayPolicy(...))`` (docs/SECURITY.md).

    ``max_age``/``max_skew``: the accepted timestamp window, in seconds behind and ahead of
    the consumer's clock (``max_age=None`` accepts any timestamp); ``sequence_window``: how far
    behind a run's newest sequence a message can still be told from a replay;
    ``max_runs``: runs remembered in all; ``max_runs_per_publisher``: runs remembered per
    publisher id (raise it if one publisher id has more live runs at once: processes times
    sending threads that share it).
    """

    max_age: float | None = 300.0
    max_skew: float = 60.0
    sequence_window: int = 4096
    max_runs: int = 10_000
    max_runs_per_publisher: int = 1024

    def __post_init__(self) -> None:
        if min(self.sequence_window, self.max_runs, self.max_runs_per_publisher) < 1:
            raise ConfigError(
                "ReplayPolicy: sequence_window, max_runs and max_runs_per_publisher must be "
                "at least 1"
            )
        if self.max_age is not None and self.max_age <= 0:
            raise ConfigError(
                "ReplayPolicy.max_age must be positive, or None to accept any timestamp"
            )
        if self.max_skew < 0:
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
        self._max_runs = policy.max_runs
        self._max_per_publisher = policy.max_runs_per_publisher
        self._runs: OrderedDict[tuple[str, bytes], StreamState] = OrderedDict()
        # publisher id -> its runs in order of creation (a dict used as an ordered set).
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

    def observe(self, publisher_id: str, run: bytes, sequence: int) -> tuple[int, bool]:
        """Record ``sequence``; return (change in lost count, arrived late). Raises ReplayError.

        The change is positive for a gap, -1 when a late message fills one.
        """
        key = (publisher_id, run)
        state = self._runs.get(key)
        if state is None:
            self._new_run(publisher_id, run, sequence)
            return 0, False
        self._runs.move_to_end(key)
        ahead = sequence - state.highest
        if ahead > 0:
            state.seen = ((state.seen << ahead) | 1) & self._mask
            state.highest = sequence
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
            # Older than the first message seen from this run: widen the span down to it,
            # counting what lies between as missing, so accepted + lost == span stays exact.
            missing = state.floor - sequence - 1
            state.floor = sequence
            state.seen |= bit
            return missing, True
        if state.seen & bit:
            raise ReplayError(
                f"message {sequence} of {publisher_id!r} was already received", reason="replay"
            )
        state.seen |= bit
        return -1, True

    def _new_run(self, publisher_id: str, run: bytes, sequence: int) -> None:
        runs = self._by_publisher.get(publisher_id)
        if runs is None:
            runs = self._by_publisher[publisher_id] = {}
        elif len(runs) >= self._max_per_publisher:
            oldest = next(iter(runs))  # this publisher's own oldest run, never another's
            del runs[oldest]
            del self._runs[(publisher_id, oldest)]
        if len(self._runs) >= self._max_runs:
            (evicted_publisher, evicted_run), _ = self._runs.popitem(last=False)
            evicted = self._by_publisher[evicted_publisher]
            del evicted[evicted_run]
            if not evicted and evicted_publisher != publisher_id:
                del self._by_publisher[evicted_publisher]
        runs[run] = None
        self._runs[(publisher_id, run)] = StreamState(sequence, sequence, 1)

    def __len__(self) -> int:
        return len(self._runs)
