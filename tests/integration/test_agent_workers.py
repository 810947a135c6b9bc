"""`workers: 2` in a real `outrider agent run` against a real `ca serve`: both worker
processes serve the port, the agent makes one CSR per rotation whatever its workers,
no key reaches the disk, /metrics adds the workers up, a reload and a rotation reach
every worker, as does a control plane's snapshot (over the one stream of the agent),
a worker that dies is started again, and SIGTERM drains them all.

The agent's SVID lives 2 s, so it rotates about every second through the module.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from tests import certs
from tests.control import bootstrap, control_plane
from tests.httpraw import Responses, connect, get
from tests.integration.test_agent_control_plane import DENY_ALL, frontend, snapshot
from tests.mesh import (
    AgentProcess,
    agent_process,
    echo_server,
    inbound,
    mtls_exchange,
    outbound,
    served_agent_yaml,
    threaded_app,
    workload,
)
from tests.support import CaProcess, CaSetup, free_port

NAME, ROTATING = "workers", "rotating"
CONNECTIONS = 24  # each lands on a worker by the kernel's hash: all on one is 2**-23


@pytest.fixture(scope="module")
def app() -> Iterator[int]:
    async def answer(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    application = web.Application()
    application.router.add_get("/{tail:.*}", answer)
    with threaded_app(application) as port:
        yield port


def workers_yaml(
    setup: CaSetup, ca: CaProcess, app: int, name: str = NAME, **sections: Any
) -> dict[str, Any]:
    return served_agent_yaml(
        setup, ca, name, inbound=inbound(app, protocol="http"), workers=2, **sections
    )


@pytest.fixture(scope="module")
def agent(setup: CaSetup, ca: CaProcess, app: int) -> Iterator[AgentProcess]:
    with agent_process(setup.root, NAME, workers_yaml(setup, ca, app)) as process:
        yield process


@pytest.fixture(scope="module")
def rotating(setup: CaSetup, ca: CaProcess, app: int) -> Iterator[AgentProcess]:
    """An agent whose SVID lives 2 s: it rotates about every second."""
    raw = workers_yaml(setup, ca, app, ROTATING)
    raw["identity"]["ttl"] = "2s"
    with agent_process(setup.root, ROTATING, raw) as process:
        yield process


def children(agent: AgentProcess) -> set[int]:
    """The worker processes: the agent's children."""
    pid = agent.process.pid
    return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


