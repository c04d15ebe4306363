"""Issue 18 item 7: the everyday tools a NATS or kombu user looks for, against real proxies.

``zbus sub`` (tap's other name) with pretty JSON and payload-only output; ``zbus types`` /
``tap --summary`` counting what was seen; ``zbus dead-letters list|replay|purge`` over the
proxy's ``replay_dead_letters`` and ``purge_dead_letters`` control ops (bounded, refusals
counted); a publisher retry policy (``zbus.RetryPolicy``) tried on a proxy that starts late
and one that is killed and restarted. The CLI runs as subprocesses.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import zbus

from .conftest import ProxyProcess
from .test_cli import ZBUS, write_key

BINDING = "notifications/compute.#"


class Sub:
    """``zbus sub|tap|types ARGS`` as a subprocess; ``wait_ready`` returns once it is live."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([*ZBUS, *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.err: list[str] = []

    def wait_ready(self, timeout: float = 15.0) -> None:
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()  # the READY line comes, or EOF on failure
            if not line:
                break
            self.err.append(line)
            if line.startswith("READY"):
                return
        raise AssertionError(f"never got ready: {''.join(self.err)}")

    def finish(self, timeout: float = 20.0) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, "".join(self.err) + err

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=10)


@pytest.fixture
def subs() -> Iterator[list[Sub]]:
    started: list[Sub] = []
    yield started
    for sub in started:
        sub.stop()


@pytest.fixture
def key_file(run_dir: Path) -> Path:
    return write_key(run_dir / "signing.key")  # a directory only this user can write


def zbus_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ZBUS, *args], capture_output=True, text=True, timeout=timeout)


def pub(run_dir: Path, key_file: Path, routing_key: str, payload: Any, *extra: str) -> None:
    result = zbus_cli("pub", "notifications", routing_key, json.dumps(payload), "--key-file",
                  str(key_file), "--run-dir", str(run_dir), *extra)
    assert result.returncode == 0, result.stderr


# -- sub, --pretty, --payload-only ------------------------------------------------------------


def test_sub_prints_payloads_only_and_pretty_json(proxy_process: ProxyProcess, run_dir: Path,
                                                   key_file: Path,
                                                   subs: list[Sub]) -> None:
    payload_only = Sub("sub", BINDING, "--payload-only", "--count", "2",
                       "--key-file", str(key_file), "--run-dir", str(run_dir))
    pretty = Sub("sub", BINDING, "--pretty", "--count", "1", "--run-dir", str(run_dir))
    pretty_payload = Sub("tap", BINDING, "--payload-only", "--pretty", "--count", "1",
                         "--run-dir", str(run_dir))
    subs += [payload_only, pretty, pretty_payload]
    for sub in subs:
        sub.wait_ready()
    pub(run_dir, key_file, "compute.instance.create.end", {"id": 1, "name": "vm"})
    pub(run_dir, key_file, "compute.instance.delete.end", [1, "two"])

    code, out, err = payload_only.finish()
    assert code == 0, err
    assert out.splitlines() == ['{"id": 1, "name": "vm"}', '[1, "two"]']

    code, out, err = pretty.finish()
    assert code == 0, err
    record = json.loads(out)  # one indented object over several lines
    assert len(out.splitlines()) > 5 and out.startswith("{\n  ")
    assert record["payload"] == {"id": 1, "name": "vm"} and record["verified"] is False

    code, out, err = pretty_payload.finish()
    assert code == 0, err
    assert out == '{\n  "id": 1,\n  "name": "vm"\n}\n'


def test_sub_is_tap_in_help_and_refuses_summary_with_payload_only() -> None:
    result = zbus_cli("sub", "--help")
    assert result.returncode == 0 and "--payload-only" in result.stdout
    assert "--pretty" in result.stdout and "--summary" in result.stdout
    result = zbus_cli("tap", BINDING, "--summary", "--payload-only", "--run-dir", "/nonexistent")
    assert result.returncode == 2 and "--summary prints a table" in result.stderr


# -- types / tap --summary --------------------------------------------------------------------


