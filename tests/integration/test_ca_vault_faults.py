"""The Vault signer when things go wrong, against a real OpenBao: secrets kept, hangs
bounded, one login per expiry, recovery after a long outage, name-constrained intermediates."""

from __future__ import annotations

import asyncio
import socket
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from ca.config import VaultAuth, VaultSettings
from ca.core.template import LeafRequest
from ca.signers.base import SignerUnavailable
from ca.signers.vault import VaultPerCertificateSigner, vault_signer
from identity import SpiffeId, TrustDomain
from tests.integration.test_ca_vault import approle, sign, vault_ca
from tests.openbao import OUTRIDER_CA_POLICY, OpenBao
from tests.support import ca_client, ca_process, make_csr


async def test_a_malformed_token_file_never_reaches_a_caller(tmp_path: Path) -> None:
    with OpenBao(tmp_path / "bao", kind="dev") as bao:
        bao.setup_pki()
        token_file = tmp_path / "ca" / "vault-token"
        token_file.parent.mkdir()
        token_file.write_text(bao.create_token(OUTRIDER_CA_POLICY, ttl="1h"))
        setup = vault_ca(
            tmp_path / "ca",
            bao,
            "per-certificate",
            {"method": "token", "token_file": "vault-token"},
        )
        with ca_process(setup.config) as ca:
            assert await sign(setup, ca)
            bao.client().auth.token.revoke(token_file.read_text())
            fresh = bao.create_token(OUTRIDER_CA_POLICY, ttl="1h")
            token_file.write_text(f"{fresh}\n# written by vault agent\n")  # one line too many
            with pytest.raises(GRPCError) as refused:
                await sign(setup, ca)
        assert fresh not in str(refused.value.message), refused.value.message
        assert fresh not in "".join(ca.stderr)
        assert fresh not in setup.audit_log.read_text()


async def test_ca_serves_again_after_an_outage_longer_than_the_intermediate(tmp_path: Path) -> None:
    with OpenBao(tmp_path / "bao", kind="persistent") as bao:
        bao.setup_pki()
        setup = vault_ca(
            tmp_path / "ca",
            bao,
            "intermediate",
            approle(tmp_path / "ca", bao),
            intermediate_ttl="8s",
        )
        with ca_process(setup.config) as ca:
            assert await sign(setup, ca)
            await asyncio.to_thread(bao.stop)
            # Signed with the intermediate in force, which cannot be renewed from now on:
            # the outage lasts until it has expired (8 s after the CA got it), and a second.
            intermediate = (await sign(setup, ca))[1]
            left = intermediate.not_valid_after_utc - datetime.now(UTC)
            await asyncio.sleep(left.total_seconds() + 1)
            await asyncio.to_thread(bao.start)
            await asyncio.to_thread(bao.unseal)
            deadline = time.monotonic() + 20
            last: Exception | None = None
            while time.monotonic() < deadline:
                try:
                    assert await sign(setup, ca)
                    break
                except Exception as exc:
                    last = exc
                    await asyncio.sleep(0.25)
            else:
                raise AssertionError(f"CA never recovered: {last!r}\n" + "".join(ca.stderr[-25:]))


TD = TrustDomain("example.org")


def request(name: str = "web") -> LeafRequest:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    now = datetime.now(UTC)
    spiffe_id = SpiffeId.for_workload(TD, "demo", name)
    return LeafRequest(
        spiffe_id, key.public_key(), now - timedelta(seconds=60), now + timedelta(hours=1), 1, csr
    )


