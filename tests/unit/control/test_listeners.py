"""Which listeners a pod gets: inbound from its container ports, outbound from its annotation,
endpoints and identities from the Services' EndpointSlices."""

from __future__ import annotations

from typing import Any

import pytest

from control.core import upstreams
from control.core.mesh import Mesh, MeshSettings, compile_mesh
from control.core.snapshot import encode
from tests.cluster import SHOP, agent_accepts, pod, service, world

SETTINGS = MeshSettings("example.org")


def _mesh(*texts: str) -> Mesh:
    return compile_mesh(world(*texts), SETTINGS)


def _config(mesh: Mesh, name: str, namespace: str = "shop") -> dict[str, Any]:
    config = mesh.config_for(namespace, name)
    assert config is not None
    agent_accepts(config)
    return config


# -- inbound -------------------------------------------------------------------------------


def test_inbound_one_listener_per_tcp_container_port_in_spec_order() -> None:
    objects = world(pod("app-0", ports=[8080, 9090]))
    spec = objects["Pod"][("shop", "app-0")]["spec"]
    spec["containers"][0]["ports"] += [
        {"containerPort": 5353, "protocol": "UDP"},
        {"containerPort": 15090},  # the agent's range
        {"containerPort": 8080},  # listed twice
    ]
    spec["containers"].append({"name": "sidecar", "ports": [{"containerPort": 7000}]})
    spec["initContainers"][0]["ports"] = [{"containerPort": 15020}]  # the agent's own
    config = _config(compile_mesh(objects, SETTINGS), "app-0")
    assert config["inbound"] == [
        {"listen": "0.0.0.0:15443", "app": "127.0.0.1:8080", "protocol": "tcp"},
        {"listen": "0.0.0.0:15444", "app": "127.0.0.1:9090", "protocol": "tcp"},
        {"listen": "0.0.0.0:15445", "app": "127.0.0.1:7000", "protocol": "tcp"},
    ]


@pytest.mark.parametrize(
    ("port", "protocols"),
    [
        ("{port: 80, targetPort: 8080, appProtocol: http}", ["http", "tcp"]),
        ("{port: 80, targetPort: web, appProtocol: http}", ["http", "tcp"]),
        ("{port: 9090, appProtocol: http}", ["tcp", "http"]),
        ("{port: 80, targetPort: 8080}", ["tcp", "tcp"]),
        ("{port: 80, targetPort: 8080, appProtocol: kubernetes.io/h2c}", ["http2", "tcp"]),
        ("{port: 80, targetPort: 8080, appProtocol: h2c}", ["http2", "tcp"]),
        ("{port: 80, targetPort: web, appProtocol: grpc}", ["grpc", "tcp"]),
        ("{port: 9090, appProtocol: GRPC}", ["tcp", "grpc"]),
        ("{port: 80, targetPort: 8080, appProtocol: kubernetes.io/ws}", ["tcp", "tcp"]),
        ("{port: 80, targetPort: 8080, appProtocol: mysql}", ["tcp", "tcp"]),
        ("{port: 80, targetPort: nope, appProtocol: http}", ["tcp", "tcp"]),
    ],
)
def test_a_port_speaks_what_a_selecting_services_app_protocol_says(
    port: str, protocols: list[str]
) -> None:
    mesh = _mesh(pod("app-0", ports=[(8080, "web"), 9090]), service("app", port))
    assert [i["protocol"] for i in _config(mesh, "app-0")["inbound"]] == protocols


def test_services_that_disagree_on_a_port_the_first_by_name_holds_and_the_pod_says_so() -> None:
    texts = [
        pod("app-0", ports=[8080, 9090]),
        service("app-grpc", "{port: 80, targetPort: 8080, appProtocol: grpc}", selector="app"),
        service("app-web", "{port: 80, targetPort: 8080, appProtocol: http}", selector="app"),
        # h2c and gRPC are the same on the wire: no conflict.
        service(
            "app-h2", "{port: 90, targetPort: 9090, appProtocol: kubernetes.io/h2c}", selector="app"
        ),
        service("app-rpc", "{port: 90, targetPort: 9090, appProtocol: grpc}", selector="app"),
        # TCP (no appProtocol) never takes a port from another Service's L7 protocol.
        service("app-a", "{port: 91, targetPort: 9090}", selector="app"),
    ]
    mesh = _mesh(*texts)
    assert [i["protocol"] for i in _config(mesh, "app-0")["inbound"]] == ["grpc", "http2"]
    assert mesh.pod_warnings[("shop", "app-0")] == (
        "containerPort 8080: Service shop/app-web port 80 says it speaks http, but Service"
        " shop/app-grpc port 80 (grpc) came first and holds; HTTP/1.1 and h2c cannot share a"
        " port: fix the appProtocol of one of them",
    )


