"""Pods as network namespaces (tests/netns.py): what an end-to-end test relies on.

Each pod has its own loopback and ports, pods and the node reach each other by
IP, a process started in a pod is that process, and nothing is left behind:
not after a failing test, not after a run killed outright, while a concurrent
run's network is never touched. Last, the reason for all this: real agents in
two pods, on the same fixed ports, talking over mTLS with a real CA on the node.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Coroutine
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.mesh import agent_process, agent_yaml, workload
from tests.netns import NETNS_DIR, Mount, Pod, PodNetwork, pod_network, running
from tests.support import CaSetup, ca_process, make_ca_setup

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Coroutine[Any, Any, None]]


def answering(name: str) -> Handler:
    """An app that reads one line and answers who it is, what it heard and from whom."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        peer = writer.get_extra_info("peername")[0]
        writer.write(f"{name} heard {line.decode().strip()} from {peer}".encode())
        await writer.drain()
        writer.close()

    return answer


async def ask(pod: Pod, host: str, port: int, line: str = "hello") -> str:
    """Send one line from inside `pod` to host:port; the whole answer."""
    reader, writer = await pod.open_connection(host, port)
    try:
        writer.write(f"{line}\n".encode())
        return (await asyncio.wait_for(reader.read(), 5)).decode()
    finally:
        writer.close()


def leftovers(tag: str) -> list[str]:
    """What of the network `tag` exists: namespaces, the root link, its route."""
    names = [p.name for p in NETNS_DIR.iterdir() if p.name.startswith(tag)]
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True, check=True)
    return names + [line for line in links.stdout.splitlines() if line.startswith(f"{tag}@")]


async def test_every_pod_has_its_own_loopback_and_ports(pods: PodNetwork) -> None:
    a, b = pods.add_pod("a"), pods.add_pod("b")
    servers = [
        await pod.start_server(answering(f"{pod.name}:{port}"), host, port)
        for pod in (a, b)
        for host, port in (("0.0.0.0", 15443), ("127.0.0.1", 15001))
    ]
    try:
        assert await ask(a, "127.0.0.1", 15001) == "a:15001 heard hello from 127.0.0.1"
        assert await ask(b, "127.0.0.1", 15001) == "b:15001 heard hello from 127.0.0.1"
        assert await ask(b, "127.0.0.1", 15443) == "b:15443 heard hello from 127.0.0.1"
    finally:
        for server in servers:
            server.close()


async def test_pods_reach_each_other_and_the_node_by_ip(pods: PodNetwork) -> None:
    a, b = pods.add_pod("a"), pods.add_pod("b")
    assert (a.ip, b.ip) != (pods.node_ip, pods.node_ip) and a.ip != b.ip
    node = await asyncio.start_server(answering("node"), pods.node_ip, 0)
    node_port = node.sockets[0].getsockname()[1]
    in_b = await b.start_server(answering("b"), "0.0.0.0", 15443)
    try:
        assert await ask(a, b.ip, 15443) == f"b heard hello from {a.ip}"
        assert await ask(a, pods.node_ip, node_port) == f"node heard hello from {a.ip}"
        assert await ask(b, pods.node_ip, node_port) == f"node heard hello from {b.ip}"
    finally:
        node.close()
        in_b.close()


