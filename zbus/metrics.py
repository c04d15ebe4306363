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

import http.server
import logging
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
    lines += [f"{name}{_labels(labels)} {value:g}" for labels, value in samples]
    return lines


_CONSUMER_COUNTERS = (
    ("received", "Messages read: each message of a verified envelope, one per three-frame "
                 "envelope rejected whole."),
    ("delivered", "Messages whose handlers ran."),
    ("unmatched", "Verified messages no bound pattern matched."),
    ("handler_errors", "Handler calls that raised."),
    ("lost", "Messages missing from streams (one publisher run on one topic), shown by a "
             "later message or a beacon of the stream, net of late arrivals."),
    ("reordered", "Messages that arrived after a later one of the same stream."),
    ("beacons", "Streams' signed 'sent up to N' announcements read."),
)


def render_consumers(consumers: Mapping[str, ConsumerStats]) -> str:
    """Counters of named consumers (``{"billing": subscriber.stats}``) as Prometheus text."""
    out: list[str] = []
    for field, help_text in _CONSUMER_COUNTERS:
        out += family(
            f"zbus_consumer_{field}_total", "counter", help_text,
            (({"consumer": name}, getattr(stats, field)) for name, stats in consumers.items()),
        )
    out += family(
        "zbus_consumer_rejected_total", "counter",
        "Messages rejected, by reason (an envelope rejected whole counts once).",
        (({"consumer": name, "reason": reason}, count)
         for name, stats in consumers.items() for reason, count in sorted(stats.rejected.items())),
    )
    return "\n".join(out) + "\n"


class MetricsServer:
    """``GET /metrics`` on ``host:port`` in a daemon thread, serving ``render()``'s text.

    Port 0 picks a free port (see ``.port``). Bind it to a loopback or an internal address.
    """

    def __init__(self, render: Callable[[], str], host: str, port: int) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "try /metrics")
                    return
                body = render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("metrics request: " + format, *args)

        try:
            self._server = http.server.ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise TransportError(
                f"cannot serve metrics on {host}:{port}: {exc}; choose another port"
            ) from None
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="zbus-metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
