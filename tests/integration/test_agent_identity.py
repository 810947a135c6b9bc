"""The identity manager against fake and real signing: what it accepts, retries and keeps."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import ssl
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError

from agent import config as agent_config
from agent.adapters.bundle_sync import BundleSync
from agent.adapters.metrics import AgentMetrics
from agent.adapters.rotator import IdentityManager, RenewalFailed, SignFn
from agent.adapters.tls import Contexts
from agent.app import utcnow
from agent.core.svid import Svid
from identity.cert import Cert
from identity.proto import ca_pb2
from outrider import cli
from tests import certs
from tests.clock import FakeClock
from tests.mesh import agent_yaml, local_sign, workload
from tests.support import CaSetup, make_ca_setup


def manager(setup: CaSetup, sign: SignFn, **identity: str) -> IdentityManager:
    raw = agent_yaml(setup.root, "web")
    raw["identity"].update(identity)
    raw["ca"]["backoff"] = {"initial": "100ms", "max": "200ms"}
    config = agent_config.parse(raw, base=setup.root)
    return IdentityManager(
        config, Contexts(), AgentMetrics(), now=utcnow, rng=random.Random(7), sign=sign
    )


class Recorder:
    """Wraps a sign function and remembers which credential each call carried."""

    def __init__(self, sign: SignFn, fail: Callable[[int], Exception | None] = lambda n: None):
        self.sign, self.fail, self.calls = sign, fail, []

    async def __call__(
        self, csr: bytes, trusted: bytes, svid: Svid | None, token: str | None
    ) -> ca_pb2.SignResponse:
        self.calls.append("svid" if svid else f"token:{token}")
        if (error := self.fail(len(self.calls))) is not None:
            raise error
        return await self.sign(csr, trusted, svid, token)


async def test_first_svid_comes_with_the_token_and_renewals_with_the_svid(setup: CaSetup) -> None:
    recorder = Recorder(local_sign(setup))
    identity = manager(setup, recorder)
    identity.install(await identity.renew())
    identity.install(await identity.renew())
    assert recorder.calls == [f"token:{workload('web')}", "svid"]
    assert identity.svid is not None and identity.svid.spiffe_id == workload("web")
    assert identity.contexts.server is not None and identity.contexts.client is not None


async def test_the_token_file_is_read_again_for_every_request(setup: CaSetup) -> None:
    recorder = Recorder(local_sign(setup))
    identity = manager(setup, recorder)
    token = Path(identity.config.identity.token_file)
    await identity.renew()
    token.unlink()  # between two kubelet rotations
    with pytest.raises(RenewalFailed, match="cannot read the token"):
        await identity.renew()
    token.write_text(f"  {workload('web')}\n")
    await identity.renew()
    assert recorder.calls == [f"token:{workload('web')}"] * 2


async def test_a_refused_svid_falls_back_to_the_token(setup: CaSetup) -> None:
    refused = GRPCError(Status.UNAUTHENTICATED, "bad_svid: unknown")
    recorder = Recorder(local_sign(setup), fail=lambda n: refused if n == 2 else None)
    identity = manager(setup, recorder)
    identity.install(await identity.renew())
    await identity.renew()
    assert recorder.calls == [f"token:{workload('web')}", "svid", f"token:{workload('web')}"]


@pytest.mark.parametrize(
    "refusal",
    [
        StreamTerminatedError("Connection lost"),  # TLS 1.3: the alert after the handshake
        ConnectionResetError(104, "reset"),
        ssl.SSLError(1, "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] alert"),
    ],
)
async def test_an_svid_refused_in_the_handshake_falls_back_to_the_token(
    setup: CaSetup, refusal: Exception
) -> None:
    """A CA that no longer trusts the SVID's root refuses it before any gRPC status."""
    recorder = Recorder(local_sign(setup), fail=lambda n: refusal if n == 2 else None)
    identity = manager(setup, recorder)
    identity.install(await identity.renew())
    await identity.renew()
    assert recorder.calls == [f"token:{workload('web')}", "svid", f"token:{workload('web')}"]


