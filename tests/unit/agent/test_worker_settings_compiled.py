"""`workers: N`: the settings the main process checked reach each worker whole, built or
compiled (mypyc).

A compiled frozen dataclass (Policy, Rule, HealthSettings, RetryPolicy ...) cannot be
unpickled field by field: mypyc sets each field through the class's `__setattr__`, which a
frozen dataclass refuses, and with the per-request modules compiled every worker refused
its settings and the agent exited ("a worker refused the config"). These tests pass the
settings through the worker channel's own codec, so they cover whichever build is on
PYTHONPATH.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent.adapters.workers import from_main, to_worker
from agent.app import Settings, settle
from agent.config import parse
from agent.core.policy import PolicySet, Request
from identity import SpiffeId, TrustDomain
from tests.unit.agent.test_config import full

TD = TrustDomain("example.org")
CALLER = SpiffeId.for_workload(TD, "shop", "web")

#: A policy of every condition kind, an AUDIT and a dry run: each a frozen dataclass tree.
POLICIES = [
    {
        "name": "guard",
        "action": "DENY",
        "rules": [
            {"name": "admin", "to": {"paths": ["/admin*"], "methods": ["GET", "POST"]}},
            {"name": "hosts", "to": {"hosts": ["*.internal.example.org"], "ports": [8080]}},
            {
                "name": "src",
                "from": {
                    "principals": ["spiffe://example.org/ns/evil/*"],
                    "namespaces": ["evil"],
                    "trust_domains": ["evil.org"],
                },
            },
            {"name": "role", "when": [{"header": "x-role", "values": ["intruder"]}]},
        ],
    },
    {"name": "audit", "action": "AUDIT", "rules": [{"to": {"not_paths": ["/healthz"]}}]},
    {"name": "dry", "action": "DENY", "mode": "dry-run", "rules": [{"to": {"paths": ["/dry"]}}]},
    {"name": "shop/api", "action": "ALLOW", "rules": [{"to": {"not_methods": ["TRACE"]}}]},
]


def settings(tmp_path: Path) -> Settings:
    raw: dict[str, Any] = full()
    raw["inbound"][0]["protocol"] = "http"
    raw["outbound"][0] |= {
        "protocol": "http",
        "balancer": "ring_hash",
        "hash_on": {"header": "x-user"},
        "health": {
            "active": {"kind": "http", "path": "/healthz", "interval": "2s"},
            "outlier": {"consecutive_5xx": 3, "base_ejection": "10s"},
            "panic_threshold": 40,
        },
        "timeouts": {"connect": "1s", "per_try": "2s", "request": "5s"},
        "retries": {"max": 3, "retry_on": [503, "reset", "unavailable"], "budget": {"percent": 25}},
        "circuit_breaker": {"max_connections": 7, "max_pending": 8, "max_requests": 9},
    }
    raw["policy"] = {"policies": POLICIES, "default_action": "deny"}
    return settle(parse(raw, base=tmp_path))


def test_a_worker_gets_the_settings_the_main_process_checked(tmp_path: Path) -> None:
    sent = settings(tmp_path)
    kind, seq, got = from_main(to_worker(("settings", 7, sent)))
    assert (kind, seq) == ("settings", 7)
    assert got == sent
    assert got.config.outbound[0].health == sent.config.outbound[0].health
    assert got.policies.policies == sent.policies.policies


def test_the_worker_s_policies_decide_as_the_main_process_s(tmp_path: Path) -> None:
    sent = settings(tmp_path)
    sent.policies.decide(Request(CALLER, 8080, "GET", "/api", None), frozenset({TD}))  # a cache
    got: PolicySet = from_main(to_worker(("settings", 1, sent)))[2].policies
    requests = [
        Request(CALLER, 8080, "GET", "/admin/x", None),
        Request(CALLER, 8080, "GET", "/api", "a.internal.example.org"),
        Request(CALLER, 8080, "GET", "/dry", None, {"x-role": ("ok",)}),
        Request(CALLER, 8080, "GET", "/api", None, {"x-role": ("intruder",)}),
        Request(CALLER, 8080, "TRACE", "/api", None),
        Request(SpiffeId.for_workload(TrustDomain("evil.org"), "evil", "x"), 8080, "GET", "/"),
        Request(None, 8080),
    ]
    for request in requests:
        expected = sent.policies.explain(request, frozenset({TD}))
        decided = got.decide(request, frozenset({TD}))
        assert (decided.allowed, decided.policy, decided.rule, decided.reason) == (
            expected.allowed,
            expected.policy,
            expected.rule,
            expected.reason,
        )
