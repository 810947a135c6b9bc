"""The agent's Workload API and SDS socket, with grpclib as the client: what is handed out,
to whom, and that every rotation and bundle change reaches an open stream."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from h2.errors import ErrorCodes

from agent.adapters import workload_api
from agent.app import Agent
from agent.core.workload import MISSING_HEADER, SECRET_TYPE
from identity import TrustBundle, grpcserving
from identity.cert import Cert
from identity.proto import envoy_discovery_pb2, envoy_tls_pb2, workload_pb2
from identity.proto.envoy_sds_grpc import SecretDiscoveryServiceStub
from identity.proto.workload_grpc import SpiffeWorkloadAPIStub
from tests.certs import foreign_ca
from tests.h2raw import H2Client, Response
from tests.mesh import eventually, local_sign, sample, workload
from tests.support import CaSetup
from tests.workload_api import (
    HEADER,
    CaDownAfter,
    certificates,
    channel,
    discovery_request,
    keys_handed_out,
    leaf_serial,
    rotate,
    secrets_stream,
    svid_stream,
    unread_svid_stream,
    workload_agent,
)

WEB = workload("web")
STEP = 5.0  # seconds: the longest any push may take here


def public_der(key: object) -> bytes:
    return key.public_key().public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


async def test_fetch_x509_svid_hands_out_the_pods_id_with_a_key_that_is_not_the_agents(
    setup: CaSetup,
) -> None:
    async with workload_agent(setup) as (agent, path), svid_stream(path) as stream:
        response = await asyncio.wait_for(stream.recv_message(), STEP)
        (handed,) = response.svids
        assert handed.spiffe_id == str(WEB)
        chain = certificates(handed.x509_svid)
        key = serialization.load_der_private_key(handed.x509_svid_key, None)
        assert public_der(key) == chain[0].public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        own = agent.identity.svid
        assert own is not None
        assert public_der(key) != own.key.spki  # the agent's own key never leaves
        assert chain[0].serial_number != own.leaf.serial
        roots = TrustBundle.from_der(WEB.trust_domain, x509_ders(handed.bundle))
        assert roots == own.bundle
        assert keys_handed_out(agent, "workload") == 1


def x509_ders(concatenated: bytes) -> list[bytes]:
    return [c.public_bytes(serialization.Encoding.DER) for c in certificates(concatenated)]


async def test_a_rotation_reaches_an_open_stream_with_a_new_key(
    setup: CaSetup, watchdog: None
) -> None:
    async with workload_agent(setup) as (agent, path), svid_stream(path) as stream:
        first = (await asyncio.wait_for(stream.recv_message(), STEP)).svids[0]
        rotate(agent)
        started = time.perf_counter()
        second = (await asyncio.wait_for(stream.recv_message(), STEP)).svids[0]
        latency = time.perf_counter() - started
        assert leaf_serial(second.x509_svid) != leaf_serial(first.x509_svid)
        assert second.x509_svid_key != first.x509_svid_key
        print(f"workload API: rotation to delivery {latency * 1000:.1f} ms")
        assert keys_handed_out(agent, "workload") == 2


async def test_while_the_ca_cannot_mint_the_last_svid_stays_and_the_next_one_follows(
    setup: CaSetup, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    signed = local_sign(setup)
    plan: list[bool] = []  # the next calls' fates: True fails; empty: all succeed

    async def sign(*args: Any) -> Any:
        if plan and plan.pop(0):
            raise GRPCError(Status.UNAVAILABLE, "the CA is restarting")
        return await signed(*args)

    backoff = {"initial": "20ms", "max": "40ms"}
    async with workload_agent(setup, sign=sign, ca_backoff=backoff) as (agent, path):
        async with svid_stream(path) as stream:
            first = (await asyncio.wait_for(stream.recv_message(), STEP)).svids[0]
            plan[:] = [False] + [True] * 10_000  # the agent's renewal goes; the mints fail
            old = rotate(agent)
            assert await eventually(lambda: "cannot mint the SVID to hand out" in caplog.text)
            assert agent.identity.svid is not None and agent.identity.svid.serial != old
            # New roots go out meanwhile, with the last SVID.
            install_extra_root(agent, tmp_path)
            rebundled = (await asyncio.wait_for(stream.recv_message(), STEP)).svids[0]
            assert rebundled.x509_svid == first.x509_svid
            assert len(x509_ders(rebundled.bundle)) == len(x509_ders(first.bundle)) + 1
            plan.clear()  # the CA is back
            second = (await asyncio.wait_for(stream.recv_message(), STEP)).svids[0]
        assert leaf_serial(second.x509_svid) != leaf_serial(first.x509_svid)
        assert second.bundle == rebundled.bundle


def install_extra_root(agent: Agent, directory: Path) -> None:
    """A second root of the trust domain, in the agent's bundle (as BundleSync would)."""
    own = agent.identity.svid
    assert own is not None
    foreign_ca(directory, own.bundle.trust_domain)
    (extra,) = Cert.all_from_pem((directory / "root.pem").read_bytes())
    agent.identity.install_bundle(TrustBundle(own.bundle.trust_domain, (*own.bundle.roots, extra)))


async def test_a_bundle_change_reaches_an_open_stream_with_the_same_svid(
    setup: CaSetup, tmp_path: Path
) -> None:
    async with workload_agent(setup) as (agent, path), svid_stream(path) as stream:
        first = (await asyncio.wait_for(stream.recv_message(), STEP)).svids[0]
        install_extra_root(agent, tmp_path)
        second = (await asyncio.wait_for(stream.recv_message(), STEP)).svids[0]
        assert second.x509_svid == first.x509_svid
        assert len(x509_ders(second.bundle)) == len(x509_ders(first.bundle)) + 1


