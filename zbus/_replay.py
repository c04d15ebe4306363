"""Replay protection and loss accounting per publisher run, with no I/O and no clock.

Each publisher run (publisher id + 8-byte run id) has a highest sequence seen and a bitmap of
the last ``sequence_window`` sequence numbers. That one structure answers three questions:

* was this exact message seen before (a replay or a duplicate)? -> rejected, reason ``replay``;
* how many messages are missing (gaps)? -> ``lost`` grows on a gap and shrinks when a late
  message fills it, so at every moment accepted + lost == highest - lowest + 1 per run;
* is it too old to tell? -> sequences more than the window behind the highest are rejected.

Timestamps outside ``[now - max_age, now + max_skew]`` are rejected as ``stale`` or
``future``. The run table is bounded (least recently seen evicted); an evicted run starts a
new baseline, so a replay of it within ``max_age`` could pass — size ``max_runs`` above the
number of live publishers.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from ._errors import ConfigError, ReplayError

__all__ = ["ReplayGuard", "StreamState"]


@dataclass(slots=True)
class StreamState:
    highest: int
    floor: int  # the lowest sequence accounted for: the span is floor..highest
    seen: int  # bit i set: sequence (highest - i) was seen


class ReplayGuard:
    def __init__(
        self,
        *,
        max_age: float | None = 300.0,
        max_skew: float = 60.0,
        sequence_window: int = 4096,
        max_runs: int = 10_000,
    ) -> None:
        if sequence_window < 1 or max_runs < 1:
            raise ConfigError("sequence_window and max_runs must be at least 1")
        if max_age is not None and max_age <= 0:
            raise ConfigError("max_age must be positive, or None to accept any timestamp")
        self.max_age = max_age
        self.max_skew = max_skew
        self.window = sequence_window
        self._mask = (1 << sequence_window) - 1
        self._max_runs = max_runs
        self._runs: OrderedDict[tuple[str, bytes], StreamState] = OrderedDict()

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
            if len(self._runs) >= self._max_runs:
                self._runs.popitem(last=False)
            self._runs[key] = StreamState(sequence, sequence, 1)
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

    def __len__(self) -> int:
        return len(self._runs)
