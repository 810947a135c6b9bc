"""What a captured pod's agent is told: no inbound listeners, how captured traffic is served
(its inbound modes and L7 ports, the mesh's outbound policy, what is passed through), and
an outbound entry for every Service of the mesh, addressed by its ClusterIPs. A pod without
capture gets what it always got. (CONTRACT.md, "Control plane".)"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from agent.config import MAX_SNAPSHOT_BYTES, MAX_SNAPSHOT_CONTAINERS
from agent.core.policy import PolicySet
from agent.core.policyfile import parse_policy_list
from control.app import _log_new_warnings
from control.core import mesh as mesh_module
from control.core import upstreams
from control.core.mesh import Mesh, MeshSettings, compile_mesh, encode
from control.core.services import read_service, read_workload
from identity.jsonbounds import containers
from injector.core import Settings
from injector.core.settings import CaptureSettings
from tests.cluster import SHOP, agent_accepts, check_shape, pod, policy_object, service, world
from tests.unit.test_injector_core import injected
from tests.unit.test_injector_core import pod as injector_pod

SETTINGS = MeshSettings("example.org")
BACKEND_ID = "spiffe://example.org/ns/shop/sa/backend"


def _config(mesh: Mesh, name: str, namespace: str = "shop") -> dict[str, Any]:
    config = mesh.config_for(namespace, name)
    assert config is not None
    check_shape(config)
    return config


def _captured_shop(*extra: str, settings: MeshSettings = SETTINGS) -> Mesh:
    """SHOP with every pod captured, and the Services' ClusterIPs fixed."""
    text = SHOP.replace("initContainers:\n", "initContainers:\n  - {name: outrider-capture}\n")
    objects = world(text, *extra)
    for i, name in enumerate(("backend", "backend-v1", "backend-v2")):
        objects["Service"][("shop", name)]["spec"]["clusterIPs"] = [f"10.96.0.{10 + i}"]
    return compile_mesh(objects, settings)


# -- which pods are captured ---------------------------------------------------------------


def test_a_pod_without_capture_gets_what_it_always_got() -> None:
    mesh = compile_mesh(world(SHOP), SETTINGS)
    config = _config(mesh, "frontend-0")
    assert "captured" not in config
    assert config["outbound"] == [
        {
            "name": "backend.shop:8080",
            "listen": "127.0.0.1:15001",
            "protocol": "http",
            "endpoints": ["10.0.0.7:15443", "10.0.0.8:15443"],
            "server_ids": [BACKEND_ID],
        }
    ]
    assert _config(mesh, "backend-v1-0")["inbound"] == [
        {"listen": "0.0.0.0:15443", "app": "127.0.0.1:8080", "protocol": "http"}
    ]


def test_a_pod_is_captured_when_it_has_the_capture_init_container() -> None:
    objects = world(pod("web-0", captured=True), pod("api-0"))
    mesh = compile_mesh(objects, SETTINGS)
    assert "captured" in _config(mesh, "web-0")
    assert "captured" not in _config(mesh, "api-0")
    # Only as an init container, beside the agent: a pod without the agent is not in the mesh.
    spec = objects["Pod"][("shop", "api-0")]["spec"]
    spec["containers"].append({"name": "outrider-capture"})
    assert "captured" not in _config(compile_mesh(objects, SETTINGS), "api-0")
    spec = {"initContainers": [{"name": "outrider-capture"}], "containers": [{"name": "app"}]}
    plain = {"kind": "Pod", "metadata": {"name": "db-0", "namespace": "shop"}, "spec": spec}
    assert (
        compile_mesh({"Pod": {("shop", "db-0"): plain}}, SETTINGS).config_for("shop", "db-0")
        is None
    )


def test_a_captured_pod_serves_no_inbound_listeners_and_says_how_captured_calls_are_taken() -> None:
    config = _config(_captured_shop(), "backend-v1-0")
    assert config["inbound"] == []
    assert config["captured"] == {
        "inbound": {"mtls": "strict", "ports": {"8080": {"protocol": "http"}}},
        "outbound": {"policy": "allow-any", "passthrough": []},
    }
    # The policies are those of a pod with these ports, as before.
    assert config["policy"] == {"default_action": "allow-authenticated", "policies": []}


