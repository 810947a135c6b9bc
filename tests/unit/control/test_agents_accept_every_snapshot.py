"""Whatever the cluster holds, every config the core emits is one the agent takes (no NACK),
and its version depends on its content alone."""

from __future__ import annotations

import json
import random
from typing import Any

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from control.core.mesh import MeshSettings, compile_mesh, encode, version_of
from tests.cluster import agent_accepts, check_shape, complete, endpoint_slices, pod

SETTINGS = MeshSettings("example.org", outbound_ports=(15001, 15002, 15003))
#: Service appProtocols: each of the agent's protocols, and one it serves as TCP.
APP_PROTOCOLS = ["http", "grpc", "kubernetes.io/h2c", "kubernetes.io/ws"]
NAMESPACES = ["shop", "billing", "outrider-system"]
APPS = ["web", "api", "db"]
PORTS = [(8080, "http"), (9090, "metrics"), (5432, "pg")]

_RULES = st.sampled_from(
    [
        {},
        {"from": {"principals": ["spiffe://example.org/ns/shop/sa/web"]}},
        {"to": {"paths": ["/api/*"], "methods": ["GET"]}},
        {"to": {"ports": [8080], "paths": ["/admin*"]}},
        {"to": {"ports": [5432]}, "from": {"namespaces": ["billing"]}},
        {"when": [{"header": "x-role", "values": ["admin"]}]},
        {"to": {"paths": ["/a/../b"]}},  # invalid
        {"name": "named", "to": {"not_hosts": ["a.org"]}},
    ]
)
_SELECTORS = st.sampled_from(
    [
        None,
        {},
        {"matchLabels": {"app": "api"}},
        {"matchExpressions": [{"key": "app", "operator": "In", "values": ["web", "db"]}]},
        {"matchExpressions": [{"key": "app", "operator": "Maybe"}]},  # invalid
    ]
)
_TRAFFIC = st.sampled_from(
    [
        {"balancer": "least_request"},
        {"balancer": "ring_hash", "hashOn": {"header": "x-user"}},
        {"balancer": "maglev", "hashOn": "source"},
        {"retries": {"max": 3, "retryOn": [503]}, "timeouts": {"perTry": "1s"}},
        {"health": {"outlier": {"consecutive5xx": 2}}},
        # an HTTP/1.1 check: not on an h2c or gRPC port, so the policy is left out there
        {"health": {"active": {"kind": "http", "path": "/healthz", "interval": "5s"}}},
        {
            "balancer": "ring_hash",
            "hashOn": {"cookie": "s"},
            "health": {"active": {"kind": "http", "path": "/healthz", "interval": "5s"}},
        },
        {"balancer": "nope"},  # invalid
    ]
)

_PEERS = st.sampled_from(
    [
        {},
        {"mtls": {"mode": "PERMISSIVE"}},
        {"mtls": {"mode": "STRICT"}, "portLevelMtls": {"8080": {"mode": "PERMISSIVE"}}},
        {"selector": {"matchLabels": {"app": "api"}}, "mtls": {"mode": "PERMISSIVE"}},
        {
            "selector": {"matchLabels": {"app": "web"}},
            "portLevelMtls": {"9090": {"mode": "STRICT"}},
        },
        {"mtls": {"mode": "DISABLE"}},  # invalid
    ]
)


