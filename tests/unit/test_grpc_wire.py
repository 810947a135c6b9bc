"""gRPC's wire rules as a proxy reads and writes them: content-type, deadlines, statuses."""

from __future__ import annotations

import pytest
from h2.errors import ErrorCodes

from agent.core.grpc import (
    Code,
    from_http_status,
    is_grpc,
    parse_timeout,
    percent_encode,
    reset_before_head,
    status_of,
    timeout_value,
    trailers_only,
)
from identity.appprotocol import from_app_protocol


@pytest.mark.parametrize(
    ("content_type", "grpc"),
    [
        ("application/grpc", True),
        ("application/grpc+proto", True),
        ("application/grpc;charset=utf-8", True),
        ("Application/GRPC", True),
        ("application/grpc-web", False),  # not gRPC over HTTP/2: a browser protocol
        ("application/json", False),
        ("application/grpcx", False),
    ],
)
def test_a_call_is_grpc_by_its_content_type(content_type: str, grpc: bool) -> None:
    assert is_grpc([(":method", "POST"), ("content-type", content_type)]) is grpc


def test_no_content_type_is_not_grpc() -> None:
    assert not is_grpc([(":method", "POST")])


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("1H", 3600.0), ("2M", 120.0), ("3S", 3.0), ("250m", 0.25), ("5u", 5e-6), ("7n", 7e-9)],
)
def test_grpc_timeout_units(value: str, seconds: float) -> None:
    assert parse_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "10", "S", "123456789S", "-1S", "1.5S", "10s", "1 S"])
def test_malformed_grpc_timeouts_are_refused(value: str) -> None:
    with pytest.raises(ValueError, match="grpc-timeout"):
        parse_timeout(value)


def test_a_deadline_passed_on_keeps_at_least_a_millisecond() -> None:
    assert timeout_value(0.25) == "250m"
    assert timeout_value(0.0) == "1m"
    assert parse_timeout(timeout_value(10**6)) == pytest.approx(10**6, rel=1e-3)


def test_status_is_read_from_headers_or_trailers() -> None:
    assert status_of([("grpc-status", "14"), ("grpc-message", "down")]) == Code.UNAVAILABLE
    assert status_of([("content-type", "application/grpc")]) is None
    assert status_of([("grpc-status", "x1")]) is None
    for odd in ("\u00b2", "1\u00b3", "\u0663", " 1", "1234"):  # digits to isdigit, not to int
        assert status_of([("grpc-status", odd)]) is None


def test_a_trailers_only_refusal_names_its_status_and_reason() -> None:
    headers = trailers_only(Code.PERMISSION_DENIED, "denied by policy shop/deny-admin: rule 0")
    assert headers[:3] == [
        (":status", "200"),
        ("content-type", "application/grpc"),
        ("grpc-status", "7"),
    ]
    assert dict(headers)["grpc-message"] == "denied by policy shop/deny-admin: rule 0"


def test_grpc_message_carries_no_control_characters() -> None:
    assert percent_encode("a\r\nb 100% é") == "a%0D%0Ab 100%25 %C3%A9"


def test_http_statuses_map_as_the_grpc_spec_says() -> None:
    assert from_http_status(403) is Code.PERMISSION_DENIED
    assert from_http_status(503) is Code.UNAVAILABLE
    assert from_http_status(404) is Code.UNIMPLEMENTED
    assert from_http_status(500) is Code.UNKNOWN


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (ErrorCodes.REFUSED_STREAM, Code.UNAVAILABLE),  # never processed: retried anywhere
        (ErrorCodes.CANCEL, Code.UNAVAILABLE),  # what a lost app connection reads as
        (ErrorCodes.INTERNAL_ERROR, Code.INTERNAL),  # the app failed it, maybe after acting
        (ErrorCodes.PROTOCOL_ERROR, Code.INTERNAL),
        (ErrorCodes.NO_ERROR, Code.INTERNAL),
        (ErrorCodes.ENHANCE_YOUR_CALM, Code.RESOURCE_EXHAUSTED),
        (ErrorCodes.INADEQUATE_SECURITY, Code.PERMISSION_DENIED),
        (0x1234, Code.INTERNAL),
    ],
)
def test_an_app_stream_reset_before_its_head_is_unavailable_only_if_it_may_be_retried(
    code: int, status: Code
) -> None:
    assert reset_before_head(code) is status


@pytest.mark.parametrize(
    ("app_protocol", "protocol"),
    [
        ("http", "http"),
        ("HTTP", "http"),
        ("kubernetes.io/h2c", "http2"),
        ("h2c", "http2"),
        ("grpc", "grpc"),
        ("kubernetes.io/ws", "tcp"),
        ("mysql", "tcp"),
        (None, "tcp"),
    ],
)
def test_a_service_ports_app_protocol_picks_how_it_is_served(
    app_protocol: str | None, protocol: str
) -> None:
    assert from_app_protocol(app_protocol) == protocol