async def test_a_call_without_the_security_header_is_refused_invalid_argument(
    setup: CaSetup, caplog: pytest.LogCaptureFixture
) -> None:
    async with workload_agent(setup) as (agent, path):
        for metadata in ({}, {"workload.spiffe.io": "false"}):
            with pytest.raises(GRPCError) as refused:
                async with svid_stream(path, metadata) as stream:
                    await asyncio.wait_for(stream.recv_message(), STEP)
            assert refused.value.status == Status.INVALID_ARGUMENT
            assert refused.value.message == MISSING_HEADER
        assert keys_handed_out(agent, "workload") == 0
        labels = {"api": "workload", "reason": "missing_header"}
        assert sample(agent, "outrider_workload_api_refusals_total", **labels) == 2
        assert caplog.text.count("refused a workload call") == 1  # counted each, said once


async def test_a_caller_whose_uid_is_not_listed_is_refused_permission_denied(
    setup: CaSetup,
) -> None:
    async with workload_agent(setup, uids=[os.getuid() + 1]) as (agent, path):
        with pytest.raises(GRPCError) as refused:
            async with svid_stream(path) as stream:
                await asyncio.wait_for(stream.recv_message(), STEP)
        assert refused.value.status == Status.PERMISSION_DENIED
        assert f"uid {os.getuid()}" in str(refused.value.message)
        assert keys_handed_out(agent, "workload") == 0
        labels = {"api": "workload", "reason": "uid"}
        assert sample(agent, "outrider_workload_api_refusals_total", **labels) == 1
    async with workload_agent(setup, uids=[os.getuid()]) as (_, path), svid_stream(path) as stream:
        assert (await asyncio.wait_for(stream.recv_message(), STEP)).svids


def test_a_uid_above_2_to_the_31_is_read_as_the_kernel_gives_it() -> None:
    """uid_t is unsigned: workload_api.uids takes up to 4294967294, and a caller with such
    a UID (user namespaces map pods' users high) must be read as that, not as negative."""
    from types import SimpleNamespace

    from agent.adapters.workload_api import peer_credentials

    high = 3_000_000_000
    directory = Path(tempfile.mkdtemp(prefix="wl-"))  # pytest's tmp_path: not for other UIDs
    directory.chmod(0o777)
    path = directory / "socket"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    path.chmod(0o777)
    server.listen(1)
    server.settimeout(STEP)
    code = "import os, socket, sys; os.setgid({0}); os.setuid({0})"
    code += "; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.recv(1)"
    caller = subprocess.Popen([sys.executable, "-c", code.format(high), str(path)])
    try:
        conn, _ = server.accept()
        with conn:
            transport = SimpleNamespace(get_extra_info=lambda name: conn)
            stream = SimpleNamespace(peer=SimpleNamespace(_transport=transport))
            credentials = peer_credentials(stream)  # type: ignore[arg-type]
        assert credentials is not None
        assert (credentials.uid, credentials.gid) == (high, high)
    finally:
        server.close()
        caller.wait(STEP)
        shutil.rmtree(directory, ignore_errors=True)


async def test_fetch_x509_bundles_names_the_trust_domain(setup: CaSetup) -> None:
    async with workload_agent(setup) as (agent, path), channel(path) as chan:
        stub = SpiffeWorkloadAPIStub(chan)
        async with stub.FetchX509Bundles.open(metadata=HEADER) as stream:
            await stream.send_message(workload_pb2.X509BundlesRequest(), end=True)
            response = await asyncio.wait_for(stream.recv_message(), STEP)
            await stream.cancel()
        assert list(response.bundles) == [f"spiffe://{WEB.trust_domain}"]
        assert keys_handed_out(agent, "workload") == 0


async def test_the_jwt_calls_are_not_served(setup: CaSetup) -> None:
    """grpcio, the transport of py-spiffe and of go-spiffe's peers, sees UNIMPLEMENTED."""
    async with workload_agent(setup) as (_, path):
        async with grpc.aio.insecure_channel(f"unix:{path}") as chan:
            call = chan.unary_unary("/SpiffeWorkloadAPI/FetchJWTSVID")
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call(b"", metadata=tuple(HEADER.items()), timeout=STEP)
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED


def secret(response: envoy_discovery_pb2.DiscoveryResponse, index: int) -> envoy_tls_pb2.Secret:
    any_ = response.resources[index]
    assert any_.type_url == SECRET_TYPE
    return envoy_tls_pb2.Secret.FromString(any_.value)


async def test_sds_serves_the_svid_and_the_bundle_and_pushes_a_rotation(setup: CaSetup) -> None:
    async with workload_agent(setup) as (agent, path), secrets_stream(path) as stream:
        await stream.send_message(discovery_request("default", "ROOTCA"))
        first = await asyncio.wait_for(stream.recv_message(), STEP)
        assert first.type_url == SECRET_TYPE
        svid, roots = secret(first, 0), secret(first, 1)
        assert (svid.name, roots.name) == ("default", "ROOTCA")
        chain = x509.load_pem_x509_certificates(svid.tls_certificate.certificate_chain.inline_bytes)
        assert chain[0].serial_number != agent.identity.svid.leaf.serial  # type: ignore[union-attr]
        assert (
            roots.validation_context.trusted_ca.inline_bytes == agent.identity.svid.bundle.to_pem()
        )  # type: ignore[union-attr]
        # The ACK asks for nothing new: no answer to it.
        await stream.send_message(
            discovery_request("default", "ROOTCA", version=first.version_info, nonce=first.nonce)
        )
        rotate(agent)
        started = time.perf_counter()
        second = await asyncio.wait_for(stream.recv_message(), STEP)
        latency = time.perf_counter() - started
        print(f"SDS: rotation to delivery {latency * 1000:.1f} ms")
        assert second.version_info != first.version_info
        new_chain = secret(second, 0).tls_certificate.certificate_chain.inline_bytes
        assert x509.load_pem_x509_certificates(new_chain)[0].serial_number != chain[0].serial_number
        assert keys_handed_out(agent, "sds") == 2


