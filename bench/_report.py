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
    """The headline table, every variant's figures, then the older scenarios' tables, as
    markdown."""
    out: list[str] = headline(rows)
    variants = _variant_table(rows)
    if variants:
        out += [""] if out else []
        out += variants
    thr = [r for r in rows if r["kind"] == "throughput"]
    lat = [r for r in rows if r["kind"] == "latency"]
    if thr:
        out += [""] if out else []
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
            "| scenario | payload | zbus p50 / p99 / p99.9 (us) | raw through zmq.proxy "
            "p50 / p99 / p99.9 (us) | raw of zbus's shape p50 / p99 / p99.9 (us) "
            "| zbus max (us) | zbus lost | raw lost |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in lat:
            cells = []
            for name in ("zbus", "raw", "raw-same"):
                res = r["results"].get(name)
                cells.append("-" if res is None else
                             f"{res['p50_us']:.0f} / {res['p99_us']:.0f} / {res['p99_9_us']:.0f}")
            zb = r["results"].get("zbus")
            zmax = "-" if zb is None else f"{zb['max_us']:.0f}"
            out.append(
                f"| {r['scenario']} | {r['size']} B | {cells[0]} | {cells[1]} | {cells[2]} "
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


def _res(rows: list[dict[str, Any]], scenario: str, size: int,
         variant: str) -> dict[str, Any] | None:
    for r in rows:
        if r["scenario"] == scenario and r["size"] == size:
            res: dict[str, Any] | None = r["results"].get(variant)
            return res
    return None


def _over(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _cpu(res: dict[str, Any] | None) -> str:
    if res is None:
        return "-"
    c = res["cpu_us_per_msg"]
    return (f"{c['total']:.1f} us (pub {c['publisher']:.1f}, proxy {c['proxy']:.1f}, "
            f"sub {c['consumers']:.1f})")


NAMES = {
    "raw": "plain pyzmq through zmq.proxy, 2 frames, HWM 0",
    "raw-same": "raw pyzmq of zbus's shape (3 frames) through zbus's proxy",
    "nats": "NATS + nats-py",
    "rabbitmq": "RabbitMQ + pika",
}


def headline(rows: list[dict[str, Any]]) -> list[str]:
    """Issue 16's table: zbus beside what a user would compare it with, every goal's ratio
    (one table per payload size)."""
    sizes = sorted({r["size"] for r in rows if r.get("headline") and r["kind"] != "hops"})
    out: list[str] = []
    for size in sizes:
        lines = _headline_lines(rows, size)
        if not lines:
            continue
        out += [""] if out else []
        out += [f"| what ({size} B) | zbus | reference, same run | ratio | goal "
                "| lost (zbus / reference) |",
                "|---|---:|---:|---:|---|---:|"]
        for what, zb_text, ref_text, ratio, goal, lost_text in lines:
            out.append(f"| {what} | {zb_text} | {ref_text} | {_ratio(ratio)} | {goal} "
                       f"| {lost_text} |")
    return out


Line = tuple[str, str, str, float | None, str, str]


def _headline_lines(rows: list[dict[str, Any]], size: int) -> list[Line]:
    def get(scenario: str, variant: str) -> dict[str, Any] | None:
        return _res(rows, scenario, size, variant)

    def rate(scenario: str, variant: str, per: bool = False) -> float | None:
        res = get(scenario, variant)
        if res is None:
            return None
        value: float = res["per_consumer_msgs_per_s" if per else "msgs_per_s"]
        return value

    lines: list[tuple[str, str, str, float | None, str, str]] = []

    def line(what: str, zb: float | None, ref_name: str, ref: float | None, goal: str,
             lost: str, zb_text: str | None = None) -> None:
        ratio = _over(zb, ref)
        lines.append((what, zb_text if zb_text is not None else _rate(zb),
                      f"{ref_name}: {_rate(ref)}", ratio, goal, lost))

    def lost(*pairs: tuple[str, str]) -> str:
        return " / ".join(_lost(get(s, v)) for s, v in pairs)

    zb1 = rate("fanout-1", "zbus")
    for ref, goal in (("raw", ">= 0.9x"), ("raw-same", ""), ("nats", ">= 1.0x"),
                      ("rabbitmq", ">= 10x")):
        if get("fanout-1", ref) or ref == "raw":
            line("fan-out, 1 subscriber" if ref == "raw" else "same", zb1, NAMES[ref],
                 rate("fanout-1", ref), goal, lost(("fanout-1", "zbus"), ("fanout-1", ref)),
                 None if ref == "raw" else "")
    zb4 = rate("fanout-4", "zbus", per=True)
    if get("fanout-4", "zbus"):
        line("fan-out, 4 subscribers (per subscriber)", zb4, NAMES["raw"] + ", per "
             "subscriber", rate("fanout-4", "raw", per=True), "",
             lost(("fanout-4", "zbus"), ("fanout-4", "raw")))
        line("same", zb4, "zbus, 1 subscriber", zb1, ">= 0.8x", "", "")
        for ref in ("raw-same", "nats"):
            if get("fanout-4", ref):
                line("same", zb4, NAMES[ref] + ", per subscriber",
                     rate("fanout-4", ref, per=True), "",
                     lost(("fanout-4", "zbus"), ("fanout-4", ref)), "")
    zbp = rate("pool-2", "zbus")
    if get("pool-2", "zbus"):
        first = True
        for ref, goal, name in (("nats", ">= 1.0x", "NATS queue group of 2"),
                                ("raw", "", "plain PUSH -> zmq.proxy -> 2 PULL, HWM 0"),
                                ("raw-same", "", "raw PULL of zbus's shape"),
                                ("rabbitmq", ">= 10x", "RabbitMQ, one shared queue")):
            if get("pool-2", ref):
                line("pool of 2" if first else "same", zbp, name, rate("pool-2", ref),
                     goal, lost(("pool-2", "zbus"), ("pool-2", ref)),
                     None if first else "")
                first = False
        if get("pool-2", "at-least-once"):
            line("at-least-once pool of 2 (window 10)", rate("pool-2", "at-least-once"),
                 "fast pool of 2", zbp, ">= 0.5x",
                 lost(("pool-2", "at-least-once"), ("pool-2", "zbus")))
    for sc, what, ref in (("eventlet-publish", "eventlet green publisher",
                           "raw eventlet.green.zmq PUSH"),
                          ("asyncio-publish", "asyncio publisher", "raw zmq.asyncio PUSH")):
        if get(sc, "zbus"):
            line(what, rate(sc, "zbus"), ref, rate(sc, "raw"), ">= 0.9x",
                 lost((sc, "zbus"), (sc, "raw")))
    zl, rl = get("latency-5k", "zbus"), get("latency-5k", "raw")
    if zl:
        for q, goal in (("p99", "< 300 us"), ("p50", "<= 1.2x")):
            zv = zl[f"{q}_us"]
            rv = rl[f"{q}_us"] if rl else None
            lines.append((f"one-way {q} at 5k msg/s, ipc", f"{zv:.0f} us",
                          f"raw through zmq.proxy: {'-' if rv is None else f'{rv:.0f} us'}",
                          _over(zv, rv), goal, lost(("latency-5k", "zbus"),
                                                    ("latency-5k", "raw"))))
    zc, rc = get("fanout-1", "zbus"), get("fanout-1", "raw")
    if zc:
        lines.append(("CPU per message, all processes (fan-out 1)", _cpu(zc),
                      f"raw through zmq.proxy: {_cpu(rc)}",
                      _over(zc["cpu_us_per_msg"]["total"],
                            rc["cpu_us_per_msg"]["total"] if rc else None),
                      "<= 1.5x", ""))
    return lines


def _variant_table(rows: list[dict[str, Any]]) -> list[str]:
    """Every variant of the headline and one-hop scenarios: rate, per consumer, CPU."""
    picked = [r for r in rows if r.get("headline") and r["kind"] != "latency"]
    if not picked:
        return []
    out = ["| scenario | payload | variant | msg/s | per consumer | sent msg/s "
           "| CPU us/msg: publisher / proxy / consumers / total | lost |",
           "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in picked:
        for name, res in r["results"].items():
            c = res["cpu_us_per_msg"]
            out.append(
                f"| {r['scenario']} | {r['size']} B | {name} | {_rate(res['msgs_per_s'])} "
                f"| {_rate(res['per_consumer_msgs_per_s'])} | {_rate(res['send_msgs_per_s'])} "
                f"| {c['publisher']:.1f} / {c['proxy']:.1f} / {c['consumers']:.1f} / "
                f"{c['total']:.1f} | {_lost(res)} |")
    return out


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
    head = [r for r in rows if r.get("headline") and r["kind"] != "latency"]
    lat = [r for r in rows if r["kind"] == "latency"]
    more = [r for r in rows if not r.get("headline") and r["kind"] != "latency"]
    panels = [p for p in ((head, "messages received / s (per consumer)", title),
                          (lat, "one-way latency (us)", "latency"),
                          (more, "messages received / s", "older scenarios")) if p[0]]
    if not panels:
        return "nothing to draw"
    fig, axes = plt.subplots(len(panels), 1, figsize=(13, 4.5 * len(panels)), squeeze=False)
    names = list(dict.fromkeys(n for r in rows for n in r["results"]))
    palette = plt.get_cmap("tab20")
    colours = {n: palette(i % 20) for i, n in enumerate(names)}
    for ax, (picked, ylabel, heading) in zip((a[0] for a in axes), panels, strict=True):
        latency = picked is lat
        width = 0.8 / max(len(r["results"]) * (3 if latency else 1) for r in picked)
        drawn: set[str] = set()
        for j, r in enumerate(picked):
            order = list(r["results"])
            bars = [(n, q) for n in order for q in (("p50_us", "p99_us", "p99_9_us")
                                                    if latency else ("rate",))]
            for k, (name, q) in enumerate(bars):
                res = r["results"][name]
                value = res[q] if latency else res["per_consumer_msgs_per_s"]
                if not value:
                    continue
                label = name if name not in drawn else None
                drawn.add(name)
                ax.bar(j + (k - (len(bars) - 1) / 2) * width, value, width, label=label,
                       color=colours[name],
                       hatch={"p99_us": "//", "p99_9_us": ".."}.get(q, ""))
        ax.set_xticks(range(len(picked)), [f"{r['scenario']}\n{r['size']} B" for r in picked],
                      fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        ax.set_title(heading + (" (bars: p50, p99 //, p99.9 ..)" if latency else ""),
                     fontsize=9)
        ax.legend(fontsize=7, ncol=4, loc="upper right")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
