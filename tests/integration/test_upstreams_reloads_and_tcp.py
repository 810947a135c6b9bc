"""Upstreams across reloads, on the TCP path, and their config errors.

Each test reproduces one bug over loopback with real in-process agents
(tests/integration/test_upstreams.py's backends and helpers); the config
tests parse YAML as a reload would. The helpers come from
test_upstreams_edge_cases.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent import config as agent_config
from agent.adapters.listeners import OutboundListener
from agent.app import Agent
from identity.configfile import ConfigError
from tests.integration.test_upstreams import (
    backend_agents,
    backends,
    metric,
    outbound,
    root,
)
from tests.integration.test_upstreams_edge_cases import (
    SHORT_DRAIN,
    black_hole,
    client_agent,
    exchange,
    listener,
    read_response,
    state,
)
from tests.mesh import (
    agent_yaml,
    echo_server,
    eventually,
    inbound,
    local_sign,
    round_trip,
    running_agent,
    sample,
)
from tests.support import CaSetup

__all__ = ["root"]  # the module-scoped fixture, shared with test_upstreams.py

GET = b"GET / HTTP/1.1\r\nHost: backend\r\n\r\n"


async def reload(agent: Agent, root: Path, **upstream: Any) -> None:
    """Reconfigure the client agent's one outbound listener as a config reload would."""
    raw = agent_yaml(root, "frontend", outbound=outbound(**upstream), limits=SHORT_DRAIN)
    await agent.reconfigure(agent_config.parse(raw, base=root))


def live_of(agent: Agent) -> OutboundListener:
    [outbound_listener] = agent.outbound.values()
    assert isinstance(outbound_listener, OutboundListener)
    return outbound_listener


# -- reload --------------------------------------------------------------------------------


async def test_a_weight_change_keeps_the_ejections_of_every_subset(
    root: Path, setup: CaSetup
) -> None:
    """docs/upstreams.md: a weight flip "keeps the discovered endpoints, their health".

    The reload builds the new subsets one by one on the same health table,
    and each `update` hands the table the membership built so far: the first
    subset's update forgets every other subset's endpoints, the next ones
    bring theirs back as new, healthy. An ejected green endpoint is back in
    service the moment the weights change.
    """
    async with asyncio.timeout(5), backends(root, setup, "blue", "green") as pairs:
        (_, blue_address), (green, green_address) = pairs
        green.failing = 1  # its first answer is a 503: ejected at once, retried on blue
        upstream: dict[str, Any] = {
            "subsets": [
                {"name": "blue", "weight": 0, "endpoints": [blue_address]},
                {"name": "green", "weight": 100, "endpoints": [green_address]},
            ],
            "health": {"outlier": {"consecutive_5xx": 1}, "panic_threshold": 0},
        }
        async with client_agent(root, setup, **upstream) as agent:
            assert await exchange(listener(agent), GET) == [(200, b"blue GET 0")]
            assert state(agent, green_address) == "ejected"
            upstream["subsets"][0]["weight"], upstream["subsets"][1]["weight"] = 10, 90
            await reload(agent, root, **upstream)
            after = state(agent, green_address)
            answers = [await exchange(listener(agent), GET) for _ in range(3)]
    assert after == "ejected"
    assert green.hits == 1, "the ejected green endpoint took traffic again after the reload"
    assert answers == [[(200, b"blue GET 0")]] * 3


