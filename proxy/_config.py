"""zbus-proxy configuration: a TOML file, overridden by flags, validated with named errors.

Every key, its type and its default is in :data:`SCHEMA`; docs/OPERATING.md and
proxy/example.toml list the same keys (keep the three in step). An unknown key is an error,
never silently ignored, and every error names the key (``limits.pool_hwm``) and what to do.

Logging lives here too: one line per event, text or JSON (``log.format``).
"""

from __future__ import annotations

import difflib
import importlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from zbus import ConfigError, Endpoints, Settings, default_run_dir
from zbus._transport import CurveKeys, read_public_keys

from ._directory import DEFAULT_PORT, FederationConfig, parse_address, parse_peer
from ._proxy import DEFAULT_MAX_POOLS

__all__ = ["SCHEMA", "ProxyConfig", "build_config", "load_toml", "setup_logging"]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")
_POOL_GLOB = re.compile(r"[A-Za-z0-9_\-*?\[\]!]{1,64}")


def _positive_int(value: Any) -> int:
    if type(value) is not int or value <= 0:
        raise ValueError(f"must be a positive integer, got {value!r}")
    return value


def _port(value: Any) -> int:
    if type(value) is not int or not 0 <= value <= 65535:
        raise ValueError(f"must be a TCP port 0..65535 (0: off), got {value!r}")
    return value


def _seconds(value: Any) -> float:
    if type(value) not in (int, float) or value < 0:
        raise ValueError(f"must be a number of seconds >= 0, got {value!r}")
    return float(value)


def _path(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a non-empty path string, got {value!r}")
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a non-empty string, got {value!r}")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")
    return value


def _strings(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"must be a list of non-empty strings, got {value!r}")
    return list(value)


def _choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if not isinstance(value, str) or value.upper() not in (o.upper() for o in options):
            raise ValueError(f"must be one of {', '.join(options)}, got {value!r}")
        return value.upper() if options is LOG_LEVELS else value.lower()

    return check


def _pool_policy(value: Any) -> str | list[str]:
    """"all", "none", or pool names and glob patterns (a list, or one comma-separated
    string as a flag gives it)."""
    if isinstance(value, str) and value.strip().lower() in ("all", "none"):
        return value.strip().lower()
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",")]
    if not isinstance(value, list) or not value or not all(
            isinstance(v, str) and v and _POOL_GLOB.fullmatch(v) for v in value):
        raise ValueError(f"must be \"all\", \"none\" or a list of pool names and glob "
                         f"patterns (A-Z a-z 0-9 _ - and * ? [ ]), got {value!r}")
    return list(value)


_defaults = Settings()


@dataclass(frozen=True)
class Key:
    check: Callable[[Any], Any]
    default: Any
    help: str


SCHEMA: dict[str, Key] = {
    "run_dir": Key(_path, None, "directory of the ipc sockets and the lock file "
                   "(default: $XDG_RUNTIME_DIR/zbus, else <tmp>/zbus-<uid>)"),
    "state_dir": Key(_path, None, "where pool declarations persist (default: run_dir)"),
    "limits.publish_hwm": Key(_positive_int, _defaults.publish_hwm,
                              "messages queued per publisher at ingress"),
    "limits.subscriber_hwm": Key(_positive_int, _defaults.subscriber_hwm,
                                 "messages queued per subscriber before drops"),
    "limits.pool_hwm": Key(_positive_int, _defaults.pool_hwm,
                           "messages queued per pool and per member"),
    "limits.pool_link_hwm": Key(_positive_int, _defaults.pool_link_hwm,
                                "messages a link from a (local or peer) pool origin "
                                "prefetches; lost if the host's last member leaves"),
    "limits.max_message_bytes": Key(_positive_int, _defaults.max_message_bytes,
                                    "largest frame accepted (ZMQ_MAXMSGSIZE)"),
    "limits.max_queue_bytes": Key(_positive_int, _defaults.max_queue_bytes,
                                  "bytes one queue may hold: every high-water mark is at "
                                  "most max_queue_bytes / max_message_bytes messages "
                                  "(default: off, a queue holds up to its hwm of the "
                                  "largest messages)"),
    "limits.max_pools": Key(_positive_int, DEFAULT_MAX_POOLS,
                            "pools (fast and at-least-once together) this proxy serves; a "
                            "fast pool costs ~13 fds: raise the fd limit with it"),
    "limits.linger": Key(_seconds, _defaults.linger,
                         "seconds a closing socket may flush before dropping"),
    "limits.heartbeat_ivl": Key(_seconds, _defaults.heartbeat_ivl,
                                "seconds between ZeroMQ heartbeats"),
    "limits.heartbeat_timeout": Key(_seconds, _defaults.heartbeat_timeout,
                                    "seconds without traffic before a peer is dropped"),
    "network.bind": Key(_string, None, "HOST or HOST:PORT: join other hosts, binding the "
                        f"origin on tcp HOST:PORT (default port {DEFAULT_PORT}) and the peer "
                        "control socket on PORT+1; one interface only, never a wildcard "
                        "unless you write 0.0.0.0 (default: off, this host only)"),
    "network.peers": Key(_strings, [], "static peers, HOST[:PORT][=KEY] (KEY: the peer's Z85 "
                         "public key or a file holding it)"),
    "network.insecure_tcp": Key(_bool, False, "tcp links without CURVE: no encryption, "
                                      "no authentication (logged at WARNING)"),
    "network.sync_interval": Key(_seconds, 1.0, "seconds between directory polls and peer "
                                 "hellos"),
    "network.node_id": Key(_string, None, "this proxy's id among peers (default HOST:PORT)"),
    "network.pools_from_peers": Key(_pool_policy, "all", "pools peers may declare and remove "
                                     "here: all, none, or a list of names and glob patterns "
                                     "(flag: comma-separated); this host's own are unaffected"),
    "curve.secret_key": Key(_path, None, "this proxy's CURVE secret key file (mode 0600; "
                            "make one with --curve-keygen DIR)"),
    "curve.allow": Key(_strings, [], "files (one Z85 public key a line) or directories "
                       "(*.pub) of the keys allowed to connect; static peers' keys are added"),
    "directory.kind": Key(_choice(("static", "redis")), "static", "static (network.peers) "
                          "or redis"),
    "directory.redis_url": Key(_string, None, "redis://HOST:PORT/DB for directory.kind = redis"),
    "directory.ttl": Key(_seconds, 10.0, "seconds a registration lives without a refresh"),
    "directory.prefix": Key(_string, "zbus:proxy:", "Redis key prefix of registrations"),
    "log.level": Key(_choice(LOG_LEVELS), "INFO", "DEBUG, INFO, WARNING or ERROR"),
    "log.format": Key(_choice(LOG_FORMATS), "text", "text or json (one line per event)"),
    "metrics.port": Key(_port, 0, "serve Prometheus metrics on this TCP port (0: off)"),
    "metrics.host": Key(_string, "127.0.0.1", "address the metrics endpoint listens on"),
}

