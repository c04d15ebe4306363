"""Issue 14, item 1: no control request may end a service thread, and a service thread that
fails anyway ends the proxy (exit 1, for systemd to restart it), visible in stats and /metrics
meanwhile (proxy/_guard.py, docs/OPERATING.md "When a service thread fails")."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from zbus_proxy import Proxy
from zbus_proxy._control import ControlServer
from zbus_proxy._reliable import ReliablePool
from zbus_proxy.cli import render_metrics

import zbus
from tests.conftest import ProxyProcess

U64_MAX = 2**64 - 1


def test_out_of_range_numbers_are_refused_and_the_control_plane_keeps_serving(
    proxy_process: ProxyProcess,
) -> None:
    run_dir = proxy_process.run_dir
    with zbus.Connection(run_dir) as conn:
        control = conn.control
        control.request("declare_pool", name="fp", bindings=["ex/#"])
        # Before the fix, received=2**64-1 made every later stats reply unpackable and the
        # control thread exited; max_attempts=2**64-1 persisted into every stats reply.
        attacks: list[tuple[str, dict[str, Any]]] = [
            ("pool_receipts", {"pool": "fp", "member": "m", "received": U64_MAX}),
            ("pool_receipts", {"pool": "fp", "member": "m", "received": 1,
                               "frames": U64_MAX}),
            ("declare_reliable_pool", {"name": "r1", "bindings": ["ex/#"],
                                       "max_attempts": U64_MAX}),
            ("declare_reliable_pool", {"name": "r2", "bindings": ["ex/#"],
                                       "ack_timeout": 1e300}),
            ("declare_reliable_pool", {"name": "r3", "bindings": ["ex/#"],
                                       "ack_timeout": float("inf")}),
        ]
        for op, fields in attacks:
            with pytest.raises(zbus.ProxyError, match="must be"):
                control.request(op, **fields)
        assert control.request("declare_reliable_pool", name="ok", bindings=["ex/#"],
                               max_attempts=1000, ack_timeout=86_400)["created"]
        for field in ("start", "limit"):
            with pytest.raises(zbus.ProxyError, match=f"{field} must be"):
                control.request("dead_letters", name="ok", **{field: U64_MAX})
        assert control.request("ping")["ok"]
        stats = control.request("stats")
        assert stats["ok"] and stats["service_failures"] == {}
        assert stats["pool_receipts_refused"] >= 2
        assert set(stats["reliable_pools"]) == {"ok"}


def test_a_failed_service_thread_shows_in_stats_and_metrics(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(self: ControlServer, again: Any) -> None:
        raise RuntimeError("injected")

    with Proxy(run_dir) as proxy:
        assert proxy.stats()["service_failures"] == {}
        assert "zbus_proxy_up 1" in render_metrics(proxy.stats())
        monkeypatch.setattr(ControlServer, "_publish_beacons", boom)
        assert proxy.health.failed.wait(10)
        stats = proxy.stats()
        assert stats["service_failures"] == {"zbus-control": "RuntimeError: injected"}
        text = render_metrics(stats)
        assert "zbus_proxy_up 0" in text
        assert 'zbus_proxy_service_failures_total{thread="zbus-control"} 1' in text


def test_a_failed_reliable_pool_thread_is_reported(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(self: ReliablePool, *socks: Any) -> None:
        raise RuntimeError("pool loop broke")

    monkeypatch.setattr(ReliablePool, "_loop", boom)
    with Proxy(run_dir) as proxy:
        proxy.declare_reliable_pool("rp", ["ex/#"])
        assert proxy.health.failed.wait(10)
        assert proxy.stats()["service_failures"] == {
            "zbus-rpool-rp": "RuntimeError: pool loop broke"}


def test_zbus_proxy_exits_1_when_a_service_thread_fails(run_dir: Path) -> None:
    # The real command's main(), with one control request made to fail outside the
    # per-request handling (as the unpackable stats reply did).
    script = textwrap.dedent(f"""
        import sys
        from zbus_proxy import _control, cli
        handle = _control.ControlServer._handle
        def failing(self, raw):
            if b"boom" in raw:
                raise RuntimeError("injected failure")
            return handle(self, raw)
        _control.ControlServer._handle = failing
        sys.exit(cli.main(["--run-dir", {str(run_dir)!r}]))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    try:
        with zbus.Connection(run_dir) as conn:
            deadline_tries = 40
            for _ in range(deadline_tries):  # each try waits up to 0.5 s for the proxy
                try:
                    conn.control.request("ping", timeout=0.5)
                    break
                except zbus.Timeout:
                    assert proc.poll() is None
            with pytest.raises(zbus.Timeout):
                conn.control.request("boom", timeout=1.0)
        assert proc.wait(10) == 1
        assert proc.stderr is not None
        err = proc.stderr.read()
        assert "service thread failed" in err and "zbus-control" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
