"""ca.yaml: the Vault signer and TokenReview sections."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from ca.config import ConfigError, TokenReviewSettings, VaultAuth, parse

BASE = Path("/etc/outrider")
JWKS = {"kubernetes": {"issuer": "https://k8s", "jwks_file": "jwks.json"}}


def config(signer: dict[str, Any], authn: dict[str, Any] = JWKS, **top: Any) -> dict[str, Any]:
    return {"trust_domain": "example.org", "signer": signer, "authn": authn, **top}


def errors(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(raw, base=BASE)
    return info.value.errors


def vault(**extra: Any) -> dict[str, Any]:
    return {"kind": "vault", "address": "https://vault:8200", "auth": {"role": "ca"}, **extra}


def test_a_vault_signer_gets_its_defaults() -> None:
    settings = parse(config(vault()), base=BASE).vault
    assert settings is not None
    assert (settings.mode, settings.mount, settings.role) == (
        "intermediate",
        "pki",
        "outrider-svid",
    )
    assert settings.intermediate_ttl == timedelta(hours=24)
    assert settings.name_constraints is False  # opt-in: rustls and cryptography refuse them
    assert settings.auth == VaultAuth(method="kubernetes", mount="kubernetes", role="ca")


def test_name_constraints_can_be_asked_for() -> None:
    settings = parse(config(vault(name_constraints=True)), base=BASE).vault
    assert settings is not None and settings.name_constraints is True


def test_approle_reads_its_secret_from_a_file_relative_to_the_config() -> None:
    auth = {"method": "approle", "role_id": "r-1", "secret_id_file": "secret-id"}
    settings = parse(config(vault(auth=auth, mode="per-certificate")), base=BASE).vault
    assert settings is not None and settings.mode == "per-certificate"
    assert settings.auth.secret_id_file == BASE / "secret-id"
    assert settings.auth.mount == "approle"


@pytest.mark.parametrize(
    ("signer", "top", "expected"),
    [
        (vault(address=None), {}, "signer.address: required"),
        (vault(address="vault:8200"), {}, "signer.address: 'vault:8200' is not an http(s):// URL"),
        (vault(mode="sometimes"), {}, "signer.mode: 'sometimes' is not intermediate"),
        (vault(auth={"method": "ldap"}), {}, "signer.auth.method: 'ldap' is not token"),
        (vault(auth={"method": "token"}), {}, "signer.auth.token_file: required with method token"),
        (vault(auth={"method": "approle", "role_id": "r"}), {}, "signer.auth.secret_id_file"),
        (vault(auth={"role": "ca", "token_file": "t"}), {}, "signer.auth.token_file: not used"),
        (vault(dir="ca"), {}, "signer.dir: only for kind: local"),
        ({"kind": "local", "dir": "ca", "mode": "intermediate"}, {}, "signer.mode: only for kind"),
        (vault(), {"trust_domain": None}, "trust_domain: required with signer kind vault"),
        (vault(name_constraints="yes"), {}, "signer.name_constraints: must be true or false"),
        (
            vault(name_constraints=True, mode="per-certificate"),
            {},
            "signer.name_constraints: only for mode: intermediate",
        ),
        ({"kind": "local", "dir": "ca", "name_constraints": True}, {}, "signer.name_constraints"),
    ],
)
def test_vault_mistakes_are_reported(
    signer: dict[str, Any], top: dict[str, Any], expected: str
) -> None:
    raw = config({k: v for k, v in signer.items() if v is not None})
    raw.update(top)
    if raw["trust_domain"] is None:
        del raw["trust_domain"]
    assert any(error.startswith(expected) for error in errors(raw)), errors(raw)


def test_tokenreview_replaces_the_jwks_and_the_issuer() -> None:
    authn = {"kubernetes": {"tokenreview": {"kubeconfig": "kube.yaml", "cache_ttl": "5s"}}}
    k8s = parse(config({"dir": "ca"}, authn), base=BASE).kubernetes
    assert k8s.tokenreview == TokenReviewSettings(BASE / "kube.yaml", timedelta(seconds=5), True)


def test_tokenreview_and_a_jwks_together_are_refused() -> None:
    authn = {"kubernetes": {"issuer": "https://k8s", "jwks_file": "j", "tokenreview": {}}}
    assert "authn.kubernetes.tokenreview: use either tokenreview or a JWKS, not both" in errors(
        config({"dir": "ca"}, authn)
    )
