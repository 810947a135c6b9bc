"""What an h2 request head gets before it may reach the app: the HTTP/1.1 decisions (path,
header names, Host), gRPC's method-name rule, and the identity header the app sees."""

from __future__ import annotations

import pytest

from agent.adapters.inbound_h2 import Forward, InboundH2, Refusal, onward
from agent.adapters.outbound_h2 import _upstream_head
from agent.core import grpc
from agent.core.endpoint import Endpoint
from agent.core.grpc import Code, malformed_method
from agent.core.h2limits import Limit
from agent.core.http1 import Refused, RequestParser
from agent.core.policy import Decision

Headers = list[tuple[bytes, bytes]]
IDENTITY = b"By=spiffe://example.org/ns/demo/sa/backend;URI=spiffe://example.org/ns/demo/sa/fe"


class Seen:
    def __init__(self) -> None:
        self.asked: list[tuple[str, str, str | None, dict[str, tuple[str, ...]]]] = []
        self.hits: list[Limit] = []


def inbound(seen: Seen, allowed: bool = True, underscores: str = "reject") -> InboundH2:
    def authorize(
        method: str, path: str, host: str | None, headers: dict[str, tuple[str, ...]]
    ) -> Decision:
        seen.asked.append((method, path, host, headers))
        return Decision(allowed, "guard" if not allowed else "api", "rule", "because")

    return InboundH2(
        Endpoint("127.0.0.1", 1),
        authorize,
        IDENTITY,
        lambda status, code: None,
        seen.hits.append,
        underscores=underscores,  # type: ignore[arg-type]
        connect_timeout=1,
        idle_timeout=1,
        unreachable=lambda exc: None,
    )


def head(path: str = "/api/items", method: str = "GET", *extra: tuple[bytes, bytes]) -> Headers:
    return [
        (b":method", method.encode()),
        (b":scheme", b"https"),
        (b":authority", b"backend.shop:8080"),
        (b":path", path.encode()),
        *extra,
    ]


GRPC = (b"content-type", b"application/grpc")


def test_an_allowed_request_goes_on_normalized_with_the_peers_identity_only() -> None:
    seen = Seen()
    forged = (b"x-forwarded-client-cert", b"By=me;URI=spiffe://evil")
    folded = (b"x_forwarded_client_cert", b"evil")  # dropped whatever the underscore rule
    forward = inbound(seen, underscores="drop").screen(
        head("/api/./x//y?q=1", "GET", forged, folded, (b"x-role", b"reader")), False
    )
    assert isinstance(forward, Forward)
    assert forward.headers == [
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":authority", b"backend.shop:8080"),
        (b":path", b"/api/x/y?q=1"),
        (b"x-role", b"reader"),
        (b"x-forwarded-client-cert", IDENTITY),
    ]
    method, path, host, headers = seen.asked[0]
    assert (method, path, host) == ("GET", "/api/x/y", "backend.shop")
    assert headers == {"x-role": ("reader",), "host": ("backend.shop:8080",)}


@pytest.mark.parametrize(
    ("headers", "status", "error"),
    [
        (head("/api/%2fadmin"), 400, "bad_path"),
        (head("/api/x", "GET", (b"x_role", b"admin")), 400, "bad_request"),
        (head("/api/x", "GET", (b"host", b"other")), 400, "bad_request"),  # :authority differs
        (head("/api/x", "GET", (b"host", b"a"), (b"host", b"a")), 400, "bad_request"),
        (head("/api/x", "CONNECT"), 501, "upgrade_not_supported"),
        # The method goes into an HTTP/1.1 request line: one that is not a token would put
        # a second target there ("GET /admin /api/x HTTP/1.1") that an app may route.
        (head("/api/x", "GET /admin"), 400, "bad_request"),
        (head("/api/x", "GET\t/admin"), 400, "bad_request"),
        (head("/api/x", "GET\x01"), 400, "bad_request"),
        (head("/api/x", ""), 400, "bad_request"),
        (head("/api/x", "GET", *[(b"x-n", b"v")] * 101), 431, "headers_too_large"),
        # A request line's third word, or bytes a strict app refuses and a lenient one reads.
        (head("/api/x?a /api/admin"), 400, "bad_path"),
        (head("/api/x?a\xff"), 400, "bad_path"),
        (head("/api/x", "GET", (b"x-role", b"admin\x01")), 400, "bad_request"),
        (
            head("/api/x", "GET", (b"content-length", b"5"), (b"content-length", b"05")),
            400,
            "bad_request",
        ),
    ],
)
def test_a_bad_head_gets_the_answer_http1_gives_it_before_any_policy(
    headers: Headers, status: int, error: str
) -> None:
    seen = Seen()
    refusal = inbound(seen).screen(headers, False)
    assert isinstance(refusal, Refusal)
    assert (refusal.status, refusal.body["error"]) == (status, error)
    assert seen.asked == []
    assert seen.hits == (["header_list"] if status == 431 else [])