async def test_an_svid_renewal_the_ca_resets_without_a_token_to_fall_back_on_is_the_cas_failure(
    setup: CaSetup, tmp_path: Path
) -> None:
    """An agent started from svid_file has no token: a CA that resets the connection is
    asked once, and the failure says so (ca_unavailable), not "cannot read the token"."""
    reset = ConnectionResetError(104, "Connection reset by peer")
    recorder = Recorder(local_sign(setup), fail=lambda n: reset if n == 2 else None)
    identity = manager(setup, recorder)
    identity.install(await identity.renew())
    identity.config.identity.token_file.unlink()
    with pytest.raises(RenewalFailed) as failed:
        await identity.renew()
    assert failed.value.result == "ca_unavailable"
    assert "cannot reach the CA" in str(failed.value) and "token" not in str(failed.value)
    assert recorder.calls == [f"token:{workload('web')}", "svid"]


async def test_a_long_ca_outage_is_logged_once_a_minute_and_its_end_once(
    setup: CaSetup, caplog: pytest.LogCaptureFixture
) -> None:
    """Every failed renewal is counted; the log says the first, then at most a line a
    minute (a CA down for an hour after expiry is retried every second or two), then the
    recovery. /certs' next_renewal is the next retry while failing, never a time past."""
    caplog.set_level(logging.INFO, logger="outrider.agent.identity")
    down = GRPCError(Status.UNAVAILABLE, "down")
    recorder = Recorder(local_sign(setup), fail=lambda n: down if n <= 6 else None)
    identity = manager(setup, recorder)
    task = asyncio.create_task(identity.run())
    try:
        for _ in range(200):  # bounded: the retries run 50-200 ms apart
            await asyncio.sleep(0.05)
            if len(recorder.calls) == 4:
                renewal = identity.next_renewal
                assert renewal is not None and renewal >= utcnow() - timedelta(seconds=1)
            if identity.has_svid.is_set():
                break
    finally:
        task.cancel()
    rotations = identity.metrics.registry.get_sample_value
    assert rotations("outrider_svid_rotations_total", {"result": "ca_unavailable"}) == 6
    said = [r.getMessage() for r in caplog.records if r.name == "outrider.agent.identity"]
    assert sum("SVID renewal failed" in line for line in said) == 1, said
    assert any("SVID renewed after 6 failed attempt(s)" in line for line in said), said


@pytest.mark.parametrize("down", [ConnectionRefusedError(111, "refused"), TimeoutError()])
async def test_a_ca_that_is_down_is_not_asked_twice(setup: CaSetup, down: Exception) -> None:
    recorder = Recorder(local_sign(setup), fail=lambda n: down if n == 2 else None)
    identity = manager(setup, recorder)
    identity.install(await identity.renew())
    with pytest.raises(RenewalFailed):
        await identity.renew()
    assert recorder.calls == [f"token:{workload('web')}", "svid"]


@pytest.mark.parametrize(
    ("error", "result"),
    [
        (GRPCError(Status.UNAVAILABLE, "signer_unavailable: sealed"), "ca_unavailable"),
        (GRPCError(Status.DEADLINE_EXCEEDED, "slow"), "ca_unavailable"),
        (ConnectionRefusedError(111, "refused"), "ca_unavailable"),
        (GRPCError(Status.PERMISSION_DENIED, "identity_mismatch: no"), "refused"),
    ],
)
async def test_ca_failures_are_labelled(setup: CaSetup, error: Exception, result: str) -> None:
    identity = manager(setup, Recorder(local_sign(setup), fail=lambda n: error))
    with pytest.raises(RenewalFailed) as failed:
        await identity.renew()
    assert failed.value.result == result


