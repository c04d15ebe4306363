"""Shared fixtures: short per-test run directories and a real zbus-proxy process."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import zbus

from .agents import Agent, Collector


@contextmanager
def short_tmp_dir(prefix: str) -> Iterator[Path]:
    """A fresh, short directory under /tmp (ipc socket paths must stay under 107 bytes),
    removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """A fresh, short directory (ipc socket paths must stay under 107 bytes)."""
    with short_tmp_dir("zb-") as path:
        yield path


@pytest.fixture
def key() -> bytes:
    return zbus.generate_key()


class ProxyProcess:
    """A ``zbus-proxy`` subprocess on ``run_dir``; ``start`` waits until it answers ping."""

    def __init__(self, run_dir: Path, *extra: str) -> None:
        self.run_dir = run_dir
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = run_dir / "proxy.log"

    def start(self, timeout: float = 10.0) -> ProxyProcess:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "zbus_proxy", "--run-dir", str(self.run_dir), *self.extra],
                stdout=log, stderr=subprocess.STDOUT,
            )
        conn = zbus.Connection(self.run_dir)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"zbus-proxy exited: {self.log.read_text()}")
                try:
                    conn.control.request("ping", timeout=0.5)
                    return self
                except zbus.Timeout:
                    if time.monotonic() > deadline:
                        raise
        except BaseException:
            self.stop(signal.SIGKILL)  # never answered, or we failed: end what we started
            raise
        finally:
            conn.close()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


@pytest.fixture
def proxy_process(run_dir: Path) -> Iterator[ProxyProcess]:
    """A running zbus-proxy subprocess on ``run_dir``, ended after the test."""
    proxy = ProxyProcess(run_dir).start()
    try:
        yield proxy
    finally:
        proxy.stop()


SMALL_PROXY_LIMIT = 64 * 1024


@pytest.fixture
def small_proxy(run_dir: Path) -> Iterator[ProxyProcess]:
    """A zbus-proxy subprocess whose max_message_bytes is ``SMALL_PROXY_LIMIT`` (64 KiB)."""
    proxy = ProxyProcess(run_dir, "--max-message-bytes", str(SMALL_PROXY_LIMIT)).start()
    try:
        yield proxy
    finally:
        proxy.stop()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def collect_deliveries(consumer: Any, count: int, timeout: float) -> list[zbus.Delivery]:
    """Exactly ``count`` deliveries from ``consumer``, or fewer if ``timeout`` passes first."""
    got: list[zbus.Delivery] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and (left := deadline - time.monotonic()) > 0:
        delivery = consumer.receive(timeout=left)
        if delivery is None:
            break
        got.append(delivery)
    return got


Spawn = Callable[..., Agent]


@pytest.fixture
def collector(run_dir: Path) -> Iterator[Collector]:
    """The test's PULL socket that agent processes report their deliveries to."""
    c = Collector(run_dir)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    """Agent processes a test starts; every one is ended after the test, pass or fail."""
    started: list[Agent] = []
    try:
        yield started
    finally:
        for agent in started:
            agent.close()


def spawner(kind: type[Agent], run_dir: Path, key: bytes, started: list[Agent],
            collector: Collector | None = None) -> Spawn:
    """A function starting ``kind`` agents with the test's key (and collector), tracked in
    ``started`` so the ``agents`` fixture ends them."""
    extra = ("--collector", collector.endpoint) if collector is not None else ()

    def start(role: str, name: str, *args: str) -> Agent:
        agent = kind(run_dir, role, "--key", key.hex(), *extra, *args, name=name)
        started.append(agent)
        return agent

    return start
