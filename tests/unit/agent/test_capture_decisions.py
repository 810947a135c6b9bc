"""What the capture listeners do with a connection, decided without I/O (agent/core/captured.py):
the mode and protocol of an original port, whether a first byte is TLS, and where an app's
connection to a destination goes, in the contract's order."""

from __future__ import annotations

import pytest

from agent.core.captured import (
    Captured,
    CapturedPort,
    OutboundRoutes,
    Passthrough,
    PortOverride,
    Refused,
    Route,
    ToEndpoint,
    ToUpstream,
    UpstreamAddresses,
    admit_plaintext,
    looks_like_tls,
)
from agent.core.endpoint import Endpoint
from agent.core.policy import Decision, PolicySet, Request
from agent.core.policyfile import parse_policy_list
from identity import TrustDomain

TD = TrustDomain("example.org")

CAPTURE_PORTS = frozenset({15006, 15007})


def test_every_port_is_strict_tcp_by_default() -> None:
    assert Captured().inbound(8080) == CapturedPort("strict", "tcp")


@pytest.mark.parametrize(
    ("default", "override", "expected"),
    [
        ("strict", PortOverride(protocol="http"), CapturedPort("strict", "http")),
        ("strict", PortOverride("permissive"), CapturedPort("permissive", "tcp")),
        ("permissive", PortOverride(protocol="http"), CapturedPort("permissive", "http")),
        ("permissive", PortOverride("strict", "http"), CapturedPort("strict", "http")),
    ],
)
def test_a_port_override_changes_only_what_it_names(
    default: str, override: PortOverride, expected: CapturedPort
) -> None:
    captured = Captured(default, ((8080, override),))  # type: ignore[arg-type]
    assert captured.inbound(8080) == expected
    assert captured.inbound(9090) == CapturedPort(default)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("first", "tls"),
    [
        (b"\x16\x03\x01\x02\x00", True),  # a ClientHello's record header
        (b"\x16", True),
        (b"GET / HTTP/1.1\r\n", False),
        (b"PRI * HTTP/2.0", False),  # h2c's preface
        (b"\x15\x03\x03", False),  # an alert record: no handshake
        (b"", False),
    ],
)
def test_tls_is_told_by_the_first_byte(first: bytes, tls: bool) -> None:
    assert looks_like_tls(first) is tls


SERVICE = Endpoint("10.96.0.20", 8080)
POD = Endpoint("10.64.1.3", 8080)
REGISTRY = Endpoint("10.96.0.1", 443)
OUTSIDE = Endpoint("192.0.2.7", 443)


def routes(policy: str = "allow-any", **extra: object) -> OutboundRoutes:
    backend = UpstreamAddresses("backend.shop:8080", (SERVICE,), (POD,))
    captured = Captured(policy=policy, passthrough=frozenset({REGISTRY}))  # type: ignore[arg-type]
    return OutboundRoutes([backend], captured, CAPTURE_PORTS)


@pytest.mark.parametrize(
    ("destination", "policy", "route"),
    [
        (SERVICE, "allow-any", ToUpstream("backend.shop:8080")),
        (POD, "allow-any", ToEndpoint("backend.shop:8080", POD)),
        (REGISTRY, "allow-any", Passthrough("registry")),
        (REGISTRY, "registry-only", Passthrough("registry")),
        (OUTSIDE, "allow-any", Passthrough("allow_any")),
        (OUTSIDE, "registry-only", Refused("registry_only")),
        (Endpoint("192.0.2.7", 15007), "allow-any", Refused("capture_loop")),
        (Endpoint("10.64.1.9", 15006), "allow-any", Refused("capture_loop")),
    ],
)
def test_an_apps_connection_goes_where_its_destination_says(
    destination: Endpoint, policy: str, route: Route
) -> None:
    assert routes(policy).route(destination) == route


def test_a_service_address_wins_over_an_endpoint_and_an_endpoint_over_passthrough() -> None:
    """Rules 1-3 in order, for an address that is all three (a misconfigured registry)."""
    both = Endpoint("10.96.0.30", 80)
    upstreams = [
        UpstreamAddresses("a", (), (both,)),  # an endpoint of a
        UpstreamAddresses("b", (both,), ()),  # a destination of b
    ]
    table = OutboundRoutes(upstreams, Captured(passthrough=frozenset({both})), CAPTURE_PORTS)
    assert table.route(both) == ToUpstream("b")
    pinned = OutboundRoutes(upstreams[:1], Captured(passthrough=frozenset({both})), CAPTURE_PORTS)
    assert pinned.route(both) == ToEndpoint("a", both)


def test_an_endpoint_of_two_upstreams_is_checked_against_the_first() -> None:
    shared = Endpoint("10.64.1.4", 8080)
    upstreams = [UpstreamAddresses("a", (), (shared,)), UpstreamAddresses("b", (), (shared,))]
    assert OutboundRoutes(upstreams, Captured(), CAPTURE_PORTS).route(shared).name == "a"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("written", "reported"),
    [
        (Endpoint("FD00:0::0002", 8080), Endpoint("fd00::2", 8080)),
        (Endpoint("::ffff:10.64.1.5", 8080), Endpoint("10.64.1.5", 8080)),
    ],
)
def test_an_endpoint_is_matched_however_its_address_is_written(
    written: Endpoint, reported: Endpoint
) -> None:
    """The kernel reports a destination in one form; a mesh pod's endpoint written in
    another is still that pod: pinned with mTLS, never passed through or refused."""
    upstreams = [UpstreamAddresses("a", (), (written,))]
    for policy in ("allow-any", "registry-only"):
        captured = Captured(policy=policy)  # type: ignore[arg-type]
        table = OutboundRoutes(upstreams, captured, CAPTURE_PORTS)
        assert table.route(reported) == ToEndpoint("a", written)


def _decide(policies: list[dict[str, object]], default: str = "allow-authenticated") -> Decision:
    policy_set = PolicySet(parse_policy_list(policies, "policies"), default)  # type: ignore[arg-type]
    return admit_plaintext(policy_set.decide(Request(None, 8080), frozenset({TD})))


def test_a_permissive_ports_plaintext_passes_where_only_the_default_would_refuse_it() -> None:
    decision = _decide([])
    assert (decision.allowed, decision.rule) == (True, "permissive")


@pytest.mark.parametrize(
    ("policies", "default"),
    [
        ([], "deny"),  # the operator's default: nothing unlisted comes in
        ([{"name": "guard", "action": "DENY", "rules": [{}]}], "allow-authenticated"),
        (
            [
                {
                    "name": "only-web",
                    "action": "ALLOW",
                    "rules": [{"from": {"principals": ["spiffe://example.org/ns/shop/sa/web"]}}],
                }
            ],
            "allow-authenticated",
        ),
    ],
)
def test_a_policy_or_a_deny_default_still_refuses_plaintext(
    policies: list[dict[str, object]], default: str
) -> None:
    assert not _decide(policies, default).allowed