def test_a_captured_pods_grpc_and_h2c_ports_are_named_with_their_protocols() -> None:
    text = (
        pod("api-0", ports=[8000, 9090, 9091], captured=True)
        + service("api", "{port: 80, targetPort: 8000, appProtocol: http}")
        + service("api-rpc", "{port: 90, targetPort: 9090, appProtocol: grpc}", selector="api")
        + service("api-h2", "{port: 91, targetPort: 9091, appProtocol: h2c}", selector="api")
    )
    config = _config(compile_mesh(world(text), SETTINGS), "api-0")
    agent_accepts(config)
    assert config["captured"]["inbound"]["ports"] == {
        "8000": {"protocol": "http"},
        "9090": {"protocol": "grpc"},
        "9091": {"protocol": "http2"},
    }


def test_the_mesh_wide_outbound_traffic_policy_reaches_every_captured_pod() -> None:
    settings = MeshSettings("example.org", outbound_traffic_policy="registry-only")
    mesh = _captured_shop(settings=settings)
    for name in mesh.pods:
        assert _config(mesh, name[1])["captured"]["outbound"]["policy"] == "registry-only"


# -- Services: their ClusterIPs ------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "ips"),
    [
        ({"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"]}, ("10.96.0.10",)),
        ({"clusterIP": "10.96.0.10"}, ("10.96.0.10",)),  # written before clusterIPs existed
        ({"clusterIPs": ["10.96.0.10", "fd00:10:96::a"]}, ("10.96.0.10", "fd00:10:96::a")),
        ({"clusterIPs": ["fd00:10:96:0:0:0:0:a"]}, ("fd00:10:96::a",)),  # canonical
        ({"clusterIP": "None", "clusterIPs": ["None"]}, ()),  # headless
        ({"type": "ExternalName", "externalName": "db.example.com"}, ()),
        ({"clusterIP": ""}, ()),  # not allocated yet
        ({"clusterIPs": ["10.96.0.300", 7, None]}, ()),  # nonsense is no address
        ({}, ()),
    ],
)
def test_a_services_cluster_ips_are_read_from_its_spec(
    spec: dict[str, Any], ips: tuple[str, ...]
) -> None:
    obj = {"metadata": {"name": "db", "namespace": "shop"}, "spec": {"ports": [], **spec}}
    assert read_service(obj, ("shop", "db")).cluster_ips == ips


# -- outbound --------------------------------------------------------------------------------


def test_a_captured_backend_is_an_endpoint_at_its_own_ip_and_app_port() -> None:
    """Its agent's inbound capture takes the connection there; an agent without capture
    listens on 15443+i as before. One Service may have both kinds during a rollout."""
    text = pod("api-0", ports=[(8080, "web")], ip="10.0.0.7", captured=True) + pod(
        "api-1", ports=[(8080, "web")], ip="10.0.0.8"
    )
    api = service("api", "{name: http, port: 80, targetPort: web}")
    caller = pod("web-0", upstreams="api:80")
    config = _config(compile_mesh(world(text, api, caller), SETTINGS), "web-0")
    assert config["outbound"][0]["endpoints"] == ["10.0.0.7:8080", "10.0.0.8:15443"]


def test_a_captured_backend_needs_no_declared_container_port() -> None:
    """Capture redirects every port, so a numeric targetPort the pod spec does not list
    is still served; one in the agent's own range is not, and the pod says why."""
    api = service(
        "api", "{name: a, port: 80, targetPort: 9000}, {name: b, port: 81, targetPort: 15020}"
    )
    objects = world(pod("api-0", ports=[], ip="10.0.0.7", captured=True), api)
    objects["EndpointSlice"][("shop", "api-0")] = {
        "metadata": {
            "name": "api-0",
            "namespace": "shop",
            "labels": {"kubernetes.io/service-name": "api"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "a", "port": 9000}, {"name": "b", "port": 15020}],
        "endpoints": [
            {
                "addresses": ["10.0.0.7"],
                "conditions": {"ready": True},
                "targetRef": {"kind": "Pod", "name": "api-0", "namespace": "shop"},
            }
        ],
    }
    mesh = compile_mesh(objects, SETTINGS)
    entries = {e["name"]: e for e in _config(mesh, "api-0")["outbound"]}
    assert entries["api.shop:80"]["endpoints"] == ["10.0.0.7:9000"]
    assert "api.shop:81" not in entries
    (warning,) = mesh.pod_warnings[("shop", "api-0")]
    assert "port 81 targets 15020" in warning and "the agent's own (15000-15999)" in warning


