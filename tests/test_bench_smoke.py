"""The bench runs end to end in its smoke mode: real proxies (zbus's and a plain zmq.proxy),
publishers and consumers in their own processes, every figure of the headline table made."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_quick_smoke_measures_zbus_and_both_raw_baselines(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--count", "5000", "--no-peers", "-q",
         "--latency-duration", "0.5", "--only", "fanout-1", "--only", "latency-5k",
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=90,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAILED" not in result.stdout, result.stdout
    assert "| fan-out, 1 subscriber |" in result.stdout
    assert "CPU per message, all processes" in result.stdout
    rows = {r["scenario"]: r for r in json.loads(out.read_text())["scenarios"]}
    fanout = rows["fanout-1"]["results"]
    assert set(fanout) == {"zbus", "raw", "raw-same"}
    for name, res in fanout.items():
        assert res["lost"] == 0, (name, res)
        assert res["msgs_per_s"] > 0, (name, res)
        assert res["cpu_us_per_msg"]["total"] > 0, (name, res)
    # Timed from the first send: the publisher's own rate can only be faster or equal.
    assert fanout["zbus"]["msgs_per_s"] <= fanout["zbus"]["send_msgs_per_s"] * 1.01
    latency = rows["latency-5k"]["results"]
    assert {"zbus", "raw"} <= set(latency)
    assert all(latency[n]["p50_us"] > 0 for n in ("zbus", "raw"))
    assert elapsed < 30, f"the smoke run took {elapsed:.0f}s"
