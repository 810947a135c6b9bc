"""TLS 1.3 session resumption between two real agents: a second connection resumes, and
nothing from before a bundle change, a rotation or a narrower allow-list gets through on
a ticket. (The same at the level of contexts, and the cache's rules:
tests/unit/agent/test_session_resumption.py.)"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from agent.adapters.tls import ResumingContext
from agent.app import Agent
from tests.mesh import (
    agent_yaml,
    echo_server,
    eventually,
    inbound,
    local_sign,
    outbound,
    round_trip,
    running_agent,
    sample,
    workload,
)
from tests.support import CaSetup

SERVER, CLIENT = workload("backend"), workload("frontend")


@dataclass
class Mesh:
    client: Agent
    server: Agent
    server_raw: dict[str, Any]

    @property
    def address(self) -> str:
        return self.client.bound["outbound[backend]"]

    def resumed(self, agent: Agent, direction: str) -> float:
        return sample(agent, "outrider_tls_resumed_handshakes_total", direction=direction)

    def full(self) -> float:
        """The server's verified handshakes that were not resumed."""
        ok = sum(
            s.value
            for metric in self.server.metrics.handshakes.collect()
            for s in metric.samples
            if s.labels.get("direction") == "inbound" and s.labels.get("result") == "ok"
        )
        return ok - self.resumed(self.server, "inbound")

    async def exchange(self) -> bytes:
        """One connection through the client agent, closed; once the client agent has freed
        its upstream connection, its session is saved (if it resumes at all)."""
        return await round_trip(self.address)

    def saved(self) -> int:
        context = self.client.runtime.contexts.client
        assert isinstance(context, ResumingContext)
        return len(context.sessions)

    async def session_saved(self) -> None:
        assert await eventually(lambda: self.saved() == 1), "the client agent kept no session"


@asynccontextmanager
async def mesh(setup: CaSetup) -> AsyncIterator[Mesh]:
    sign = local_sign(setup)
    async with echo_server() as app_port:
        server_raw = agent_yaml(setup.root, "backend", inbound=inbound(app_port))
        async with running_agent(server_raw, sign, setup.root) as server:
            upstream = outbound(server.bound["inbound[0]"], SERVER)
            client_raw = agent_yaml(setup.root, "frontend", outbound=upstream)
            async with running_agent(client_raw, sign, setup.root) as client:
                yield Mesh(client, server, server_raw)


async def test_a_second_connection_between_agents_resumes(setup: CaSetup) -> None:
    async with mesh(setup) as m:
        assert await m.exchange() == b"ping"
        await m.session_saved()
        assert (m.resumed(m.client, "outbound"), m.resumed(m.server, "inbound")) == (0, 0)
        assert await m.exchange() == b"ping"
        assert m.resumed(m.client, "outbound") == 1
        assert await eventually(lambda: m.resumed(m.server, "inbound") == 1)
        assert m.full() == 1


async def test_resumption_off_does_a_full_handshake_every_time(
    setup: CaSetup, tmp_path: Path
) -> None:
    """Turned off by a reload on the server: it sends no more tickets, and the one the
    client holds is not taken (new contexts)."""
    async with mesh(setup) as m:
        assert await m.exchange() == b"ping"
        await m.session_saved()
        m.server_raw["tls"] = {"resumption": False}
        path = tmp_path / "server.yaml"
        path.write_text(yaml.safe_dump(m.server_raw))
        await m.server.reload(path)
        for _ in range(2):
            assert await m.exchange() == b"ping"
        assert await eventually(lambda: m.full() == 3)
        assert m.resumed(m.server, "inbound") == 0


async def test_a_ticket_from_before_a_bundle_change_is_not_taken_after_it(setup: CaSetup) -> None:
    """The client still offers its ticket; the server's new contexts cannot open it."""
    async with mesh(setup) as m:
        assert await m.exchange() == b"ping"
        await m.session_saved()
        identity = m.server.identity
        assert identity.svid is not None
        identity.install_bundle(identity.svid.bundle)  # new roots (the same ones, here)
        assert await m.exchange() == b"ping"
        assert await eventually(lambda: m.full() == 2)
        assert m.resumed(m.server, "inbound") == m.resumed(m.client, "outbound") == 0


async def test_a_ticket_from_before_a_rotation_is_not_reused_after_it(setup: CaSetup) -> None:
    async with mesh(setup) as m:
        assert await m.exchange() == b"ping"
        await m.session_saved()
        m.client.identity.install(await m.client.identity.renew())
        assert m.saved() == 0  # the new SVID's contexts start with no session
        assert await m.exchange() == b"ping"
        await m.session_saved()
        m.server.identity.install(await m.server.identity.renew())
        assert await m.exchange() == b"ping"  # offered, and not taken
        assert await eventually(lambda: m.full() == 3)
        assert m.resumed(m.server, "inbound") == m.resumed(m.client, "outbound") == 0


async def test_a_resumed_connection_from_a_peer_no_longer_allowed_is_refused(
    setup: CaSetup, tmp_path: Path
) -> None:
    """The allow-list is checked on a resumed connection as on a full one: the reload keeps
    the ticket keys, so the handshake resumes, and the server refuses the peer after it."""
    async with mesh(setup) as m:
        assert await m.exchange() == b"ping"
        await m.session_saved()
        m.server_raw["inbound"][0]["allow"] = {"spiffe_ids": [str(workload("someone-else"))]}
        path = tmp_path / "server.yaml"
        path.write_text(yaml.safe_dump(m.server_raw))
        await m.server.reload(path)
        assert await m.exchange() == b""
        assert m.resumed(m.client, "outbound") == 1  # the client's side of it did resume
        refused = {"direction": "inbound", "result": "refused", "reason": "not_allowed"}
        refusals = "outrider_tls_handshakes_total"
        assert await eventually(
            lambda: sample(m.server, refusals, **refused, tls_version="", cipher="") == 1
        )
        assert m.resumed(m.server, "inbound") == 0
