"""What each inbound decision leaves (agent/adapters/authorize.py): every decision and each
audit or dry-run record counted once, an enforced deny counted and said in a line per
caller a while (not per denial), its path shown as the access log shows it."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import pytest

from agent.adapters.authorize import Authorizer
from agent.adapters.metrics import AgentMetrics
from agent.adapters.runtime import Runtime
from agent.adapters.tls import Contexts
from agent.config import Inbound, Limits
from agent.core.authz import AllowList
from agent.core.endpoint import Endpoint
from agent.core.policy import Condition, Pattern, Policy, PolicySet, Request, Rule
from identity import SpiffeId, TrustDomain
from identity.configfile import Listen

ME = SpiffeId.parse("spiffe://example.org/ns/shop/sa/backend")
FRONTEND = SpiffeId.parse("spiffe://example.org/ns/shop/sa/frontend")
ADMIN = SpiffeId.parse("spiffe://example.org/ns/shop/sa/admin")
CONFIG = Inbound(
    Listen("127.0.0.1", 8443),
    Endpoint("127.0.0.1", 8080),
    AllowList(trust_domains=frozenset({TrustDomain("example.org")})),
    "http",
)
NO_ADMIN = Policy("no-admin", "DENY", (Rule("r0", (Condition("paths", (Pattern("/admin*"),)),)),))


def _runtime(*policies: Policy, default: str = "allow-authenticated") -> Runtime:
    runtime = Runtime(Limits(), Contexts(), AgentMetrics(), lambda: datetime.now(UTC), ME)
    runtime.policies = PolicySet(policies, default)  # type: ignore[arg-type]
    return runtime


def _decisions(runtime: Runtime, decision: str, policy: str, rule: str) -> float:
    labels = {"decision": decision, "policy": policy, "rule": rule}
    found = runtime.metrics.registry.get_sample_value("outrider_authz_decisions_total", labels)
    return found or 0.0


def _denials(runtime: Runtime, peer: SpiffeId | None) -> float:
    labels = {"policy": "no-admin", "rule": "r0", "peer_id": str(peer or "")}
    found = runtime.metrics.registry.get_sample_value("outrider_authz_denials_total", labels)
    return found or 0.0


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "denied" in r.getMessage()]


async def test_a_deny_is_counted_every_time_and_said_once_per_caller_a_while(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "outrider.agent")
    runtime = _runtime(NO_ADMIN)
    authorizer = Authorizer(runtime)
    frontend, admin = authorizer.caller(FRONTEND, CONFIG), authorizer.caller(ADMIN, CONFIG)
    for _ in range(3):
        assert not frontend("GET", "/admin/users", "shop", {}).allowed
    assert not admin("POST", "/admin", None, {}).allowed
    assert frontend("GET", "/orders", "shop", {}).allowed
    assert _decisions(runtime, "deny", "no-admin", "r0") == 4
    assert _decisions(runtime, "allow", "default", "allow-authenticated") == 1
    assert (_denials(runtime, FRONTEND), _denials(runtime, ADMIN)) == (3, 1)
    lines = _lines(caplog)
    assert lines[0].startswith(
        f"inbound 127.0.0.1:8443: denied GET /admin/users to port 8080 from {FRONTEND}: "
    )
    assert "no-admin" in lines[0]
    assert lines[1].startswith(
        f"inbound 127.0.0.1:8443: denied POST /admin to port 8080 from {ADMIN}"
    )
    assert len(lines) == 2
    runtime.refusal_lines.interval = 0.0  # the while is over: the next line tells the rest
    frontend("GET", "/admin", None, {})
    assert _lines(caplog)[2].endswith("(and 2 more like it since the last line)")


async def test_a_denied_paths_parameters_stay_out_of_its_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "outrider.agent")
    authorizer = Authorizer(_runtime(NO_ADMIN))
    assert not authorizer.caller(FRONTEND, CONFIG)(
        "GET", "/admin;jsessionid=s3cret", None, {}
    ).allowed
    (line,) = _lines(caplog)
    assert "s3cret" not in line
    assert "/admin;jsessionid=" in line


async def test_audit_and_dry_run_records_are_counted_and_change_no_outcome(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "outrider.agent")
    watch = Policy("watch", "AUDIT", (Rule("r0", (Condition("paths", (Pattern("/api/*"),)),)),))
    trial = Policy(
        "trial", "DENY", (Rule("r0", (Condition("methods", (Pattern("POST"),)),)),), dry_run=True
    )
    runtime = _runtime(watch, trial)
    caller = Authorizer(runtime).caller(FRONTEND, CONFIG)
    assert caller("POST", "/api/orders", None, {}).allowed
    assert caller("GET", "/api/orders", None, {}).allowed
    assert _decisions(runtime, "allow", "default", "allow-authenticated") == 2
    assert _decisions(runtime, "audit", "watch", "r0") == 2
    assert _decisions(runtime, "dry_run_deny", "trial", "r0") == 1
    assert _decisions(runtime, "deny", "trial", "r0") == 0
    assert _lines(caplog) == []


async def test_a_connection_is_decided_by_the_policies_in_force_at_each_request() -> None:
    runtime = _runtime()
    caller = Authorizer(runtime).caller(FRONTEND, CONFIG)
    assert caller("GET", "/admin", None, {}).allowed
    runtime.policies = PolicySet((NO_ADMIN,), "allow-authenticated")  # a reload
    assert not caller("GET", "/admin", None, {}).allowed


async def test_plaintext_passes_a_permissive_port_where_only_the_default_refuses() -> None:
    runtime = _runtime()
    decision = Authorizer(runtime).decide(Request(None, 8080), CONFIG)
    assert (decision.allowed, decision.rule) == (True, "permissive")
    assert _decisions(runtime, "allow", "default", "permissive") == 1
    denied = Authorizer(_runtime(default="deny")).decide(Request(None, 8080), CONFIG)
    assert not denied.allowed
