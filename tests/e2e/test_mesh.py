"""The demo topology with real processes: a CA, two agents, two apps, real mTLS.

app (this test) -> frontend agent outbound -> mTLS -> backend agent inbound ->
backend app (an aiohttp server in this test). The agents are `outrider agent
run` processes that get their SVIDs from an `outrider ca serve` process with
ServiceAccount-shaped tokens.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
import urllib.error
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from tests.mesh import AgentProcess, agent_process, agent_yaml, inbound, outbound, workload
from tests.support import CaProcess, CaSetup, ca_process, free_port, make_ca_setup

pytestmark = pytest.mark.slow


@asynccontextmanager
async def backend_app(delay: float = 0.0) -> AsyncIterator[int]:
    """The backend workload: answers who it is, after `delay` seconds."""

    async def hello(request: web.Request) -> web.Response:
        if delay:
            await asyncio.sleep(delay)
        return web.json_response({"app": "backend"})

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


@dataclass
class Load:
    """Requests through the frontend agent until stopped: keep-alive and new-connection clients."""

    url: str
    ok: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)

    async def client(self, stop: asyncio.Event, new_connection: bool) -> None:
        connector = aiohttp.TCPConnector(force_close=new_connection)
        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            while not stop.is_set():
                try:
                    async with session.get(self.url) as response:
                        body = await response.json()
                        assert response.status == 200 and body == {"app": "backend"}
                    self.ok += 1
                except (aiohttp.ClientError, TimeoutError, AssertionError) as exc:
                    self.failed += 1
                    self.errors.append(repr(exc))
                await asyncio.sleep(0.01)

    async def run(self, seconds: float, clients: int = 4) -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(seconds, stop.set)
        await self.run_until(stop, clients)

    async def run_until(self, stop: asyncio.Event, clients: int = 4) -> None:
        tasks = [
            asyncio.create_task(self.client(stop, new_connection=i % 2 == 1))
            for i in range(clients)
        ]
        await asyncio.gather(*tasks)


@dataclass
class Mesh:
    setup: CaSetup
    ca: CaProcess
    frontend: AgentProcess
    backend: AgentProcess

    @property
    def url(self) -> str:
        return f"http://{self.frontend.bound['outbound[backend]']}/"


def metric(agent: AgentProcess, name: str, **labels: str) -> float:
    """One sample from the agent's /metrics; 0 when absent."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in agent.metrics().splitlines():
        sample, _, value = line.rpartition(" ")
        if sample.startswith(name) and sample in (name, f"{name}{{{want}}}"):
            return float(value)
    return 0.0


def reloads(agent: AgentProcess, result: str) -> float:
    return metric(agent, "outrider_config_reloads_total", kind="agent", result=result)


def rotations(agent: AgentProcess) -> int:
    return int(metric(agent, "outrider_svid_rotations_total", result="success"))


@contextmanager
def mesh(
    root: Path, app_port: int, *, ttl: str, ca_port: int = 0, drain_timeout: str = "30s"
) -> Iterator[Mesh]:
    listen = {"grpc": f"127.0.0.1:{ca_port}", "http": "127.0.0.1:0"}
    setup = make_ca_setup(root, listen=listen)
    with ca_process(setup.config) as ca:
        address = f"127.0.0.1:{ca.grpc_port}"

        def config(name: str, **sections: Any) -> dict[str, Any]:
            raw = agent_yaml(
                root, name, ca_address=address, token=setup.issuer.token("demo", name), **sections
            )
            raw["identity"]["ttl"] = ttl
            raw["limits"] = {"drain_timeout": drain_timeout}
            raw["ca"]["backoff"] = {"initial": "500ms", "max": "2s"}
            return raw

        allow = {"spiffe_ids": [str(workload("frontend"))]}
        backend_raw = config("backend", inbound=inbound(app_port, allow=allow))
        with agent_process(root, "backend", backend_raw) as backend:
            upstream = outbound(backend.bound["inbound[0]"], workload("backend"))
            with agent_process(root, "frontend", config("frontend", outbound=upstream)) as frontend:
                yield Mesh(setup, ca, frontend, backend)
                for agent in (frontend, backend):
                    assert agent.stop() == 0, "".join(agent.log)


async def test_a_request_crosses_the_mesh_with_the_callers_identity(tmp_path: Path) -> None:
    async with backend_app() as app_port:
        with mesh(tmp_path, app_port, ttl="1h") as m:
            async with aiohttp.ClientSession() as session, session.get(m.url) as response:
                assert response.status == 200
                assert await response.json() == {"app": "backend"}
            frontend = str(workload("frontend"))
            peer = {"direction": "inbound", "peer_id": frontend, "tls_version": "TLSv1.3"}
            assert metric(m.backend, "outrider_peer_connections_total", **peer) == 1
            ok = r'direction="inbound",reason="",result="ok",tls_version="TLSv1.3"'
            assert re.search(ok, m.backend.metrics())
            assert m.backend.certs()["spiffe_id"] == str(workload("backend"))


#: The SVIDs' life in the rotation test: each agent renews about every 2 s (half of it), so
#: LOAD_SECONDS of load span at least 6 SVIDs each, and what the test asserts takes 16 s.
ROTATING_TTL = "4s"
LOAD_SECONDS = 16


