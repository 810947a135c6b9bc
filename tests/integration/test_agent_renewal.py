"""An agent keeps its identity across renewals against a real CA process: whatever the
bundle file's formatting, on a full disk, and through a CA outage longer than the SVID."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import urllib.error
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from agent.core.svid import Svid
from tests.integration.test_upstreams import App, get, outbound, serving, session, url
from tests.mesh import AgentProcess, agent_process, agent_yaml, inbound, local_sign, running_agent
from tests.support import CaProcess, CaSetup, ca_process, fill_disk, free_port


def renewing_agent(setup: CaSetup, ca: CaProcess, name: str, **identity: str) -> dict[str, Any]:
    """An agent of the real CA whose SVID lives 2 s: it renews about every second."""
    raw = agent_yaml(
        setup.root,
        name,
        ca_address=f"127.0.0.1:{ca.grpc_port}",
        token=setup.issuer.token("demo", name),
    )
    raw["identity"].update({"ttl": "2s", **identity})
    return raw


def renewals(agent: AgentProcess) -> float:
    for line in agent.metrics().splitlines():
        if line.startswith('outrider_svid_rotations_total{result="success"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def ready(agent: AgentProcess) -> bool:
    try:
        agent.get("/ready")
    except urllib.error.HTTPError:
        return False
    return True


async def until(check: Any, seconds: float, log: list[str] | None = None) -> float:
    """Seconds until `check()` held; AssertionError (with the process's log) after `seconds`."""
    started = time.monotonic()
    while not await asyncio.to_thread(check):
        if time.monotonic() - started > seconds:
            raise AssertionError(f"not within {seconds}s\n" + "".join((log or [])[-20:]))
        await asyncio.sleep(0.05)
    return time.monotonic() - started


# -- item: a bundle file without a final newline -------------------------------------------


async def test_renewals_work_with_a_bundle_file_without_a_final_newline(
    setup: CaSetup, ca: CaProcess
) -> None:
    """`vault read -field=certificate pki/cert/ca > bundle.pem` writes no final newline."""
    bundle = setup.root / "no-newline.pem"
    bundle.write_bytes(setup.bundle_pem.rstrip(b"\n"))
    # 4 s SVIDs, not 2: an answer that took over a second on a loaded machine would leave
    # a 2 s SVID less than the second the agent asks of a new one (a refusal that is right).
    raw = renewing_agent(setup, ca, "no-newline", ttl="4s")
    raw["ca"]["bundle_file"] = str(bundle)
    with agent_process(setup.root, "no-newline", raw) as agent:
        await until(lambda: renewals(agent) >= 3, 20)
        assert ready(agent)
        assert not [line for line in agent.log if "renewal failed" in line], agent.log


# -- item: output_dir written as one unit --------------------------------------------------


def matching(directory: Path) -> bool:
    """svid.key is the key of the leaf in svid.pem."""
    key = load_pem_private_key((directory / "svid.key").read_bytes(), password=None)
    leaf = x509.load_pem_x509_certificates((directory / "svid.pem").read_bytes())[0]
    return bool(key.public_key() == leaf.public_key())


def serial(directory: Path) -> int:
    return x509.load_pem_x509_certificates((directory / "svid.pem").read_bytes())[0].serial_number


async def test_a_full_disk_keeps_the_previous_key_and_certificate_together(
    setup: CaSetup, ca: CaProcess, small_disk: Path
) -> None:
    out = small_disk / "out"
    raw = renewing_agent(setup, ca, "full-disk", output_dir=str(out))
    with agent_process(setup.root, "full-disk", raw) as agent:
        await until(lambda: (out / "svid.pem").exists(), 5, agent.log)
        # The app has the files open: replacing them frees no space. One page is
        # left: enough for one new file, not for the set.
        with contextlib.ExitStack() as held:
            for name in ("svid.key", "svid.pem", "bundle.pem"):
                held.enter_context((out / name).open("rb"))
            fill_disk(small_disk, leave=os.statvfs(small_disk).f_frsize)
            failed = lambda: any("cannot write the SVID" in line for line in agent.log)  # noqa: E731
            await until(failed, 5, agent.log)
            assert matching(out), "svid.key no longer matches svid.pem"
            kept, renewed = serial(out), renewals(agent)
            await until(lambda: renewals(agent) >= renewed + 2, 5, agent.log)
            assert serial(out) == kept and matching(out)
        (small_disk / "filler").unlink()
        await until(lambda: serial(out) != kept, 5, agent.log)
        assert matching(out)

        # One set in service, and nothing left of the full disk's tries. The agent renews
        # every second: a listing taken mid-write sees the next set's directory too.
        def one_set() -> bool:
            names = sorted(p.name for p in out.iterdir())
            return (
                names[2:] == ["bundle.pem", "svid.key", "svid.pem"]
                and names[0].startswith("..2")
                and names[1] == "..data"
            )

        await until(one_set, 5, agent.log)


# -- item: recovery once the SVID has expired ----------------------------------------------


@pytest.fixture
def fixed_port_ca(setup: CaSetup, tmp_path: Path) -> Path:
    """A ca.yaml like the module's, on a port that stays the same across restarts."""
    config = yaml.safe_load(setup.config.read_text())
    config["listen"]["grpc"] = f"127.0.0.1:{free_port()}"
    path = setup.root / "fixed-port-ca.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def test_an_agent_is_ready_within_two_seconds_of_the_ca_returning_after_expiry(
    setup: CaSetup, fixed_port_ca: Path
) -> None:
    with ca_process(fixed_port_ca) as ca:
        raw = renewing_agent(setup, ca, "outage")
        # A long backoff, as after a long outage: expiry must cut it short.
        raw["ca"]["backoff"] = {"initial": "10s", "max": "30s"}
        with agent_process(setup.root, "outage", raw) as agent:
            ca.process.terminate()
            ca.process.wait(10)
            await until(lambda: not ready(agent), 5)  # the 2 s SVID has expired
            await asyncio.sleep(9)  # the CA stays away, several SVID lives
            with ca_process(fixed_port_ca):
                recovered = await until(lambda: ready(agent), 10)
    assert recovered < 2.5, f"ready {recovered:.1f}s after the CA came back"


# -- item: pooled connections once the SVID has expired ------------------------------------


async def test_pooled_upstream_connections_close_when_the_svid_expires(
    setup: CaSetup, tmp_path: Path
) -> None:
    up = True
    short = local_sign(setup, ttl=timedelta(seconds=2))

    async def sign(csr: bytes, trusted: bytes, svid: Svid | None, token: str | None) -> Any:
        if not up:
            raise GRPCError(Status.UNAVAILABLE, "down")
        return await short(csr, trusted, svid, token)

    async with serving(App("backend")) as app:
        server_raw = agent_yaml(setup.root, "backend", inbound=inbound(app.port, protocol="http"))
        async with running_agent(server_raw, local_sign(setup), setup.root) as server:
            upstream = outbound(endpoints=[server.bound["inbound[0]"]])
            client_raw = agent_yaml(setup.root, "frontend", outbound=upstream)
            async with running_agent(client_raw, sign, setup.root) as client, session() as http:
                assert (await get(http, url(client)))[0] == 200  # now pooled
                up = False
                await until(lambda: not client.ready, 5)
                await asyncio.sleep(0.2)  # what the pool does when the loop sees the expiry
                status, _ = await get(http, url(client))
        assert status != 200, "a request rode a pooled connection made with an expired SVID"
        assert app.hits == 1