async def test_an_answer_for_another_workload_is_refused_and_the_svid_kept(setup: CaSetup) -> None:
    good = local_sign(setup)
    identity = manager(setup, good)
    identity.install(await identity.renew())
    held = identity.svid

    async def impostor(csr: bytes, trusted: bytes, svid: Svid | None, token: str | None):  # type: ignore[no-untyped-def]
        return await good(csr, trusted, None, str(workload("someone-else")))

    identity.sign = impostor
    with pytest.raises(RenewalFailed, match="wrong_id") as failed:
        await identity.renew()
    assert failed.value.result == "bad_answer"
    assert identity.svid is held


@pytest.mark.parametrize("with_ours", [False, True], ids=["foreign-only", "foreign-and-ours"])
async def test_an_answer_under_a_root_the_bundle_file_lacks_is_refused_and_trust_kept(
    setup: CaSetup, tmp_path: Path, with_ours: bool
) -> None:
    """A CA's answer never brings a root of its own: an SVID from another root of the same
    trust domain, with a bundle of that root (and ours too, or not), is refused; the SVID
    and the roots in use stay. The bundle file holds our root alone."""
    identity = manager(setup, local_sign(setup))
    BundleSync(identity)  # as the agent wires it: renewals go into service with its roots
    identity.install(await identity.renew())
    held = identity.svid
    assert held is not None
    foreign = local_sign(make_ca_setup(tmp_path / "foreign"))

    async def answer(csr: bytes, trusted: bytes, svid: Svid | None, token: str | None):  # type: ignore[no-untyped-def]
        response = await foreign(csr, trusted, svid, token)
        if with_ours:
            response.trust_bundle.extend(held.bundle.to_der())
        return response

    identity.sign = answer
    with pytest.raises(RenewalFailed) as failed:
        identity.install(await identity.renew())
    assert failed.value.result == "bad_answer"
    if with_ours:
        assert "does not lead to a root trusted now" in str(failed.value)
    else:  # the roots are named, for an operator to compare
        assert "no root is in both" in str(failed.value) and "root CA" in str(failed.value)
    assert identity.svid is held and identity.svid.bundle == held.bundle


@pytest.mark.parametrize("beside_the_root", ["leaf", "key"])
async def test_no_first_svid_is_asked_for_while_the_bundle_file_is_no_trust_bundle(
    setup: CaSetup, tmp_path: Path, beside_the_root: str
) -> None:
    """The first SVID's roots come from the bundle file, which must be a trust bundle: with
    a leaf or a key beside the root, the agent says so and asks the CA for nothing (it would
    sign a certificate per try), rather than start on roots it later cannot follow."""
    extra = certs.valid_svid(setup, workload("web"))
    lax = tmp_path / "bundle.pem"
    lax.write_bytes(
        setup.bundle_pem + (extra.chain_pem if beside_the_root == "leaf" else extra.key_pem)
    )
    recorder = Recorder(local_sign(setup))
    identity = manager(setup, recorder)
    identity.config = dataclasses.replace(
        identity.config, ca=dataclasses.replace(identity.config.ca, bundle_file=lax)
    )
    BundleSync(identity)
    with pytest.raises(RenewalFailed, match=f"{lax} is not a trust bundle") as failed:
        await identity.renew()
    assert failed.value.result == "no_credential" and recorder.calls == []
    lax.write_bytes(setup.bundle_pem)  # fixed: the next try goes through
    identity.install(await identity.renew())
    assert identity.svid is not None and recorder.calls == [f"token:{workload('web')}"]


async def test_a_bundle_file_deleted_and_restored_is_reported_both_times_every_time(
    setup: CaSetup, caplog: pytest.LogCaptureFixture
) -> None:
    """The same bytes back after a deletion are a fix, said so; the next deletion is a new
    problem, said again (each renewal reads the file first)."""
    identity = manager(setup, local_sign(setup))
    sync = BundleSync(identity)
    identity.install(await identity.renew())
    assert identity.svid is not None
    ca_bundle, bundle_file = identity.svid.bundle, identity.config.ca.bundle_file
    kept = bundle_file.read_bytes()
    caplog.set_level("INFO", logger="outrider.agent.bundle")
    for _ in range(2):
        caplog.clear()
        bundle_file.unlink()
        assert sync.peer_roots(ca_bundle) == ca_bundle  # the roots in use, meanwhile
        bundle_file.write_bytes(kept)
        assert sync.peer_roots(ca_bundle) == ca_bundle
        said = [record.getMessage() for record in caplog.records]
        assert len(said) == 2 and f"cannot read {bundle_file}" in said[0], said
        assert said[1] == "trust bundle from file: fine again"


