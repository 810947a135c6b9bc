"""A cluster's objects for the control plane's core: YAML as users write it, plus what
Kubernetes adds (metadata, pod IPs and readiness, EndpointSlices).

`world(text)` reads `kubectl apply`-shaped YAML (Pods, Services, policies,
routes) and returns the objects as the API server would list them, keyed the
way `control.core.mesh.compile_mesh` takes them. EndpointSlices come from a
small stand-in for the EndpointSlice controller (`endpoint_slices`): it
resolves each Service port's targetPort in each selected pod, as the real one
does, so a test writes only what a user writes. A pod says how it is doing
in two annotations read only here: `test/ip` (its status.podIP, and its
address in slices) and `test/state` (`ready`, `unready`, `terminating`,
`terminating-unready`).
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from copy import deepcopy
from pathlib import Path
from typing import Any

import yaml

from agent.config import AgentConfig, ConfigError, decode_snapshot, parse
from agent.core.policy import PolicySet
from agent.core.policyfile import PolicyError, parse_policy_list
from control.core.snapshot import encode
from identity.appprotocol import L7
from tests.apistore import Store

Key = tuple[str, str]
Objects = dict[str, dict[Key, dict[str, Any]]]

#: Outrider's own CRDs, as installed (deploy/base/crds).
CRDS = tuple(
    path
    for path in sorted((Path(__file__).parents[1] / "deploy" / "base" / "crds").glob("*.yaml"))
    if path.name != "kustomization.yaml"
)

AGENT = {"name": "outrider-agent", "image": "outrider/agent", "restartPolicy": "Always"}
#: The init container that writes a pod's capture rules, as the injector adds it.
CAPTURE = {"name": "outrider-capture", "image": "outrider/agent", "args": ["capture", "apply"]}


def world(*texts: str) -> Objects:
    """Every object of the YAML documents, completed as the API server would, plus slices."""
    objects: Objects = defaultdict(dict)
    for index, obj in enumerate(
        obj for text in texts for obj in yaml.safe_load_all(text) if obj is not None
    ):
        complete(obj, index)
        m = obj["metadata"]
        objects[obj["kind"]][(m["namespace"], m["name"])] = obj
    for item in endpoint_slices(objects):
        m = item["metadata"]
        objects["EndpointSlice"][(m["namespace"], m["name"])] = item
    return objects


def complete(obj: dict[str, Any], index: int = 0) -> dict[str, Any]:
    """What the API server fills in: namespace, uid, generation, creationTimestamp; and
    for a pod what the kubelet writes once it runs: its IP (`test/ip`) in status."""
    m = obj.setdefault("metadata", {})
    m.setdefault("namespace", "default")
    m.setdefault("uid", f"uid-{obj['kind']}-{m['namespace']}-{m['name']}")
    m.setdefault("generation", 1)
    m.setdefault("creationTimestamp", f"2024-01-01T00:{index // 60:02d}:{index % 60:02d}Z")
    if obj["kind"] == "Pod" and "status" not in obj:
        ip = (m.get("annotations") or {}).get("test/ip", "10.0.0.1")
        obj["status"] = {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    spec = obj.get("spec")
    if obj["kind"] == "Service" and isinstance(spec, dict) and spec.get("type") != "ExternalName":
        if "clusterIP" not in spec:  # allocated, one per object of the world
            spec["clusterIP"] = f"10.96.{index // 250}.{index % 250 + 1}"
        spec.setdefault("clusterIPs", [spec["clusterIP"]])
    return obj


def injected(pod: Mapping[str, Any]) -> bool:
    spec = pod.get("spec") or {}
    containers = (spec.get("initContainers") or []) + (spec.get("containers") or [])
    return any(c.get("name") == AGENT["name"] for c in containers)


def inject(pod: dict[str, Any]) -> dict[str, Any]:
    """The pod with the agent as a native sidecar, as the injector adds it."""
    pod = deepcopy(pod)
    pod["spec"].setdefault("initContainers", []).append(dict(AGENT))
    return pod


def endpoint_slices(objects: Mapping[str, Mapping[Key, Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """One slice per Service and distinct port mapping, as the EndpointSlice controller makes."""
    slices = []
    for (namespace, name), service in sorted(objects.get("Service", {}).items()):
        selector = (service.get("spec") or {}).get("selector")
        if not selector:
            continue
        groups: dict[tuple[tuple[str, int], ...], list[dict[str, Any]]] = defaultdict(list)
        for (pod_ns, _), item in sorted(objects.get("Pod", {}).items()):
            labels = item["metadata"].get("labels") or {}
            if pod_ns != namespace or any(labels.get(k) != v for k, v in selector.items()):
                continue
            ports = tuple(_resolve(service, item))
            groups[ports].append(_endpoint(item))
        for i, (ports, endpoints) in enumerate(sorted(groups.items())):
            slices.append(
                {
                    "apiVersion": "discovery.k8s.io/v1",
                    "kind": "EndpointSlice",
                    "metadata": {
                        "name": f"{name}-{i}",
                        "namespace": namespace,
                        "labels": {"kubernetes.io/service-name": name},
                    },
                    "addressType": "IPv6" if ":" in _ip(endpoints) else "IPv4",
                    "ports": [{"name": n, "port": p, "protocol": "TCP"} for n, p in ports],
                    "endpoints": endpoints,
                }
            )
    return slices


def _ip(endpoints: list[dict[str, Any]]) -> str:
    return endpoints[0]["addresses"][0] if endpoints else ""


def _resolve(service: Mapping[str, Any], pod: Mapping[str, Any]) -> Iterable[tuple[str, int]]:
    named = {
        port["name"]: port["containerPort"]
        for container in pod["spec"].get("containers") or []
        for port in container.get("ports") or []
        if "name" in port
    }
    for port in service["spec"].get("ports") or []:
        target = port.get("targetPort", port["port"])
        number = named.get(target) if isinstance(target, str) else target
        if number is not None:
            yield (port.get("name", ""), number)


def _endpoint(pod: Mapping[str, Any]) -> dict[str, Any]:
    annotations = pod["metadata"].get("annotations") or {}
    state = annotations.get("test/state", "ready")
    ready = state == "ready"
    terminating = state.startswith("terminating")
    return {
        "addresses": [annotations.get("test/ip", "10.0.0.1")],
        "conditions": {
            "ready": ready,
            "serving": ready or state == "terminating",
            "terminating": terminating,
        },
        "targetRef": {
            "kind": "Pod",
            "name": pod["metadata"]["name"],
            "namespace": pod["metadata"]["namespace"],
        },
    }


def pod(
    name: str,
    namespace: str = "shop",
    *,
    labels: Mapping[str, str] | None = None,
    ports: Iterable[int | tuple[int, str]] = (8080,),
    account: str = "default",
    ip: str = "10.0.0.1",
    state: str = "ready",
    upstreams: str | None = None,
    injected: bool = True,
    captured: bool = False,
) -> str:
    """A pod as YAML, injected unless told otherwise (a Deployment's pod, written short);
    `captured`: with the capture init container too."""
    annotations = {"test/ip": ip, "test/state": state}
    if upstreams is not None:
        annotations["outrider.io/upstreams"] = upstreams
    container_ports = [
        {"containerPort": p} if isinstance(p, int) else {"containerPort": p[0], "name": p[1]}
        for p in ports
    ]
    spec: dict[str, Any] = {
        "serviceAccountName": account,
        "containers": [{"name": "app", "image": "app", "ports": container_ports}],
    }
    if injected:
        spec["initContainers"] = [dict(CAPTURE)] if captured else []
        spec["initContainers"].append(dict(AGENT))
    obj = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": dict(labels or {"app": name.rsplit("-", 1)[0]}),
            "annotations": annotations,
        },
        "spec": spec,
    }
    return yaml.safe_dump(obj, sort_keys=False) + "---\n"


def service(name: str, ports: str, namespace: str = "shop", selector: str = "") -> str:
    """A Service as YAML selecting app=`selector` (its own name unless told); `ports` as
    written in its flow list: "{port: 80, targetPort: 8080}"."""
    return f"""\
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  selector: {{app: {selector or name}}}
  ports: [{ports}]
---
"""


_API_VERSIONS = {
    "AuthorizationPolicy": "security.outrider.io/v1alpha1",
    "PeerAuthentication": "security.outrider.io/v1alpha1",
    "TrafficPolicy": "networking.outrider.io/v1alpha1",
}


def policy_object(
    kind: str, name: str, spec: str, namespace: str = "shop", **metadata: object
) -> str:
    """An Outrider policy of `kind` as YAML, its `spec` in flow style ("{action: DENY}");
    `metadata` adds fields (uid, generation) after the name and namespace."""
    extra = "".join(f", {key}: {value}" for key, value in metadata.items())
    return f"""\
apiVersion: {_API_VERSIONS[kind]}
kind: {kind}
metadata: {{name: {name}, namespace: {namespace}{extra}}}
spec: {spec}
---
"""


#: A shop: a frontend calling a backend that runs as v1 and v2, each port HTTP.
SHOP = (
    pod(
        "frontend-0",
        labels={"app": "frontend"},
        account="frontend",
        ip="10.0.0.5",
        ports=[3000],
        upstreams="backend:8080",
    )
    + pod(
        "backend-v1-0",
        labels={"app": "backend", "version": "v1"},
        account="backend",
        ip="10.0.0.7",
        ports=[(8080, "web")],
    )
    + pod(
        "backend-v2-0",
        labels={"app": "backend", "version": "v2"},
        account="backend",
        ip="10.0.0.8",
        ports=[(8080, "web")],
    )
    + """\
apiVersion: v1
kind: Service
metadata: {name: backend, namespace: shop}
spec:
  selector: {app: backend}
  ports: [{name: http, port: 8080, targetPort: web, appProtocol: http}]
---
apiVersion: v1
kind: Service
metadata: {name: backend-v1, namespace: shop}
spec:
  selector: {app: backend, version: v1}
  ports: [{name: http, port: 8080, targetPort: web, appProtocol: http}]
---
apiVersion: v1
kind: Service
metadata: {name: backend-v2, namespace: shop}
spec:
  selector: {app: backend, version: v2}
  ports: [{name: http, port: 8080, targetPort: web, appProtocol: http}]
---
"""
)


#: What the injector writes; a snapshot fills in the rest.
BOOTSTRAP: dict[str, Any] = {
    "identity": {"spiffe_id": "spiffe://example.org/ns/shop/sa/default", "token_file": "token"},
    "ca": {"address": "outrider-ca.outrider-system.svc:8443", "bundle_file": "bundle.pem"},
    "admin": "127.0.0.1:15000",
    "status": "0.0.0.0:15020",
}


def agent_accepts(config: Mapping[str, Any]) -> AgentConfig:
    """Take a snapshot as an agent does; raise what it would NACK with.

    The snapshot's bytes as the control plane sends them go through the agent's
    size and nesting bounds; it goes into the bootstrap and through agent.config.parse;
    its inline policies through parse_policy_list and, as the agent loads policy,
    PolicySet.http_only_errors for the TCP inbound ports. (An agent.config that
    does not know `policy.policies` yet is given the rest; the policies are
    checked here all the same.)
    """
    decode_snapshot(encode(config), "snapshot")
    raw = json.loads(json.dumps({**BOOTSTRAP, **config}))
    inline = (raw.get("policy") or {}).get("policies", [])
    try:
        parsed = parse(raw, base=Path("/"), source="snapshot")
    except ConfigError as exc:
        if exc.errors != ["policy.policies: unknown key"]:
            raise
        del raw["policy"]["policies"]
        parsed = parse(raw, base=Path("/"), source="snapshot")
    policies = PolicySet(parse_policy_list(inline, "snapshot"), parsed.policy.default_action)
    tcp = frozenset(i.app.port for i in parsed.inbound if i.protocol == "tcp")
    errors = policies.http_only_errors(tcp)
    if errors:
        raise PolicyError(errors)
    return parsed


def check_shape(config: Mapping[str, Any]) -> None:
    """A snapshot has the shape issue 16's contract gives it (CONTRACT.md, "Agent config"):
    a destination in one entry only, never passed through too; `captured` only with no
    inbound listeners; addresses as ip:port or [v6]:port. `agent_accepts` checks the rest,
    with the agent's own parser."""
    assert set(config) <= {"inbound", "outbound", "policy", "captured"}
    captured = config.get("captured")
    destinations: dict[str, str] = {}
    for entry in config["outbound"]:
        assert "listen" in entry or entry.get("destinations"), entry
        assert set(entry) >= {"name", "protocol", "server_ids"}
        assert ("endpoints" in entry) != ("subsets" in entry)
        for address in entry.get("destinations", []):
            assert address not in destinations, (address, destinations[address], entry["name"])
            destinations[address] = entry["name"]
            _address(address)
        for address in entry.get("endpoints", []):
            _address(address)
    if captured is None:
        assert not destinations
        return
    assert config["inbound"] == []
    assert set(captured) == {"inbound", "outbound"}
    assert captured["inbound"]["mtls"] in ("strict", "permissive")
    for port, overrides in captured["inbound"]["ports"].items():
        assert port.isdecimal() and 0 < int(port) < 65536
        assert overrides and set(overrides) <= {"protocol", "mtls"}
        assert overrides.get("protocol", "http") in L7  # a TCP port is never named
        assert overrides.get("mtls") != captured["inbound"]["mtls"]  # only what differs
    assert captured["outbound"]["policy"] in ("allow-any", "registry-only")
    for address in captured["outbound"]["passthrough"]:
        _address(address)
        assert address not in destinations
    json.dumps(config)


def _address(text: str) -> None:
    match = re.fullmatch(r"\[([0-9a-f:]+)\]:(\d+)|([0-9.]+):(\d+)", text)
    assert match, text
    ipaddress.ip_address(match[1] or match[3])
    assert 0 < int(match[2] or match[4]) < 65536


def write_statuses(objects: Objects, statuses: Mapping[tuple[str, str, str], Any]) -> Objects:
    """The objects after the shell wrote these statuses (`Mesh.statuses`) through the
    status subresource: each object's whole status replaced, as JSON went and came back.
    Later compiles read what is in force from there."""
    for (kind, namespace, name), status in statuses.items():
        obj = objects.get(kind, {}).get((namespace, name))
        if obj is not None:
            obj["status"] = json.loads(json.dumps(status))
    return objects


class ApiServer:
    """Outrider's objects written as most clients write them: Helm, Argo CD, a client
    library or `kubectl apply --validate=false` ask for no strict field validation, so
    what the CRD's schema does not keep is dropped without an error. Each object goes
    through the fake API server's store (tests/apistore.py) with deploy/'s CRDs:
    pruned, defaulted and validated as kube-apiserver would, and read back into
    `objects` as the control plane would list it. An edit keeps the status (the status
    subresource's) and moves the generation; statuses go through the status
    subresource."""

    def __init__(self, objects: Objects) -> None:
        self.objects = objects
        self.store = Store(namespace_lifecycle=False)
        for path in CRDS:
            for crd in yaml.safe_load_all(path.read_text()):
                if crd is not None:
                    self.store.apply(crd)

    def write(self, text: str) -> dict[str, Any]:
        """Creates or replaces (PUT) every object of `text`; returns the last as stored."""
        stored: dict[str, Any] = {}
        for body in yaml.safe_load_all(text):
            if body is None:
                continue
            resource = self.store.resource_of(body["apiVersion"], body["kind"])
            m = body["metadata"]
            namespace, name = m.get("namespace", "default"), m["name"]
            if (namespace, name) in self.objects.get(body["kind"], {}):
                stored, _ = self.store.update(resource, namespace, name, body)
            else:
                stored, _ = self.store.create(resource, namespace, body)
            self.objects.setdefault(body["kind"], {})[(namespace, name)] = stored
        return stored

    def write_statuses(self, statuses: Mapping[tuple[str, str, str], Any]) -> None:
        """`write_statuses` for the objects this server stores."""
        for (kind, namespace, name), status in statuses.items():
            obj = self.objects.get(kind, {}).get((namespace, name))
            if obj is None or "resourceVersion" not in obj["metadata"]:
                continue  # not written through this server
            resource = self.store.resource_of(obj["apiVersion"], kind)
            body = {**obj, "status": status}
            stored, _ = self.store.update(resource, namespace, name, body, status=True)
            self.objects[kind][(namespace, name)] = stored