def test_a_grpc_service_port_gives_its_callers_grpc_upstreams() -> None:
    texts = [
        pod("client-0", labels={"app": "client"}, upstreams="greeter:grpc"),
        pod("greeter-0", labels={"app": "greeter"}, ports=[(9090, "grpc")], ip="10.0.0.7"),
        service("greeter", "{name: grpc, port: 9090, targetPort: grpc, appProtocol: grpc}"),
    ]
    objects = world(*texts)
    outbound = _config(compile_mesh(objects, SETTINGS), "client-0")["outbound"]
    assert [(o["name"], o["protocol"], o["endpoints"]) for o in outbound] == [
        ("greeter.shop:9090", "grpc", ["10.0.0.7:15443"])
    ]


def test_a_service_that_does_not_select_the_pod_does_not_change_its_ports() -> None:
    elsewhere = service("app", "{port: 80, targetPort: 8080, appProtocol: http}", "other")
    other_app = service("other", "{port: 80, targetPort: 8080, appProtocol: http}")
    mesh = _mesh(pod("app-0"), elsewhere, other_app)
    assert _config(mesh, "app-0")["inbound"][0]["protocol"] == "tcp"


# -- outbound ------------------------------------------------------------------------------


def test_an_upstream_gets_its_endpoints_at_each_pods_agent_and_their_identities() -> None:
    # v1 serves `web` as its second port, v2 as its first: each agent listens elsewhere.
    objects = world(SHOP)
    ports = objects["Pod"][("shop", "backend-v1-0")]["spec"]["containers"][0]["ports"]
    ports.insert(0, {"containerPort": 9000})
    config = _config(compile_mesh(objects, SETTINGS), "frontend-0")
    assert config["outbound"] == [
        {
            "name": "backend.shop:8080",
            "listen": "127.0.0.1:15001",
            "protocol": "http",
            "endpoints": ["10.0.0.7:15444", "10.0.0.8:15443"],
            "server_ids": ["spiffe://example.org/ns/shop/sa/backend"],
        }
    ]


def test_upstreams_take_the_outbound_ports_in_annotation_order() -> None:
    text = (
        pod("client-0", upstreams="db:5432, nope:1,backend.shop:http,cache.infra:6379")
        + pod("db-0", labels={"app": "db"}, ports=[5432], account="db", ip="10.0.1.1")
        + pod("cache-0", "infra", labels={"app": "cache"}, ports=[6379], account="cache")
        + service("db", "{port: 5432}")
        + service("cache", "{name: redis, port: 6379}", "infra")
    )
    mesh = _mesh(SHOP, text)
    outbound = _config(mesh, "client-0")["outbound"]
    assert [(o["name"], o["listen"], o["protocol"]) for o in outbound] == [
        ("db.shop:5432", "127.0.0.1:15001", "tcp"),
        ("backend.shop:8080", "127.0.0.1:15003", "http"),  # entry 1 skipped, in place
        ("cache.infra:6379", "127.0.0.1:15004", "tcp"),
    ]
    assert outbound[2]["server_ids"] == ["spiffe://example.org/ns/infra/sa/cache"]
    assert mesh.pod_warnings[("shop", "client-0")] == (
        "outrider.io/upstreams[1] 'nope.shop:1': no such Service; skipped",
    )


@pytest.mark.parametrize(
    ("annotation", "warning"),
    [
        (
            "backend",
            "outrider.io/upstreams[0] 'backend': no port; expected service[.namespace]:port",
        ),
        ("Backend:80", "outrider.io/upstreams[0] 'Backend:80': 'Backend' is not a Service name"),
        ("backend.shop.svc:80", "'shop.svc' is not a namespace"),
        ("backend:0", "port 0 is out of range"),
        ("backend:HTTP", "'HTTP' is neither a port number nor a port name"),
        (
            "backend:9999",
            "outrider.io/upstreams[0] 'backend.shop:9999': the Service has no such port",
        ),
        ("backend=10.0.0.7:15443@spiffe://x", "the old name=host:port@id form is gone"),
        ("backend:8080,,backend:http", "outrider.io/upstreams[1] '': empty entry"),
        ("backend:8080,backend:http", "outrider.io/upstreams[1] 'backend.shop:http': listed twice"),
    ],
)
def test_a_bad_annotation_entry_is_skipped_and_said(annotation: str, warning: str) -> None:
    mesh = _mesh(SHOP, pod("client-0", upstreams=annotation))
    warnings = mesh.pod_warnings[("shop", "client-0")]
    assert any(warning in w for w in warnings), warnings