def test_types_counts_each_exchange_routing_key_and_type(proxy_process: ProxyProcess,
                                                         run_dir: Path, key_file: Path,
                                                         subs: list[Sub]) -> None:
    table = Sub("types", BINDING, "--count", "6", "--key-file", str(key_file),
                "--run-dir", str(run_dir))
    as_json = Sub("tap", BINDING, "--summary", "--json", "--count", "6",
                  "--run-dir", str(run_dir))
    window = Sub("types", BINDING, "--timeout", "1", "--run-dir", str(run_dir))
    subs += [table, as_json, window]
    for sub in subs:
        sub.wait_ready()
    pub(run_dir, key_file, "compute.instance.create.end", {"n": 1}, "--count", "3")
    pub(run_dir, key_file, "compute.instance.delete.end", {"n": 1}, "--count", "2",
        "--publisher-id", "other")
    pub(run_dir, key_file, "compute.instance.delete.end", {"n": 1},
        "--message-type", "compute.legacy", "--type-version", "2")

    code, out, err = table.finish()
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("6 message(s) in ") and "UNVERIFIED" not in lines[0]
    rows = [line.split() for line in lines[1:]]
    assert rows == [
        ["EXCHANGE", "ROUTING-KEY", "MESSAGE-TYPE", "VERSION", "MESSAGES", "PUBLISHERS"],
        ["notifications", "compute.instance.create.end", "compute.instance.create.end", "1",
         "3", "1"],
        ["notifications", "compute.instance.delete.end", "compute.instance.delete.end", "1",
         "2", "1"],
        ["notifications", "compute.instance.delete.end", "compute.legacy", "2", "1", "1"],
    ]

    code, out, err = as_json.finish()
    assert code == 0, err
    summary = json.loads(out)
    assert summary["messages"] == 6 and summary["verified"] == 0
    assert [(t["routing_key"], t["message_type"], t["messages"]) for t in summary["types"]] == [
        ("compute.instance.create.end", "compute.instance.create.end", 3),
        ("compute.instance.delete.end", "compute.instance.delete.end", 2),
        ("compute.instance.delete.end", "compute.legacy", 1)]

    # A time window: it ends by itself, with what came in it (a first part of the six at
    # most: the window may close before the last pub).
    code, out, err = window.finish()
    assert code == 0, err
    first = out.splitlines()[0]
    assert re.match(r"[0-6] message\(s\) in 1\.\ds", first), out


def test_types_prints_its_summary_on_sigterm(proxy_process: ProxyProcess, run_dir: Path,
                                             subs: list[Sub]) -> None:
    sub = Sub("types", BINDING, "--run-dir", str(run_dir))
    subs.append(sub)
    sub.wait_ready()
    sub.proc.send_signal(signal.SIGTERM)
    code, out, err = sub.finish()
    assert code == 0, err
    assert out.startswith("0 message(s) in ") and "tap: shown 0" in err


# -- dead-letters list | replay | purge -------------------------------------------------------


def _dead_letters(run_dir: Path, key: bytes, count: int) -> tuple[zbus.Connection, Any,
                                                                  list[list[bytes]]]:
    """An at-least-once pool 'billing' (max_attempts 1) whose member NACKs ``count``
    messages: ``count`` dead letters. Returns the connection, the member and the frames."""
    handled: list[int] = []
    dispatcher = zbus.Dispatcher()
    dispatcher.bind("notifications", "compute.#", lambda d: handled.append(d.payload["n"]))
    conn = zbus.Connection(run_dir)
    conn.declare_reliable_pool("billing", [BINDING], max_attempts=1)
    member = conn.join_reliable_pool("billing", dispatcher, key, window=50)
    member.handled = handled
    member.ready()
    factory = zbus.MessageFactory(key, "pub1")
    sent = []
    with zbus.Connection(run_dir) as publisher:
        for n in range(count):  # one at a time: a small pool_hwm must not overflow
            frames = factory.frames("notifications", "compute.instance.create.end", {"n": n})
            publisher.send_frames(frames)
            sent.append(frames)
            delivery = member.receive(5)
            assert delivery is not None and delivery.payload == {"n": n}
            member.nack(delivery)
    deadline = time.monotonic() + 10
    while pool_stats(run_dir)["dead_letters"] < count:
        assert time.monotonic() < deadline, pool_stats(run_dir)
        time.sleep(0.02)  # another process's counter: no event to wait on
    return conn, member, sent