async def test_sds_pushes_a_bundle_change_to_the_validation_context_and_a_nack_changes_nothing(
    setup: CaSetup, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A root added, then removed: Envoy's validation context follows each, with the same
    SVID; a NACK is logged and answered with nothing (the next change still comes)."""
    async with workload_agent(setup) as (agent, path), secrets_stream(path) as stream:
        await stream.send_message(discovery_request("ROOTCA"))
        first = await asyncio.wait_for(stream.recv_message(), STEP)
        own = agent.identity.svid
        assert own is not None
        install_extra_root(agent, tmp_path)
        added = await asyncio.wait_for(stream.recv_message(), STEP)
        trusted = secret(added, 0).validation_context.trusted_ca.inline_bytes
        assert len(x509.load_pem_x509_certificates(trusted)) == len(own.bundle.roots) + 1
        assert added.version_info != first.version_info and added.nonce != first.nonce
        nack = envoy_discovery_pb2.DiscoveryRequest(
            resource_names=["ROOTCA"], version_info=first.version_info, response_nonce=added.nonce
        )
        nack.error_detail.message = "bad roots"
        await stream.send_message(nack)
        assert await eventually(lambda: "refused version" in caplog.text)
        agent.identity.install_bundle(own.bundle)  # the extra root removed
        removed = await asyncio.wait_for(stream.recv_message(), STEP)
        trusted = secret(removed, 0).validation_context.trusted_ca.inline_bytes
        assert trusted == own.bundle.to_pem()
        assert removed.version_info not in (first.version_info, added.version_info)


async def test_sds_answers_a_new_set_of_names_and_refuses_unknown_ones(
    setup: CaSetup,
) -> None:
    """A name the agent does not serve (a typo, another workload's ID) ends the call with
    INVALID_ARGUMENT naming it, as SPIRE's SDS does: Envoy logs it and retries, where an
    answer without it would leave Envoy waiting with nothing said."""
    async with workload_agent(setup) as (agent, path):
        async with secrets_stream(path) as stream:
            await stream.send_message(discovery_request("ROOTCA"))
            first = await asyncio.wait_for(stream.recv_message(), STEP)
            assert [secret(first, 0).name] == ["ROOTCA"]
            names = (str(WEB), "nonsense")
            # Half-closed, so that grpclib reads the trailers (Envoy does without).
            await stream.send_message(discovery_request(*names, nonce=first.nonce), end=True)
            with pytest.raises(GRPCError) as refused:
                await asyncio.wait_for(stream.recv_message(), STEP)
                await asyncio.wait_for(stream.recv_trailing_metadata(), STEP)
        assert refused.value.status is Status.INVALID_ARGUMENT
        assert "'nonsense'" in str(refused.value.message)
        async with channel(path) as chan:
            sds = SecretDiscoveryServiceStub(chan)
            with pytest.raises(GRPCError) as refused:
                await sds.FetchSecrets(discovery_request("default", str(workload("other"))))
            assert refused.value.status is Status.INVALID_ARGUMENT
        assert (
            sample(
                agent, "outrider_workload_api_refusals_total", api="sds", reason="unknown_secret"
            )
            == 2
        )


async def test_the_socket_is_removed_at_stop(
    setup: CaSetup,
) -> None:
    async with workload_agent(setup) as (_, path):
        pass
    assert not path.exists()


async def test_while_the_first_mint_fails_svid_callers_are_told_unavailable_bundles_go_out(
    setup: CaSetup,
) -> None:
    """The agent has its SVID, the CA then refuses the one to hand out: an SVID caller gets
    UNAVAILABLE at once (the spec: the first answer without delay), not a silent hang; the
    bundle, the agent's alone, goes out all the same (FetchX509Bundles, SDS's ROOTCA)."""
    sign = CaDownAfter(setup, 1)  # the agent's own SVID only

    backoff = {"initial": "1s", "max": "2s"}
    async with workload_agent(setup, sign=sign, ca_backoff=backoff) as (agent, path):
        assert await eventually(lambda: sign.calls > 1, STEP)
        assert agent.identity.svid is not None
        own_bundle = agent.identity.svid.bundle
        async with svid_stream(path) as stream:
            with pytest.raises(GRPCError) as refused:
                await asyncio.wait_for(stream.recv_message(), STEP)
            assert refused.value.status is Status.UNAVAILABLE
            assert "the CA is down" in str(refused.value.message)
        async with channel(path) as chan:
            with pytest.raises(GRPCError) as refused:
                sds = SecretDiscoveryServiceStub(chan)
                await asyncio.wait_for(sds.FetchSecrets(discovery_request("default")), STEP)
            assert refused.value.status is Status.UNAVAILABLE
            roots = await asyncio.wait_for(sds.FetchSecrets(discovery_request("ROOTCA")), STEP)
            (secret,) = [envoy_tls_pb2.Secret.FromString(r.value) for r in roots.resources]
            assert secret.validation_context.trusted_ca.inline_bytes == own_bundle.to_pem()
            bundles = SpiffeWorkloadAPIStub(chan).FetchX509Bundles.open(metadata=HEADER)
            async with bundles as stream:
                await stream.send_message(workload_pb2.X509BundlesRequest(), end=True)
                answer = await asyncio.wait_for(stream.recv_message(), STEP)
                await stream.cancel()
            assert answer.bundles[f"spiffe://{WEB.trust_domain}"] == b"".join(own_bundle.to_der())
        async with secrets_stream(path) as sds_stream:
            await sds_stream.send_message(discovery_request("ROOTCA"))
            pushed = await asyncio.wait_for(sds_stream.recv_message(), STEP)
            assert [r.type_url for r in pushed.resources] == [SECRET_TYPE]
        async with secrets_stream(path) as sds_stream:
            # Half-closed, so that grpclib reads the trailers (Envoy does without).
            await sds_stream.send_message(discovery_request("default"), end=True)
            with pytest.raises(GRPCError) as refused:
                await asyncio.wait_for(sds_stream.recv_message(), STEP)
            assert refused.value.status is Status.UNAVAILABLE


async def test_an_svid_the_new_roots_do_not_verify_is_not_handed_out(
    setup: CaSetup, tmp_path: Path
) -> None:
    """Its root removed from the bundle while the CA signs nothing: the SVID handed out
    verifies against no root the pod trusts, and no peer would accept it. An open stream
    ends UNAVAILABLE rather than pushing it with roots that contradict it; the bundles
    still go out."""
    sign = CaDownAfter(setup, 2)  # the agent's first SVID, then the first one handed out

    backoff = {"initial": "1s", "max": "2s"}
    async with workload_agent(setup, sign=sign, ca_backoff=backoff) as (agent, path):
        own = agent.identity.svid
        assert own is not None
        async with svid_stream(path) as stream:
            await asyncio.wait_for(stream.recv_message(), STEP)
            foreign_ca(tmp_path, own.bundle.trust_domain)
            (other,) = Cert.all_from_pem((tmp_path / "root.pem").read_bytes())
            agent.identity.install_bundle(TrustBundle(own.bundle.trust_domain, (other,)))
            with pytest.raises(GRPCError) as refused:
                response = await asyncio.wait_for(stream.recv_message(), STEP)
                assert response is None, "pushed an SVID its roots do not verify"
                await asyncio.wait_for(stream.recv_trailing_metadata(), STEP)
            assert refused.value.status is Status.UNAVAILABLE
        async with channel(path) as chan:
            stub = SpiffeWorkloadAPIStub(chan)
            async with stub.FetchX509Bundles.open(metadata=HEADER) as bundles:
                await bundles.send_message(workload_pb2.X509BundlesRequest(), end=True)
                answer = await asyncio.wait_for(bundles.recv_message(), STEP)
                await bundles.cancel()
        (roots,) = answer.bundles.values()
        assert x509_ders(roots) == [other.der]


async def test_stopping_leaves_a_socket_that_is_no_longer_its_own(setup: CaSetup) -> None:
    """Its socket unlinked while it ran (an operator, a node cleanup) and another agent's
    bound at the path: stopping, the agent leaves that one alone."""
    from agent.adapters.workload_api import _bind_unix

    async with workload_agent(setup) as (agent, path):
        assert agent.workload_api is not None
        path.unlink()
        other = _bind_unix(path)
        try:
            await agent.workload_api.close()  # as the agent's stop does
            client = socket.socket(socket.AF_UNIX)
            client.connect(str(path))  # still there, still the other one's
            client.close()
        finally:
            other.close()


async def test_a_server_refused_at_start_closes_quietly_and_leaves_the_file(
    setup: CaSetup, tmp_path: Path
) -> None:
    """An agent stopped before it served (refused at start: the path is a file; or a
    SIGTERM before the first SVID) ends with that refusal, not a crash in its cleanup,
    and takes nothing that was not its own."""
    import dataclasses

    async with workload_agent(setup) as (agent, _):
        assert agent.config.workload_api is not None
        path = tmp_path / "socket"
        path.write_text("mine")
        config = dataclasses.replace(agent.config.workload_api, socket=path)
        server = workload_api.WorkloadApiServer(
            config, agent.identity, agent.metrics, agent.config.ca.backoff
        )
        with pytest.raises(OSError, match="not a socket"):
            await server.start()
        await server.close()
        await workload_api.WorkloadApiServer(
            config, agent.identity, agent.metrics, agent.config.ca.backoff
        ).close()  # never started at all
        assert path.read_text() == "mine"


async def test_an_sds_clients_own_text_is_said_a_line_a_while_and_cut(
    setup: CaSetup, caplog: pytest.LogCaptureFixture
) -> None:
    """A NACK's message and the node ID are the caller's: a process of the pod could send
    them as large and as often as it likes, and they would fill the agent's log."""
    big = "x" * 100_000
    async with workload_agent(setup) as (_, path), secrets_stream(path) as stream:
        await stream.send_message(discovery_request("ROOTCA"))
        first = await asyncio.wait_for(stream.recv_message(), STEP)
        for _ in range(50):
            nack = discovery_request("ROOTCA", nonce=first.nonce)
            nack.node.id = big
            nack.error_detail.message = big + "\n\x1b[31mforged line"
            await stream.send_message(nack)
        assert await eventually(lambda: "refused version" in caplog.text)
        await asyncio.sleep(0.2)
    said = [r.getMessage() for r in caplog.records if "refused version" in r.getMessage()]
    assert len(said) == 1
    assert len(said[0]) < 1_000 and "\x1b" not in said[0] and "\n" not in said[0]


#: Another process of the pod: asks for ROOTCA, NACKs the answer, and waits.
NACKING = """
import asyncio, sys
from tests.workload_api import discovery_request, secrets_stream

async def main():
    async with secrets_stream(sys.argv[1]) as stream:
        await stream.send_message(discovery_request("ROOTCA"))
        first = await stream.recv_message()
        nack = discovery_request("ROOTCA", nonce=first.nonce)
        nack.error_detail.message = "noise"
        await stream.send_message(nack)
        print("sent", flush=True)
        await asyncio.sleep(30)

asyncio.run(main())
"""


async def test_one_sds_callers_lines_never_hide_anothers(
    setup: CaSetup, caplog: pytest.LogCaptureFixture
) -> None:
    """Said a line a while per caller process: a process that NACKs steadily does not hide
    Envoy's NACK, nor Envoy's streams asking at start."""
    caplog.set_level(logging.INFO, logger="outrider.agent")
    async with workload_agent(setup) as (_, path):
        other = await asyncio.create_subprocess_exec(
            sys.executable, "-c", NACKING, str(path), stdout=asyncio.subprocess.PIPE
        )
        try:
            assert await asyncio.wait_for(other.stdout.readline(), STEP) == b"sent\n"  # type: ignore[union-attr]
            assert await eventually(lambda: "noise" in caplog.text)
            async with secrets_stream(path) as stream:
                await stream.send_message(discovery_request("ROOTCA", str(WEB)))
                first = await asyncio.wait_for(stream.recv_message(), STEP)
                nack = discovery_request("ROOTCA", str(WEB), nonce=first.nonce)
                nack.error_detail.message = "Failed to load trusted CA certificates"
                await stream.send_message(nack)
                assert await eventually(lambda: "Failed to load trusted CA" in caplog.text)
            assert f"asks for ROOTCA, {WEB}" in caplog.text
        finally:
            other.kill()
            await other.wait()


async def test_a_message_too_large_on_an_open_stream_ends_it_without_a_traceback(
    setup: CaSetup, caplog: pytest.LogCaptureFixture
) -> None:
    """What follows the refused message in the same read is dropped, never read by the
    handler as a message of its own."""
    big = discovery_request("ROOTCA")
    big.node.id = "x" * 300_000
    async with workload_agent(setup) as (_, path):
        for _ in range(4):  # the bytes that follow come in the same read, or not: each time
            with contextlib.suppress(GRPCError, StreamTerminatedError):
                async with secrets_stream(path) as stream:
                    await stream.send_message(discovery_request("ROOTCA"))
                    await asyncio.wait_for(stream.recv_message(), STEP)
                    await stream.send_message(big)
                    await asyncio.wait_for(stream.recv_message(), STEP)
        await asyncio.sleep(0.2)
    assert not [r for r in caplog.records if r.exc_info], caplog.text


async def test_a_message_too_large_on_a_stream_passed_by_a_later_one_is_no_traceback(
    setup: CaSetup, caplog: pytest.LogCaptureFixture
) -> None:
    """HEADERS, a message declared too large, RST_STREAM, and a later stream's HEADERS, in
    one write: h2 no longer knows the first stream when the agent would answer it. Nothing
    to answer; the connection and the later call go on (it cost a traceback a connection,
    which any process of the pod, and anyone at the CA's port, could repeat)."""
    fetch = "/envoy.service.secret.v3.SecretDiscoveryService/FetchSecrets"
    sds = [(k, fetch if k == ":path" else v) for k, v in RAW_HEAD]
    too_large = b"\x00" + (300_000).to_bytes(4, "big") + b"q" * 100

    def passed_by_a_later_stream(path: Path) -> Response:
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(path))
        client = H2Client(sock)
        try:
            first = client.conn.get_next_available_stream_id()
            client.conn.send_headers(first, sds)
            client.conn.send_data(first, too_large)
            client.conn.reset_stream(first, ErrorCodes.CANCEL)
            later = client.conn.get_next_available_stream_id()
            client.conn.send_headers(later, sds)
            ask = discovery_request("ROOTCA").SerializeToString()
            client.conn.send_data(
                later, b"\x00" + len(ask).to_bytes(4, "big") + ask, end_stream=True
            )
            client.responses[later] = Response(later)
            client._flush()  # all in one write
            answer = client.responses[later]
            deadline = time.monotonic() + STEP
            while not (answer.body or answer.ended) and time.monotonic() < deadline:
                client.pump(0.2)
            return answer
        finally:
            client.close()

    async with workload_agent(setup) as (_, path):
        answer = await asyncio.to_thread(passed_by_a_later_stream, path)
    assert answer.body and answer.header(b"grpc-status") in (None, b"0"), answer
    assert not [r for r in caplog.records if r.exc_info], caplog.text