def eventually(check: Any, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"not within {seconds}s"
        time.sleep(0.05)


def request(setup: CaSetup, agent: AgentProcess, path: str = "/") -> tuple[int, int]:
    """One request on a new connection: the status, and the serial of the SVID it met."""
    with connect(setup, agent) as tls:
        tls.sendall(get(path))
        reply = Responses(tls).next()
        der = tls.getpeercert(binary_form=True)
    assert reply is not None and der is not None
    return reply.status, x509.load_der_x509_certificate(der).serial_number


def test_both_workers_serve_and_metrics_add_them_up(setup: CaSetup, agent: AgentProcess) -> None:
    before = agent.total("outrider_connections_total", direction="inbound")
    statuses = [request(setup, agent)[0] for _ in range(CONNECTIONS)]
    assert statuses == [200] * CONNECTIONS
    each = accepted(agent)
    assert all(n > 0 for n in each), each  # the kernel spread them over both
    total = agent.total("outrider_connections_total", direction="inbound")
    assert total - before == CONNECTIONS  # one count per connection, summed over workers
    assert total == sum(each)
    metrics = agent.metrics()
    assert metrics.count("outrider_build_info{") == 1  # one agent, however many processes
    assert agent.total("outrider_listener_info") == 1  # the port once, not once a worker
    assert agent.sample("outrider_workers") == 2
    assert len(children(agent)) == 2


def test_every_worker_waits_for_a_client_that_speaks_late_and_counts_one_that_leaves(
    setup: CaSetup, agent: AgentProcess
) -> None:
    """The first byte is waited for in whichever worker the kernel gave the connection:
    a client that says nothing for a while and then handshakes is served, one that
    leaves before a byte is a refused handshake, and neither costs the other."""
    context = certs.client_context(setup.bundle_pem, certs.valid_svid(setup, workload("frontend")))
    host, port = agent.bound["inbound[0]"].rsplit(":", 1)
    refused = agent.total("outrider_tls_handshakes_total", direction="inbound", result="refused")
    served = agent.total("outrider_connections_total", direction="inbound")
    silent = [socket.create_connection((host, int(port)), timeout=5) for _ in range(CONNECTIONS)]
    left = [socket.create_connection((host, int(port)), timeout=5) for _ in range(CONNECTIONS)]
    for sock in left:
        sock.close()
    time.sleep(0.2)  # every connection accepted and waited on, without a byte
    for sock in silent:
        with context.wrap_socket(sock) as tls:
            tls.sendall(get("/"))
            reply = Responses(tls).next()
            assert reply is not None and reply.status == 200
    assert agent.total("outrider_connections_total", direction="inbound") - served == CONNECTIONS
    eventually(
        lambda: (
            agent.total("outrider_tls_handshakes_total", direction="inbound", result="refused")
            - refused
            == CONNECTIONS
        )
    )
    assert all(n > 0 for n in accepted(agent))


def test_one_csr_per_rotation_for_the_whole_agent(setup: CaSetup, rotating: AgentProcess) -> None:
    def rotations(**result: str) -> float:
        return rotating.total("outrider_svid_rotations_total", **result)

    eventually(lambda: rotations(result="success") >= 3)
    installed = rotations(result="success")
    ours = f"/sa/{ROTATING}"
    issued = [e for e in setup.audit() if e["result"] == "issued" and e["spiffe_id"].endswith(ours)]
    tried = rotations()  # every renewal, failed ones too (one the CA issued may time out here)
    # Three processes each renewing would be three CSRs a rotation; one in flight may
    # be issued and not yet counted.
    assert installed <= len(issued) <= tried + 1


def test_every_worker_serves_the_svid_of_the_latest_rotation(
    setup: CaSetup, rotating: AgentProcess
) -> None:
    def all_current() -> bool:
        current = int(rotating.certs()["serial"], 16)
        try:
            met = {request(setup, rotating)[1] for _ in range(8)}
        except ssl.SSLError:  # rotated, and the one we met expired, as we connected
            return False
        return met == {current}

    eventually(all_current)


def test_no_key_is_written_to_disk(setup: CaSetup, agent: AgentProcess) -> None:
    """Every file any of the agent's processes holds open, and every file in the temporary
    directories since it started, is free of a private key."""
    started = Path(f"/proc/{agent.process.pid}").stat().st_mtime
    opened: set[Path] = set()
    for pid in {agent.process.pid, *children(agent)}:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            target = Path(os.readlink(fd)) if fd.is_symlink() else None
            if target is not None and target.is_file():
                opened.add(target)
    temporary = {
        path
        for directory in (Path("/tmp"), Path("/dev/shm"), Path(os.environ.get("TMPDIR", "/tmp")))
        for path in directory.glob("*")
        if path.is_file() and path.stat().st_mtime >= started
    }
    for path in opened | temporary | set(setup.root.rglob("*")):
        if path.is_file() and path.name != "root.key" and path.parent.name != "ca":
            assert b"PRIVATE KEY" not in path.read_bytes(), path


def test_a_reload_reaches_every_worker(setup: CaSetup, ca: CaProcess, app: int) -> None:
    raw = workers_yaml(setup, ca, app, "reloaded")
    with agent_process(setup.root, "reloaded", raw) as agent:
        raw["policy"] = {
            "default_action": "deny",
            "policies": [],
        }
        (setup.root / "reloaded.yaml").write_text(yaml.safe_dump(raw))
        eventually(
            lambda: agent.sample("outrider_config_reloads_total", kind="agent", result="ok") == 1
        )
        before = accepted(agent)
        statuses = {request(setup, agent)[0] for _ in range(CONNECTIONS)}
        assert statuses == {403}
        assert all(a > b for a, b in zip(accepted(agent), before, strict=True))  # both took some


def accepted(agent: AgentProcess) -> list[float]:
    return [agent.sample("outrider_worker_connections_total", worker=str(i)) for i in (0, 1)]


async def test_one_stream_to_the_control_plane_and_its_snapshots_reach_every_worker(
    setup: CaSetup, ca: CaProcess
) -> None:
    async with echo_server() as app_port:
        with control_plane(setup, snapshot(app_port)) as plane:
            control = bootstrap(plane.address, pod="subscribed-0")
            raw = served_agent_yaml(setup, ca, "subscribed", control=control, workers=2)
            with agent_process(setup.root, "subscribed", raw) as agent:
                address = agent.bound["inbound[0]"]
                assert await mtls_exchange(address, frontend(setup)) != b""
                version = plane.publish(snapshot(app_port, DENY_ALL))
                assert plane.answer(version).kind == "ack"
                before = accepted(agent)
                denied = [await mtls_exchange(address, frontend(setup)) for _ in range(CONNECTIONS)]
                assert denied == [b""] * CONNECTIONS
                assert all(a > b for a, b in zip(accepted(agent), before, strict=True))
                assert len(plane.wait_for_streams(1)) == 1  # one stream for the whole agent


def test_a_worker_that_dies_is_started_again(setup: CaSetup, agent: AgentProcess) -> None:
    first = children(agent)
    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    eventually(lambda: agent.sample("outrider_worker_restarts_total") == 1)
    eventually(lambda: agent.status("/ready") == 200 and len(children(agent)) == 2)
    assert victim not in children(agent)
    assert [request(setup, agent)[0] for _ in range(8)] == [200] * 8


def test_a_worker_that_does_not_take_a_reload_in_time_is_started_again_on_it(
    setup: CaSetup, ca: CaProcess, app: int
) -> None:
    """A stalled worker neither holds a valid config back nor takes it late, alone: it is
    killed, and started again on what every other worker runs (here a deny; as easily a
    port strict again)."""
    raw = workers_yaml(setup, ca, app, "stalled")
    env = {"OUTRIDER_WORKER_APPLY_TIMEOUT": "1"}
    with agent_process(setup.root, "stalled", raw, env=env) as agent:
        stalled = max(children(agent))
        os.kill(stalled, signal.SIGSTOP)
        try:
            denying = {**raw, "policy": {"default_action": "deny", "policies": []}}
            (setup.root / "stalled.yaml").write_text(yaml.safe_dump(denying))
            taken = {"kind": "agent", "result": "ok"}
            eventually(lambda: agent.sample("outrider_config_reloads_total", **taken) == 1)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stalled, signal.SIGCONT)
        eventually(lambda: agent.sample("outrider_worker_restarts_total") == 1)
        eventually(lambda: agent.status("/ready") == 200 and stalled not in children(agent))
        before = accepted(agent)
        assert {request(setup, agent)[0] for _ in range(CONNECTIONS)} == {403}
        assert all(a > b for a, b in zip(accepted(agent), before, strict=True))  # both denied


