"""Pool declarations are bounded (issue 14, items 5 and 15), against real zbus-proxy processes.

Each fast pool costs ~13 fds, 2 threads and 8 libzmq sockets: unbounded declarations (local or
from a listed peer) took a proxy at a 1,024 fd limit to libzmq's abort. A pool's bindings are
bounded too: over 999 distinct prefixes could never be declared (each try blocked the control
thread 10 s and leaked sockets).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from zbus_proxy import Proxy
from zbus_proxy._proxy import MAX_POOL_BINDINGS

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