async def test_a_missing_token_is_a_clear_failure(setup: CaSetup, tmp_path: Path) -> None:
    identity = manager(setup, local_sign(setup), token_file=str(tmp_path / "absent"))
    with pytest.raises(RenewalFailed, match="cannot read the token") as failed:
        await identity.renew()
    assert failed.value.result == "no_credential"


async def test_run_backs_off_then_recovers_and_counts_both(setup: CaSetup) -> None:
    down = GRPCError(Status.UNAVAILABLE, "down")
    recorder = Recorder(local_sign(setup), fail=lambda n: down if n <= 3 else None)
    identity = manager(setup, recorder)
    task = asyncio.create_task(identity.run())
    try:
        await asyncio.wait_for(identity.has_svid.wait(), 5)
    finally:
        task.cancel()
    registry = identity.metrics.registry
    assert (
        registry.get_sample_value("outrider_svid_rotations_total", {"result": "ca_unavailable"})
        == 3
    )
    assert registry.get_sample_value("outrider_svid_rotations_total", {"result": "success"}) == 1
    assert registry.get_sample_value("outrider_ca_backoff_seconds") == 0
    assert identity.next_renewal is not None
    assert identity.svid is not None
    life = identity.svid.not_after - utcnow()
    assert timedelta(0) < identity.next_renewal - utcnow() < life


def timed_manager(setup: CaSetup, sign: SignFn, clock: FakeClock | None = None) -> IdentityManager:
    config = agent_config.parse(agent_yaml(setup.root, "web"), base=setup.root)
    now = clock.now if clock else utcnow
    return IdentityManager(
        config, Contexts(), AgentMetrics(), now=now, rng=random.Random(7), sign=sign, clock=clock
    )


async def test_a_reload_during_a_renewal_is_not_lost(setup: CaSetup) -> None:
    inner = local_sign(setup)
    calls: list[int] = []
    gate = asyncio.Event()

    async def sign(*args):
        calls.append(1)
        if len(calls) == 2:
            await gate.wait()  # the second renewal is slow
        return await inner(*args)

    m = timed_manager(setup, sign)
    task = asyncio.create_task(m.run())
    try:
        await asyncio.wait_for(m.has_svid.wait(), 5)
        m.renew_now()  # e.g. a reload: renew now
        for _ in range(100):
            if len(calls) == 2:
                break
            await asyncio.sleep(0.01)
        m.renew_now()  # a second reload, while renewal #2 is in flight (new CA address)
        gate.set()
        await asyncio.sleep(1)
        assert len(calls) == 3, "the reload during the renewal did not trigger another renewal"
    finally:
        task.cancel()


async def started(m: IdentityManager, clock: FakeClock) -> asyncio.Task[None]:
    task = asyncio.create_task(m.run())
    await asyncio.wait_for(m.has_svid.wait(), 5)
    await clock.settle(1)
    return task


async def test_a_forward_clock_jump_renews_before_expiry(setup: CaSetup) -> None:
    clock = FakeClock()
    calls: list[int] = []
    inner = local_sign(setup, ttl=timedelta(hours=1))

    async def sign(*args):
        calls.append(1)
        return await inner(*args)

    m = timed_manager(setup, sign, clock)
    task = await started(m, clock)
    try:
        clock.step(50 * 60)  # suspend/resume or an NTP step: 10 minutes of life left
        await clock.advance(60)
        assert len(calls) == 2, "past the renewal time by the wall clock and still waiting"
    finally:
        task.cancel()


