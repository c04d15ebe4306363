"""Settings objects (no globals): socket limits and the run-directory layout.

Every number here is a documented default (docs/GUIDE.md, "Settings"); pass your own
``Settings`` to a ``Connection`` or ``Proxy`` to change it.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ._errors import ConfigError
from ._names import validate_name
from ._replay import ReplayPolicy

__all__ = ["Endpoints", "Settings", "default_run_dir"]

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
    linger: float = 1.0
    """How long close() waits to flush unsent messages before dropping them."""
    heartbeat_ivl: float = 2.0
    heartbeat_timeout: float = 6.0
    replay: ReplayPolicy = field(default_factory=ReplayPolicy)
    """How this connection's consumers judge freshness and replays (timestamp window,
    sequence window, table bounds): each consumer keeps its own state under it."""

    def __post_init__(self) -> None:
        for name in ("publish_hwm", "subscriber_hwm", "pool_hwm", "pool_link_hwm",
                     "max_message_bytes"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"Settings.{name} must be positive")
        if self.send_timeout < 0 or self.linger < 0:
            raise ConfigError("Settings.send_timeout and Settings.linger must be >= 0")


def default_run_dir() -> Path:
    """``$XDG_RUNTIME_DIR/zbus`` when that exists, else ``<tmp>/zbus-<uid>``."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return Path(xdg) / "zbus"
    return Path(tempfile.gettempdir()) / f"zbus-{os.getuid()}"


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

    def pool_origin(self, pool: str) -> str:
        return self._ipc(f"pool-{validate_name(pool, 'pool name')}.origin.sock")

    def pool(self, pool: str) -> str:
        return self._ipc(f"pool-{validate_name(pool, 'pool name')}.sock")
