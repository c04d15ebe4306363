"""``zbus-proxy``: run the proxy for this host until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from types import FrameType

from zbus import Settings, ZbusError, default_run_dir

from ._proxy import Proxy

log = logging.getLogger("zbus.proxy")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = Settings()
    parser = argparse.ArgumentParser(
        prog="zbus-proxy",
        description="Run this host's zbus proxy: ipc sockets under --run-dir, hot path in libzmq.",
    )
    parser.add_argument("--run-dir", default=str(default_run_dir()),
                        help="directory for the ipc sockets and lock file (default: %(default)s)")
    parser.add_argument("--state-dir", default=None,
                        help="where pool declarations persist (default: the run directory)")
    parser.add_argument("--subscriber-hwm", type=int, default=defaults.subscriber_hwm,
                        help="messages queued per subscriber before drops (default: %(default)s)")
    parser.add_argument("--pool-hwm", type=int, default=defaults.pool_hwm,
                        help="messages queued per pool and member (default: %(default)s)")
    parser.add_argument("--publish-hwm", type=int, default=defaults.publish_hwm,
                        help="messages queued per publisher at ingress (default: %(default)s)")
    parser.add_argument("--max-message-bytes", type=int, default=defaults.max_message_bytes,
                        help="largest frame accepted (default: %(default)s)")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default: INFO)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: shutting down", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        settings = Settings(
            subscriber_hwm=args.subscriber_hwm, pool_hwm=args.pool_hwm,
            publish_hwm=args.publish_hwm, max_message_bytes=args.max_message_bytes,
        )
        proxy = Proxy(args.run_dir, settings=settings, state_dir=args.state_dir).start()
    except ZbusError as exc:
        print(f"zbus-proxy: {exc}", file=sys.stderr)
        return 2
    try:
        while not stop.wait(1.0):
            pass
    finally:
        proxy.stop()
    log.info("zbus-proxy stopped")
    return 0