async def test_a_message_too_large_after_the_answer_began_gets_well_formed_trailers(
    setup: CaSetup,
) -> None:
    """An SDS stream has its answer's headers out after its first push: RESOURCE_EXHAUSTED
    then comes as trailers, without the pseudo-headers that would make them malformed
    (a strict client, as h2 here, would drop the whole connection), and the connection's
    other calls go on."""
    stream_path = "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets"
    sds = [(k, stream_path if k == ":path" else v) for k, v in RAW_HEAD]
    ask = discovery_request("ROOTCA").SerializeToString()
    framed = b"\x00" + len(ask).to_bytes(4, "big") + ask
    too_large = b"\x00" + (300_000).to_bytes(4, "big") + b"q" * 100

    def refused_after_an_answer(path: Path) -> tuple[Response, Response, bool]:
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(path))
        client = H2Client(sock)
        try:
            first = client.send(sds, framed, end=False)
            deadline = time.monotonic() + STEP
            while not client.responses[first].body and time.monotonic() < deadline:
                client.pump(0.2)
            client.conn.send_data(first, too_large)
            client._flush()
            while not client.responses[first].trailers and time.monotonic() < deadline:
                client.pump(0.2)
            later = client.send(sds, framed, end=False)
            while not client.responses[later].body and time.monotonic() < deadline:
                client.pump(0.2)
            return client.responses[first], client.responses[later], client.closed
        finally:
            client.close()

    async with workload_agent(setup) as (_, path):
        refused, later, closed = await asyncio.to_thread(refused_after_an_answer, path)
    assert refused.header(b"grpc-status") == str(Status.RESOURCE_EXHAUSTED.value).encode()
    assert all(not name.startswith(b":") for name, _ in refused.trailers), refused
    assert later.body and not closed


