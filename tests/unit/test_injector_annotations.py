"""Annotations: each setting parsed strictly, and no value can make the pod more privileged.

The agent's config is a bootstrap (identity, CA, control plane): listeners,
upstreams and policy come from the control plane, never from an annotation.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import ControlEndpoint, parse_text
from identity import SpiffeId, TrustDomain
from injector.core import Settings, mutate
from injector.core.annotations import UPSTREAMS, read_options
from injector.core.settings import ControlSettings, Quantity
from injector.core.sidecar import AGENT, CONFIG_ENV
from tests.k8s import to_model

SETTINGS = Settings()
BACKEND = "spiffe://cluster.local/ns/shop/sa/backend"


def inject(
    annotations: dict[str, Any], settings: Settings = SETTINGS
) -> tuple[dict[str, Any], tuple[str, ...]]:
    source = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "namespace": "shop", "annotations": annotations},
        "spec": {"containers": [{"name": "app", "image": "app:1"}]},
    }
    mutation = mutate(source, "shop", settings)
    assert mutation.reason == "injected"
    return jsonpatch.apply_patch(source, list(mutation.patch)), mutation.warnings


def agent_of(pod: dict[str, Any]) -> dict[str, Any]:
    [agent] = [c for c in pod["spec"]["initContainers"] if c["name"] == AGENT]
    return agent


def config_of(pod: dict[str, Any]) -> dict[str, Any]:
    """The agent's config as JSON, after checking the agent itself accepts it."""
    raw = next(e["value"] for e in agent_of(pod)["env"] if e["name"] == CONFIG_ENV)
    parse_text(raw, source=CONFIG_ENV)
    config: dict[str, Any] = json.loads(raw)
    return config


BASELINE, _ = inject({})


# -- the bootstrap: identity, CA, control plane; the rest is the control plane's ----------


def test_the_agent_gets_a_bootstrap_and_asks_the_control_plane_for_the_rest() -> None:
    config = config_of(BASELINE)
    assert config == {
        "identity": {
            "spiffe_id": "spiffe://cluster.local/ns/shop/sa/default",
            "token_file": "/var/run/secrets/outrider/token",
        },
        "ca": {
            "address": "outrider-ca.outrider-system.svc:8443",
            "bundle_file": "/etc/outrider/bundle/bundle.pem",
        },
        "control": {
            "address": "outrider-control.outrider-system.svc:15012",
            "spiffe_id": "spiffe://cluster.local/ns/outrider-system/sa/outrider-control",
        },
        "admin": "127.0.0.1:15000",
        "status": "0.0.0.0:15020",
        # Where the capture init container sends the pod's traffic (injector.yaml capture:).
        "capture": {"inbound_port": 15006, "outbound_port": 15007},
    }
    pod_name = {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
    assert pod_name in agent_of(BASELINE)["env"]  # the pod it asks the control plane for


def test_the_control_plane_is_where_the_injector_settings_say() -> None:
    settings = Settings(
        trust_domain=TrustDomain("example.org"),
        system_namespace="mesh",
        control=ControlSettings("cp.mesh.svc:9000"),
    )
    config = config_of(inject({}, settings)[0])
    assert parse_text(json.dumps(config), source="env").control == ControlEndpoint(
        "cp.mesh.svc",
        9000,
        "cp.mesh.svc",
        SpiffeId.parse("spiffe://example.org/ns/mesh/sa/outrider-control"),
    )


@pytest.mark.parametrize(
    ("key", "replacement"),
    [
        ("outrider.io/inbound-ports", "containerPorts"),
        ("outrider.io/policy", "AuthorizationPolicy"),
    ],
)
def test_an_annotation_that_is_gone_is_ignored_with_a_warning_naming_its_replacement(
    key: str, replacement: str
) -> None:
    pod, warnings = inject({key: "8080"})
    assert agent_of(pod) == agent_of(BASELINE)
    assert pod["spec"]["volumes"] == BASELINE["spec"]["volumes"]  # no policy ConfigMap
    [warning] = warnings
    assert warning.startswith(f"outrider: {key}: no longer read, ignored; ")
    assert replacement in warning


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200))
def test_upstreams_are_left_to_the_control_plane_without_a_word(value: str) -> None:
    pod, warnings = inject({"outrider.io/upstreams": value})
    assert warnings == ()
    assert agent_of(pod) == agent_of(BASELINE)


