"""The benchmark's record as a terminal table, a Markdown table, a chart and goals."""

from __future__ import annotations

import json
import statistics
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.dataplane import NOT_MEASURED

Record = dict[str, Any]
RESULTS = Path(__file__).resolve().parent / "results"


def save(kind: str, result: Record) -> Path:
    """`result` in bench/results/<kind>-<UTC time>.json, and as the `RESULT {json}` line
    bench/run.py reads from a benchmark's output."""
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    saved = RESULTS / f"{kind}-{stamp}.json"
    saved.write_text(json.dumps(result, indent=2) + "\n")
    print("RESULT " + json.dumps(result))
    return saved


def _rate(row: dict[str, Any]) -> str:
    return f"{row['per_s']:.0f} ({row['per_s_min']:.0f}-{row['per_s_max']:.0f})"


def _ratio(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:.2f}" if key in row else "-"


def dataplane_lines(record: Record) -> list[str]:
    """One Markdown table per scenario: medians (min-max), p50/p99, ratios of Envoy."""
    lines = []
    for scenario in record["summary"]:
        added = scenario["name"] == "fixed_rate"
        lines += ["", f"**{scenario['title']}**", ""]
        head = (
            f"| pair | {scenario['unit']} median (min-max) | p50 ms | p99 ms | xEnvoy | p99 xEnvoy"
        )
        head += " | added p50/p99 ms" if added else ""
        columns = head.count("|") + 1
        lines += [head + " | errors |", "|---" * columns + "|"]
        for row in scenario["rows"]:
            if row.get("status") == NOT_MEASURED:
                lines.append(f"| {row['pair']} | {NOT_MEASURED} |" + " |" * (columns - 2))
                continue
            line = (
                f"| {row['pair']} | {_rate(row)} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f}"
                f" | {_ratio(row, 'per_s_vs_envoy')} | {_ratio(row, 'p99_vs_envoy')}"
            )
            if added:
                line += f" | {row['added_p50_ms']:+.2f} / {row['added_p99_ms']:+.2f}"
            rotated = scenario["name"] == "rotation" and row.get("rotations") is not None
            extra = f" ({row['rotations']} rotations)" if rotated else ""
            lines.append(f"{line} | {row['errors']}{extra} |")
    return lines


def cost_lines(record: Record) -> list[str]:
    """Per proxy: RSS idle and peak, CPU per 1000 requests in the keep-alive scenarios."""
    cpu: dict[str, list[float]] = {}
    for scenario in record["summary"]:
        if scenario["name"] not in ("keepalive", "l7_keepalive"):
            continue
        for row in scenario["rows"]:
            for role, ms in row.get("cpu_ms_per_1k", {}).items():
                cpu.setdefault(f"{row['pair']} {role}", []).append(ms)
    lines = [
        "",
        "**Cost per proxy process** (CPU in the keep-alive runs, user + kernel)",
        "",
        "| proxy | RSS idle MiB | RSS peak MiB | CPU ms / 1000 req |",
        "|---|---|---|---|",
    ]
    for pair, roles in record["dataplane"]["rss_idle_mib"].items():
        for role, idle in roles.items():
            name = f"{pair} {role}"
            peak = record["dataplane"]["rss_peak_mib"][pair][role]
            ms = f"{statistics.median(cpu[name]):.1f}" if name in cpu else "-"
            lines.append(f"| {name} | {idle:.1f} | {peak:.1f} | {ms} |")
    return lines


def ca_lines(record: Record) -> list[str]:
    ca = record.get("ca", {})
    lines = [
        "",
        "**CA issuance and admission**",
        "",
        "| what | median (min-max) | p50 ms | p99 ms |",
    ]
    lines.append("|---|---|---|---|")
    for label, values, p50, p99 in ca.get("rows", []):
        spread = f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"
        lines.append(f"| {label} | {spread} | {p50} | {p99} |")
    return lines


