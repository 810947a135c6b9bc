"""The outbound section: sources, subsets, balancing, health, timeouts, retries, breakers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.config import ConfigError, parse
from agent.config_outbound import Outbound, Subset, Timeouts
from agent.core.discovery import DnsSource, KubernetesSource, StaticSource
from agent.core.health import ActiveCheck, HealthSettings, OutlierDetection
from agent.core.resilience import BreakerLimits, RetryPolicy
from agent.core.upstream import Endpoint
from identity import SpiffeId
from identity.configfile import Listen

BACKEND = "spiffe://example.org/ns/shop/sa/backend"


def config(**upstream: Any) -> dict[str, Any]:
    item = {"name": "backend", "listen": "127.0.0.1:9001", "server_ids": [BACKEND], **upstream}
    return {
        "identity": {"spiffe_id": "spiffe://example.org/ns/shop/sa/web"},
        "ca": {"address": "ca:8443", "bundle_file": "bundle.pem"},
        "outbound": [item],
    }


def outbound(**upstream: Any) -> Outbound:
    return parse(config(**upstream), base=Path("/")).outbound[0]


def errors(**upstream: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(config(**upstream), base=Path("/"))
    return info.value.errors


def test_everything_given() -> None:
    parsed = outbound(
        protocol="http",
        subsets=[
            {"name": "v1", "weight": 90, "dns": {"name": "backend-v1.shop.svc:15443"}},
            {"name": "v2", "weight": 10, "kubernetes": {"service": "b-v2", "namespace": "shop"}},
            {
                "name": "pinned",
                "weight": 0,
                "endpoints": [{"address": "10.0.0.9:15443", "weight": 3}],
            },
        ],
        balancer="maglev",
        hash_on={"header": "X-User"},
        health={
            "active": {"kind": "http", "path": "/ready", "interval": "2s", "timeout": "500ms"},
            "outlier": {"consecutive_failures": 3, "base_ejection": "10s", "max_ejection": "1m"},
            "panic_threshold": 0,
        },
        timeouts={"connect": "1s", "per_try": "250ms", "request": "2s"},
        retries={
            "max": 3,
            "retry_on": ["reset", 502, 503, "unavailable", "resource-exhausted"],
            "non_idempotent": True,
            "budget": {"percent": 10, "min_concurrency": 1},
        },
        circuit_breaker={"max_connections": 10, "max_pending": 20, "max_requests": 30},
        pool={"idle_timeout": "5s"},
    )
    assert parsed == Outbound(
        "backend",
        Listen("127.0.0.1", 9001),
        frozenset({SpiffeId.parse(BACKEND)}),
        (
            Subset("v1", 90, DnsSource("backend-v1.shop.svc", 15443, 5.0)),
            Subset("v2", 10, KubernetesSource("b-v2", "shop", 15443)),
            Subset("pinned", 0, StaticSource(((Endpoint("10.0.0.9", 15443), 3),))),
        ),
        "http",
        "maglev",
        ("header", "x-user"),
        HealthSettings(
            ActiveCheck("http", "/ready", 2.0, 0.5),
            OutlierDetection(consecutive_failures=3, base_ejection=10.0, max_ejection=60.0),
            0,
        ),
        Timeouts(1.0, 0.25, 2.0),
        RetryPolicy(
            3, frozenset({"reset"}), frozenset({502, 503}), True, 10.0, 1, frozenset({14, 8})
        ),
        BreakerLimits(10, 20, 30),
        5.0,
    )


def test_defaults_are_istio_like() -> None:
    parsed = outbound(endpoints=["a:15443"])
    assert parsed.subsets == (Subset("default", 1, StaticSource(((Endpoint("a", 15443), 1),))),)
    assert (parsed.protocol, parsed.balancer, parsed.hash_on) == ("tcp", "round_robin", None)
    # 2 retries on connect-failure, refused-stream, reset, 503 and gRPC UNAVAILABLE
    assert parsed.retries == RetryPolicy()
    assert parsed.health == HealthSettings()  # outlier detection on, no active checks
    assert parsed.timeouts == Timeouts()


def test_outlier_detection_can_be_turned_off() -> None:
    assert outbound(endpoints=["a:1"], health={"outlier": None}).health.outlier is None


@pytest.mark.parametrize(
    ("upstream", "message"),
    [
        pytest.param({}, "outbound[0].endpoints: required: one of endpoints", id="no-source"),
        pytest.param(
            {"endpoints": ["a:1"], "dns": {"name": "a:1"}},
            "outbound[0].endpoints: only one of",
            id="two-sources",
        ),
        pytest.param(
            {"endpoints": ["a:1"], "subsets": []},
            "outbound[0].endpoints: give endpoints in subsets or here",
            id="subsets-and-source",
        ),
        pytest.param({"subsets": []}, "outbound[0].subsets: required", id="no-subsets"),
        pytest.param(
            {
                "subsets": [
                    {"name": "v1", "endpoints": ["a:1"]},
                    {"name": "v1", "endpoints": ["b:1"]},
                ]
            },
            "outbound[0].subsets[1].name: 'v1' is given twice",
            id="subset-twice",
        ),
        pytest.param(
            {"subsets": [{"weight": 1, "endpoints": ["a:1"]}]},
            "outbound[0].subsets[0].name: required",
            id="subset-no-name",
        ),
        pytest.param(
            {"endpoints": [{"address": "a:1", "weight": 0}]},
            "outbound[0].endpoints[0].weight: must be an integer >= 1",
            id="endpoint-weight-0",
        ),
        *(
            pytest.param(
                {"endpoints": [{"address": "a:1", "weight": weight}]},
                "outbound[0].endpoints[0].weight: must be an integer >= 1",
                id=f"endpoint-weight-{kind}",
            )
            for kind, weight in [("bool", True), ("float", 1.5), ("string", "3"), ("null", None)]
        ),
        pytest.param(
            {"endpoints": [{"address": "a"}]},
            "outbound[0].endpoints[0].address: 'a' is not",
            id="endpoint-address",
        ),
        pytest.param(
            {"dns": {"name": "backend.svc"}}, "outbound[0].dns.name: 'backend.svc' is not", id="dns"
        ),
        pytest.param(
            {"kubernetes": {"service": "b"}},
            "outbound[0].kubernetes.namespace: required",
            id="k8s-namespace",
        ),
        pytest.param(
            {"endpoints": ["a:1"], "balancer": "fastest"},
            "outbound[0].balancer: 'fastest' is not one of round_robin",
            id="balancer",
        ),
        pytest.param(
            {"endpoints": ["a:1"], "hash_on": {"header": "x"}},
            "outbound[0].hash_on: only ring_hash and maglev hash",
            id="hash-without-hashing",
        ),
        pytest.param(
            {"endpoints": ["a:1"], "balancer": "ring_hash", "hash_on": {"cookie": "s"}},
            "outbound[0].hash_on: a header or cookie needs protocol http, http2 or grpc",
            id="cookie-on-tcp",
        ),
        pytest.param(
            {"endpoints": ["a:1"], "balancer": "ring_hash", "hash_on": {"path": "/"}},
            "outbound[0].hash_on.path: unknown key",
            id="hash-on-what",
        ),
        pytest.param(
            {"endpoints": ["a:1"], "health": {"active": {"kind": "grpc"}}},
            "outbound[0].health.active.kind: 'grpc' is not one of tcp, http",
            id="check-kind",
        ),
        pytest.param(
            {"endpoints": ["a:1"], "health": {"active": {"path": "healthz"}}},
            "outbound[0].health.active.path: must start with /",
            id="check-path",
        ),
        pytest.param(
            {"endpoints": ["a:1"], "health": {"panic_threshold": 101}},
            "outbound[0].health.panic_threshold: a percentage",
            id="panic",
        ),
        pytest.param(
            {"endpoints": ["a:1"], "health": {"outlier": {"max_ejection_percent": 150}}},
            "outbound[0].health.outlier.max_ejection_percent: a percentage",
            id="ejection-percent",
        ),
        pytest.param(
            {"endpoints": ["a:1"], "health": {"outlier": {"base_ejection": "10m"}}},
            "outbound[0].health.outlier.max_ejection: must be at least base_ejection",
            id="ejection-times",
        ),
        pytest.param(
            {"endpoints": ["a:1"], "timeouts": {"per_try": "soon"}},
            "outbound[0].timeouts.per_try: 'soon' is not",
            id="timeout",
        ),
        pytest.param(
            {"endpoints": ["a:1"], "retries": {"retry_on": ["5xx"]}},
            "outbound[0].retries.retry_on[0]: '5xx' is not one of connect-failure",
            id="retry-on",
        ),
        pytest.param(
            {"endpoints": ["a:1"], "retries": {"retry_on": ["reset", "UNAVAILABLE"]}},
            "outbound[0].retries.retry_on[1]: 'UNAVAILABLE' is not one of connect-failure, "
            "refused-stream, reset, timeout, a gRPC status (cancelled, deadline-exceeded, "
            "internal, resource-exhausted, unavailable) or an HTTP status code (100-599)",
            id="retry-on-grpc-name-as-envoy-spells-it",
        ),
        pytest.param(
            {"endpoints": ["a:1"], "retries": {"retry_on": [{"grpc": 14}]}},
            "outbound[0].retries.retry_on[0]: {'grpc': 14} is not one of",
            id="retry-on-not-a-name",
        ),
        pytest.param(
            {"endpoints": ["a:1"], "retries": {"retry_on": [14]}},
            "outbound[0].retries.retry_on[0]: 14 is not one of",
            id="retry-on-grpc-code-as-a-number",
        ),
        pytest.param(
            {"endpoints": ["a:1"], "retries": {"max": -1}},
            "outbound[0].retries.max: must be an integer >= 0",
            id="retries-negative",
        ),
        pytest.param(
            {"endpoints": ["a:1"], "retries": {"budget": {"percent": "all"}}},
            "outbound[0].retries.budget.percent: a percentage",
            id="budget",
        ),
        pytest.param(
            {"endpoints": ["a:1"], "circuit_breaker": {"max_requests": 0}},
            "outbound[0].circuit_breaker.max_requests: must be an integer >= 1",
            id="breaker",
        ),
        pytest.param(
            {"endpoints": ["a:1"], "pool": {"idle": "5s"}},
            "outbound[0].pool.idle: unknown key",
            id="pool-key",
        ),
        pytest.param(
            {"endpoints": ["a:1"], "protocol": "h2"},
            "outbound[0].protocol: 'h2' is not one of tcp, http, http2, grpc",
            id="protocol",
        ),
    ],
)
def test_one_mistake_one_message_with_its_key_path(upstream: dict[str, Any], message: str) -> None:
    found = errors(**upstream)
    assert any(message in error for error in found), found


def test_every_mistake_at_once() -> None:
    found = errors(
        endpoints=["a"],
        balancer="x",
        retries={"retry_on": ["y"]},
        circuit_breaker={"max_pending": -1},
    )
    assert len(found) == 4, found


@pytest.mark.parametrize(
    ("retry_on", "on", "statuses", "grpc_statuses"),
    [
        pytest.param(["unavailable"], set(), set(), {14}, id="grpc-only"),
        pytest.param(
            ["cancelled", "deadline-exceeded", "resource-exhausted", "internal", "unavailable"],
            set(),
            set(),
            {1, 4, 8, 13, 14},
            id="every-grpc-name",
        ),
        pytest.param(
            ["refused-stream", 503], {"refused-stream"}, {503}, set(), id="given-means-only-these"
        ),
        pytest.param([], set(), set(), set(), id="empty-retries-nothing"),
    ],
)
def test_retry_on_takes_failures_http_statuses_and_envoys_grpc_names(
    retry_on: list[object], on: set[str], statuses: set[int], grpc_statuses: set[int]
) -> None:
    retries = outbound(endpoints=["a:1"], retries={"retry_on": retry_on}).retries
    assert (retries.on, retries.statuses, retries.grpc_statuses) == (on, statuses, grpc_statuses)


@pytest.mark.parametrize("protocol", ["http", "http2", "grpc"])
def test_a_header_or_cookie_hash_works_on_every_l7_protocol(protocol: str) -> None:
    for hash_on in ({"header": "x-user"}, {"cookie": "session"}):
        parsed = outbound(
            endpoints=["a:1"], protocol=protocol, balancer="ring_hash", hash_on=hash_on
        )
        assert parsed.protocol == protocol and parsed.hash_on is not None


def test_an_http_health_check_is_refused_on_an_h2_upstream() -> None:
    check = {"active": {"kind": "http", "path": "/healthz"}}
    assert errors(endpoints=["a:1"], protocol="grpc", health=check) == [
        "outbound[0].health.active.kind: an http check speaks HTTP/1.1, which a "
        "protocol: grpc upstream refuses; use kind: tcp"
    ]
    tcp = outbound(endpoints=["a:1"], protocol="grpc", health={"active": {"kind": "tcp"}})
    assert tcp.health.active is not None


def test_a_kubernetes_source_without_the_kubernetes_client_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The agent image leaves the client out: the config is refused at start, not later."""
    monkeypatch.setattr("agent.config_outbound.kubernetes_installed", lambda: False)
    [error] = errors(kubernetes={"service": "b", "namespace": "shop"})
    assert error.startswith("outbound[0].kubernetes: needs the kubernetes package")
    assert "endpoints: or dns:" in error
    assert "pip install 'outrider[agent,control]'" in error
