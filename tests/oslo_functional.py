"""Run oslo.messaging's own functional notification suite against the zbus driver (tox -e oslo).

    python -m tests.oslo_functional [PYTEST ARGS]

Starts a real ``zbus-proxy`` on a fresh run directory, writes a signing key, then runs
``NOTIFY_TRANSPORT_URL=zbus:// python -m pytest --pyargs
oslo_messaging.tests.functional.test_functional -k NotifyTestCase``, and stops the proxy
whatever happened. The run directory and key reach the driver through ``ZBUS_RUN_DIR`` and
``ZBUS_KEY_FILE``: the suite checks every query option of the URL against the Kafka
driver's options (``SkipIfNoTransportURL.setUp``), so the URL itself must carry none.
Exits with pytest's status. Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zbus


def main(argv: list[str]) -> int:
    base = Path(tempfile.mkdtemp(prefix="zb-oslo-", dir="/tmp"))
    base.chmod(0o700)
    run_dir = base / "run"
    key_file = base / "signing.key"
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"default {zbus.generate_key().hex()}\n")
    log = open(base / "proxy.log", "wb")  # noqa: SIM115 - closed in finally
    proxy = subprocess.Popen([sys.executable, "-m", "zbus_proxy", "--run-dir", str(run_dir)],
                             stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            if proxy.poll() is not None:
                print((base / "proxy.log").read_text(), file=sys.stderr)
                return 2
            try:
                with zbus.Connection(run_dir) as conn:
                    conn.control.request("ping", timeout=0.5)
                break
            except zbus.ZbusError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        env = {**os.environ, "NOTIFY_TRANSPORT_URL": "zbus://", "ZBUS_RUN_DIR": str(run_dir),
               "ZBUS_KEY_FILE": str(key_file)}
        env.pop("RPC_TRANSPORT_URL", None)  # zbus:// serves no RPC: those tests must skip
        return subprocess.call(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA",
             "-W", "ignore::DeprecationWarning", "--pyargs",
             "oslo_messaging.tests.functional.test_functional", "-k", "NotifyTestCase", *argv],
            env=env)
    finally:
        proxy.terminate()
        try:
            proxy.wait(10)
        except subprocess.TimeoutExpired:
            proxy.kill()
            proxy.wait()
        log.close()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