@st.composite
def _worlds(draw: st.DrawFn) -> dict[str, dict[tuple[str, str], dict[str, Any]]]:
    objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}

    def add(obj: dict[str, Any]) -> None:
        complete(obj, len(objects.get(obj["kind"], {})))
        m = obj["metadata"]
        objects.setdefault(obj["kind"], {})[(m["namespace"], m["name"])] = obj

    namespaces = NAMESPACES[:2]
    services = [(ns, app) for ns in namespaces for app in APPS if draw(st.booleans())]
    for i in range(draw(st.integers(1, 8))):
        ns, app = draw(st.sampled_from(namespaces)), draw(st.sampled_from(APPS))
        ports = draw(st.lists(st.sampled_from(PORTS), max_size=3, unique=True))
        wanted = draw(
            st.lists(
                st.sampled_from(
                    [f"{a}.{n}:{p}" for n, a in services for p in ("80", "http", "9090", "pg")]
                    + ["ghost:80", "x=y"]
                ),
                max_size=4,
            )
        )
        text = pod(
            f"{app}-{i}",
            ns,
            labels={"app": app},
            ports=ports,
            account=draw(st.sampled_from([app, "default"])),
            ip=f"10.0.{i}.{draw(st.integers(1, 9))}" if draw(st.booleans()) else f"fd00::{i + 1}",
            state=draw(st.sampled_from(["ready", "unready", "terminating"])),
            upstreams=",".join(wanted),
            injected=draw(st.integers(0, 4)) > 0,
            captured=draw(st.booleans()),
        )
        add(yaml.safe_load(text.removesuffix("---\n")))
    for ns, app in services:
        ports = [
            {
                "name": "http",
                "port": 80,
                "targetPort": draw(st.sampled_from([8080, "http", "metrics"])),
                **(
                    {"appProtocol": draw(st.sampled_from(APP_PROTOCOLS))}
                    if draw(st.booleans())
                    else {}
                ),
            },
            {"name": "pg", "port": 5432, "targetPort": "pg"},
        ]
        add(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": app, "namespace": ns},
                "spec": {"selector": {"app": app}, "ports": ports},
            }
        )
    for i in range(draw(st.integers(0, 5))):
        spec: dict[str, Any] = {
            "action": draw(st.sampled_from(["ALLOW", "DENY", "AUDIT"])),
            "rules": draw(st.lists(_RULES, max_size=3)),
        }
        if (selector := draw(_SELECTORS)) is not None:
            spec["selector"] = selector
        if draw(st.booleans()):
            spec["mode"] = "dry-run"
        ns = draw(st.sampled_from(NAMESPACES))
        add(
            {
                "apiVersion": "security.outrider.io/v1alpha1",
                "kind": "AuthorizationPolicy",
                "metadata": {"name": f"p{i}", "namespace": ns},
                "spec": spec,
            }
        )
    for i in range(draw(st.integers(0, 3))):
        peer: dict[str, Any] = draw(_PEERS)
        add(
            {
                "apiVersion": "security.outrider.io/v1alpha1",
                "kind": "PeerAuthentication",
                "metadata": {"name": f"pa{i}", "namespace": draw(st.sampled_from(NAMESPACES))},
                "spec": peer,
            }
        )
    for i, (ns, app) in enumerate(services):
        if draw(st.booleans()):
            add(
                {
                    "kind": "TrafficPolicy",
                    "metadata": {"name": f"t{i}", "namespace": ns},
                    "spec": {
                        "targetRefs": [{"group": "", "kind": "Service", "name": app}],
                        **draw(_TRAFFIC),
                    },
                }
            )
        if draw(st.booleans()):
            backends = [
                {
                    "name": draw(st.sampled_from(APPS)),
                    "port": draw(st.sampled_from([80, 5432])),
                    "weight": draw(st.integers(0, 100)),
                }
                for _ in range(draw(st.integers(1, 3)))
            ]
            rule: dict[str, Any] = {"backendRefs": backends}
            if draw(st.booleans()):
                rule["timeouts"] = {"request": draw(st.sampled_from(["1s", "2m", "1500ms", "0s"]))}
            add(
                {
                    "kind": draw(st.sampled_from(["HTTPRoute", "GRPCRoute"])),
                    "metadata": {"name": f"r{i}", "namespace": ns},
                    "spec": {
                        "parentRefs": [{"group": "", "kind": "Service", "name": app}],
                        "rules": [rule],
                    },
                }
            )
    for item in endpoint_slices(objects):
        add(item)
    return objects


@settings(max_examples=50, deadline=None)
@given(_worlds())
def test_every_config_of_every_world_has_the_contracts_shape(objects: Any) -> None:
    mesh = compile_mesh(objects, SETTINGS)
    for namespace, name in mesh.pods:
        config = mesh.config_for(namespace, name)
        assert config is not None
        check_shape(config)
        captured = objects["Pod"][(namespace, name)]["spec"]["initContainers"][0]["name"]
        assert ("captured" in config) == (captured == "outrider-capture")


@settings(max_examples=150, deadline=None)
@given(_worlds())
def test_every_config_of_every_world_is_one_the_agent_takes(objects: Any) -> None:
    mesh = compile_mesh(objects, SETTINGS)
    for namespace, name in mesh.pods:
        config = mesh.config_for(namespace, name)
        assert config is not None
        agent_accepts(config)
    json.dumps(list(mesh.statuses.values()))  # what the shell writes is JSON


@settings(max_examples=50, deadline=None)
@given(_worlds(), st.randoms(use_true_random=False))
def test_the_version_depends_on_content_not_on_order(objects: Any, rng: random.Random) -> None:
    first = compile_mesh(objects, SETTINGS)
    shuffled = {kind: _shuffled(items, rng) for kind, items in _shuffled(objects, rng).items()}
    second = compile_mesh(shuffled, SETTINGS)
    for key in first.pods:
        assert (
            first.version_for(*key)
            == second.version_for(*key)
            == version_of(first.config_for(*key) or {})
        )
        assert first.encoded_for(*key) == encode(first.config_for(*key))  # what is sent
    assert first.statuses == second.statuses
    again = compile_mesh(objects, SETTINGS, first)
    assert {k: again.version_for(*k) for k in again.pods} == {
        k: first.version_for(*k) for k in first.pods
    }


def test_the_same_content_in_any_key_order_has_one_version() -> None:
    a = {"inbound": [], "outbound": [], "policy": {"default_action": "deny", "policies": []}}
    b = {"policy": {"policies": [], "default_action": "deny"}, "outbound": [], "inbound": []}
    assert version_of(a) == version_of(b)
    assert len(version_of(a)) == 16 and int(version_of(a), 16) >= 0
    assert version_of(a) != version_of({**a, "inbound": [{"listen": "0.0.0.0:15443"}]})


def _shuffled(mapping: dict[Any, Any], rng: random.Random) -> dict[Any, Any]:
    keys = list(mapping)
    rng.shuffle(keys)
    return {key: _deep_shuffle(mapping[key], rng) for key in keys}


def _deep_shuffle(value: Any, rng: random.Random) -> Any:
    if isinstance(value, dict):
        return _shuffled(value, rng)
    if isinstance(value, list):
        return [_deep_shuffle(v, rng) for v in value]
    return value
