"""Prometheus text exposition of zbus counters, for applications and for the proxy.

    >>> from zbus.metrics import MetricsServer, render_consumers
    >>> server = MetricsServer(lambda: render_consumers({"billing": subscriber.stats}),
    ...                        "127.0.0.1", 9464)

Standard library only: the text format (0.0.4) is small, so nothing extra is installed, and
an application that already runs prometheus-client can serve ``render_consumers``' text from
its own collector instead. Rendering reads the counters without locking: a scrape may see
one consumer's counters a message apart from each other, never torn values.
"""

from __future__ import annotations

import contextlib
import http.server
import logging
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ._dispatch import ConsumerStats
from ._errors import TransportError

__all__ = ["MetricsServer", "family", "render_consumers"]

log = logging.getLogger("zbus.metrics")

Sample = tuple[Mapping[str, str], float]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def family(name: str, kind: str, help_text: str, samples: Iterable[Sample]) -> list[str]:
    """One metric family: its HELP and TYPE lines, then one line per (labels, value)."""
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    lines += [f"{name}{_labels(labels)} {_number(value)}" for labels, value in samples]
    return lines


def _number(value: float) -> str:
    # Integers exactly: "{:g}" keeps six digits, so a counter past a million was shown
    # rounded (1234567 as 1.23457e+06), a counter that lies.
    if isinstance(value, int):
        return str(int(value))  # a bool as 0 or 1
    return f"{value:g}"


_CONSUMER_COUNTERS = (
    ("received", "Messages read: each message of a verified envelope, one per three-frame "
                 "envelope rejected whole."),
    ("delivered", "Messages whose handlers ran."),
    ("unmatched", "Verified messages no bound pattern matched."),
    ("handler_errors", "Handler calls that raised."),
    ("reordered", "Messages that arrived after a later one of the same stream."),
    ("beacons", "Streams' signed 'sent up to N' announcements read."),
    ("repair_requested", "Missing messages asked for (each once), with repair on."),
    ("repaired", "Missing messages that then arrived, by a repair or late."),
    ("unrepairable", "Missing messages given up (past the reliability interval, no longer "
                     "kept, or over max_held): DATALOSS."),
    ("repair_duplicates", "Repairs of messages already had, dropped."),
)
# Gauges: they go down as well as up (a gap filled by a repair or a late arrival).
_CONSUMER_GAUGES = (
    ("lost", "Messages missing from streams (one publisher run on one topic), shown by a "
             "later message or a beacon of the stream, net of late arrivals and repairs."),
    ("held", "Messages received and waiting behind a gap of their stream, for stream order."),
)


def render_consumers(consumers: Mapping[str, ConsumerStats]) -> str:
    """Counters of named consumers (``{"billing": subscriber.stats}``) as Prometheus text."""
    out: list[str] = []
    for field, help_text in _CONSUMER_COUNTERS:
        out += family(
            f"zbus_consumer_{field}_total", "counter", help_text,
            (({"consumer": name}, getattr(stats, field)) for name, stats in consumers.items()),
        )
    for field, help_text in _CONSUMER_GAUGES:
        out += family(
            f"zbus_consumer_{field}", "gauge", help_text,
            (({"consumer": name}, getattr(stats, field)) for name, stats in consumers.items()),
        )
    out += family(
        "zbus_consumer_rejected_total", "counter",
        "Messages rejected, by reason (an envelope rejected whole counts once).",
        (({"consumer": name, "reason": reason}, count)
         for name, stats in consumers.items() for reason, count in sorted(stats.rejected.items())),
    )
    return "\n".join(out) + "\n"


MAX_CONNECTIONS = 64
"""Connections the metrics endpoint serves at once; more are closed at once, and counted."""
CONNECTION_TIMEOUT = 5.0
"""Seconds a connection may stay silent (idle, or slow to send its request) before it is
closed, and counted."""


