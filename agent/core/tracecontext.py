"""W3C Trace Context (traceparent, tracestate) and x-request-id: parsed, checked, made.

The agent takes part in a trace as one span per request and direction: the
inbound span is the child of the caller's `traceparent` (a new trace when
there is none or it is malformed), and the head sent on names that span as
the parent, so the app's own spans hang under it. An outbound request is the
same with the app as the caller. The sampled flag follows the parent's; only
a new trace draws it, with the configured probability (a parent-based
sampler, as OpenTelemetry's default).

Rules from https://www.w3.org/TR/trace-context/: a version-00 header is
exactly 55 characters of lowercase hex and dashes; version ff is invalid; a
later version is read by its first four fields; an all-zero trace or parent
ID is invalid. A tracestate longer than the 512 characters a vendor must
propagate, or with a malformed member, is dropped rather than cut.
Randomness is an argument (`rng`), so tests are deterministic.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

#: The headers the agent sets on a request it sends on (lowercase, as bytes compare).
TRACEPARENT, TRACESTATE, REQUEST_ID = "traceparent", "tracestate", "x-request-id"
HEADERS = frozenset({TRACEPARENT.encode(), TRACESTATE.encode(), REQUEST_ID.encode()})

_LENGTHS = frozenset(map(len, HEADERS))
SAMPLED = 0x01
#: A UUID's variant digit (10xx) for each random hex digit, keeping its low two bits.
_VARIANT = {d: "89ab"[int(d, 16) & 3] for d in "0123456789abcdef"}
_HEX = frozenset("0123456789abcdef")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16
_TRACESTATE_MAX = 512
_VERSION_00 = re.compile(r"[ \t]*00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})[ \t]*\Z")
_MEMBER = re.compile(
    r"^(?:[a-z][a-z0-9_\-*/]{0,255}|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13})"
    r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]\Z"
)
#: An incoming x-request-id is kept when it is this plain: anything else is replaced, so a
#: caller cannot put a log line's worth of text (or a secret) into every hop's logs.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}\Z")  # \Z: `$` would take a final "\n"


@dataclass(frozen=True)
class TracingConfig:
    """`tracing:` in agent.yaml: spans are exported only when `otlp_endpoint` is set."""

    otlp_endpoint: str = ""  # host:port of an OTLP/HTTP receiver (or a full http(s) URL)
    sample: float = 1.0  # the share of new traces sampled (a caller's flag is followed)
    service_name: str = ""  # default: the agent's SPIFFE ID


class SpanContext(NamedTuple):
    """One span's place in a trace: ids as lowercase hex, as the header writes them.
    (Immutable; a tuple because one is made per request and hop: a frozen dataclass
    costs a setattr call per field.)"""

    trace_id: str  # 32 hex digits, not all zero
    span_id: str  # 16 hex digits, not all zero
    flags: int = SAMPLED
    state: str = ""  # tracestate, passed on as received ("" none)

    @property
    def sampled(self) -> bool:
        return bool(self.flags & SAMPLED)

    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags:02x}"


def _hex(text: str, size: int) -> bool:
    return len(text) == size and _HEX.issuperset(text)


def parse(traceparent: str | None, tracestate: str | None = None) -> SpanContext | None:
    """The caller's span from its headers; None when absent or malformed (a new trace)."""
    if traceparent is None:
        return None
    usual = _VERSION_00.match(traceparent)  # the usual header, in one call
    if usual is not None:
        trace_id, span_id, flags = usual.groups()
        if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
            return None
        return SpanContext(trace_id, span_id, int(flags, 16) & SAMPLED, _state(tracestate))
    value = traceparent.strip(" \t")
    version = value[:2]
    if not _hex(version, 2) or version == "ff":
        return None
    if version == "00" and len(value) != 55:
        return None
    if len(value) < 55 or (len(value) > 55 and value[55] != "-"):
        return None
    if value[2] != "-" or value[35] != "-" or value[52] != "-":
        return None
    trace_id, span_id, flags = value[3:35], value[36:52], value[53:55]
    if not (_hex(trace_id, 32) and _hex(span_id, 16) and _hex(flags, 2)):
        return None
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return SpanContext(trace_id, span_id, int(flags, 16) & SAMPLED, _state(tracestate))


def _state(tracestate: str | None) -> str:
    """tracestate as passed on: "" when absent, too long or malformed (never cut)."""
    if not tracestate or len(tracestate) > _TRACESTATE_MAX:
        return ""
    members = [m.strip(" \t") for m in tracestate.split(",")]
    members = [m for m in members if m]
    if len(members) > 32 or not all(_MEMBER.match(m) for m in members):
        return ""
    return ",".join(members)


def child(parent: SpanContext | None, rng: random.Random, sample: float = 1.0) -> SpanContext:
    """A new span under `parent`, or the root of a new trace (sampled with `sample`)."""
    span_id = _span_id(rng)
    if parent is not None:
        return SpanContext(parent.trace_id, span_id, parent.flags, parent.state)
    trace_id = _ZERO_TRACE
    while trace_id == _ZERO_TRACE:
        trace_id = f"{rng.getrandbits(128):032x}"
    flags = SAMPLED if sample >= 1.0 or rng.random() < sample else 0
    return SpanContext(trace_id, span_id, flags)


def _span_id(rng: random.Random) -> str:
    span_id = _ZERO_SPAN
    while span_id == _ZERO_SPAN:
        span_id = f"{rng.getrandbits(64):016x}"
    return span_id


def request_id(received: str | None, rng: random.Random) -> str:
    """The caller's x-request-id when it is a plain token, else a new UUID-4-shaped one."""
    if received is not None and _REQUEST_ID.match(received):
        return received
    # A UUID 4 (RFC 9562) written out directly: uuid.UUID's checks cost more than the rest.
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


class Propagated(NamedTuple):
    """What a hop decided for one request: its own span, its parent, its request ID."""

    span: SpanContext
    parent: SpanContext | None
    request_id: str

    def headers(self) -> list[tuple[bytes, bytes]]:
        """The trace headers sent on, replacing the received ones."""
        out = [(b"traceparent", self.span.traceparent().encode())]
        if self.span.state:
            out.append((b"tracestate", self.span.state.encode("latin-1")))
        out.append((b"x-request-id", self.request_id.encode()))
        return out


def received(
    fields: Sequence[tuple[bytes, bytes]],
) -> tuple[str | None, str | None, str | None]:
    """traceparent, tracestate (repeated ones joined) and x-request-id from raw header
    fields; None for each absent (a repeated traceparent is not one: None)."""
    parents, states, ids = [], [], []
    for name, value in fields:
        if len(name) not in _LENGTHS:  # most fields are ruled out at once
            continue
        lowered = name.lower()
        if lowered == b"traceparent":
            parents.append(value.decode("latin-1"))
        elif lowered == b"tracestate":
            states.append(value.decode("latin-1"))
        elif lowered == b"x-request-id":
            ids.append(value.decode("latin-1"))
    return (
        parents[0] if len(parents) == 1 else None,
        ",".join(states) if states else None,
        ids[0].strip(" \t") if len(ids) == 1 else None,
    )


def propagate(
    traceparent: str | None,
    tracestate: str | None,
    received_id: str | None,
    rng: random.Random,
    sample: float = 1.0,
) -> Propagated:
    """This hop's span for a request that came with these headers (each None when absent)."""
    parent = parse(traceparent, tracestate)
    return Propagated(child(parent, rng, sample), parent, request_id(received_id, rng))
