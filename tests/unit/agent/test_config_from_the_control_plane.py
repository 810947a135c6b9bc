"""The control plane as a config source: the `control:` section, inline policies, and a
snapshot merged into the bootstrap and read by the one parser, errors with key paths."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.app import load_policies, pod_name
from agent.config import (
    ConfigError,
    ControlEndpoint,
    Document,
    parse,
    parse_text,
    with_snapshot,
)
from agent.core.policyfile import PolicyError
from identity import SpiffeId, TrustDomain
from identity.backoff import Backoff
from identity.configfile import Listen

BASE = Path("/etc/outrider")
TD = TrustDomain("example.org")
WEB = SpiffeId.for_workload(TD, "shop", "web")
CONTROL = SpiffeId.for_workload(TD, "outrider-system", "outrider-control")
DENY_ALL = {"name": "deny-all", "action": "DENY", "rules": [{}]}


def bootstrap(**sections: Any) -> dict[str, Any]:
    """What the injector writes: identity, CA, control plane, admin, status."""
    return {
        "identity": {"spiffe_id": str(WEB)},
        "ca": {"address": "outrider-ca.outrider-system.svc:8443", "bundle_file": "bundle.pem"},
        "control": {"address": "outrider-control.outrider-system.svc:15012"},
        "admin": "127.0.0.1:15000",
        "status": "0.0.0.0:15020",
        **sections,
    }


def merged(snapshot: object, **sections: Any) -> Document:
    return with_snapshot(Document(bootstrap(**sections), BASE, "env"), snapshot, source="snap")


def errors(document: Document) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        document.parse()
    return caught.value.errors


def test_control_defaults_come_from_the_address_and_the_agents_trust_domain() -> None:
    config = parse(bootstrap(), base=BASE)
    assert config.control == ControlEndpoint(
        "outrider-control.outrider-system.svc",
        15012,
        server_name="outrider-control.outrider-system.svc",
        spiffe_id=CONTROL,
        pod=None,
        # Retried within seconds: a change made while it was away waits for the reconnect.
        backoff=Backoff(timedelta(seconds=1), timedelta(seconds=5)),
    )


def test_every_control_key_is_read() -> None:
    control = {
        "address": "10.0.0.1:15012",
        "server_name": "cp.example",
        "spiffe_id": "spiffe://example.org/ns/mesh/sa/cp",
        "pod": "web-0",
        "backoff": {"initial": "200ms", "max": "5s"},
    }
    config = parse(bootstrap(control=control), base=BASE)
    assert config.control == ControlEndpoint(
        "10.0.0.1",
        15012,
        "cp.example",
        SpiffeId.parse("spiffe://example.org/ns/mesh/sa/cp"),
        "web-0",
        Backoff(timedelta(milliseconds=200), timedelta(seconds=5)),
    )


def test_without_control_the_agent_has_none() -> None:
    raw = bootstrap()
    del raw["control"]
    assert parse(raw, base=BASE).control is None


@pytest.mark.parametrize(
    ("control", "error"),
    [
        ({}, "control.address: required: host:port"),
        ({"address": "cp:0"}, "control.address: port 0 is not a port to connect to"),
        ({"address": "cp:1", "spiffe_id": "spiffe://other.org/ns/x/sa/cp"}, "control.spiffe_id"),
        ({"address": "cp:1", "spiffe_id": "spiffe://example.org"}, "control.spiffe_id"),
        ({"address": "cp:1", "backoff": {"initial": "1m", "max": "1s"}}, "exceeds"),
        ({"address": "cp:1", "pod": ""}, "control.pod: must be a non-empty string"),
        ({"address": "cp:1", "token": "x"}, "control.token: unknown key"),
    ],
)
def test_a_bad_control_section_names_its_key(control: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(bootstrap(control=control), base=BASE)
    assert any(error in e for e in caught.value.errors), caught.value.errors


def test_a_snapshot_replaces_inbound_outbound_and_policy_and_keeps_the_rest() -> None:
    snapshot = {
        "inbound": [{"listen": "0.0.0.0:15443", "app": "127.0.0.1:8080", "protocol": "http"}],
        "outbound": [
            {
                "name": "backend.shop:8080",
                "listen": "127.0.0.1:15001",
                "endpoints": ["10.0.0.7:15443"],
                "server_ids": ["spiffe://example.org/ns/shop/sa/backend"],
            }
        ],
        "policy": {"default_action": "deny", "policies": [DENY_ALL]},
    }
    old_inbound = [{"listen": "0.0.0.0:15444", "app": "127.0.0.1:9090"}]
    config = merged(snapshot, inbound=old_inbound, limits={"max_connections": 7}).parse()
    assert [i.listen for i in config.inbound] == [Listen("0.0.0.0", 15443)]
    assert [o.name for o in config.outbound] == ["backend.shop:8080"]
    assert config.policy.default_action == "deny"
    assert [p.name for p in config.policy.policies] == ["deny-all"]
    assert config.limits.max_connections == 7  # the bootstrap's
    assert config.identity.spiffe_id == WEB
    assert config.status == Listen("0.0.0.0", 15020)


def test_a_snapshot_without_a_key_leaves_that_key_empty() -> None:
    """A snapshot is the whole of its three keys: what it leaves out is not the bootstrap's."""
    config = merged({}, inbound=[{"app": "127.0.0.1:8080"}]).parse()
    assert config.inbound == ()
    assert config.policy.policies == ()


