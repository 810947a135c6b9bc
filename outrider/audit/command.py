"""`outrider audit`: read the evidence, build the Audit, write audit.html and audit.json.

Exit codes (the contract's): 0 clean, 1 when a strict port accepted plaintext,
2 when the audit could not be made (a bad range, Prometheus unreachable, no
outrider series, evidence that is not what it should be), with what to do in
the message. Only the verdict exits 1: an exception no check foresaw is a 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from identity.configfile import parse_duration
from identity.files import write_atomic
from outrider.audit import build, model, report_html, report_json, sources

EXIT_USAGE = 2


class AuditError(Exception):
    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Written:
    audit: model.Audit
    html: Path
    json: Path


def parse_time(text: str, now: datetime, flag: str) -> datetime:
    """A duration back from now (24h, 90m) or an RFC 3339 time (2026-12-06T14:00:00Z)."""
    try:
        return now - parse_duration(text)
    except ValueError as exc:
        if "is longer than" in str(exc):
            raise AuditError(f"{flag} {exc}: give an RFC 3339 time instead") from None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise AuditError(
            f"{flag} {text!r} is neither a duration back from now (24h, 90m) nor an"
            " RFC 3339 time (2026-12-06T14:00:00Z)"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def run(
    *,
    now: datetime,
    out: Path,
    prometheus: str | None = None,
    metrics: Sequence[Path] = (),
    ca_audit_log: Path | None = None,
    since: str | None = None,
    until: str | None = None,
    namespaces: Sequence[str] = (),
) -> Written:
    if bool(prometheus) == bool(metrics):
        raise AuditError("give --prometheus URL, or --metrics FILE... (saved /metrics scrapes)")
    end = parse_time(until, now, "--until") if until else now
    try:
        if prometheus:
            start = parse_time(since or "24h", now, "--since")
            _check_range(start, end)
            series = sources.from_prometheus(prometheus, start, end, namespaces)
            source, from_zero = f"Prometheus {prometheus}", False
        else:
            series = sources.from_scrapes(metrics)
            start = parse_time(since, now, "--since") if since else _earliest(series, end)
            source, from_zero = f"{len(metrics)} saved scrapes", True
        log = sources.read_ca_log(ca_audit_log) if ca_audit_log else ()
        evidence = model.Evidence(
            start, end, tuple(namespaces), series, log, source, counters_from_zero=from_zero
        )
        audit = build.build(evidence)
    except (sources.SourceError, model.AuditInputError) as exc:
        raise AuditError(str(exc)) from None
    except AuditError:
        raise
    except Exception as exc:  # evidence no check foresaw: never exit 1, which is a verdict
        raise AuditError(
            f"the audit could not be made from this evidence ({type(exc).__name__}: {exc});"
            " please report it with the input that caused it"
        ) from exc
    try:
        out.mkdir(parents=True, exist_ok=True)
        html, data = out / "audit.html", out / "audit.json"
        write_atomic(html, report_html.render(audit).encode())
        write_atomic(data, report_json.render(audit).encode())
    except OSError as exc:
        raise AuditError(f"cannot write the report into {out}: {exc}") from None
    return Written(audit, html, data)


def _check_range(start: datetime, end: datetime) -> None:
    if start >= end:
        raise AuditError(
            f"the range is empty: --since {start.isoformat()} is not before --until"
            f" {end.isoformat()}"
        )


def _earliest(series: Sequence[model.Series], end: datetime) -> datetime:
    """A scrape's range starts when its earliest process did (its counters count from then)."""
    started = [
        s.samples[0][1]
        for s in series
        if s.name == "process_start_time_seconds" and 0 < s.samples[0][1] < end.timestamp()
    ]
    seen = [s.samples[0][0] for s in series if s.samples]
    first = min(started or seen or [end.timestamp() - 1])
    return min(datetime.fromtimestamp(first, UTC), end).replace(microsecond=0) - _SECOND


_SECOND = parse_duration("1s")


def summary(written: Written) -> str:
    """What the command prints: where the report is and the answer to (a)."""
    audit = written.audit
    plaintext = audit.plaintext
    if plaintext.strict_violations:
        verdict = "a strict port ACCEPTED PLAINTEXT"
    elif plaintext.accepted:
        verdict = "plaintext accepted on permissive ports only"
    elif plaintext.proved_zero:
        verdict = "no plaintext accepted (proved zero)"
    else:
        verdict = "no plaintext counted; strict/permissive ports unknown"
    return (
        f"{verdict}; {len(audit.edges)} edges, {len(audit.certificates)} identities,"
        f" {sum(d.count for d in audit.denies)} denies, CA issued {audit.ca.issued}"
        f" refused {audit.ca.refused}\n  {written.html}\n  {written.json}"
    )
