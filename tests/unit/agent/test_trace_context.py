"""W3C trace context: what a hop accepts from a caller, what it makes, what it passes on."""

from __future__ import annotations

import random

import pytest

from agent.core.tracecontext import (
    SAMPLED,
    SpanContext,
    child,
    parse,
    propagate,
    received,
    request_id,
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
GOOD = f"00-{TRACE}-{SPAN}-01"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (GOOD, SpanContext(TRACE, SPAN, SAMPLED)),
        (f"00-{TRACE}-{SPAN}-00", SpanContext(TRACE, SPAN, 0)),
        (f" {GOOD}\t", SpanContext(TRACE, SPAN, SAMPLED)),  # optional whitespace
        (f"00-{TRACE}-{SPAN}-03", SpanContext(TRACE, SPAN, SAMPLED)),  # unknown flags dropped
        (f"01-{TRACE}-{SPAN}-01-future-part", SpanContext(TRACE, SPAN, SAMPLED)),  # later version
        (f"01-{TRACE}-{SPAN}-01", SpanContext(TRACE, SPAN, SAMPLED)),
        (None, None),
        ("", None),
        (f"ff-{TRACE}-{SPAN}-01", None),  # version ff is invalid
        (f"00-{TRACE}-{SPAN}-01-extra", None),  # version 00 is exactly 55 characters
        (f"01-{TRACE}-{SPAN}-01x", None),  # a later version's extra part needs its dash
        (f"00-{TRACE.upper()}-{SPAN}-01", None),  # lowercase only
        (f"00-{'0' * 32}-{SPAN}-01", None),  # all-zero trace ID
        (f"00-{TRACE}-{'0' * 16}-01", None),  # all-zero parent ID
        (f"00-{TRACE[:-1]}g-{SPAN}-01", None),
        (f"00_{TRACE}_{SPAN}_01", None),
        ("00-abc-def-01", None),
    ],
)
def test_a_traceparent_is_read_as_the_spec_says(header: str | None, expected: object) -> None:
    assert parse(header) == expected


@pytest.mark.parametrize(
    ("state", "kept"),
    [
        ("vendor=value", "vendor=value"),
        ("a=1, b=2 ,,c@tenant=3", "a=1,b=2,c@tenant=3"),
        ("Upper=1", ""),  # keys are lowercase
        ("novalue", ""),
        ("a=" + "x" * 600, ""),  # over 512: dropped whole, never cut
        (",".join(f"k{i}=v" for i in range(33)), ""),  # over 32 members
        ("a=1\n", ""),  # a final newline is no member's
        ("a=1,b=2\n", ""),
        (None, ""),
    ],
)
def test_tracestate_is_passed_on_whole_or_not_at_all(state: str | None, kept: str) -> None:
    parsed = parse(GOOD, state)
    assert parsed is not None and parsed.state == kept


def test_a_child_keeps_the_trace_and_flags_and_gets_a_new_span() -> None:
    parent = SpanContext(TRACE, SPAN, 0, "a=1")
    made = child(parent, random.Random(1))
    assert (made.trace_id, made.flags, made.state) == (TRACE, 0, "a=1")
    assert made.span_id != SPAN and len(made.span_id) == 16
    assert made.traceparent() == f"00-{TRACE}-{made.span_id}-00"


def test_a_new_trace_is_sampled_with_the_configured_share() -> None:
    rng = random.Random(7)
    roots = [child(None, rng, 0.25) for _ in range(2000)]
    assert len({r.trace_id for r in roots}) == 2000
    assert 400 < sum(r.sampled for r in roots) < 600
    assert all(parse(r.traceparent()) == r for r in roots)
    assert not any(child(None, rng, 0.0).sampled for _ in range(100))


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("abc-123", True),
        ("7f0c1f9e-2b1e-4d6a-9a47-3f7a3c2e9b10", True),
        ("", False),
        ("has space", False),
        ("a" * 129, False),
        ("line\nbreak", False),
        ("trailing-newline\n", False),  # a header line of its own on an HTTP/1.1 hop
        (None, False),
    ],
)
def test_a_request_id_is_kept_only_when_it_is_a_plain_token(given: str | None, kept: bool) -> None:
    made = request_id(given, random.Random(3))
    assert (made == given) is kept
    if not kept:
        assert len(made) == 36 and made[14] == "4"  # a UUID 4


def test_received_headers_are_found_in_any_case_and_a_repeated_traceparent_is_none() -> None:
    fields = [
        (b"Host", b"x"),
        (b"TraceParent", GOOD.encode()),
        (b"tracestate", b"a=1"),
        (b"TRACESTATE", b"b=2"),
        (b"X-Request-Id", b" rid-1 "),
    ]
    assert received(fields) == (GOOD, "a=1,b=2", "rid-1")
    assert received([(b"traceparent", b"x"), (b"traceparent", b"y")])[0] is None
    assert received([]) == (None, None, None)


def test_propagate_names_this_hop_as_the_parent_of_what_it_sends_on() -> None:
    hop = propagate(GOOD, "a=1", None, random.Random(5))
    assert hop.parent == SpanContext(TRACE, SPAN, SAMPLED, "a=1")
    sent = dict(hop.headers())
    assert sent[b"traceparent"] == f"00-{TRACE}-{hop.span.span_id}-01".encode()
    assert sent[b"tracestate"] == b"a=1"
    assert sent[b"x-request-id"] == hop.request_id.encode()
    fresh = propagate(None, None, "rid", random.Random(5))
    assert fresh.parent is None and fresh.request_id == "rid"
    assert b"tracestate" not in dict(fresh.headers())
