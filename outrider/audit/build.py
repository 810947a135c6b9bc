"""The audit's pure core: an `Evidence` (raw samples, CA audit log lines) in, an `Audit` out.

No I/O and no clock: the range, the samples and the log lines are arguments,
so a test builds an Audit from constructed series and checks each answer.

Counters are read from their raw samples, not from PromQL's `increase()`,
whose extrapolation turns one plaintext connection into 1.07: an auditor
needs whole numbers and a zero that is exactly zero. A series that appears
after its instance's first sample, or whose process started inside the range
(`process_start_time_seconds`), counted from zero, so its first value counts;
a value that drops is a restart, and the new value counts in full.

Agents are told apart by the Prometheus `instance` label; `outrider_agent_info`
on the same instance gives each its SPIFFE ID, which makes the edges of the
who-talked-to-whom graph from each side's `peer_id`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from outrider.audit.model import (
    AGENT_SERIES,
    CA_SERIES,
    Agent,
    Audit,
    AuditInputError,
    CaActivity,
    CaRefusal,
    Certificate,
    CertificateHistory,
    Deny,
    Edge,
    Evidence,
    Gap,
    Listener,
    Plaintext,
    PlaintextAccepted,
    Refused,
    Series,
    TlsMix,
    namespace_of,
)

# --- arithmetic ----------------------------------------------------------------------------


def increase(samples: Sequence[tuple[float, float]], from_zero: bool) -> float:
    """How much a counter grew over its samples; a drop is a restart (counted from zero)."""
    if not samples:
        return 0.0
    previous = samples[0][1]
    total = previous if from_zero else 0.0
    for _, value in samples[1:]:
        total += value - previous if value >= previous else value
        previous = value
    return total


def _time(unix: float) -> datetime:
    return datetime.fromtimestamp(unix, UTC)


def _rfc3339(text: str) -> datetime | None:
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


# --- the build -----------------------------------------------------------------------------


class _Counters:
    """The evidence's series, grouped, with each counter's increase over the range."""

    def __init__(self, evidence: Evidence) -> None:
        self.start = evidence.start.timestamp()
        self.by_name: dict[str, list[Series]] = defaultdict(list)
        first: dict[str, float] = {}
        started: dict[str, float] = {}
        wanted = set(evidence.namespaces)
        for series in evidence.series:
            if not series.samples:
                continue
            # The CA lives in its own namespace; a process's start anchors its counters.
            everywhere = series.name in CA_SERIES or series.name == "process_start_time_seconds"
            ours = not wanted or everywhere or series.label("namespace") in wanted
            if not ours:
                continue
            self.by_name[series.name].append(series)
            instance = series.label("instance")
            if series.name == "process_start_time_seconds":  # its earliest value in the range
                started[instance] = min(value for _, value in series.samples)
                continue
            first[instance] = min(first.get(instance, series.samples[0][0]), series.samples[0][0])
        self._first, self._started = first, started
        self._from_zero = evidence.counters_from_zero

    def of(self, name: str) -> list[Series]:
        return self.by_name.get(name, [])

    def increase(self, series: Series) -> int:
        instance = series.label("instance")
        born = series.samples[0][0] > self._first.get(instance, series.samples[0][0])
        restarted = self._started.get(instance, float("-inf")) >= self.start
        return round(increase(series.samples, born or restarted or self._from_zero))


def build(evidence: Evidence) -> Audit:
    counters = _Counters(evidence)
    if not any(counters.of(name) for name in AGENT_SERIES):
        where = "namespace " + ", ".join(evidence.namespaces) if evidence.namespaces else "any"
        raise AuditInputError(
            f"no outrider agent series in {evidence.source or 'the evidence'} for {where} between"
            f" {evidence.start.isoformat()} and {evidence.end.isoformat()}: check that"
            " Prometheus scrapes the agents' /metrics (port 15020) and the CA's, and the"
            " --namespace and --since you gave"
        )
    agents = _agents(counters)
    identity = {agent.instance: agent.spiffe_id for agent in agents}
    notes: list[str] = []
    plaintext = _plaintext(counters, agents)
    if not plaintext.listeners_known:
        notes.append(
            "no outrider_listener_info series: strict and permissive ports cannot be told"
            " apart, so zero plaintext cannot be proved"
        )
    unnamed = sorted(agent.instance for agent in agents if not agent.spiffe_id)
    if unnamed:
        notes.append(
            f"no outrider_agent_info for {', '.join(unnamed)}: what they counted is left out"
            " of the graph (their callers' counts still name them)"
        )
    denies = _denies(counters, identity, notes)
    logged = _ca_log(evidence)
    return Audit(
        start=evidence.start,
        end=evidence.end,
        namespaces=evidence.namespaces,
        source=evidence.source,
        agents=agents,
        plaintext=plaintext,
        tls=_tls(counters),
        edges=_edges(counters, identity, denies),
        certificates=_certificates(counters, logged.issued),
        denies=denies,
        ca=_ca(counters, logged),
        notes=tuple(notes),
    )


def _agents(counters: _Counters) -> tuple[Agent, ...]:
    ids: dict[str, str] = {}
    namespaces: dict[str, str] = {}
    listeners: dict[str, set[Listener]] = defaultdict(set)
    for series in counters.of("outrider_agent_info"):
        ids[series.label("instance")] = series.label("spiffe_id")
    for name in AGENT_SERIES:
        for series in counters.of(name):
            namespaces.setdefault(series.label("instance"), series.label("namespace"))
    for series in counters.of("outrider_listener_info"):
        labels = [series.label(n) for n in ("direction", "port", "protocol", "mtls_mode")]
        listeners[series.label("instance")].add(Listener(*labels))
    return tuple(
        Agent(
            instance=instance,
            namespace=namespaces[instance] or namespace_of(ids.get(instance, "")),
            spiffe_id=ids.get(instance, ""),
            listeners=tuple(sorted(listeners[instance], key=lambda x: (x.direction, x.port))),
        )
        for instance in sorted(namespaces)
    )


def _plaintext(counters: _Counters, agents: Sequence[Agent]) -> Plaintext:
    by_instance = {agent.instance: agent for agent in agents}
    accepted: dict[str, int] = defaultdict(int)
    passthrough = 0
    for series in counters.of("outrider_connections_total"):
        if series.label("mtls") != "false":
            continue
        if series.label("direction") == "inbound":
            accepted[series.label("instance")] += counters.increase(series)
        else:
            passthrough += counters.increase(series)
    rows = []
    for instance, count in sorted(accepted.items()):
        if count == 0:
            continue
        agent = by_instance[instance]
        inbound = [x for x in agent.listeners if x.direction == "inbound"]
        permissive = tuple(x.port for x in inbound if x.mtls_mode == "permissive")
        ports = tuple(x.port for x in inbound) if agent.strict_only else permissive
        row = PlaintextAccepted(
            instance, agent.namespace, agent.spiffe_id, count, agent.strict_only, ports
        )
        rows.append(row)
    refused: dict[tuple[str, str, str], int] = defaultdict(int)
    for series in counters.of("outrider_connections_refused_total"):
        key = (series.label("instance"), series.label("direction"), series.label("reason"))
        refused[key] += counters.increase(series)
    return Plaintext(
        accepted=tuple(rows),
        refused=tuple(
            Refused(instance, by_instance[instance].spiffe_id, direction, reason, count)
            for (instance, direction, reason), count in sorted(refused.items())
            if count
        ),
        outbound_passthrough=passthrough,
        listeners_known=bool(agents) and all(agent.listeners for agent in agents),
    )


def _sum_by(counters: _Counters, name: str, label: str, **match: str) -> dict[str, int]:
    totals: dict[str, int] = defaultdict(int)
    for series in counters.of(name):
        if all(series.label(k) == v for k, v in match.items()):
            totals[series.label(label)] += counters.increase(series)
    return {key: value for key, value in sorted(totals.items()) if value}


def _tls(counters: _Counters) -> TlsMix:
    name = "outrider_tls_handshakes_total"
    return TlsMix(
        versions=_sum_by(counters, name, "tls_version", result="ok"),
        ciphers=_sum_by(counters, name, "cipher", result="ok"),
        refused=_sum_by(counters, name, "reason", result="refused"),
    )


def _denies(counters: _Counters, identity: Mapping[str, str], notes: list[str]) -> tuple[Deny, ...]:
    found: dict[tuple[str, str, str | None, str], int] = defaultdict(int)
    by_caller = counters.of("outrider_authz_denials_total")
    for series in by_caller:
        destination = identity.get(series.label("instance"), "")
        key = (series.label("policy"), series.label("rule"), series.label("peer_id"), destination)
        found[key] += counters.increase(series)
    if not by_caller:
        for series in counters.of("outrider_authz_decisions_total"):
            if series.label("decision") == "deny":
                destination = identity.get(series.label("instance"), "")
                found[(series.label("policy"), series.label("rule"), None, destination)] += (
                    counters.increase(series)
                )
        if found:
            notes.append("no outrider_authz_denials_total: denies are listed without callers")
    return tuple(
        Deny(policy, rule, caller, destination, count)
        for (policy, rule, caller, destination), count in sorted(
            found.items(), key=lambda item: (item[0][0], item[0][1], item[0][2] or "", item[0][3])
        )
        if count
    )


def _edges(
    counters: _Counters, identity: Mapping[str, str], denies: Sequence[Deny]
) -> tuple[Edge, ...]:
    counts: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for series in counters.of("outrider_connections_total"):
        if series.label("direction") == "inbound":
            me, peer = identity.get(series.label("instance"), ""), series.label("peer_id")
            counts[(peer, me)][0] += counters.increase(series)
    # The source's side: the mTLS connections it made, by the server it verified
    # (peer_connections_total; its outbound connections_total{mtls="true"} counts the same).
    for series in counters.of("outrider_peer_connections_total"):
        if series.label("direction") == "outbound":
            me, peer = identity.get(series.label("instance"), ""), series.label("peer_id")
            counts[(me, peer)][1] += counters.increase(series)
    for series in counters.of("outrider_requests_total"):
        if series.label("direction") == "inbound":
            me = identity.get(series.label("instance"), "")
            counts[(series.label("peer_id"), me)][2] += counters.increase(series)
    for deny in denies:
        if deny.caller is not None:
            counts[(deny.caller, deny.destination)][3] += deny.count
    return tuple(
        Edge(source, destination, *numbers)
        for (source, destination), numbers in sorted(counts.items())
        if any(numbers) and destination
    )


@dataclass
class _Logged:
    issued: list[dict[str, object]] = field(default_factory=list)
    refused: list[dict[str, object]] = field(default_factory=list)
    lines: int = 0
    unreadable: int = 0


def _ca_log(evidence: Evidence) -> _Logged:
    """The CA audit log's svid_sign lines in the range (ca/audit.py writes them)."""
    logged = _Logged()
    wanted = set(evidence.namespaces)
    for line in evidence.ca_log:
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            when = _rfc3339(entry["time"]) if isinstance(entry, dict) else None
        except (ValueError, KeyError, TypeError):
            when = None
            entry = None
        if not isinstance(entry, dict) or entry.get("event") != "svid_sign" or when is None:
            logged.unreadable += 1
            continue
        if not evidence.start <= when <= evidence.end:
            continue
        spiffe_id = str(entry.get("spiffe_id") or "")
        if wanted and namespace_of(spiffe_id) not in wanted and spiffe_id:
            continue
        logged.lines += 1
        entry = {**entry, "time": when}
        if entry.get("result") == "issued":
            logged.issued.append(entry)
        else:
            logged.refused.append(entry)
    return logged


