"""The results table (markdown, so it pastes into README.md), JSON and the chart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["plot", "table", "write_json"]


def _rate(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 10_000:
        return f"{value / 1000:,.0f}k"
    return f"{value / 1000:,.1f}k"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _peer(row: dict[str, Any], name: str) -> str:
    res = row["results"].get(name)
    if res is None:
        return "-"
    text = _rate(res["msgs_per_s"])
    if res["lost"]:
        text += f" ({res['lost']} lost)"
    return text


def _lost(res: dict[str, Any] | None) -> str:
    if res is None:
        return "-"
    text = str(res["lost"])
    if res.get("sequence_gaps"):
        text += f" (gaps {res['sequence_gaps']})"
    return text


def table(rows: list[dict[str, Any]]) -> str:
    """Throughput rows, then latency rows, as markdown tables."""
    out: list[str] = []
    thr = [r for r in rows if r["kind"] == "throughput"]
    lat = [r for r in rows if r["kind"] == "latency"]
    if thr:
        out += [
            "| scenario | payload | zbus msg/s | raw msg/s | zbus/raw | zbus lost | raw lost "
            "| rabbitmq msg/s | nats msg/s | zbus/rabbitmq | zbus/nats |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in thr:
            res = r["results"]
            out.append(
                f"| {r['scenario']} | {r['size']} B | {_rate(r['zbus_msgs_per_s'])} "
                f"| {_rate(r['raw_msgs_per_s'])} | {_ratio(r['ratio'])} "
                f"| {_lost(res.get('zbus'))} | {_lost(res.get('raw'))} "
                f"| {_peer(r, 'rabbitmq')} | {_peer(r, 'nats')} "
                f"| {_ratio(r.get('ratio_vs_rabbitmq'))} | {_ratio(r.get('ratio_vs_nats'))} |"
            )
    if lat:
        if out:
            out.append("")
        out += [
            "| scenario | payload | zbus p50 / p99 / p99.9 (us) | raw p50 / p99 / p99.9 (us) "
            "| zbus max (us) | zbus lost | raw lost |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in lat:
            cells = []
            for name in ("zbus", "raw"):
                res = r["results"].get(name)
                cells.append("-" if res is None else
                             f"{res['p50_us']:.0f} / {res['p99_us']:.0f} / {res['p99_9_us']:.0f}")
            zb = r["results"].get("zbus")
            zmax = "-" if zb is None else f"{zb['max_us']:.0f}"
            out.append(
                f"| {r['scenario']} | {r['size']} B | {cells[0]} | {cells[1]} "
                f"| {zmax} "
                f"| {_lost(zb)} | {_lost(r['results'].get('raw'))} |"
            )
    for extra in (_backend_table(rows), _tcp_table(rows), _reliable_table(rows)):
        if extra:
            if out:
                out.append("")
            out += extra
    failed = [(r, v, why) for r in rows for v, why in r["failures"].items()]
    for r, variant, why in failed:
        out.append(f"\n{r['scenario']} {r['size']} B {variant}: FAILED: {why}")
    return "\n".join(out)


def _backend_table(rows: list[dict[str, Any]]) -> list[str]:
    """One line per backend and payload: publish and consume side, each against the threads
    backend and raw pyzmq of the same scenario."""
    by_size: dict[int, dict[str, dict[str, Any]]] = {}
    for r in rows:
        if r["kind"] in ("backend-publish", "backend-consume"):
            by_size.setdefault(r["size"], {})[r["kind"].split("-")[1]] = r
    if not by_size:
        return []
    out = [
        "| backend | payload | publish msg/s | publish vs threads | publish vs raw "
        "| consume msg/s | consume vs threads | consume vs raw | lost (publish / consume) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size, sides in by_size.items():
        for name in ("threads", "asyncio", "eventlet", "raw"):
            cells = []
            lost = []
            for side in ("publish", "consume"):
                row = sides.get(side)
                res = row["results"].get(name) if row else None
                if row is None or res is None:
                    cells += ["-", "-", "-"]
                    lost.append("-")
                    continue
                b = row["backends"].get(name)
                cells += [_rate(res["msgs_per_s"]),
                          _ratio(b["ratio_vs_threads"]) if b else "-",
                          _ratio(b["ratio_vs_raw"]) if b else "1.00x"]
                lost.append(_lost(res))
            label = "raw pyzmq" if name == "raw" else name
            out.append(f"| {label} | {size} B | " + " | ".join(cells)
                       + f" | {' / '.join(lost)} |")
    return out


def _tcp_table(rows: list[dict[str, Any]]) -> list[str]:
    tcp = [r for r in rows if r["kind"] == "tcp"]
    if not tcp:
        return []
    out = [
        "| scenario | payload | zbus cross-host | raw cross-host | zbus/raw cross-host "
        "| zbus single-host | raw single-host | zbus/raw single-host "
        "| zbus cross/single | raw cross/single | lost (zbus / raw, cross-host) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in tcp:
        res = r["results"]
        out.append(
            f"| {r['scenario']} | {r['size']} B | {_rate(r['zbus_msgs_per_s'])} "
            f"| {_rate(r['raw_msgs_per_s'])} | {_ratio(r['ratio'])} "
            f"| {_rate(r['zbus_local_msgs_per_s'])} | {_rate(r['raw_local_msgs_per_s'])} "
            f"| {_ratio(r['ratio_local'])} | {_ratio(r['zbus_cross_vs_local'])} "
            f"| {_ratio(r['raw_cross_vs_local'])} "
            f"| {_lost(res.get('zbus'))} / {_lost(res.get('raw'))} |"
        )
    return out


def _reliable_table(rows: list[dict[str, Any]]) -> list[str]:
    rel = [r for r in rows if r["kind"] == "reliable"]
    if not rel:
        return []
    out = [
        "| scenario | payload | pool | msg/s | vs fast pool | vs raw | lost "
        "| acked / redelivered / duplicates |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rel:
        res = r["results"]
        fast, raw = res.get("fast"), res.get("raw")
        for name, v in res.items():
            if name.startswith("reliable-w"):
                label = f"at-least-once, window {name.removeprefix('reliable-w')}"
            else:
                label = {"fast": "fast (at-most-once)", "raw": "raw pyzmq PULL"}.get(name, name)
            books = v.get("reliable")
            book = (f"{books['acked']} / {books['redelivered']} / {books['duplicates']}"
                    if books else "-")
            vs_fast = _ratio(v["msgs_per_s"] / fast["msgs_per_s"]) \
                if fast and fast["msgs_per_s"] else "-"
            vs_raw = _ratio(v["msgs_per_s"] / raw["msgs_per_s"]) \
                if raw and raw["msgs_per_s"] else "-"
            out.append(f"| {r['scenario']} | {r['size']} B | {label} | {_rate(v['msgs_per_s'])} "
                       f"| {vs_fast} | {vs_raw} | {_lost(v)} | {book} |")
    return out


def write_json(path: str, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    Path(path).write_text(json.dumps({"meta": meta, "scenarios": rows}, indent=2) + "\n")


def plot(path: str, rows: list[dict[str, Any]], title: str) -> str | None:
    """Draw the chart; returns why not when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no chart"
    thr = [r for r in rows if r["kind"] == "throughput"]
    lat = [r for r in rows if r["kind"] == "latency"]
    more = [r for r in rows if r["kind"] not in ("throughput", "latency")]
    panels = 1 + bool(lat) + bool(more)
    fig, axes = plt.subplots(panels, 1, figsize=(12, 4 + 3.5 * (panels - 1)), squeeze=False)
    variants = ["zbus", "raw", "rabbitmq", "nats"]
    colours = {"zbus": "#1f77b4", "raw": "#7f7f7f", "rabbitmq": "#ff7f0e", "nats": "#2ca02c"}
    ax = axes[0][0]
    width = 0.2
    for i, name in enumerate(variants):
        xs, ys = [], []
        for j, r in enumerate(thr):
            res = r["results"].get(name)
            if res and res["msgs_per_s"]:
                xs.append(j + (i - 1.5) * width)
                ys.append(res["msgs_per_s"])
        if xs:
            ax.bar(xs, ys, width, label=name, color=colours[name])
    ax.set_xticks(range(len(thr)), [f"{r['scenario']}\n{r['size']} B" for r in thr],
                  fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("messages received / s")
    ax.set_title(title)
    if thr:
        ax.legend()
    ax.grid(axis="y", alpha=0.3)
    if lat:
        ax = axes[1][0]
        for i, name in enumerate(["zbus", "raw"]):
            for k, (q, hatch) in enumerate((("p50_us", ""), ("p99_us", "//"),
                                            ("p99_9_us", ".."))):
                xs, ys = [], []
                for j, r in enumerate(lat):
                    res = r["results"].get(name)
                    if res:
                        xs.append(j + (i * 3 + k - 2.5) * 0.13)
                        ys.append(res[q])
                ax.bar(xs, ys, 0.13, color=colours[name], hatch=hatch,
                       label=f"{name} {q.removesuffix('_us').replace('_', '.')}")
        ax.set_xticks(range(len(lat)), [f"{r['scenario']}\n{r['size']} B" for r in lat],
                      fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("one-way latency (us)")
        ax.legend(fontsize=7, ncol=2, loc="upper left")
        ax.grid(axis="y", alpha=0.3)
    if more:
        ax = axes[panels - 1][0]
        names = list(dict.fromkeys(n for r in more for n in r["results"]))
        palette = plt.get_cmap("tab20")
        width = 0.8 / max(len(r["results"]) for r in more)
        for k, name in enumerate(names):
            xs, ys = [], []
            for j, r in enumerate(more):
                order = list(r["results"])
                res = r["results"].get(name)
                if res and res["msgs_per_s"]:
                    xs.append(j + (order.index(name) - (len(order) - 1) / 2) * width)
                    ys.append(res["msgs_per_s"])
            if xs:
                ax.bar(xs, ys, width, label=name, color=palette(k % 20))
        ax.set_xticks(range(len(more)), [f"{r['scenario']}\n{r['size']} B" for r in more],
                      fontsize=8)
        ax.set_ylabel("messages received / s")
        ax.set_title("backends, cross-host (tcp), at-least-once pool", fontsize=9)
        ax.legend(fontsize=7, ncol=4, loc="upper right")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
