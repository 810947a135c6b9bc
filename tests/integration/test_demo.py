"""`outrider demo` as a user runs it: a CA, two agents and two apps, rotating under traffic."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import needs_dev_mode

# The demo's CA runs in dev mode, which refuses to start in a pod.
pytestmark = needs_dev_mode

FRONTEND = "spiffe://demo.outrider.local/ns/demo/sa/frontend"
BACKEND = "spiffe://demo.outrider.local/ns/demo/sa/backend"
REPO = Path(__file__).resolve().parents[2]


def run_demo(
    *args: str, timeout: float = 60.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "outrider", "demo", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()  # the demo's own cleanup runs on SIGTERM; SIGKILL would orphan
        out, err = process.communicate(timeout=20)
        pytest.fail(f"demo still running after {timeout}s:\n{out}\n{err}")
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that name `text` (psutil is not a dependency)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:  # not a process, or it exited while we looked
            continue
        if text in cmdline:
            found.append(cmdline)
    return found


@pytest.mark.slow
def test_demo_serves_traffic_across_rotations_and_cleans_up() -> None:
    result = run_demo("--duration", "8")
    out = result.stdout
    assert result.returncode == 0, out + result.stderr

    progress = r"^\s+\d+s\s+requests ok [1-9]\d* denied [1-9]\d* failed 0\s+rotations"
    assert re.search(progress, out, re.M), out
    assert re.search(r"^requests\s+ok [1-9]\d*, denied by policy [1-9]\d*, failed 0$", out, re.M), (
        out
    )
    # The policy: the frontend may GET /api/*, everything else is denied.
    allowed = re.search(
        r"backend agent allow: (\d+) \(policy frontend-reads-api, rule get-api\)", out
    )
    denied = re.search(r"backend agent deny: (\d+) \(policy default, rule no ALLOW rule", out)
    assert allowed is not None and denied is not None, out
    assert int(allowed[1]) > int(denied[1]) > 0, out
    # Denied requests close their upstream connection, and rotations retire pooled
    # ones: new handshakes, on rotated SVIDs too; the rest reuse the pool.
    inbound = re.search(r"backend agent inbound: ok (\d+), refused 0", out)
    assert inbound is not None and int(inbound[1]) >= 2, out
    pooled = re.search(r"backend: (\d+) requests on (\d+) mTLS connections \((\d+) times", out)
    assert pooled is not None, out
    requests, connections, reused = map(int, pooled.groups())
    assert connections < requests and connections + reused == requests, out
    assert re.search(rf"by the backend agent: {FRONTEND} \(TLSv1\.[23]", out), out
    assert re.search(rf"by the frontend agent: {BACKEND} \(TLSv1\.[23]", out), out

    serials = {
        name: (first, last)
        for name, first, last in re.findall(r"serial\s+(\w+): (\w+) -> (\w+)", out)
    }
    assert set(serials) == {"frontend", "backend"}, out
    for first, last in serials.values():
        assert first != last, out
    assert "verify -x509_strict of the backend's SVID" in out

    logs = re.search(r"^logs\s+(/\S+)/\{", out, re.M)
    assert logs is not None, out
    assert not Path(logs[1]).exists(), "the demo's temp dir outlived a successful run"
    # Its files are gone, so it says how to get a set that stays (README, "Run it by hand").
    assert out.rstrip().endswith(
        "its files are gone: `outrider demo --keep DIR` keeps them, with a README.md of the"
        " commands that start this mesh by hand"
    ), out
    assert processes_mentioning(logs[1]) == []


def test_demo_refuses_a_duration_it_cannot_run() -> None:
    result = run_demo("--duration", "0", timeout=20)
    assert result.returncode == 2  # bad input, as every command's
    assert "argument --duration: '0': traffic must run for some time" in result.stderr


def readme_commands(readme: str) -> list[list[str]]:
    """Every command of the README's ```sh blocks, split as a shell would."""
    blocks = re.findall(r"^```sh\n(.*?)^```$", readme, re.M | re.S)
    return [shlex.split(line) for block in blocks for line in block.splitlines() if line.strip()]


def runnable(command: list[str]) -> list[str]:
    """The command as written, run by this checkout's interpreter: `outrider` and
    `python3` on a user's PATH are this repository's venv after `make demo`."""
    head, *rest = command
    interpreter = {"outrider": [sys.executable, "-m", "outrider"], "python3": [sys.executable]}
    return [*interpreter.get(head, [head]), *rest]


def until_it_answers(command: list[str], cwd: Path, expected: str, timeout: float = 30.0) -> str:
    """Run `command` until it prints `expected`: until both agents hold SVIDs and
    listen, the frontend's agent answers 503 (upstream_connect_failure)."""
    deadline = time.monotonic() + timeout
    while True:
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=10)
        if result.stdout.strip() == expected or time.monotonic() > deadline:
            return result.stdout.strip()
        time.sleep(0.2)


@pytest.mark.slow
def test_the_kept_demo_starts_by_hand_with_the_commands_of_its_readme(tmp_path: Path) -> None:
    assert "outrider demo --keep ./mesh" in (REPO / "README.md").read_text()  # what users read
    kept = tmp_path / "mesh"
    result = run_demo("--keep", str(kept), "--duration", "6")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"kept in {kept}" in result.stdout
    assert processes_mentioning(str(kept)) == []  # the demo's own processes are gone

    readme = (kept / "README.md").read_text()
    assert "**DEV MODE: UNSAFE OUTSIDE A LAPTOP.**" in readme
    commands = readme_commands(readme)
    servers = [c for c in commands if c[0] != "curl"]
    requests = [c for c in commands if c[0] == "curl"]
    assert [c[:3] for c in servers] == [
        ["outrider", "ca", "serve"],
        ["outrider", "agent", "run"],
        ["outrider", "agent", "run"],
        ["python3", "-m", "http.server"],
    ]
    assert "--dev" in servers[0] and len(requests) == 2

    started: list[subprocess.Popen[bytes]] = []
    try:
        for i, command in enumerate(servers):
            with (tmp_path / f"by-hand-{i}.log").open("wb") as log:
                started.append(
                    subprocess.Popen(runnable(command), cwd=kept, stdout=log, stderr=log)
                )
        hello = json.dumps({"app": "backend", "says": "hello from the backend"})
        assert until_it_answers(runnable(requests[0]), kept, hello) == hello
        assert until_it_answers(runnable(requests[1]), kept, "403") == "403"
    finally:
        for process in started:
            process.terminate()
        for process in started:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    ca_log = (tmp_path / "by-hand-0.log").read_text()
    assert "DEV MODE" in ca_log, ca_log


def test_demo_keep_refuses_a_directory_with_files_in_it(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    result = run_demo("--keep", str(tmp_path), timeout=20)
    assert result.returncode != 0
    assert "the directory is not empty; give a new one" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_demo_refuses_to_run_in_a_pod_before_making_anything(tmp_path: Path) -> None:
    kept = tmp_path / "mesh"
    in_a_pod = {**os.environ, "KUBERNETES_SERVICE_HOST": "10.96.0.1"}
    result = run_demo("--keep", str(kept), timeout=20, env=in_a_pod)
    assert result.returncode != 0
    assert "its CA runs in dev mode, so: refusing --dev: this looks like a Kubernetes pod" in (
        result.stderr
    )
    assert not kept.exists()