async def test_rotation_under_load_fails_no_request(tmp_path: Path) -> None:
    async with backend_app() as app_port:
        with mesh(tmp_path, app_port, ttl=ROTATING_TTL) as m:
            serials = {m.frontend.certs()["serial"], m.backend.certs()["serial"]}
            load = Load(m.url)
            await load.run(LOAD_SECONDS)
            issued = f"frontend {rotations(m.frontend)}, backend {rotations(m.backend)}"
            print(
                f"{LOAD_SECONDS} s of load: {load.ok} requests ok, {load.failed} failed;"
                f" SVIDs {issued}"
            )
            assert load.failed == 0, load.errors[:5]
            assert load.ok > 1000
            assert rotations(m.frontend) >= 6 and rotations(m.backend) >= 6  # 5 after the first
            assert m.frontend.certs()["serial"] not in serials


async def test_ca_outage_is_ridden_out_on_the_current_svid(tmp_path: Path) -> None:
    ca_port = free_port()
    async with backend_app() as app_port:
        # SVIDs of 26 s, renewed 12-14 s after they arrive (a second or two before the load
        # starts): the CA is away from 1 s to 16 s, so those renewals fail, and the SVIDs,
        # valid until 24 s at least, carry on until the CA is back.
        with mesh(tmp_path, app_port, ttl="26s", ca_port=ca_port) as m:
            load = Load(m.url)
            stop = asyncio.Event()
            running = asyncio.create_task(load.run_until(stop))
            await asyncio.sleep(1)
            before = rotations(m.frontend)
            # Take the CA away for 15 s: every renewal in that window fails.
            m.ca.process.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(m.ca.process.wait, 10) == 0
            await asyncio.sleep(15)
            failures = metric(m.frontend, "outrider_svid_rotations_total", result="ca_unavailable")
            with ca_process(m.setup.config):
                # The load goes on until rotation resumes, and a second longer.
                with suppress(AssertionError):
                    await _until(lambda: rotations(m.frontend) > before, timeout=10)
                await asyncio.sleep(1)
                stop.set()
                await running
                after = rotations(m.frontend)
            print(f"CA down 15 s: {load.ok} requests ok, {load.failed} failed; renewals failed")
            print(f"{failures:.0f}; SVIDs issued {before} before the outage, {after} after it")
            assert load.failed == 0, load.errors[:5]
            assert failures >= 1, "no renewal was attempted during the outage"
            assert any("retrying in" in line for line in m.frontend.log)
            assert after > before, "rotation did not resume when the CA came back"


async def test_sigterm_drains_requests_in_flight(tmp_path: Path) -> None:
    async with backend_app(delay=2.0) as app_port:
        # At L4 an idle keep-alive connection looks like a slow request, so the
        # pooled connections of this client hold the drain until its timeout.
        with mesh(tmp_path, app_port, ttl="1h", drain_timeout="4s") as m:
            async with aiohttp.ClientSession() as session:

                async def call() -> int:
                    async with session.get(m.url) as response:
                        await response.read()
                        return response.status

                calls = [asyncio.create_task(call()) for _ in range(5)]
                await asyncio.sleep(0.5)
                m.backend.process.send_signal(signal.SIGTERM)
                started = time.monotonic()
                await asyncio.sleep(0.3)
                with pytest.raises(urllib.error.HTTPError, match="503"):
                    await asyncio.to_thread(m.backend.get, "/ready")
                host, port = m.backend.bound["inbound[0]"].rsplit(":", 1)
                with pytest.raises(OSError):
                    await asyncio.open_connection(host, int(port))
                assert await asyncio.gather(*calls) == [200] * 5
                code = await asyncio.to_thread(m.backend.process.wait, 10)
                assert code == 0
                assert time.monotonic() - started < 4 + 1.5


async def test_reload_applies_a_good_config_and_keeps_the_last_good_one(tmp_path: Path) -> None:
    async with backend_app() as app_port:
        with mesh(tmp_path, app_port, ttl="1h") as m:
            config = tmp_path / "backend.yaml"
            raw = yaml.safe_load(config.read_text())
            async with aiohttp.ClientSession() as session:
                async with session.get(m.url) as response:
                    assert response.status == 200
                raw["inbound"][0]["allow"] = {"spiffe_ids": [str(workload("someone-else"))]}
                config.write_text(yaml.safe_dump(raw))
                m.backend.process.send_signal(signal.SIGHUP)
                await _until(lambda: reloads(m.backend, "ok") == 1)
                # The open keep-alive connection goes on; a new one is refused.
                async with session.get(m.url) as response:
                    assert response.status == 200
                fresh = aiohttp.TCPConnector(force_close=True)
                async with aiohttp.ClientSession(connector=fresh) as closed_session:
                    with pytest.raises(aiohttp.ClientError):
                        async with closed_session.get(m.url) as response:
                            await response.read()
                config.write_text("inbound: [this is not a config")
                await _until(lambda: reloads(m.backend, "error") == 1)
                assert m.backend.process.poll() is None
                assert reloads(m.backend, "ok") == 1


async def _until(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(condition):
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.2)
