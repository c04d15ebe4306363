"""Settings objects (no globals): socket limits and the run-directory layout.

Every number here is a documented default (docs/GUIDE.md, "Settings"); pass your own
``Settings`` to a ``Connection`` or ``Proxy`` to change it.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from ._errors import ConfigError
from ._names import validate_name
from ._repair import RepairPolicy
from ._replay import ReplayPolicy

__all__ = ["Endpoints", "Settings", "check_private_dir", "default_run_dir", "ipc_socket_mode"]

_MAX_IPC_PATH = 107  # sockaddr_un.sun_path is 108 bytes with its NUL


@dataclass(frozen=True, slots=True)
class Settings:
    """Socket limits. High-water marks are in messages (per peer pipe), times in seconds."""

    publish_hwm: int = 10_000
    """Messages a publisher queues towards its proxy; beyond that ``send`` blocks."""
    send_timeout: float = 5.0
    """How long ``send`` may block on a full queue or absent proxy before raising Timeout."""
    subscriber_hwm: int = 100_000
    """Messages queued for one subscriber (at the proxy and in the subscriber); beyond that
    the proxy drops for that subscriber alone, and the subscriber counts the gap."""
    pool_hwm: int = 10_000
    """Messages a pool queues at the proxy, and each member prefetches."""
    pool_link_hwm: int = 1_000
    """Messages a proxy's link from one (local or peer) pool origin prefetches. Kept small:
    what a link holds when its host's last member leaves is lost (docs/OPERATING.md)."""
    max_message_bytes: int = 1 << 20
    """ZMQ_MAXMSGSIZE on every receiving socket: larger frames never reach Python."""
    max_queue_bytes: int | None = None
    """Bytes one proxy queue may hold (None: not bounded beyond the high-water marks, so up
    to ``hwm * max_message_bytes``). libzmq bounds queues in messages only, so a proxy
    makes each of its high-water marks at most ``max_queue_bytes // max_message_bytes``
    (``queue_limits``): a consumer or peer that stops reading holds at most this much of the
    proxy's memory, whatever size the messages sent to it. Not on by default: at the default
    1 MiB ``max_message_bytes`` a budget of 1 GiB makes every queue 1,024 messages deep, and
    bursts of small messages were lost that 100,000 held (docs/OPERATING.md)."""
    batch_bytes: int = 16 * 1024
    """Smart batching: while a publishing connection is busy (sending again within 50 us),
    messages of one topic are gathered into one envelope frame of at most this many bytes
    (a message larger than that goes alone), signed once and decoded once per batch; an
    idle connection sends each message alone, at once, so batching adds no latency at low
    rates (docs/PROTOCOL.md, section 5). Keep it at most every consumer's
    ``max_message_bytes`` (a consumer drops a larger frame, and with it the whole batch);
    0 sends every message alone."""
    linger: float = 1.0
    """How long close() waits to flush unsent messages before dropping them."""
    heartbeat_ivl: float = 2.0
    heartbeat_timeout: float = 6.0
    repair: RepairPolicy = field(default_factory=RepairPolicy)
    """The reliability interval: how long a publishing connection keeps what it sent for
    subscribers that missed it, and how long a subscriber asks (docs/RELIABILITY.md,
    "Repair"); ``RepairPolicy(interval=0)`` turns it off."""
    replay: ReplayPolicy = field(default_factory=ReplayPolicy)
    """How this connection's consumers judge freshness and replays (timestamp window,
    sequence window, table bounds): each consumer keeps its own state under it."""
    run_dir_owner: int | None = None
    """The uid the run directory must belong to before this connection uses it (None: this
    process's own). Set it to use another user's proxy on purpose, e.g. a root service
    publishing into the ``zbus`` user's ``/run/zbus``; any other owner is refused."""

    def __post_init__(self) -> None:
        for name in ("publish_hwm", "subscriber_hwm", "pool_hwm", "pool_link_hwm",
                     "max_message_bytes"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"Settings.{name} must be positive")
        if self.max_queue_bytes is not None and self.max_queue_bytes < self.max_message_bytes:
            raise ConfigError(
                f"Settings.max_queue_bytes ({self.max_queue_bytes}) must hold at least one "
                f"message of max_message_bytes ({self.max_message_bytes}): raise it"
            )
        if self.batch_bytes < 0:
            raise ConfigError(f"Settings.batch_bytes must be >= 0 (0: no batching), not "
                              f"{self.batch_bytes}")
        if self.send_timeout < 0 or self.linger < 0:
            raise ConfigError("Settings.send_timeout and Settings.linger must be >= 0")

    def queue_limits(self) -> Settings:
        """These settings with every high-water mark at most ``max_queue_bytes //
        max_message_bytes`` messages: what a proxy runs its queues with, so that each holds
        at most ``max_queue_bytes`` (unchanged when that is None)."""
        if self.max_queue_bytes is None:
            return self
        depth = self.max_queue_bytes // self.max_message_bytes
        return replace(self, **{name: min(getattr(self, name), depth) for name in (
            "publish_hwm", "subscriber_hwm", "pool_hwm", "pool_link_hwm")})

    @property
    def worst_queue_bytes(self) -> int:
        """What the deepest queue may hold: its high-water mark of the largest messages."""
        return max(self.publish_hwm, self.subscriber_hwm, self.pool_hwm,
                   self.pool_link_hwm) * self.max_message_bytes


