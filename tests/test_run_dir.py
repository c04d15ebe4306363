"""The run directory is this user's alone (issue 14, item 3): a proxy refuses one another
user made or may write, never follows a symlink where it writes, gives its sockets their
mode whatever the umask; clients refuse the same directories before connecting."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import zbus

from .conftest import ProxyProcess

OTHER_UID = 1001  # no such account is needed: root can give a directory any owner


def run_proxy(run_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """A zbus-proxy that is expected to refuse to start: it ends by itself."""
    return subprocess.run(
        [sys.executable, "-m", "zbus_proxy", "--run-dir", str(run_dir), *extra],
        capture_output=True, text=True, timeout=60,
    )


@pytest.fixture
def victim(tmp_path: Path) -> Iterator[Path]:
    """A root-owned file that a proxy must never truncate or overwrite."""
    path = tmp_path / "precious"
    path.write_text("root's data\n")
    yield path


@pytest.mark.parametrize(
    ("owner", "mode", "message"),
    [
        (OTHER_UID, 0o777, "belongs to uid 1001"),  # the squat as found
        (OTHER_UID, 0o700, "belongs to uid 1001"),
        (0, 0o777, "writable by group or others"),
        (0, 0o1777, "writable by group or others"),
        (0, 0o770, "writable by group or others"),
    ],
)
def test_the_proxy_refuses_a_run_dir_others_own_or_may_write(
        run_dir: Path, owner: int, mode: int, message: str) -> None:
    squat = run_dir / "squat"
    squat.mkdir()
    os.chown(squat, owner, owner)
    os.chmod(squat, mode)
    result = run_proxy(squat)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "--run-dir" in result.stderr
    assert os.listdir(squat) == []  # no lock file, no socket was made there


def test_the_proxy_refuses_a_state_dir_another_user_owns(run_dir: Path) -> None:
    state = run_dir / "state"
    state.mkdir(mode=0o700)
    os.chown(state, OTHER_UID, OTHER_UID)
    result = run_proxy(run_dir / "run", "--state-dir", str(state))
    assert result.returncode == 2 and "state directory" in result.stderr, result.stderr


def test_the_proxy_refuses_a_run_dir_that_is_a_symlink(run_dir: Path) -> None:
    target = run_dir / "elsewhere"
    target.mkdir(mode=0o700)
    (run_dir / "link").symlink_to(target)
    result = run_proxy(run_dir / "link")
    assert result.returncode == 2 and "symlink" in result.stderr, result.stderr
    assert os.listdir(target) == []


def test_a_missing_run_dir_is_made_private(run_dir: Path) -> None:
    fresh = run_dir / "fresh"
    with ProxyContext(fresh, umask=0):  # 0700 whatever the umask
        assert stat.S_IMODE(os.lstat(fresh).st_mode) == 0o700
        assert stat.S_IMODE(os.lstat(fresh / "beacons").st_mode) == 0o700


class ProxyContext:
    """A zbus-proxy subprocess on a run directory it makes itself (its log beside it)."""

    def __init__(self, run_dir: Path, umask: int | None = None) -> None:
        self.run_dir = run_dir
        self.umask = umask
        self.proxy = ProxyProcess(run_dir)
        self.proxy.log = run_dir.parent / f"{run_dir.name}.log"

    def __enter__(self) -> ProxyProcess:
        old = os.umask(self.umask) if self.umask is not None else None
        try:
            return self.proxy.start()
        finally:
            if old is not None:
                os.umask(old)

    def __exit__(self, *exc: object) -> None:
        self.proxy.stop()


def test_a_symlink_planted_as_the_lock_file_is_not_followed(run_dir: Path, victim: Path) -> None:
    (run_dir / "zbus-proxy.lock").symlink_to(victim)
    result = run_proxy(run_dir)
    assert result.returncode == 2 and "symlink" in result.stderr, result.stderr
    assert victim.read_text() == "root's data\n"


def test_a_symlink_planted_as_pools_tmp_is_not_followed(run_dir: Path, victim: Path) -> None:
    with ProxyContext(run_dir / "run") as proxy:
        (proxy.run_dir / "pools.tmp").symlink_to(victim)
        conn = zbus.Connection(proxy.run_dir)
        try:
            conn.declare_pool("workers", ["compute/#"])
        finally:
            conn.close()
        assert victim.read_text() == "root's data\n"
        assert not (proxy.run_dir / "pools.tmp").exists()
        assert "workers" in (proxy.run_dir / "pools.json").read_text()


@pytest.mark.parametrize(("dir_mode", "socket_mode"),
                         [(0o700, 0o600), (0o750, 0o660), (0o755, 0o660)])
def test_sockets_get_their_mode_whatever_the_umask(
        run_dir: Path, dir_mode: int, socket_mode: int) -> None:
    # Under umask 000 libzmq made every socket 0777: anyone who could enter the directory
    # (0755) could connect, read every message and publish.
    home = run_dir / "run"
    home.mkdir()
    os.chmod(home, dir_mode)
    with ProxyContext(home, umask=0) as proxy:
        conn = zbus.Connection(proxy.run_dir)
        try:
            conn.declare_pool("workers", ["compute/#"])  # pool sockets come later
            conn.declare_reliable_pool("jobs", ["compute/#"])
        finally:
            conn.close()
        sockets = sorted(home.glob("*.sock"))
        assert {p.name for p in sockets} >= {"ingress.sock", "deliver.sock", "control.sock",
                                              "pool-workers.sock", "rpool-jobs.sock"}
        assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in sockets} == \
            {p.name: socket_mode for p in sockets}


def test_clients_refuse_another_users_run_dir_unless_asked(run_dir: Path) -> None:
    # The squatter's proxy, there first: root's services must not publish into it.
    with ProxyContext(run_dir / "run") as proxy:
        os.chown(proxy.run_dir, OTHER_UID, OTHER_UID)
        conn = zbus.Connection(proxy.run_dir)
        try:
            with pytest.raises(zbus.ConfigError, match="belongs to uid 1001"):
                conn.control.request("ping", timeout=2)
            with pytest.raises(zbus.ConfigError, match="run_dir_owner"):
                conn.declare_pool("workers", ["compute/#"])
        finally:
            conn.close()
        # On purpose (root publishing into the zbus user's proxy): allowed, by that uid only.
        chosen = zbus.Connection(proxy.run_dir, settings=zbus.Settings(run_dir_owner=OTHER_UID))
        try:
            assert chosen.control.request("ping", timeout=5)["ok"]
        finally:
            chosen.close()
        os.chown(proxy.run_dir, 0, 0)
        os.chmod(proxy.run_dir, 0o777)
        writable = zbus.Connection(proxy.run_dir)
        try:
            with pytest.raises(zbus.ConfigError, match="writable by group or others"):
                writable.control.request("ping", timeout=2)
        finally:
            writable.close()
        os.chmod(proxy.run_dir, 0o700)
