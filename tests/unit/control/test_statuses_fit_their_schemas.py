"""Every status the core writes is one the API server takes: it validates against the
status schema of the object's CRD (ours, and Gateway API's for routes), in any world."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import yaml
from hypothesis import given, settings

from control.core.mesh import MeshSettings, compile_mesh
from tests.apischema import _json_schema
from tests.unit.control.test_agents_accept_every_snapshot import _worlds

ROOT = Path(__file__).resolve().parents[3]
CRDS = {
    "AuthorizationPolicy": ROOT / "deploy/base/crds/authorizationpolicies.yaml",
    "PeerAuthentication": ROOT / "deploy/base/crds/peerauthentications.yaml",
    "TrafficPolicy": ROOT / "deploy/base/crds/trafficpolicies.yaml",
    "HTTPRoute": ROOT / "tests/fixtures/gateway-api/gateway.networking.k8s.io_httproutes.yaml",
    "GRPCRoute": ROOT / "tests/fixtures/gateway-api/gateway.networking.k8s.io_grpcroutes.yaml",
}
SETTINGS = MeshSettings("example.org", outbound_ports=(15001, 15002, 15003))


@functools.cache
def _validator(kind: str) -> Any:
    docs = [d for d in yaml.safe_load_all(CRDS[kind].read_text()) if d]
    (crd,) = [d for d in docs if d.get("kind") == "CustomResourceDefinition"]
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]
    return jsonschema.Draft4Validator(_json_schema(status))


@settings(max_examples=100, deadline=None)
@given(_worlds())
def test_every_status_validates_against_its_crd(objects: Any) -> None:
    mesh = compile_mesh(objects, SETTINGS)
    for (kind, namespace, name), status in mesh.statuses.items():
        written = json.loads(json.dumps(status))
        errors = [
            f"{'.'.join(map(str, e.absolute_path))}: {e.message[:200]}"
            for e in _validator(kind).iter_errors(written)
        ]
        assert not errors, (kind, namespace, name, errors)
        for entry in written.get("parents", [{"conditions": written.get("conditions", [])}]):
            assert len({c["type"] for c in entry["conditions"]}) == len(entry["conditions"])