def _refusals_it_cannot_send(kind: str) -> bytes:
    """One write the server refuses something in, where h2 then forbids the answer: a
    GOAWAY after it, or a stream limit of 0 for the server (legal for a client)."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    head = [(k, v) for k, v in RAW_HEAD]
    too_large = b"\x00" + (300_000).to_bytes(4, "big") + b"q" * 100
    limit = workload_api.LIMITS.max_concurrent_streams
    if kind.startswith("no streams"):
        conn.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 0})
    if kind.endswith("too large"):
        conn.send_headers(1, head)
        conn.send_data(1, too_large)
    else:  # one call past the limit
        for index in range(limit + 1):
            conn.send_headers(1 + 2 * index, head)
    if kind.startswith("no streams"):
        last = max(conn.streams)
        conn.reset_stream(last)
        conn.send_headers(last + 2, head)
    else:
        conn.close_connection()
    return conn.data_to_send()


@pytest.mark.parametrize(
    "kind",
    ["goaway, too large", "goaway, too many", "no streams, too large", "no streams, too many"],
)
async def test_a_refusal_h2_forbids_to_send_is_no_traceback(
    setup: CaSetup, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    """The CA's port, the control plane and this socket share the server: a caller that
    makes every refusal unsendable must not cost a traceback a connection."""

    def send(path: Path) -> None:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(path))
            sock.sendall(_refusals_it_cannot_send(kind))
            sock.settimeout(1)
            with contextlib.suppress(OSError):
                while sock.recv(65536):
                    pass

    async with workload_agent(setup) as (_, path):
        await asyncio.to_thread(send, path)
        await asyncio.sleep(0.2)
    assert not [r for r in caplog.records if r.exc_info], caplog.text


async def test_calls_started_and_reset_as_fast_as_a_caller_writes_cost_no_log(
    setup: CaSetup, caplog: pytest.LogCaptureFixture
) -> None:
    """grpclib said a line at INFO for each call reset after its handler started: a caller
    resetting calls in a loop (at the CA's port, without credentials) filled the log."""
    caplog.set_level(logging.INFO)

    def start_and_reset(path: Path) -> None:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(path))
            client = H2Client(sock)
            for _ in range(20):
                ids = [client.send(RAW_HEAD, b"\x00\x00\x00\x00\x00") for _ in range(8)]
                client.pump(0.05)  # their handlers start
                for stream_id in ids:
                    client.conn.reset_stream(stream_id, ErrorCodes.CANCEL)
                client._flush()
                client.pump(0.01)

    async with workload_agent(setup) as (_, path):
        await asyncio.to_thread(start_and_reset, path)
        await asyncio.sleep(0.2)
    lines = [r for r in caplog.records if r.name.startswith("grpclib")]
    assert not lines, [r.getMessage() for r in lines][:3]