def test_a_captured_pod_gets_an_entry_for_every_service_port_of_the_mesh() -> None:
    mesh = _captured_shop()
    config = _config(mesh, "backend-v1-0")  # its annotation names nothing
    assert config["outbound"] == [
        {
            "name": "backend.shop:8080",
            "destinations": ["10.96.0.10:8080"],
            "protocol": "http",
            "endpoints": ["10.0.0.7:8080", "10.0.0.8:8080"],
            "server_ids": [BACKEND_ID],
        },
        {
            "name": "backend-v1.shop:8080",
            "destinations": ["10.96.0.11:8080"],
            "protocol": "http",
            "endpoints": ["10.0.0.7:8080"],
            "server_ids": [BACKEND_ID],
        },
        {
            "name": "backend-v2.shop:8080",
            "destinations": ["10.96.0.12:8080"],
            "protocol": "http",
            "endpoints": ["10.0.0.8:8080"],
            "server_ids": [BACKEND_ID],
        },
    ]


def test_an_explicit_listener_of_a_captured_pod_is_one_entry_with_its_destinations() -> None:
    config = _config(_captured_shop(), "frontend-0")  # upstreams: backend:8080
    first, *rest = config["outbound"]
    assert first == {
        "name": "backend.shop:8080",
        "listen": "127.0.0.1:15001",
        "destinations": ["10.96.0.10:8080"],
        "protocol": "http",
        "endpoints": ["10.0.0.7:8080", "10.0.0.8:8080"],
        "server_ids": [BACKEND_ID],
    }
    assert [e["name"] for e in rest] == ["backend-v1.shop:8080", "backend-v2.shop:8080"]
    assert all("listen" not in e for e in rest)


def test_every_cluster_ip_of_a_dual_stack_service_is_a_destination() -> None:
    objects = world(pod("api-0", captured=True), service("api", "{port: 80, targetPort: 8080}"))
    objects["Service"][("shop", "api")]["spec"]["clusterIPs"] = ["10.96.0.9", "fd00::9"]
    (entry,) = _config(compile_mesh(objects, SETTINGS), "api-0")["outbound"]
    assert entry["destinations"] == ["10.96.0.9:80", "[fd00::9]:80"]


def test_services_outside_the_mesh_are_passed_through_and_headless_ones_are_not_listed() -> None:
    """A Service without injected endpoints (the API server's own, a database outside the
    mesh, one whose pods are not ready) is in the registry: plain TCP to its ClusterIP:port,
    under either outbound policy. A headless one has no address to capture."""
    headless = service("cache", "{port: 6379}").replace("spec:\n", "spec:\n  clusterIP: None\n")
    objects = world(
        pod("web-0", captured=True),
        pod("cache-0", ip="10.0.0.6", captured=True),
        pod("db-0", injected=False, ip="10.0.0.9"),
        pod("api-0", ip="10.0.0.4", state="unready"),
        service("kubernetes", "{name: https, port: 443, targetPort: 6443}", "default", "none"),
        service("db", "{port: 5432}"),
        service("api", "{port: 80, targetPort: 8080}"),
        service("web", "{name: a, port: 80, targetPort: 8080}, {name: b, port: 81}"),
        headless,
    )
    for name, ip in [(("default", "kubernetes"), "10.96.0.1"), (("shop", "db"), "10.96.0.2")]:
        objects["Service"][name]["spec"]["clusterIPs"] = [ip]
    objects["Service"][("shop", "api")]["spec"]["clusterIPs"] = ["10.96.0.4"]
    objects["Service"][("shop", "web")]["spec"]["clusterIPs"] = ["10.96.0.3"]
    for settings in (
        SETTINGS,
        MeshSettings("example.org", outbound_traffic_policy="registry-only"),
    ):
        config = _config(compile_mesh(objects, settings), "web-0")
        assert config["captured"]["outbound"]["passthrough"] == [
            "10.96.0.1:443",
            "10.96.0.2:5432",
            "10.96.0.4:80",
        ]
        # Port 81 targets no declared containerPort: a captured pod serves it all the same.
        assert [(e["name"], e["destinations"]) for e in config["outbound"]] == [
            ("web.shop:80", ["10.96.0.3:80"]),
            ("web.shop:81", ["10.96.0.3:81"]),
        ]