def pool_stats(run_dir: Path, name: str = "billing") -> dict[str, Any]:
    with zbus.Connection(run_dir) as conn:
        stats: dict[str, Any] = conn.proxy_stats()["reliable_pools"][name]
    return stats


def test_dead_letters_list_replay_and_purge(proxy_process: ProxyProcess, run_dir: Path,
                                            key: bytes) -> None:
    key_file = run_dir / "hex.key"
    key_file.write_text(f"default {key.hex()}\n")
    key_file.chmod(0o600)
    conn, member, sent = _dead_letters(run_dir, key, 3)
    try:
        where = ("--run-dir", str(run_dir))
        listed = zbus_cli("dead-letters", "list", "billing", "--json", "--key-file",
                          str(key_file), *where)
        assert listed.returncode == 0, listed.stderr
        entries = [json.loads(line) for line in listed.stdout.splitlines()]
        assert [e["position"] for e in entries] == [0, 1, 2]
        assert {(e["attempts"], e["reason"]) for e in entries} == {(1, "nack")}
        assert [[m["payload"] for m in e["messages"]] for e in entries] == [
            [{"n": 0}], [{"n": 1}], [{"n": 2}]]
        assert all(m["verified"] and m["publisher_id"] == "pub1"
                   for e in entries for m in e["messages"])
        readable = zbus_cli("dead-letters", "list", "billing", *where)
        assert readable.returncode == 0, readable.stderr
        assert readable.stdout.startswith("#0 attempts=1 reason=nack size=")
        assert "UNVERIFIED" in readable.stdout and "3 dead letter(s)" in readable.stderr

        # Replay the two oldest: back in the queue, handled this time (attempt 2, a
        # redelivery the member's guard lets through), and no longer dead letters.
        replayed = zbus_cli("dead-letters", "replay", "billing", "--count", "2", *where)
        assert replayed.returncode == 0, replayed.stderr
        assert "replayed 2 dead letter(s) of pool billing into its queue (1 still held)" \
            in replayed.stdout
        for _ in range(2):
            assert member.process(5)
        assert sorted(member.handled) == [0, 1]
        assert member.drain(5) == 0
        stats = pool_stats(run_dir)
        assert stats["dead_letters"] == 1 and stats["dead_letters_replayed"] == 2
        assert stats["acked"] == 2 and stats["in_flight"] == 0 and stats["queued"] == 0
        assert stats["accepted"] + stats["dead_letters_replayed"] == \
            stats["acked"] + stats["dead_lettered"]
        assert stats["delivered"] == stats["accepted"] + stats["redelivered"]
        # Positions keep their meaning: the one left is still #2.
        left = conn.control.request("dead_letters", name="billing")
        assert [d["position"] for d in left["dead_letters"]] == [2]
        assert left["dead_letters"][0]["frames"] == sent[2]

        refused = zbus_cli("dead-letters", "purge", "billing", *where)
        assert refused.returncode == 2 and "--yes" in refused.stderr
        assert pool_stats(run_dir)["dead_letters"] == 1
        purged = zbus_cli("dead-letters", "purge", "billing", "--yes", *where)
        assert purged.returncode == 0, purged.stderr
        assert "purged 1 dead letter(s) of pool billing (0 still held)" in purged.stdout
        stats = pool_stats(run_dir)
        assert stats["dead_letters"] == 0 and stats["dead_letters_purged"] == 1
        nothing = zbus_cli("dead-letters", "replay", "billing", *where)
        assert nothing.returncode == 0 and "replayed 0" in nothing.stdout
        unknown = zbus_cli("dead-letters", "list", "nope", *where)
        assert unknown.returncode == 1 and "no at-least-once pool 'nope'" in unknown.stderr
    finally:
        member.close()
        conn.close()