def test_more_upstreams_than_outbound_ports() -> None:
    mesh = compile_mesh(
        world(SHOP, pod("client-0", upstreams="backend:8080,backend-v1:8080,backend-v2:8080")),
        MeshSettings("example.org", outbound_ports=(15001, 15002)),
    )
    assert len(_config(mesh, "client-0")["outbound"]) == 2
    assert mesh.pod_warnings[("shop", "client-0")] == (
        "outrider.io/upstreams[2] 'backend-v2.shop:8080': only 2 upstreams fit; skipped",
    )


def test_listeners_past_their_share_of_the_snapshot_are_left_out_and_said(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pod's annotation listeners may take half of its own part of a snapshot: past that
    its agent would refuse the snapshot whole, its own policies with it."""
    wanted = pod("client-0", upstreams="backend:8080,backend-v1:8080,backend-v2:8080")
    (first, *_) = _config(_mesh(SHOP, wanted), "client-0")["outbound"]
    monkeypatch.setattr(upstreams, "EXPLICIT_BYTES", len(encode(first)) + 1)
    mesh = _mesh(SHOP, wanted)
    assert _config(mesh, "client-0")["outbound"] == [first]
    warnings = mesh.pod_warnings[("shop", "client-0")]
    assert [w.split(":", 2)[:2] for w in warnings] == [
        ["outrider.io/upstreams[1] 'backend-v1.shop", "8080'"],
        ["outrider.io/upstreams[2] 'backend-v2.shop", "8080'"],
    ]
    assert all(" left out: with it the pod's listeners would take " in w for w in warnings)


@pytest.mark.parametrize(
    ("states", "endpoints"),
    [
        (("ready", "ready"), ["10.0.0.7:15443", "10.0.0.8:15443"]),
        (("ready", "unready"), ["10.0.0.7:15443"]),
        (("ready", "terminating"), ["10.0.0.7:15443"]),
        (("terminating", "unready"), ["10.0.0.7:15443"]),  # none ready: the draining ones
        (("terminating", "terminating"), ["10.0.0.7:15443", "10.0.0.8:15443"]),
        (("terminating-unready", "unready"), None),
    ],
)
def test_ready_endpoints_or_else_those_serving_while_terminating(
    states: tuple[str, str], endpoints: list[str] | None
) -> None:
    text = (
        pod("client-0", upstreams="api:80")
        + pod("api-0", ip="10.0.0.7", state=states[0])
        + pod("api-1", ip="10.0.0.8", state=states[1])
        + service("api", "{port: 80, targetPort: 8080}")
    )
    mesh = _mesh(text)
    outbound = _config(mesh, "client-0")["outbound"]
    assert [o["endpoints"] for o in outbound] == ([endpoints] if endpoints else [])
    if endpoints is None:
        assert mesh.pod_warnings[("shop", "client-0")] == (
            "outrider.io/upstreams[0] 'api.shop:80': no ready injected endpoint; left out for now",
        )


def test_pods_without_an_agent_are_not_endpoints() -> None:
    text = (
        pod("client-0", upstreams="api:80")
        + pod("api-0", ip="10.0.0.7", account="api")
        + pod("api-1", ip="10.0.0.8", account="plain", injected=False)
        + service("api", "{port: 80, targetPort: 8080}")
    )
    (outbound,) = _config(_mesh(text), "client-0")["outbound"]
    assert outbound["endpoints"] == ["10.0.0.7:15443"]
    assert outbound["server_ids"] == ["spiffe://example.org/ns/shop/sa/api"]


def test_server_ids_are_the_accounts_of_the_pods_behind_theservice() -> None:
    text = (
        pod("client-0", upstreams="api:80")
        + pod("api-0", ip="10.0.0.7", account="api-blue")
        + pod("api-1", ip="10.0.0.8", account="api-green")
        + pod("api-2", ip="10.0.0.9", account="api-red", state="unready")
        + service("api", "{port: 80, targetPort: 8080}")
    )
    (outbound,) = _config(_mesh(text), "client-0")["outbound"]
    assert outbound["server_ids"] == [
        "spiffe://example.org/ns/shop/sa/api-blue",
        "spiffe://example.org/ns/shop/sa/api-green",
    ]


def test_a_target_port_the_pod_does_not_declare_has_no_listener_and_is_said() -> None:
    text = (
        pod("client-0", upstreams="api:80")
        + pod("api-0", ip="10.0.0.7", ports=[9090])
        + service("api", "{port: 80, targetPort: 8080}")
    )
    mesh = _mesh(text)
    assert _config(mesh, "client-0")["outbound"] == []
    assert mesh.pod_warnings[("shop", "api-0")] == (
        "Service shop/api port 80 targets 8080, which is not a TCP containerPort of this pod,"
        " so its agent has no listener for it; declare the port in the pod spec",
    )


def test_ipv6_endpoints_are_bracketed() -> None:
    text = (
        pod("client-0", upstreams="api:80")
        + pod("api-0", ip="fd00::7")
        + service("api", "{port: 80, targetPort: 8080}")
    )
    (outbound,) = _config(_mesh(text), "client-0")["outbound"]
    assert outbound["endpoints"] == ["[fd00::7]:15443"]


def test_finished_pods_are_neither_configured_nor_endpoints() -> None:
    objects = world(
        pod("client-0", upstreams="api:80"),
        pod("api-0", ip="10.0.0.7"),
        service("api", "{port: 80, targetPort: 8080}"),
    )
    objects["Pod"][("shop", "api-0")]["status"] = {"phase": "Succeeded"}
    mesh = compile_mesh(objects, SETTINGS)
    assert mesh.config_for("shop", "api-0") is None
    assert _config(mesh, "client-0")["outbound"] == []


def test_pods_are_known_by_their_service_account() -> None:
    mesh = _mesh(SHOP)
    identity = mesh.pods[("shop", "frontend-0")]
    assert (identity.namespace, identity.name, identity.service_account) == (
        "shop",
        "frontend-0",
        "frontend",
    )
    assert mesh.config_for("shop", "nobody") is None


def test_inbound_listeners_stay_in_the_agents_range() -> None:
    """Past 15999 a listener could take a port the app itself listens on (16000 here)."""
    ports = [*range(1000, 1600), 16000]
    mesh = _mesh(pod("wide-0", ports=ports))
    inbound = _config(mesh, "wide-0")["inbound"]
    fit = 16000 - SETTINGS.inbound_base
    assert len(inbound) == fit
    assert inbound[-1] == {
        "listen": "0.0.0.0:15999",
        "app": f"127.0.0.1:{1000 + fit - 1}",
        "protocol": "tcp",
    }
    (warning,) = mesh.pod_warnings[("shop", "wide-0")]
    assert warning.startswith(f"containerPort {1000 + fit}, ") and "and 39 more" in warning


def test_a_port_past_the_agents_range_is_no_endpoint() -> None:
    ports = [*range(1000, 1000 + 16000 - SETTINGS.inbound_base), 8080]
    objects = world(
        pod("client-0", upstreams="wide:8080"),
        pod("wide-0", ports=ports),
        service("wide", "{port: 8080}"),
    )
    mesh = compile_mesh(objects, SETTINGS)
    assert _config(mesh, "client-0")["outbound"] == []
    assert any("not a TCP containerPort" in w for w in mesh.pod_warnings[("shop", "wide-0")])


def test_a_huge_annotation_costs_and_says_a_bounded_amount() -> None:
    """An annotation may hold 256 KiB: one pod author must not make every compile parse
    tens of thousands of entries, nor fill the logs with a warning for each."""
    bad = "x" * 10_000 + ":80"
    entries = ["backend:8080", bad, *(f"svc{i}:80" for i in range(40_000))]
    mesh = _mesh(SHOP, pod("client-0", upstreams=",".join(entries)))
    assert [o["name"] for o in _config(mesh, "client-0")["outbound"]] == ["backend.shop:8080"]
    warnings = mesh.pod_warnings[("shop", "client-0")]
    assert len(warnings) <= 300 and sum(map(len, warnings)) < 64_000
    assert warnings[-1] == (
        "outrider.io/upstreams[256:]: 39746 more entries; only the first 256 are read; skipped"
    )


def test_a_port_listed_twice_keeps_the_name_given_to_either() -> None:
    """Kubernetes lets two containers list one port (it only warns); the EndpointSlice
    controller resolves a targetPort by the name either gives it, and so must the agent."""
    objects = world(SHOP)
    spec = objects["Pod"][("shop", "backend-v1-0")]["spec"]
    spec["containers"].insert(0, {"name": "first", "ports": [{"containerPort": 8080}]})
    mesh = compile_mesh(objects, SETTINGS)
    assert _config(mesh, "backend-v1-0")["inbound"] == [
        {"listen": "0.0.0.0:15443", "app": "127.0.0.1:8080", "protocol": "http"}
    ]
    (backend,) = _config(mesh, "frontend-0")["outbound"]
    assert backend["endpoints"] == ["10.0.0.7:15443", "10.0.0.8:15443"]


def test_the_outbound_ports_skip_the_agents_capture_and_status_ports() -> None:
    """15006 and 15007 are the capture ports and 15020 the status port (CONTRACT.md):
    an upstream there would clash with them. 32 upstreams fit, as before."""
    ports = MeshSettings("example.org").outbound_ports
    assert len(ports) == len(set(ports)) == 32
    assert not {15006, 15007, 15020} & set(ports)
    assert ports[:6] == (15001, 15002, 15003, 15004, 15005, 15008)
    assert ports[-1] == 15035
