"""The ``zbus`` command: demo, tap (sub, types), pub, stats, pools, dead-letters, keygen and
bench.

Every command that talks to the local zbus-proxy finds its run directory, first found first:
``--run-dir``, ``$ZBUS_RUN_DIR``, ``run_dir`` in the proxy's TOML (``--config`` or
``$ZBUS_CONFIG``), :func:`zbus.default_run_dir`; its key: ``--key-file``/``--key-hex``, then
``$ZBUS_KEY_FILE``/``$ZBUS_KEY_HEX``. Exit codes: 0 success, 1 the operation failed (no
proxy, demo books not balanced, ...), 2 a usage or configuration error (bad argument, key
file, payload, config file).

Invariant kept by ``tap``: without a key the signature is *not checked* (the line says
UNVERIFIED), but every other check of the core still runs on the untrusted frames: frame count,
topic names, signature frame shape, bounded msgpack decoding and envelope field types.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import logging
import multiprocessing
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import zmq

from . import __version__
from ._connection import Connection, Publisher
from ._dispatch import ConsumerCore, ConsumerStats, Delivery, Dispatcher
from ._envelope import (
    Envelope,
    decode_batch,
    decode_topic,
    signature_key_id,
    verify_frames,
)
from ._errors import ConfigError, EnvelopeError, ZbusError
from ._keys import DEFAULT_KEY_ID, KeyRing, check_key_dir, format_key_file, generate_key
from ._message import MessageFactory
from ._names import CONTROL_PREFIX, TopicPattern, minimal_prefixes, validate_name
from ._replay import ReplayPolicy
from ._settings import Endpoints, Settings, default_run_dir
from ._transport import CurveKeys, make_socket, wait_for_probe

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class UsageError(ConfigError):
    """A command-line argument is not acceptable (exit code 2)."""


# -- keys ------------------------------------------------------------------------------------


def _unhex(text: str, where: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise UsageError(f"{where}: the key is not hexadecimal") from None


KEY_HEX_ENV = "ZBUS_KEY_HEX"
"""Environment variable holding ``[KEY_ID:]HEX`` when neither --key-file nor --key-hex is
given: unlike an argument, it is not shown to other users by ``ps``."""
KEY_FILE_ENV = "ZBUS_KEY_FILE"
"""Environment variable naming the key file when neither --key-file nor --key-hex is given."""
KEY_ID_ENV = "ZBUS_KEY_ID"
"""Environment variable: the key id that signs (of a key file), or names a bare hex key."""
RUN_DIR_ENV = "ZBUS_RUN_DIR"
CONFIG_ENV = "ZBUS_CONFIG"
"""Environment variable naming the proxy's TOML, read for its ``run_dir`` and limits."""


def _key_hex_text(args: argparse.Namespace) -> tuple[str, str] | None:
    """The ``[KEY_ID:]HEX`` text and where it came from: ``--key-hex -`` reads stdin's first
    line, ``--key-hex VALUE`` takes the argument, else ``$ZBUS_KEY_HEX``; None when none."""
    if args.key_hex == "-":
        if getattr(args, "payload", None) == "-":
            raise UsageError("--key-hex - and PAYLOAD - both read stdin: give the key in "
                             f"${KEY_HEX_ENV} or --key-file instead")
        line = sys.stdin.readline().strip()
        if not line:
            raise UsageError("--key-hex -: stdin held no key (write [KEY_ID:]HEX on its "
                             "first line)")
        return line, "--key-hex -"
    if args.key_hex:
        return args.key_hex, "--key-hex"
    env = os.environ.get(KEY_HEX_ENV, "").strip()
    if env and not args.key_file:
        return env, f"${KEY_HEX_ENV}"
    return None


def _env(name: str) -> str | None:
    return os.environ.get(name, "").strip() or None


def keys_from_args(args: argparse.Namespace, *, required: bool) -> KeyRing | None:
    """The ring to sign or verify with: --key-file or --key-hex, else $ZBUS_KEY_FILE or
    $ZBUS_KEY_HEX (not both); --key-id or $ZBUS_KEY_ID picks the signing key of a file,
    or names a bare hex key."""
    if args.key_file and args.key_hex:
        raise UsageError("give either --key-file or --key-hex, not both")
    key_id = args.key_id or _env(KEY_ID_ENV)
    key_file = args.key_file
    if not key_file and not args.key_hex and (env_file := _env(KEY_FILE_ENV)):
        if _env(KEY_HEX_ENV):
            raise UsageError(f"${KEY_FILE_ENV} and ${KEY_HEX_ENV} are both set: unset one")
        key_file = env_file
    if key_file:
        ring = KeyRing.from_file(key_file)
        if key_id and key_id != ring.active_id:
            if key_id not in ring.ids():
                raise UsageError(f"key id {key_id!r} (--key-id or ${KEY_ID_ENV}) is not in "
                                 f"{key_file}, which holds {ring.ids()}")
            ring = ring.with_active(key_id)
        return ring
    given = _key_hex_text(args)
    if given is not None:
        text, where = given
        named, sep, hexkey = text.rpartition(":")
        return KeyRing.of(_unhex(hexkey, where),
                          named if sep else key_id or DEFAULT_KEY_ID)
    if required:
        raise UsageError(
            "this command signs what it sends: give --key-file FILE (make one with "
            f"'zbus keygen FILE'), --key-hex - (the key on stdin), ${KEY_FILE_ENV} or "
            f"${KEY_HEX_ENV}"
        )
    return None


# -- shared configuration --------------------------------------------------------------------

# What the CLI takes from the proxy's TOML: where it serves, and the largest message it lets
# through (so a big stats reply or dead letter is not refused here).
_CONFIG_KEYS = ("run_dir", "limits.max_message_bytes")


def read_proxy_config(path: str) -> dict[str, Any]:
    """``run_dir`` and ``limits.max_message_bytes`` from the proxy's TOML, checked as the
    proxy checks them (an unknown key is an error there too). Nothing else is read: the CURVE
    secret and the Redis password it may name are the proxy's, not this user's."""
    # The daemon's package ships in the same distribution (see cmd_demo for the import).
    config: Any = importlib.import_module("zbus_proxy._config")
    flat = config.flatten(config.load_toml(path), path)
    values = {}
    for key in _CONFIG_KEYS:
        if key in flat:
            try:
                values[key] = config.SCHEMA[key].check(flat[key])
            except ValueError as exc:
                raise ConfigError(f"key {key!r} in {path}: {exc}") from None
    return values


def resolve_run_dir(args: argparse.Namespace) -> None:
    """Set ``args.run_dir``, ``args.run_dir_from`` and ``args.settings``: flag, then
    environment, then config file, then default."""
    config_path = args.config or _env(CONFIG_ENV)
    from_file = read_proxy_config(config_path) if config_path else {}
    if args.run_dir is not None:
        args.run_dir_from = "--run-dir"
    elif (env := _env(RUN_DIR_ENV)) is not None:
        args.run_dir, args.run_dir_from = env, f"${RUN_DIR_ENV}"
    elif "run_dir" in from_file:
        args.run_dir, args.run_dir_from = from_file["run_dir"], f"run_dir in {config_path}"
    else:
        args.run_dir, args.run_dir_from = str(default_run_dir()), "the default"
    args.run_dir = str(Path(args.run_dir).expanduser())
    limit = from_file.get("limits.max_message_bytes")
    args.settings = Settings() if limit is None else Settings(max_message_bytes=limit)


# -- output helpers --------------------------------------------------------------------------


def _json_default(obj: object) -> Any:
    if isinstance(obj, (bytes, bytearray)):
        return {"$bytes": bytes(obj).hex()}
    return repr(obj)


