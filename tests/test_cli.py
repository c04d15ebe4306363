"""The zbus and zbus-proxy commands, run as subprocesses against real proxies."""

from __future__ import annotations

import json
import select
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

import zbus
import zbus.cli
from tests.conftest import ProxyProcess

ZBUS = [sys.executable, "-m", "zbus"]
PROXY = [sys.executable, "-m", "zbus_proxy"]
EXAMPLE = Path(__file__).resolve().parent.parent / "proxy" / "example.toml"


def run(
    *args: str, timeout: float = 30.0, stdin: str | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                          input=stdin, cwd=cwd)


def zbus_cmd(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return run(*ZBUS, *args, **kw)


def write_key(path: Path) -> Path:
    result = zbus_cmd("keygen", str(path))
    assert result.returncode == 0, result.stderr
    return path


class Tap:
    """A ``zbus tap`` subprocess; ``start`` returns once it printed READY (subscription live)."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [*ZBUS, "tap", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.stderr_lines: list[str] = []

    def wait_ready(self, timeout: float = 15.0) -> None:
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stderr], [], [], 0.2)
            if ready:
                line = self.proc.stderr.readline()
                if not line:
                    break
                self.stderr_lines.append(line)
                if line.startswith("READY"):
                    return
        self.stop()
        raise AssertionError(f"tap never got ready: {''.join(self.stderr_lines)}")

    def finish(self, timeout: float = 15.0) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, "".join(self.stderr_lines) + err

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=10)


@pytest.fixture
def tap_processes() -> Iterator[list[Tap]]:
    taps: list[Tap] = []
    yield taps
    for tap in taps:
        tap.stop()


def proxy_stats(run_dir: Path) -> dict[str, Any]:
    result = zbus_cmd("stats", "--json", "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


# -- zbus demo ---------------------------------------------------------------------------


def test_demo_balances_its_books_and_cleans_up() -> None:
    before = set(Path("/tmp").glob("zbus-demo-*"))
    result = zbus_cmd("demo", "--count", "1000", timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert out.count("received 1000/1000  in order: yes  lost: 0  forged rejected: 3") == 2
    assert out.count("worker-") == 3
    assert "pool total: 1000/1000, each message exactly once: yes; forged rejected: 3/3" in out
    assert "books balance" in out
    assert set(Path("/tmp").glob("zbus-demo-*")) == before  # its temp run dir is gone


def test_demo_on_a_taken_run_dir_says_so(proxy_process: ProxyProcess) -> None:
    result = zbus_cmd("demo", "--run-dir", str(proxy_process.run_dir), "--count", "10")
    assert result.returncode == 1
    assert "another zbus-proxy" in result.stderr


# -- help ----------------------------------------------------------------------------------


# sub is tap's other name; bench hands its arguments to the checkout's `python -m bench`.
@pytest.mark.parametrize(("command", "usage"), [
    ("demo", "zbus demo"), ("tap", "zbus tap"), ("sub", "zbus tap"), ("types", "zbus types"),
    ("dead-letters", "zbus dead-letters"), ("pub", "zbus pub"), ("stats", "zbus stats"),
    ("pools", "zbus pools"), ("keygen", "zbus keygen"), ("bench", "python -m bench")])
def test_every_command_has_help(command: str, usage: str) -> None:
    result = zbus_cmd(command, "--help")
    assert result.returncode == 0 and "usage: " + usage in result.stdout


# -- keygen --------------------------------------------------------------------------------


def test_keygen_writes_a_private_key_and_never_overwrites(tmp_path: Path) -> None:
    path = write_key(tmp_path / "signing.key")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    ring = zbus.KeyRing.from_file(path)
    assert ring.active_id == "default" and len(ring.active_key) == 32
    original = path.read_text()
    again = zbus_cmd("keygen", str(path))
    assert again.returncode == 1 and "never overwrites" in again.stderr
    assert path.read_text() == original


def test_keygen_refuses_a_directory_others_can_write(tmp_path: Path) -> None:
    # Issue 14: a key written there could be replaced (and KeyRing.from_file refuses it).
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    result = zbus_cmd("keygen", str(shared / "k"))
    assert result.returncode == 1 and "another user can write" in result.stderr
    assert not (shared / "k").exists()


def test_keygen_with_a_key_id(tmp_path: Path) -> None:
    result = zbus_cmd("keygen", str(tmp_path / "k"), "--key-id", "2024-q3")
    assert result.returncode == 0
    assert zbus.KeyRing.from_file(tmp_path / "k").active_id == "2024-q3"


# -- tap and pub ---------------------------------------------------------------------------


def test_tap_sees_what_pub_sent_and_reports_forgeries(
    proxy_process: ProxyProcess, tmp_path: Path, tap_processes: list[Tap]
) -> None:
    run_dir = str(proxy_process.run_dir)
    key_file = str(write_key(tmp_path / "k.key"))
    tap = Tap("notifications/compute.#", "--json", "--key-file", key_file, "--count", "2",
              "--timeout", "30", "--run-dir", run_dir)
    tap_processes.append(tap)
    tap.wait_ready()
    forged = zbus_cmd("pub", "notifications", "compute.instance.create.end", '{"id": 0}',
                      "--key-hex", zbus.generate_key().hex(), "--run-dir", run_dir)
    assert forged.returncode == 0, forged.stderr
    for i in (1, 2):
        result = zbus_cmd("pub", "notifications", f"compute.instance.n{i}", f'{{"id": {i}}}',
                          "--key-file", key_file, "--publisher-id", "shell",
                          "--run-dir", run_dir)
        assert result.returncode == 0, result.stderr
        assert "published 1 message(s) to notifications/compute.instance" in result.stdout
    code, out, err = tap.finish()
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["payload"] for r in records] == [{"id": 1}, {"id": 2}]
    assert all(r["verified"] and r["publisher_id"] == "shell" for r in records)
    assert records[0]["routing_key"] == "compute.instance.n1"
    assert "REJECTED bad_signature" in err


def test_keys_from_stdin_or_environment_stay_out_of_ps(
    proxy_process: ProxyProcess, tap_processes: list[Tap], key: bytes,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Issue 14, item 12: --key-hex HEX shows the key to every local user in ps.
    run_dir = str(proxy_process.run_dir)
    monkeypatch.setenv("ZBUS_KEY_HEX", key.hex())  # the tap and the last pub take it
    tap = Tap("audit/#", "--json", "--count", "2", "--timeout", "30", "--run-dir", run_dir)
    tap_processes.append(tap)
    tap.wait_ready()
    for payload, stdin_key in (("1", key.hex()), ('"forged"', zbus.generate_key().hex())):
        result = zbus_cmd("pub", "audit", "user.login", payload, "--key-hex", "-",
                          "--run-dir", run_dir, stdin=stdin_key + "\n")
        assert result.returncode == 0, result.stderr
    from_env = zbus_cmd("pub", "audit", "user.login", "2", "--run-dir", run_dir)
    assert from_env.returncode == 0, from_env.stderr
    code, out, err = tap.finish()
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [(r["payload"], r["verified"]) for r in records] == [(1, True), (2, True)]
    assert err.count("REJECTED bad_signature") == 1
    both_stdin = zbus_cmd("pub", "audit", "a.b", "-", "--key-hex", "-", "--run-dir", run_dir,
                          stdin=key.hex() + "\n1\n")
    assert both_stdin.returncode == 2 and "ZBUS_KEY_HEX" in both_stdin.stderr
    help_text = zbus_cmd("pub", "--help").stdout
    assert "'ps'" in help_text and "ZBUS_KEY_HEX" in help_text


def test_tap_without_a_key_marks_unverified_and_still_checks_frames(
    proxy_process: ProxyProcess, tmp_path: Path, tap_processes: list[Tap], key: bytes
) -> None:
    run_dir = proxy_process.run_dir
    tap = Tap("audit/#", "--count", "1", "--timeout", "30", "--run-dir", str(run_dir))
    tap_processes.append(tap)
    tap.wait_ready()
    topic, _, signature = zbus.MessageFactory(key, "p").frames("audit", "x.y", 1)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    try:
        push.connect(zbus.Endpoints(run_dir).ingress)
        push.send_multipart([topic, b"\xc1 not msgpack", signature])
        push.send_multipart([topic, b"two frames only"])
    finally:
        push.close(linger=2000)
        ctx.term()
    result = zbus_cmd("pub", "audit", "user.login", '"alice"', "--key-hex", key.hex(),
                      "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr
    code, out, err = tap.finish()
    assert code == 0, err
    (line,) = out.splitlines()
    assert "audit/user.login" in line and "UNVERIFIED" in line and '"alice"' in line
    assert "REJECTED malformed" in err and "REJECTED frame_count" in err


def test_pub_errors_are_clear(tmp_path: Path, run_dir: Path) -> None:
    no_key = zbus_cmd("pub", "ex", "a.b", "1", "--run-dir", str(run_dir))
    assert no_key.returncode == 2 and "--key-file" in no_key.stderr
    bad_json = zbus_cmd("pub", "ex", "a.b", "{nope", "--key-hex", "00" * 32,
                        "--run-dir", str(run_dir))
    assert bad_json.returncode == 2 and "not valid JSON" in bad_json.stderr
    bad_name = zbus_cmd("pub", "ex", "a..b", "1", "--key-hex", "00" * 32,
                        "--run-dir", str(run_dir))
    assert bad_name.returncode == 2 and "invalid routing key" in bad_name.stderr
    no_proxy = zbus_cmd("pub", "ex", "a.b", "1", "--key-hex", "00" * 32,
                        "--run-dir", str(run_dir), timeout=30)
    assert no_proxy.returncode == 1 and "no zbus-proxy runs on" in no_proxy.stderr


# -- stats ---------------------------------------------------------------------------------


def test_stats_counters_move_after_a_pub(proxy_process: ProxyProcess, key: bytes) -> None:
    run_dir = proxy_process.run_dir
    before = proxy_stats(run_dir)["devices"]["origin"]["frontend_frames_in"]
    result = zbus_cmd("pub", "ex", "a.b", '{"n": 1}', "--count", "5", "--key-hex", key.hex(),
                      "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr
    deadline = time.monotonic() + 10
    while True:  # the proxy counts asynchronously: poll the counter, bounded
        after = proxy_stats(run_dir)["devices"]["origin"]["frontend_frames_in"]
        if after >= before + 15 or time.monotonic() > deadline:
            break
    # 5 messages of 3 frames, plus the 1-frame flush probe(s) Connection.close sends behind them
    assert before + 15 <= after <= before + 20


def test_stats_table_shows_devices_and_pools(proxy_process: ProxyProcess) -> None:
    with zbus.Connection(proxy_process.run_dir) as conn:
        conn.declare_pool("billing", ["ex/invoice.#"])
    result = zbus_cmd("stats", "--run-dir", str(proxy_process.run_dir))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1].split()[:3] == ["DEVICE", "FRAMES-IN", "FRAMES-OUT"]
    assert any(line.startswith("origin ") for line in lines)
    assert any(line.startswith("pool-billing-origin ") for line in lines)
    assert "  billing: ex/invoice.#" in lines


def test_stats_without_a_proxy_fails_clearly(run_dir: Path) -> None:
    result = zbus_cmd("stats", "--run-dir", str(run_dir), "--timeout", "0.5")
    assert result.returncode == 1 and f"zbus-proxy --run-dir {run_dir}" in result.stderr


# -- zbus-proxy config -----------------------------------------------------------------------


def test_check_config_accepts_the_example(tmp_path: Path) -> None:
    # Its run_dir and state_dir (/run/zbus, /var/lib/zbus) are for the systemd unit, which
    # makes them; --check-config refuses directories this user could not make.
    result = run(*PROXY, "--config", str(EXAMPLE), "--run-dir", str(tmp_path / "run"),
                 "--state-dir", str(tmp_path / "state"), "--check-config")
    assert result.returncode == 0, result.stderr
    assert "config OK" in result.stdout and "limits.pool_hwm" in result.stdout


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[limits]\npool_hwn = 5\n", "unknown key 'limits.pool_hwn'"),
        ("[limits]\npool_hwm = -1\n", "key 'limits.pool_hwm'"),
        ("[log]\nformat = 'xml'\n", "key 'log.format'"),
        ("run_dir = 1\n", "key 'run_dir'"),
        ("run_dir = '/tmp/" + "x" * 120 + "'\n", "longer than 107 bytes"),
        ("[limits\n", "is not valid TOML"),
    ],
)
def test_bad_config_exits_2_naming_the_key(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(toml)
    for extra in (["--check-config"], []):
        result = run(*PROXY, "--config", str(path), *extra)
        assert result.returncode == 2
        assert "zbus-proxy: config error:" in result.stderr and message in result.stderr


@pytest.mark.parametrize("url", ["redis://admin:s3cret-pw@127.0.0.1:6379/0",
                                 "redis://:s3cret-pw@127.0.0.1:6379/0",
                                 "redis://127.0.0.1:6379/0?password=s3cret-pw"])
def test_check_config_redacts_the_redis_password(url: str) -> None:
    # The systemd unit runs --check-config in ExecStartPre: its output goes to the journal.
    result = run(*PROXY, "--bind", "127.0.0.1", "--insecure-plain-tcp", "--directory",
                 "redis", "--redis-url", url, "--check-config")
    assert result.returncode == 0, result.stderr
    assert "s3cret-pw" not in result.stdout + result.stderr
    assert "<redacted>" in result.stdout and "127.0.0.1:6379/0" in result.stdout


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text("[limits]\npool_hwm = 7\n[log]\nlevel = 'debug'\n")
    result = run(*PROXY, "--config", str(path), "--pool-hwm", "9", "--check-config")
    assert result.returncode == 0
    assert "limits.pool_hwm          = 9" in result.stdout
    assert "log.level                = 'DEBUG'" in result.stdout
    bad_flag = run(*PROXY, "--pool-hwm", "0", "--check-config")
    assert bad_flag.returncode == 2 and "command-line flags" in bad_flag.stderr


def test_second_proxy_on_a_run_dir_exits_3(proxy_process: ProxyProcess) -> None:
    result = run(*PROXY, "--run-dir", str(proxy_process.run_dir))
    assert result.returncode == 3
    assert f"already serves {proxy_process.run_dir}" in result.stderr


def test_proxy_from_config_file_logs_json_lines(run_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text(f"run_dir = '{run_dir}'\n[log]\nformat = 'json'\n")
    proxy = subprocess.Popen([*PROXY, "--config", str(config)], stderr=subprocess.PIPE,
                             text=True)
    try:
        conn = zbus.Connection(run_dir)
        conn.control.request("ping", timeout=10)
        conn.close()
    finally:
        proxy.terminate()
        _, err = proxy.communicate(timeout=15)
    assert proxy.returncode == 0, err
    events = [json.loads(line) for line in err.splitlines()]
    assert {"ts", "level", "logger", "event"} <= set(events[0])
    assert any(e["event"] == "zbus-proxy started" and e["run_dir"] == str(run_dir)
               for e in events)
    assert events[-1]["event"] == "zbus-proxy stopped"


# -- metrics -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_metrics_endpoint_matches_the_control_socket(run_dir: Path, key: bytes) -> None:
    port = free_port()
    proxy = ProxyProcess(run_dir, "--metrics-port", str(port)).start()
    try:
        with zbus.Connection(run_dir) as conn:
            zbus.Publisher(conn.exchange("ex"), zbus.MessageFactory(key, "p")).send("a", 1)
        deadline = time.monotonic() + 10
        while True:
            stats = proxy_stats(run_dir)
            if stats["devices"]["origin"]["frontend_frames_in"] >= 3:
                break
            assert time.monotonic() < deadline
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
    finally:
        assert proxy.stop() == 0
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if line[:1] != "#")
    for device, counters in stats["devices"].items():
        for name, value in counters.items():
            side, unit, direction = name.split("_")
            sample = (f'zbus_proxy_device_{unit}_total{{device="{device}",side="{side}",'
                      f'direction="{direction}"}}')
            assert int(samples[sample]) == value, sample
    assert samples["zbus_proxy_up"] == "1"
    assert set(stats["device_restarts"]) == set(stats["devices"])
    for device, restarts in stats["device_restarts"].items():
        assert samples[f'zbus_proxy_device_restarts_total{{device="{device}"}}'] == str(restarts)



def test_keygen_curve_writes_a_private_pair_and_never_overwrites(tmp_path: Path) -> None:
    result = zbus_cmd("keygen", "--curve", str(tmp_path / "curve"))
    assert result.returncode == 0, result.stderr
    secret, public = tmp_path / "curve" / "proxy.secret", tmp_path / "curve" / "proxy.pub"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    keys = zbus._transport.CurveKeys.load(secret)  # the pair is a real, matching CURVE pair
    assert keys.public.decode() in public.read_text()
    again = zbus_cmd("keygen", "--curve", str(tmp_path / "curve"))
    assert again.returncode == 1 and "never overwrites" in again.stderr


def test_stats_table_shows_peers_and_their_liveness() -> None:
    from zbus.cli import format_stats

    now = time.time()
    text = format_stats({
        "pid": 1, "run_dir": "/run/zbus", "devices": {}, "pools": {},
        "federation": {"node": "a", "origin": "tcp://127.0.0.2:7737", "peers": {
            "b": {"origin": "tcp://127.0.0.3:7737", "alive": True, "missed": 0,
                  "last_hello": now - 1.0},
            "c": {"origin": "tcp://127.0.0.4:7737", "alive": False, "missed": 3,
                  "last_hello": now - 9.0},
            "d": {"alive": None, "refused": True},
        }},
    })
    lines = text.splitlines()
    assert "node a (origin tcp://127.0.0.2:7737): 3 peer(s)" in lines
    row = {line.split()[0]: line.split() for line in lines if line.strip()[:1] in "bcd"}
    assert row["b"][1:4] == ["tcp://127.0.0.3:7737", "alive", "0"]
    assert row["c"][1:4] == ["tcp://127.0.0.4:7737", "away", "3"]
    assert row["d"][1:3] == ["-", "refused"]


def test_bench_runs_from_a_source_tree_and_explains_itself_elsewhere(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parent.parent
    listed = zbus_cmd("bench", "--list", "--only", "tcp", cwd=root)
    assert listed.returncode == 0, listed.stderr
    assert "tcp-fanout-1" in listed.stdout
    elsewhere = zbus_cmd("bench", "--list", cwd=tmp_path)
    assert elsewhere.returncode == 1
    assert "ships with the zbus source tree" in elsewhere.stderr
