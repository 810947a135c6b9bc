"""audit.html: the Audit as one self-contained page an auditor can open or attach.

Charts are inline SVG drawn here: no script, no stylesheet or font from the
network, so the page shows the same offline, in a mail client or years later
in an archive. Every value from the evidence is escaped. Each chart has an
id (`chart-…`) the rendering test looks for.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from html import escape

from outrider.audit.model import Audit, CertificateHistory, Edge

OK, WARN, BAD, BAR, MUTED = "#2f855a", "#b7791f", "#c53030", "#2b6cb0", "#718096"
STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1000px;color:#1a202c}
h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:1.8em;border-bottom:1px solid #cbd5e0}
table{border-collapse:collapse;margin:.6em 0}td,th{padding:3px 10px;text-align:left;
border-bottom:1px solid #e2e8f0;font-size:13px}th{background:#edf2f7}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.verdict{padding:.8em 1em;border-radius:6px;color:#fff;font-weight:600}
.meta{color:#4a5568}svg{display:block;margin:.6em 0}svg text{font:12px system-ui,sans-serif}
code{font-size:12px}
"""


def _when(value: datetime | None) -> str:
    return "—" if value is None else value.strftime("%Y-%m-%d %H:%M:%S UTC")


def duration(seconds: float) -> str:
    """A lifetime in the unit that shows it: SVIDs live seconds (a short ttl) to days."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.2f} h"
    return f"{seconds / 86400:.1f} d"


def _who(spiffe_id: str) -> str:
    return spiffe_id if spiffe_id else "(unauthenticated)"


def _short(spiffe_id: str) -> str:
    """The path of a SPIFFE ID (ns/NS/sa/SA): what fits under a node."""
    if not spiffe_id:
        return "unauthenticated"
    return spiffe_id.split("/", 3)[-1] if spiffe_id.startswith("spiffe://") else spiffe_id


def _table(head: Sequence[str], rows: Sequence[Sequence[object]], empty: str) -> str:
    if not rows:
        return f"<p class=meta>{escape(empty)}</p>"
    cells = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join(
        "<tr>"
        + "".join(
            f"<td class=n>{value}</td>"
            if isinstance(value, int | float)
            else f"<td>{escape(str(value))}</td>"
            for value in row
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{cells}</tr>{body}</table>"


def bars(chart_id: str, values: Mapping[str, int], color: str = BAR) -> str:
    """Horizontal bars, one per key, labelled with the count and its share."""
    if not values:
        return f'<p class=meta id="{chart_id}-empty">none in this range</p>'
    total, top = sum(values.values()), max(values.values())
    label_w, bar_w, row = 300, 460, 26
    height = row * len(values) + 8
    parts = [f'<svg id="{chart_id}" width="{label_w + bar_w + 120}" height="{height}">']
    for i, (name, count) in enumerate(values.items()):
        y = 4 + i * row
        width = max(2.0, bar_w * count / top)
        share = 100 * count / total
        parts.append(
            f'<text x="{label_w - 8}" y="{y + 16}" text-anchor="end">{escape(name or "—")}</text>'
            f'<rect x="{label_w}" y="{y + 3}" width="{width:.1f}" height="{row - 8}"'
            f' fill="{color}"><title>{escape(name)}: {count}</title></rect>'
            f'<text x="{label_w + width + 6:.1f}" y="{y + 16}">{count} ({share:.0f}%)</text>'
        )
    return "".join(parts) + "</svg>"


def graph(edges: Sequence[Edge]) -> str:
    """Identities on an ellipse from its left end, an arrow per edge (red: unauthenticated or
    denied), its label the connection, request and deny counts."""
    if not edges:
        return '<p class=meta id="chart-edges-empty">no connections in this range</p>'
    nodes = sorted({edge.source for edge in edges} | {edge.destination for edge in edges})
    width, rx = 900, 357
    # Two identities sit on one line (the ellipse's ends): no ellipse's height of white.
    height, ry = (460, 170) if len(nodes) > 2 else (110, 0)
    cx, cy = width / 2, height / 2
    place = {
        node: (
            cx - rx * math.cos(2 * math.pi * i / len(nodes)),
            cy - ry * math.sin(2 * math.pi * i / len(nodes)),
        )
        for i, node in enumerate(nodes)
    }
    parts = [
        f'<svg id="chart-edges" width="{width}" height="{height}">'
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="8"'
        ' markerHeight="8" orient="auto-start-reverse"><path d="M0,0L10,5L0,10z"'
        f' fill="{MUTED}"/></marker></defs>'
    ]
    for edge in edges:
        (x1, y1), (x2, y2) = place[edge.source], place[edge.destination]
        length = math.hypot(x2 - x1, y2 - y1) or 1.0
        dx, dy = (x2 - x1) / length * 24, (y2 - y1) / length * 24
        color = BAD if edge.denied or not edge.source else OK
        label = f"{edge.connections} conn" + (f", {edge.requests} req" if edge.requests else "")
        label += f", {edge.denied} denied" if edge.denied else ""
        parts.append(
            f'<line class="edge" x1="{x1 + dx:.1f}" y1="{y1 + dy:.1f}" x2="{x2 - dx:.1f}"'
            f' y2="{y2 - dy:.1f}" stroke="{color}" stroke-width="2.5"'
            ' marker-end="url(#arrow)"/>'
            f'<text x="{(x1 + x2) / 2:.1f}" y="{(y1 + y2) / 2 - 6:.1f}" text-anchor="middle"'
            f' fill="{color}">{escape(label)}</text>'
        )
    for node, (x, y) in place.items():
        fill = BAD if not node else BAR
        parts.append(
            f'<circle class="node" cx="{x:.1f}" cy="{y:.1f}" r="22" fill="{fill}">'
            f"<title>{escape(_who(node))}</title></circle>"
            f'<text x="{x:.1f}" y="{y + 38:.1f}" text-anchor="middle">{escape(_short(node))}</text>'
        )
    return "".join(parts) + "</svg>"


def timeline(histories: Sequence[CertificateHistory], start: datetime, end: datetime) -> str:
    """A row per identity: a bar while each certificate was in use, a thin line under it for
    its validity (both clipped to the range), a red bar for each gap."""
    if not histories:
        return '<p class=meta id="chart-certificates-empty">no certificates in this range</p>'
    label_w, plot_w, row = 260, 620, 30
    height = row * len(histories) + 40
    span = (end - start).total_seconds()

    def x(when: datetime) -> float:
        seconds = min(max((when - start).total_seconds(), 0.0), span)
        return label_w + plot_w * seconds / span

    parts = [f'<svg id="chart-certificates" width="{label_w + plot_w + 20}" height="{height}">']
    for i, history in enumerate(histories):
        y = 6 + i * row
        parts.append(
            f'<text x="{label_w - 8}" y="{y + 17}" text-anchor="end">'
            f"{escape(_short(history.spiffe_id))}</text>"
        )
        for n, cert in enumerate(history.certificates):
            if cert.start is None or cert.not_after is None:
                continue
            shade = BAR if n % 2 == 0 else "#63b3ed"
            tip = (
                f"<title>serial {escape(cert.serial)}: valid {_when(cert.start)} → "
                f"{_when(cert.not_after)}; served {_when(cert.first_seen)} → "
                f"{_when(cert.last_seen)}</title>"
            )
            left, right = x(cert.start), x(cert.not_after)
            parts.append(
                f'<rect class="validity" x="{left:.1f}" y="{y + row - 10}"'
                f' width="{max(right - left, 2.0):.1f}" height="4" fill="{shade}"'
                f' opacity="0.45">{tip}</rect>'
            )
            served = _served(history, n)
            if served is not None:
                left, right = x(served[0]), x(served[1])
                parts.append(
                    f'<rect class="certificate" x="{left:.1f}" y="{y + 3}"'
                    f' width="{max(right - left, 2.0):.1f}" height="{row - 16}"'
                    f' fill="{shade}">{tip}</rect>'
                )
        for gap in history.gaps:
            left, right = x(gap.start), x(gap.end)
            parts.append(
                f'<rect class="gap" x="{left:.1f}" y="{y + 2}" width="{max(right - left, 3.0):.1f}"'
                f' height="{row - 6}" fill="{BAD}"><title>{escape(gap.why)}: '
                f"{_when(gap.start)} → {_when(gap.end)}</title></rect>"
            )
    axis = 6 + row * len(histories) + 16
    for fraction in (0.0, 0.5, 1.0):
        when = start + (end - start) * fraction
        anchor = ("start", "middle", "end")[int(fraction * 2)]
        parts.append(
            f'<text x="{label_w + plot_w * fraction:.1f}" y="{axis}" text-anchor="{anchor}"'
            f' fill="{MUTED}">{_when(when)}</text>'
        )
    return "".join(parts) + "</svg>"


def _served(history: CertificateHistory, n: int) -> tuple[datetime, datetime] | None:
    """When the n-th certificate was the one in use: from its first sample (or its start)
    until the next one was first seen (or started), or its own last sample; never past its
    NotAfter, which the gaps show."""
    cert = history.certificates[n]
    begin = cert.first_seen or cert.start
    if begin is None:
        return None
    later = [c.first_seen or c.start for c in history.certificates[n + 1 :]]
    taken_over = next((when for when in later if when is not None), None)
    end = taken_over or cert.last_seen or cert.not_after
    if end is None:
        return None
    return begin, max(begin, min(end, cert.not_after or end))


def _verdict(audit: Audit) -> str:
    plaintext = audit.plaintext
    if plaintext.strict_violations:
        color, text = BAD, "A strict port accepted plaintext: see (a)."
    elif plaintext.accepted:
        count = sum(row.connections for row in plaintext.accepted)
        color, text = WARN, f"{count} plaintext connections accepted, on permissive ports only."
    elif plaintext.proved_zero:
        color, text = OK, "No plaintext connection was accepted (proved zero from the counters)."
    else:
        color, text = WARN, "No plaintext counted, but strict and permissive ports are unknown."
    return f'<p class=verdict id="verdict" style="background:{color}">{escape(text)}</p>'


def _certificate_rows(audit: Audit) -> list[list[object]]:
    return [
        [
            history.spiffe_id,
            cert.serial,
            _when(cert.not_before),
            _when(cert.not_after),
            "—" if cert.lifetime_seconds is None else duration(cert.lifetime_seconds),
            ", ".join(cert.sources),
        ]
        for history in audit.certificates
        for cert in history.certificates
    ]


def render(audit: Audit) -> str:
    plaintext, ca = audit.plaintext, audit.ca
    sections = [
        f"<h1>Outrider mTLS audit</h1><p class=meta>{_when(audit.start)} → {_when(audit.end)}"
        f" · namespaces: {escape(', '.join(audit.namespaces) or 'all')}"
        f" · source: {escape(audit.source)}</p>",
        _verdict(audit),
        "".join(f"<p class=meta>Note: {escape(note)}</p>" for note in audit.notes),
        "<h2>(a) Plaintext accepted</h2>",
        _table(
            ["instance", "namespace", "identity", "connections", "port mode", "ports"],
            [
                [
                    r.instance,
                    r.namespace,
                    r.spiffe_id,
                    r.connections,
                    "strict (violation)" if r.strict else "permissive",
                    ", ".join(r.ports),
                ]
                for r in plaintext.accepted
            ],
            "None accepted.",
        ),
        "<p>Connections refused before relaying (a strict port's plaintext attempts among"
        " them):</p>",
        _table(
            ["instance", "identity", "direction", "reason", "connections"],
            [
                [r.instance, r.spiffe_id, r.direction, r.reason, r.connections]
                for r in plaintext.refused
            ],
            "None refused.",
        ),
        f"<p class=meta>Outbound connections sent outside the mesh: "
        f"{plaintext.outbound_passthrough}</p>",
        "<h2>(b) TLS versions and ciphers</h2>",
        bars("chart-tls-versions", audit.tls.versions),
        bars("chart-ciphers", audit.tls.ciphers),
        "<p>Handshakes refused, by reason:</p>",
        bars("chart-tls-refused", audit.tls.refused, BAD),
        "<h2>(c) Who talked to whom</h2>",
        graph(audit.edges),
        _table(
            ["source", "destination", "connections", "inbound", "outbound", "requests", "denied"],
            [
                [
                    _who(e.source),
                    e.destination,
                    e.connections,
                    e.inbound,
                    e.outbound,
                    e.requests,
                    e.denied,
                ]
                for e in audit.edges
            ],
            "No connections.",
        ),
        "<h2>(d) Certificates</h2>",
        timeline(audit.certificates, audit.start, audit.end),
        _table(
            ["identity", "rotations", "certificates", "gaps"],
            [
                [
                    h.spiffe_id,
                    h.rotations,
                    len(h.certificates),
                    "; ".join(f"{g.why} {_when(g.start)} → {_when(g.end)}" for g in h.gaps),
                ]
                for h in audit.certificates
            ],
            "No certificates.",
        ),
        _table(
            ["identity", "serial", "not before", "not after", "lifetime", "seen in"],
            _certificate_rows(audit),
            "",
        ),
        "<h2>(e) Denies by policy, rule and caller</h2>",
        bars(
            "chart-denies",
            {f"{d.policy} / {d.rule} ← {_short(d.caller or '')}": d.count for d in audit.denies},
            BAD,
        ),
        _table(
            ["policy", "rule", "caller", "destination", "denies"],
            [
                [
                    d.policy,
                    d.rule,
                    "(not reported)" if d.caller is None else _who(d.caller),
                    d.destination,
                    d.count,
                ]
                for d in audit.denies
            ],
            "No denies.",
        ),
        "<h2>CA issuances and refusals</h2>",
        f"<p>Issued: <b id=ca-issued>{ca.issued}</b> · refused: <b id=ca-refused>{ca.refused}</b>"
        f" · audit log lines read: {ca.log_lines} (unreadable: {ca.unreadable_log_lines})</p>",
        bars("chart-ca", dict(ca.by_reason)),
        _table(
            ["time", "reason", "caller", "identity asked for", "pod"],
            [
                [_when(r.time), r.reason, r.caller or "—", r.spiffe_id or "—", r.pod or "—"]
                for r in ca.refusals
            ],
            "No refusals in the CA audit log.",
        ),
    ]
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        "<title>Outrider mTLS audit</title>"
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\';'
        " style-src 'unsafe-inline'\">"
        f"<style>{STYLE}</style></head><body>" + "\n".join(sections) + "</body></html>\n"
    )
