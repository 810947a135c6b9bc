"""Reloading the agent's config and policies in place.

Listeners come and go; a reload is checked as start checks (config and
policies together), and a refused one changes nothing and leaves nothing
running: no listener, task, thread or metric series of what it had opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import http.client
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent import config as agent_config
from agent.adapters.listeners import OutboundListener
from agent.app import Agent
from tests import certs
from tests.k8s import in_cluster, stub_api_server
from tests.mesh import (
    AgentProcess,
    agent_process,
    agent_yaml,
    echo_server,
    eventually,
    inbound,
    local_sign,
    running_agent,
    sample,
    workload,
)
from tests.support import CaProcess, CaSetup, free_port, loopback_tls


async def connect(address: str) -> None:
    host, port = address.rsplit(":", 1)
    _, writer = await asyncio.open_connection(host, int(port))
    writer.close()


@contextlib.contextmanager
def busy_port() -> Iterator[str]:
    """An address something else listens on."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield f"127.0.0.1:{taken.getsockname()[1]}"


def free_address() -> str:
    return f"127.0.0.1:{free_port()}"


def reloads(agent: Agent, result: str) -> float:
    return sample(agent, "outrider_config_reloads_total", kind="agent", result=result)


async def test_a_new_listener_opens_and_a_removed_one_closes(
    setup: CaSetup, tmp_path: Path
) -> None:
    async with echo_server() as app_port:
        raw = agent_yaml(setup.root, "backend", inbound=inbound(app_port))
        async with running_agent(raw, local_sign(setup), setup.root) as agent:
            first = agent.bound["inbound[0]"]
            second = free_address()
            raw["inbound"] = [{"listen": second, "app": f"127.0.0.1:{app_port}"}]
            path = tmp_path / "agent.yaml"
            path.write_text(yaml.safe_dump(raw))
            await agent.reload(path)
            assert agent.bound["inbound[0]"] == second
            assert reloads(agent, "ok") == 1
            await connect(second)
            with pytest.raises(OSError):
                await connect(first)


async def test_an_address_in_use_keeps_the_running_config(setup: CaSetup, tmp_path: Path) -> None:
    async with echo_server() as app_port:
        raw = agent_yaml(setup.root, "backend", inbound=inbound(app_port))
        async with running_agent(raw, local_sign(setup), setup.root) as agent:
            before, config = dict(agent.bound), agent.config
            with busy_port() as busy:
                raw["inbound"].append({"listen": busy, "app": f"127.0.0.1:{app_port}"})
                raw["limits"] = {"max_connections": 5}
                path = tmp_path / "agent.yaml"
                path.write_text(yaml.safe_dump(raw))
                await agent.reload(path)
            assert reloads(agent, "error") == 1
            assert (agent.bound, agent.config) == (before, config)
            assert agent.runtime.limits == config.limits
            assert agent_config.load(path) != config  # the file did change


@pytest.mark.parametrize("refused", [False, True], ids=["applied", "refused"])
async def test_a_listener_moves_to_the_wildcard_on_its_port(
    setup: CaSetup, tmp_path: Path, refused: bool
) -> None:
    """127.0.0.1:P to 0.0.0.0:P: start takes this config, so a reload takes it too (the
    kernel refuses the new bind while the old listener holds the port). A reload refused
    for another reason leaves the listener accepting on its old address."""
    async with echo_server() as app_port:
        first = free_address()
        raw = agent_yaml(setup.root, "backend", inbound=inbound(app_port))
        raw["inbound"][0]["listen"] = first
        async with running_agent(raw, local_sign(setup), setup.root) as agent:
            port = first.rsplit(":", 1)[1]
            raw["inbound"][0]["listen"] = f"0.0.0.0:{port}"
            with busy_port() as busy:
                if refused:
                    raw["inbound"].append({"listen": busy, "app": f"127.0.0.1:{app_port}"})
                path = tmp_path / "agent.yaml"
                path.write_text(yaml.safe_dump(raw))
                await agent.reload(path)
            assert reloads(agent, "error" if refused else "ok") == 1
            assert agent.bound["inbound[0]"] == (first if refused else f"0.0.0.0:{port}")
            await connect(first)  # 127.0.0.1:P answers either way


