"""Beacons that publishers leave with their proxy, published again after they leave.

A beacon (docs/PROTOCOL.md, section 5) is a signed "stream S sent up to N". A publisher sends
it behind a stream's last message, but a consumer that is still behind (a slow subscriber
whose queue at the proxy is full) can lose that beacon as it lost the tail, and a publisher
that is gone (closed, or killed after its close ran) cannot send another. So publishers also
hand their beacons to the proxy (control op ``beacons``, out of band); the proxy keeps the
newest per stream and publishes it again after 1, 2, 4, 8 and 16 s into its own delivery
plane (this host's subscribers, never the origin: pools and peers' links would hand the
copies out as envelopes, and count one lost there as an envelope lost), which reaches a
subscriber once it has caught up. A beacon changes nothing for a consumer that
already knows, so publishing one again is always safe; and it is signed end to end, so the
proxy, which holds no keys, cannot make one up or alter it (a consumer rejects anything
else as it rejects any forgery).

Everything here is untrusted input from local clients: each beacon is checked for shape
(three frames, a beacon envelope with an 8-byte stream id, sizes bounded) before it is
kept; refusals are counted; at most ``max_streams`` are kept (the oldest dropped, counted).
No clock inside: ``now`` is passed in. No message of the data path passes through here.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from zbus._names import split_topic

__all__ = ["MAX_FILE_BYTES", "REPUBLISH_AFTER", "BeaconStore"]

REPUBLISH_AFTER = (1.0, 2.0, 4.0, 8.0, 16.0)
"""Seconds after it was handed over at which a beacon is published again."""
MAX_BEACON_FRAME = 512  # a beacon's envelope is about 30 bytes plus the publisher id
MAX_PER_REQUEST = 1000
MAX_FILE_BYTES = 1 << 20
MAX_FILES_PER_SCAN = 100


@dataclass(slots=True)
class _Kept:
    frames: list[bytes]
    sequence: int  # the beacon's first_sequence: a higher one replaces it
    since: float
    sent: int = 0  # how many of REPUBLISH_AFTER have been done


class BeaconStore:
    """The newest beacon of each stream handed over, and when to publish each again."""

    def __init__(self, max_streams: int = 10_000) -> None:
        self.max_streams = max_streams
        self._kept: OrderedDict[tuple[bytes, str, bytes], _Kept] = OrderedDict()
        self.stored = 0
        self.republished = 0
        self.refused = 0
        self.evicted = 0

    def add(self, items: Any, now: float) -> int:
        """Keep each beacon of ``items`` (a list of 3-frame lists) that has a beacon's shape;
        return how many were refused (counted)."""
        if not isinstance(items, list) or len(items) > MAX_PER_REQUEST:
            self.refused += 1
            return 1
        refused = 0
        for frames in items:
            parsed = _parse(frames)
            if parsed is None:
                refused += 1
                continue
            key, sequence = parsed
            kept = self._kept.get(key)
            if kept is not None and kept.sequence >= sequence:
                continue  # an older or the same announcement: nothing new
            self._kept.pop(key, None)
            self._kept[key] = _Kept(list(frames), sequence, now)
            self.stored += 1
            if len(self._kept) > self.max_streams:
                self._kept.popitem(last=False)
                self.evicted += 1
        self.refused += refused
        return refused

    def due(self, now: float) -> list[list[bytes]]:
        """The beacons to publish again now; each is forgotten after its last time."""
        out: list[list[bytes]] = []
        done: list[tuple[bytes, str, bytes]] = []
        for key, kept in self._kept.items():
            if now - kept.since >= REPUBLISH_AFTER[kept.sent]:
                out.append(kept.frames)
                kept.sent += 1
                if kept.sent == len(REPUBLISH_AFTER):
                    done.append(key)
        for key in done:
            del self._kept[key]
        self.republished += len(out)
        return out

    def take_files(self, directory: Path, now: float) -> None:
        """Keep the beacons of the files publishers left in ``directory`` (written when they
        could not reach this proxy as they closed: it was hung, restarting or gone), then
        delete each file. Only regular files owned by this user and at most
        ``MAX_FILE_BYTES`` are read; the rest are deleted unread and counted as refused."""
        try:
            names = sorted(os.listdir(directory))[:MAX_FILES_PER_SCAN]
        except OSError:
            return
        for name in names:
            path = directory / name
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:  # a symlink, gone meanwhile, or not ours to read
                self.refused += 1
                _unlink(path)
                continue
            try:
                info = os.fstat(fd)
                if (not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid()
                        or info.st_size > MAX_FILE_BYTES):
                    self.refused += 1
                    continue
                data = os.read(fd, MAX_FILE_BYTES + 1)
            finally:
                os.close(fd)
                _unlink(path)
            try:
                items = msgpack.unpackb(data, raw=False)
            except Exception:  # whatever the file holds: refused, never raised
                self.refused += 1
                continue
            self.add(items, now)

    def __len__(self) -> int:
        return len(self._kept)

    def stats(self) -> dict[str, int]:
        return {"kept": len(self._kept), "stored": self.stored,
                "republished": self.republished, "refused": self.refused,
                "evicted": self.evicted}


def _parse(frames: Any) -> tuple[tuple[bytes, str, bytes], int] | None:
    """((topic, publisher id, stream id), first_sequence) of a beacon, or None."""
    if (not isinstance(frames, list) or len(frames) != 3
            or not all(type(f) is bytes for f in frames)):
        return None
    topic, envelope, signature = frames
    if len(envelope) > MAX_BEACON_FRAME or not 35 <= len(signature) <= 98:
        return None
    try:
        split_topic(topic)
        fields = msgpack.unpackb(envelope, raw=False, strict_map_key=True)
    except Exception:  # anything a client sends: refused, never raised
        return None
    if (not isinstance(fields, list) or len(fields) != 5 or fields[0] != 2
            or type(fields[0]) is not int or type(fields[1]) is not str
            or type(fields[2]) is not bytes or len(fields[2]) != 8
            or type(fields[3]) is not int or not 1 <= fields[3] < 1 << 64
            or fields[4] != []):
        return None
    return (topic, fields[1], fields[2]), fields[3]


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
