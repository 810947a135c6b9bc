"""`outrider agent run` as a process: how it starts, refuses to start, and stops."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import yaml

from tests.mesh import agent_process, agent_yaml, served_agent_yaml
from tests.support import CaProcess, CaSetup


def start(path: Path, raw: dict[str, Any]) -> subprocess.Popen[str]:
    path.write_text(yaml.safe_dump(raw))
    return subprocess.Popen(
        [sys.executable, "-m", "outrider", "agent", "run", "--config", str(path)],
        stderr=subprocess.PIPE,
        text=True,
    )


def until(process: subprocess.Popen[str], marker: str, seconds: float = 30.0) -> str:
    """The agent's stderr up to the first line with `marker`: it got that far (its signal
    handlers are in place once it retries the CA). A wait on the log, not the clock: on a
    loaded machine the interpreter alone can take longer than any fixed sleep."""
    seen: list[str] = []

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            seen.append(line)
            if marker in line:
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(seconds)
    text = "".join(seen)
    assert marker in text, f"no {marker!r} within {seconds} s:\n{text}"
    return text


def test_a_bad_config_exits_2_and_lists_every_error(tmp_path: Path) -> None:
    process = start(tmp_path / "agent.yaml", {"identity": {}, "inbound": [{}], "colour": 1})
    _, stderr = process.communicate(timeout=20)
    assert process.returncode == 2
    for error in ("identity.spiffe_id: required", "ca.address: required", "inbound[0].app"):
        assert error in stderr
    assert "colour: unknown key" in stderr
    assert "Traceback" not in stderr


def refused(path: Path, raw: dict[str, Any], environ: dict[str, str]) -> str:
    """`outrider agent run` of `raw` in `environ`, which must refuse to start (exit 2,
    without a traceback): its stderr."""
    path.write_text(yaml.safe_dump(raw))
    done = subprocess.run(
        [sys.executable, "-m", "outrider", "agent", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=20,
        env=environ,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    return done.stderr


def test_a_control_plane_without_a_pod_name_exits_2_saying_so(
    setup: CaSetup, tmp_path: Path
) -> None:
    raw = agent_yaml(setup.root, "web", control={"address": "127.0.0.1:1"})
    environ = {k: v for k, v in os.environ.items() if k != "POD_NAME"}
    stderr = refused(tmp_path / "agent.yaml", raw, environ)
    assert "control.pod: required when $POD_NAME is not set" in stderr


def test_an_otlp_exporter_variable_it_cannot_use_exits_2_naming_it(
    setup: CaSetup, tmp_path: Path
) -> None:
    raw = agent_yaml(setup.root, "web", tracing={"otlp_endpoint": "https://otel.obs:4318"})
    for variable, value in (
        ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "authorization"),
        ("OTEL_EXPORTER_OTLP_CERTIFICATE", str(tmp_path / "absent.pem")),
    ):
        stderr = refused(tmp_path / "agent.yaml", raw, {**os.environ, variable: value})
        assert f"tracing: {variable}" in stderr


def test_before_the_first_svid_sighup_is_harmless_and_sigterm_exits_0(
    setup: CaSetup, tmp_path: Path
) -> None:
    # The CA address is closed: the agent retries and never becomes ready. A SIGHUP
    # (a config reloader's) must not kill it, as the signal's default action would.
    process = start(tmp_path / "agent.yaml", agent_yaml(setup.root, "web"))
    until(process, "retrying in")
    process.send_signal(signal.SIGHUP)
    process.send_signal(signal.SIGTERM)  # both pending: SIGHUP (1) is delivered first
    _, stderr = process.communicate(timeout=10)
    assert process.returncode != -signal.SIGHUP, "SIGHUP killed the agent"
    assert process.returncode == 0, stderr


def test_an_address_in_use_is_a_clear_error_saying_why_it_may_be(
    setup: CaSetup, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        raw = agent_yaml(setup.root, "web", admin=f"127.0.0.1:{taken.getsockname()[1]}")
        process = start(tmp_path / "agent.yaml", raw)
        _, stderr = process.communicate(timeout=20)
    assert process.returncode == 1
    assert "address already in use" in stderr
    # Most often the agent's own previous process, still draining after a restart.
    assert "if it is this agent's previous process, still draining" in stderr
    assert "start this one after that process has exited" in stderr
    assert "Traceback" not in stderr


def test_a_config_from_the_environment_starts_the_agent(setup: CaSetup, tmp_path: Path) -> None:
    # The injector passes the agent's config in an environment variable.
    raw = agent_yaml(setup.root, "web")  # the CA address is closed, as above
    process = subprocess.Popen(
        [sys.executable, "-m", "outrider", "agent", "run", "--config-env", "AGENT_YAML"],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "AGENT_YAML": json.dumps(raw)},
    )
    until(process, "retrying in")  # it read the config and went for its first SVID
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=10)
    assert process.returncode == 0, stderr


def test_a_missing_or_malformed_environment_config_exits_2(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "outrider", "agent", "run", "--config-env", "AGENT_YAML"]
    unset = {k: v for k, v in os.environ.items() if k != "AGENT_YAML"}
    for env, error in (
        (unset, "environment variable AGENT_YAML is not set"),
        ({**unset, "AGENT_YAML": "identity: [unclosed"}, "invalid config AGENT_YAML"),
        ({**unset, "AGENT_YAML": "{}"}, "identity.spiffe_id: required"),
    ):
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=20)
        assert done.returncode == 2, done.stderr
        assert error in done.stderr
        assert "Traceback" not in done.stderr


def test_a_running_agent_has_not_loaded_the_ca_and_injector_http_server(
    setup: CaSetup, ca: CaProcess, tmp_path: Path
) -> None:
    """The sidecar parses HTTP with llhttp alone: aiohttp, which the CA and the injector
    serve with (about 10 MB resident with its C extensions), stays out of every pod,
    whatever the code they share with the agent imports."""
    with agent_process(tmp_path, "web", served_agent_yaml(setup, ca, "web")) as agent:
        maps = Path(f"/proc/{agent.process.pid}/maps").read_text()
    loaded = {name for name in ("/aiohttp/", "/yarl/") if name in maps}
    assert not loaded