async def test_a_hung_vault_does_not_starve_the_default_executor(tmp_path: Path) -> None:
    hung = socket.create_server(("127.0.0.1", 0), backlog=200)  # accepts, never answers
    try:
        token = tmp_path / "token"
        token.write_text("s.whatever")
        settings = VaultSettings(
            address=f"http://127.0.0.1:{hung.getsockname()[1]}",
            auth=VaultAuth(method="token", token_file=token),
            mode="per-certificate",
            timeout=timedelta(seconds=2),
        )
        signer = vault_signer(settings, TD, lambda: datetime.now(UTC))
        assert isinstance(signer, VaultPerCertificateSigner)
        signs = [asyncio.create_task(signer.sign_leaf(request())) for _ in range(30)]
        await asyncio.sleep(0.2)
        started = time.monotonic()
        await asyncio.to_thread(lambda: None)  # e.g. FileJwks reloading a changed JWKS
        other_work = time.monotonic() - started
        t0 = time.monotonic()
        results = await asyncio.gather(*signs, return_exceptions=True)
        slowest = time.monotonic() - t0
        assert all(isinstance(r, SignerUnavailable) for r in results), results
        assert other_work < 1.0, f"unrelated to_thread work waited {other_work:.1f}s behind Vault"
        assert slowest < 2 * 2 + 1, f"the last Sign failed after {slowest:.1f}s, not ~timeout"
    finally:
        hung.close()


async def test_concurrent_refusals_log_in_once(tmp_path: Path) -> None:
    with OpenBao(tmp_path / "bao", kind="dev") as bao:
        bao.setup_pki()
        role_id, secret_id = bao.setup_approle(OUTRIDER_CA_POLICY)
        (tmp_path / "secret-id").write_text(secret_id)
        auth = VaultAuth(
            method="approle",
            mount="approle",
            role_id=role_id,
            secret_id_file=tmp_path / "secret-id",
        )
        settings = VaultSettings(address=bao.address, auth=auth, mode="per-certificate")
        signer = vault_signer(settings, TD, lambda: datetime.now(UTC))
        await signer.start()
        root = bao.client()
        root.auth.token.revoke(signer.session._client.token)  # expired, as far as the CA can tell
        before = len(root.list("auth/token/accessors")["data"]["keys"])
        results = await asyncio.gather(
            *(signer.sign_leaf(request()) for _ in range(20)), return_exceptions=True
        )
        after = len(root.list("auth/token/accessors")["data"]["keys"])
        assert all(isinstance(r, tuple) for r in results), results
        assert after - before == 1, f"{after - before} Vault tokens made for one expiry"


@pytest.mark.parametrize("name_constraints", [False, True], ids=["default", "constrained"])
async def test_the_vault_intermediate_has_a_name_constraint_only_when_asked(
    tmp_path: Path, name_constraints: bool
) -> None:
    """Off by default (rustls and cryptography refuse such chains); on, Vault must keep it."""
    with OpenBao(tmp_path / "bao", kind="dev") as bao:
        bao.setup_pki()
        (tmp_path / "token").write_text(bao.root_token)
        auth = VaultAuth(method="token", token_file=tmp_path / "token")
        settings = VaultSettings(address=bao.address, auth=auth, name_constraints=name_constraints)
        signer = vault_signer(settings, TrustDomain("example.org"), lambda: datetime.now(UTC))
        await signer.start()
        found = [e for e in signer.issuer.extensions if e.oid == x509.NameConstraints.oid]
        if not name_constraints:
            assert found == []
            return
        assert found[0].critical
        assert found[0].value == x509.NameConstraints(
            permitted_subtrees=[x509.UniformResourceIdentifier("example.org")],
            excluded_subtrees=None,
        )


async def test_a_csr_the_role_refuses_is_invalid_not_unavailable(tmp_path: Path) -> None:
    """An RSA key passes our CSR rules but not the role's key_type=ec: retrying cannot help."""
    with OpenBao(tmp_path / "bao", kind="dev") as bao:
        bao.setup_pki()
        setup = vault_ca(tmp_path / "ca", bao, "per-certificate", approle(tmp_path / "ca", bao))
        with ca_process(setup.config) as ca:
            async with ca_client(setup, ca) as client:
                with pytest.raises(GRPCError) as refused:
                    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
                    await client.sign(make_csr(key), token=setup.issuer.token("demo", "web"))
    assert refused.value.status is Status.INVALID_ARGUMENT
    assert str(refused.value.message).startswith("vault_rejected:")