# -- what pod authors may still set ---------------------------------------------------------


def test_resources_and_log_level_come_from_annotations() -> None:
    pod, warnings = inject(
        {
            "outrider.io/agent-cpu": "200m",
            "outrider.io/agent-memory": "128Mi",
            "outrider.io/log-level": "debug",
        }
    )
    assert warnings == ()
    agent = agent_of(pod)
    assert agent["resources"]["requests"] == {"cpu": "200m", "memory": "128Mi"}
    assert agent["resources"]["limits"] == {"cpu": "1", "memory": "256Mi"}
    assert {"name": "OUTRIDER_LOG_LEVEL", "value": "debug"} in agent["env"]


@pytest.mark.parametrize(("text", "value"), [("1e8", 10**8), ("5E-1", 0.5), ("128e6", 128 * 10**6)])
def test_a_quantity_with_a_decimal_exponent_is_read_as_kubernetes_reads_it(
    text: str, value: float
) -> None:
    pod, warnings = inject({"outrider.io/agent-memory": text})
    assert warnings == ()
    assert agent_of(pod)["resources"]["requests"]["memory"] == text
    assert float(Quantity.parse(text).value) == value


@pytest.mark.parametrize(
    ("key", "value", "requests"),
    [
        ("agent-cpu", "3", {"cpu": "1", "memory": "64Mi"}),
        ("agent-memory", "1Gi", {"cpu": "50m", "memory": "256Mi"}),
    ],
)
def test_requests_above_the_limit_are_capped_at_it(
    key: str, value: str, requests: dict[str, str]
) -> None:
    pod, warnings = inject({f"outrider.io/{key}": value})
    resources = agent_of(pod)["resources"]
    assert resources == {"requests": requests, "limits": {"cpu": "1", "memory": "256Mi"}}
    [warning] = warnings
    assert warning.startswith(f"outrider: outrider.io/{key}: above the agent's limit; capped at")


# -- each setting, invalid: the default, and a warning naming the annotation -----------

INVALID = [
    ("outrider.io/agent-cpu", "lots"),
    ("outrider.io/agent-cpu", "0"),
    ("outrider.io/agent-cpu", "-1"),
    ("outrider.io/agent-memory", "64 Mi"),
    ("outrider.io/agent-memory", "1" * 40),
    ("outrider.io/log-level", "DEBUG"),
    ("outrider.io/log-level", "trace"),
    ("outrider.io/access-log", "everything"),
    ("outrider.io/access-log", "Off"),
    ("outrider.io/tracing-endpoint", "collector"),  # no port
    ("outrider.io/tracing-endpoint", "collector:99999"),
    ("outrider.io/tracing-endpoint", "http://collector:4318/v1/traces"),
    ("outrider.io/tracing-endpoint", "collector:4318\nmode: all"),
]


@pytest.mark.parametrize(("key", "value"), INVALID)
def test_an_invalid_value_keeps_the_default_and_warns(key: str, value: str) -> None:
    pod, warnings = inject({key: value})
    assert agent_of(pod) == agent_of(BASELINE)
    assert pod["spec"]["volumes"] == BASELINE["spec"]["volumes"]
    [warning] = warnings
    assert warning.startswith(f"outrider: {key}: ")
    assert "using the default" in warning
    if len(value) > 3:
        assert value not in warning  # the raw value is never echoed


def test_a_value_that_is_not_a_string_is_invalid() -> None:
    pod, warnings = inject({"outrider.io/log-level": 3})
    assert agent_of(pod) == agent_of(BASELINE)
    assert warnings == (
        "outrider: outrider.io/log-level: must be a string; using the default (info)",
    )


def test_an_unknown_outrider_annotation_is_named_in_a_warning() -> None:
    pod, warnings = inject({"outrider.io/inbound-port": "8080", "example.com/x": "1"})
    assert warnings == ("outrider: outrider.io/inbound-port: unknown annotation, ignored",)
    assert agent_of(pod) == agent_of(BASELINE)


def test_a_bad_annotation_does_not_spoil_the_good_ones() -> None:
    pod, warnings = inject({"outrider.io/log-level": "debug", "outrider.io/agent-cpu": "lots"})
    assert {"name": "OUTRIDER_LOG_LEVEL", "value": "debug"} in agent_of(pod)["env"]
    assert [w.split(":")[1].strip() for w in warnings] == ["outrider.io/agent-cpu"]


# -- hostile annotations change nothing privileged ----------------------------------------

HOSTILE = {
    "privileged": {"outrider.io/privileged": "true", "outrider.io/securityContext": "privileged"},
    "capabilities": {"outrider.io/capabilities": "NET_ADMIN,SYS_ADMIN"},
    "host path": {"outrider.io/volumes": '[{"name":"root","hostPath":{"path":"/"}}]'},
    "host network": {"outrider.io/hostNetwork": "true"},
    "root": {"outrider.io/run-as-user": "0", "outrider.io/uid": "0"},
    "another image": {"outrider.io/image": "evil.example.com/agent:latest"},
    "newline in a port": {"outrider.io/inbound-ports": "8080\nprivileged: true"},
    "quote in a port (JSON)": {"outrider.io/inbound-ports": '8080","privileged":true,"x":"'},
    "YAML in upstreams": {
        "outrider.io/upstreams": f"backend=backend.shop.svc:15443@{BACKEND}\n"
        "securityContext:\n  privileged: true"
    },
    "JSON in upstreams": {
        "outrider.io/upstreams": "backend=b.svc:15443@"
        + BACKEND
        + '"}],"admin":"0.0.0.0:1","x":[{"'
    },
    "quote in a name": {"outrider.io/upstreams": f'back"end=b.svc:15443@{BACKEND}'},
    "YAML in the policy name": {"outrider.io/policy": "p\nhostPath: /"},
    "JSON in the policy name": {"outrider.io/policy": 'p"},{"name":"x","hostPath":{"path":"/"}'},
    "limit smuggled into cpu": {"outrider.io/agent-cpu": "100m\nlimits: {cpu: 64}"},
    "log level with a newline": {"outrider.io/log-level": "info\nOUTRIDER_X=1"},
}


@pytest.mark.parametrize("annotations", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_annotations_change_nothing_privileged(annotations: dict[str, str]) -> None:
    pod, warnings = inject(annotations)
    to_model(pod)
    assert_unprivileged(pod)
    assert agent_of(pod) == agent_of(BASELINE)
    assert pod["spec"]["volumes"] == BASELINE["spec"]["volumes"]
    assert len(warnings) == len([key for key in annotations if key != UPSTREAMS])


def assert_unprivileged(pod: dict[str, Any]) -> None:
    """What no annotation may change: the pod's and the agent's privileges and image."""
    spec = pod["spec"]
    assert set(spec) <= {"containers", "initContainers", "volumes"}  # nothing pod-level added
    assert spec["containers"] == [{"name": "app", "image": "app:1"}]
    agent = agent_of(pod)
    assert agent["securityContext"] == agent_of(BASELINE)["securityContext"]
    assert agent["image"] == SETTINGS.agent.image
    assert agent["args"] == agent_of(BASELINE)["args"]
    assert [e["name"] for e in agent["env"]] == [e["name"] for e in agent_of(BASELINE)["env"]]
    limits = agent["resources"]["limits"]
    assert limits == {"cpu": "1", "memory": "256Mi"}
    for volume in spec["volumes"]:
        assert set(volume) - {"name"} <= {"projected", "configMap"}
    assert all(m["readOnly"] for m in agent["volumeMounts"])
    config = config_of(pod)
    assert (config["admin"], config["status"]) == ("127.0.0.1:15000", "0.0.0.0:15020")
    assert config["identity"]["spiffe_id"] == "spiffe://cluster.local/ns/shop/sa/default"


KEYS = [
    "outrider.io/inbound-ports",
    "outrider.io/upstreams",
    "outrider.io/policy",
    "outrider.io/agent-cpu",
    "outrider.io/agent-memory",
    "outrider.io/log-level",
    "outrider.io/image",
]


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(KEYS), st.text(max_size=200), max_size=len(KEYS)))
def test_no_annotation_text_makes_the_pod_privileged_or_the_agent_config_invalid(
    annotations: dict[str, str],
) -> None:
    pod, warnings = inject(annotations)
    assert_unprivileged(pod)
    assert len(warnings) <= len(annotations)
    for warning in warnings:
        assert warning.isprintable()


def test_read_options_without_annotations_is_the_settings() -> None:
    options, warnings = read_options({}, SETTINGS)
    assert warnings == []
    assert options.resources == SETTINGS.agent.resources
    assert options.log_level == SETTINGS.agent.log_level


def test_the_annotations_example_in_the_docs_is_valid() -> None:
    docs = Path(__file__).resolve().parents[2] / "docs" / "injector.md"
    section = docs.read_text().split("## Annotations", 1)[1]
    example = yaml.safe_load(section.split("```yaml\n", 1)[1].split("```", 1)[0])
    pod, warnings = inject(example["metadata"]["annotations"])
    assert warnings == ()
    assert agent_of(pod) != agent_of(BASELINE)  # the example sets something
    assert config_of(pod) == config_of(BASELINE)  # but nothing of the config


def test_access_log_and_tracing_annotations_reach_the_agent_config() -> None:
    pod, warnings = inject(
        {"outrider.io/access-log": "denied", "outrider.io/tracing-endpoint": "otel.obs:4318"}
    )
    assert warnings == ()
    config = config_of(pod)  # the agent accepts it (config_of parses it)
    assert config["access_log"] == {"mode": "denied"}
    assert config["tracing"] == {"otlp_endpoint": "otel.obs:4318"}
    parsed = parse_text(json.dumps(config), source="env")
    assert (parsed.access_log.mode, parsed.tracing.otlp_endpoint) == ("denied", "otel.obs:4318")
    off, _ = inject({"outrider.io/access-log": "off"})
    assert "access_log" not in config_of(off) and "tracing" not in config_of(off)


@pytest.mark.parametrize(
    ("cpu", "memory", "workers"),
    [
        ("1", "256Mi", None),
        ("1500m", "256Mi", None),
        ("2", "256Mi", 2),
        ("4", "256Mi", 3),  # 4 workers would not fit: the kernel would kill the agent
        ("4", "512Mi", 4),
        ("8", "128Mi", None),
    ],
)
def test_the_agents_workers_follow_its_cpu_limit_as_its_memory_limit_allows(
    cpu: str, memory: str, workers: int | None
) -> None:
    """One worker per whole CPU of the agent container's limit, as many as its memory
    limit holds beside the main process; under 2, one process and no `workers` key (the
    config as it always was)."""
    resources = SETTINGS.agent.resources
    limits = replace(resources.limits, cpu=Quantity.parse(cpu), memory=Quantity.parse(memory))
    agent = replace(SETTINGS.agent, resources=replace(resources, limits=limits))
    pod, _ = inject({}, replace(SETTINGS, agent=agent))
    assert agent_of(pod)["resources"]["limits"]["cpu"] == cpu
    assert config_of(pod).get("workers") == workers


def test_the_install_guide_lists_every_annotation_the_code_reads() -> None:
    """install.md §6 is where a user looks them up, not the source: an annotation (or a
    refused or retired one) that the code knows and the guide does not fails here."""
    import identity.injected
    from control.core.upstreams import ANNOTATION as UPSTREAMS_ANNOTATION
    from injector.core import annotations as module
    from injector.core.mutate import DEFAULT_CONTAINER

    guide = (Path(__file__).resolve().parents[2] / "docs" / "install.md").read_text()
    section = guide[guide.index("### The labels and annotations") :]
    section = section[: section.index("\n## ")]
    named = {
        value
        for source in (module, identity.injected)
        for value in vars(source).values()
        if isinstance(value, str) and value.startswith("outrider.io/") and value != module.PREFIX
    }
    named |= {*module.GONE, *module.REFUSED, UPSTREAMS_ANNOTATION, DEFAULT_CONTAINER}
    missing = sorted(key for key in named if f"`{key}`" not in section)
    assert not missing, f"docs/install.md §6 does not list {missing}"


@pytest.mark.parametrize("text", ["\uff1100m", "\u0666\u0664Mi", "1e\u0663"])
def test_a_quantity_with_digits_other_than_ascii_keeps_the_default(text: str) -> None:
    """The API server reads 0-9 alone: written into the agent container, the pod would
    be refused, where a bad annotation must cost only itself."""
    pod, warnings = inject({"outrider.io/agent-memory": text})
    assert agent_of(pod)["resources"]["requests"]["memory"] == "64Mi"
    (warning,) = warnings
    assert "not a quantity" in warning