async def test_a_process_started_in_a_pod_is_that_process_with_its_pipes(
    pods: PodNetwork,
) -> None:
    pod = pods.add_pod("web")
    assert f"{pod.ip}/24" in pod.run(["ip", "-br", "address", "show", "eth0"]).stdout
    serve = (
        "import socket, time\n"
        "server = socket.create_server(('127.0.0.1', 15001))\n"
        "print('up', flush=True)\n"
        "server.accept()[0].sendall(b'from the process')\n"
        "time.sleep(60)\n"
    )
    process = pod.popen([sys.executable, "-c", serve], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    assert process.stdout.readline() == "up\n"
    # The PID is the program's own, not a wrapper's, and it runs in the pod's namespace.
    assert Path(f"/proc/{process.pid}/exe").resolve() == Path(sys.executable).resolve()
    in_pod, ours = os.stat(f"/proc/{process.pid}/ns/net"), os.stat(pod.netns_path)
    assert (in_pod.st_dev, in_pod.st_ino) == (ours.st_dev, ours.st_ino)
    reader, writer = await pod.open_connection("127.0.0.1", 15001)
    assert await asyncio.wait_for(reader.read(), 5) == b"from the process"
    writer.close()
    process.kill()
    assert process.wait(5) == -signal.SIGKILL


def test_a_process_started_as_a_user_is_that_uid_without_network_privileges(
    pods: PodNetwork,
) -> None:
    pod = pods.add_pod("web")
    ids = "import os; print(os.getresuid(), os.getresgid(), os.getgroups())"
    assert pod.run([sys.executable, "-c", ids], user=1337).stdout == (
        "(1337, 1337, 1337) (1337, 1337, 1337) []\n"
    )
    process = pod.popen([sys.executable, "-c", ids], user=1000, stdout=subprocess.PIPE, text=True)
    assert process.communicate(timeout=5)[0] == "(1000, 1000, 1000) (1000, 1000, 1000) []\n"
    refused = pod.run(["ip", "link", "set", "lo", "down"], user=1000, check=False)
    assert refused.returncode != 0 and "Operation not permitted" in refused.stderr
    with pytest.raises(ValueError, match="a UID is 0 to 4294967294"):
        pod.command(["id"], user=-1)


def test_a_container_sees_its_pods_volumes_and_no_other_pods(
    pods: PodNetwork, tmp_path: Path
) -> None:
    """As the container runtime mounts them: a volume of the pod's at its path (read-only
    if so mounted), the kubelet's directory of every pod's volumes out of sight, and
    (`own_pids`) none of the node's processes."""
    pod = pods.add_pod("web")
    kubelet = tmp_path / "kubelet"
    ours, theirs = kubelet / "web" / "data", kubelet / "other" / "data"
    for directory in (ours, theirs):
        directory.mkdir(parents=True)
        (directory / "file").write_text(directory.parent.name)
    look = (
        "import os, sys\n"
        "print(open('/run/app/data/file').read())\n"
        "print(os.path.exists(sys.argv[1]), os.path.exists(sys.argv[2]))\n"
        "try:\n"
        "    open('/run/app/data/new', 'w')\n"
        "except OSError as exc:\n"
        "    print(exc.strerror)\n"
        "print(sorted(p for p in os.listdir('/proc') if p.isdigit()) == ['1'])\n"
    )
    argv = [sys.executable, "-c", look, str(theirs / "file"), str(ours / "file")]
    command = pod.container_command(
        argv,
        user=1000,
        mounts=[Mount(ours, "/run/app/data", read_only=True)],
        hidden=[kubelet],
        own_pids=True,
    )
    done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=True)
    assert done.stdout.splitlines() == ["web", "False False", "Read-only file system", "True"]
    assert not (ours / "new").exists()
    # Without those: the node's files, by their path (a network namespace is no wall).
    print_it = [sys.executable, "-c", "import sys; print(open(sys.argv[1]).read())"]
    assert pod.run([*print_it, str(theirs / "file")], user=1000).stdout == "other\n"
    with pytest.raises(ValueError, match="under /run"):
        pod.container_command(["true"], mounts=[Mount(ours, "/etc/data")])


def test_closing_removes_everything_even_when_the_test_fails() -> None:
    with pytest.raises(RuntimeError, match="the test failed"), pod_network() as network:
        pod = network.add_pod("app")
        tracked = pod.popen(["sleep", "60"])
        # Started another way, as agent_process(prefix=pod.prefix) does, and seen to be
        # running in the pod (as that waits for the agent's "ready"): found by namespace.
        shell = [*pod.prefix, "sh", "-c", "echo running; exec sleep 60"]
        untracked = subprocess.Popen(shell, stdout=subprocess.PIPE, text=True)
        assert untracked.stdout is not None and untracked.stdout.readline() == "running\n"
        raise RuntimeError("the test failed")
    assert tracked.returncode == -signal.SIGKILL
    assert untracked.wait(5) == -signal.SIGKILL
    assert leftovers(network.tag) == []
    routes = subprocess.run(["ip", "route"], capture_output=True, text=True, check=True).stdout
    assert str(network.subnet) not in routes


