"""Issue 18 (a newcomer's first hour), items 1, 2, 6 and 10: the zbus and zbus-proxy commands
as a new user meets them, run as subprocesses against real proxies."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import zbus
from tests.conftest import ProxyProcess
from tests.test_cli import PROXY, ZBUS, Tap, free_port

README = Path(__file__).resolve().parent.parent / "README.md"

# Without a proxy the commands used to wait their whole timeout (3 s, or --timeout) before
# answering; now they answer at once. A Python start-up takes well under this.
AT_ONCE = 2.0


def zbus_run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
             timeout: float = 30.0) -> tuple[subprocess.CompletedProcess[str], float]:
    """``zbus ARGS`` with ``env`` added to a clean environment (no ZBUS_* of the caller's),
    and how long it took."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("ZBUS_")}
    full.update(env or {})
    started = time.monotonic()
    result = subprocess.run([*ZBUS, *args], capture_output=True, text=True, timeout=timeout,
                            env=full, cwd=cwd)
    return result, time.monotonic() - started


@pytest.fixture
def tap_processes() -> Iterator[list[Tap]]:
    taps: list[Tap] = []
    yield taps
    for tap in taps:
        tap.stop()


# -- item 1: "no proxy" says which, at once -------------------------------------------------


@pytest.mark.parametrize("command", [
    ["stats", "--timeout", "5"],
    ["tap", "ex/#", "--ready-timeout", "5"],
    ["pub", "ex", "a.b", "1", "--key-hex", "00" * 32],
])
@pytest.mark.parametrize(("where", "says"), [
    ("nowhere", "there is no such directory"),
    (".", "it has no control.sock"),
    ("a-file", "is a file, not a run directory"),
])
def test_no_proxy_says_which_at_once(run_dir: Path, command: list[str], where: str,
                                     says: str) -> None:
    (run_dir / "a-file").write_text("not a directory\n")
    target = run_dir / where
    result, took = zbus_run(*command, "--run-dir", str(target))
    assert result.returncode == 1, result.stderr
    assert says in result.stderr and str(target.resolve()) in result.stderr
    assert "dead letters" not in result.stderr and "Traceback" not in result.stderr
    assert took < AT_ONCE, f"waited {took:.1f}s: {result.stderr}"


def test_a_killed_proxy_s_sockets_are_told_from_a_running_proxy(run_dir: Path) -> None:
    proxy = ProxyProcess(run_dir).start()
    assert proxy.stop(signal.SIGKILL) == -signal.SIGKILL
    assert (run_dir / "control.sock").exists()  # left behind: a stale socket
    result, took = zbus_run("stats", "--run-dir", str(run_dir), "--timeout", "5")
    assert result.returncode == 1 and took < AT_ONCE
    assert "nothing listens on" in result.stderr and "killed" in result.stderr


def _unprivileged(cmd: list[str]) -> list[str]:
    """``cmd`` as this user without the capabilities that let root open any file."""
    if os.getuid() != 0:
        return cmd
    if shutil.which("setpriv") is None:
        pytest.skip("root without setpriv: cannot run a command that permissions bind")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--", *cmd]


def test_a_socket_this_user_may_not_open_says_permission_denied(
        proxy_process: ProxyProcess) -> None:
    control = proxy_process.run_dir / "control.sock"
    if os.getuid() == 0:
        os.chown(control, 65534, 65534)  # still 0600: root without DAC_OVERRIDE is refused
    else:
        control.chmod(0)
    try:
        started = time.monotonic()
        result = subprocess.run(
            _unprivileged([*ZBUS, "stats", "--run-dir", str(proxy_process.run_dir),
                           "--timeout", "5"]),
            capture_output=True, text=True, timeout=30)
        took = time.monotonic() - started
    finally:
        if os.getuid() == 0:
            os.chown(control, 0, 0)
        else:
            control.chmod(0o600)
    assert result.returncode == 1 and took < AT_ONCE, result.stderr
    assert f"permission denied on {control}" in result.stderr


def test_a_stuck_proxy_is_waited_for_as_long_as_asked(proxy_process: ProxyProcess) -> None:
    run_dir = str(proxy_process.run_dir)
    os.kill(proxy_process.pid, signal.SIGSTOP)
    try:
        stats, _ = zbus_run("stats", "--run-dir", run_dir, "--timeout", "0.5")
        # tap's --ready-timeout used to be cut to the ping's fixed 3 s
        tap, took = zbus_run("tap", "ex/#", "--run-dir", run_dir, "--ready-timeout", "1")
    finally:
        os.kill(proxy_process.pid, signal.SIGCONT)
    assert stats.returncode == 1
    assert f"zbus-proxy on {run_dir} did not answer 'ping' within 0.5s" in stats.stderr
    assert "busy or stuck" in stats.stderr and "dead letters" not in stats.stderr
    assert tap.returncode == 1 and "did not answer 'ping' within 1s" in tap.stderr
    assert took < 1 + AT_ONCE


def test_a_connection_to_no_proxy_fails_at_its_first_send(run_dir: Path, key: bytes) -> None:
    typo = run_dir / "zbus-typo"
    factory = zbus.MessageFactory(key, "svc")
    conn = zbus.Connection(typo)
    try:
        with pytest.raises(zbus.ProxyError) as caught:
            zbus.Publisher(conn.exchange("ex"), factory).send("a.b", 1)
    finally:
        conn.close()
    text = str(caught.value)
    assert "nothing sent" in text and f"zbus-proxy --run-dir {typo}" in text
    assert "require_proxy=False" in text
    # Explicitly before its proxy: the message waits in the connection's queue.
    early = zbus.Connection(run_dir, require_proxy=False, settings=zbus.Settings(linger=0))
    try:
        zbus.Publisher(early.exchange("ex"), factory).send("a.b", 2)
    finally:
        early.close()


def test_a_connection_outlives_its_proxy_s_restart(run_dir: Path, key: bytes) -> None:
    factory = zbus.MessageFactory(key, "svc")
    proxy = ProxyProcess(run_dir).start()
    conn = zbus.Connection(run_dir)
    try:
        publisher = zbus.Publisher(conn.exchange("ex"), factory)
        publisher.send("a.b", 1)
        conn.flush()
        assert proxy.stop() == 0
        assert not (run_dir / "control.sock").exists()  # what a first send would refuse
        proxy = ProxyProcess(run_dir).start()
        got: list[Any] = []
        dispatcher = zbus.Dispatcher()
        dispatcher.bind("ex", "#", lambda d: got.append(d.payload))
        with zbus.Connection(run_dir) as sub_conn, sub_conn.subscribe(dispatcher, key) as sub:
            sub.ready()
            publisher.send("a.b", 2)
            conn.flush()
            sub.run(max_messages=1, idle_timeout=10)
        assert got == [2]
    finally:
        conn.close()
        proxy.stop()


# -- item 2: shared configuration ------------------------------------------------------------


def test_run_dir_comes_from_flag_then_environment_then_config_file(
        proxy_process: ProxyProcess, tmp_path: Path) -> None:
    good = str(proxy_process.run_dir)
    bad = str(tmp_path / "no-proxy-here")
    good_toml, bad_toml = tmp_path / "good.toml", tmp_path / "bad.toml"
    good_toml.write_text(f"run_dir = {good!r}\n[limits]\nmax_message_bytes = 4194304\n")
    bad_toml.write_text(f"run_dir = {bad!r}\n")

    def pid_seen(*args: str, **env: str) -> tuple[int, str]:
        result, _ = zbus_run("stats", "--json", *args, env=env)
        if result.returncode:
            return result.returncode, result.stderr
        return 0, str(json.loads(result.stdout)["pid"])

    me = str(proxy_process.pid)
    assert pid_seen(ZBUS_RUN_DIR=good) == (0, me)
    assert pid_seen("--config", str(good_toml)) == (0, me)
    assert pid_seen(ZBUS_CONFIG=str(good_toml)) == (0, me)
    assert pid_seen("--run-dir", good, ZBUS_RUN_DIR=bad) == (0, me)  # flag > environment
    code, err = pid_seen("--config", str(good_toml), ZBUS_RUN_DIR=bad)  # environment > file
    assert code == 1 and f"{bad}: there is no such directory" in err
    assert "[run directory from $ZBUS_RUN_DIR]" in err
    code, err = pid_seen("--config", str(bad_toml))
    assert code == 1 and f"[run directory from run_dir in {bad_toml}]" in err
    (tmp_path / "typo.toml").write_text("[limits]\nmax_mesage_bytes = 1\n")
    code, err = pid_seen("--config", str(tmp_path / "typo.toml"))
    assert code == 2 and "limits.max_message_bytes" in err  # the proxy's own check


def test_key_file_and_key_id_from_the_environment(
        proxy_process: ProxyProcess, tmp_path: Path, tap_processes: list[Tap]) -> None:
    run_dir = str(proxy_process.run_dir)
    keys = tmp_path / "ring.key"
    keys.write_text(f"old {zbus.generate_key().hex()}\nnew {zbus.generate_key().hex()}\n")
    keys.chmod(0o600)
    tap = Tap("audit/#", "--json", "--key-file", str(keys), "--count", "2", "--timeout", "30",
              "--run-dir", run_dir)
    tap_processes.append(tap)
    tap.wait_ready()
    for env in ({"ZBUS_KEY_FILE": str(keys)},
                {"ZBUS_KEY_FILE": str(keys), "ZBUS_KEY_ID": "new"}):
        result, _ = zbus_run("pub", "audit", "user.login", "1",
                             env={**env, "ZBUS_RUN_DIR": run_dir})
        assert result.returncode == 0, result.stderr
    code, out, err = tap.finish()
    assert code == 0, err
    assert [json.loads(line)["key_id"] for line in out.splitlines()] == ["old", "new"]
    both, _ = zbus_run("pub", "audit", "a.b", "1", "--run-dir", run_dir, env={
        "ZBUS_KEY_FILE": str(keys), "ZBUS_KEY_HEX": "00" * 32})
    assert both.returncode == 2 and "both set" in both.stderr
    unknown, _ = zbus_run("pub", "audit", "a.b", "1", "--run-dir", run_dir, "--key-id", "x",
                          env={"ZBUS_KEY_FILE": str(keys)})
    assert unknown.returncode == 2 and "key id 'x'" in unknown.stderr


# -- item 6: shell habits --------------------------------------------------------------------


def test_tap_into_head_ends_quietly(proxy_process: ProxyProcess, key: bytes) -> None:
    run_dir = str(proxy_process.run_dir)
    tap = subprocess.Popen([*ZBUS, "tap", "ex/#", "--key-hex", key.hex(), "--run-dir", run_dir],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert tap.stderr is not None and tap.stdout is not None
        assert tap.stderr.readline().startswith(b"READY")
        with zbus.Connection(run_dir) as conn:
            publisher = zbus.Publisher(conn.exchange("ex"), zbus.MessageFactory(key, "p"))
            publisher.send("a", 0)
            conn.flush()
            assert b"ex/a" in tap.stdout.readline()
            tap.stdout.close()  # what 'head -1' does once it has its line
            deadline = time.monotonic() + 20
            while tap.poll() is None and time.monotonic() < deadline:
                publisher.send("a", 1)  # the next line written meets the closed pipe
                conn.flush()
                time.sleep(0.05)  # pacing the messages, not synchronising
        err = tap.stderr.read().decode()
        assert tap.wait(10) == 0, err
    finally:
        if tap.poll() is None:
            tap.kill()
        tap.wait()
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert "tap: shown" in err


@pytest.mark.parametrize("tool", [ZBUS, PROXY])
def test_both_tools_have_version(tool: list[str]) -> None:
    result = subprocess.run([*tool, "--version"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == zbus.__version__


def test_help_says_what_a_newcomer_needs() -> None:
    pub, _ = zbus_run("pub", "--help")
    text = " ".join(pub.stdout.split())
    assert "A signing key is required" in text
    assert "the exchange (message class) to publish on" in text
    assert "dotted words that consumers' patterns match" in text
    assert "(default: 1)" in text and "ZBUS_KEY_FILE" in text and "ZBUS_RUN_DIR" in text
    tap, _ = zbus_run("tap", "--help")
    text = " ".join(tap.stdout.split())
    assert "(default: no limit)" in text and "(default: none; Ctrl-C or SIGTERM)" in text
    stats, _ = zbus_run("stats", "--help")
    assert "(default: print once)" in " ".join(stats.stdout.split())


def test_bench_help_works_outside_a_checkout(tmp_path: Path) -> None:
    result, _ = zbus_run("bench", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "usage: zbus bench" in result.stdout
    assert "not a checkout's root" in result.stdout


def test_stats_says_it_counts_frames_and_redraws_on_a_terminal(
        proxy_process: ProxyProcess) -> None:
    run_dir = str(proxy_process.run_dir)
    plain, _ = zbus_run("stats", "--run-dir", run_dir)
    header = plain.stdout.splitlines()[1].split()
    assert header[:3] == ["DEVICE", "FRAMES-IN", "FRAMES-OUT"] and "~MSGS-IN" in header
    assert "Counted in ZeroMQ frames, not messages" in plain.stdout
    leader, follower = pty.openpty()
    watch = subprocess.Popen([*ZBUS, "stats", "--run-dir", run_dir, "--watch", "0.1"],
                             stdout=follower, stderr=subprocess.PIPE)
    os.close(follower)
    seen = b""
    try:
        deadline = time.monotonic() + 20
        while seen.count(b"zbus-proxy pid") < 3 and time.monotonic() < deadline:
            if select.select([leader], [], [], 0.5)[0]:
                seen += os.read(leader, 65536)
    finally:
        watch.send_signal(signal.SIGINT)
        watch.communicate(timeout=10)
        os.close(leader)
    redraws = seen.count(b"\x1b[H\x1b[J")
    assert seen.count(b"zbus-proxy pid") >= 3 and redraws >= seen.count(b"zbus-proxy pid")


def test_fast_pool_columns_tell_disconnects_from_goodbyes(
        proxy_process: ProxyProcess, key: bytes) -> None:
    run_dir = proxy_process.run_dir
    dispatcher = zbus.Dispatcher()
    dispatcher.bind("ex", "#", lambda d: None)
    with zbus.Connection(run_dir) as conn:
        conn.declare_pool("workers", ["ex/#"])
        with conn.join_pool("workers", dispatcher, key) as member:
            member.ready()
            zbus.Publisher(conn.exchange("ex"), zbus.MessageFactory(key, "p")).send("a", 1)
            assert member.run(max_messages=1, idle_timeout=10) == 1
        # closed cleanly: it said goodbye (a final report, sent by a member that read)
    deadline = time.monotonic() + 10
    while True:  # the proxy hears the disconnect and the final report asynchronously
        stats, _ = zbus_run("stats", "--json", "--run-dir", str(run_dir))
        fast = json.loads(stats.stdout)["fast_pools"]["workers"]
        if (fast["members_lost"], fast["members_closed"]) == (1, 1):
            break
        assert time.monotonic() < deadline, fast
    table, _ = zbus_run("stats", "--run-dir", str(run_dir))
    lines = table.stdout.splitlines()
    header = next(line.split() for line in lines if line.split()[:1] == ["POOL"])
    assert "MEMBERS-LOST" not in header
    row = next(line.split() for line in lines if line.split()[:1] == ["workers"])
    assert row[header.index("DISCONNECTS")] == "1" and row[header.index("GOODBYES")] == "1"
    assert "clean leaves and crashes alike" in table.stdout


# -- item 10 ---------------------------------------------------------------------------------


def test_the_readme_guide_runs_again_after_an_edit() -> None:
    code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    edited = code.replace('pool_dispatcher.bind("metering", "#"',
                          'pool_dispatcher.bind("metering", "meter"')
    assert edited != code
    before = set(Path("/tmp").glob("zbus-guide*"))
    for version in (code, edited):  # pools.json of the first run used to refuse the second
        result = subprocess.run([sys.executable, "-c", version], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stderr
    assert set(Path("/tmp").glob("zbus-guide*")) == before  # it cleans up after itself


@pytest.mark.parametrize("below", ["", "/run"])
def test_a_file_given_as_run_dir_is_named_clearly(run_dir: Path, below: str) -> None:
    path = run_dir / "a-file"
    path.write_text("")
    target = f"{path}{below}"
    proxy = subprocess.run([*PROXY, "--run-dir", target], capture_output=True, text=True,
                           timeout=30)
    assert proxy.returncode in (1, 2) and "Errno" not in proxy.stderr, proxy.stderr
    assert "not a directory" in proxy.stderr and str(path) in proxy.stderr
    client, _ = zbus_run("stats", "--run-dir", target)
    assert client.returncode == 1 and "Errno" not in client.stderr, client.stderr


def test_a_busy_metrics_port_fails_before_ready(run_dir: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([*PROXY, "--run-dir", str(run_dir), "--metrics-port", str(port)],
                                capture_output=True, text=True, timeout=30)
    assert result.returncode == 3, result.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port}" in result.stderr
    assert "zbus-proxy ready" not in result.stderr and "started" not in result.stderr
    assert not (run_dir / "control.sock").exists()  # it never took the run directory
    # and a free port still serves, once the proxy is up
    free = free_port()
    proxy = ProxyProcess(run_dir, "--metrics-port", str(free)).start()
    try:
        log = proxy.log.read_text()
        assert log.index("metrics endpoint listening") < log.index("ready")
    finally:
        assert proxy.stop() == 0