def test_workers_starting_together_on_a_busy_node_are_not_taken_for_stalled(
    setup: CaSetup, ca: CaProcess, app: int
) -> None:
    """A new worker's first settings wait for its interpreter and imports too: six of
    them on two CPUs, with a 1 s timeout for a switch, all start and none is killed."""
    raw = workers_yaml(setup, ca, app, "six")
    raw["workers"] = 6
    env = {"OUTRIDER_WORKER_APPLY_TIMEOUT": "1"}
    with agent_process(setup.root, "six", raw, env=env) as agent:
        eventually(lambda: agent.status("/ready") == 200)
        assert len(children(agent)) == 6
        assert agent.sample("outrider_worker_restarts_total") == 0


def test_a_worker_that_stops_answering_is_started_again(
    setup: CaSetup, ca: CaProcess, app: int
) -> None:
    """The kernel goes on handing a stopped worker its share of new connections, each left
    waiting: the heartbeat finds it, and it is killed and started again."""
    raw = workers_yaml(setup, ca, app, "silent")
    env = {"OUTRIDER_WORKER_APPLY_TIMEOUT": "1"}
    with agent_process(setup.root, "silent", raw, env=env) as agent:
        silent = max(children(agent))
        os.kill(silent, signal.SIGSTOP)
        eventually(lambda: agent.sample("outrider_worker_restarts_total") == 1)
        eventually(lambda: agent.status("/ready") == 200 and silent not in children(agent))
        assert {request(setup, agent)[0] for _ in range(CONNECTIONS)} == {200}