def test_a_stale_socket_is_replaced_and_any_other_file_is_not(tmp_path: Path) -> None:
    from agent.adapters.workload_api import _bind_unix

    path = tmp_path / "socket"
    path.write_text("mine")
    with pytest.raises(OSError, match="not a socket"):
        _bind_unix(path)
    assert path.read_text() == "mine"
    path.unlink()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    sock = _bind_unix(path)
    sock.close()
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o666)


def test_a_socket_another_agent_still_serves_is_not_taken_from_it(tmp_path: Path) -> None:
    """Two agents on one path (a restart overlapping the old one, a copied config): the
    second must not unlink the first's live socket, which would cut off its callers."""
    from agent.adapters.workload_api import _bind_unix

    path = tmp_path / "socket"
    live = _bind_unix(path)
    try:
        with pytest.raises(OSError, match="in use"):
            _bind_unix(path)
        client = socket.socket(socket.AF_UNIX)
        client.connect(str(path))  # still the first one's
        client.close()
    finally:
        live.close()


__all__ = ["Agent"]


async def test_an_expired_svid_is_never_handed_out_the_call_is_unavailable(
    setup: CaSetup,
) -> None:
    """The CA refuses every mint after the first until the SVID handed out has expired: an
    open stream is told UNAVAILABLE (the spec's retriable status) at the expiry, and a new
    caller gets it at once, not a dead SVID."""
    ttl = 2.0
    # The agent's first SVID, then the first one handed out.
    sign = CaDownAfter(setup, 2, ttl=timedelta(seconds=ttl))

    backoff = {"initial": "200ms", "max": "400ms"}
    async with workload_agent(setup, sign=sign, ca_backoff=backoff) as (agent, path):
        handed = agent.workload_api.handed_out  # type: ignore[union-attr]
        assert await eventually(lambda: handed.svid is not None, STEP)
        assert handed.svid is not None
        async with svid_stream(path) as open_before, secrets_stream(path) as sds_before:
            await asyncio.wait_for(open_before.recv_message(), STEP)
            await sds_before.send_message(discovery_request("default"))
            await asyncio.wait_for(sds_before.recv_message(), STEP)
            # An open stream is told at the expiry itself, not at the next change: no sleep.
            with pytest.raises(GRPCError) as refused:
                assert await asyncio.wait_for(open_before.recv_message(), ttl + STEP) is None
                await asyncio.wait_for(open_before.recv_trailing_metadata(), STEP)
            assert refused.value.status is Status.UNAVAILABLE

            def sds_told() -> bool:
                labels = {"api": "sds", "reason": "no_valid_svid"}
                return sample(agent, "outrider_workload_api_refusals_total", **labels) == 1

            assert await eventually(sds_told, STEP)  # Envoy's stream too, at the expiry
        assert agent.identity.now() >= handed.svid.not_after
        async with svid_stream(path) as stream:
            with pytest.raises(GRPCError) as refused:
                response = await asyncio.wait_for(stream.recv_message(), STEP)
                leaf = certificates(response.svids[0].x509_svid)[0]
                raise AssertionError(
                    f"handed out an SVID that expired at {leaf.not_valid_after_utc}"
                )
            assert refused.value.status is Status.UNAVAILABLE
        async with channel(path) as chan:
            with pytest.raises(GRPCError) as refused:
                await SecretDiscoveryServiceStub(chan).FetchSecrets(discovery_request("default"))
            assert refused.value.status is Status.UNAVAILABLE
            # The bundle alone is still served: it does not expire with the SVID.
            answer = await SecretDiscoveryServiceStub(chan).FetchSecrets(
                discovery_request("ROOTCA")
            )
            assert len(answer.resources) == 1


