"""PeerAuthentication: whether a captured pod takes plaintext, for the mesh, a namespace or
some pods. The most specific applies, port by port; two of one level for one pod: the older
applies and the other says Conflicted; an invalid edit keeps the last valid version."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from control.core.mesh import Mesh, MeshSettings, compile_mesh
from injector.core import Settings, apply_patch, mutate
from tests.cluster import ApiServer, Objects, check_shape, pod, service, world, write_statuses

SETTINGS = MeshSettings("example.org")
#: web-0 (app=web, ports 8080 and 9090) and api-0 (app=api) in shop, db-0 in billing;
#: all captured. 8080 is an HTTP port of web's.
PODS = (
    pod("web-0", ports=[8080, 9090], captured=True)
    + pod("api-0", captured=True)
    + pod("db-0", "billing", captured=True)
    + service("web", "{name: http, port: 80, targetPort: 8080, appProtocol: http}")
)


def peer(
    name: str,
    namespace: str = "shop",
    *,
    mode: str | None = None,
    selector: dict[str, str] | None = None,
    ports: dict[str, str] | None = None,
    created: str | None = None,
    spec: dict[str, Any] | None = None,
) -> str:
    """A PeerAuthentication as YAML."""
    body: dict[str, Any] = dict(spec or {})
    if selector is not None:
        body["selector"] = {"matchLabels": selector}
    if mode is not None:
        body["mtls"] = {"mode": mode}
    if ports is not None:
        body["portLevelMtls"] = {port: {"mode": m} for port, m in ports.items()}
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if created is not None:
        metadata["creationTimestamp"] = created
    obj = {
        "apiVersion": "security.outrider.io/v1alpha1",
        "kind": "PeerAuthentication",
        "metadata": metadata,
        "spec": body,
    }
    return yaml.safe_dump(obj) + "---\n"


def _inbound(mesh: Mesh, name: str = "web-0", namespace: str = "shop") -> dict[str, Any]:
    config = mesh.config_for(namespace, name)
    assert config is not None
    check_shape(config)
    inbound: dict[str, Any] = config["captured"]["inbound"]
    return inbound


def _condition(mesh: Mesh, name: str, namespace: str = "shop") -> tuple[str, str, str]:
    status = mesh.statuses[("PeerAuthentication", namespace, name)]
    (accepted,) = status["conditions"]
    assert accepted["type"] == "Accepted"
    return accepted["status"], accepted["reason"], accepted["message"]


MESH = "outrider-system"
HTTP = {"protocol": "http"}


@pytest.mark.parametrize(
    ("objects", "mtls", "ports"),
    [
        pytest.param([], "strict", {"8080": HTTP}, id="none: strict"),
        pytest.param([peer("m", MESH, mode="PERMISSIVE")], "permissive", {"8080": HTTP}, id="mesh"),
        pytest.param(
            [peer("m", MESH, mode="PERMISSIVE"), peer("n", mode="STRICT")],
            "strict",
            {"8080": HTTP},
            id="namespace over mesh",
        ),
        pytest.param(
            [peer("n", mode="PERMISSIVE"), peer("w", selector={"app": "web"}, mode="STRICT")],
            "strict",
            {"8080": HTTP},
            id="workload over namespace",
        ),
        pytest.param(
            [peer("n", mode="PERMISSIVE"), peer("w", selector={"app": "api"}, mode="STRICT")],
            "permissive",
            {"8080": HTTP},
            id="a selector for other pods",
        ),
        pytest.param(
            [peer("n", "billing", mode="PERMISSIVE")],
            "strict",
            {"8080": HTTP},
            id="another namespace",
        ),
        pytest.param(
            [peer("w", "billing", selector={"app": "web"}, mode="PERMISSIVE")],
            "strict",
            {"8080": HTTP},
            id="a selector of another namespace",
        ),
        pytest.param(
            [peer("w", MESH, selector={"app": "web"}, mode="PERMISSIVE")],
            "permissive",
            {"8080": HTTP},
            id="a selector of the mesh namespace: every namespace",
        ),
        pytest.param(
            [peer("m", MESH, mode="PERMISSIVE"), peer("n")],
            "permissive",
            {"8080": HTTP},
            id="a level without mtls leaves it to the next",
        ),
        pytest.param(
            [
                peer("n", mode="PERMISSIVE"),
                peer("w", selector={"app": "web"}, ports={"8080": "STRICT"}),
            ],
            "permissive",
            {"8080": {"protocol": "http", "mtls": "strict"}},
            id="a port of the workload over the namespace",
        ),
        pytest.param(
            [peer("n", ports={"9090": "PERMISSIVE"})],
            "strict",
            {"8080": HTTP, "9090": {"mtls": "permissive"}},
            id="a port of the namespace",
        ),
        pytest.param(
            [
                peer("m", MESH, mode="STRICT", ports={"9090": "PERMISSIVE", "7000": "PERMISSIVE"}),
                peer("n", mode="PERMISSIVE", ports={"7000": "STRICT"}),
            ],
            "permissive",
            {"7000": {"mtls": "strict"}, "8080": HTTP},
            id="the namespace's mode over the mesh's port",
        ),
        pytest.param(
            [
                peer("n", mode="PERMISSIVE", ports={"9090": "STRICT"}),
                peer("w", selector={"app": "web"}, mode="STRICT"),
            ],
            "strict",
            {"8080": HTTP},
            id="the workload's mode over the namespace's port",
        ),
    ],
)
def test_the_most_specific_applies_port_by_port(
    objects: list[str], mtls: str, ports: dict[str, Any]
) -> None:
    mesh = compile_mesh(world(PODS, *objects), SETTINGS)
    assert _inbound(mesh) == {"mtls": mtls, "ports": ports}
    for text in objects:
        obj = yaml.safe_load(text.removesuffix("---\n"))
        m = obj["metadata"]
        assert _condition(mesh, m["name"], m["namespace"])[0] == "True"


def test_it_changes_nothing_for_a_pod_without_capture() -> None:
    objects = world(pod("web-0"), peer("n", mode="PERMISSIVE"))
    config = compile_mesh(objects, SETTINGS).config_for("shop", "web-0")
    assert config is not None and "captured" not in config
    assert config["inbound"][0]["listen"] == "0.0.0.0:15443"


T_OLD, T_NEW = "2024-01-01T00:00:00Z", "2024-02-01T00:00:00Z"


@pytest.mark.parametrize(
    ("older", "newer", "scope"),
    [
        (
            peer("b", mode="PERMISSIVE", created=T_OLD),
            peer("a", mode="STRICT", created=T_NEW),
            "namespace shop",
        ),
        (
            peer("b", MESH, mode="PERMISSIVE", created=T_OLD),
            peer("a", MESH, mode="STRICT", created=T_NEW),
            "every pod of the mesh",
        ),
        (
            peer("b", selector={"app": "web"}, mode="PERMISSIVE", created=T_OLD),
            peer("a", selector={"app": "web"}, mode="STRICT", created=T_NEW),
            "the pods it selects",
        ),
        (  # the same time: by namespace and name
            peer("a", selector={"app": "web"}, mode="PERMISSIVE", created=T_OLD),
            peer("b", selector={"app": "web"}, mode="STRICT", created=T_OLD),
            "the pods it selects",
        ),
    ],
)
def test_of_two_for_the_same_pods_the_older_applies_and_the_other_is_conflicted(
    older: str, newer: str, scope: str
) -> None:
    mesh = compile_mesh(world(PODS, newer, older), SETTINGS)
    assert _inbound(mesh)["mtls"] == "permissive"
    old, new = (yaml.safe_load(t.removesuffix("---\n"))["metadata"] for t in (older, newer))
    assert _condition(mesh, old["name"], old["namespace"])[:2] == ("True", "Accepted")
    status, reason, message = _condition(mesh, new["name"], new["namespace"])
    assert (status, reason) == ("False", "Conflicted")
    assert message == (
        f"PeerAuthentication {old['namespace']}/{old['name']} is older and applies to {scope};"
        " this one is not applied"
    )


def test_a_selector_that_wins_on_some_pods_is_accepted_and_says_where_it_does_not() -> None:
    objects = world(
        PODS,
        peer("web", selector={"app": "web"}, mode="STRICT", created=T_OLD),
        peer("all", selector={"team": "shop"}, mode="PERMISSIVE", created=T_NEW),
    )
    for name in ("web-0", "api-0"):
        objects["Pod"][("shop", name)]["metadata"]["labels"]["team"] = "shop"
    mesh = compile_mesh(objects, SETTINGS)
    assert _inbound(mesh, "web-0")["mtls"] == "strict"
    assert _inbound(mesh, "api-0")["mtls"] == "permissive"
    assert _condition(mesh, "all") == (
        "True",
        "Accepted",
        "applied by the agents of the captured pods it selects; on some of them"
        " PeerAuthentication shop/web is older and applies instead",
    )
    assert _condition(mesh, "web")[:2] == ("True", "Accepted")


def test_a_selector_that_selects_no_pod_says_so() -> None:
    mesh = compile_mesh(
        world(PODS, peer("w", selector={"app": "nothing"}, mode="STRICT")), SETTINGS
    )
    assert _condition(mesh, "w") == ("True", "Accepted", "selects no pod now")


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        (
            {"mtls": {"mode": "DISABLE"}},
            "spec.mtls.mode: 'DISABLE' is not one of STRICT, PERMISSIVE",
        ),
        ({"mtls": {"mode": "strict"}}, "spec.mtls.mode: 'strict' is not one of STRICT, PERMISSIVE"),
        ({"mtls": "STRICT"}, "spec.mtls: is not a mapping; expected {mode: STRICT or PERMISSIVE}"),
        (
            {"portLevelMtls": {"http": {"mode": "STRICT"}}},
            "spec.portLevelMtls.http: 'http' is not a port number (1-65535)",
        ),
        (
            {"portLevelMtls": {"0": {"mode": "STRICT"}}},
            "spec.portLevelMtls.0: '0' is not a port number (1-65535)",
        ),
        (  # beside "8080", which of the two would apply depends on the order of keys
            {"portLevelMtls": {"08080": {"mode": "PERMISSIVE"}, "8080": {"mode": "STRICT"}}},
            "spec.portLevelMtls.08080: '08080' is not a port number (1-65535)",
        ),
        (
            {"portLevelMtls": {"\u0668\u0660\u0668\u0660": {"mode": "PERMISSIVE"}}},
            "spec.portLevelMtls.\u0668\u0660\u0668\u0660: '\u0668\u0660\u0668\u0660' is not"
            " a port number (1-65535)",
        ),
        (
            {"portLevelMtls": {"65536": {"mode": "PERMISSIVE"}}},
            "spec.portLevelMtls.65536: '65536' is not a port number (1-65535)",
        ),
        (
            {"portLevelMtls": {"8080": {}}},
            "spec.portLevelMtls.8080.mode: None is not one of STRICT, PERMISSIVE",
        ),
        (
            {"portLevelMtls": {"15020": {"mode": "PERMISSIVE"}}},
            "spec.portLevelMtls.15020: 15020 is in the agent's own range (15000-15999), where no"
            " app port is captured",
        ),
        (
            {"selector": {"matchExpressions": [{"key": "app", "operator": "Exists"}]}},
            "spec.selector.matchExpressions: unknown key; expected matchLabels",
        ),
        (
            {"selector": {"matchLabels": {"app": 1}}},
            "spec.selector.matchLabels.app: 1 is not a string; quote label values",
        ),
        (
            {"mode": "STRICT"},
            "spec.mode: unknown key; expected one of selector, mtls, portLevelMtls",
        ),
    ],
)
def test_an_invalid_one_is_not_applied_and_its_status_names_the_field(
    spec: dict[str, Any], error: str
) -> None:
    objects = world(PODS, peer("n", mode="PERMISSIVE"), peer("bad", spec=spec))
    mesh = compile_mesh(objects, SETTINGS)
    assert _condition(mesh, "bad") == ("False", "Invalid", f"{error}; it is not applied")
    assert _inbound(mesh)["mtls"] == "permissive"  # the valid one still applies


def _edit(objects: Objects, text: str) -> Objects:
    """`kubectl apply` of a new spec: the generation moves, the status stays."""
    for kind, found in world(text).items():
        for key, new in found.items():
            old = objects[kind][key]
            new["metadata"]["generation"] = old["metadata"]["generation"] + 1
            new["status"] = old["status"]
            objects[kind][key] = new
    return objects


def test_an_invalid_edit_keeps_the_last_valid_version_on_every_replica() -> None:
    """A typo must neither open a namespace to plaintext nor shut out the callers a
    migration still needs: the version recorded in status.inForce stays."""
    objects = world(PODS, peer("n", mode="PERMISSIVE"))
    write_statuses(objects, compile_mesh(objects, SETTINGS).statuses)
    _edit(objects, peer("n", mode="Strict"))
    fresh = compile_mesh(objects, SETTINGS)  # a replica started after the edit
    assert _inbound(fresh)["mtls"] == "permissive"
    assert _condition(fresh, "n") == (
        "False",
        "Invalid",
        "spec.mtls.mode: 'Strict' is not one of STRICT, PERMISSIVE; the previous version"
        " (generation 1) stays in force",
    )
    write_statuses(objects, fresh.statuses)
    _edit(objects, peer("n", mode="STRICT"))
    fixed = compile_mesh(objects, SETTINGS, fresh)
    assert _inbound(fixed)["mtls"] == "strict"
    assert _condition(fixed, "n")[:2] == ("True", "Accepted")
    assert fixed.statuses[("PeerAuthentication", "shop", "n")]["inForce"] == {
        "generation": 3,
        "spec": {"mtls": {"mode": "STRICT"}},
    }


def test_the_pods_http_ports_and_modes_share_one_entry_per_port() -> None:
    mesh = compile_mesh(world(PODS, peer("n", ports={"8080": "PERMISSIVE"})), SETTINGS)
    assert _inbound(mesh) == {
        "mtls": "strict",
        "ports": {"8080": {"protocol": "http", "mtls": "permissive"}},
    }


@pytest.mark.parametrize(
    ("text", "error"),
    [
        pytest.param(
            peer(
                "w",
                MESH,
                mode="PERMISSIVE",
                spec={"selector": {"matchExpressions": [{"key": "app", "operator": "Exists"}]}},
            ),
            "spec.selector.matchExpressions: unknown key; expected matchLabels",
            id="matchExpressions in the mesh namespace",
        ),
        pytest.param(
            peer("w", mode="PERMISSIVE", spec={"selector": {"matchlabels": {"app": "api"}}}),
            "spec.selector.matchlabels: unknown key; expected matchLabels",
            id="a misspelt matchLabels",
        ),
        pytest.param(
            peer("w", mode="PERMISSIVE", spec={"portlevelMtls": {"8080": {"mode": "STRICT"}}}),
            "spec.portlevelMtls: unknown key; expected one of selector, mtls, portLevelMtls",
            id="a misspelt portLevelMtls",
        ),
        pytest.param(
            peer("w", selector={"app": "web"}, spec={"mtls": {"mod": "STRICT"}}),
            "spec.mtls.mod: unknown key; expected mode",
            id="a misspelt mode",
        ),
        pytest.param(
            peer("w", mode="PERMISSIVE", spec={"selector": {}}),
            "spec.selector: selects by no label; leave selector out for every pod of the namespace",
            id="an empty selector",
        ),
        pytest.param(
            peer("w", mode="PERMISSIVE", spec={"selector": {"matchLabels": {}}}),
            "spec.selector: selects by no label; leave selector out for every pod of the namespace",
            id="empty matchLabels",
        ),
    ],
)
def test_a_field_the_api_server_would_drop_never_widens_a_policy(text: str, error: str) -> None:
    """What a user meant for a few pods or ports must not reach more of them (or every pod
    of the mesh) because the API server pruned what it did not know: the object is
    refused as written, and the pods keep what applied before it."""
    objects = world(PODS, peer("n", "billing", mode="STRICT"))
    ApiServer(objects).write(text)  # as Helm, Argo CD or a client library writes it
    mesh = compile_mesh(objects, SETTINGS)
    m = yaml.safe_load(text.removesuffix("---\n"))["metadata"]
    assert _condition(mesh, m["name"], m["namespace"]) == (
        "False",
        "Invalid",
        f"{error}; it is not applied",
    )
    for namespace, name in (("shop", "web-0"), ("shop", "api-0"), ("billing", "db-0")):
        assert _inbound(mesh, name, namespace)["mtls"] == "strict"


def test_the_shipped_migration_example_does_what_its_comment_says() -> None:
    """deploy/examples/shop.yaml's pods as the injector makes them (captured), with
    permissive-migration.yaml: the frontend takes plaintext, the backend's 8080 does not,
    and the frontend's call to http://backend:8080 goes to the backends over mTLS."""
    examples = Path(__file__).parents[3] / "deploy" / "examples"
    shop = [o for o in yaml.safe_load_all((examples / "shop.yaml").read_text()) if o]
    objects = [o for o in shop if o["kind"] in ("Namespace", "ServiceAccount", "Service")]
    for i, svc in enumerate(o for o in objects if o["kind"] == "Service"):
        svc["spec"]["clusterIP"] = f"10.96.0.{20 + i}"  # as the API server assigns
    pods = []
    for i, deployment in enumerate(o for o in shop if o["kind"] == "Deployment"):
        template = deployment["spec"]["template"]
        apply_patch(template, mutate(template, "shop", Settings()).patch)
        name = f"{deployment['metadata']['name']}-0"
        template["metadata"] |= {"name": name, "namespace": "shop"}
        template["metadata"].setdefault("annotations", {})["test/ip"] = f"10.0.0.{7 + i}"
        pods.append(name)
        objects.append({"apiVersion": "v1", "kind": "Pod", **template})
    migration = (examples / "permissive-migration.yaml").read_text()
    mesh = compile_mesh(
        world(yaml.safe_dump_all(objects), migration), MeshSettings("cluster.local")
    )
    assert pods == ["backend-v1-0", "backend-v2-0", "frontend-0"]
    assert _inbound(mesh, "frontend-0")["mtls"] == "permissive"
    for backend in ("backend-v1-0", "backend-v2-0"):
        assert _inbound(mesh, backend) == {
            "mtls": "permissive",
            "ports": {"8080": {"mtls": "strict", "protocol": "http"}},
        }
    assert _condition(mesh, "migration")[0] == _condition(mesh, "backend-strict")[0] == "True"
    config = mesh.config_for("shop", "frontend-0")
    assert config is not None
    (backend,) = [o for o in config["outbound"] if o["name"] == "backend.shop:8080"]
    assert "listen" not in backend
    assert backend["destinations"] == ["10.96.0.20:8080"]
    assert sorted(backend["endpoints"]) == ["10.0.0.7:8080", "10.0.0.8:8080"]
    assert backend["server_ids"] == ["spiffe://cluster.local/ns/shop/sa/backend"]