def control_table(rows: list[dict[str, Any]]) -> list[str]:
    """One row per fleet size: propagation p50/p99 and what the control plane cost."""
    lines = [
        "| subscribed agents | changes | p50 ms | p99 ms | RSS MiB (peak)"
        " | CPU s (changes / whole run) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['agents']} | {row['changes']} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f}"
            f" | {row['rss_mib']:.1f} ({row['peak_rss_mib']:.1f})"
            f" | {row['cpu_s_changes']:.2f} / {row['cpu_s_total']:.2f} |"
        )
    return lines


def rival_line(rival: dict[str, Any]) -> str:
    return f"Rival: {rival['text']} ({', '.join(rival['sources'])})"


def control_lines(record: Record) -> list[str]:
    control = record.get("control")
    if not control:
        return []
    return [
        "",
        "**Control plane: an AuthorizationPolicy change until every subscribed agent ACKed it**"
        " (`outrider control serve`, fake API server, simulated agents; bench/control_plane.py)",
        "",
        *control_table(control["rows"]),
        "",
        rival_line(control["rival"]),
    ]


def capture_lines(record: Record) -> list[str]:
    capture = record.get("capture")
    if not capture:
        return []
    from bench.capture import table

    return [
        "",
        "**Transparent capture: the app calls the Service's ClusterIP, or its agent's"
        " 127.0.0.1:15001** (one pod pair, requests alternating; bench/capture.py)",
        "",
        *table(capture),
    ]


def goals(record: Record) -> list[tuple[str, str, bool | None]]:
    """(goal, measured, met); met is None when the feature has not landed."""
    rows = {s["name"]: {r["pair"]: r for r in s["rows"]} for s in record["summary"]}

    def get(scenario: str, pair: str, key: str) -> float | None:
        value = rows.get(scenario, {}).get(pair, {}).get(key)
        return float(value) if value is not None else None

    def ratio(scenario: str, mine: str, theirs: str) -> float | None:
        a, b = get(scenario, mine, "per_s"), get(scenario, theirs, "per_s")
        return a / b if a is not None and b else None

    def check(goal: str, value: float | None, limit: float, fmt: str, below: bool = False):
        if value is None:
            return (goal, NOT_MEASURED, None)
        return (goal, fmt.format(value), value <= limit if below else value >= limit)

    def rss(key: str) -> float | None:  # MB, the largest of any Outrider process
        mibs = [
            mib
            for pair, processes in record["dataplane"][key].items()
            if pair.startswith("outrider")
            for mib in processes.values()
        ]
        return max(mibs) * 1.048576 if mibs else None

    rotation = rows.get("rotation", {}).get("outrider rotating", {})
    fleets = {row["agents"]: row for row in record.get("control", {}).get("rows", [])}
    largest = fleets.get(2000, {}).get("p99_ms")
    return [
        check(
            "L4 keep-alive req/s ≥ 1.0x Envoy",
            ratio("keepalive", "outrider l4", "envoy l4"),
            1.0,
            "{:.2f}x",
        ),
        check(
            "L4 p99 ≤ Envoy's",
            get("keepalive", "outrider l4", "p99_vs_envoy"),
            1.0,
            "{:.2f}x",
            below=True,
        ),
        check(
            "L7 keep-alive req/s ≥ 1.0x Envoy",
            ratio("l7_keepalive", "outrider l7", "envoy l7"),
            1.0,
            "{:.2f}x",
        ),
        check(
            "L7 req/s ≥ 0.5x HAProxy",
            ratio("l7_keepalive", "outrider l7", "haproxy l7"),
            0.5,
            "{:.2f}x",
        ),
        check(
            "full handshakes/s ≥ 0.5x Envoy",
            ratio("new_conn", "outrider l4", "envoy l4"),
            0.5,
            "{:.2f}x",
        ),
        check(
            "resumed handshakes/s ≥ 1.0x Envoy's resumed",
            ratio("new_conn_resumed", "outrider l4 resumed", "envoy l4 resumed"),
            1.0,
            "{:.2f}x",
        ),
        check(
            "`workers: 2` ≥ 1.7x one worker, each held to the same CPU per worker",
            ratio("workers_capped", "outrider l4 2 workers capped", "outrider l4 capped"),
            1.7,
            "{:.2f}x",
        ),
        check("agent RSS ≤ 45 MB idle", rss("rss_idle_mib"), 45, "{:.1f} MB max", below=True),
        check("agent RSS ≤ 60 MB peak", rss("rss_peak_mib"), 60, "{:.1f} MB max", below=True),
        (
            "zero errors across rotations under load",
            f"{rotation.get('errors')} errors, {rotation.get('rotations')} rotations"
            if rotation.get("rotations") is not None
            else NOT_MEASURED,
            rotation.get("errors") == 0 and (rotation.get("rotations") or 0) > 0
            if rotation.get("rotations") is not None
            else None,
        ),
        check(
            "control plane: API change to every agent's ACK, p99 < 1 s at 2,000 agents",
            largest,
            1000,
            "{:.0f} ms",
            below=True,
        ),
    ]


