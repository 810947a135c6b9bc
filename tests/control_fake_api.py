"""A stand-in for tests/apiserver.py (issue 15's fake API server) until it is merged.

Same interface as CONTRACT.md's `fake_api_server` (the subset the control
plane's tests use): HTTPS on 127.0.0.1, list + watch with resourceVersion,
ADDED / MODIFIED / DELETED events, 410 after `compact()`, the status
subresource (merge patch), a bearer token, `kubeconfig()`, `apply()`. Kinds
in `missing` answer 404, as kinds whose CRD is not installed do.
TO BE DELETED once tests/apiserver.py lands.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from tests.support import LoopbackTls, loopback_tls

PLURALS = {
    "Pod": ("", "v1", "pods"),
    "Service": ("", "v1", "services"),
    "EndpointSlice": ("discovery.k8s.io", "v1", "endpointslices"),
    "AuthorizationPolicy": ("security.outrider.io", "v1alpha1", "authorizationpolicies"),
    "TrafficPolicy": ("networking.outrider.io", "v1alpha1", "trafficpolicies"),
    "HTTPRoute": ("gateway.networking.k8s.io", "v1", "httproutes"),
    "GRPCRoute": ("gateway.networking.k8s.io", "v1", "grpcroutes"),
}
BY_PLURAL = {plural: kind for kind, (_, _, plural) in PLURALS.items()}
BUILT_IN = {"Pod", "Service", "EndpointSlice"}
DEFAULT_CRDS: tuple[Path, ...] = tuple(
    path
    for path in sorted((Path(__file__).parents[1] / "deploy" / "base" / "crds").glob("*.yaml"))
    if path.name != "kustomization.yaml"
)


@dataclass(frozen=True)
class LoggedRequest:
    method: str
    path: str
    query: dict[str, str]
    verb: str


@dataclass
class FakeApiServer:
    url: str = ""
    ca_file: Path = Path()
    token: str = "a-token-the-fake-accepts"
    missing: set[str] = field(default_factory=set)
    objects: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    events: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)
    version: int = 100
    oldest: int = 0  # watches from before this get 410
    requests: list[LoggedRequest] = field(default_factory=list)
    faults: list[list[Any]] = field(default_factory=list)  # [count, code, verbs]
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _dropped: asyncio.Event = field(default_factory=asyncio.Event)

    def fail_next(
        self, count: int, code: int = 500, verbs: Iterable[str] = ("list", "watch")
    ) -> None:
        self.faults.append([count, code, set(verbs)])

    def drop_watches(self, *, abrupt: bool = False) -> int:
        self._dropped.set()
        self._dropped = asyncio.Event()
        return 0

    def kubeconfig(self, path: Path) -> Path:
        ca = base64.b64encode(self.ca_file.read_bytes()).decode()
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [
                        {
                            "name": "fake",
                            "cluster": {"server": self.url, "certificate-authority-data": ca},
                        }
                    ],
                    "users": [{"name": "fake", "user": {"token": self.token}}],
                    "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
                    "current-context": "fake",
                }
            )
        )
        return path

    def _record(self, kind: str, type_: str, obj: dict[str, Any]) -> None:
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        self.events.append((self.version, type_, json.loads(json.dumps(obj))))
        self._changed.set()
        self._changed = asyncio.Event()

    def apply(self, text: str) -> list[dict[str, Any]]:
        applied = []
        for doc in yaml.safe_load_all(text):
            if not doc or doc["kind"] == "Namespace":
                continue
            kind, meta = doc["kind"], doc["metadata"]
            meta.setdefault("namespace", "default")
            key = (kind, meta["namespace"], meta["name"])
            old = self.objects.get(key)
            if old is not None:
                doc["status"] = old.get("status", {})
                doc["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
            else:
                doc["metadata"]["generation"] = 1
            self.objects[key] = doc
            self._record(kind, "ADDED" if old is None else "MODIFIED", doc)
            applied.append(doc)
        return applied

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        obj = self.objects.pop((kind, namespace, name))
        self._record(kind, "DELETED", obj)

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any]:
        return self.objects[(kind, namespace, name)]

    def compact(self) -> None:
        self.oldest = self.version

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            raise web.HTTPUnauthorized()
        parts = [p for p in request.path.split("/") if p]
        plural = parts[-1] if parts[-1] != "status" else parts[-3]
        kind = BY_PLURAL.get(plural)
        if kind is None or kind in self.missing:
            raise web.HTTPNotFound(text='{"kind":"Status","code":404}')
        watching = request.query.get("watch") == "true"
        verb = "patch" if request.method == "PATCH" else "watch" if watching else "list"
        self.requests.append(LoggedRequest(request.method, request.path, dict(request.query), verb))
        for fault in self.faults:
            if fault[0] > 0 and verb in fault[2]:
                fault[0] -= 1
                raise web.HTTPServiceUnavailable()
        if request.method == "PATCH":
            return await self.patch_status(request, kind, parts[-4], parts[-2])
        if request.query.get("watch") != "true":
            items = [o for (k, _, _), o in self.objects.items() if k == kind]
            body = {"items": items, "metadata": {"resourceVersion": str(self.version)}}
            return web.json_response(body)
        since = int(request.query["resourceVersion"])
        if since < self.oldest:
            raise web.HTTPGone(text='{"kind":"Status","code":410,"reason":"Expired"}')
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        timeout = float(request.query.get("timeoutSeconds", 30))
        try:
            async with asyncio.timeout(timeout):
                while True:
                    for version, type_, obj in list(self.events):
                        if version > since and PLURALS[kind][2] == plural and obj["kind"] == kind:
                            line = json.dumps({"type": type_, "object": obj}) + "\n"
                            await response.write(line.encode())
                            since = version
                    changed = asyncio.ensure_future(self._changed.wait())
                    dropped = asyncio.ensure_future(self._dropped.wait())
                    await asyncio.wait({changed, dropped}, return_when=asyncio.FIRST_COMPLETED)
                    changed.cancel()
                    dropped.cancel()
                    if dropped.done() and not dropped.cancelled():
                        return response
        except TimeoutError:
            pass
        return response

    async def patch_status(
        self, request: web.Request, kind: str, namespace: str, name: str
    ) -> web.Response:
        obj = self.objects.get((kind, namespace, name))
        if obj is None:
            raise web.HTTPNotFound(text='{"kind":"Status","code":404}')
        body = await request.json()
        obj["status"] = body["status"]
        self._record(kind, "MODIFIED", obj)
        return web.json_response(obj)


@asynccontextmanager
async def fake_api_server(
    root: Path, *, crds: Iterable[Path] = DEFAULT_CRDS, port: int = 0, **options: Any
) -> AsyncIterator[FakeApiServer]:
    root.mkdir(parents=True, exist_ok=True)
    served = set(BUILT_IN)
    for crd in crds:
        served.add(yaml.safe_load(Path(crd).read_text())["spec"]["names"]["kind"])
    if (root / "cert.pem").exists():  # a restart: the same certificate, as kubeconfigs hold it
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(root / "cert.pem", root / "key.pem")
        tls = LoopbackTls(root / "cert.pem", context)
    else:
        tls = loopback_tls(root, "fake-apiserver")
    server = FakeApiServer(missing=set(PLURALS) - served)
    server.ca_file = tls.ca_file
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", server.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=tls.server_context)
    await site.start()
    server.url = f"https://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield server
    finally:
        await runner.cleanup()
