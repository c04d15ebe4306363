"""``zbus-proxy``: run the proxy for this host until SIGTERM or SIGINT.

Configuration comes from defaults, then ``--config FILE`` (TOML; ``--example-config``
prints the commented example), then flags. Exit codes (docs/OPERATING.md repeats them):

* 0 — stopped cleanly on SIGTERM/SIGINT, or ``--check-config`` found the config valid;
* 2 — the configuration (file or flags) is invalid; the message names the key;
* 3 — the run directory or a socket is taken (another zbus-proxy serves it), or the
  metrics port is;
* 1 — any other failure to start or run, including a service thread that failed.
"""

from __future__ import annotations

import argparse
import importlib.resources
import logging
import os
import signal
import sys
import threading
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from zbus import ConfigError, TransportError, ZbusError, __version__
from zbus._settings import check_private_dir
from zbus._transport import CurveKeys
from zbus.metrics import MetricsServer, family

from ._config import SCHEMA, ProxyConfig, load_config, setup_logging
from ._proxy import Proxy

log = logging.getLogger("zbus.proxy")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_TAKEN = 3

# flag dest -> config key
_FLAG_KEYS = {
    "run_dir": "run_dir",
    "state_dir": "state_dir",
    "publish_hwm": "limits.publish_hwm",
    "subscriber_hwm": "limits.subscriber_hwm",
    "pool_hwm": "limits.pool_hwm",
    "max_message_bytes": "limits.max_message_bytes",
    "max_queue_bytes": "limits.max_queue_bytes",
    "pool_link_hwm": "limits.pool_link_hwm",
    "max_pools": "limits.max_pools",
    "heartbeat_ivl": "limits.heartbeat_ivl",
    "heartbeat_timeout": "limits.heartbeat_timeout",
    "bind": "network.bind",
    "peer": "network.peers",
    "insecure_plain_tcp": "network.insecure_tcp",
    "sync_interval": "network.sync_interval",
    "node_id": "network.node_id",
    "pools_from_peers": "network.pools_from_peers",
    "curve_secret": "curve.secret_key",
    "curve_allow": "curve.allow",
    "directory": "directory.kind",
    "redis_url": "directory.redis_url",
    "directory_ttl": "directory.ttl",
    "log_level": "log.level",
    "log_format": "log.format",
    "metrics_port": "metrics.port",
    "metrics_host": "metrics.host",
}