@dataclass
class _Seen:
    """A certificate as the evidence shows it, filled in from the metrics and the log."""

    not_before: datetime | None = None
    not_after: datetime | None = None
    issued_at: datetime | None = None
    first: float | None = None
    last: float | None = None

    def certificate(self, serial: str) -> Certificate:
        return Certificate(
            serial=serial,
            not_before=self.not_before,
            not_after=self.not_after,
            issued_at=self.issued_at,
            first_seen=None if self.first is None else _time(self.first),
            last_seen=None if self.last is None else _time(self.last),
        )


def _certificates(
    counters: _Counters, issued: Iterable[dict[str, object]]
) -> tuple[CertificateHistory, ...]:
    seen: dict[tuple[str, str], _Seen] = defaultdict(_Seen)
    expired_use: dict[str, list[float]] = defaultdict(list)
    for series in counters.of("outrider_svid_info"):
        cert = seen[(series.label("spiffe_id"), series.label("serial").lower())]
        cert.not_before = _rfc3339(series.label("not_before"))
        cert.not_after = _rfc3339(series.label("not_after"))
        first, last = series.samples[0][0], series.samples[-1][0]
        cert.first = first if cert.first is None else min(cert.first, first)
        cert.last = last if cert.last is None else max(cert.last, last)
        if cert.not_after is not None:
            expiry = cert.not_after.timestamp()
            late = [t for t, _ in series.samples if t > expiry]
            expired_use[series.label("spiffe_id")].extend(late)
    for entry in issued:
        key = (str(entry.get("spiffe_id") or ""), str(entry.get("serial") or "").lower())
        cert = seen[key]
        cert.issued_at = _datetime(entry["time"])
        if cert.not_after is None:
            cert.not_after = _rfc3339(str(entry.get("not_after") or ""))
    by_identity: dict[str, list[Certificate]] = defaultdict(list)
    for (spiffe_id, serial), cert in seen.items():
        by_identity[spiffe_id].append(cert.certificate(serial))
    latest = datetime.max.replace(tzinfo=UTC)
    histories = []
    for spiffe_id, certificates in sorted(by_identity.items()):
        ordered = sorted(certificates, key=lambda c: c.start or latest)
        gaps = _gaps(ordered) + _expired_in_use(sorted(expired_use[spiffe_id]))
        histories.append(CertificateHistory(spiffe_id, tuple(ordered), tuple(gaps)))
    return tuple(histories)