class _BoundedServer(http.server.ThreadingHTTPServer):
    """A thread per connection, at most ``limit`` at once: one thread and one fd each, so
    that idle clients can never take the process to its fd limit (where libzmq aborts).

    When every slot is taken, the connection silent the longest (no request read yet) is
    closed to make room: idle connections cannot keep a fresh scrape out. Only when every
    slot is busy reading or answering a request is the new one closed unserved."""

    daemon_threads = True
    # socketserver's default backlog of 5 left a flood waiting in the kernel's queue, fresh
    # scrapes behind it; taken at once, the excess is refused (and counted) instead.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: type[http.server.BaseHTTPRequestHandler],
                 limit: int) -> None:
        self.slots = threading.BoundedSemaphore(limit)
        self.lock = threading.Lock()
        self.counts = {"refused": 0, "timed_out": 0, "evicted": 0, "open": 0}
        self.silent: dict[Any, None] = {}  # connections with no request read, oldest first
        super().__init__(address, handler)

    def count(self, what: str, delta: int = 1) -> None:
        with self.lock:
            self.counts[what] += delta

    def spoke(self, request: Any) -> None:
        """``request`` sent its request line: it is no longer the one to evict."""
        with self.lock:
            self.silent.pop(request, None)

    def _evict_one(self) -> bool:
        with self.lock:
            if not self.silent:
                return False
            oldest = next(iter(self.silent))
            del self.silent[oldest]
            self.counts["evicted"] += 1
        with contextlib.suppress(OSError):  # its thread reads end-of-file and frees its slot
            oldest.shutdown(socket.SHUT_RDWR)
        return True

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False) and not (
                self._evict_one() and self.slots.acquire(timeout=1.0)):
            self.count("refused")
            self.shutdown_request(request)
            return
        with self.lock:
            self.counts["open"] += 1
            self.silent[request] = None
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release(request)
            raise

    def _release(self, request: Any) -> None:
        with self.lock:
            self.counts["open"] -= 1
            self.silent.pop(request, None)
        self.slots.release()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("metrics request from %s failed", client_address)


class MetricsServer:
    """``GET /metrics`` on ``host:port`` in a daemon thread, serving ``render()``'s text
    followed by the endpoint's own connection counters.

    Port 0 picks a free port (see ``.port``). Bind it to a loopback or an internal address.
    At most ``max_connections`` are served at once (more are closed and counted in
    ``zbus_metrics_connections_refused_total``); one silent for ``timeout`` seconds is closed
    and counted in ``zbus_metrics_connections_timed_out_total``. ``on_failure(name, exc)``
    is called if the serving thread ends on an error (the proxy then exits, docs/OPERATING.md).
    """

    def __init__(self, render: Callable[[], str], host: str, port: int, *,
                 max_connections: int = MAX_CONNECTIONS, timeout: float = CONNECTION_TIMEOUT,
                 on_failure: Callable[[str, BaseException], None] | None = None) -> None:
        counters = self.counters
        silent_for = timeout

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = silent_for  # StreamRequestHandler sets it on each connection's socket

            def parse_request(self) -> bool:
                server.spoke(self.connection)
                return super().parse_request()

            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "try /metrics")
                    return
                body = (render() + counters()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_error(self, format: str, *args: Any) -> None:
                if format.startswith("Request timed out"):
                    server.count("timed_out")
                log.debug("metrics request: " + format, *args)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("metrics request: " + format, *args)

        try:
            self._server = server = _BoundedServer((host, port), Handler, max_connections)
        except OSError as exc:
            raise TransportError(
                f"cannot serve metrics on {host}:{port}: {exc}; choose another port"
            ) from None
        self.port: int = self._server.server_address[1]
        self._stopping = threading.Event()
        self._on_failure = on_failure
        self._thread = threading.Thread(target=self._serve, name="zbus-metrics", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            self._server.serve_forever()
        except BaseException as exc:
            log.critical("the metrics endpoint's thread failed", exc_info=True)
            if self._on_failure is not None and not self._stopping.is_set():
                self._on_failure("zbus-metrics", exc)

    @property
    def connections(self) -> dict[str, int]:
        """``refused``, ``timed_out``, ``evicted`` (totals) and ``open`` (now)."""
        with self._server.lock:
            return dict(self._server.counts)

    def counters(self) -> str:
        """The endpoint's own connection counters, as Prometheus text."""
        counts = self.connections
        out = family("zbus_metrics_connections_refused_total", "counter",
                     "Connections to the metrics endpoint closed unserved: too many open.",
                     [({}, counts["refused"])])
        out += family("zbus_metrics_connections_timed_out_total", "counter",
                      "Connections to the metrics endpoint closed after being silent too long.",
                      [({}, counts["timed_out"])])
        out += family("zbus_metrics_connections_evicted_total", "counter",
                      "Silent connections closed to make room for a new one (all slots taken).",
                      [({}, counts["evicted"])])
        out += family("zbus_metrics_connections_open", "gauge",
                      "Connections the metrics endpoint serves now.", [({}, counts["open"])])
        return "\n".join(out) + "\n"

    def stop(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