def test_every_captured_pod_shares_the_mesh_wide_entries_built_once() -> None:
    """2,000 pods and 500 Services must not cost 2,000 x 500 entries built: each Service port
    is built once per compile, and every captured pod's config holds the same objects."""
    pods = "".join(
        pod(
            f"app{i}-0",
            labels={"app": f"app{i}"},
            ip=f"10.0.{i // 250}.{i % 250 + 1}",
            captured=True,
        )
        for i in range(40)
    )
    services = "".join(service(f"app{i}", "{port: 80, targetPort: 8080}") for i in range(40))
    mesh = compile_mesh(world(pods, services), SETTINGS)
    first, second = (_config(mesh, f"app{i}-0")["outbound"] for i in (0, 1))
    assert len(first) == len(second) == 40
    assert all(a is b for a, b in zip(first, second, strict=True))


def test_policies_are_fitted_to_every_port_a_captured_pods_snapshot_names() -> None:
    """An HTTP port or a mode override need not be a declared containerPort of a captured
    pod. A DENY with HTTP fields keeps applying, with them, on each HTTP port, and denies
    on each TCP port the snapshot names (the agent refuses HTTP fields on those, as on a
    TCP inbound listener); a TCP port never loses a DENY."""
    text = pod("api-0", ports=[9090], captured=True) + service(
        "api", "{port: 80, targetPort: 8000, appProtocol: http}"
    )
    deny = """\
apiVersion: security.outrider.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: shop}
spec:
  action: DENY
  rules: [{name: admin, to: {paths: ["/admin*"]}}]
---
apiVersion: security.outrider.io/v1alpha1
kind: PeerAuthentication
metadata: {name: legacy, namespace: shop}
spec:
  portLevelMtls: {"7000": {mode: PERMISSIVE}}
"""
    config = _config(compile_mesh(world(text, deny), SETTINGS), "api-0")
    assert config["captured"]["inbound"]["ports"] == {
        "7000": {"mtls": "permissive"},
        "8000": {"protocol": "http"},
    }
    (policy,) = config["policy"]["policies"]
    assert policy["rules"] == [
        {"name": "admin", "to": {"paths": ["/admin*"], "ports": [8000]}},
        {"name": "admin-tcp", "to": {"ports": [7000, 9090]}},
    ]
    named_tcp = frozenset(
        int(port)
        for port, override in config["captured"]["inbound"]["ports"].items()
        if override.get("protocol", "tcp") == "tcp"
    )
    policies = PolicySet(parse_policy_list(config["policy"]["policies"], "snapshot"), "deny")
    assert policies.http_only_errors(named_tcp) == []  # what the agent checks


def test_the_agents_snapshot_bounds_are_the_ones_the_control_plane_keeps_to() -> None:
    assert upstreams.AGENT_SNAPSHOT_BYTES == MAX_SNAPSHOT_BYTES
    assert upstreams.AGENT_SNAPSHOT_CONTAINERS == MAX_SNAPSHOT_CONTAINERS
    assert upstreams.SHARED_BYTES <= MAX_SNAPSHOT_BYTES * 3 // 4
    assert upstreams.SHARED_CONTAINERS <= MAX_SNAPSHOT_CONTAINERS * 3 // 4