async def test_a_tcp_retry_after_a_reload_that_renames_its_subset_still_connects(
    root: Path, setup: CaSetup
) -> None:
    """A connection keeps the subset it was given; a reload that renames it must not kill it.

    Moving from `endpoints:` (subset "default") to `subsets:` while a dial is
    in progress: the retry asks the new upstream for subset "default", whose
    fallback order starts with it, and `self.subsets["default"]` raises
    KeyError. The dial task dies; the app's connection is never relayed nor
    closed (no idle timer runs before the link) until the drain.
    """
    async with asyncio.timeout(5), echo_server() as port:
        backend_raw = agent_yaml(root, "backend", inbound=inbound(port))
        async with running_agent(backend_raw, local_sign(setup), root) as backend:
            with black_hole() as hole:
                common = {"protocol": "tcp", "timeouts": {"connect": "300ms"}}
                async with client_agent(root, setup, endpoints=[hole], **common) as agent:
                    host, listen_port = listener(agent).rsplit(":", 1)
                    reader, writer = await asyncio.open_connection(host, int(listen_port))
                    writer.write(b"ping")
                    await asyncio.sleep(0.05)  # dialling the hole: the TLS handshake never starts
                    subsets = [{"name": "v1", "endpoints": [backend.bound["inbound[0]"]]}]
                    await reload(agent, root, subsets=subsets, **common)
                    try:
                        async with asyncio.timeout(1.5):
                            echoed = await reader.readexactly(4)
                    except (TimeoutError, asyncio.IncompleteReadError):
                        echoed = b""
                    writer.close()
    assert echoed == b"ping"


async def test_an_http_retry_after_a_reload_that_renames_its_subset_still_answers(
    root: Path, setup: CaSetup
) -> None:
    """The same in HTTP mode: the request's retry raises KeyError and the app's connection
    is aborted without an answer, where the new subset's endpoint could have answered."""
    async with asyncio.timeout(5), backends(root, setup, "a") as [(_, address)]:
        with black_hole() as hole:
            common = {"timeouts": {"connect": "300ms"}}
            async with client_agent(root, setup, endpoints=[hole], **common) as agent:
                host, port = listener(agent).rsplit(":", 1)
                reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(GET)
                await asyncio.sleep(0.05)  # dialling the hole
                await reload(
                    agent, root, subsets=[{"name": "v1", "endpoints": [address]}], **common
                )
                try:
                    async with asyncio.timeout(1.5):
                        status, _, body = await read_response(reader)
                except (TimeoutError, AssertionError, ConnectionError):
                    status, body = 0, b"no answer"
                writer.close()
    assert (status, body) == (200, b"a GET 0")


async def test_a_shorter_pool_idle_timeout_applies_to_connections_already_idle(
    root: Path, setup: CaSetup
) -> None:
    """docs/upstreams.md: "Idle pooled connections close after `pool.idle_timeout`".

    The reload sets the pool's timeout, but its sweep was scheduled under the
    old one (60 s by default): idle connections stay open until then, and
    connections pooled meanwhile wait for that same sweep.
    """
    async with asyncio.timeout(5), backend_agents(root, setup, "a") as [(_, backend)]:
        address = backend.bound["inbound[0]"]
        async with client_agent(root, setup, endpoints=[address]) as agent:
            assert await exchange(listener(agent), GET) == [(200, b"a GET 0")]
            assert await eventually(lambda: len(backend.connections) == 1, 1)  # pooled
            await reload(agent, root, endpoints=[address], pool={"idle_timeout": "200ms"})
            closed = await eventually(lambda: len(backend.connections) == 0, 1.5)
    assert closed, "the idle pooled connection outlived the new idle_timeout"


async def test_renaming_an_upstream_moves_its_metrics_to_the_new_name(
    root: Path, setup: CaSetup
) -> None:
    """docs/upstreams.md: `name` is used "in logs, metrics and /config_dump".

    A reload that renames an upstream (same listen address) reconfigures it
    in place, but its metric children were bound to the old name once: its
    requests go on being counted as the old upstream, and the old name's
    endpoint gauges stay, frozen, beside the new name's.
    """
    async with (
        asyncio.timeout(5),
        backends(root, setup, "a") as [(_, address)],
        client_agent(root, setup, endpoints=[address]) as agent,
    ):
        await reload(agent, root, endpoints=[address], name="orders")
        assert await exchange(agent.bound["outbound[orders]"], GET) == [(200, b"a GET 0")]
        renamed = sample(agent, "outrider_upstream_requests_total", upstream="orders", code="200")
        old = metric(agent, "upstream_requests_total", code="200")
        old_gauge = agent.metrics.registry.get_sample_value(
            "outrider_upstream_endpoints", {"upstream": "backend", "state": "healthy"}
        )
    assert (renamed, old) == (1, 0)
    assert old_gauge is None, "the old name still shows endpoints"


