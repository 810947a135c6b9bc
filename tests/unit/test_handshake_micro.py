"""bench/handshake_micro.py measures what it names: full handshakes are full, resumed ones
resume (it asserts both as it goes), and the loopback part runs the agent's own inbound
and outbound handshake code to a verified peer."""

from __future__ import annotations

from pathlib import Path

import pytest
import uvloop

from agent.adapters.tls import Contexts
from agent.core.svid import Svid
from bench import handshake_micro as micro


@pytest.fixture(scope="module")
def svids(tmp_path_factory: pytest.TempPathFactory) -> tuple[Svid, Svid]:
    return micro.svids(Path(tmp_path_factory.mktemp("ca")))


@pytest.mark.parametrize("resumption", [micro.OFF, micro.ON], ids=["full", "resumed"])
def test_memory_handshakes_are_timed_per_side(
    svids: tuple[Svid, Svid], resumption: micro.Resumption
) -> None:
    server, client = (Contexts.of(svid, resumption) for svid in svids)
    assert client.client is not None and server.server is not None
    sides = micro.memory(client.client, server.server, 3)
    assert sides.client > 0 and sides.server > 0
    assert (sides.session_read > 0) == resumption.resumption


@pytest.mark.parametrize("resumption", [micro.OFF, micro.ON], ids=["full", "resumed"])
def test_loopback_connections_reach_a_verified_peer(
    svids: tuple[Svid, Svid], resumption: micro.Resumption
) -> None:
    assert uvloop.run(micro.loopback(*svids, resumption, 2)) > 0
    assert uvloop.run(micro.loopback(*svids, resumption, 2, bare=True)) > 0


def test_a_record_is_timed_both_ways(svids: tuple[Svid, Svid]) -> None:
    assert micro.stdlib_record(*svids, 10) > 0
