"""`outrider ca init` and `outrider ca mint` as a user runs them."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from identity import SpiffeId, check_leaf
from identity.cert import Cert
from tests.support import ca_process, free_port, needs_dev_mode
from tests.support import run_outrider as outrider

CA_FILES = ("root.pem", "root.key", "intermediate.pem", "intermediate.key", "bundle.pem")


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    result = outrider("ca", "init", "--trust-domain", "example.org", "--dir", tmp_path / "ca")
    assert result.returncode == 0, result.stderr
    return tmp_path / "ca"


def openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True)


def test_init_writes_a_p256_hierarchy_without_name_constraints(ca_dir: Path):
    for name in CA_FILES:
        mode = stat.S_IMODE((ca_dir / name).stat().st_mode)
        assert mode == (0o600 if name.endswith(".key") else 0o644), name
    root = openssl("x509", "-in", ca_dir / "root.pem", "-noout", "-text").stdout
    inter = openssl("x509", "-in", ca_dir / "intermediate.pem", "-noout", "-text").stdout
    assert "ASN1 OID: prime256v1" in root and "ASN1 OID: prime256v1" in inter
    assert "CA:TRUE" in root
    assert "CA:TRUE, pathlen:0" in inter
    assert "Name Constraints" not in inter  # opt-in: --name-constraints
    root_cert = x509.load_pem_x509_certificate((ca_dir / "root.pem").read_bytes())
    inter_cert = x509.load_pem_x509_certificate((ca_dir / "intermediate.pem").read_bytes())
    assert (root_cert.not_valid_after_utc - root_cert.not_valid_before_utc).days == 3650
    assert (inter_cert.not_valid_after_utc - inter_cert.not_valid_before_utc).days == 365


def test_a_new_hierarchy_verifies_for_a_peer_whose_clock_runs_behind(tmp_path: Path):
    """Root and intermediate start a minute before `ca init` made them, as leaves do
    (`issuance.backdate`): a peer 30 s behind the CA still takes the chain at once."""
    made = int(time.time())
    done = outrider("ca", "init", "--trust-domain", "example.org", "--dir", tmp_path)
    assert done.returncode == 0, done.stderr
    behind = str(made - 30)
    for cert in ("root.pem", "intermediate.pem"):
        verified = openssl(
            "verify", "-x509_strict", "-attime", behind, "-CAfile", tmp_path / "root.pem",
            tmp_path / cert,
        )  # fmt: skip
        assert verified.returncode == 0, verified.stderr


def test_init_refuses_to_overwrite_without_force(ca_dir: Path):
    before = {name: (ca_dir / name).read_bytes() for name in CA_FILES}
    again = outrider("ca", "init", "--trust-domain", "example.org", "--dir", ca_dir)
    assert again.returncode == 2
    assert "--force" in again.stderr
    assert {name: (ca_dir / name).read_bytes() for name in CA_FILES} == before

    forced = outrider("ca", "init", "--trust-domain", "example.org", "--dir", ca_dir, "--force")
    assert forced.returncode == 0
    assert (ca_dir / "root.pem").read_bytes() != before["root.pem"]


def test_init_rejects_an_invalid_trust_domain(tmp_path: Path):
    result = outrider("ca", "init", "--trust-domain", "Example.org", "--dir", tmp_path / "ca")
    assert result.returncode == 2
    assert "lowercase" in result.stderr
    assert not (tmp_path / "ca").exists()


def test_mint_writes_a_verifiable_svid(ca_dir: Path, tmp_path: Path):
    out = tmp_path / "svid"
    spiffe_id = "spiffe://example.org/ns/shop/sa/web"
    result = outrider("ca", "mint", "--dir", ca_dir, "--spiffe-id", spiffe_id, "--ttl", "2h")
    assert result.returncode == 2  # --out is required
    result = outrider(
        "ca", "mint", "--dir", ca_dir, "--spiffe-id", spiffe_id, "--ttl", "2h", "--out", out
    )
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE((out / "svid.key").stat().st_mode) == 0o600
    chain = x509.load_pem_x509_certificates((out / "svid.pem").read_bytes())
    assert chain[1] == x509.load_pem_x509_certificate((ca_dir / "intermediate.pem").read_bytes())
    assert check_leaf(Cert.from_der(chain[0].public_bytes(Encoding.DER))) == SpiffeId.parse(
        spiffe_id
    )
    lifetime = chain[0].not_valid_after_utc - chain[0].not_valid_before_utc
    assert lifetime.total_seconds() == 2 * 3600 + 60  # plus the clock-skew backdate
    assert (out / "bundle.pem").read_bytes() == (ca_dir / "bundle.pem").read_bytes()
    (out / "leaf.pem").write_bytes(chain[0].public_bytes(Encoding.PEM))
    verify = openssl(
        "verify", "-x509_strict", "-CAfile", out / "bundle.pem",
        "-untrusted", out / "svid.pem", out / "leaf.pem",
    )  # fmt: skip
    assert verify.returncode == 0, verify.stderr
    key = openssl("pkey", "-in", out / "svid.key", "-pubout").stdout
    cert_key = openssl("x509", "-in", out / "leaf.pem", "-noout", "-pubkey").stdout
    assert key == cert_key


@pytest.mark.parametrize(
    ("spiffe_id", "message"),
    [
        ("spiffe://evil.example/ns/a/sa/b", "not in trust domain"),
        ("spiffe://example.org/ns/../sa/b", "'..'"),
        ("https://example.org/ns/a/sa/b", "spiffe"),
    ],
)
def test_mint_refuses_ids_it_must_not_issue(ca_dir: Path, tmp_path: Path, spiffe_id, message):
    out = tmp_path / "svid"
    result = outrider("ca", "mint", "--dir", ca_dir, "--spiffe-id", spiffe_id, "--out", out)
    assert result.returncode == 2
    assert message in result.stderr
    assert not out.exists()


def test_serve_with_a_bad_config_lists_every_error(tmp_path: Path):
    config = tmp_path / "ca.yaml"
    config.write_text(
        "trust_domain: Bad_Domain\n"
        "signer: {kind: hsm}\n"
        "listen: {grpc: nowhere}\n"
        "issuance: {default_ttl: 2d, max_ttl: soon}\n"
        "authn: {kubernetes: {jwks_url: 'http://insecure'}}\n"
        "colour: blue\n"
    )
    result = outrider("ca", "serve", "--config", config)
    assert result.returncode == 2
    for path in (
        "trust_domain:",
        "signer.kind:",
        "listen.grpc:",
        "issuance.max_ttl:",
        "authn.kubernetes.issuer:",
        "authn.kubernetes.jwks_url:",
        "colour: unknown key",
    ):
        assert path in result.stderr, path


def test_serve_with_a_missing_ca_directory_says_what_to_do(tmp_path: Path):
    config = tmp_path / "ca.yaml"
    config.write_text(
        "signer: {dir: nowhere}\nauthn: {kubernetes: {issuer: https://k8s, jwks_file: jwks.json}}\n"
    )
    result = outrider("ca", "serve", "--config", config)
    assert result.returncode == 2
    assert "outrider ca init" in result.stderr


def test_dev_token_writes_a_private_token_for_a_workload(ca_dir: Path, tmp_path: Path):
    out = tmp_path / "web.token"
    spiffe_id = "spiffe://example.org/ns/shop/sa/web"
    result = outrider(
        "ca", "dev-token", "--dir", ca_dir, "--spiffe-id", spiffe_id, "--ttl", "1d12h",
        "--out", out, "-o", "json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    made = json.loads(result.stdout)
    assert made["spiffe_id"] == spiffe_id and made["token_file"] == str(out)
    lifetime = datetime.fromisoformat(made["not_after"]) - datetime.now(UTC)
    assert timedelta(hours=35) < lifetime <= timedelta(hours=36)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert stat.S_IMODE((ca_dir / "dev-issuer.key").stat().st_mode) == 0o600
    assert out.read_text().count(".") == 2  # a JWS, checked by the CA's verifier in unit tests


def test_dev_token_into_a_missing_directory_says_so(ca_dir: Path, tmp_path: Path):
    out = tmp_path / "nowhere" / "web.token"
    spiffe_id = "spiffe://example.org/ns/shop/sa/web"
    result = outrider("ca", "dev-token", "--dir", ca_dir, "--spiffe-id", spiffe_id, "--out", out)
    assert result.returncode == 2
    assert f"cannot write {out}: No such file or directory" in result.stderr


@pytest.mark.parametrize(
    ("spiffe_id", "message"),
    [
        ("spiffe://evil.example/ns/a/sa/b", "not in trust domain"),
        ("spiffe://example.org/web", "/ns/<namespace>/sa/<service account>"),
    ],
)
def test_dev_token_refuses_ids_the_ca_would_not_issue(
    ca_dir: Path, tmp_path: Path, spiffe_id: str, message: str
):
    out = tmp_path / "x.token"
    result = outrider("ca", "dev-token", "--dir", ca_dir, "--spiffe-id", spiffe_id, "--out", out)
    assert result.returncode == 2
    assert message in result.stderr
    assert not out.exists()


def dev_config(tmp_path: Path, ca_dir: Path) -> Path:
    config = tmp_path / "dev.yaml"
    config.write_text(
        f"signer: {{dir: {ca_dir}}}\nlisten: {{grpc: 127.0.0.1:0, http: 127.0.0.1:0}}\n"
    )
    return config


def test_serve_dev_refuses_to_start_in_a_pod_and_says_what_to_do(ca_dir: Path, tmp_path: Path):
    result = outrider(
        "ca",
        "serve",
        "--dev",
        "--config",
        dev_config(tmp_path, ca_dir),
        env={**os.environ, "KUBERNETES_SERVICE_HOST": "10.96.0.1"},
    )
    assert result.returncode == 2
    assert "refusing --dev: this looks like a Kubernetes pod" in result.stderr
    assert "run `outrider ca serve` without --dev and with authn.kubernetes" in result.stderr
    assert not (ca_dir / "dev-issuer.key").exists()  # refused before anything was made


def test_validate_reads_a_dev_config_as_serve_dev_does(ca_dir: Path, tmp_path: Path):
    config = dev_config(tmp_path, ca_dir)
    assert outrider("ca", "validate", "--config", config, "--dev").returncode == 0
    without = outrider("ca", "validate", "--config", config)
    assert without.returncode == 2
    assert "authn.kubernetes: required" in without.stderr and "--dev" in without.stderr


@needs_dev_mode
def test_serve_dev_warns_that_it_is_unsafe(ca_dir: Path, tmp_path: Path):
    with ca_process(dev_config(tmp_path, ca_dir), dev=True) as ca:
        said = "".join(ca.stderr)
    assert "WARNING outrider.ca: DEV MODE: this CA issues an SVID to anyone holding" in said
    assert "(DEV MODE: unsafe outside a laptop)" in said


@needs_dev_mode
def test_serve_on_a_port_in_use_names_the_key_to_change(ca_dir: Path, tmp_path: Path):
    """A second `ca serve` by hand (or anything else on 8443): the error says which
    config key holds the port and what to do, not only `Address already in use`."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        config = tmp_path / "ca.yaml"
        config.write_text(
            f"signer: {{dir: {ca_dir}}}\n"
            f"listen: {{grpc: 127.0.0.1:{port}, http: 127.0.0.1:{free_port()}}}\n"
        )
        result = outrider("ca", "serve", "--dev", "--config", config)
    assert result.returncode == 2
    said = result.stderr.strip().splitlines()[-1]
    assert said.startswith(f"outrider: cannot listen on 127.0.0.1:{port} (listen.grpc):"), said
    assert "another process listens there" in said and "change listen.grpc" in said