#: Put on PYTHONPATH, it makes each new worker process misbehave while FAULT names a
#: file: "crash", its channel closed and the process gone a moment after (an error in
#: its start); "once", the same for the first worker only; "slow:S", its start S
#: seconds longer (a busy node); "wedge", stopped 4 s after its start, by when it
#: serves (its loop stuck); "deaf", its channel ended then, and stopped.
FAULTY_START = """\
import os, signal, socket, sys, threading, time
fault = os.environ.get("FAULT", "")
if "agent.worker" in getattr(sys, "orig_argv", ()) and os.path.exists(fault):
    mode = open(fault).read()
    def stop(deaf):
        time.sleep(4)
        if deaf:
            channel = socket.socket(fileno=int(sys.orig_argv[-2]))
            channel.shutdown(socket.SHUT_WR)
        os.kill(os.getpid(), signal.SIGSTOP)
    if mode.startswith("slow:"):
        time.sleep(float(mode[5:]))
    elif mode in ("wedge", "deaf"):
        threading.Thread(target=stop, args=(mode == "deaf",), daemon=True).start()
    elif mode == "crash" or not os.path.exists(fault + ".crashed"):
        open(fault + ".crashed", "w").close()
        os.close(int(sys.orig_argv[-2]))
        time.sleep(0.3)
        os._exit(7)
"""


@pytest.fixture
def faulty(setup: CaSetup, tmp_path: Path) -> dict[str, str]:
    """The environment that gives an agent's new workers FAULTY_START."""
    (tmp_path / "sitecustomize.py").write_text(FAULTY_START)
    path = os.pathsep.join([str(tmp_path), str(Path(__file__).parents[2])])
    return {
        "PYTHONPATH": path,
        "FAULT": str(tmp_path / "fault"),
        "OUTRIDER_WORKER_APPLY_TIMEOUT": "1",
    }


@contextmanager
def faulting(
    setup: CaSetup, ca: CaProcess, app: int, name: str, env: dict[str, str], mode: str
) -> Iterator[tuple[AgentProcess, int]]:
    """An agent whose new workers start with `mode` (FAULTY_START) once it serves, and
    one of its workers killed to start one: the agent and the killed worker's pid."""
    with agent_process(setup.root, name, workers_yaml(setup, ca, app, name), env=env) as agent:
        Path(env["FAULT"]).write_text(mode)
        victim = max(children(agent))
        os.kill(victim, signal.SIGKILL)
        yield agent, victim


def test_a_worker_that_keeps_dying_on_its_own_ends_the_agent(
    setup: CaSetup, ca: CaProcess, app: int, faulty: dict[str, str]
) -> None:
    """Counted, however its channel and its process end: the kubelet restarts the pod."""
    with faulting(setup, ca, app, "crashing", faulty, "crash") as (agent, _):
        agent.process.wait(timeout=30)
        assert agent.process.returncode != 0


def test_a_worker_that_crashes_as_the_agent_starts_is_started_again_on_its_settings(
    setup: CaSetup, ca: CaProcess, app: int, faulty: dict[str, str]
) -> None:
    Path(faulty["FAULT"]).write_text("once")
    raw = workers_yaml(setup, ca, app, "crash-once")
    with agent_process(setup.root, "crash-once", raw, env=faulty) as agent:
        eventually(lambda: agent.sample("outrider_worker_restarts_total") == 1)
        eventually(lambda: agent.status("/ready") == 200 and len(children(agent)) == 2, 15)
        assert agent.sample("outrider_worker_restarts_total") == 1
        assert {request(setup, agent)[0] for _ in range(CONNECTIONS)} == {200}


def test_a_worker_that_stops_answering_again_and_again_ends_the_agent(
    setup: CaSetup, ca: CaProcess, app: int, faulty: dict[str, str]
) -> None:
    """Broken, not the node slow: past MAX_STALLS kills within STALL_WINDOW, as a crash loop
    ends it (the test's window: 60 s; four kills take about 20 s here)."""
    with faulting(setup, ca, app, "wedging", faulty, "wedge") as (agent, _):
        agent.process.wait(timeout=90)
        assert agent.process.returncode != 0
        assert any("worker 1 stopped answering 4 times within 60s" in line for line in agent.log)


def test_sigterm_while_a_worker_restarts_drains_at_once(
    setup: CaSetup, ca: CaProcess, app: int, faulty: dict[str, str]
) -> None:
    """Not after the replacement's first settings, which may take 90 s: the kubelet's
    grace period is 30."""
    with faulting(setup, ca, app, "restarting", faulty, "slow:8") as (agent, victim):
        eventually(lambda: len(children(agent) - {victim}) == 2)
        agent.process.send_signal(signal.SIGTERM)
        eventually(lambda: any("draining 2 worker(s)" in line for line in agent.log), 3)
        agent.process.wait(timeout=30)  # once the slow one has started and drained
        assert agent.process.returncode == 0