# A test run in a process of its own: makes a pod with a process in it, says what it
# made once that process is in the pod (nsenter has entered: a process still starting
# is one no sweep can find), then dies by SIGKILL ("kill") or waits for a line on stdin
# and ends ("wait").
_RUN = """
import json, os, signal, subprocess, sys
from tests.netns import pod_network
with pod_network() as network:
    pod = network.add_pod("left")
    up = ["sh", "-c", "echo up; exec sleep 60"]
    sleeper = pod.popen(up, stdout=subprocess.PIPE, text=True)
    assert sleeper.stdout.readline() == "up\\n"
    print(json.dumps({"tag": network.tag, "pid": sleeper.pid}), flush=True)
    if sys.argv[1] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    input()
"""


def another_run(how: str) -> tuple[subprocess.Popen[str], str, int]:
    process = subprocess.Popen(
        [sys.executable, "-c", _RUN, how],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )
    assert process.stdout is not None
    made = json.loads(process.stdout.readline())
    return process, made["tag"], made["pid"]


def test_leftovers_of_a_killed_run_are_removed_when_the_next_starts() -> None:
    process, tag, sleeper = another_run("kill")
    assert process.wait(10) == -signal.SIGKILL
    # (Not asserted that they are there now: any run starting meanwhile removes them.)
    with pod_network():
        assert leftovers(tag) == []
        assert not running(sleeper)


def test_a_concurrent_runs_network_is_left_alone() -> None:
    process, tag, sleeper = another_run("wait")
    try:
        with pod_network() as network:
            assert network.tag != tag
            assert leftovers(tag) and running(sleeper)
    finally:
        process.communicate("done\n", timeout=10)
    assert process.returncode == 0
    assert leftovers(tag) == []


def agent_in_pod(setup: CaSetup, ca_address: str, pod: Pod, peer: Pod) -> dict[str, Any]:
    """agent.yaml as the injector would write it for `pod`: the fixed ports every pod
    uses, one upstream (the app of `peer`), its SVID from the CA on the node."""
    upstream = {
        "name": "peer",
        "listen": "127.0.0.1:15001",
        "endpoints": [f"{peer.ip}:15443"],
        "server_ids": [str(workload(peer.name))],
    }
    return agent_yaml(
        setup.root,
        pod.name,
        ca_address=ca_address,
        token=setup.issuer.token("demo", pod.name),
        inbound=[{"listen": "0.0.0.0:15443", "app": "127.0.0.1:8080"}],
        outbound=[upstream],
        admin=f"{pod.ip}:15000",  # reachable from the node, where the test reads metrics
    )


async def test_agents_in_two_pods_share_the_fixed_ports_and_talk_over_mtls(
    pods: PodNetwork, tmp_path: Path
) -> None:
    # The CA runs on the node; its serving certificate names SERVER_NAME, which agents check.
    setup = make_ca_setup(tmp_path, listen={"grpc": f"{pods.node_ip}:0", "http": "127.0.0.1:0"})
    frontend, backend = pods.add_pod("frontend"), pods.add_pod("backend")
    apps = [
        await pod.start_server(answering(pod.name), "127.0.0.1", 8080)
        for pod in (frontend, backend)
    ]
    try:
        with ca_process(setup.config) as ca, ExitStack() as stack:
            ca_address = f"{pods.node_ip}:{ca.grpc_port}"
            agents = {
                pod.name: stack.enter_context(
                    agent_process(
                        tmp_path,
                        pod.name,
                        agent_in_pod(setup, ca_address, pod, peer),
                        prefix=pod.prefix,
                    )
                )
                for pod, peer in ((backend, frontend), (frontend, backend))
            }
            for agent in agents.values():
                assert agent.bound["inbound[0]"] == "0.0.0.0:15443"
                assert agent.bound["outbound[peer]"] == "127.0.0.1:15001"
            # Each app hears the request from its own agent, on its pod's loopback.
            assert await ask(frontend, "127.0.0.1", 15001) == "backend heard hello from 127.0.0.1"
            assert await ask(backend, "127.0.0.1", 15001) == "frontend heard hello from 127.0.0.1"
            # Each agent saw the other's SVID on its inbound port, over TLS 1.3.
            for server, client in (("backend", "frontend"), ("frontend", "backend")):
                caller = {"peer_id": str(workload(client)), "tls_version": "TLSv1.3"}
                seen = agents[server].sample(
                    "outrider_peer_connections_total", **caller, direction="inbound"
                )
                assert seen == 1
            for agent in agents.values():
                assert agent.stop() == 0, "".join(agent.log)
    finally:
        for app in apps:
            app.close()