async def test_a_file_that_does_not_validate_changes_nothing(
    setup: CaSetup, tmp_path: Path
) -> None:
    async with echo_server() as app_port:
        raw = agent_yaml(setup.root, "backend", inbound=inbound(app_port))
        async with running_agent(raw, local_sign(setup), setup.root) as agent:
            config = agent.config
            path = tmp_path / "agent.yaml"
            path.write_text(yaml.safe_dump({**raw, "inbound": [{"listen": "nowhere"}]}))
            await agent.reload(path)
            assert reloads(agent, "error") == 1
            assert agent.config is config


# --- a reload is checked as start checks: config and policies together ----------------

POLICY = """\
policies:
  - {name: api, action: ALLOW, rules: [{name: read, to: {methods: [GET], paths: ["/api/*"]}}]}
"""


@contextlib.contextmanager
def http_app() -> Iterator[int]:
    """A plain HTTP app that answers 200 to every GET; yields its port."""

    class Ok(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def status(setup: CaSetup, address: str, path: str) -> int:
    """GET `path` over mTLS as the frontend through the agent at `address`."""
    context = certs.client_context(setup.bundle_pem, certs.valid_svid(setup, workload("frontend")))
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPSConnection(host, int(port), context=context, timeout=5)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    finally:
        connection.close()


def served_yaml(setup: CaSetup, ca: CaProcess, name: str, **sections: Any) -> dict[str, Any]:
    """The agent.yaml of workload `name` in namespace demo, served by the `ca serve` process."""
    token = setup.issuer.token("demo", name)
    address = f"127.0.0.1:{ca.grpc_port}"
    return agent_yaml(setup.root, name, ca_address=address, token=token, **sections)


def refusals(agent: AgentProcess) -> float:
    return agent.sample("outrider_config_reloads_total", kind="agent", result="error")


def until(condition: Callable[[], bool], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_reload_that_start_would_refuse_is_refused_and_the_old_config_serves(
    setup: CaSetup, ca: CaProcess, tmp_path: Path
) -> None:
    """An inbound flipped from http to tcp under rules with paths: refused as at start."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    with http_app() as app_port:
        raw = served_yaml(
            setup,
            ca,
            "backend",
            inbound=inbound(app_port, protocol="http"),
            policy={"files": [str(policy)]},
        )
        with agent_process(tmp_path, "backend", raw) as agent:
            address = agent.bound["inbound[0]"]
            assert (status(setup, address, "/api/items"), status(setup, address, "/admin")) == (
                200,
                403,
            )
            raw["inbound"][0]["protocol"] = "tcp"
            (tmp_path / "backend.yaml").write_text(yaml.safe_dump(raw))
            agent.process.send_signal(signal.SIGHUP)

            assert until(lambda: refusals(agent) == 1), "".join(agent.log)
            # The port still decides each request by the old config and policy.
            assert (status(setup, address, "/api/items"), status(setup, address, "/admin")) == (
                200,
                403,
            )
            assert agent.sample("outrider_config_reloads_total", kind="agent", result="ok") == 0
            assert agent.sample("outrider_config_reloads_total", kind="policy", result="ok") == 0
            said = "set `protocol: http` on that inbound port"
            assert until(lambda: said in "".join(agent.log)), "".join(agent.log)
        # And a restart on that file is refused the same way.
        restart = subprocess.run(
            [
                sys.executable,
                "-m",
                "outrider",
                "agent",
                "run",
                "--config",
                tmp_path / "backend.yaml",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert restart.returncode != 0
        assert "set `protocol: http` on that inbound port" in restart.stderr


# --- a refused reload leaves nothing behind -------------------------------------------


def upstream(name: str, listen: str, **source: Any) -> dict[str, Any]:
    return {
        "name": name,
        "listen": listen,
        "server_ids": [str(workload("backend"))],
        **(source or {"endpoints": ["127.0.0.1:1"]}),
    }


def upstreams_in(exposition: str) -> set[str]:
    return {
        found.labels["upstream"]
        for family in text_string_to_metric_families(exposition)
        for found in family.samples
        if "upstream" in found.labels
    }


async def test_a_refused_reload_stops_everything_it_started(setup: CaSetup, tmp_path: Path) -> None:
    """New outbounds, one on a busy port: the one opened before it is closed again, and
    neither leaves a task, a listening socket or a metric series, however often it is tried."""
    raw = agent_yaml(setup.root, "frontend", outbound=[upstream("running", "127.0.0.1:0")])
    async with running_agent(raw, local_sign(setup), setup.root) as agent:
        await asyncio.sleep(0.05)  # the running upstream's tasks settle
        tasks, bound = len(asyncio.all_tasks()), dict(agent.bound)
        path = tmp_path / "agent.yaml"
        opened_first = free_address()
        with busy_port() as busy:
            for attempt in range(1, 4):
                raw["outbound"] = [
                    upstream("running", "127.0.0.1:0"),
                    upstream("first", opened_first),
                    upstream("extra", busy, dns={"name": "localhost:1", "refresh": "1s"}),
                ]
                path.write_text(yaml.safe_dump(raw))
                await agent.reload(path)
                assert reloads(agent, "error") == attempt
                await asyncio.sleep(0.05)  # what leaked would be running now
                assert len(asyncio.all_tasks()) == tasks
        assert agent.bound == bound
        with socket.socket() as again:  # the listener opened before the busy one let go
            host, port = opened_first.rsplit(":", 1)
            again.bind((host, int(port)))
        assert upstreams_in(generate_latest(agent.metrics.registry).decode()) == {"running"}


async def test_a_reload_failing_after_listeners_started_stops_them(
    setup: CaSetup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any failure once new listeners run (here: the second cannot accept) stops them all:
    their discovery, ticks and series go, the running upstream keeps its own."""
    serve = OutboundListener._serve

    async def fails_for_late(listener: OutboundListener, listening: socket.socket) -> None:
        if listener.config.name == "late":
            raise OSError(errno.EMFILE, "Too many open files")
        await serve(listener, listening)

    monkeypatch.setattr(OutboundListener, "_serve", fails_for_late)
    raw = agent_yaml(setup.root, "frontend", outbound=[upstream("running", "127.0.0.1:0")])
    async with running_agent(raw, local_sign(setup), setup.root) as agent:
        await asyncio.sleep(0.05)  # the running upstream's tasks settle
        tasks = len(asyncio.all_tasks())
        early = free_address()
        raw["outbound"] += [upstream("early", early), upstream("late", free_address())]
        path = tmp_path / "agent.yaml"
        path.write_text(yaml.safe_dump(raw))
        await agent.reload(path)
        assert reloads(agent, "error") == 1
        await asyncio.sleep(0.05)
        assert len(asyncio.all_tasks()) == tasks
        assert upstreams_in(generate_latest(agent.metrics.registry).decode()) == {"running"}
        with socket.socket() as again:
            host, port = early.rsplit(":", 1)
            again.bind((host, int(port)))


async def test_an_upstream_moved_to_another_address_keeps_its_series(
    setup: CaSetup, tmp_path: Path
) -> None:
    raw = agent_yaml(setup.root, "frontend", outbound=[upstream("running", "127.0.0.1:0")])
    async with running_agent(raw, local_sign(setup), setup.root) as agent:
        assert await eventually(lambda: endpoints(agent, "running") == 1)
        raw["outbound"] = [upstream("running", free_address())]
        path = tmp_path / "agent.yaml"
        path.write_text(yaml.safe_dump(raw))
        await agent.reload(path)
        assert reloads(agent, "ok") == 1
        assert endpoints(agent, "running") == 1
        retries = {"upstream": "running"}
        assert (
            agent.metrics.registry.get_sample_value("outrider_upstream_retries_total", retries) == 0
        )
        assert upstreams_in(generate_latest(agent.metrics.registry).decode()) == {"running"}


def endpoints(agent: Agent, name: str) -> float:
    return sum(
        sample(agent, "outrider_upstream_endpoints", upstream=name, state=state)
        for state in ("healthy", "unhealthy", "ejected")
    )


async def test_refused_reloads_of_a_kubernetes_upstream_leave_no_thread_and_no_series(
    setup: CaSetup, ca: CaProcess, tmp_path: Path
) -> None:
    """A real agent that watches EndpointSlices (a stub API server, its in-cluster config)
    is asked three times for another watched upstream on a busy port: each is refused, and
    afterwards it runs the threads it ran before and shows no series for that upstream."""
    tls = loopback_tls(tmp_path, "kube-apiserver")
    watched = {"kubernetes": {"service": "backend", "namespace": "shop"}}
    async with stub_api_server(tls.server_context) as api:
        launcher, env = in_cluster(api.port, tls.ca_file, tmp_path)
        raw = served_yaml(
            setup,
            ca,
            "frontend",
            outbound=[upstream("backend", "127.0.0.1:0", **watched)],
        )
        started = agent_process(tmp_path, "frontend", raw, launcher=launcher, env=env)
        with contextlib.ExitStack() as stack:
            agent = await asyncio.to_thread(stack.enter_context, started)

            def watching(version: str) -> bool:  # the watch the stub holds open, once relisted
                return any(query.get("resourceVersion") == version for query in api.queries)

            async def until_true(condition: Callable[[], bool]) -> bool:
                return await asyncio.to_thread(until, condition)

            assert await until_true(lambda: watching("49130")), "".join(agent.log)
            threads = agent.threads()
            with busy_port() as busy:
                for attempt in range(1, 4):
                    raw["outbound"] = [
                        upstream("backend", "127.0.0.1:0", **watched),
                        upstream("extra", busy, **watched),
                    ]
                    (tmp_path / "frontend.yaml").write_text(yaml.safe_dump(raw))
                    agent.process.send_signal(signal.SIGHUP)
                    assert await until_true(lambda n=attempt: refusals(agent) == n)  # type: ignore[misc]
                await asyncio.sleep(0.5)  # what leaked would be listing and watching by now
            exposition = await asyncio.to_thread(agent.metrics)
            assert upstreams_in(exposition) == {"backend"}
            assert await until_true(lambda: agent.threads() == threads), agent.threads()


def test_fixing_the_new_policy_file_of_a_refused_config_reloads_it(
    setup: CaSetup, ca: CaProcess, tmp_path: Path
) -> None:
    """The refusal says what to fix; fixing it is enough, even in a file only the refused
    config names (watched from the refusal on), without another SIGHUP."""
    running, added = tmp_path / "running.yaml", tmp_path / "added.yaml"
    running.write_text(POLICY)
    raw = served_yaml(
        setup,
        ca,
        "backend",
        policy={"files": [str(running)]},
    )
    with agent_process(tmp_path, "backend", raw) as agent:
        added.write_text("policies:\n  - name: broken\n    action: PERMIT\n")
        raw["policy"] = {"files": [str(running), str(added)]}
        (tmp_path / "backend.yaml").write_text(yaml.safe_dump(raw))
        agent.process.send_signal(signal.SIGHUP)
        assert until(lambda: refusals(agent) == 1), "".join(agent.log)
        # Where to fix it; the line goes out through the log's writer thread, which may be
        # behind the counter the refusal bumped: waited for, not assumed.
        assert until(lambda: f"{added}:3:13: " in "".join(agent.log)), "".join(agent.log)
        added.write_text(POLICY.replace("name: api", "name: another"))
        reloaded = lambda: agent.sample("outrider_config_reloads_total", kind="agent", result="ok")  # noqa: E731
        assert until(lambda: reloaded() == 1), "".join(agent.log)
        assert refusals(agent) == 1


def test_a_sighup_as_the_agent_becomes_ready_reloads_it_and_does_not_kill_it(
    setup: CaSetup, ca: CaProcess, tmp_path: Path
) -> None:
    """SIGHUP is caught from the start: one sent the moment the agent says it is ready
    (before, the default action killed it) reloads what changed meanwhile."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    raw = served_yaml(setup, ca, "backend", policy={"files": [str(policy)]})
    with agent_process(tmp_path, "backend", raw) as agent:
        policy.write_text(POLICY.replace("name: api", "name: another"))
        agent.process.send_signal(signal.SIGHUP)
        reloaded = lambda: agent.sample("outrider_config_reloads_total", kind="policy", result="ok")  # noqa: E731
        assert until(lambda: reloaded() == 1), "".join(agent.log)
        assert agent.process.poll() is None


def test_a_fix_written_as_soon_as_the_refusal_shows_is_picked_up(
    setup: CaSetup, ca: CaProcess, tmp_path: Path
) -> None:
    """The watcher reads a file the refused config named from its next look on; a fix
    written before then is still a change from what the refused reload read."""
    running, added = tmp_path / "running.yaml", tmp_path / "added.yaml"
    running.write_text(POLICY)
    raw = served_yaml(setup, ca, "backend", policy={"files": [str(running)]})
    with agent_process(tmp_path, "backend", raw) as agent:
        added.write_text("policies:\n  - name: broken\n    action: PERMIT\n")
        raw["policy"] = {"files": [str(running), str(added)]}
        (tmp_path / "backend.yaml").write_text(yaml.safe_dump(raw))  # the watcher reloads
        assert until(lambda: refusals(agent) == 1, 5), "".join(agent.log)
        added.write_text(POLICY.replace("name: api", "name: another"))
        reloaded = lambda: agent.sample("outrider_config_reloads_total", kind="agent", result="ok")  # noqa: E731
        assert until(lambda: reloaded() == 1, 5), "".join(agent.log)
        assert refusals(agent) == 1