def test_a_worker_whose_channel_ends_while_it_lives_is_killed_and_counted(
    setup: CaSetup, ca: CaProcess, app: int, faulty: dict[str, str]
) -> None:
    """Stopped, it would hold its share of new connections; it cannot be told to drain."""
    with faulting(setup, ca, app, "deaf", faulty, "deaf") as (agent, _):
        eventually(lambda: agent.sample("outrider_worker_restarts_total") >= 2, 20)


def test_a_replacement_slow_to_start_is_not_taken_for_stalled(
    setup: CaSetup, ca: CaProcess, app: int, faulty: dict[str, str]
) -> None:
    """Its first settings have STARTUP more, and the heartbeat leaves it alone meanwhile."""
    with faulting(setup, ca, app, "slow-start", faulty, "slow:2.5") as (agent, victim):
        eventually(lambda: agent.sample("outrider_worker_restarts_total") == 1)
        eventually(lambda: agent.status("/ready") == 200 and victim not in children(agent), 15)
        assert len(children(agent)) == 2
        assert agent.sample("outrider_worker_restarts_total") == 1  # never killed as stalled


def test_a_worker_started_again_while_the_bundle_file_is_unusable_serves(
    setup: CaSetup, ca: CaProcess, app: int, tmp_path: Path
) -> None:
    """A restarted worker takes the main's SVID with the roots the main chose, as sent: it
    does not judge the bundle file again (gone, that kept it from ever serving)."""
    raw = workers_yaml(setup, ca, app, "restarted")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(setup.bundle_pem)
    raw["ca"]["bundle_file"] = str(bundle)
    with agent_process(setup.root, "restarted", raw) as agent:
        bundle.unlink()
        assert agent.logged(f"cannot read {bundle}", timeout=10)
        os.kill(min(children(agent)), signal.SIGKILL)
        eventually(lambda: agent.sample("outrider_worker_restarts_total") == 1)
        eventually(lambda: agent.status("/ready") == 200 and len(children(agent)) == 2)
        assert [request(setup, agent)[0] for _ in range(8)] == [200] * 8


def test_sigterm_drains_every_worker(setup: CaSetup, ca: CaProcess, app: int) -> None:
    with agent_process(setup.root, "drained", workers_yaml(setup, ca, app, "drained")) as agent:
        workers = children(agent)
        held = [connect(setup, agent) for _ in range(8)]  # idle keep-alive, on both workers
        try:
            agent.process.send_signal(signal.SIGTERM)
            assert agent.process.wait(timeout=10) == 0
            for pid in workers:
                assert not Path(f"/proc/{pid}").exists() or _zombie(pid)
            for tls in held:
                with pytest.raises((ssl.SSLError, OSError, AssertionError)):
                    tls.sendall(get("/"))
                    assert Responses(tls).next() is not None
        finally:
            for tls in held:
                tls.close()


def _zombie(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


def test_one_worker_is_one_process_as_ever(setup: CaSetup, ca: CaProcess, app: int) -> None:
    raw = served_agent_yaml(setup, ca, "single", inbound=inbound(app, protocol="http"))
    with agent_process(setup.root, "single", raw) as agent:
        assert request(setup, agent)[0] == 200
        assert children(agent) == set()
        assert "outrider_workers" not in agent.metrics()


def test_workers_end_when_their_main_process_is_killed(
    setup: CaSetup, ca: CaProcess, app: int
) -> None:
    with agent_process(setup.root, "orphaned", workers_yaml(setup, ca, app, "orphaned")) as agent:
        workers = children(agent)
        agent.process.kill()
        agent.process.wait()
        eventually(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers))


# -- per-request counts over workers (counted as Tallies: agent/adapters/metrics.py) -------

#: What the counted pair's app answers, by path; `/admin` the server's policy denies, and
#: `/missing` an AUDIT policy records.
STATUSES = {"/": 200, "/missing": 404, "/admin": 403}


@pytest.fixture(scope="module")
def statuses_app() -> Iterator[int]:
    async def answer(request: web.Request) -> web.Response:
        return web.Response(status=404 if request.path == "/missing" else 200, text="ok")

    application = web.Application()
    application.router.add_get("/{tail:.*}", answer)
    with threaded_app(application) as port:
        yield port


def _ask(address: str, paths: list[str], keep_alive: bool) -> list[int]:
    """GET each path through a client agent's outbound; their statuses."""
    host, port = address.rsplit(":", 1)
    answered = []
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        for path in paths:
            headers = {} if keep_alive else {"Connection": "close"}
            connection.request("GET", path, headers=headers)
            reply = connection.getresponse()
            reply.read()
            answered.append(reply.status)
            if not keep_alive:
                connection.close()
    finally:
        connection.close()
    return answered