def render_metrics(stats: dict[str, Any]) -> str:
    """The proxy's counters (the control socket's ``stats``) in Prometheus text format 0.0.4."""
    failures: dict[str, str] = stats.get("service_failures") or {}
    out = family("zbus_proxy_up", "gauge",
                 "1 while the proxy serves; 0 once a service thread failed (it is exiting).",
                 [({}, 0 if failures else 1)])
    out += family("zbus_proxy_service_failures_total", "counter",
                  "Service threads (control, peers, links, at-least-once pools, metrics) "
                  "that ended on an error; the proxy then exits with code 1.",
                  [({"thread": name}, 1) for name in sorted(failures)])
    devices: dict[str, dict[str, int]] = stats.get("devices") or {}
    for unit in ("frames", "bytes"):
        samples = []
        for device in sorted(devices):
            for counter, value in sorted(devices[device].items()):
                side, _, rest = counter.partition("_")
                kind, _, direction = rest.partition("_")
                if kind == unit:
                    samples.append(({"device": device, "side": side, "direction": direction},
                                    value))
        out += family(f"zbus_proxy_device_{unit}_total", "counter",
                      f"{unit.capitalize()} through a proxy device's forwarding loop "
                      "(a message is 3 frames).", samples)
    out += family("zbus_proxy_device_restarts_total", "counter",
                  "Times a device's forwarding loop failed and was started again.",
                  [({"device": name}, n)
                   for name, n in sorted((stats.get("device_restarts") or {}).items())])
    out += family("zbus_proxy_pools", "gauge", "Declared worker pools.",
                  [({}, len(stats.get("pools") or {}))])
    out += family("zbus_proxy_pool_startup_drops_total", "counter",
                  "Messages dropped while pools started.",
                  [({}, stats.get("pool_startup_drops", 0))])
    out += family("zbus_proxy_pools_refused_total", "counter",
                  "Declarations of a new pool refused: limits.max_pools pools were declared.",
                  [({}, stats.get("pools_refused", 0))])
    repair = stats.get("repair") or {}
    out += family("zbus_proxy_repair_total", "counter",
                  "The repair plane: requests asked, forwarded to a keeper here or asked of "
                  "peers, envelopes given, requests for streams nobody here keeps.",
                  [({"what": what}, repair.get(what, 0)) for what in (
                      "asked", "forwarded", "asked_peers", "forwarded_for_peers", "given",
                      "given_bytes", "given_from_peers", "given_to_peers", "unknown",
                      "undeliverable", "publisher_gone", "tails")])
    out += family("zbus_proxy_repair_refused_total", "counter",
                  "Repair-plane messages refused, by reason (malformed, rate).",
                  [({"reason": reason}, n)
                   for reason, n in sorted((repair.get("refused") or {}).items())])
    out += family("zbus_proxy_repair_streams", "gauge",
                  "Streams whose keeping connection this host's repair plane knows.",
                  [({}, repair.get("streams", 0))])
    subscriptions = stats.get("subscriptions") or {}
    out += family("zbus_proxy_subscriptions", "gauge",
                  "Distinct prefixes this host's subscribers hold (asked of every peer too).",
                  [({}, subscriptions.get("prefixes", 0))])
    out += family("zbus_proxy_subscription_bytes", "gauge",
                  "Bytes of those prefixes (libzmq keeps a node per byte, here and on peers).",
                  [({}, subscriptions.get("bytes", 0))])
    return "\n".join(out) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zbus-proxy",
        description="Run this host's zbus proxy: ipc sockets under the run directory, the hot "
        "path in libzmq. Settings come from defaults, then --config, then these flags.",
        epilog="Exit codes: 0 clean stop or valid config, 2 invalid config, 3 run directory "
        "or socket taken by another proxy, or metrics port taken, 1 other failure. See "
        "docs/OPERATING.md.",
    )
    parser.add_argument("--version", action="version", version=f"zbus-proxy {__version__}")
    parser.add_argument("--config", metavar="FILE",
                        help=f"TOML config file; --example-config prints a commented one "
                        f"(installed as {example_config()})")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the config and flags, and that the run and state "
                        "directories can be used (this user's and private, or creatable), "
                        "print the effective values, exit")
    parser.add_argument("--example-config", action="store_true",
                        help="print the example config file (every key, commented) and exit")

    def flag(name: str, key: str, **kwargs: Any) -> None:
        default = SCHEMA[key].default
        shown = f" (default: {default})" if default is not None else ""
        parser.add_argument(name, default=None, help=SCHEMA[key].help + shown, **kwargs)

    flag("--run-dir", "run_dir")
    flag("--state-dir", "state_dir")
    flag("--publish-hwm", "limits.publish_hwm", type=int)
    flag("--subscriber-hwm", "limits.subscriber_hwm", type=int)
    flag("--pool-hwm", "limits.pool_hwm", type=int)
    flag("--max-message-bytes", "limits.max_message_bytes", type=int)
    flag("--max-queue-bytes", "limits.max_queue_bytes", type=int)
    flag("--pool-link-hwm", "limits.pool_link_hwm", type=int)
    flag("--max-pools", "limits.max_pools", type=int)
    flag("--heartbeat-ivl", "limits.heartbeat_ivl", type=float)
    flag("--heartbeat-timeout", "limits.heartbeat_timeout", type=float)
    flag("--bind", "network.bind", metavar="HOST[:PORT]")
    flag("--peer", "network.peers", action="append", metavar="HOST[:PORT][=KEY]")
    flag("--insecure-plain-tcp", "network.insecure_tcp", action="store_const",
         const=True)
    flag("--sync-interval", "network.sync_interval", type=float)
    flag("--node-id", "network.node_id")
    flag("--pools-from-peers", "network.pools_from_peers",
         metavar="all|none|NAME[,GLOB...]")
    flag("--curve-secret", "curve.secret_key", metavar="FILE")
    flag("--curve-allow", "curve.allow", action="append", metavar="PATH")
    flag("--directory", "directory.kind", choices=["static", "redis"])
    flag("--redis-url", "directory.redis_url")
    flag("--directory-ttl", "directory.ttl", type=float)
    parser.add_argument("--curve-keygen", metavar="DIR",
                        help="write a new CURVE key pair, DIR/proxy.pub and DIR/proxy.secret "
                        "(mode 0600), print the public key, and exit")
    flag("--log-level", "log.level")
    flag("--log-format", "log.format", choices=["text", "json"])
    parser.add_argument("--log-json", dest="log_format", action="store_const", const="json",
                        help="same as --log-format json")
    flag("--metrics-port", "metrics.port", type=int)
    flag("--metrics-host", "metrics.host")
    return parser