async def test_a_stream_is_told_at_the_expiry_when_the_loop_clock_runs_ahead(
    setup: CaSetup,
) -> None:
    """The loop's timer may fire a hair before the wall clock reaches the NotAfter: the
    stream is still told UNAVAILABLE once it is reached, not left open on a dead SVID."""
    async with workload_agent(setup, sign=CaDownAfter(setup, 2)) as (agent, path):
        handed = agent.workload_api.handed_out  # type: ignore[union-attr]
        assert await eventually(lambda: handed.svid is not None, STEP)
        assert handed.svid is not None
        async with svid_stream(path) as stream:
            await asyncio.wait_for(stream.recv_message(), STEP)
            # A wall clock one tick short of the NotAfter, a tick further at each reading.
            readings = itertools.count()
            short = handed.svid.not_after - timedelta(milliseconds=1)
            agent.identity.now = lambda: short + next(readings) * timedelta(milliseconds=1)
            handed._expired()  # the timer, as the loop fires it early
            with pytest.raises(GRPCError) as refused:
                assert await asyncio.wait_for(stream.recv_message(), STEP) is None
                await asyncio.wait_for(stream.recv_trailing_metadata(), STEP)
            assert refused.value.status is Status.UNAVAILABLE


async def test_a_push_a_caller_never_takes_frees_its_connection(
    setup: CaSetup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller whose stream window is too small for a push and who never reads holds its
    connection only for PUSH_TIMEOUT: then it is closed, and counted."""
    monkeypatch.setattr(workload_api, "PUSH_TIMEOUT", 0.3)
    async with workload_agent(setup) as (agent, path):
        async with unread_svid_stream(path) as connection:

            async def closed() -> bytes:
                while chunk := await connection.read(65_536):
                    del chunk
                return b""

            await asyncio.wait_for(closed(), STEP)  # EOF: the agent closed it
        refused = sample(
            agent, "outrider_workload_api_refusals_total", api="workload", reason="push_timeout"
        )
        assert refused == 1
        async with svid_stream(path) as other:  # the socket still serves everyone else
            assert (await asyncio.wait_for(other.recv_message(), STEP)).svids


async def test_one_uid_cannot_take_every_connection_slot(
    setup: CaSetup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Streams held open by one UID on more than MAX_CONNECTIONS_PER_UID connections: the
    next connection's call is refused RESOURCE_EXHAUSTED; one that closes frees its slot."""
    monkeypatch.setattr(workload_api, "MAX_CONNECTIONS_PER_UID", 2)
    async with workload_agent(setup) as (agent, path), svid_stream(path) as first:
        await asyncio.wait_for(first.recv_message(), STEP)
        async with svid_stream(path) as second:
            await asyncio.wait_for(second.recv_message(), STEP)
            async with svid_stream(path) as third:
                with pytest.raises(GRPCError) as refused:
                    await asyncio.wait_for(third.recv_message(), STEP)
                assert refused.value.status is Status.RESOURCE_EXHAUSTED
        labels = {"api": "workload", "reason": "uid_connections"}
        assert sample(agent, "outrider_workload_api_refusals_total", **labels) == 1

        async def served() -> bool:
            async with svid_stream(path) as after_a_close:
                try:
                    return bool((await asyncio.wait_for(after_a_close.recv_message(), STEP)).svids)
                except GRPCError as exc:  # the agent may not have seen the close yet
                    assert exc.status is Status.RESOURCE_EXHAUSTED
                    return False

        for _ in range(100):  # `second`'s connection is closed: its slot comes free
            if await served():
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("a closed connection's slot never came free")


def grpcio_svid_call(chan: grpc.aio.Channel) -> Any:
    """FetchX509SVID as grpcio (go-spiffe's and py-spiffe's kind of client) opens it."""
    fetch = chan.unary_stream(
        "/SpiffeWorkloadAPI/FetchX509SVID",
        request_serializer=workload_pb2.X509SVIDRequest.SerializeToString,
        response_deserializer=workload_pb2.X509SVIDResponse.FromString,
    )
    return fetch(workload_pb2.X509SVIDRequest(), metadata=tuple(HEADER.items()))


async def test_calls_past_a_connections_stream_limit_are_refused_not_left_queued(
    setup: CaSetup,
) -> None:
    """20 sources in one process share one grpcio connection: 16 streams are served, the
    rest answered RESOURCE_EXHAUSTED at once. Told the limit itself (16), grpcio queued
    them unseen and py-spiffe's sources timed out waiting for their first SVID."""
    async with (
        workload_agent(setup) as (agent, path),
        grpc.aio.insecure_channel(f"unix:{path}") as chan,
    ):
        calls = [grpcio_svid_call(chan) for _ in range(20)]

        async def first(call: Any) -> str:
            try:
                response = await asyncio.wait_for(call.read(), STEP)
                return "served" if response.svids else "empty"
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                assert "at most 16 calls at once on one connection" in (exc.details() or "")
                return "refused"

        try:
            seen = await asyncio.gather(*(first(call) for call in calls))
        finally:
            for call in calls:
                call.cancel()
        labels = {"api": "connection", "reason": "streams"}
        counted = sample(agent, "outrider_workload_api_refusals_total", **labels)
    assert sorted(seen) == ["refused"] * 4 + ["served"] * 16
    assert counted == 4


async def test_at_the_limit_a_cancelled_call_costs_no_other_and_frees_its_slot(
    setup: CaSetup,
) -> None:
    """16 streams open on one connection: a 17th call cancelled at once (a source closed as
    soon as it was opened) is no reason to drop the 16; and one of them cancelled leaves
    its slot to the next call, though grpclib keeps the stream until its handler ends."""
    async with (
        workload_agent(setup) as (_, path),
        grpc.aio.insecure_channel(f"unix:{path}") as chan,
    ):

        def call() -> Any:
            return grpcio_svid_call(chan)

        open_calls = [call() for _ in range(16)]
        try:
            for each in open_calls:
                assert (await asyncio.wait_for(each.read(), STEP)).svids
            for _ in range(10):
                cancelled = call()
                await asyncio.sleep(0)  # its HEADERS out, then its RST_STREAM
                cancelled.cancel()
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)
            assert not any(each.done() for each in open_calls), "the connection was dropped"
            open_calls.pop().cancel()
            replacement = call()
            open_calls.append(replacement)
            assert (await asyncio.wait_for(replacement.read(), STEP)).svids
        finally:
            for each in open_calls:
                each.cancel()