@pytest.mark.parametrize("bound", ["SHARED_BYTES", "SHARED_CONTAINERS"])
def test_one_huge_service_cannot_push_every_captured_pods_snapshot_past_the_agents_bound(
    monkeypatch: pytest.MonkeyPatch, bound: str
) -> None:
    """Any namespace may create a Service of thousands of ports: every captured pod of the
    mesh would get it, past what an agent takes, and refuse its whole snapshot. The
    largest Services are left out instead (their own callers lose their entries), the
    rest of the mesh keeps its config, and the control plane says which. (The bounds are
    made small here: the real ones take a Service of ~15,000 ports.)"""
    wide = ", ".join(f"{{name: p{i}, port: {2000 + i}}}" for i in range(60))
    objects = world(
        pod("web-0", captured=True, ip="10.0.0.5"),
        pod("api-0", captured=True, ip="10.0.0.4"),
        pod("wide-0", "evil", captured=True, ip="10.0.1.1"),
        service("api", "{port: 80, targetPort: 8080}"),
        service("db", "{port: 5432}"),  # no pod: passed through
        service("wide", wide, "evil"),
    )
    everything = _config(compile_mesh(objects, SETTINGS), "web-0")
    assert len(everything["outbound"]) == 61
    size = {"SHARED_BYTES": 2000, "SHARED_CONTAINERS": 40}[bound]
    monkeypatch.setattr(upstreams, bound, size)
    mesh = compile_mesh(objects, SETTINGS)
    for name in ("web-0", "api-0"):
        config = _config(mesh, name)
        assert [e["name"] for e in config["outbound"]] == ["api.shop:80"]
        assert config["captured"]["outbound"]["passthrough"] == [
            a for a in everything["captured"]["outbound"]["passthrough"] if a.endswith(":5432")
        ]
        agent_accepts(config)
        assert mesh.encoded_for("shop", name) == encode(config)
    assert mesh.left_out == (("evil", "wide"),)
    (warning,) = mesh.warnings
    assert warning.startswith(
        "1 Service(s) left out of every captured pod's snapshot (of the namespaces that take"
        " the most, the largest first): evil/wide."
    )
    # Without capture, nothing is measured or left out.
    plain = world(pod("web-0"), service("wide", wide, "evil"), pod("wide-0", "evil"))
    assert compile_mesh(plain, SETTINGS).warnings == ()


def test_what_is_left_out_of_the_mesh_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    warned: dict[tuple[str, str], tuple[str, ...]] = {}
    left_out = {("", ""): ("1 Service(s) left out ...",), ("shop", "web-0"): ("bad entry",)}
    with caplog.at_level(logging.WARNING, "outrider.control"):
        _log_new_warnings(warned, left_out)
        _log_new_warnings(warned, left_out)
    assert [r.getMessage() for r in caplog.records] == [
        "mesh: 1 Service(s) left out ...",
        "pod shop/web-0: bad entry",
    ]


@pytest.mark.parametrize("enabled", [True, False])
def test_a_pod_is_captured_for_the_control_plane_exactly_when_the_injector_captured_it(
    enabled: bool,
) -> None:
    """The two name the capture container apart (control may not import the injector): a
    rename on one side alone would send a captured pod listeners and no destinations,
    so every call it makes would leave the mesh as plain TCP. Nor is the status port its
    probes are rewritten to an app port."""
    settings = Settings(capture=CaptureSettings(enabled=enabled, exclude_inbound_ports=(9090,)))
    probe = {"httpGet": {"path": "/ready", "port": 8080}}
    app = {"name": "app", "image": "app:1", "ports": [{"containerPort": 8080}]}
    source = injector_pod(containers=[{**app, "readinessProbe": probe}])
    patched = injected(source, settings)
    workload = read_workload(patched, ("shop", "web"))
    assert workload is not None
    assert workload.captured is enabled
    assert workload.ports == (8080,)
    # The ports its capture rules leave alone, read from the capture container's args.
    assert workload.uncaptured == (frozenset({9090, 15020}) if enabled else frozenset())


def test_many_small_services_of_one_namespace_cannot_push_another_namespaces_service_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whoever may create Services in one namespace may create many small ones. Past the
    bound, the namespace that takes the most of every snapshot loses its largest Service
    first, not the largest Service of the mesh, which may be another team's."""
    wide = ", ".join(f"{{name: p{i}, port: {2000 + i}}}" for i in range(12))
    small = "".join(service(f"s{i}", "{port: 80}", "evil", "small") for i in range(20))
    objects = world(
        pod("web-0", captured=True, ip="10.0.0.5"),
        pod("big-0", captured=True, ip="10.0.0.4"),
        pod("small-0", "evil", captured=True, ip="10.0.1.1", ports=[80]),
        service("big", wide),
        small,
    )
    everything = _config(compile_mesh(objects, SETTINGS), "web-0")["outbound"]
    sizes: dict[str, int] = {}
    for entry in everything:
        name = entry["name"].split(":")[0]
        sizes[name] = sizes.get(name, 0) + len(encode(entry)) + 1
    big = sizes.pop("big.shop")
    evil = sum(sizes.values())
    assert big > max(sizes.values())  # the largest Service
    assert evil > big  # but evil's Services take more of every snapshot together
    monkeypatch.setattr(upstreams, "SHARED_BYTES", big + evil - 2 * max(sizes.values()) + 10)
    mesh = compile_mesh(objects, SETTINGS)
    names = [e["name"] for e in _config(mesh, "web-0")["outbound"]]
    assert sum(name.startswith("big.shop:") for name in names) == 12
    assert len(mesh.left_out) == 2 and all(ns == "evil" for ns, _ in mesh.left_out)