def _dumps(obj: Any, *, pretty: bool = False) -> str:
    return json.dumps(obj, default=_json_default, ensure_ascii=False, sort_keys=True,
                      indent=2 if pretty else None)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds")


def _err(text: str) -> None:
    print(f"zbus: {text}", file=sys.stderr, flush=True)


def _silence_stdout() -> None:
    """After EPIPE on stdout: point it at /dev/null, so that the interpreter's last flush
    at exit does not print a BrokenPipeError traceback (Python's documented recipe)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


PING_TIMEOUT = 3.0


def _reach(conn: Connection, args: argparse.Namespace, timeout: float) -> dict[str, Any]:
    """Ping the proxy; at once a ProxyError saying why when nothing there can answer (no
    such directory, no socket, permission denied), else a Timeout after ``timeout``."""
    try:
        conn.control.check()
        reply: dict[str, Any] = conn.control.request("ping", timeout)
    except ZbusError as exc:
        where = getattr(args, "run_dir_from", "--run-dir")
        note = "" if where == "--run-dir" else f" [run directory from {where}]"
        raise type(exc)(f"{exc}{note}") from None
    return reply


# -- keygen ----------------------------------------------------------------------------------


def cmd_keygen(args: argparse.Namespace) -> int:
    if args.curve:
        try:
            public, secret = CurveKeys.generate().write(args.file)
        except FileExistsError as exc:
            _err(f"{exc.filename} already exists: zbus keygen never overwrites a key")
            return EXIT_FAILED
        except OSError as exc:
            _err(f"cannot write CURVE keys in {args.file}: {exc}")
            return EXIT_FAILED
        print(f"wrote CURVE public key {public} and secret key {secret} (mode 0600)")
        return EXIT_OK
    key_id = validate_name(args.key_id, "key id")
    path = Path(args.file)
    text = format_key_file(generate_key(), key_id)
    try:
        check_key_dir(str(path))  # a key written there would be refused when read
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except ConfigError as exc:
        _err(str(exc))
        return EXIT_FAILED
    except FileExistsError:
        _err(f"{path} already exists: zbus keygen never overwrites a key; choose another file")
        return EXIT_FAILED
    except OSError as exc:
        _err(f"cannot create {path}: {exc}")
        return EXIT_FAILED
    with os.fdopen(fd, "w", encoding="ascii") as out:
        os.fchmod(out.fileno(), 0o600)  # whatever the umask
        out.write(text)
    print(f"wrote signing key {key_id!r} to {path} (mode 0600)")
    return EXIT_OK


# -- pub -------------------------------------------------------------------------------------


def cmd_pub(args: argparse.Namespace) -> int:
    keys = keys_from_args(args, required=True)
    assert keys is not None
    text = sys.stdin.read() if args.payload == "-" else args.payload
    try:
        payload = json.loads(text)
    except ValueError as exc:
        raise UsageError(
            f"PAYLOAD is not valid JSON ({exc}): quote it for the shell, e.g. "
            "'{\"n\": 1}' or '\"some text\"'"
        ) from None
    if args.count < 1:
        raise UsageError("--count must be at least 1")
    factory = MessageFactory(keys, args.publisher_id)
    frames = [
        factory.frames(args.exchange, args.routing_key, payload,
                       message_type=args.message_type, version=args.type_version)
        for _ in range(args.count)
    ]
    with Connection(args.run_dir, settings=args.settings) as conn:
        _reach(conn, args, PING_TIMEOUT)
        conn.send_many(frames)
    stream_id, following = factory.stream(args.exchange, args.routing_key)
    first = following - args.count
    print(
        f"published {args.count} message(s) to {args.exchange}/{args.routing_key} as "
        f"{args.publisher_id!r} (stream {stream_id.hex()}, sequence {first}"
        + (f"..{first + args.count - 1})" if args.count > 1 else ")")
        + f" signed with key {keys.active_id!r}"
    )
    return EXIT_OK


# -- tap -------------------------------------------------------------------------------------


class Tap:
    """Decodes what a tap receives through :class:`ConsumerCore`: verified with a key, or
    (no key) every check but the HMAC, with the same counters."""

    def __init__(self, patterns: list[TopicPattern], keys: KeyRing | None) -> None:
        self.patterns = patterns
        dispatcher = Dispatcher()
        for p in patterns:
            dispatcher.bind(p.exchange, p.pattern, _noop)
        self.core = ConsumerCore(dispatcher, keys)

    @property
    def stats(self) -> ConsumerStats:
        return self.core.stats

    def prefixes(self) -> list[bytes]:
        return minimal_prefixes(self.patterns)

    def accept(self, frames: list[bytes]) -> tuple[list[dict[str, Any]], list[str]]:
        """The records to show for one received message (several for a batch, none for
        control traffic, beacons and topics no pattern matches), and the reasons of what
        was rejected."""
        before = Counter(self.core.stats.rejected)
        self.core.feed(frames)
        records = []
        while (delivery := self.core.next_ready()) is not None:
            self.core.stats.delivered += 1
            records.append(_record(delivery.exchange, delivery.routing_key, delivery.envelope,
                                   delivery.key_id, verified=delivery.verified))
        return records, list((self.core.stats.rejected - before).elements())


def _noop(delivery: Delivery) -> None:
    pass


def _record(exchange: str, routing_key: str, env: Envelope, key_id: str, *,
            verified: bool) -> dict[str, Any]:
    return {
        "exchange": exchange,
        "routing_key": routing_key,
        "message_id": env.message_id.hex(),
        "publisher_id": env.publisher_id,
        "sequence": env.sequence,
        "timestamp": env.timestamp,
        "message_type": env.message_type,
        "message_type_version": env.message_type_version,
        "key_id": key_id,
        "verified": verified,
        "payload": env.payload,
    }


def format_record(rec: dict[str, Any]) -> str:
    mark = f"verified:{rec['key_id']}" if rec["verified"] else f"UNVERIFIED(key {rec['key_id']})"
    return (
        f"{_iso(rec['timestamp'])} {rec['exchange']}/{rec['routing_key']} "
        f"from={rec['publisher_id']} seq={rec['sequence']} "
        f"type={rec['message_type']}/v{rec['message_type_version']} {mark} "
        f"{_dumps(rec['payload'])}"
    )


def render_record(rec: dict[str, Any], args: argparse.Namespace) -> str:
    """One received message as tap/sub prints it: a readable line, the record as JSON
    (--json, indented with --pretty), or only the payload as JSON (--payload-only)."""
    if args.payload_only:
        return _dumps(rec["payload"], pretty=args.pretty)
    if args.json or args.pretty:
        return _dumps(rec, pretty=args.pretty)
    return format_record(rec)


class TypeSummary:
    """What ``tap --summary`` (``zbus types``) counts: messages per exchange, routing key,
    message type and version, and how many publisher ids sent each (bounded: past
    ``MAX_ROWS`` distinct rows, new ones are counted together as ``other``)."""

    MAX_ROWS = 10_000
    MAX_PUBLISHERS = 1000  # per row; beyond, the row says "1000+"

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str, str, int], tuple[int, set[str]]] = {}
        self.other = 0
        self.total = 0
        self.verified = 0

    def add(self, rec: dict[str, Any]) -> None:
        self.total += 1
        self.verified += bool(rec["verified"])
        row = (rec["exchange"], rec["routing_key"], rec["message_type"],
               rec["message_type_version"])
        held = self.rows.get(row)
        if held is None:
            if len(self.rows) >= self.MAX_ROWS:
                self.other += 1
                return
            held = self.rows[row] = (0, set())
        count, publishers = held
        if len(publishers) < self.MAX_PUBLISHERS:
            publishers.add(rec["publisher_id"])
        self.rows[row] = (count + 1, publishers)

    def as_json(self, seconds: float) -> dict[str, Any]:
        return {"seconds": round(seconds, 3), "messages": self.total,
                "verified": self.verified, "other": self.other,
                "types": [{"exchange": e, "routing_key": k, "message_type": t, "version": v,
                           "messages": n, "publishers": len(p)}
                          for (e, k, t, v), (n, p) in self._sorted()]}

    def _sorted(self) -> list[tuple[tuple[str, str, str, int], tuple[int, set[str]]]]:
        return sorted(self.rows.items(), key=lambda item: (-item[1][0], item[0]))

    def format(self, seconds: float) -> str:
        unverified = self.total - self.verified
        lines = [f"{self.total} message(s) in {seconds:.1f}s"
                 + (f", {unverified} UNVERIFIED (no key given)" if unverified else "")]
        if not self.rows:
            return "\n".join(lines)
        rows = [[e, k, t, str(v), str(n),
                 f"{len(p)}+" if len(p) >= self.MAX_PUBLISHERS else str(len(p))]
                for (e, k, t, v), (n, p) in self._sorted()]
        header = ["EXCHANGE", "ROUTING-KEY", "MESSAGE-TYPE", "VERSION", "MESSAGES",
                  "PUBLISHERS"]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        # Names left-aligned, counts right-aligned.
        lines += ["  " + "  ".join(cell.ljust(w) if i < 3 else cell.rjust(w)
                                   for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
                  for row in [header, *rows]]
        if self.other:
            lines.append(f"  and {self.other} message(s) of types beyond the first "
                         f"{self.MAX_ROWS}")
        return "\n".join(lines)


class _StopRequested(Exception):  # noqa: N818 (a signal, not an error)
    pass


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _StopRequested


def cmd_tap(args: argparse.Namespace) -> int:
    keys = keys_from_args(args, required=False)
    patterns = [TopicPattern.parse(p) for p in args.pattern]
    tap = Tap(patterns, keys)
    settings: Settings = args.settings
    out: TextIO = sys.stdout
    shown = 0
    summary = TypeSummary() if args.summary else None
    if summary is not None and (args.payload_only or args.pretty):
        raise UsageError("--summary prints a table (or with --json one object) at the end: "
                         "--payload-only and --pretty apply to messages, not to it")
    started = time.monotonic()
    signal.signal(signal.SIGTERM, _raise_stop)
    with Connection(args.run_dir, settings=settings) as conn:
        _reach(conn, args, args.ready_timeout)
        sub = make_socket(conn.ctx, zmq.SUB, settings, rcvhwm=settings.subscriber_hwm,
                          connect=conn.endpoints.deliver)
        pending: deque[list[bytes]] = deque()
        try:
            for prefix in tap.prefixes():
                sub.subscribe(prefix)
            token = CONTROL_PREFIX + b"probe/tap-" + os.urandom(8).hex().encode()
            sub.subscribe(token)
            push = make_socket(conn.ctx, zmq.PUSH, settings, connect=conn.endpoints.ingress)
            try:
                wait_for_probe(sub, push, token, args.ready_timeout, pending.append, "tap")
            finally:
                push.close(linger=0)
                sub.unsubscribe(token)
            mode = f"verifying with keys {keys.ids()}" if keys else "UNVERIFIED: no key given"
            print(f"READY tapping {' '.join(map(str, patterns))} on {conn.endpoints.run_dir} "
                  f"({mode})", file=sys.stderr, flush=True)
            started = time.monotonic()  # --summary's window: from when it is live
            deadline = None if args.timeout is None else time.monotonic() + args.timeout
            while args.count is None or shown < args.count:
                if pending:
                    frames = pending.popleft()
                else:
                    wait = 200
                    if deadline is not None:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        wait = min(wait, int(left * 1000) + 1)
                    if not sub.poll(wait):
                        continue
                    frames = sub.recv_multipart()
                records, reasons = tap.accept(frames)
                for reason in reasons:
                    print(f"REJECTED {reason}", file=sys.stderr, flush=True)
                for record in records:
                    if summary is not None:
                        summary.add(record)
                    else:
                        out.write(render_record(record, args) + "\n")
                    shown += 1
                if summary is None:
                    out.flush()
        except (KeyboardInterrupt, _StopRequested):
            pass
        except BrokenPipeError:  # the reader left ('zbus tap ... | head -1'): done
            _silence_stdout()
        finally:
            sub.close(linger=0)
    if summary is not None:
        took = time.monotonic() - started
        try:
            print(_dumps(summary.as_json(took)) if args.json else summary.format(took),
                  flush=True)
        except BrokenPipeError:
            _silence_stdout()
    s = tap.stats
    print(f"tap: shown {shown}, lost {s.lost}, unmatched {s.unmatched}, "
          f"rejected {dict(s.rejected) or 0}, repaired {s.repaired}, unrepairable "
          f"{s.unrepairable}", file=sys.stderr, flush=True)
    return EXIT_OK


# -- stats -----------------------------------------------------------------------------------

# The devices count ZeroMQ frames (libzmq's proxy loop sees no messages): the columns say
# so, and ~MSGS-IN divides by the 3 frames of a message for those who think in messages.
_DEVICE_COLUMNS = (
    ("FRAMES-IN", "frontend_frames_in"),
    ("FRAMES-OUT", "backend_frames_out"),
    ("BYTES-IN", "frontend_bytes_in"),
    ("UPSTREAM-FRAMES", "backend_frames_in"),
)


def format_stats(stats: dict[str, Any], previous: dict[str, Any] | None = None,
                 interval: float | None = None) -> str:
    """The proxy's counters as a table (frames; a message is 3 frames, a probe 1)."""
    lines = [f"zbus-proxy pid {stats.get('pid')} on {stats.get('run_dir')} "
             "(counters since it started)"]
    devices: dict[str, dict[str, int]] = stats.get("devices") or {}
    rate = previous is not None and bool(interval)
    header = (["DEVICE"] + [c for c, _ in _DEVICE_COLUMNS] + ["~MSGS-IN"]
              + (["FRAMES-IN/s"] if rate else []))
    rows: list[list[str]] = [header]
    for name in sorted(devices, key=lambda n: (n.startswith("pool-"), n)):
        counters = devices[name]
        row = [name] + [str(counters.get(field, "-")) for _, field in _DEVICE_COLUMNS]
        frames_in = counters.get("frontend_frames_in")
        row.append("-" if frames_in is None else str(frames_in // 3))
        if rate and previous is not None and interval:
            before = (previous.get("devices") or {}).get(name, {}).get("frontend_frames_in", 0)
            row.append(f"{(counters.get('frontend_frames_in', 0) - before) / interval:.0f}")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for row in rows:
        lines.append("  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ))
    lines.extend([
        "Counted in ZeroMQ frames, not messages: a message is 3 frames (so is an envelope",
        "batching several), a readiness probe 1; ~MSGS-IN is FRAMES-IN/3. FRAMES-IN: from",
        "publishers (or the plane upstream); FRAMES-OUT: passed on; UPSTREAM-FRAMES:",
        "subscriptions and returns. Consumers count messages (zbus tap, stats.received).",
    ])
    pools: dict[str, list[str]] = stats.get("pools") or {}
    lines.append(f"pools: {len(pools)}")
    for name in sorted(pools):
        lines.append(f"  {name}: {', '.join(pools[name])}")
    lines.extend(_format_fast(stats.get("fast_pools") or {}))
    drops = stats.get("pool_startup_drops")
    if drops:
        lines.append(f"pool start-up drops: {drops}")
    lines.extend(_format_reliable(stats.get("reliable_pools") or {}))
    lines.extend(_format_repair(stats.get("repair")))
    lines.extend(_format_peers(stats.get("federation")))
    return "\n".join(lines)


def _format_repair(repair: dict[str, Any] | None) -> list[str]:
    """The repair plane (docs/RELIABILITY.md, "Repair"): what was asked and given here."""
    if not repair:
        return []
    refused = repair.get("refused") or {}
    return [
        f"repair: {repair.get('keepers', 0)} publishing connection(s) keep "
        f"{repair.get('retained_bytes', 0):,} bytes of {repair.get('streams', 0)} stream(s); "
        f"requests {repair.get('asked', 0)} (to peers {repair.get('asked_peers', 0)}, "
        f"nobody here keeps it {repair.get('unknown', 0)}), envelopes given "
        f"{repair.get('given', 0)} (from peers {repair.get('given_from_peers', 0)}), "
        f"refused {sum(refused.values())}",
        "  each subscriber counts its own: repair_requested, repaired, unrepairable "
        "(zbus tap prints them when it ends; a Subscriber's counters())",
    ]


def _format_peers(federation: dict[str, Any] | None) -> list[str]:
    """This proxy's peers and their liveness (absent on a proxy that does not federate)."""
    if not federation:
        return []
    peers: dict[str, dict[str, Any]] = federation.get("peers") or {}
    lines = [f"node {federation.get('node')} (origin {federation.get('origin')}): "
             f"{len(peers)} peer(s)"]
    if not peers:
        return lines
    now = time.time()
    rows = []
    for pid in sorted(peers):
        peer = peers[pid]
        state = ("refused" if peer.get("refused") else
                 "alive" if peer.get("alive") else "away")
        last = peer.get("last_hello")
        rows.append([pid, str(peer.get("origin", "-")), state, str(peer.get("missed", 0)),
                     "-" if last is None else f"{now - last:.1f}s ago"])
    return lines + _table(["PEER", "ORIGIN", "STATE", "MISSED HELLOS", "LAST HELLO"], rows)


# members_lost counts every disconnect the members' PUSH saw: a socket monitor cannot tell
# a crash from a clean close. A member that closes cleanly also sends a final report
# (members_closed), so both are shown, and the difference is the members that went away
# without a goodbye.
_FAST_COLUMNS = (
    ("MEMBERS", "members"),
    ("HANDED-OUT", "handed_out"),
    ("REPORTED", "reported"),
    ("UNACCOUNTED", "unaccounted"),
    ("DISCONNECTS", "members_lost"),
    ("GOODBYES", "members_closed"),
)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    rows = [header, *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return ["  " + "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                             for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
            for row in rows]


def _format_fast(pools: dict[str, dict[str, Any]]) -> list[str]:
    """The fast pools' receipts accounting (docs/RELIABILITY.md): one row each."""
    if not pools:
        return []
    rows = [[name] + ["-" if pools[name].get(field) is None else str(pools[name][field])
                      for _, field in _FAST_COLUMNS] for name in sorted(pools)]
    return [*_table(["POOL"] + [c for c, _ in _FAST_COLUMNS], rows),
            "  UNACCOUNTED: handed to members and not reported received by them: lost with "
            "dead members once the pool is quiet and live members have reported",
            "  DISCONNECTS: members' connections that ended, clean leaves and crashes alike; "
            "GOODBYES: members that closed cleanly (final report); DISCONNECTS - GOODBYES: "
            "members gone without a goodbye, once both have arrived"]


_RELIABLE_COLUMNS = (
    ("IN FLIGHT", "in_flight"),
    ("QUEUED", "queued"),
    ("ACCEPTED", "accepted"),
    ("ACKED", "acked"),
    ("REDELIVERED", "redelivered"),
    ("DEAD-LETTERED", "dead_lettered"),
    ("OVERFLOW", "overflow"),
)


def _format_reliable(pools: dict[str, dict[str, Any]]) -> list[str]:
    """The at-least-once pools: one row each, then their bindings and options."""
    lines = [f"at-least-once pools: {len(pools)}"]
    if not pools:
        return lines
    header = ["POOL", "MEMBERS"] + [c for c, _ in _RELIABLE_COLUMNS]
    rows = [header]
    for name in sorted(pools):
        p = pools[name]
        members = p.get("members")
        rows.append([name, str(len(members) if isinstance(members, dict) else "-")]
                    + [str(p.get(field, "-")) for _, field in _RELIABLE_COLUMNS])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for row in rows:
        lines.append("  " + "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ))
    for name in sorted(pools):
        p = pools[name]
        lines.append(f"  {name}: {', '.join(p.get('bindings') or [])} (ack_timeout "
                     f"{p.get('ack_timeout')}s, max_attempts {p.get('max_attempts')}, "
                     f"dead letters held {p.get('dead_letters', 0)})")
    return lines


def cmd_stats(args: argparse.Namespace) -> int:
    if args.watch is not None and args.watch <= 0:
        raise UsageError("--watch needs a positive number of seconds")
    with Connection(args.run_dir, settings=args.settings) as conn:
        _reach(conn, args, args.timeout)
        previous: dict[str, Any] | None = None
        try:
            while True:
                stats = conn.proxy_stats(args.timeout)
                stats.pop("ok", None)
                if args.json:
                    print(_dumps({"time": time.time(), **stats}), flush=True)
                else:
                    if args.watch is not None and sys.stdout.isatty():
                        sys.stdout.write("\033[H\033[J")
                    print(format_stats(stats, previous, args.watch), flush=True)
                if args.watch is None:
                    return EXIT_OK
                if not sys.stdout.isatty() and not args.json:
                    print(flush=True)
                previous = stats
                time.sleep(args.watch)  # a refresh interval, not synchronisation
        except KeyboardInterrupt:
            return EXIT_OK


# -- pools -----------------------------------------------------------------------------------


def _pools_connection(args: argparse.Namespace) -> Connection:
    return Connection(args.run_dir, settings=getattr(args, "settings", None))


def cmd_pools(args: argparse.Namespace) -> int:
    """zbus pools list | declare NAME BINDING... | remove NAME [--fabric]."""
    if args.pools_command == "declare":
        bindings = sorted({str(TopicPattern.parse(b)) for b in args.bindings})
        validate_name(args.name, "pool name")
        if not args.at_least_once and (args.ack_timeout is not None
                                       or args.max_attempts is not None):
            raise UsageError("--ack-timeout and --max-attempts are options of an "
                             "at-least-once pool: add --at-least-once")
    with _pools_connection(args) as conn:
        if args.pools_command == "declare" and args.at_least_once:
            options = {k: v for k, v in (("ack_timeout", args.ack_timeout),
                                         ("max_attempts", args.max_attempts)) if v is not None}
            created = conn.declare_reliable_pool(args.name, bindings, args.timeout, **options)
            print(f"at-least-once pool {args.name} "
                  f"{'declared' if created else 'already declared'} with {' '.join(bindings)}")
            return EXIT_OK
        if args.pools_command == "declare":
            conn.declare_pool(args.name, bindings, args.timeout)
            print(f"pool {args.name} declared with {' '.join(bindings)}")
            return EXIT_OK
        if args.pools_command == "remove":
            reply = conn.control.request("remove_pool", args.timeout,
                                         name=validate_name(args.name, "pool name"),
                                         fabric=args.fabric)
            where = ("here and on every peer (they refuse its older declarations too)"
                     if reply.get("fabric") else "on this host")
            print(f"{reply.get('kind', 'fast')} pool {args.name} "
                  f"({' '.join(reply.get('bindings') or [])}) removed {where}")
            return EXIT_OK
        reply = conn.control.request("pools", args.timeout)
    reply.pop("ok", None)
    if args.json:
        print(_dumps(reply))
        return EXIT_OK
    print("\n".join(format_pools(reply)))
    return EXIT_OK


def _left_table(header: list[str], rows: list[list[str]]) -> list[str]:
    rows = [header, *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]


def format_pools(reply: dict[str, Any]) -> list[str]:
    """The ``pools`` control reply as tables: declared pools, then removed ones."""
    fast: dict[str, list[str]] = reply.get("pools") or {}
    reliable: dict[str, dict[str, Any]] = reply.get("reliable_pools") or {}
    generations: dict[str, int] = reply.get("generations") or {}
    removed: dict[str, dict[str, Any]] = reply.get("removed") or {}
    rows = [[name, "fast", str(generations.get(name, "")), " ".join(fast[name])]
            for name in sorted(fast)]
    rows += [[name, "at-least-once", "", " ".join(reliable[name].get("bindings") or [])]
             for name in sorted(reliable)]
    lines = (_left_table(["POOL", "KIND", "GENERATION", "BINDINGS"], rows) if rows
             else ["no pools declared"])
    if removed:
        lines += ["", "removed (a peer's older declaration of these bindings is refused):"]
        lines += _left_table(["POOL", "WHERE", "GENERATION", "BINDINGS"], [
            [name, "fabric" if t.get("fabric") else "this host", str(t.get("generation")),
             " ".join(t.get("bindings") or [])] for name, t in sorted(removed.items())])
    return lines


# -- dead-letters ----------------------------------------------------------------------------

# Consumers' default freshness window (ReplayPolicy.max_age): a replayed message older than
# this is rejected as stale by members that keep the default, and acknowledged as bad input.
_DEFAULT_MAX_AGE = ReplayPolicy().max_age


def decode_dead_letter(dead: dict[str, Any], keys: KeyRing | None) -> dict[str, Any]:
    """A ``dead_letters`` entry with its message decoded: verified with ``keys`` (or, with
    none, every check but the HMAC, as tap does); ``error`` says why it did not decode."""
    out = {k: dead.get(k) for k in ("position", "attempts", "reason", "size")}
    frames = dead.get("frames") or []
    if dead.get("truncated"):
        out["error"] = (f"its frames ({dead.get('size')} bytes) are larger than a control "
                        "reply may carry: read it with zbus.Connection.dead_letters over a "
                        "connection with a larger max_message_bytes")
        return out
    try:
        if len(frames) != 3:
            raise EnvelopeError(f"{len(frames)} frames, not 3")
        topic, envelope, signature = frames
        exchange, routing_key = decode_topic(topic)
        if keys is not None:
            key_id, verified = verify_frames(keys, topic, envelope, signature), True
        else:
            key_id, verified = signature_key_id(signature), False
        batch = decode_batch(envelope)
    except ZbusError as exc:
        out["error"] = str(exc)
        return out
    messages = [_record(exchange, routing_key, env, key_id, verified=verified)
                for env in batch.envelopes()]
    out["messages"] = messages
    return out


def format_dead_letter(entry: dict[str, Any], now: float) -> str:
    head = (f"#{entry['position']} attempts={entry['attempts']} reason={entry['reason']} "
            f"size={entry['size']}")
    if "error" in entry:
        return f"{head} NOT DECODED: {entry['error']}"
    return "\n".join(f"{head} age={now - rec['timestamp']:.0f}s {format_record(rec)}"
                     for rec in entry["messages"])


def cmd_dead_letters(args: argparse.Namespace) -> int:
    """zbus dead-letters list | replay | purge POOL."""
    pool = validate_name(args.pool, "pool name")
    if args.dead_command == "list":
        keys = keys_from_args(args, required=False)
        with _pools_connection(args) as conn:
            _reach(conn, args, args.timeout)
            held = conn.dead_letters(pool, args.timeout)
        now = time.time()
        for dead in held:
            entry = decode_dead_letter(dead, keys)
            print(_dumps(entry, pretty=args.pretty) if args.json or args.pretty
                  else format_dead_letter(entry, now), flush=True)
        if not (args.json or args.pretty):
            mode = f"verified with keys {keys.ids()}" if keys else "UNVERIFIED: no key given"
            print(f"{len(held)} dead letter(s) in pool {pool} ({mode})", file=sys.stderr)
        return EXIT_OK
    if args.count is not None and args.count < 1:
        raise UsageError("--count must be at least 1")
    replay = args.dead_command == "replay"
    op = "replay_dead_letters" if replay else "purge_dead_letters"
    if not replay and not args.yes:
        raise UsageError(
            f"purge drops dead letters of pool {pool} for good: add --yes to do it, or "
            f"see them first with 'zbus dead-letters list {pool}'")
    with _pools_connection(args) as conn:
        _reach(conn, args, args.timeout)
        if replay:
            _warn_stale(conn, pool, args.timeout)
        moved, before, full = 0, None, False
        reply: dict[str, Any] = {}
        while args.count is None or moved < args.count:
            limit = 1000 if args.count is None else min(1000, args.count - moved)
            fields: dict[str, Any] = {"name": pool, "limit": limit}
            if before is not None:
                fields["before"] = before
            reply = conn.control.request(op, args.timeout, **fields)
            took = int(reply.get("replayed" if replay else "purged", 0))
            moved += took
            before = reply["end"] if before is None else before  # those held at the start
            full = bool(reply.get("full"))
            if took < limit or full:
                break
    held = reply.get("held", 0)
    if replay:
        print(f"replayed {moved} dead letter(s) of pool {pool} into its queue "
              f"({held} still held)")
        if full:
            _err(f"pool {pool}'s queue is full (its max_pending): the rest stay dead letters; "
                 "replay again once its members have taken the queue")
            return EXIT_FAILED
        return EXIT_OK
    print(f"purged {moved} dead letter(s) of pool {pool} ({held} still held)")
    return EXIT_OK


def _warn_stale(conn: Connection, pool: str, timeout: float) -> None:
    """Say when the oldest dead letter is older than consumers' default freshness window:
    members that keep it reject the replayed message as stale (and acknowledge it)."""
    first = conn.control.request("dead_letters", timeout, name=pool, limit=1)
    held = first.get("dead_letters") or []
    if not held or _DEFAULT_MAX_AGE is None:
        return
    entry = decode_dead_letter(held[0], None)
    if "messages" not in entry:
        return
    age = time.time() - min(rec["timestamp"] for rec in entry["messages"])
    if age > _DEFAULT_MAX_AGE:
        _err(f"warning: the oldest dead letter was published {age:.0f}s ago; members with "
             f"the default ReplayPolicy(max_age={_DEFAULT_MAX_AGE:g}) reject it as stale (and "
             "acknowledge it): give the pool's members Settings(replay=ReplayPolicy(max_age="
             "...)) long enough before replaying")


# -- demo ------------------------------------------------------------------------------------

DEMO_EXCHANGE = "notifications"
DEMO_KEYS = ("compute.instance.create.end", "compute.instance.delete.end")
DEMO_PATTERN = "compute.instance.#"
DEMO_POOL = "demo-workers"


def _demo_child(role: str, name: str, run_dir: str, key: bytes, ready: Any, stop: Any,
                progress: Any, results: Any) -> None:
    """One demo consumer process (spawned): subscribe or join the pool, report, exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    logging.getLogger("zbus").addHandler(logging.NullHandler())  # counters tell the story
    per_key: Counter[str] = Counter()
    sequences: list[int] = []

    def handle(delivery: Delivery) -> None:
        per_key[delivery.routing_key] += 1
        # The publisher numbers the demo's messages in the payload: an independent count
        # (zbus's own sequences are per topic).
        sequences.append(delivery.payload["n"])

    try:
        dispatcher = Dispatcher()
        dispatcher.bind(DEMO_EXCHANGE, DEMO_PATTERN, handle)
        with Connection(run_dir) as conn:
            consumer = (conn.subscribe(dispatcher, key) if role == "subscriber"
                        else conn.join_pool(DEMO_POOL, dispatcher, key))
            with consumer:
                consumer.ready(timeout=20)
                ready.put(name)
                while not stop.is_set():
                    consumer.process(0.02)
                    progress.value = consumer.stats.received
                results.put({"name": name, "role": role, "per_key": dict(per_key),
                             "sequences": sequences, "stats": consumer.stats.as_dict()})
    except Exception as exc:
        ready.put(name)  # unblock the parent; the error below explains
        results.put({"name": name, "role": role, "error": f"{type(exc).__name__}: {exc}"})


def _short_tmp() -> str:
    return "/tmp" if os.path.isdir("/tmp") and os.access("/tmp", os.W_OK) else tempfile.gettempdir()


def cmd_demo(args: argparse.Namespace) -> int:
    # The daemon's package ships in the same distribution; imported by name because mypy
    # cannot follow the editable install's package-dir mapping (proxy/ -> zbus_proxy).
    proxy_class: Any = importlib.import_module("zbus_proxy").Proxy

    n, forged = args.count, args.forged
    if n < 1 or forged < 0:
        raise UsageError("--count must be at least 1 and --forged at least 0")
    say: Callable[[str], None] = lambda text: print(text, flush=True)  # noqa: E731
    temp = None if args.run_dir_given else tempfile.mkdtemp(prefix="zbus-demo-", dir=_short_tmp())
    run_dir = Path(temp if temp is not None else args.run_dir)
    mp = multiprocessing.get_context("spawn")
    ready, results = mp.Queue(), mp.Queue()
    stop = mp.Event()
    procs: list[Any] = []
    progress: dict[str, Any] = {}
    key = generate_key()
    try:
        with proxy_class(run_dir) as proxy:
            say(f"zbus demo: embedded proxy on {run_dir} (pid {os.getpid()})")
            t0 = time.monotonic()
            roles = [("subscriber", f"subscriber-{i}") for i in (1, 2)] + [
                ("worker", f"worker-{i}") for i in (1, 2, 3)]
            for role, name in roles:
                progress[name] = mp.Value("q", 0)
                proc = mp.Process(
                    target=_demo_child, name=name, daemon=True,
                    args=(role, name, str(run_dir), key, ready, stop, progress[name], results),
                )
                proc.start()
                procs.append(proc)
            for _ in roles:
                ready.get(timeout=args.timeout)
            say(f"  2 fan-out subscribers and a pool of 3 workers ({DEMO_POOL!r}) in separate "
                f"processes, all ready in {time.monotonic() - t0:.2f}s")

            t1 = time.monotonic()
            forger = MessageFactory(generate_key(), "demo-forger")
            forged_at = {(i + 1) * n // (forged + 1) for i in range(forged)}
            with Connection(run_dir) as conn:
                publisher = Publisher(conn.exchange(DEMO_EXCHANGE),
                                      MessageFactory(key, "demo-publisher"))
                for i in range(n):
                    if i in forged_at:
                        conn.send_frames(forger.frames(DEMO_EXCHANGE, DEMO_KEYS[0], {"n": -1}))
                    publisher.send(DEMO_KEYS[i % 2], {"n": i + 1, "instance": f"vm-{i + 1}"})
                sent_in = time.monotonic() - t1
                say(f"  published {n} signed messages on {DEMO_EXCHANGE}/"
                    f"{{{','.join(DEMO_KEYS)}}} and {forged} forged (wrong key) "
                    f"in {sent_in:.2f}s")
                expected = n + forged
                subs = [name for role, name in roles if role == "subscriber"]
                workers = [name for role, name in roles if role == "worker"]
                deadline = time.monotonic() + args.timeout
                while time.monotonic() < deadline:
                    if all(progress[s].value >= expected for s in subs) and sum(
                            progress[w].value for w in workers) >= expected:
                        break
                    if any(not p.is_alive() for p in procs):
                        break
                    time.sleep(0.01)  # polling shared counters, not synchronising
                took = time.monotonic() - t1
                time.sleep(0.05)  # grace: a duplicate, if any, would show up in the books
            stop.set()
            reports = {}
            for _ in roles:
                try:
                    r = results.get(timeout=10)
                except queue.Empty:
                    break
                reports[r["name"]] = r
            devices = proxy.stats()["devices"]
        for proc in procs:
            proc.join(5)
        return _demo_books(say, n, forged, roles, reports, devices, took)
    except KeyboardInterrupt:
        _err("demo interrupted")
        return EXIT_FAILED
    finally:
        stop.set()
        for proc in procs:
            proc.join(2)
            if proc.is_alive():
                proc.terminate()
                proc.join(2)
        ready.close()
        results.close()
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


def _demo_books(say: Callable[[str], None], n: int, forged: int, roles: list[tuple[str, str]],
                reports: dict[str, dict[str, Any]], devices: dict[str, dict[str, int]],
                took: float) -> int:
    problems: list[str] = []
    everything = set(range(1, n + 1))
    say(f"\nfan-out subscribers (each must get all {n}, in publish order):")
    for role, name in roles:
        r = reports.get(name)
        if r is None or "error" in r:
            problems.append(f"{name} failed: {r['error'] if r else 'no report'}")
            continue
        stats, seqs = r["stats"], r["sequences"]
        if role != "subscriber":
            continue
        rejected = sum(stats["rejected"].values())
        if rejected != forged:
            problems.append(f"{name} rejected {rejected} messages, expected {forged}")
        in_order = all(a < b for a, b in itertools.pairwise(seqs))
        got = len(seqs)
        say(f"  {name}: received {got}/{n}  in order: {'yes' if in_order else 'NO'}  "
            f"lost: {stats['lost']}  forged rejected: {rejected}  "
            f"per key: {_per_key(r['per_key'])}")
        if got != n or set(seqs) != everything or not in_order or stats["lost"]:
            problems.append(f"{name} received {got}/{n} (in order: {in_order}, "
                            f"lost {stats['lost']})")
    say(f"worker pool {DEMO_POOL!r} (each message to exactly one worker):")
    pool_seqs: list[int] = []
    pool_rejected = 0
    for role, name in roles:
        r = reports.get(name)
        if role != "worker" or r is None or "error" in r:
            continue
        pool_seqs += r["sequences"]
        rejected = sum(r["stats"]["rejected"].values())
        pool_rejected += rejected
        say(f"  {name}: share {len(r['sequences'])}  forged rejected: {rejected}  "
            f"per key: {_per_key(r['per_key'])}")
    once = len(pool_seqs) == n and set(pool_seqs) == everything
    say(f"  pool total: {len(pool_seqs)}/{n}, each message exactly once: "
        f"{'yes' if once else 'NO'}; forged rejected: {pool_rejected}/{forged}")
    if not once:
        dup = len(pool_seqs) - len(set(pool_seqs))
        problems.append(f"the pool got {len(pool_seqs)} messages for {n} "
                        f"({dup} duplicates, {len(everything - set(pool_seqs))} missing)")
    if pool_rejected != forged:
        problems.append(f"the pool rejected {pool_rejected} forged messages, expected {forged}")
    say("proxy counters (frames: 3 per message, 1 per readiness probe):")
    for name in sorted(devices, key=lambda d: (d.startswith("pool-"), d)):
        c = devices[name]
        say(f"  {name:<26} in {c.get('frontend_frames_in', 0):>7}  "
            f"out {c.get('backend_frames_out', 0):>7}")
    say(f"delivered everything in {took:.2f}s")
    if problems:
        say("BOOKS DO NOT BALANCE: " + "; ".join(problems))
        return EXIT_FAILED
    say(f"books balance: each subscriber got all {n} in order, the pool got each of the {n} "
        f"exactly once, and every one of the {forged} forged messages was rejected")
    return EXIT_OK


def _per_key(per_key: dict[str, int]) -> str:
    return ", ".join(f"{k.split('.')[-2]}={v}" for k, v in sorted(per_key.items())) or "-"


BENCH_HELP = """\
usage: zbus bench [ARGS]

Run the benchmark suite, 'python -m bench ARGS', from the working directory. The bench
ships with the zbus source tree, not the wheel: run it from the root of a checkout, where
'zbus bench --help' shows the bench's own options (scenarios, --list, --only, ...).
bench/README.md there explains the scenarios and holds the latest figures.
"""


def cmd_bench(args: argparse.Namespace) -> int:
    """``python -m bench ARGS`` in the working directory, when it is a zbus source tree."""
    here = Path.cwd()
    if not (here / "bench" / "__main__.py").is_file() or \
            not (here / "bench" / "_scenarios.py").is_file():
        if not args.bench_args or args.bench_args[0] in ("-h", "--help"):
            print(BENCH_HELP + f"\n{here} is not a checkout's root: there is no bench/ here.")
            return EXIT_OK
        _err("no bench/ in the working directory: the bench ships with the zbus source tree, "
             "not the wheel; run 'zbus bench' (or 'python -m bench') from a checkout's root")
        return EXIT_FAILED
    return subprocess.call([sys.executable, "-m", "bench", *args.bench_args], cwd=here)


# -- argument parsing ------------------------------------------------------------------------


def _add_run_dir(p: argparse.ArgumentParser) -> None:
    """--run-dir and --config; main() resolves them (resolve_run_dir)."""
    p.add_argument("--run-dir", default=None, metavar="DIR",
                   help=f"the local zbus-proxy's run directory (default: ${RUN_DIR_ENV}, "
                   f"else run_dir in --config, else {default_run_dir()})")
    p.add_argument("--config", metavar="FILE",
                   help="the proxy's TOML config (as zbus-proxy --config takes): its run_dir "
                   f"and limits.max_message_bytes are used (default: ${CONFIG_ENV}, if set)")


def _add_keys(p: argparse.ArgumentParser, verb: str) -> None:
    p.add_argument("--key-file", metavar="FILE",
                   help=f"key file (from 'zbus keygen') to {verb} with (default: "
                   f"${KEY_FILE_ENV}, if set)")
    p.add_argument("--key-hex", metavar="[KEY_ID:]HEX",
                   help=f"the key as hex (key id 'default' unless given) to {verb} with; "
                   "'-' reads it from stdin's first line. A key given here is visible to "
                   "every local user in 'ps' and /proc: prefer --key-file, '-' or "
                   f"${KEY_HEX_ENV} (used when neither --key-file nor --key-hex is given)")
    p.add_argument("--key-id", metavar="KEY_ID",
                   help="which key of the file signs, or the id of a bare --key-hex key "
                   f"(default: ${KEY_ID_ENV}, else the file's first key, or 'default')")


def _add_tap_arguments(p: argparse.ArgumentParser) -> None:
    """What tap, sub and types share."""
    p.add_argument("pattern", nargs="+", metavar="PATTERN",
                   help="'exchange/pattern' in AMQP syntax, e.g. 'notifications/compute.#'")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per line (default: one readable line per message)")
    _add_keys(p, "verify")
    p.add_argument("--count", type=int, default=None,
                   help="exit after this many messages (default: no limit)")
    p.add_argument("--timeout", type=float, default=None,
                   help="exit after this many seconds (default: none; Ctrl-C or SIGTERM)")
    p.add_argument("--ready-timeout", type=float, default=10.0,
                   help="seconds to wait for the proxy and for the subscription to be live "
                   "(default: 10)")
    _add_run_dir(p)


_ENVIRONMENT = (
    f"Environment (a flag wins over it, and it over --config): {RUN_DIR_ENV}, {CONFIG_ENV}, "
    f"{KEY_FILE_ENV}, {KEY_HEX_ENV}, {KEY_ID_ENV}. See docs/OPERATING.md."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zbus",
        description="Look at and talk to the local zbus-proxy; 'zbus demo' shows zbus working.",
        epilog=_ENVIRONMENT,
    )
    parser.add_argument("--version", action="version", version=f"zbus {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "demo", help="run an embedded proxy, subscribers and a worker pool; check the books",
        description="Start an in-process proxy (on a fresh temporary run directory unless "
        "--run-dir is given), two fan-out subscribers and a pool of three workers in separate "
        "processes, publish signed (and a few forged) messages once all are ready, and print "
        "who received what. Exits 0 only when the books balance.",
    )
    p.add_argument("--count", type=int, default=1000, help="messages to publish (default: 1000)")
    p.add_argument("--forged", type=int, default=3,
                   help="forged messages mixed in, which every consumer must reject (default: 3)")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds to wait for readiness and for delivery (default: 30)")
    p.add_argument("--run-dir", default=None, metavar="DIR",
                   help="run the embedded proxy here (default: a fresh temporary directory, "
                   "removed at the end)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "tap", aliases=["sub"],
        help="print live messages matching exchange/pattern, one per line ('sub' is the same)",
        description="Subscribe at the local proxy and print each matching message, decoded. "
        "With a key every message is verified and forged ones are reported as REJECTED on "
        "stderr; without a key the signature is NOT checked and lines say UNVERIFIED (every "
        "other check still runs). Prints a READY line on stderr once the subscription is live. "
        "'zbus sub' is the same command (nats sub). --summary prints, instead of messages, "
        "how many of each type were seen, at the end (--timeout, --count, Ctrl-C or SIGTERM).",
        epilog=_ENVIRONMENT,
    )
    _add_tap_arguments(p)
    p.add_argument("--pretty", action="store_true",
                   help="JSON indented over several lines (implies --json)")
    p.add_argument("--payload-only", action="store_true",
                   help="print only each message's payload, as JSON (one per line, indented "
                   "with --pretty): for jq and scripts")
    p.add_argument("--summary", action="store_true",
                   help="print no messages; at the end, the messages seen per exchange, "
                   "routing key, message type and version, with how many publishers sent "
                   "each (a table, or one JSON object with --json); same as 'zbus types'")
    p.set_defaults(func=cmd_tap)

    p = sub.add_parser(
        "types", help="count the message types and routing keys seen (tap --summary)",
        description="Subscribe like 'zbus tap' and, once --timeout seconds pass (or --count "
        "messages, or Ctrl-C, or SIGTERM), print the messages seen per exchange, routing key, "
        "message type and version, and how many publisher ids sent each. Without a key the "
        "counts include messages whose signature was not checked (the first line says how "
        "many).",
        epilog=_ENVIRONMENT,
    )
    _add_tap_arguments(p)
    p.set_defaults(func=cmd_tap, summary=True, pretty=False, payload_only=False)

    p = sub.add_parser(
        "dead-letters", help="list, replay or purge an at-least-once pool's dead letters",
        description="The messages an at-least-once pool gave up on (max_attempts deliveries "
        "without an ack) stay at the proxy, oldest first, until evicted by newer ones or the "
        "proxy restarts. 'list' shows them decoded (verified with a key); 'replay' puts the "
        "oldest back at the end of the pool's queue, each with max_attempts more attempts; "
        "'purge' drops the oldest for good. See docs/RELIABILITY.md, 'At-least-once pools'.",
        epilog=_ENVIRONMENT,
    )
    dead = p.add_subparsers(dest="dead_command", metavar="ACTION", required=True)
    q = dead.add_parser("list", help="show the dead letters held, oldest first")
    q.add_argument("--json", action="store_true",
                   help="one JSON object per dead letter (default: one readable line each)")
    q.add_argument("--pretty", action="store_true", help="JSON indented (implies --json)")
    _add_keys(q, "verify")
    q = dead.add_parser("replay", help="put the oldest dead letters back into the pool's queue")
    q.add_argument("--count", type=int, default=None,
                   help="replay at most this many (default: every one held now)")
    q = dead.add_parser("purge", help="drop the oldest dead letters for good")
    q.add_argument("--count", type=int, default=None,
                   help="purge at most this many (default: every one held now)")
    q.add_argument("--yes", action="store_true",
                   help="really drop them (required: a purged message cannot be read again)")
    for q in dead.choices.values():
        q.add_argument("pool", metavar="POOL", help="the at-least-once pool's name")
        q.add_argument("--timeout", type=float, default=5.0,
                       help="seconds to wait for the proxy (default: 5)")
        _add_run_dir(q)
        q.set_defaults(func=cmd_dead_letters)

    p = sub.add_parser(
        "pub", help="publish one signed message (payload as JSON)",
        description="Publish a signed message from the shell, e.g. "
        "zbus pub notifications compute.instance.create.end '{\"id\": 1}' --key-file k.key. "
        "A signing key is required: --key-file FILE, --key-hex - (stdin), or "
        f"${KEY_FILE_ENV} / ${KEY_HEX_ENV}; make one with 'zbus keygen FILE'.",
        epilog=_ENVIRONMENT,
    )
    p.add_argument("exchange", metavar="EXCHANGE",
                   help="the exchange (message class) to publish on, e.g. notifications")
    p.add_argument("routing_key", metavar="ROUTING_KEY",
                   help="dotted words that consumers' patterns match, e.g. "
                   "compute.instance.create.end (also the message type unless --message-type)")
    p.add_argument("payload", metavar="PAYLOAD", help="a JSON value, or '-' to read stdin")
    _add_keys(p, "sign")
    p.add_argument("--publisher-id", default=f"zbus-cli@{socket.gethostname()}",
                   help="the publisher id in the envelope (default: %(default)s)")
    p.add_argument("--message-type", default=None,
                   help="message type in the envelope (default: the routing key)")
    p.add_argument("--type-version", type=int, default=None,
                   help="message type version (default: 1)")
    p.add_argument("--count", type=int, default=1,
                   help="publish it this many times (default: 1)")
    _add_run_dir(p)
    p.set_defaults(func=cmd_pub)

    p = sub.add_parser(
        "stats", help="show the local proxy's counters, pools and peers",
        description="Ask the local proxy's control socket for its counters: frames in and "
        "out per device (forwarding loop), the declared pools with their bindings, the fast "
        "pools' receipts (what members never reported), the at-least-once pools, and, on a "
        "federating proxy, its peers and their liveness. The devices count ZeroMQ frames, "
        "not messages: a message is 3 frames.",
        epilog=_ENVIRONMENT,
    )
    p.add_argument("--json", action="store_true",
                   help="print the raw counters as JSON (default: tables)")
    p.add_argument("--watch", type=float, default=None, metavar="SECONDS",
                   help="refresh every SECONDS until Ctrl-C, with rates; on a terminal the "
                   "screen is redrawn (default: print once)")
    p.add_argument("--timeout", type=float, default=3.0,
                   help="seconds to wait for the proxy (default: 3)")
    _add_run_dir(p)
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser(
        "pools", help="list, declare or remove the local proxy's pools",
        description="List the pools the local proxy serves (and those removed), declare a "
        "fast pool, or remove a pool (fast or at-least-once). 'remove --fabric' removes a "
        "fast pool on every peer too, and every host then refuses declarations of it made "
        "before the removal (a peer's hello would otherwise bring it back); a declaration "
        "made after it brings it back everywhere. See docs/OPERATING.md, 'Removing a pool'.",
    )
    pools = p.add_subparsers(dest="pools_command", metavar="ACTION", required=True)
    q = pools.add_parser("list", help="the declared and the removed pools")
    q.add_argument("--json", action="store_true", help="print the proxy's reply as JSON")
    q = pools.add_parser("declare", help="declare a fast or at-least-once pool (idempotent)")
    q.add_argument("name", metavar="NAME")
    q.add_argument("bindings", nargs="+", metavar="BINDING",
                   help="'exchange/pattern' in AMQP syntax, e.g. 'billing/charge.#'")
    q.add_argument("--at-least-once", action="store_true",
                   help="an at-least-once pool (acks, redelivery, dead letters; "
                   "docs/RELIABILITY.md) instead of a fast one")
    q.add_argument("--ack-timeout", type=float, default=None, metavar="SECONDS",
                   help="with --at-least-once: seconds a member may hold a message un-acked "
                   "(default: the proxy's, 30)")
    q.add_argument("--max-attempts", type=int, default=None, metavar="N",
                   help="with --at-least-once: deliveries before a message is dead-lettered "
                   "(default: the proxy's, 5)")
    q = pools.add_parser("remove", help="remove a pool here, or with --fabric everywhere")
    q.add_argument("name", metavar="NAME")
    q.add_argument("--fabric", action="store_true",
                   help="remove the fast pool on every peer too, and have every host refuse "
                   "its older declarations")
    for q in pools.choices.values():
        q.add_argument("--timeout", type=float, default=5.0,
                       help="seconds to wait for the proxy (default: 5)")
        _add_run_dir(q)
        q.set_defaults(func=cmd_pools)

    p = sub.add_parser(
        "keygen", help="write a new signing key file (mode 0600)",
        description="Write a fresh random 32-byte signing key to FILE with mode 0600. Refuses "
        "to overwrite an existing file.",
    )
    p.add_argument("file", metavar="FILE")
    p.add_argument("--key-id", default=DEFAULT_KEY_ID,
                   help="the key's id, sent with each signature (default: %(default)s)")
    p.add_argument("--curve", action="store_true",
                   help="instead, write a CURVE key pair for a proxy's tcp links: FILE is a "
                   "directory that gets proxy.pub and proxy.secret (mode 0600)")
    p.set_defaults(func=cmd_keygen)

    # Every argument after 'bench' goes to python -m bench as it is ('zbus bench --help' is
    # the bench's help): no option prefix, no -h of its own.
    p = sub.add_parser(
        "bench", add_help=False, prefix_chars="\0",
        help="run the benchmark suite (python -m bench; needs a checkout's bench/)",
        description="Run 'python -m bench ARGS' from the working directory, which must be the "
        "root of a zbus source tree: the bench ships with the source, not the wheel.",
    )
    p.add_argument("bench_args", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="passed to python -m bench (try: zbus bench --help)")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        args.run_dir_given = args.run_dir is not None
    try:
        if hasattr(args, "config"):  # a command that talks to the local proxy
            resolve_run_dir(args)
        if getattr(args, "run_dir", None) is not None:
            Endpoints(Path(args.run_dir))  # a run dir too long for ipc fails here, clearly
        result: int = args.func(args)
        return result
    except BrokenPipeError:  # the reader of our output left ('zbus stats | head -1')
        _silence_stdout()
        return EXIT_OK
    except UsageError as exc:
        _err(str(exc))
        return EXIT_USAGE
    except ConfigError as exc:
        _err(str(exc))
        return EXIT_USAGE
    except ZbusError as exc:
        _err(str(exc))
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED
