"""The app's probes sent through the agent (injector/core/probes.py), and what is left alone."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from typing import Any

import jsonpatch
import pytest

from agent.config import parse_text
from injector.core import Settings, mutate
from injector.core.probes import rewrite
from tests.k8s import to_model

TIMING = {"initialDelaySeconds": 5, "periodSeconds": 7, "failureThreshold": 4}


def container(name: str = "web", **probes: Any) -> dict[str, Any]:
    ports = [{"name": "http", "containerPort": 8080}, {"name": "grpc", "containerPort": 9090}]
    return {"name": name, "image": "web:1", "ports": ports, **probes}


def spec(*containers: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {"containers": list(containers), **more}


def rewritten(source: dict[str, Any]) -> dict[str, Any]:
    """The spec with the patch applied (its paths start at the pod's /spec)."""
    return jsonpatch.apply_patch({"spec": source}, list(rewrite(source).patch))["spec"]


def agents_probe(path: str, **timing: Any) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": 15020, "scheme": "HTTP"}, **timing}


@pytest.mark.parametrize(
    ("probe", "original"),
    [
        (
            {"httpGet": {"path": "/ready", "port": 8080}},
            {"httpGet": {"path": "/ready", "port": 8080, "scheme": "HTTP"}, "timeoutSeconds": 1},
        ),
        (
            {
                "httpGet": {
                    "path": "/ready",
                    "port": "http",
                    "scheme": "HTTPS",
                    "httpHeaders": [{"name": "X-Probe", "value": "1"}],
                },
                "timeoutSeconds": 3,
            },
            {
                "httpGet": {
                    "path": "/ready",
                    "port": 8080,
                    "scheme": "HTTPS",
                    "httpHeaders": [{"name": "X-Probe", "value": "1"}],
                },
                "timeoutSeconds": 3,
            },
        ),
        (
            {"httpGet": {"port": 8080}},
            {"httpGet": {"path": "/", "port": 8080, "scheme": "HTTP"}, "timeoutSeconds": 1},
        ),
        ({"tcpSocket": {"port": "http"}}, {"tcpSocket": {"port": 8080}, "timeoutSeconds": 1}),
        ({"grpc": {"port": 9090}}, {"grpc": {"port": 9090, "service": ""}, "timeoutSeconds": 1}),
        (
            {"grpc": {"port": 9090, "service": "orders"}},
            {"grpc": {"port": 9090, "service": "orders"}, "timeoutSeconds": 1},
        ),
    ],
)
def test_each_kind_of_probe_goes_through_the_agent_and_its_original_to_the_agent(
    probe: dict[str, Any], original: dict[str, Any]
) -> None:
    source = spec(container(readinessProbe={**probe, **TIMING}))
    result = rewrite(source)
    assert result.originals == {"/app-health/web/readyz": original}
    assert result.warnings == ()
    timeout = {"timeoutSeconds": probe["timeoutSeconds"]} if "timeoutSeconds" in probe else {}
    assert rewritten(source)["containers"][0]["readinessProbe"] == agents_probe(
        "/app-health/web/readyz", **TIMING, **timeout
    )


def test_each_probe_of_a_container_gets_its_own_path() -> None:
    tcp = {"tcpSocket": {"port": 8080}}
    source = spec(
        container(livenessProbe=tcp, readinessProbe=tcp, startupProbe=tcp),
        container("api", readinessProbe=tcp),
    )
    assert list(rewrite(source).originals or {}) == [
        "/app-health/web/livez",
        "/app-health/web/readyz",
        "/app-health/web/startupz",
        "/app-health/api/readyz",
    ]


def test_exec_probes_are_left_alone_quietly() -> None:
    source = spec(container(livenessProbe={"exec": {"command": ["true"]}, **TIMING}))
    assert rewrite(source).patch == rewrite(source).warnings == ()
    assert rewrite(source).originals is None


@pytest.mark.parametrize(
    "probe",
    [
        {"httpGet": {"path": "/", "port": 8080, "host": "10.0.0.9"}},
        {"tcpSocket": {"port": 8080, "host": "db.example"}},
    ],
)
def test_a_probe_of_another_host_is_left_alone_with_a_warning(probe: dict[str, Any]) -> None:
    result = rewrite(spec(container(readinessProbe=probe)))
    assert (result.patch, result.originals) == ((), None)
    assert result.warnings == (
        "container web: readinessProbe asks another host (host: is set), so it is left as it "
        "is: strict mTLS refuses it if that host is this pod",
    )


def test_a_named_port_the_container_does_not_declare_is_left_alone_with_a_warning() -> None:
    result = rewrite(spec(container(livenessProbe={"tcpSocket": {"port": "admin"}})))
    assert (result.patch, result.originals) == ((), None)
    assert result.warnings == (
        "container web: livenessProbe names port admin, which the container does not "
        "declare, so it is left as it is",
    )


def test_a_header_the_agent_cannot_send_is_left_alone_with_a_warning() -> None:
    header = {"name": "X-A", "value": "1\r\nX-Injected: 1"}
    result = rewrite(
        spec(container(readinessProbe={"httpGet": {"port": 80, "httpHeaders": [header]}}))
    )
    assert (result.patch, result.originals) == ((), None)
    assert len(result.warnings) == 1 and "cannot send" in result.warnings[0]
    assert "Injected" not in result.warnings[0]  # never the pod author's text


@pytest.mark.parametrize(
    "probe",
    [
        {"httpGet": {"port": 0}},
        {"httpGet": {"port": 8080, "scheme": "FTP"}},
        {"tcpSocket": {"port": True}},
        {"tcpSocket": {"port": "Not A Name\x1b[2J"}},
        {"grpc": {"port": "grpc"}},  # grpc ports are numbers only, so the API refuses it
        {"tcpSocket": {"port": 8080}, "timeoutSeconds": -1},
        {"tcpSocket": {"port": 8080}, "exec": {"command": ["true"]}},
        {"tcpSocket": "8080"},
        {},
    ],
)
def test_a_malformed_probe_is_left_for_the_api_server_to_refuse(probe: dict[str, Any]) -> None:
    # Mutating webhooks run before validation: the API server refuses the pod after us.
    result = rewrite(spec(container(readinessProbe=probe)))
    assert (result.patch, result.originals, result.warnings) == ((), None, ())


def test_a_timeout_of_0_is_the_apis_default_of_1() -> None:
    """The API server defaults timeoutSeconds 0 to 1 before the webhook sees the pod;
    `outrider inject` sees the 0 as written, and must rewrite the probe all the same."""
    zero = rewrite(
        spec(container(readinessProbe={"tcpSocket": {"port": 8080}, "timeoutSeconds": 0}))
    )
    one = rewrite(
        spec(container(readinessProbe={"tcpSocket": {"port": 8080}, "timeoutSeconds": 1}))
    )
    assert zero.patch and zero.originals == one.originals


def test_a_container_whose_name_is_no_dns_label_is_left_alone_and_not_quoted() -> None:
    bad = container("Web\x1b]0;x\x07", readinessProbe={"tcpSocket": {"port": 8080}})
    assert rewrite(spec(bad)) == rewrite(spec())


def test_rewriting_twice_is_rewriting_once() -> None:
    source = spec(
        container(
            readinessProbe={"httpGet": {"path": "/ready", "port": "http"}, **TIMING},
            livenessProbe={"tcpSocket": {"port": 8080}},
        )
    )
    once = rewritten(source)
    again = rewrite(once)
    assert (again.patch, again.originals, again.warnings) == ((), None, ())


def test_a_native_sidecars_probes_go_through_the_agent_too_at_their_index() -> None:
    # Probe paths are computed before the capture and agent containers are prepended.
    sidecar = {
        **container("proxy"),
        "restartPolicy": "Always",
        "startupProbe": {"tcpSocket": {"port": 8080}},
    }
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": spec(container(), initContainers=[{"name": "setup", "image": "s:1"}, sidecar]),
    }
    mutation = mutate(pod, "shop", Settings())
    patched = jsonpatch.apply_patch(pod, list(mutation.patch))
    to_model(patched)
    names = [c["name"] for c in patched["spec"]["initContainers"]]
    assert names == ["outrider-capture", "outrider-agent", "setup", "proxy"]
    assert patched["spec"]["initContainers"][3]["startupProbe"] == agents_probe(
        "/app-health/proxy/startupz"
    )


def test_without_capture_no_probe_is_touched() -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": spec(container(readinessProbe={"tcpSocket": {"port": 8080}})),
    }
    before = copy.deepcopy(pod)
    mutation = mutate(pod, "shop", Settings().without_capture())
    patched = jsonpatch.apply_patch(pod, list(mutation.patch))
    assert patched["spec"]["containers"] == before["spec"]["containers"]


def test_without_native_sidecars_the_app_keeps_its_rewritten_probe_behind_the_agent() -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": spec(container(readinessProbe={"tcpSocket": {"port": "http"}})),
    }
    settings = replace(Settings(), native_sidecar=False)
    patched = jsonpatch.apply_patch(pod, list(mutate(pod, "shop", settings).patch))
    to_model(patched)
    agent, app = patched["spec"]["containers"]
    assert (agent["name"], app["name"]) == ("outrider-agent", "web")
    assert app["readinessProbe"] == agents_probe("/app-health/web/readyz")


@pytest.mark.parametrize("port", [15020, "status"])
def test_a_probe_of_the_status_port_is_left_alone_quietly(port: int | str) -> None:
    # 15020 is never captured: the kubelet reaches it as it is. Rewritten, the agent
    # would ask itself at /app-health/..., which asks itself again (a loop).
    own = {**container(), "ports": [{"name": "status", "containerPort": 15020}]}
    probe = {"httpGet": {"path": "/app-health/web/readyz", "port": port}}
    result = rewrite(spec({**own, "readinessProbe": probe}))
    assert (result.patch, result.originals, result.warnings) == ((), None, ())


@pytest.mark.parametrize("port", [15000, 15006, 15007])
def test_a_probe_of_the_agents_other_ports_is_left_alone_with_a_warning(port: int) -> None:
    # 15000 serves /app-health too: the agent would probe itself until its bound is full.
    probe = {"httpGet": {"path": "/app-health/web/readyz", "port": port}}
    result = rewrite(spec(container(readinessProbe=probe)))
    assert (result.patch, result.originals) == ((), None)
    assert result.warnings == (
        f"container web: readinessProbe asks port {port}, the agent's own, so it is left as it is",
    )


def test_the_agents_ports_are_the_settings_capture_ports() -> None:
    capture = replace(Settings().capture, inbound_port=16006, outbound_port=16007)
    probe = {"tcpSocket": {"port": 16006}}
    pod = {"metadata": {"name": "web"}, "spec": spec(container(livenessProbe=probe))}
    warnings = mutate(pod, "shop", replace(Settings(), capture=capture)).warnings
    assert warnings == (
        "outrider: container web: livenessProbe asks port 16006, the agent's own, so it is "
        "left as it is",
    )


def test_the_agents_config_fits_one_environment_variable_whatever_the_probes() -> None:
    """Linux refuses to exec with one environment string over 128 KiB (MAX_ARG_STRLEN):
    the agent would never start, nor the app behind it. Probes that do not fit are
    left as they are, with a warning; the others still go through the agent."""
    headers = [{"name": f"X-H{i}", "value": "v" * 4000} for i in range(12)]
    big = {"httpGet": {"path": "/ready", "port": 8080, "httpHeaders": headers}}
    containers = [
        container(f"c{i}", readinessProbe=big, livenessProbe={"tcpSocket": {"port": 8080}})
        for i in range(4)
    ]
    pod = {"metadata": {"name": "web"}, "spec": spec(*containers)}
    mutation = mutate(pod, "shop", Settings())
    patched = jsonpatch.apply_patch(pod, list(mutation.patch))
    [agent] = [c for c in patched["spec"]["initContainers"] if c["name"] == "outrider-agent"]
    [config] = [e["value"] for e in agent["env"] if e["name"] == "OUTRIDER_AGENT_CONFIG"]
    assert len(f"OUTRIDER_AGENT_CONFIG={config}".encode()) < 128 * 1024  # with its NUL
    apps = patched["spec"]["containers"]
    assert all(c["livenessProbe"] == agents_probe(f"/app-health/{c['name']}/livez") for c in apps)
    left = [c["name"] for c in apps if c["readinessProbe"] == big]
    assert left and len(left) < 4  # what fits goes through the agent
    assert mutation.warnings[-len(left) :] == tuple(
        f"outrider: container {name}: readinessProbe does not fit in the agent's config "
        "(at most 128 KiB with every probe), so it is left as it is"
        for name in left
    )
    assert set(json.loads(config)["probes"]) == {
        *(f"/app-health/c{i}/livez" for i in range(4)),
        *(f"/app-health/{c['name']}/readyz" for c in apps if c["name"] not in left),
    }


@pytest.mark.parametrize(
    ("path", "sent"),
    [
        ("/a b", "/a%20b"),
        ("/h\u00e9alth", "/h%C3%A9alth"),
        ("/tab\there", "/tab%09here"),
        ("/ready#top", "/ready"),
        ("/ready?full=1&x=%2F", "/ready?full=1&x=%2F"),
    ],
)
def test_a_path_is_sent_as_the_kubelet_sends_it(path: str, sent: str) -> None:
    # The API server takes any path; the kubelet's Go client escapes it. Left alone, the
    # probe would meet strict mTLS and fail, and the pod would never be ready.
    result = rewrite(spec(container(readinessProbe={"httpGet": {"path": path, "port": 8080}})))
    assert result.warnings == ()
    assert result.originals == {
        "/app-health/web/readyz": {
            "httpGet": {"path": sent, "port": 8080, "scheme": "HTTP"},
            "timeoutSeconds": 1,
        }
    }


def test_a_path_longer_than_the_agent_sends_is_left_alone_with_a_warning() -> None:
    probe = {"httpGet": {"path": "/" + "\u00e9" * 700, "port": 8080}}  # 4201 bytes, encoded
    result = rewrite(spec(container(readinessProbe=probe)))
    assert (result.patch, result.originals) == ((), None)
    assert result.warnings == (
        "container web: readinessProbe has a path longer than the agent sends (2048 bytes), "
        "so it is left as it is",
    )


def test_a_container_a_later_webhook_adds_gets_its_probes_through_the_agent_too() -> None:
    # reinvocationPolicy: IfNeeded calls the injector again once another webhook has
    # added a container; left as they are, its probes would meet strict mTLS.
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": spec(container(readinessProbe={"tcpSocket": {"port": 8080}})),
    }
    injected = jsonpatch.apply_patch(pod, list(mutate(pod, "shop", Settings()).patch))
    late = {"name": "late", "image": "l:1", "livenessProbe": {"httpGet": {"port": 9000}}}
    injected["spec"]["containers"].append(late)
    again = mutate(injected, "shop", Settings())
    assert (again.reason, again.warnings) == ("already_injected", ())
    patched = jsonpatch.apply_patch(injected, list(again.patch))
    to_model(patched)
    assert patched["spec"]["containers"][1]["livenessProbe"] == agents_probe(
        "/app-health/late/livez"
    )
    [agent] = [c for c in patched["spec"]["initContainers"] if c["name"] == "outrider-agent"]
    [config] = [e["value"] for e in agent["env"] if e["name"] == "OUTRIDER_AGENT_CONFIG"]
    assert json.loads(config)["probes"] == {
        "/app-health/web/readyz": {"tcpSocket": {"port": 8080}, "timeoutSeconds": 1},
        "/app-health/late/livez": {
            "httpGet": {"path": "/", "port": 9000, "scheme": "HTTP"},
            "timeoutSeconds": 1,
        },
    }
    parse_text(config, source="OUTRIDER_AGENT_CONFIG")  # one the agent takes
    assert mutate(patched, "shop", Settings()).patch == ()  # once is enough