def test_dead_letter_ops_are_bounded_and_refusals_counted(proxy_process: ProxyProcess,
                                                          run_dir: Path, key: bytes) -> None:
    conn, member, _ = _dead_letters(run_dir, key, 3)
    try:
        bad = [{"limit": 0}, {"limit": 1001}, {"limit": True}, {"limit": 2**64 - 1},
               {"before": -1}, {"before": 2**63}, {"before": "1"}, {"colour": "red"}]
        for op in ("replay_dead_letters", "purge_dead_letters"):
            for fields in bad:
                with pytest.raises(zbus.ProxyError, match=f"{op}: |{op} takes"):
                    conn.control.request(op, name="billing", **fields)
        with pytest.raises(zbus.ProxyError, match="no at-least-once pool 'nope'"):
            conn.control.request("purge_dead_letters", name="nope")
        stats = pool_stats(run_dir)
        assert stats["dead_letter_requests_refused"] == 2 * len(bad)
        assert stats["dead_letters"] == 3  # nothing moved
        # before: only those below that position; limit: at most that many per request.
        reply = conn.control.request("purge_dead_letters", name="billing", before=1)
        assert reply["purged"] == 1 and reply["next"] == 1 and reply["held"] == 2
        reply = conn.control.request("replay_dead_letters", name="billing", limit=1)
        assert reply["replayed"] == 1 and reply["next"] == 2 and reply["end"] == 3
        assert member.process(5) and member.handled == [1]
    finally:
        member.close()
        conn.close()


def test_replay_stops_at_a_full_queue_and_says_so(run_dir: Path, key: bytes) -> None:
    """pool_hwm 2: the pool holds at most 2 messages; a replay of 3 moves 2 and keeps one."""
    proxy = ProxyProcess(run_dir, "--pool-hwm", "2").start()
    try:
        conn, member, _ = _dead_letters(run_dir, key, 3)
        member.close()  # nobody takes the queue now
        conn.close()
        result = zbus_cli("dead-letters", "replay", "billing", "--run-dir", str(run_dir))
        assert result.returncode == 1, result.stdout + result.stderr
        assert "replayed 2 dead letter(s) of pool billing into its queue (1 still held)" \
            in result.stdout
        assert "queue is full" in result.stderr
        stats = pool_stats(run_dir)
        assert stats["queued"] == 2 and stats["dead_letters"] == 1
        assert stats["overflow"] == 0  # nothing dropped: the third stays a dead letter
    finally:
        proxy.stop()


# -- a publisher retry policy -----------------------------------------------------------------


def test_retry_policy_waits_and_checks_its_numbers() -> None:
    assert list(zbus.RetryPolicy().intervals()) == [0.0, 1.0, 2.0]
    policy = zbus.RetryPolicy(max_retries=5, interval_start=0.5, interval_step=1.0,
                              interval_max=2.0)
    assert list(policy.intervals()) == [0.5, 1.5, 2.0, 2.0, 2.0]
    forever = zbus.RetryPolicy(max_retries=None).intervals()
    assert [next(forever) for _ in range(1000)][-1] == 5.0
    for bad in ({"max_retries": -1}, {"max_retries": 1.5}, {"max_retries": True},
                {"interval_start": -1}, {"interval_step": float("nan")},
                {"interval_max": float("inf")}, {"interval_start": "1"}):
        with pytest.raises(zbus.ConfigError, match="RetryPolicy"):
            zbus.RetryPolicy(**bad)


def _origin_frames(run_dir: Path) -> int:
    with zbus.Connection(run_dir) as conn:
        return int(conn.proxy_stats()["devices"]["origin"]["frontend_frames_in"])


def test_a_retrying_publisher_waits_for_a_proxy_that_starts_late(run_dir: Path,
                                                                 key: bytes) -> None:
    proxy = ProxyProcess(run_dir)
    conn = zbus.Connection(run_dir)
    publisher = zbus.Publisher(
        conn.exchange("metering"), zbus.MessageFactory(key, "late"),
        retry=zbus.RetryPolicy(max_retries=200, interval_start=0.05, interval_step=0.05,
                               interval_max=0.1))
    with pytest.raises(zbus.ProxyError, match=r"no control\.sock"):
        publisher.send("meter", {"n": 0}, retry=False)  # without retry: at once, as before
    started = threading.Event()

    def start_once_retrying() -> None:
        while publisher.retries < 2:  # the send is waiting for it: now start the proxy
            time.sleep(0.01)  # another thread's counter: no event to wait on
        proxy.start()
        started.set()

    starter = threading.Thread(target=start_once_retrying)
    starter.start()
    try:
        publisher.send("meter", {"n": 1})  # returns once the proxy is there
        conn.flush(10)
        starter.join(15)
        assert started.is_set() and publisher.retries >= 2
        assert _origin_frames(run_dir) >= 3  # the message went through the new proxy
    finally:
        conn.close()
        starter.join(15)
        if proxy.proc is not None:
            proxy.stop()


def test_a_retrying_publisher_rides_out_a_proxy_restart(run_dir: Path, key: bytes) -> None:
    """Killed, the proxy takes nothing: the publisher's small queue fills and each send times
    out; with a retry policy the sends go on once it is back, numbered without a gap."""
    # Each message alone: the queue holds 2 of them (a batch's Timeout is tested in
    # tests/test_smart_batching.py).
    settings = zbus.Settings(publish_hwm=2, send_timeout=0.1, batch_bytes=0)
    conn = zbus.Connection(run_dir, settings=settings)
    factory = zbus.MessageFactory(key, "restart")
    plain = zbus.Publisher(conn.exchange("metering"), factory)
    retrying = zbus.Publisher(conn.exchange("metering"), factory,
                              retry=zbus.RetryPolicy(max_retries=400, interval_start=0.05,
                                                     interval_step=0.0, interval_max=0.05))
    restarted = threading.Event()
    proxy = ProxyProcess(run_dir).start()  # after everything that could fail: stopped below

    def restart_once_retrying() -> None:
        while retrying.retries < 2:
            time.sleep(0.01)  # another thread's counter: no event to wait on
        proxy.start()
        restarted.set()

    restarter = threading.Thread(target=restart_once_retrying)
    try:
        plain.send("meter", {"n": 0})
        conn.flush(10)
        assert proxy.stop(signal.SIGKILL) == -signal.SIGKILL
        with pytest.raises(zbus.Timeout):  # without retry: the queue fills, then Timeout
            for n in range(1, 100):
                plain.send("meter", {"n": n})
        restarter.start()
        for n in range(100, 110):
            retrying.send("meter", {"n": n})  # the first waits for the restart
        conn.flush(10)
        restarter.join(15)
        assert restarted.is_set() and retrying.retries >= 2
        assert _origin_frames(run_dir) >= 3 * 10  # the ten retried sends reached it
    finally:
        conn.close()
        if restarter.is_alive():
            restarter.join(15)
        proxy.stop()


def test_pools_declare_makes_an_at_least_once_pool(proxy_process: ProxyProcess,
                                                   run_dir: Path) -> None:
    """The gap in 'zbus pools': an at-least-once pool could only be declared from Python."""
    where = ("--run-dir", str(run_dir))
    made = zbus_cli("pools", "declare", "billing", BINDING, "--at-least-once",
                    "--ack-timeout", "60", "--max-attempts", "3", *where)
    assert made.returncode == 0, made.stderr
    assert f"at-least-once pool billing declared with {BINDING}" in made.stdout
    again = zbus_cli("pools", "declare", "billing", BINDING, "--at-least-once", *where)
    assert again.returncode == 0 and "already declared" in again.stdout
    conflict = zbus_cli("pools", "declare", "billing", BINDING, "--at-least-once",
                        "--max-attempts", "4", *where)
    assert conflict.returncode == 1 and "max_attempts" in conflict.stderr
    usage = zbus_cli("pools", "declare", "fast", BINDING, "--max-attempts", "4", *where)
    assert usage.returncode == 2 and "add --at-least-once" in usage.stderr
    with zbus.Connection(run_dir) as conn:
        reply = conn.control.request("pools")
    assert reply["reliable_pools"] == {
        "billing": {"bindings": [BINDING], "ack_timeout": 60.0, "max_attempts": 3}}
