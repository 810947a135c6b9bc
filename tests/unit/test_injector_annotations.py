"""Annotations: each setting parsed strictly, and no value can make the pod more privileged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import parse_text
from injector.core import Settings, mutate
from injector.core.annotations import read_options
from injector.core.sidecar import AGENT, CONFIG_ENV
from tests.k8s import to_model

SETTINGS = Settings()
BACKEND = "spiffe://cluster.local/ns/shop/sa/backend"


def inject(annotations: dict[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
    source = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "namespace": "shop", "annotations": annotations},
        "spec": {"containers": [{"name": "app", "image": "app:1"}]},
    }
    mutation = mutate(source, "shop", SETTINGS)
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


# -- each setting, valid ---------------------------------------------------------------


def test_inbound_ports_become_listeners_from_15443_in_order() -> None:
    pod, warnings = inject({"outrider.io/inbound-ports": "8080, 9090"})
    assert warnings == ()
    assert config_of(pod)["inbound"] == [
        {"listen": "0.0.0.0:15443", "app": "127.0.0.1:8080"},
        {"listen": "0.0.0.0:15444", "app": "127.0.0.1:9090"},
    ]


def test_upstreams_become_outbound_listeners_from_15001_in_order() -> None:
    value = (
        f"backend=backend.shop.svc:15443@{BACKEND};\n"
        " cache=c-0.cache.shop.svc:15443,c-1.cache.shop.svc:15443"
        "@spiffe://cluster.local/ns/shop/sa/cache,spiffe://cluster.local/ns/shop/sa/cache-v2;"
    )
    pod, warnings = inject({"outrider.io/upstreams": value})
    assert warnings == ()
    assert config_of(pod)["outbound"] == [
        {
            "name": "backend",
            "listen": "127.0.0.1:15001",
            "endpoints": ["backend.shop.svc:15443"],
            "server_ids": [BACKEND],
        },
        {
            "name": "cache",
            "listen": "127.0.0.1:15002",
            "endpoints": ["c-0.cache.shop.svc:15443", "c-1.cache.shop.svc:15443"],
            "server_ids": [
                "spiffe://cluster.local/ns/shop/sa/cache",
                "spiffe://cluster.local/ns/shop/sa/cache-v2",
            ],
        },
    ]


def test_the_policy_configmap_is_mounted_read_only_into_the_agent() -> None:
    pod, warnings = inject({"outrider.io/policy": "shop-policy"})
    assert warnings == ()
    assert {"name": "outrider-policy", "configMap": {"name": "shop-policy"}} in pod["spec"][
        "volumes"
    ]
    assert {
        "name": "outrider-policy",
        "mountPath": "/etc/outrider/policy",
        "readOnly": True,
    } in agent_of(pod)["volumeMounts"]


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
    ("outrider.io/inbound-ports", "http"),
    ("outrider.io/inbound-ports", "0"),
    ("outrider.io/inbound-ports", "65536"),
    ("outrider.io/inbound-ports", "8080,8080"),
    ("outrider.io/inbound-ports", "15443"),  # the agent's own port
    ("outrider.io/inbound-ports", "٨٠٨٠"),  # Arabic-Indic digits: int() would take them
    ("outrider.io/inbound-ports", ",".join(str(p) for p in range(8000, 8017))),
    ("outrider.io/upstreams", ""),
    ("outrider.io/upstreams", "backend.shop.svc:15443"),
    ("outrider.io/upstreams", f"Backend=backend.shop.svc:15443@{BACKEND}"),
    ("outrider.io/upstreams", f"backend=backend.shop.svc@{BACKEND}"),
    ("outrider.io/upstreams", f"backend=BACKEND.shop:15443@{BACKEND}"),
    ("outrider.io/upstreams", "backend=backend.shop.svc:15443@spiffe://cluster.local"),
    ("outrider.io/upstreams", "backend=backend.shop.svc:15443@https://cluster.local/x"),
    ("outrider.io/upstreams", f"a=a.svc:1@{BACKEND};a=b.svc:1@{BACKEND}"),
    ("outrider.io/policy", "Shop_Policy"),
    ("outrider.io/policy", "policy\n"),
    ("outrider.io/agent-cpu", "lots"),
    ("outrider.io/agent-cpu", "0"),
    ("outrider.io/agent-cpu", "-1"),
    ("outrider.io/agent-memory", "64 Mi"),
    ("outrider.io/agent-memory", "1" * 40),
    ("outrider.io/log-level", "DEBUG"),
    ("outrider.io/log-level", "trace"),
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
    pod, warnings = inject({"outrider.io/inbound-ports": 8080})
    assert config_of(pod)["inbound"] == []
    assert warnings == (
        "outrider: outrider.io/inbound-ports: must be a string; using the default "
        "(no inbound listener)",
    )


def test_an_unknown_outrider_annotation_is_named_in_a_warning() -> None:
    pod, warnings = inject({"outrider.io/inbound-port": "8080", "example.com/x": "1"})
    assert warnings == ("outrider: outrider.io/inbound-port: unknown annotation, ignored",)
    assert agent_of(pod) == agent_of(BASELINE)


def test_a_bad_annotation_does_not_spoil_the_good_ones() -> None:
    pod, warnings = inject(
        {"outrider.io/inbound-ports": "8080", "outrider.io/upstreams": "nonsense"}
    )
    assert config_of(pod)["inbound"] == [{"listen": "0.0.0.0:15443", "app": "127.0.0.1:8080"}]
    assert config_of(pod)["outbound"] == []
    assert [w.split(":")[1].strip() for w in warnings] == ["outrider.io/upstreams"]


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
    assert len(warnings) == len(annotations)


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


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(1, 14999), min_size=1, max_size=16, unique=True),
    st.lists(
        st.from_regex(r"[a-z][a-z0-9-]{0,20}[a-z0-9]", fullmatch=True), max_size=8, unique=True
    ),
)
def test_valid_values_round_trip_into_a_config_the_agent_accepts(
    ports: list[int], names: list[str]
) -> None:
    upstreams = ";".join(
        f"{n}={n}.shop.svc:15443@spiffe://cluster.local/ns/shop/sa/{n}" for n in names
    )
    annotations = {"outrider.io/inbound-ports": ",".join(map(str, ports))}
    if names:
        annotations["outrider.io/upstreams"] = upstreams
    pod, warnings = inject(annotations)
    assert warnings == ()
    config = config_of(pod)
    assert [i["app"] for i in config["inbound"]] == [f"127.0.0.1:{p}" for p in ports]
    assert [o["name"] for o in config["outbound"]] == names


def test_read_options_without_annotations_is_the_settings() -> None:
    options, warnings = read_options({}, SETTINGS)
    assert warnings == []
    assert options.resources == SETTINGS.agent.resources
    assert options.log_level == SETTINGS.agent.log_level
    assert (options.inbound_ports, options.upstreams, options.policy) == ((), (), None)


def test_the_annotations_example_in_the_docs_is_valid() -> None:
    docs = Path(__file__).resolve().parents[2] / "docs" / "injector.md"
    section = docs.read_text().split("## Annotations", 1)[1]
    example = yaml.safe_load(section.split("```yaml\n", 1)[1].split("```", 1)[0])
    pod, warnings = inject(example["metadata"]["annotations"])
    assert warnings == ()
    config = config_of(pod)
    assert [o["listen"] for o in config["outbound"]] == ["127.0.0.1:15001", "127.0.0.1:15002"]


def test_every_upstream_gets_a_port_the_agent_can_bind() -> None:
    """Upstream listeners count up from 15001, past the status port (0.0.0.0:15020, which
    127.0.0.1:15020 would clash with): at the most upstreams, the agent still starts."""
    value = ";".join(f"u{i}=u{i}.shop.svc:15443@{BACKEND}" for i in range(32))
    pod, warnings = inject({"outrider.io/upstreams": value, "outrider.io/inbound-ports": "8080"})
    assert warnings == ()
    config = config_of(pod)  # the agent accepts it
    ports = [int(o["listen"].rsplit(":", 1)[1]) for o in config["outbound"]]
    assert ports[:19] == list(range(15001, 15020)), "the first upstreams keep their ports"
    assert 15020 not in ports and ports == sorted(set(ports)) and len(ports) == 32