def config_from_args(args: argparse.Namespace) -> ProxyConfig:
    overrides = {key: getattr(args, dest) for dest, key in _FLAG_KEYS.items()}
    return load_config(args.config, overrides)


_STARTING = "".join(line + "\n" for line in family(
    "zbus_proxy_up", "gauge",
    "1 while the proxy serves; 0 once a service thread failed (it is exiting).", [({}, 0)]))

REDACTED = "<redacted>"


def redact(key: str, value: Any) -> Any:
    """``value`` as ``--check-config`` may print it: a URL's password replaced (the systemd
    unit runs ``--check-config`` in ExecStartPre, so what it prints lands in the journal),
    and any key naming a password or token shown only as set."""
    if value is None:
        return value
    if isinstance(value, str) and "://" in value:
        parts = urllib.parse.urlsplit(value)
        if parts.password is not None:
            user = parts.username or ""
            host = parts.netloc.rpartition("@")[2]
            parts = parts._replace(netloc=f"{user}:{REDACTED}@{host}")
        # redis-py also takes ?password=...
        query = [(k, REDACTED if k.lower() == "password" else v)
                 for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)]
        return urllib.parse.urlunsplit(
            parts._replace(query=urllib.parse.urlencode(query, safe="<>")))
    if any(word in key.rsplit(".", 1)[-1] for word in ("password", "token")):
        return REDACTED
    return value


def describe(config: ProxyConfig) -> str:
    """The effective values, secrets redacted (``redact``)."""
    lines = [f"config OK ({config.source or 'no file: defaults and flags'})"]
    width = max(len(k) for k in config.values)
    for key, value in config.values.items():
        lines.append(f"  {key.ljust(width)} = {redact(key, value)!r}")
    return "\n".join(lines)


