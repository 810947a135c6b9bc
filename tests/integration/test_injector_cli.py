"""`outrider inject` and `outrider injector serve` as commands: output, reports, exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.config import parse_text
from identity.injected import WORKLOAD_API_SOCKET
from outrider.cli import main

DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata:
      labels: {app: web}
      annotations: {outrider.io/upstreams: "backend:8080", outrider.io/log-level: loud}
    spec:
      serviceAccountName: web
      containers: [{name: web, image: web:1}]
"""
SERVICE = "apiVersion: v1\nkind: Service\nmetadata: {name: web}  # kept\n"


def test_inject_reads_stdin_and_writes_stdout() -> None:
    stream = SERVICE + "---\n" + DEPLOYMENT
    done = subprocess.run(
        [sys.executable, "-m", "outrider", "inject", "-f", "-"],
        input=stream,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    service, deployment = done.stdout.split("---\n")
    assert service == SERVICE
    template = yaml.safe_load(deployment)["spec"]["template"]
    capture, agent = template["spec"]["initContainers"]
    assert (capture["name"], capture["args"][:2]) == ("outrider-capture", ["capture", "apply"])
    config = parse_text(agent["env"][0]["value"], source="OUTRIDER_AGENT_CONFIG")
    assert str(config.identity.spiffe_id) == "spiffe://cluster.local/ns/shop/sa/web"
    assert done.stderr.splitlines() == [
        "Deployment shop/web: injected",
        "  outrider: outrider.io/log-level: must be one of debug, info, warning, error; "
        "using the default (info)",
    ]


def test_inject_writes_the_output_file_and_takes_the_config(tmp_path: Path) -> None:
    source, out, config = tmp_path / "in.yaml", tmp_path / "out.yaml", tmp_path / "inj.yaml"
    source.write_text(DEPLOYMENT)
    config.write_text(yaml.safe_dump({"native_sidecar": False, "trust_domain": "prod.example"}))
    code = main(["inject", "-f", str(source), "-o", str(out), "--config", str(config)])
    assert code == 0
    spec = yaml.safe_load(out.read_text())["spec"]["template"]["spec"]
    assert [c["name"] for c in spec["containers"]] == ["outrider-agent", "web"]
    assert [c["name"] for c in spec["initContainers"]] == ["outrider-capture"]
    assert "prod.example" in spec["containers"][0]["env"][0]["value"]


def test_inject_no_capture_leaves_out_the_capture_container_and_the_probes(
    tmp_path: Path,
) -> None:
    source, out = tmp_path / "in.yaml", tmp_path / "out.yaml"
    probe = {"httpGet": {"path": "/ready", "port": 8080}}
    source.write_text(
        DEPLOYMENT.replace("image: web:1}", f"image: web:1, readinessProbe: {probe}}}")
    )
    assert main(["inject", "-f", str(source), "-o", str(out), "--no-capture"]) == 0
    spec = yaml.safe_load(out.read_text())["spec"]["template"]["spec"]
    [agent] = spec["initContainers"]
    assert spec["containers"][0]["readinessProbe"] == probe
    config = parse_text(agent["env"][0]["value"], source="OUTRIDER_AGENT_CONFIG")
    assert config.probes == ()


def workload_api_of(spec: dict[str, Any]) -> tuple[object, list[str]]:
    """The agent's `workload_api:` and the app containers given SPIFFE_ENDPOINT_SOCKET."""
    agent = next(c for c in spec["initContainers"] if c["name"] == "outrider-agent")
    config = parse_text(agent["env"][0]["value"], source="OUTRIDER_AGENT_CONFIG")
    socket = {"name": "SPIFFE_ENDPOINT_SOCKET", "value": "unix://" + WORKLOAD_API_SOCKET}
    served = None if config.workload_api is None else str(config.workload_api.socket)
    return served, [c["name"] for c in spec["containers"] if socket in c.get("env", [])]


def test_inject_gives_the_workload_api_to_the_workloads_that_ask_or_to_all(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, out, config = tmp_path / "in.yaml", tmp_path / "out.yaml", tmp_path / "inj.yaml"
    asks = DEPLOYMENT.replace("outrider.io/log-level: loud", "outrider.io/workload-api: enabled")
    opts_out = asks.replace("name: web, namespace", "name: api, namespace").replace(
        "workload-api: enabled", "workload-api: disabled"
    )
    source.write_text(asks + "---\n" + opts_out)
    assert main(["inject", "-f", str(source), "-o", str(out)]) == 0
    web, api = (d["spec"]["template"]["spec"] for d in yaml.safe_load_all(out.read_text()))
    assert workload_api_of(web) == (WORKLOAD_API_SOCKET, ["web"])
    assert workload_api_of(api) == (None, [])
    # injector.yaml turns it on for every workload but those that opt out.
    source.write_text(DEPLOYMENT + "---\n" + opts_out)
    config.write_text(yaml.safe_dump({"workload_api": {"enabled": True}}))
    assert main(["inject", "-f", str(source), "-o", str(out), "--config", str(config)]) == 0
    web, api = (d["spec"]["template"]["spec"] for d in yaml.safe_load_all(out.read_text()))
    assert workload_api_of(web) == (WORKLOAD_API_SOCKET, ["web"])
    assert workload_api_of(api) == (None, [])
    # And its own output again is left as it is.
    again = tmp_path / "again.yaml"
    assert main(["inject", "-f", str(out), "-o", str(again), "--config", str(config)]) == 0
    assert again.read_text() == out.read_text()
    capsys.readouterr()


@pytest.mark.parametrize(
    ("stream", "config", "message"),
    [
        ("kind: [", None, "not YAML"),
        (DEPLOYMENT, {"agent": {"uid": 0}}, "agent.uid: must be an integer >= 1"),
    ],
)
def test_inject_refuses_what_it_cannot_do_with_exit_2(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    stream: str,
    config: dict[str, object] | None,
    message: str,
) -> None:
    source = tmp_path / "in.yaml"
    source.write_text(stream)
    argv = ["inject", "-f", str(source)]
    if config is not None:
        (tmp_path / "inj.yaml").write_text(yaml.safe_dump(config))
        argv += ["--config", str(tmp_path / "inj.yaml")]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_inject_of_a_directory_injects_every_manifest_and_names_a_bad_one_with_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`kubectl apply -f DIR`, recursively: all of it comes out, what could not be injected
    as written, and the exit status says so."""
    source, out = tmp_path / "manifests", tmp_path / "out.yaml"
    (source / "shop").mkdir(parents=True)
    listed = {
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            yaml.safe_load(DEPLOYMENT.replace("name: web,", "name: api,")),
            {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}, "spec": {}},
        ],
    }
    (source / "shop" / "list.yaml").write_text(yaml.safe_dump(listed, sort_keys=False))
    (source / "web.yaml").write_text("# the web tier\n" + SERVICE + "---\n" + DEPLOYMENT)
    assert main(["inject", "-f", str(source), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    text = out.read_text()
    first, kept, _ = yaml.safe_load_all(text)
    assert [c["name"] for c in first["items"][0]["spec"]["template"]["spec"]["initContainers"]] == [
        "outrider-capture",
        "outrider-agent",
    ]
    assert first["items"][1]["spec"] == {}
    assert kept["kind"] == "Service"
    assert "# the web tier\n" in text and "# kept\n" in text
    assert f"{source / 'shop' / 'list.yaml'}: Deployment default/x: invalid\n" in err
    assert "(document 1, items[1]): no pod template at spec.template" in err
    assert f"{source / 'web.yaml'}: Deployment shop/web: injected\n" in err
    assert "1 workload(s) left as written" in err
    # Its own output again: nothing changes, and the bad one is still named.
    again = tmp_path / "again.yaml"
    assert main(["inject", "-f", str(out), "-o", str(again)]) == 1
    assert again.read_text() == text


def test_inject_of_a_missing_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inject", "-f", str(tmp_path / "absent.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"listen": "127.0.0.1:0"}, "tls.cert_file: required"),
        (
            {"listen": "127.0.0.1:0", "tls": {"cert_file": "no.crt", "key_file": "no.key"}},
            "cannot load",
        ),
    ],
)
def test_serve_without_a_usable_certificate_exits_2(
    tmp_path: Path, config: dict[str, object], message: str
) -> None:
    path = tmp_path / "injector.yaml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run(
        [sys.executable, "-m", "outrider", "injector", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr
