"""eventlet workers: ``zbus.eventlet`` (green sockets) publisher and subscriber.

They are the threads workers of ``_zmq.py`` run on ``zbus.eventlet.Connection`` (the same
API): the publisher sends from the main green thread, the subscriber receives there and its
handlers run in the backend's bounded pool of handler green threads (the default size).
No ``monkey_patch()``: the backend is cooperative without it, and nothing else here needs it.
"""

from __future__ import annotations

import warnings
from typing import Any

from ._zmq import zbus_consumer, zbus_publisher

__all__ = ["zbus_green_consumer", "zbus_green_publisher"]

# eventlet warns on import that it is deprecated upstream (issue 8 says why zbus serves it).
warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")


def zbus_green_publisher(args: dict[str, Any], index: int, results: Any, go: Any,
                         done: Any) -> None:
    zbus_publisher({**args, "backend": "eventlet"}, index, results, go, done)


def zbus_green_consumer(args: dict[str, Any], index: int, results: Any, go: Any,
                        done: Any) -> None:
    zbus_consumer({**args, "backend": "eventlet"}, index, results, go, done)