def default_run_dir() -> Path:
    """``$XDG_RUNTIME_DIR/zbus`` when that exists, else ``<tmp>/zbus-<uid>``."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return Path(xdg) / "zbus"
    return Path(tempfile.gettempdir()) / f"zbus-{os.getuid()}"


def check_private_dir(path: Path, what: str, *, owner: int | None = None,
                      create: bool = False) -> None:
    """Refuse ``path`` as a run (or state) directory unless it is a real directory (not a
    symlink), owned by ``owner`` (default: this process's user) and writable by no one else.

    Whoever owns or may write the directory can swap its sockets and files: read what
    this user's services publish, feed them, or make a proxy write through a planted
    symlink. ``create`` makes a missing one with mode 0700 first (its parents as needed).
    A missing directory is accepted when not created: nothing in it can be used yet."""
    expected = os.getuid() if owner is None else owner
    if create:
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700, parents=True)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        if create:
            raise
        return
    except OSError as exc:
        raise ConfigError(f"cannot check the {what} {str(path)!r}: {exc}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(
            f"the {what} {str(path)!r} is a symlink or not a directory: remove it, or "
            "choose another --run-dir (or state_dir)"
        )
    if info.st_uid != expected:
        raise ConfigError(
            f"the {what} {str(path)!r} belongs to uid {info.st_uid}, not uid {expected}: "
            f"whoever owns it can swap its sockets and read or forge this user's traffic. "
            f"Remove it (or 'chown {expected} {path}'), or choose another --run-dir; to "
            f"use another user's proxy on purpose, set Settings(run_dir_owner=UID)"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(
            f"the {what} {str(path)!r} is writable by group or others (mode "
            f"{stat.S_IMODE(info.st_mode):04o}): they can swap its sockets; run "
            f"'chmod go-w {path}' (0700, or 0750 for a service group), or choose another "
            "--run-dir"
        )


def ipc_socket_mode(run_dir: Path) -> int:
    """The mode the proxy gives its sockets, whatever the umask: 0660 when the run
    directory lets its group in (0750: a service group), else 0600; never others."""
    return 0o660 if os.stat(run_dir).st_mode & stat.S_IXGRP else 0o600


@dataclass(frozen=True, slots=True)
class Endpoints:
    """Where one host's proxy listens: ipc sockets under its run directory."""

    run_dir: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "run_dir", Path(self.run_dir).absolute())
        self._ipc("deliver.sock")  # fail early on a run directory too long for any socket

    def _ipc(self, name: str) -> str:
        path = f"{self.run_dir}/{name}"
        if len(path.encode()) > _MAX_IPC_PATH:
            raise ConfigError(
                f"ipc socket path {path!r} is longer than {_MAX_IPC_PATH} bytes, the limit of "
                "unix sockets: choose a shorter run directory (or pool name)"
            )
        return f"ipc://{path}"

    @property
    def beacons_dir(self) -> Path:
        """Where a publisher that cannot reach its proxy leaves its streams' beacons as a
        file, for the proxy to publish later (docs/RELIABILITY.md, "Beacons")."""
        return self.run_dir / "beacons"

    @property
    def ingress(self) -> str:
        return self._ipc("ingress.sock")

    @property
    def origin(self) -> str:
        return self._ipc("origin.sock")

    @property
    def deliver(self) -> str:
        return self._ipc("deliver.sock")

    @property
    def control(self) -> str:
        return self._ipc("control.sock")

    @property
    def repair(self) -> str:
        """The repair plane: subscribers ask for gaps, publishers answer (zbus._repair)."""
        return self._ipc("repair.sock")

    def pool_origin(self, pool: str) -> str:
        return self._ipc(f"pool-{validate_name(pool, 'pool name')}.origin.sock")

    def pool(self, pool: str) -> str:
        return self._ipc(f"pool-{validate_name(pool, 'pool name')}.sock")