def _datetime(value: object) -> datetime | None:
    return value if isinstance(value, datetime) else None


def _gaps(ordered: Sequence[Certificate]) -> list[Gap]:
    """Times between two certificates of one identity when neither was valid."""
    gaps = []
    covered: datetime | None = None
    for cert in ordered:
        if covered is not None and cert.start is not None and cert.start > covered:
            gaps.append(Gap(covered, cert.start, "no valid certificate"))
        if cert.not_after is not None and (covered is None or cert.not_after > covered):
            covered = cert.not_after
    return gaps


def _expired_in_use(times: Sequence[float]) -> list[Gap]:
    if not times:
        return []
    return [Gap(_time(times[0]), _time(times[-1]), "served an expired certificate")]


def _ca(counters: _Counters, logged: _Logged) -> CaActivity:
    by_reason: dict[str, int] = defaultdict(int)
    for series in counters.of("outrider_ca_csr_total"):
        count = counters.increase(series)
        if count:
            by_reason[f"{series.label('result')}: {series.label('reason')}"] += count
    by_identity: dict[str, int] = defaultdict(int)
    for entry in logged.issued:
        by_identity[str(entry.get("spiffe_id") or "")] += 1
    metric_issued = sum(v for k, v in by_reason.items() if k.startswith("issued:"))
    metric_refused = sum(v for k, v in by_reason.items() if k.startswith("refused:"))
    return CaActivity(
        issued=metric_issued if by_reason else len(logged.issued),
        refused=metric_refused if by_reason else len(logged.refused),
        by_reason=dict(sorted(by_reason.items())),
        issued_by_identity=dict(sorted(by_identity.items())),
        refusals=tuple(
            CaRefusal(
                time=_datetime(entry["time"]),
                reason=str(entry.get("reason") or ""),
                caller=_text(entry.get("caller")),
                spiffe_id=_text(entry.get("spiffe_id")),
                pod=_text(entry.get("pod")),
            )
            for entry in logged.refused
        ),
        log_lines=logged.lines,
        unreadable_log_lines=logged.unreadable,
    )


def _text(value: object) -> str | None:
    return None if value is None else str(value)