async def test_a_30s_svid_recovers_within_seconds_of_a_clock_step_past_expiry_and_back(
    setup: CaSetup,
) -> None:
    clock = FakeClock()
    # The CA's clock is the agent's without the steps: the real time, but not the real
    # time the test takes, which would lengthen the SVID's life and the loop's waits.
    start = clock.now()

    def ca_now() -> datetime:
        return start + timedelta(seconds=clock.monotonic())

    m = timed_manager(setup, local_sign(setup, timedelta(seconds=30), ca_now), clock)
    task = await started(m, clock)
    try:
        clock.step(120)  # by this clock the SVID, and every answer of the CA, has expired
        await clock.advance(3)  # a tenth of the SVID's life: the loop has looked
        refused = {"result": "bad_answer"}
        assert m.metrics.registry.get_sample_value("outrider_svid_rotations_total", refused)
        clock.step(-120)  # the clock is right again
        await clock.advance(2)
        assert m.svid is not None and clock.now() < m.svid.not_after, "no valid SVID 2 s later"
        assert m.renewal.standing.failures == 0
    finally:
        task.cancel()


async def minted(setup: CaSetup, name: str, ttl: str = "1h") -> dict[str, str]:
    """`outrider ca mint` for workload `name`: the identity keys that start an agent from it."""
    out = setup.root / f"{name}-minted"
    spiffe_id = str(workload(name))
    args = ["ca", "mint", "--dir", str(setup.ca_dir), "--spiffe-id", spiffe_id, "--ttl", ttl]
    assert await asyncio.to_thread(cli.main, [*args, "--out", str(out)]) == 0
    return {"svid_file": str(out / "svid.pem"), "key_file": str(out / "svid.key")}


async def test_an_agent_starts_from_a_minted_svid_and_renews_with_it(setup: CaSetup) -> None:
    files = await minted(setup, "web")
    recorder = Recorder(local_sign(setup))
    identity = manager(setup, recorder, **files)
    first = await identity.renew()
    identity.install(first)
    assert recorder.calls == []  # no token, no CA: the files
    minted_leaf = Cert.all_from_pem(Path(files["svid_file"]).read_bytes())[0]
    assert first.leaf == minted_leaf and first.spiffe_id == workload("web")
    identity.install(await identity.renew())
    assert recorder.calls == ["svid"]  # renewed over mTLS with the minted SVID
    assert identity.svid is not None and identity.svid.leaf != minted_leaf


async def test_a_minted_svid_for_another_workload_is_passed_over_for_the_token(
    setup: CaSetup, caplog: pytest.LogCaptureFixture
) -> None:
    files = await minted(setup, "other")
    recorder = Recorder(local_sign(setup))
    identity = manager(setup, recorder, **files)
    svid = await identity.renew()
    assert svid.spiffe_id == workload("web")
    assert recorder.calls == [f"token:{workload('web')}"]
    assert f"cannot start from svid_file {files['svid_file']}" in caplog.text
    assert f"but this agent is {workload('web')}" in caplog.text


async def test_an_outage_after_a_recovery_is_said_at_once(
    setup: CaSetup, caplog: pytest.LogCaptureFixture
) -> None:
    """The once-a-minute bound is per outage (and cause): the first failure after a renewal
    that worked is a line of its own, however soon it comes."""
    caplog.set_level(logging.INFO, logger="outrider.agent.identity")
    down = GRPCError(Status.UNAVAILABLE, "down")
    recorder = Recorder(local_sign(setup), fail=lambda n: down if n in (1, 2, 4) else None)
    identity = manager(setup, recorder)
    for _ in range(4):
        await identity.renewal.attempt()
    said = [r.getMessage() for r in caplog.records if r.name == "outrider.agent.identity"]
    assert sum("SVID renewal failed" in line for line in said) == 2, said
    assert sum("renewed after 2 failed attempt(s)" in line for line in said) == 1, said