def goal_lines(record: Record) -> list[str]:
    lines = ["", "**Goals**", "", "| goal | measured | met |", "|---|---|---|"]
    for goal, measured, met in goals(record):
        mark = {True: "yes", False: "**no**", None: "-"}[met]
        lines.append(f"| {goal} | {measured} | {mark} |")
    return lines


def markdown(record: Record) -> str:
    machine = record["machine"]
    at = f" at commit {record['commit']}" if record.get("commit") else ""
    build = f", the agent's hot path {record['agent']}" if record.get("agent") else ""
    head = [
        f"Measured {record['date']}{at}{build} on {machine}; `{record['command']}`"
        f" ({record['rounds']} round(s) of {record['seconds']:.0f} s per scenario and pair,"
        " pairs alternating, load generator pinned to CPU 0; medians with min-max).",
    ]
    body = dataplane_lines(record) + cost_lines(record) + ca_lines(record)
    body += control_lines(record) + capture_lines(record) + goal_lines(record)
    return "\n".join(head + body) + "\n"


def chart(record: Record, out: Path) -> None:
    """Throughput and p99 per pair per scenario, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = [s for s in record["summary"] if s["name"] != "rotation"]
    proxies = ["direct", "outrider", "envoy", "haproxy", "nginx"]
    colours = dict(
        zip(proxies, ("#999999", "#d62728", "#1f77b4", "#2ca02c", "#ff7f0e"), strict=True)
    )
    figure, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / len(proxies)
    for panel, (key, label) in zip(
        axes,
        (("per_s", "requests (or connections) / s"), ("p99_ms", "p99 latency, ms")),
        strict=True,
    ):
        for index, proxy in enumerate(proxies):
            values = []
            for scenario in scenarios:
                row = next((r for r in scenario["rows"] if r["pair"].split()[0] == proxy), {})
                values.append(row.get(key, 0.0))
            positions = [i + index * width for i in range(len(scenarios))]
            panel.bar(positions, values, width, label=proxy, color=colours[proxy])
        panel.set_xticks([i + 0.4 - width / 2 for i in range(len(scenarios))])
        panel.set_xticklabels([s["name"].replace("_", "\n") for s in scenarios], fontsize=8)
        panel.set_ylabel(label)
        panel.set_yscale("log")  # direct is 20-200x the proxies: a linear axis hides them
    axes[0].legend(fontsize=8)
    figure.suptitle(
        f"Outrider vs Envoy, HAProxy, nginx — {record['date']}, {record['machine']}", fontsize=10
    )
    figure.tight_layout()
    figure.savefig(out, dpi=90)
    plt.close(figure)


START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def into_readme(readme: str, table: str) -> str:
    """The README with `table` between its bench markers (unchanged if it has none)."""
    if START not in readme or END not in readme:
        return readme
    before, rest = readme.split(START, 1)
    return f"{before}{START}\n{table}{END}{rest.split(END, 1)[1]}"