# -- the TCP path ----------------------------------------------------------------------------


async def test_least_request_over_tcp_sends_a_new_connection_to_the_less_loaded_endpoint(
    root: Path, setup: CaSetup
) -> None:
    """docs/upstreams.md: least_request picks "the less loaded of two random endpoints".

    In TCP mode the load (connections open per endpoint) is never counted:
    `core.load` stays empty, so every pick is the first random draw and
    least_request is plain random, however many long-lived connections one
    endpoint already holds. The random source is pinned so that the first
    draw is always the first endpoint: a pick by load still alternates.
    """
    accepted: list[list[int]] = [[], []]
    async with (
        asyncio.timeout(6),
        echo_server(accepted[0]) as a_port,
        echo_server(accepted[1]) as b_port,
        running_agent(
            agent_yaml(root, "backend", inbound=inbound(a_port)), local_sign(setup), root
        ) as a_agent,
        running_agent(
            agent_yaml(root, "backend", inbound=inbound(b_port)), local_sign(setup), root
        ) as b_agent,
    ):
        endpoints = [a_agent.bound["inbound[0]"], b_agent.bound["inbound[0]"]]
        upstream = {"protocol": "tcp", "balancer": "least_request", "endpoints": endpoints}
        async with client_agent(root, setup, **upstream) as agent:
            live_of(agent).rng.random = lambda: 0.0  # type: ignore[method-assign]
            host, port = listener(agent).rsplit(":", 1)
            open_connections = []
            for _ in range(6):  # each kept open, as a long-lived TCP client does
                reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(b"ping")
                assert await reader.readexactly(4) == b"ping"
                open_connections.append(writer)
            spread = [len(accepted[0]), len(accepted[1])]
            for writer in open_connections:
                writer.close()
    assert spread == [3, 3]


async def test_a_tcp_dial_counts_as_a_new_upstream_connection(root: Path, setup: CaSetup) -> None:
    """docs/upstreams.md: `outrider_upstream_connections_total{kind="new"}` counts what is dialled.

    Only the HTTP path counts its dials; a TCP upstream's stay at 0 however
    many connections it opens.
    """
    async with (
        asyncio.timeout(5),
        echo_server() as port,
        running_agent(
            agent_yaml(root, "backend", inbound=inbound(port)), local_sign(setup), root
        ) as backend,
        client_agent(root, setup, protocol="tcp", endpoints=[backend.bound["inbound[0]"]]) as agent,
    ):
        for _ in range(2):
            assert await round_trip(listener(agent), b"ping", 2) == b"ping"
        dialled = metric(agent, "upstream_connections_total", kind="new")
    assert dialled == 2


async def test_an_app_that_leaves_during_a_tcp_dial_is_not_counted_as_no_endpoint(
    root: Path, setup: CaSetup
) -> None:
    """docs/agent.md: `no_endpoint` counts TCP connections closed because "no endpoint is left".

    An app that gives up while its connection is being dialled is counted
    there when the dial fails, and with a second endpoint its retry is
    counted (and takes a budget slot) although the loop then stops at once:
    a client-side timeout looks like an upstream outage.
    """
    with black_hole() as hole, black_hole() as other_hole:
        upstream = {
            "protocol": "tcp",
            "endpoints": [hole, other_hole],
            "timeouts": {"connect": "200ms"},
        }
        async with asyncio.timeout(5), client_agent(root, setup, **upstream) as agent:
            host, port = listener(agent).rsplit(":", 1)
            _, writer = await asyncio.open_connection(host, int(port))
            await asyncio.sleep(0.05)  # dialling the first hole
            writer.close()  # the app gives up
            await asyncio.sleep(0.4)  # the dial fails meanwhile
            refused = sample(
                agent,
                "outrider_connections_refused_total",
                direction="outbound",
                reason="no_endpoint",
            )
            retries = metric(agent, "upstream_retries_total")
    assert (refused, retries) == (0, 0)


