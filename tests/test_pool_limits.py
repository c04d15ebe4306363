"""Pool declarations are bounded (issue 14, items 5 and 15), against real zbus-proxy processes.

Each fast pool costs ~13 fds, 2 threads and 8 libzmq sockets: unbounded declarations (local or
from a listed peer) took a proxy at a 1,024 fd limit to libzmq's abort. A pool's bindings are
bounded too: over 999 distinct prefixes could never be declared (each try blocked the control
thread 10 s and leaked sockets).
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from zbus_proxy import Proxy
from zbus_proxy._proxy import DEFAULT_MAX_POOLS, MAX_POOL_BINDINGS
from zbus_proxy.cli import render_metrics

import zbus

from .conftest import ProxyProcess


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def settled_fds(pid: int, timeout: float = 5.0) -> int:
    """The proxy's fd count once it holds still: libzmq's io thread accepts and closes ipc
    connections (a client's control REQ, a new pool's links) after the request returns,
    and there is no event for that to wait on."""
    deadline = time.monotonic() + timeout
    last, same = fds(pid), 0
    while same < 10 and time.monotonic() < deadline:
        time.sleep(0.05)
        now = fds(pid)
        same = same + 1 if now == last else 0
        last = now
    return last


def distinct(n: int) -> list[str]:
    return [f"notifications/b{i}.#" for i in range(n)]


def test_too_many_distinct_bindings_are_refused_at_once_and_leave_no_socket(
    proxy_process: ProxyProcess, run_dir: Path
) -> None:
    with zbus.Connection(run_dir) as conn:
        before = settled_fds(proxy_process.pid)
        for n in (MAX_POOL_BINDINGS + 1, 1000):
            with pytest.raises(zbus.ProxyError, match=f"at most {MAX_POOL_BINDINGS} distinct"):
                conn.declare_pool(f"wide{n}", distinct(n), timeout=5.0)
        assert settled_fds(proxy_process.pid) == before
        assert "wide1000" not in conn.control.request("pools")["pools"]
        # The largest allowed is declared, and works.
        conn.declare_pool("widest", distinct(MAX_POOL_BINDINGS), timeout=20.0)
        assert len(conn.control.request("pools")["pools"]["widest"]) == MAX_POOL_BINDINGS


def test_duplicate_bindings_are_merged(proxy_process: ProxyProcess, run_dir: Path) -> None:
    with zbus.Connection(run_dir) as conn:
        conn.declare_pool("dup", ["notifications/a.#"] * 4000 + ["notifications/b"] * 3)
        pools = conn.control.request("pools")["pools"]
        assert pools["dup"] == ["notifications/a.#", "notifications/b"]
        # A re-declaration listing them once (or in another order) is the same pool.
        conn.declare_pool("dup", ["notifications/b", "notifications/a.#"])


def test_a_failed_declaration_closes_every_socket_it_made(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pool whose second device fails to start (injected: its readiness probe) leaves no
    socket behind (its member monitor leaked one per try), and the name can be retried."""
    with Proxy(run_dir) as proxy:
        before = settled_fds(os.getpid())

        def fail(sub: Any, push: Any) -> None:
            raise zbus.TransportError("injected: the pool subscription never came up")

        monkeypatch.setattr(proxy, "_probe_pool", fail)
        for _ in range(3):
            with pytest.raises(zbus.TransportError, match="injected"):
                proxy.declare_pool("flaky", ["notifications/x"])
        assert settled_fds(os.getpid()) == before
        assert "flaky" not in proxy.pools
        monkeypatch.undo()
        proxy.declare_pool("flaky", ["notifications/x"])
        assert proxy.pools["flaky"] == ["notifications/x"]


# -- pools per host (item 5) ----------------------------------------------------------------


def test_pools_beyond_max_pools_are_refused_and_counted(run_dir: Path) -> None:
    proxy = ProxyProcess(run_dir, "--max-pools", "3").start()
    try:
        with zbus.Connection(run_dir) as conn:
            conn.declare_pool("a", ["notifications/a"])
            conn.declare_pool("b", ["notifications/b"])
            assert conn.declare_reliable_pool("r", ["billing/#"]) is True
            with pytest.raises(zbus.ProxyError, match="at most 3 pools"):
                conn.declare_pool("c", ["notifications/c"])
            with pytest.raises(zbus.ProxyError, match="at most 3 pools"):
                conn.declare_reliable_pool("r2", ["billing/x"])
            conn.declare_pool("a", ["notifications/a"])  # re-declaring is not a new pool
            stats = conn.control.request("stats")
            assert stats["pools_refused"] == 2 and stats["max_pools"] == 3
            assert "\nzbus_proxy_pools_refused_total 2\n" in render_metrics(stats)
            assert sorted(stats["pools"]) == ["a", "b"] and list(stats["reliable_pools"]) == ["r"]
    finally:
        assert proxy.stop() == 0
    # A pools.json beyond a lowered limit: a config error at start (exit 2), not a half start.
    out = subprocess.run([sys.executable, "-m", "zbus_proxy", "--run-dir", str(run_dir),
                          "--max-pools", "2"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2, out.stderr
    assert "more than limits.max_pools (2)" in out.stderr


def test_peer_declarations_are_bounded_too(run_dir: Path) -> None:
    """A peer's declare_pool and hello both call Proxy._declare_pool (proxy/_federation.py)."""
    with Proxy(run_dir, max_pools=1) as proxy:
        proxy._declare_pool("mine", ["notifications/a"], persist=True)
        with pytest.raises(zbus.ConfigError, match="at most 1 pools"):
            proxy._declare_pool("squat", ["notifications/b"], persist=True)
        assert proxy.pools == {"mine": ["notifications/a"]}
        assert proxy.stats()["pools_refused"] == 1


@contextmanager
def fd_limit(soft: int) -> Iterator[None]:
    """Processes started inside inherit a soft fd limit of ``soft`` (systemd's default)."""
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, old)


def test_pool_flood_at_a_1024_fd_limit_is_refused_not_fatal(run_dir: Path) -> None:
    """The attack: 80 pool declarations against a proxy at 1,024 fds (71-78 aborted it)."""
    with fd_limit(1024):
        proxy = ProxyProcess(run_dir).start(timeout=20.0)
    try:
        refused = 0
        with zbus.Connection(run_dir) as conn:
            for i in range(80):
                try:
                    conn.declare_pool(f"flood{i}", [f"notifications/f{i}"], timeout=20.0)
                except zbus.ProxyError as exc:
                    assert f"at most {DEFAULT_MAX_POOLS} pools" in str(exc)
                    refused += 1
            assert refused == 80 - DEFAULT_MAX_POOLS
            stats = conn.control.request("stats")
            assert stats["pools_refused"] == refused
            assert len(stats["pools"]) == DEFAULT_MAX_POOLS
            assert fds(proxy.pid) < 1024
        assert proxy.proc is not None and proxy.proc.poll() is None
    finally:
        assert proxy.stop() == 0