async def test_a_call_that_replaces_a_reset_one_at_the_limit_is_served(setup: CaSetup) -> None:
    """16 streams open; one reset and a new call in the same write (a client replacing a
    source at the limit): the reset stream's slot is free, though grpclib keeps the
    stream until its handler ends, so the new call is served, not RESOURCE_EXHAUSTED."""
    head = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID"),
        (b":authority", b"localhost"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
        *((k.encode(), v.encode()) for k, v in HEADER.items()),
    ]
    request = b"\x00\x00\x00\x00\x00"  # an empty X509SVIDRequest, length-prefixed

    def replace_one(path: Path) -> Response:
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(path))
        client = H2Client(sock)
        try:
            ids = [client.send(head, request) for _ in range(16)]
            deadline = time.monotonic() + STEP
            while not all(client.responses[i].body for i in ids) and time.monotonic() < deadline:
                client.pump(0.2)
            client.conn.reset_stream(ids[0], ErrorCodes.CANCEL)
            new = client.conn.get_next_available_stream_id()
            client.conn.send_headers(new, head)
            client.conn.send_data(new, request, end_stream=True)
            client.responses[new] = Response(new)
            client._flush()  # the reset and the new call in one write
            answer = client.responses[new]
            while not (answer.body or answer.ended) and time.monotonic() < deadline + STEP:
                client.pump(0.2)
            return answer
        finally:
            client.close()

    async with workload_agent(setup) as (_, path):
        answer = await asyncio.to_thread(replace_one, path)
    assert answer.header(b"grpc-status") is None, answer
    assert answer.body, answer


RAW_HEAD = [
    (":method", "POST"),
    (":scheme", "http"),
    (":path", "/SpiffeWorkloadAPI/FetchX509SVID"),
    (":authority", "localhost"),
    ("content-type", "application/grpc"),
    ("te", "trailers"),
    *HEADER.items(),
]
EMPTY_REQUEST = b"\x00\x00\x00\x00\x00"  # an X509SVIDRequest, length-prefixed


@asynccontextmanager
async def raw_connection(
    path: Path,
) -> AsyncIterator[tuple[h2.connection.H2Connection, asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    )
    conn.initiate_connection()
    writer.write(conn.data_to_send())
    try:
        yield conn, reader, writer
    finally:
        writer.close()


async def served(
    conn: h2.connection.H2Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> bool:
    """A FetchX509SVID call on this connection gets its first SVID."""
    stream_id = conn.get_next_available_stream_id()
    conn.send_headers(stream_id, RAW_HEAD)
    conn.send_data(stream_id, EMPTY_REQUEST, end_stream=True)
    writer.write(conn.data_to_send())
    while True:
        data = await asyncio.wait_for(reader.read(65536), STEP)
        if not data:
            return False
        events = conn.receive_data(data)
        writer.write(conn.data_to_send())
        if any(isinstance(e, h2.events.DataReceived) and e.stream_id == stream_id for e in events):
            return True


def held() -> list[tuple[int, int]]:
    return [
        (len(o.streams), len(o._reset))
        for o in gc.get_objects()
        if isinstance(o, grpcserving._BoundedEvents)
    ]


async def test_streams_reset_as_they_open_are_let_go_and_a_flood_of_them_is_cut_off(
    setup: CaSetup,
) -> None:
    """HEADERS and RST_STREAM together: grpclib cancels each handler before it starts,
    and such a handler never releases its stream. Paced, 2,000 of them leave nothing held
    and the connection serves a call; 2,000 in one write (a rapid reset flood: none can be
    let go before the next read) close the connection, and the next one is served."""
    async with workload_agent(setup) as (_, path):
        async with raw_connection(path) as (conn, reader, writer):
            for _ in range(200):
                for _ in range(10):
                    stream_id = conn.get_next_available_stream_id()
                    conn.send_headers(stream_id, RAW_HEAD)
                    conn.reset_stream(stream_id, ErrorCodes.CANCEL)
                writer.write(conn.data_to_send())
                await asyncio.sleep(0.002)
            await asyncio.sleep(0.1)
            paced = held()
            assert await served(conn, reader, writer)
        async with raw_connection(path) as (conn, reader, writer):
            for _ in range(2000):
                stream_id = conn.get_next_available_stream_id()
                conn.send_headers(stream_id, RAW_HEAD)
                conn.reset_stream(stream_id, ErrorCodes.CANCEL)
            writer.write(conn.data_to_send())
            closed = await asyncio.wait_for(reader.read(), STEP)  # to the end: the EOF
            assert closed is not None
        async with raw_connection(path) as (conn, reader, writer):
            assert await served(conn, reader, writer)
    assert paced and all(streams <= 1 and reset == 0 for streams, reset in paced), paced


async def test_a_message_too_large_and_its_reset_in_one_read_cost_no_other_call(
    setup: CaSetup,
) -> None:
    """HEADERS, a DATA declaring 10 MB and RST_STREAM in one write, beside a served call:
    the too-large call is refused (and cancelled) before its reset is read, which then
    finds nothing to cancel; the connection and its other call go on."""
    async with workload_agent(setup) as (_, path), raw_connection(path) as (conn, reader, writer):
        assert await served(conn, reader, writer)
        stream_id = conn.get_next_available_stream_id()
        conn.send_headers(stream_id, RAW_HEAD)
        conn.send_data(stream_id, b"\x00" + (10_000_000).to_bytes(4, "big") + b"x" * 100)
        conn.reset_stream(stream_id, ErrorCodes.CANCEL)
        writer.write(conn.data_to_send())
        await asyncio.sleep(0.2)
        assert await served(conn, reader, writer)
