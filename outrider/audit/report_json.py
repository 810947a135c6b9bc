"""audit.json: the Audit as data, one key per question, for a script or a ticket.

Times are RFC 3339 UTC; counts are whole numbers; an unauthenticated caller is
`""` as in the metrics. The `format` key changes when a field changes meaning.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from outrider.audit.model import Audit, CertificateHistory

FORMAT = "outrider-audit/1"


def _when(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


def _history(history: CertificateHistory) -> dict[str, Any]:
    return {
        "spiffe_id": history.spiffe_id,
        "rotations": history.rotations,
        "certificates": [
            {
                "serial": cert.serial,
                "not_before": _when(cert.not_before),
                "not_after": _when(cert.not_after),
                "lifetime_seconds": cert.lifetime_seconds,
                "issued_at": _when(cert.issued_at),
                "first_seen": _when(cert.first_seen),
                "last_seen": _when(cert.last_seen),
                "sources": list(cert.sources),
            }
            for cert in history.certificates
        ],
        "gaps": [
            {"start": _when(gap.start), "end": _when(gap.end), "why": gap.why}
            for gap in history.gaps
        ],
    }


def document(audit: Audit) -> dict[str, Any]:
    plaintext = audit.plaintext
    return {
        "format": FORMAT,
        "range": {"start": _when(audit.start), "end": _when(audit.end)},
        "namespaces": list(audit.namespaces),
        "source": audit.source,
        "exit_code": audit.exit_code,
        "agents": [
            {
                "instance": agent.instance,
                "namespace": agent.namespace,
                "spiffe_id": agent.spiffe_id,
                "listeners": [vars(listener) for listener in agent.listeners],
            }
            for agent in audit.agents
        ],
        "plaintext": {
            "proved_zero": plaintext.proved_zero,
            "listeners_known": plaintext.listeners_known,
            "strict_violations": len(plaintext.strict_violations),
            "accepted": [vars(row) | {"ports": list(row.ports)} for row in plaintext.accepted],
            "refused": [vars(row) for row in plaintext.refused],
            "outbound_passthrough": plaintext.outbound_passthrough,
        },
        "tls": {
            "versions": dict(audit.tls.versions),
            "ciphers": dict(audit.tls.ciphers),
            "refused": dict(audit.tls.refused),
        },
        "edges": [vars(edge) | {"connections": edge.connections} for edge in audit.edges],
        "certificates": [_history(history) for history in audit.certificates],
        "denies": [vars(deny) for deny in audit.denies],
        "ca": {
            "issued": audit.ca.issued,
            "refused": audit.ca.refused,
            "by_reason": dict(audit.ca.by_reason),
            "issued_by_identity": dict(audit.ca.issued_by_identity),
            "refusals": [
                vars(refusal) | {"time": _when(refusal.time)} for refusal in audit.ca.refusals
            ],
            "log_lines": audit.ca.log_lines,
            "unreadable_log_lines": audit.ca.unreadable_log_lines,
        },
        "notes": list(audit.notes),
    }


def render(audit: Audit) -> str:
    return json.dumps(document(audit), indent=2) + "\n"
