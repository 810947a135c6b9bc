"""Kubernetes for tests: objects checked against the client's models, and a stub API server.

No API server runs here, so the client's generated models (one per API type,
from the OpenAPI spec) stand in for its schema: an object that deserializes
and serializes back with every key intact is one the API server would accept
field for field. `stub_api_server` serves the recorded EndpointSlices of
shop/backend (tests/fixtures/endpointslices) the way kube-apiserver does, to
the real client in the test's process or, through `in_cluster`, to an agent
process's in-cluster config. For anything beyond those recorded bytes (objects
that change, CRDs, the status subresource, validation), use the full fake in
tests/apiserver.py.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from kubernetes import client

SLICES = Path(__file__).parent / "fixtures" / "endpointslices"
SLICES_PATH = "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices"

_API = client.ApiClient()


def model_name(obj: dict[str, Any]) -> str:
    """`V1Deployment` for {"apiVersion": "apps/v1", "kind": "Deployment"}."""
    version = obj["apiVersion"].rsplit("/", 1)[-1]  # models are named by version only
    return version.capitalize() + obj["kind"]


def to_model(obj: dict[str, Any], name: str | None = None) -> Any:
    """The client model for `obj`; raises ValueError naming each key the model lacks."""
    name = name or model_name(obj)
    model = _API._ApiClient__deserialize(obj, name)  # type: ignore[attr-defined]
    lost = unknown_fields(obj, _API.sanitize_for_serialization(model))
    if lost:
        raise ValueError(f"{name}: fields the API does not know: {', '.join(lost)}")
    return model


def unknown_fields(original: Any, round_trip: Any, path: str = "") -> list[str]:
    """Key paths present in `original` but dropped by the model round trip."""
    if isinstance(original, dict):
        if not isinstance(round_trip, dict):
            return [path or "."]
        lost = []
        for key, value in original.items():
            where = f"{path}.{key}" if path else key
            if key not in round_trip:
                if value not in (None, {}, []):
                    lost.append(where)
            else:
                lost.extend(unknown_fields(value, round_trip[key], where))
        return lost
    if isinstance(original, list) and isinstance(round_trip, list):
        return [
            lost
            for index, (a, b) in enumerate(zip(original, round_trip, strict=False))
            for lost in unknown_fields(a, b, f"{path}[{index}]")
        ]
    return []


@dataclass
class StubApiServer:
    """Serves the recorded list and watch bytes of shop/backend the way kube-apiserver does."""

    queries: list[dict[str, str]] = field(default_factory=list)
    port: int = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        query = dict(request.query)
        self.queries.append(query)
        if query.get("watch") != "true":
            lists = ["list.json", "relist.json"]
            listed = sum(1 for q in self.queries if q.get("watch") != "true")
            body = (SLICES / lists[min(listed, 2) - 1]).read_bytes()
            return web.Response(body=body, content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        sessions = {"48213": "watch.jsonl", "48388": "watch_expired.jsonl"}
        name = sessions.get(query["resourceVersion"])
        if name is not None:
            for line in (SLICES / name).read_text().splitlines():
                await response.write(line.encode() + b"\n")
            return response
        # Nothing changes: hold the watch open, as the server does, until the client goes.
        transport = request.transport
        async with asyncio.timeout(30):
            # aiohttp has no event for a client going away: poll the transport.
            while transport is not None and not transport.is_closing():  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        return response


@asynccontextmanager
async def stub_api_server(tls: ssl.SSLContext | None = None) -> AsyncIterator[StubApiServer]:
    """A StubApiServer on 127.0.0.1 (HTTPS with `tls`, as in a cluster), on this event loop."""
    stub = StubApiServer()
    app = web.Application()
    app.router.add_get(SLICES_PATH, stub.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await site.start()
    stub.port = runner.addresses[0][1]
    try:
        yield stub
    finally:
        await runner.cleanup()


#: Runs `outrider` with the in-cluster config's fixed token and CA paths (a pod's
#: /var/run/secrets/...) pointed at the files named by the first two arguments.
_IN_CLUSTER = """\
import runpy, sys
from kubernetes.config import incluster_config as paths
paths.SERVICE_TOKEN_FILENAME, paths.SERVICE_CERT_FILENAME = sys.argv[1:3]
sys.argv = ["outrider", *sys.argv[3:]]
runpy.run_module("outrider", run_name="__main__", alter_sys=True)
"""


def in_cluster(port: int, ca_file: Path, directory: Path) -> tuple[list[str], dict[str, str]]:
    """The interpreter arguments and environment of a process that believes it runs in a pod
    whose API server is the stub on 127.0.0.1:`port`, whose certificate `ca_file` holds."""
    token = directory / "serviceaccount-token"
    token.write_text("a-token-the-stub-accepts")
    arguments = ["-c", _IN_CLUSTER, str(token), str(ca_file)]
    return arguments, {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(port)}
