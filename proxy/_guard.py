"""Service threads that end on an error: logged, recorded, and the proxy made to exit.

The proxy's service threads (the control socket, the federation's peer and link threads,
each at-least-once pool's component, the metrics endpoint) each own state no other thread
can take over. One that ended while the process stayed up left a proxy that answers nothing
and that systemd does not restart (issue 14, item 1). The policy (docs/OPERATING.md,
"When a service thread fails"): the failure is logged at CRITICAL, shown in ``stats``
(``service_failures``) and ``/metrics`` (``zbus_proxy_service_failures_total``,
``zbus_proxy_up`` 0), and ``zbus-proxy`` exits with code 1 so that its supervisor restarts
it with every thread fresh. An in-process ``Proxy`` sets ``health.failed`` for its owner.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["ServiceHealth"]

log = logging.getLogger("zbus.proxy")


class ServiceHealth:
    """Which service threads failed, and how; ``failed`` is set on the first failure."""

    def __init__(self, stopping: threading.Event) -> None:
        self._stopping = stopping
        self._lock = threading.Lock()
        self._failures: dict[str, str] = {}
        self.failed = threading.Event()

    def report(self, name: str, exc: BaseException) -> None:
        """Thread ``name`` ended on ``exc``: record it and set ``failed`` (not while the
        proxy stops: a thread ending then, even on an error, is the stop)."""
        if self._stopping.is_set():
            log.debug("service thread %s ended while stopping", name, exc_info=exc)
            return
        log.critical("service thread %s failed (%s: %s): the proxy is no longer whole and "
                     "stops (exit code 1) for its supervisor to restart it",
                     name, type(exc).__name__, exc, exc_info=exc)
        with self._lock:
            self._failures[name] = f"{type(exc).__name__}: {exc}"
        self.failed.set()

    def guard(self, name: str, target: Callable[..., Any]) -> Callable[..., None]:
        """``target`` as a thread's target: an exception out of it, or a return before the
        proxy stops, is ``report``-ed instead of ending the thread unseen."""

        def run(*args: Any) -> None:
            try:
                target(*args)
            except BaseException as exc:
                self.report(name, exc)
                return
            if not self._stopping.is_set():
                self.report(name, RuntimeError("the thread's loop returned"))

        return run

    def stats(self) -> dict[str, str]:
        """Thread name -> the error it ended on; empty while every thread serves."""
        with self._lock:
            return dict(self._failures)