@pytest.mark.parametrize("where", ["query", "value"])
def test_an_h2_head_is_refused_for_any_byte_the_http1_parser_refuses(where: str) -> None:
    """Byte for byte, the same request as h2 and as HTTP/1.1: refused by both or by neither,
    so no h2 request reaches the app in a form the port would refuse over HTTP/1.1."""
    differ = []
    for byte in range(256):
        c = bytes([byte])
        query, value = (b"a" + c + b"b", b"v") if where == "query" else (b"a", b"x" + c + b"y")
        as_h2 = head("/api/x?" + query.decode("latin-1"), "GET", (b"x-v", value))
        http1 = b"GET /api/x?%s HTTP/1.1\r\nhost: backend.shop:8080\r\nx-v: %s\r\n\r\n"
        events = RequestParser().feed(http1 % (query, value))
        refused_as_http1 = any(isinstance(event, Refused) for event in events)
        refused_as_h2 = isinstance(inbound(Seen()).screen(as_h2, False), Refusal)
        if refused_as_h2 != refused_as_http1:
            differ.append(byte)
    assert differ == []


def test_a_denied_request_names_the_policy_and_rule() -> None:
    refusal = inbound(Seen(), allowed=False).screen(head("/api/admin"), False)
    assert isinstance(refusal, Refusal)
    assert refusal.status == 403
    assert refusal.body == {"error": "denied", "policy": "guard", "rule": "rule"}
    assert refusal.code == Code.PERMISSION_DENIED


@pytest.mark.parametrize(
    "path",
    [
        "demo.Greeter/SayHello",
        "/demo.Greeter/../Admin",
        "/demo.Greeter/./SayHello",
        "/../demo.Greeter/SayHello",
        "//demo.Greeter/SayHello",
        "/demo.Greeter//SayHello",
        "/demo.Greeter/SayHello/",
        "/demo.Greeter/Say%48ello",
        "/demo%2EGreeter/SayHello",
        "/demo.Greeter/SayHello?x=1",
        "/demo.Greeter",
        "/",
        "/demo.Greeter/Say Hello",
        "/demo.Greeter/Say\\Hello",
        "/demo.Greeter/Admin;x",  # a path parameter: servlet containers route it as Admin
        "/demo.Greeter;v=1/Admin",
    ],
)
def test_a_grpc_path_that_is_not_plainly_service_and_method_is_unimplemented(path: str) -> None:
    assert malformed_method(path) is not None
    seen = Seen()
    refusal = inbound(seen).screen(head(path, "POST", GRPC), True)
    assert isinstance(refusal, Refusal)
    assert refusal.code == Code.UNIMPLEMENTED
    assert seen.asked == []  # before any policy


@pytest.mark.parametrize("path", ["/demo.Greeter/SayHello", "/grpc.health.v1.Health/Check"])
def test_a_plain_grpc_method_is_decided_on_its_path(path: str) -> None:
    assert malformed_method(path) is None
    seen = Seen()
    assert isinstance(inbound(seen).screen(head(path, "POST", GRPC), True), Forward)
    assert seen.asked[0][1] == path


def test_grpc_timeout_is_the_deadline_and_a_malformed_one_is_refused() -> None:
    forward = inbound(Seen()).screen(
        head("/demo.Greeter/SayHello", "POST", GRPC, (b"grpc-timeout", b"250m")), True
    )
    assert isinstance(forward, Forward)
    assert forward.deadline == pytest.approx(0.25)
    assert all(name != b"grpc-timeout" for name, _ in forward.headers)  # passed on reduced
    refusal = inbound(Seen()).screen(
        head("/demo.Greeter/SayHello", "POST", GRPC, (b"grpc-timeout", b"soon")), True
    )
    assert isinstance(refusal, Refusal) and refusal.code == grpc.Code.INTERNAL


def test_an_apps_outbound_call_goes_upstream_without_folded_names_or_identity() -> None:
    """An h2 outbound's head and trailers: what `headers_with_underscores: drop` leaves, the
    identity header never (the peer's agent sets it), grpc-timeout per try."""
    sent = head(
        "/demo.Greeter/SayHello",
        "POST",
        GRPC,
        (b"x_role", b"admin"),
        (b"x.role", b"admin"),
        (b"x-role", b"viewer"),
        (b"x-forwarded-client-cert", b"By=me"),
        (b"grpc-timeout", b"1S"),
    )
    upstream = _upstream_head(sent, is_grpc=True)
    assert upstream == [*head("/demo.Greeter/SayHello", "POST", GRPC), (b"x-role", b"viewer")]
    trailers = [(b"x_role", b"admin"), (b"X_Forwarded_Client_Cert", b"x"), (b"x-sum", b"1")]
    assert onward(trailers) == [(b"x-sum", b"1")]
    # Fields no trailer may be, which an app merging trailers would read as the head's,
    # and values no head could hold.
    head_only = [(b"host", b"evil.example"), (b"content-length", b"99"), (b"cookie", b"a=1")]
    framing = [(b"transfer-encoding", b"chunked"), (b"te", b"trailers"), (b"trailer", b"x-sum")]
    head_only += [*framing, (b"connection", b"close")]
    assert onward([*head_only, (b"authorization", b"Bearer x"), (b"x-sum", b"a\x01b")]) == []