def test_a_snapshot_may_not_touch_the_bootstrap() -> None:
    with pytest.raises(ConfigError) as caught:
        merged({"identity": {"spiffe_id": "spiffe://example.org/ns/x/sa/y"}, "admin": "0:1"})
    assert caught.value.source == "snap"
    assert [e.split(":")[0] for e in caught.value.errors] == ["admin", "identity"]
    assert "holds only inbound, outbound, policy" in caught.value.errors[0]


@pytest.mark.parametrize("snapshot", [[], "inbound", None])
def test_a_snapshot_that_is_not_an_object_is_refused(snapshot: object) -> None:
    with pytest.raises(ConfigError, match="must be an object"):
        merged(snapshot)


def test_a_snapshots_errors_name_their_key_paths_all_at_once() -> None:
    snapshot = {
        "inbound": [
            {"app": "nowhere"},
            {"listen": "0.0.0.0:15020", "app": "127.0.0.1:8080"},  # the status port
        ],
        "policy": {"policies": [{"name": "p", "action": "allow", "rules": [{}]}]},
    }
    found = errors(merged(snapshot))
    assert any(e.startswith("inbound[0].app: ") for e in found), found
    assert any(e.startswith("inbound[1].listen: ") and "status" in e for e in found), found
    assert any("policies[0].action" in e for e in found), found


def test_inline_policies_are_read_as_a_policy_files_are() -> None:
    raw = bootstrap(
        policy={"policies": [DENY_ALL, {"name": "audit", "action": "AUDIT", "rules": [{}]}]}
    )
    config = parse(raw, base=BASE)
    assert [(p.name, p.action) for p in config.policy.policies] == [
        ("deny-all", "DENY"),
        ("audit", "AUDIT"),
    ]


@pytest.mark.parametrize(
    ("policies", "error"),
    [
        ({"name": "p"}, "policy.policies: must be a list"),
        ([{"name": "p", "action": "DENY"}], "missing key 'rules'"),
        ([DENY_ALL, DENY_ALL], "duplicate policy name 'deny-all'"),
    ],
)
def test_bad_inline_policies_are_config_errors(policies: object, error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(bootstrap(policy={"policies": policies}), base=BASE)
    assert any(error in e for e in caught.value.errors), caught.value.errors


def test_inline_policies_join_the_files_and_share_their_names(tmp_path: Path) -> None:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text("policies:\n  - {name: deny-all, action: DENY, rules: [{}]}\n")
    raw = bootstrap(policy={"files": [str(policy_file)], "policies": [DENY_ALL]})
    with pytest.raises(PolicyError, match="duplicate policy name 'deny-all'"):
        load_policies(parse(raw, base=BASE))
    raw["policy"]["policies"] = [{**DENY_ALL, "name": "inline"}]
    names = [p.name for p in load_policies(parse(raw, base=BASE)).policies]
    assert names == ["deny-all", "inline"]


def test_the_pod_comes_from_the_config_or_the_environment() -> None:
    config = parse(bootstrap(), base=BASE)
    assert pod_name(config, {"POD_NAME": "web-7d9c"}) == "web-7d9c"
    with pytest.raises(ConfigError, match=r"control\.pod"):
        pod_name(config, {})
    named = parse(bootstrap(control={"address": "cp:1", "pod": "mine"}), base=BASE)
    assert pod_name(named, {"POD_NAME": "other"}) == "mine"
    file_only = parse_text(
        "identity: {spiffe_id: 'spiffe://example.org/ns/a/sa/b'}\n"
        "ca: {address: 'ca:1', bundle_file: b.pem}\n",
        source="t",
    )
    assert pod_name(file_only, {}) is None


def test_the_control_planes_timeout_is_read() -> None:
    """control.timeout bounds the connect and handshake and the wait for a first config."""
    raw = bootstrap()
    raw["control"]["timeout"] = "2s"
    assert parse(raw, base=BASE).control.timeout == timedelta(seconds=2)  # type: ignore[union-attr]