def _upstream_series(agent: AgentProcess, upstream: str) -> dict[str, float]:
    """The upstream's request series: codes and its duration histogram, summed over workers."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(agent.metrics()):
        for s in family.samples:
            if s.labels.get("upstream") != upstream:
                continue
            if s.name == "outrider_upstream_requests_total":
                found[f"code {s.labels['code']}"] = s.value
            elif s.name.startswith("outrider_upstream_request_duration_seconds"):
                le = s.labels.get("le")
                found[s.name.rsplit("_", 1)[1] + (f" {le}" if le else "")] = s.value
    return found


def test_request_counts_over_workers_are_every_request_once_across_a_reload(
    setup: CaSetup, ca: CaProcess, statuses_app: int
) -> None:
    """Both agents of an L7 pair run two workers: /metrics counts each request once, by
    status, on both sides (the duration histogram's count, +Inf bucket and buckets with
    them), and each decision and audit record once; an upstream a reload removes loses
    its series, and re-added starts from 0."""
    policy = {
        "policies": [
            {
                "name": "guard",
                "action": "DENY",
                "rules": [{"name": "no-admin", "to": {"paths": ["/admin"]}}],
            },
            {
                "name": "watch",
                "action": "AUDIT",
                "rules": [{"name": "misses", "to": {"paths": ["/missing"]}}],
            },
        ]
    }
    server_raw = workers_yaml(setup, ca, statuses_app, "counted-server", policy=policy)
    with agent_process(setup.root, "counted-server", server_raw) as server:
        upstream = outbound(server.bound["inbound[0]"], workload("counted-server"))
        upstream[0].update(protocol="http", listen=f"127.0.0.1:{free_port()}")  # kept on reload
        client_raw = served_agent_yaml(setup, ca, "counted-client", workers=2, outbound=upstream)
        with agent_process(setup.root, "counted-client", client_raw) as client:
            paths = [*STATUSES] * 10
            address = client.bound["outbound[backend]"]
            sent = _ask(address, paths, keep_alive=True) + _ask(address, paths, keep_alive=False)
            assert sent == [STATUSES[p] for p in paths] * 2
            assert all(n > 0 for n in accepted(client)), accepted(client)  # both workers counted
            expected = {code: float(sent.count(code)) for code in STATUSES.values()}
            series = _upstream_series(client, "backend")
            assert {k: v for k, v in series.items() if k.startswith("code")} == {
                f"code {code}": n for code, n in expected.items()
            }
            assert series["count"] == series["bucket +Inf"] == len(sent) and series["sum"] > 0
            buckets = [v for k, v in series.items() if k.startswith("bucket")]
            assert buckets == sorted(buckets)
            caller = str(workload("counted-client"))
            for code, n in expected.items():
                counted = server.total(
                    "outrider_requests_total", direction="inbound", peer_id=caller, code=str(code)
                )
                assert counted == n, (code, counted)
            decided = {
                (s.labels["decision"], s.labels["policy"], s.labels["rule"]): s.value
                for family in text_string_to_metric_families(server.metrics())
                for s in family.samples
                if s.name == "outrider_authz_decisions_total"
            }
            assert decided == {  # each request decided once, its AUDIT record beside it
                ("allow", "default", "allow-authenticated"): expected[200] + expected[404],
                ("deny", "guard", "no-admin"): expected[403],
                ("audit", "watch", "misses"): expected[404],
            }
            for page in (client.metrics(), server.metrics()):
                assert "_created" not in page

            removed = {**client_raw, "outbound": []}
            _reload(setup, client, "counted-client", removed, 1)
            assert _upstream_series(client, "backend") == {}
            _reload(setup, client, "counted-client", client_raw, 2)
            assert _ask(address, ["/"], keep_alive=True) == [200]
            series = _upstream_series(client, "backend")
            assert series["code 200"] == series["count"] == series["bucket +Inf"] == 1


def _reload(setup: CaSetup, agent: AgentProcess, name: str, raw: dict[str, Any], n: int) -> None:
    (setup.root / f"{name}.yaml").write_text(yaml.safe_dump(raw))
    eventually(
        lambda: agent.sample("outrider_config_reloads_total", kind="agent", result="ok") == n
    )
    eventually(lambda: agent.status("/ready") == 200)