def _start_failed(exc: BaseException | None) -> int:
    """Log and print why Proxy.start failed; the exit code (re-raise what is no error)."""
    if isinstance(exc, ConfigError):
        log.error("config error", extra={"error": str(exc)})
        print(f"zbus-proxy: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if isinstance(exc, TransportError):
        log.error("cannot take the run directory", extra={"error": str(exc)})
        print(f"zbus-proxy: {exc}", file=sys.stderr)
        return EXIT_TAKEN
    if isinstance(exc, (NotADirectoryError, FileExistsError)):
        # mkdir's "[Errno 20] Not a directory: PATH" names neither the setting nor why
        text = (f"cannot make the run directory (or state_dir) {exc.filename}: a part of "
                "that path is a file, not a directory; choose another --run-dir")
    elif isinstance(exc, (ZbusError, OSError)):
        text = str(exc)
    else:
        assert exc is not None
        raise exc
    log.error("failed to start", extra={"error": text})
    print(f"zbus-proxy: failed to start: {text}", file=sys.stderr)
    return EXIT_FAILED


def example_config() -> Path:
    """proxy/example.toml, shipped in the package (zbus_proxy/example.toml)."""
    return Path(str(importlib.resources.files(__package__ or "zbus_proxy") / "example.toml"))


def check_dirs(config: ProxyConfig) -> None:
    """What :meth:`Proxy.start` will demand of the run and state directories, without making
    them: an existing one must pass check_private_dir (a real directory, this user's, not
    writable by others); a missing one must be creatable by this user. ConfigError if not."""
    for path, what in ((config.run_dir, "run directory"),
                       (config.state_dir or config.run_dir, "state directory")):
        if os.path.lexists(path):
            check_private_dir(Path(path), what)
            continue
        parent = Path(path).absolute().parent
        while not os.path.lexists(parent):
            parent = parent.parent
        if not parent.is_dir():
            raise ConfigError(f"cannot create the {what} {str(path)!r}: {str(parent)!r} is "
                              "not a directory; choose another --run-dir (or state_dir)")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(
                f"cannot create the {what} {str(path)!r}: uid {os.getuid()} may not write "
                f"in {str(parent)!r}. Create it for this user first (install -d -m 0700 -o "
                f"{os.getuid()} {path}; systemd: RuntimeDirectory=/StateDirectory=), or "
                "choose another --run-dir (or state_dir)"
            )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.example_config:
        sys.stdout.write(example_config().read_text())
        return EXIT_OK
    if args.curve_keygen:
        try:
            public, secret = CurveKeys.generate().write(args.curve_keygen)
        except FileExistsError as exc:
            print(f"zbus-proxy: {exc.filename} exists; not overwriting a key", file=sys.stderr)
            return EXIT_CONFIG
        except OSError as exc:
            print(f"zbus-proxy: cannot write keys: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        print(public.read_text().splitlines()[-1])
        print(f"public key: {public}\nsecret key: {secret} (mode 0600)", file=sys.stderr)
        return EXIT_OK
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"zbus-proxy: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check_config:
        try:
            check_dirs(config)
        except ConfigError as exc:
            print(f"zbus-proxy: config error: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        print(describe(config))
        return EXIT_OK
    setup_logging(config.log_level, config.log_format)

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal received, shutting down", extra={"signal": signum})
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    proxy = Proxy(config.run_dir, settings=config.settings, state_dir=config.state_dir,
                  federation=config.federation, max_pools=config.max_pools)
    # The metrics port first: a busy one fails here, before the proxy takes its run
    # directory or logs that it is ready. Until then a scrape reads zbus_proxy_up 0.
    serving = threading.Event()
    metrics = None
    if config.metrics_port:
        try:
            metrics = MetricsServer(
                lambda: render_metrics(proxy.stats()) if serving.is_set() else _STARTING,
                config.metrics_host, config.metrics_port, on_failure=proxy.health.report)
        except TransportError as exc:
            log.error("cannot serve metrics", extra={"error": str(exc)})
            print(f"zbus-proxy: {exc} (metrics.port, --metrics-port)", file=sys.stderr)
            return EXIT_TAKEN
        log.info("metrics endpoint listening", extra={
            "url": f"http://{config.metrics_host}:{metrics.port}/metrics"})
    try:
        proxy.start()
        serving.set()
    except BaseException:
        if metrics is not None:
            metrics.stop()
        return _start_failed(sys.exc_info()[1])
    try:
        log.info("zbus-proxy started", extra={
            "run_dir": str(config.run_dir), "config": config.source,
            "pools": sorted(proxy.pools),
        })
        # The supervisor restarts a proxy that exits non-zero: a failed service thread
        # (proxy/_guard.py) ends the process rather than leave it up and half dead.
        while not stop.wait(0.2):
            if proxy.health.failed.is_set():
                failures = proxy.health.stats()
                log.critical("a service thread failed: exiting", extra={"failed": failures})
                print(f"zbus-proxy: service thread failed: {failures}", file=sys.stderr)
                return EXIT_FAILED
    except (ZbusError, OSError) as exc:
        log.error("failed", extra={"error": str(exc)})
        print(f"zbus-proxy: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if metrics is not None:
            metrics.stop()
        proxy.stop()
        log.info("zbus-proxy stopped", extra={"run_dir": str(config.run_dir)})
    return EXIT_OK