# -- the config ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "path"),
    [
        (
            {"endpoints": ["127.0.0.1:1"], "health": {"active": {"interval": "0s"}}},
            "outbound[0].health.active.interval",
        ),
        (
            {"endpoints": ["127.0.0.1:1"], "health": {"outlier": {"base_ejection": "0s"}}},
            "outbound[0].health.outlier.base_ejection",
        ),
        ({"dns": {"name": "localhost:1", "refresh": "0s"}}, "outbound[0].dns.refresh"),
    ],
    ids=["active.interval", "outlier.base_ejection", "dns.refresh"],
)
async def test_a_reload_with_a_zero_duration_is_refused_and_the_agent_keeps_running(
    root: Path, setup: CaSetup, section: dict[str, Any], path: str
) -> None:
    """docs/agent.md: "A file that does not parse or validate is refused. The running config
    stays".

    The reader records "must be positive" but returns the 0 anyway, and the
    settings' own check raises ValueError before the errors are reported:
    not a ConfigError, so `Agent.reload` let it out and `outrider agent run`
    exits on a typo in a ConfigMap.
    """
    async with (
        asyncio.timeout(5),
        backends(root, setup, "a") as [(_, address)],
        client_agent(root, setup, endpoints=[address]) as agent,
    ):
        file = root / "frontend-reload.yaml"
        raw = agent_yaml(root, "frontend", outbound=outbound(**section))
        file.write_text(yaml.safe_dump(raw))
        try:
            await agent.reload(file)
            escaped = None
        except ValueError as exc:
            escaped = exc
        refused = sample(agent, "outrider_config_reloads_total", kind="agent", result="error")
        still = await exchange(listener(agent), GET)
    assert escaped is None, f"the reload raised {escaped!r}: the agent exits"
    assert refused == 1
    assert still == [(200, b"a GET 0")]
    with pytest.raises(ConfigError, match=path.replace("[", r"\[").replace("]", r"\]")):
        agent_config.parse(raw, base=root)


def parse_outbound(root: Path, **upstream: Any) -> agent_config.AgentConfig:
    return agent_config.parse(
        agent_yaml(root, "frontend", outbound=outbound(**upstream)), base=root
    )


def test_a_kubernetes_port_out_of_range_is_an_error_not_a_missing_listener(root: Path) -> None:
    """`port: 70000` passes the integer check, then `kubernetes()` returns None without an
    error: the config validates, and the outbound listener is silently left out."""
    kubernetes = {"service": "backend", "namespace": "shop", "port": 70000}
    try:
        config = parse_outbound(root, kubernetes=kubernetes)
        errors, listeners = [], len(config.outbound)
    except ConfigError as exc:
        errors, listeners = exc.errors, 0
    assert listeners == 0
    assert [e for e in errors if e.startswith("outbound[0].kubernetes.port:")], errors


def test_an_endpoint_listed_twice_is_an_error(root: Path) -> None:
    """`endpoints: [a, {address: a, weight: 5}]` validates, then discovery publishes
    `dict(...)` of the list: one endpoint, the last weight wins, the first entry is
    dropped without a word."""
    endpoints = ["127.0.0.1:15443", {"address": "127.0.0.1:15443", "weight": 5}]
    with pytest.raises(ConfigError, match=r"outbound\[0\]\.endpoints\[1\]"):
        parse_outbound(root, endpoints=endpoints)


def test_a_duplicate_subset_name_error_names_the_duplicate(root: Path) -> None:
    """The duplicate check indexes the list of valid subsets, not `subsets`: after an
    invalid subset, it names the wrong entry."""
    subsets = [
        {"name": "broken"},  # no source: an error of its own
        {"name": "v1", "endpoints": ["127.0.0.1:1"]},
        {"name": "v1", "endpoints": ["127.0.0.1:2"]},
    ]
    with pytest.raises(ConfigError) as raised:
        parse_outbound(root, subsets=subsets)
    duplicates = [e for e in raised.value.errors if "given twice" in e]
    assert duplicates == ["outbound[0].subsets[2].name: 'v1' is given twice"]