_SECTIONS = sorted({k.split(".")[0] for k in SCHEMA if "." in k})
_PROXY_LIMITS = {"limits.max_pools"}  # the proxy's own, not zbus.Settings fields
_SETTINGS_KEYS = {k: k.split(".", 1)[1] for k in SCHEMA
                  if k.startswith("limits.") and k not in _PROXY_LIMITS}


@dataclass(frozen=True)
class ProxyConfig:
    """The effective configuration: defaults, then the file, then flags."""

    run_dir: Path
    state_dir: Path | None
    settings: Settings
    log_level: str = "INFO"
    log_format: str = "text"
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    max_pools: int = DEFAULT_MAX_POOLS
    source: str | None = None
    federation: FederationConfig | None = None
    values: dict[str, Any] = field(default_factory=dict)
    """Every key's effective value, for --check-config and the start-up log line."""


def _where(source: str | None) -> str:
    return f" in {source}" if source else ""


def _unknown(key: str, source: str | None) -> ConfigError:
    close = difflib.get_close_matches(key, list(SCHEMA), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(
        f"unknown key {key!r}{_where(source)}{hint}; known keys: {', '.join(SCHEMA)}"
    )


def _toml_module() -> Any:
    # tomllib is stdlib from 3.11; on 3.10 the same API is the tomli backport. Imported by name
    # so that type checking for 3.10 does not need tomli installed.
    for name in ("tomllib", "tomli"):
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError:
            continue
    raise ConfigError("reading TOML on Python 3.10 needs tomli: pip install tomli")


def load_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a TOML config file; errors name the file and what is wrong."""
    tomllib = _toml_module()
    try:
        with open(path, "rb") as f:
            data: dict[str, Any] = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    return data


def flatten(data: Mapping[str, Any], source: str | None = None) -> dict[str, Any]:
    """``{"limits": {"pool_hwm": 5}}`` -> ``{"limits.pool_hwm": 5}``, refusing unknown keys."""
    flat: dict[str, Any] = {}
    for name, value in data.items():
        if name in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{name!r}{_where(source)} must be a table ([{name}])")
            for sub, subvalue in value.items():
                key = f"{name}.{sub}"
                if key not in SCHEMA:
                    raise _unknown(key, source)
                flat[key] = subvalue
        elif name in SCHEMA:
            flat[name] = value
        else:
            raise _unknown(name, source)
    return flat


def build_config(
    file_values: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    source: str | None = None,
) -> ProxyConfig:
    """Merge defaults, a parsed TOML document and flag overrides (flat keys, None = unset)."""
    values = {key: spec.default for key, spec in SCHEMA.items()}
    merged = {key: (value, source) for key, value in flatten(file_values or {}, source).items()}
    for key, value in (overrides or {}).items():
        if key not in SCHEMA:
            raise _unknown(key, "command-line flags")
        if value is not None:
            merged[key] = (value, "command-line flags")
    for key, (value, origin) in merged.items():
        try:
            values[key] = SCHEMA[key].check(value)
        except ValueError as exc:
            raise ConfigError(f"key {key!r}{_where(origin)}: {exc}") from None
    if values["run_dir"] is None:
        values["run_dir"] = str(default_run_dir())
    try:
        settings = Settings(**{field: values[key] for key, field in _SETTINGS_KEYS.items()})
    except ConfigError as exc:
        raise ConfigError(f"limits{_where(source)}: {exc}") from None
    if values["limits.heartbeat_timeout"] < values["limits.heartbeat_ivl"]:
        raise ConfigError(
            f"key 'limits.heartbeat_timeout'{_where(source)}: must be at least "
            "limits.heartbeat_ivl, or peers are dropped between heartbeats"
        )
    run_dir = Path(values["run_dir"]).expanduser()
    try:
        Endpoints(run_dir)
    except ConfigError as exc:
        raise ConfigError(f"key 'run_dir'{_where(source)}: {exc}") from None
    state_dir = values["state_dir"]
    federation = _federation(values, source)
    return ProxyConfig(
        run_dir=run_dir,
        state_dir=Path(state_dir).expanduser() if state_dir is not None else None,
        settings=settings,
        log_level=values["log.level"],
        log_format=values["log.format"],
        metrics_port=values["metrics.port"],
        metrics_host=values["metrics.host"],
        max_pools=values["limits.max_pools"],
        source=source,
        federation=federation,
        values=values,
    )


def _federation(values: dict[str, Any], source: str | None) -> FederationConfig | None:
    bind = values["network.bind"]
    if bind is None:
        for key in ("network.peers", "curve.allow"):
            if values[key]:
                raise ConfigError(f"key {key!r}{_where(source)}: needs network.bind "
                                  "(the interface this proxy joins other hosts on)")
        if values["directory.kind"] == "redis":
            raise ConfigError(f"key 'directory.kind'{_where(source)}: redis needs network.bind")
        if values["network.pools_from_peers"] != "all":
            raise ConfigError(f"key 'network.pools_from_peers'{_where(source)}: needs "
                              "network.bind (without it this proxy has no peers)")
        return None
    host, port = parse_address(bind, "network.bind")
    curve = None
    if values["curve.secret_key"] is not None:
        curve = CurveKeys.load(Path(values["curve.secret_key"]).expanduser())
    elif not values["network.insecure_tcp"]:
        raise ConfigError(
            f"key 'network.bind'{_where(source)}: tcp links need a CURVE key: set "
            "curve.secret_key (--curve-secret FILE; make one with `zbus-proxy --curve-keygen "
            "DIR`), or ask for plain tcp explicitly with --insecure-plain-tcp"
        )
    if curve is not None and values["network.insecure_tcp"]:
        raise ConfigError(f"key 'network.insecure_tcp'{_where(source)}: contradicts "
                          "curve.secret_key; choose one")
    allow: set[bytes] = set()
    for path in values["curve.allow"]:
        allow.update(read_public_keys(Path(path).expanduser()))
    peers = tuple(parse_peer(spec) for spec in values["network.peers"])
    return FederationConfig(
        host=host, port=port, peers=peers, curve=curve, allow=frozenset(allow),
        insecure_plain_tcp=values["network.insecure_tcp"],
        directory=values["directory.kind"], redis_url=values["directory.redis_url"] or "",
        redis_prefix=values["directory.prefix"], ttl=values["directory.ttl"],
        sync_interval=max(values["network.sync_interval"], 0.05),
        node_id=values["network.node_id"] or "",
        pools_from_peers=_policy_tuple(values["network.pools_from_peers"]),
    )


def _policy_tuple(policy: str | list[str]) -> tuple[str, ...] | None:
    """network.pools_from_peers as FederationConfig keeps it: None all, () none."""
    if policy == "all":
        return None
    return () if policy == "none" else tuple(policy)


def load_config(path: str | os.PathLike[str] | None,
                overrides: Mapping[str, Any] | None = None) -> ProxyConfig:
    data = load_toml(path) if path is not None else {}
    return build_config(data, overrides, source=str(path) if path is not None else None)


# -- logging ---------------------------------------------------------------------------------


def _iso(created: float) -> str:
    millis = int(created % 1 * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{millis:03d}Z"


_RECORD_FIELDS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def _extra(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, event, then any ``extra=`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
            **_extra(record),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, sort_keys=False)


class TextFormatter(logging.Formatter):
    """``ts LEVEL logger event key=value ...`` on one line (newlines escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [_iso(record.created), record.levelname, record.name, record.getMessage()]
        parts += [f"{k}={json.dumps(v, default=str)}" for k, v in _extra(record).items()]
        if record.exc_info:
            parts.append("exc=" + json.dumps(self.formatException(record.exc_info)))
        return " ".join(parts).replace("\n", "\\n")


def setup_logging(level: str, fmt: str, stream: TextIO | None = None) -> None:
    """Configure the root logger for the daemon (not for library users: only the CLI calls)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
