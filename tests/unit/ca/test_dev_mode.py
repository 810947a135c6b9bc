"""Dev mode: refused in a pod, its config rules, and dev tokens only a dev CA accepts."""

from __future__ import annotations

import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from ca import config as ca_config
from ca.authn.dev import DEV_ISSUER, KEY_FILE, DevIssuer, DevModeError, refusal, workload_names
from ca.authn.fake_issuer import FakeTokenIssuer
from ca.authn.jwks import StaticJwks
from ca.authn.kubernetes import AuthnError, TokenPolicy, TokenVerifier
from identity import SpiffeId
from identity.configfile import ConfigError

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
FRONTEND = SpiffeId.parse("spiffe://demo.outrider.local/ns/demo/sa/frontend")
DEV_CONFIG: dict[str, Any] = {
    "signer": {"dir": "ca"},
    "listen": {"grpc": "127.0.0.1:8443", "http": "localhost:8080"},
}


def test_no_sign_of_a_pod_lets_dev_mode_run(tmp_path: Path) -> None:
    assert refusal({"HOME": "/root", "KUBERNETES_SERVICE_HOST": ""}, tmp_path / "token") is None


def test_the_kubernetes_service_variable_refuses_dev_mode_and_says_what_to_do(
    tmp_path: Path,
) -> None:
    why = refusal({"KUBERNETES_SERVICE_HOST": "10.96.0.1"}, tmp_path / "token")
    assert why is not None
    assert "KUBERNETES_SERVICE_HOST is set" in why
    assert "without --dev and with authn.kubernetes" in why


def test_a_mounted_service_account_token_refuses_dev_mode(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("a.b.c")
    why = refusal({}, token)
    assert why is not None and f"a ServiceAccount token is mounted at {token}" in why


def test_a_dev_config_needs_no_authn() -> None:
    config = ca_config.parse(DEV_CONFIG, base=Path("/etc/outrider"), dev=True)
    assert config.dev and config.kubernetes is None
    assert config.signer_dir == Path("/etc/outrider/ca")


def test_a_dev_config_reports_every_unsafe_key_at_once() -> None:
    raw = {
        "signer": {"kind": "vault", "address": "https://vault:8200", "auth": {"role": "r"}},
        "trust_domain": "example.org",
        "listen": {"grpc": "0.0.0.0:8443", "http": "10.0.0.5:8080"},
        "authn": {"kubernetes": {"issuer": "https://k", "jwks_file": "jwks.json"}},
    }
    with pytest.raises(ConfigError) as caught:
        ca_config.parse(raw, base=Path("."), dev=True)
    errors = "\n".join(caught.value.errors)
    assert "authn: not read with --dev" in errors
    assert "signer.kind: --dev needs kind: local" in errors
    assert "listen.grpc: 0.0.0.0:8443 is not a loopback address" in errors
    assert "listen.http: 10.0.0.5:8080 is not a loopback address" in errors


def test_the_default_listen_addresses_are_not_for_dev_mode() -> None:
    with pytest.raises(ConfigError) as caught:
        ca_config.parse({"signer": {"dir": "ca"}}, base=Path("."), dev=True)
    assert [e.split(":")[0] for e in caught.value.errors] == ["listen.grpc", "listen.http"]


def test_ipv6_loopback_is_a_dev_listen_address() -> None:
    raw = {**DEV_CONFIG, "listen": {"grpc": "[::1]:8443", "http": "[::1]:8080"}}
    assert ca_config.parse(raw, base=Path("."), dev=True).dev


def test_without_dev_a_missing_authn_points_at_dev_mode() -> None:
    with pytest.raises(ConfigError) as caught:
        ca_config.parse(DEV_CONFIG, base=Path("."))
    assert any(
        e.startswith("authn.kubernetes: required") and "outrider ca serve --dev" in e
        for e in caught.value.errors
    ), caught.value.errors


def test_the_dev_key_is_made_once_private_and_kept(tmp_path: Path) -> None:
    first = DevIssuer.open(tmp_path)
    assert stat.S_IMODE((tmp_path / KEY_FILE).stat().st_mode) == 0o600
    assert DevIssuer.open(tmp_path).jwks() == first.jwks()
    assert "PRIVATE" not in repr(first) and repr(first) == "DevIssuer(key=...)"


def test_a_dev_key_outside_a_ca_directory_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(DevModeError, match="outrider ca init"):
        DevIssuer.open(tmp_path / "missing")


def test_a_damaged_dev_key_is_refused_not_replaced(tmp_path: Path) -> None:
    (tmp_path / KEY_FILE).write_text("not a key")
    with pytest.raises(DevModeError, match="remove it to make a new one"):
        DevIssuer.open(tmp_path)
    assert (tmp_path / KEY_FILE).read_text() == "not a key"


async def test_a_dev_token_names_its_workload(tmp_path: Path) -> None:
    issuer = DevIssuer.open(tmp_path)
    token = issuer.token(FRONTEND, now=NOW, lifetime=timedelta(days=7))
    caller = await issuer.verifier(lambda: NOW + timedelta(days=6)).verify(token)
    assert (caller.namespace, caller.service_account) == ("demo", "frontend")


async def test_a_dev_token_expires(tmp_path: Path) -> None:
    issuer = DevIssuer.open(tmp_path)
    token = issuer.token(FRONTEND, now=NOW, lifetime=timedelta(hours=1))
    with pytest.raises(AuthnError) as caught:
        await issuer.verifier(lambda: NOW + timedelta(hours=2)).verify(token)
    assert caught.value.reason == "expired"


async def test_a_cluster_token_does_not_pass_for_a_dev_one(tmp_path: Path) -> None:
    cluster = FakeTokenIssuer()
    token = cluster.token("demo", "frontend", now=NOW)
    with pytest.raises(AuthnError):
        await DevIssuer.open(tmp_path).verifier(lambda: NOW).verify(token)


async def test_no_cluster_ca_takes_a_dev_token(tmp_path: Path) -> None:
    """Even one configured, by mistake, with the dev issuer's key: issuer and audience differ."""
    issuer = DevIssuer.open(tmp_path)
    cluster_ca = TokenVerifier(
        TokenPolicy(FakeTokenIssuer().issuer), StaticJwks(issuer.jwks()), lambda: NOW
    )
    with pytest.raises(AuthnError) as caught:
        await cluster_ca.verify(issuer.token(FRONTEND, now=NOW))
    assert caught.value.reason in {"wrong_audience", "unknown_issuer"}
    assert DEV_ISSUER.endswith(".invalid")


@pytest.mark.parametrize(
    ("spiffe_id", "why"),
    [
        ("spiffe://demo.outrider.local/web", "is not spiffe://<trust domain>/ns/"),
        ("spiffe://demo.outrider.local/ns/demo/sa/frontend/x", "is not spiffe://"),
        ("spiffe://demo.outrider.local/ns/Demo/sa/frontend", "not a DNS-1123 label"),
    ],
)
def test_a_dev_token_only_for_an_identity_the_ca_issues(spiffe_id: str, why: str) -> None:
    with pytest.raises(ValueError, match=why.replace("<", ".").replace(">", ".")):
        workload_names(SpiffeId.parse(spiffe_id))
