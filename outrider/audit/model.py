"""The audit's data: the evidence in (series, CA audit log lines, a range), the answers out.

Plain frozen dataclasses; build.py turns an Evidence into an Audit, the
writers (report_json, report_html) read an Audit, sources.py makes Evidence.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

AGENT_SERIES = (
    "outrider_agent_info",
    "outrider_svid_info",
    "outrider_listener_info",
    "outrider_connections_total",
    "outrider_peer_connections_total",
    "outrider_connections_refused_total",
    "outrider_tls_handshakes_total",
    "outrider_authz_denials_total",
    "outrider_authz_decisions_total",
    "outrider_requests_total",
    "outrider_outbound_passthrough_total",
)
CA_SERIES = ("outrider_ca_csr_total",)
ANCHOR_SERIES = ("outrider_build_info", "process_start_time_seconds")
ALL_SERIES = AGENT_SERIES + CA_SERIES + ANCHOR_SERIES
_NAMESPACE_IN_ID = re.compile(r"^spiffe://[^/]+/ns/([^/]+)/")


class AuditInputError(ValueError):
    """The evidence cannot make an audit (no outrider series, a bad range): the user's to fix."""


@dataclass(frozen=True)
class Series:
    """One time series: its name, its labels (instance and namespace included) and its
    samples as (Unix time, value) in time order."""

    name: str
    labels: Mapping[str, str]
    samples: tuple[tuple[float, float], ...]

    def label(self, name: str) -> str:
        return self.labels.get(name, "")


@dataclass(frozen=True)
class Evidence:
    start: datetime
    end: datetime
    namespaces: tuple[str, ...]  # empty: every namespace
    series: tuple[Series, ...]
    ca_log: tuple[str, ...] = ()
    source: str = ""
    # Saved scrapes: one sample per series, each a total since its process started.
    counters_from_zero: bool = False

    def __post_init__(self) -> None:
        if self.start >= self.end:
            raise AuditInputError(
                f"the range is empty: --since {self.start.isoformat()} is not before"
                f" --until {self.end.isoformat()}"
            )


# --- the answers -------------------------------------------------------------------------


@dataclass(frozen=True)
class Listener:
    direction: str
    port: str
    protocol: str
    mtls_mode: str  # strict | permissive


@dataclass(frozen=True)
class Agent:
    instance: str
    namespace: str
    spiffe_id: str
    listeners: tuple[Listener, ...]

    @property
    def strict_only(self) -> bool:
        """Every inbound port it listened on was strict (and it said which it had)."""
        inbound = [x for x in self.listeners if x.direction == "inbound"]
        return bool(inbound) and all(x.mtls_mode == "strict" for x in inbound)


@dataclass(frozen=True)
class PlaintextAccepted:
    instance: str
    namespace: str
    spiffe_id: str
    connections: int
    strict: bool  # on an agent whose every inbound port is strict: a violation
    ports: tuple[str, ...]  # its permissive inbound ports (strict: its strict ones)


@dataclass(frozen=True)
class Refused:
    instance: str
    spiffe_id: str
    direction: str
    reason: str
    connections: int


@dataclass(frozen=True)
class Plaintext:
    """(a) Was any plaintext connection accepted, and where?"""

    accepted: tuple[PlaintextAccepted, ...]
    refused: tuple[Refused, ...]  # every connection closed before relaying, by reason
    outbound_passthrough: int  # the app's connections sent on outside the mesh
    listeners_known: bool  # outrider_listener_info was there to tell strict from permissive

    @property
    def proved_zero(self) -> bool:
        return not self.accepted and self.listeners_known

    @property
    def strict_violations(self) -> tuple[PlaintextAccepted, ...]:
        return tuple(row for row in self.accepted if row.strict)


@dataclass(frozen=True)
class TlsMix:
    """(b) Handshakes that succeeded, by TLS version and by cipher; refusals by reason."""

    versions: Mapping[str, int]
    ciphers: Mapping[str, int]
    refused: Mapping[str, int]


@dataclass(frozen=True)
class Edge:
    """(c) source → destination, from both sides: the destination's inbound count and the
    source's outbound count of the same mTLS connections; requests and denies on L7 ports."""

    source: str  # "" for an unauthenticated caller
    destination: str
    inbound: int
    outbound: int
    requests: int
    denied: int

    @property
    def connections(self) -> int:
        return max(self.inbound, self.outbound)


@dataclass(frozen=True)
class Certificate:
    serial: str
    not_before: datetime | None  # None: only the CA log saw it, which does not record it
    not_after: datetime | None
    issued_at: datetime | None  # the CA audit log's time
    first_seen: datetime | None  # first and last sample of outrider_svid_info
    last_seen: datetime | None

    @property
    def lifetime_seconds(self) -> float | None:
        if self.not_before is None or self.not_after is None:
            return None
        return (self.not_after - self.not_before).total_seconds()

    @property
    def start(self) -> datetime | None:
        return self.not_before or self.issued_at

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(
            name
            for name, there in (("metrics", self.first_seen), ("ca_log", self.issued_at))
            if there is not None
        )


@dataclass(frozen=True)
class Gap:
    start: datetime
    end: datetime
    why: str  # "no valid certificate" | "served an expired certificate"


@dataclass(frozen=True)
class CertificateHistory:
    """(d) One identity's certificates in the range, oldest first."""

    spiffe_id: str
    certificates: tuple[Certificate, ...]
    gaps: tuple[Gap, ...]

    @property
    def rotations(self) -> int:
        return max(len(self.certificates) - 1, 0)


@dataclass(frozen=True)
class Deny:
    """(e) Enforced denies by policy, rule and caller ("" unauthenticated; None when the
    agent did not report callers) at the destination."""

    policy: str
    rule: str
    caller: str | None
    destination: str
    count: int


@dataclass(frozen=True)
class CaRefusal:
    time: datetime | None
    reason: str
    caller: str | None
    spiffe_id: str | None
    pod: str | None


@dataclass(frozen=True)
class CaActivity:
    issued: int  # from outrider_ca_csr_total, else the log
    refused: int
    by_reason: Mapping[str, int]  # "issued: k8s-token", "refused: not-authorized", ...
    issued_by_identity: Mapping[str, int]  # from the audit log
    refusals: tuple[CaRefusal, ...]  # from the audit log
    log_lines: int
    unreadable_log_lines: int


@dataclass(frozen=True)
class Audit:
    start: datetime
    end: datetime
    namespaces: tuple[str, ...]
    source: str
    agents: tuple[Agent, ...]
    plaintext: Plaintext
    tls: TlsMix
    edges: tuple[Edge, ...]
    certificates: tuple[CertificateHistory, ...]
    denies: tuple[Deny, ...]
    ca: CaActivity
    notes: tuple[str, ...] = field(default=())

    @property
    def exit_code(self) -> int:
        """1 when a strict port accepted plaintext, else 0 (the contract's exit codes)."""
        return 1 if self.plaintext.strict_violations else 0


def namespace_of(spiffe_id: str) -> str:
    """The Kubernetes namespace in a spiffe://td/ns/NS/sa/SA ID, or ""."""
    found = _NAMESPACE_IN_ID.match(spiffe_id)
    return found[1] if found else ""