def test_a_port_the_capture_rules_leave_alone_is_no_mtls_endpoint() -> None:
    """The platform may exclude inbound ports from capture (the injector's
    exclude_inbound_ports, in the capture container's args): a call to one reaches the
    app without its agent, so an mTLS connection there would reach the app as TLS bytes
    and fail. Such a port is no endpoint: a Service that targets only it is passed through,
    as plain TCP is what the pod takes there."""
    objects = world(
        pod("web-0", captured=True, ports=[8080, 9090], ip="10.0.0.7"),
        pod("client-0", captured=True, ip="10.0.0.5"),
        service("web", "{port: 80, targetPort: 8080}"),
        service("metrics", "{port: 9090}", selector="web"),
    )
    (capture, _) = objects["Pod"][("shop", "web-0")]["spec"]["initContainers"]
    capture["args"] = ["capture", "apply", "--exclude-inbound-ports", "15020,9090"]
    objects["Service"][("shop", "web")]["spec"]["clusterIPs"] = ["10.96.0.80"]
    objects["Service"][("shop", "metrics")]["spec"]["clusterIPs"] = ["10.96.0.90"]
    mesh = compile_mesh(objects, SETTINGS)
    config = _config(mesh, "client-0")
    assert [(e["name"], e["endpoints"]) for e in config["outbound"]] == [
        ("web.shop:80", ["10.0.0.7:8080"])
    ]
    assert config["captured"]["outbound"]["passthrough"] == ["10.96.0.90:9090"]
    assert mesh.pod_warnings[("shop", "web-0")] == (
        "Service shop/metrics port 9090 targets 9090, which the pod's capture rules leave"
        " alone (--exclude-inbound-ports): its agent never takes a call there, so it is no"
        " mTLS endpoint; callers reach it as plain TCP",
    )


def test_a_captured_pods_size_is_counted_exactly_from_its_parts() -> None:
    """Too large for its agent, a captured pod's configuration is measured from parts
    (its policies, the outbound entries every captured pod shares), never encoded whole
    per pod: the figures its warning gives are those of the snapshot sent, byte for byte."""
    pads = [
        policy_object("AuthorizationPolicy", f"pad-{i}", "{rules: [{}]}", uid=f"u{i}")
        for i in range(17)
    ]
    text = SHOP.replace("initContainers:\n", "initContainers:\n  - {name: outrider-capture}\n")
    objects = world(text, *pads)
    for i in range(17):
        objects["AuthorizationPolicy"][("shop", f"pad-{i}")]["spec"]["rules"] = [{}] * 12000
    mesh = compile_mesh(objects, SETTINGS)
    sent = mesh.encoded_for("shop", "backend-v1-0")
    assert sent is not None and b'"captured"' in sent and b'"outbound":[{' in sent
    (warning, *_) = mesh.pod_warnings[("shop", "backend-v1-0")]
    assert f"would take {len(sent)} bytes and {containers(sent)} arrays and objects" in warning


def test_a_pod_past_what_its_agent_takes_is_said_whatever_takes_the_room(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its policies are small: the room goes to its listeners and the ports Services give
    it (thousands of ports on headless Services took one past 4 MiB, unsaid). It is said,
    and no policy is blamed for it."""
    sent = encode(_config(_captured_shop(), "frontend-0"))
    monkeypatch.setattr(mesh_module, "AGENT_SNAPSHOT_BYTES", len(sent) - 1)
    mesh = _captured_shop()
    (said, *_) = mesh.pod_warnings[("shop", "frontend-0")]
    assert said.startswith(f"not configured: its configuration would take {len(sent)} bytes")
    assert "Its policies take 0 bytes; the rest is its listeners and the 0 ports" in said
    assert not any(key[0] == "AuthorizationPolicy" for key in mesh.statuses)
