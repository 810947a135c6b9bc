"""A fake Kubernetes API server for tests: HTTPS, list + watch, kubeconfig, validation.

No API server runs here, so this one stands in for kube-apiserver wherever a
client can tell the difference: the real `kubernetes` client (or any other)
pointed at it by the kubeconfig it writes sees the same paths, Status errors,
resourceVersions and watch streams. Tests feed it YAML written exactly as users
write it (`apply`, like `kubectl apply -f`) and it refuses what kube-apiserver
would refuse.

Covered:
- HTTPS on 127.0.0.1 (a self-signed certificate for 127.0.0.1 and localhost,
  `ca_file`), bearer-token authentication (401 Unauthorized without it),
  `kubeconfig(path)` for `kubernetes.config.load_kube_config` /
  `new_client_from_config`; discovery at /api, /apis, /version, /healthz.
- Resources: core v1 pods, services, namespaces, configmaps, serviceaccounts; apps/v1
  deployments and admissionregistration.k8s.io/v1 mutatingwebhookconfigurations
  (stored, no controller, no webhook called);
  discovery.k8s.io/v1 endpointslices; apiextensions.k8s.io/v1
  customresourcedefinitions. Creating a CRD serves its resource at every served
  version (status subresource, scope, selectableFields); deleting it deletes its
  objects. The namespaces default, kube-system, kube-public and kube-node-lease
  exist from the start; creating in a namespace that does not exist is 404, as
  with the NamespaceLifecycle admission plugin (`namespace_lifecycle=False` to
  turn it off).
- Verbs: list (labelSelector with =, ==, !=, in, notin, exists, !exists, <, >;
  fieldSelector on metadata.name, metadata.namespace and a few pod fields; limit
  and continue), get, create (409 AlreadyExists; generateName), update (409
  Conflict on a stale metadata.resourceVersion; 404 on a missing object), patch
  (JSON merge patch; JSON patch; strategic merge patch for built-in kinds,
  lists merged by their schema's merge key, and 415 for custom objects as the
  server answers), delete (preconditions; a namespace's delete deletes its
  objects at once), deletecollection, dryRun=All, fieldValidation
  Strict/Warn/Ignore, all-namespaces list and watch.
- resourceVersion: one global counter, as strings; uid, creationTimestamp,
  generation (bumped on changes outside metadata and status). With a status
  subresource, writes of the main resource keep the stored status and writes of
  `/status` change only the status (not the generation); a new object's status
  is dropped (pods start Pending, namespaces Active). A write that changes
  nothing gets no new resourceVersion and no event.
- Watch: from a resourceVersion, every later ADDED / MODIFIED / DELETED of the
  resource (a selector's transitions arrive as ADDED / DELETED), then live;
  "0" or none: the current objects as ADDED first. BOOKMARK events every
  `bookmark_interval` with allowWatchBookmarks; timeoutSeconds ends the watch.
  A version older than the kept history (`history` events, or everything before
  `compact()`) gets the ERROR event with a 410 Expired Status kube-apiserver sends.
- Validation (tests/apischema.py: decoding and schemas; tests/apikinds.py: the Go
  rules and defaults of each kind): custom objects against their
  CRD's structural `openAPIV3Schema` (pruning of unknown fields, nullable,
  defaults, x-kubernetes-int-or-string, x-kubernetes-preserve-unknown-fields),
  built-in kinds against Kubernetes' own schemas (kubernetes-validate, version
  `KUBERNETES_VERSION`) plus the Go rules clients meet (names, labels, ports,
  containers, EndpointSlice addresses, CRD names/versions/structural schemas).
  422 Invalid with `details.causes[].field`; a wrong JSON type in a built-in kind
  is 400 BadRequest, as from the server's decoder.
- The service proxy (`/api/v1/namespaces/NS/services/[https:]NAME[:PORT]/proxy/PATH`):
  to the first ready endpoint of the Service's EndpointSlices, 503 when there is none
  or it does not answer.
- Sizes: a request body over 3 MiB is 413; a write that leaves an object over
  1.5 MiB (etcd's default --max-request-bytes) is 500 "etcdserver: request is too
  large", as kube-apiserver passes etcd's refusal on.
- Faults: `fail_next(n, code)` makes the next n requests of some verbs fail;
  `drop_watches()` ends every open watch; `requests` logs every request.

Not covered: CEL validation rules (`x-kubernetes-validations` are not evaluated),
list-type set/map uniqueness, schema `format` checks, RBAC and every other
authorizer (one token may do everything), admission webhooks and plugins other
than the namespace check and the ServiceAccount default, controllers (no
EndpointSlice controller: tests write EndpointSlices; no garbage collector:
ownerReferences are not followed; no kubelet: pods stay Pending until a test
writes their status with `set_status`), finalizers and graceful deletion
(objects go at once), server-side apply and managedFields, strategic merge
patch's rarer directives ($setElementOrder, $retainKeys), protobuf, the watch's
sendInitialEvents, consistent pagination across changes, resourceVersionMatch
(lists always answer with the current state), and the kinds not listed above.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import functools
import json
import re
import secrets
import threading
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from tests.apischema import KUBERNETES_VERSION
from tests.apistore import CUT, END, Event, Selector, Store, Watcher, project
from tests.apitypes import ApiError, Json, Resource
from tests.support import loopback_tls

__all__ = [
    "DEFAULT_CRDS",
    "ApiError",
    "FakeApiServer",
    "LoggedRequest",
    "fake_api_server",
    "fake_api_server_thread",
]

_ROOT = Path(__file__).parents[1]
#: What every fake API server serves, as in a cluster with Outrider installed: its own
#: CRDs (deploy/), and Gateway API's HTTPRoute and GRPCRoute, which users install from
#: upstream (vendored in tests/fixtures/gateway-api).
DEFAULT_CRDS: tuple[Path, ...] = tuple(
    path
    for path in sorted((_ROOT / "deploy" / "base" / "crds").glob("*.yaml"))
    if path.name != "kustomization.yaml"
) + tuple(sorted((_ROOT / "tests" / "fixtures" / "gateway-api").glob("*.yaml")))
_SERVICE_PROXY = re.compile(r"/api/v1/namespaces/([^/]+)/services/([^/]+)/proxy(?:/(.*))?")
_PUBLIC = ("/healthz", "/livez", "/readyz", "/version")
_TRUE = ("1", "t", "T", "true", "True", "TRUE")


@dataclass(frozen=True)
class LoggedRequest:
    """One request the server got, for a test to assert what a client asked."""

    method: str
    path: str
    query: dict[str, str]
    verb: str  # list watch get create update patch delete deletecollection discovery


@dataclass
class _Fault:
    count: int
    code: int
    verbs: frozenset[str]
    kinds: frozenset[str] | None = None  # None: every kind


@dataclass
class FakeApiServer:
    """kube-apiserver as far as a client can tell; see the module docstring.

    `apply`, `get`, `delete`, `set_status` and `compact` may be called from any
    thread, including the server's own event loop."""

    root: Path
    crds: Iterable[Path] = DEFAULT_CRDS
    bookmark_interval: float = 1.0
    history: int = 10_000
    namespace_lifecycle: bool = True
    #: What /version reports (the schemas stay KUBERNETES_VERSION's): a test of an older
    #: cluster sets it.
    kubernetes_version: str = KUBERNETES_VERSION
    url: str = ""
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    requests: list[LoggedRequest] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._tls = loopback_tls(self.root, "kube-apiserver", dns_names=("localhost",))
        self.ca_file = self._tls.ca_file
        self.store = Store(history_limit=self.history, namespace_lifecycle=self.namespace_lifecycle)
        self._faults: list[_Fault] = []
        self._lock = threading.Lock()
        self._runner: web.AppRunner | None = None
        for path in self.crds:
            self._apply_all(copy.deepcopy(_documents(Path(path))))

    # -- the test's side --

    def kubeconfig(self, path: Path) -> Path:
        """A kubeconfig for this server (its CA file, the bearer token), written to `path`."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "fake",
                    "cluster": {"server": self.url, "certificate-authority": str(self.ca_file)},
                }
            ],
            "users": [{"name": "fake", "user": {"token": self.token}}],
            "contexts": [
                {
                    "name": "fake",
                    "context": {"cluster": "fake", "user": "fake", "namespace": "default"},
                }
            ],
            "current-context": "fake",
        }
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def apply(self, text: str) -> list[Json]:
        """`kubectl apply -f` of every YAML document in `text` (and every item of a `kind:
        List`), in order: create or update, validated (unknown fields refused, as with
        kubectl's --validate=strict, except where a CRD keeps them). Returns the stored
        objects; raises ApiError at the first one refused, the ones before it applied."""
        return self._apply_all(yaml.safe_load_all(text))

    def _apply_all(self, docs: Iterable[Any]) -> list[Json]:
        applied = []
        for doc in docs:
            items = (
                doc.get("items") or []
                if isinstance(doc, dict) and doc.get("kind") == "List"
                else [doc]
            )
            applied += [self.store.apply(item) for item in items if item]
        return applied

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> Json:
        resource = self.store.resource_of(api_version, kind)
        return self.store.get(resource, namespace if resource.namespaced else "", name)

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        resource = self.store.resource_of(api_version, kind)
        self.store.delete(resource, namespace if resource.namespaced else "", name)

    def set_status(
        self, api_version: str, kind: str, namespace: str, name: str, status: Json
    ) -> Json:
        """Writes `status` through the status subresource, as a kubelet or controller does
        (a pod's podIP and phase, say)."""
        resource = self.store.resource_of(api_version, kind)
        namespace = namespace if resource.namespaced else ""
        current = self.store.get(resource, namespace, name)
        current["status"] = status
        return self.store.update(resource, namespace, name, current, status=resource.status)[0]

    def compact(self) -> None:
        """Forgets the history: a watch from any earlier resourceVersion gets 410 Gone."""
        self.store.compact()

    @property
    def resource_version(self) -> str:
        return str(self.store.revision)

    def fail_next(
        self,
        count: int,
        code: int = 500,
        verbs: Iterable[str] = ("list", "watch"),
        *,
        kinds: Iterable[str] | None = None,
    ) -> None:
        """The next `count` requests of these verbs (to these kinds, if given) fail with a
        Status of `code`."""
        only = None if kinds is None else frozenset(kinds)
        with self._lock:
            self._faults.append(_Fault(count, code, frozenset(verbs), only))

    def open_watches(self) -> int:
        """How many watches are open now (a test waits for a client's before changing things)."""
        return self.store.watch_count()

    def drop_watches(self, *, abrupt: bool = False) -> int:
        """Ends every open watch: cleanly, as a server's watch timeout does, or `abrupt`ly,
        the connection cut mid-stream as by a server restart. Returns how many."""
        return self.store.end_watches(CUT if abrupt else END)

    # -- lifetime --

    async def start(self) -> None:
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self._tls.server_context)
        await site.start()
        self.url = f"https://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        self.store.end_watches(END)
        if self._runner is not None:
            await self._runner.cleanup()

    # -- HTTP --

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._serve(request)
        except ApiError as error:
            return _status_response(error)

    def _authorized(self, header: str | None) -> bool:
        """`Bearer <token>`, the scheme in any case, as kube-apiserver reads it: the
        client's in-cluster config sends `bearer <token>`."""
        scheme, _, token = (header or "").partition(" ")
        return scheme.lower() == "bearer" and token.strip() == self.token

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        path = request.path.rstrip("/") or "/"
        query = dict(request.query)
        proxied = _SERVICE_PROXY.fullmatch(request.path)
        if proxied is not None:
            self.requests.append(LoggedRequest(request.method, path, query, "proxy"))
            if not self._authorized(request.headers.get("Authorization")):
                raise ApiError(401, "Unauthorized")
            return await self._proxy(request, *proxied.groups())
        target = self._route(path)
        verb = _verb(request.method, target, query)
        self.requests.append(LoggedRequest(request.method, path, query, verb))
        if path not in _PUBLIC and not self._authorized(request.headers.get("Authorization")):
            raise ApiError(401, "Unauthorized")
        self._inject_fault(verb, None if target is None else target[0].kind)
        if path in ("/healthz", "/livez", "/readyz"):
            return web.Response(text="ok")
        if target is None:
            return _json(self._discovery(path))
        resource, namespace, name, subresource = target
        if name is None:
            if request.method == "GET" and verb == "watch":
                return await self._watch(request, resource, namespace, query)
            if request.method == "GET":
                return self._list(resource, namespace, query)
            if request.method == "POST":
                body = await _body(request)
                obj, warnings = self.store.create(
                    resource, namespace or "", body, **_write_options(query)
                )
                return _json(obj, 201, warnings)
            if request.method == "DELETE":
                return self._delete_collection(resource, namespace, query)
            raise _not_allowed(request.method)
        return await self._item(request, resource, namespace or "", name, subresource, query)

    async def _item(
        self,
        request: web.Request,
        resource: Resource,
        namespace: str,
        name: str,
        subresource: str | None,
        query: dict[str, str],
    ) -> web.StreamResponse:
        status = subresource == "status"
        if status and not resource.status:
            raise ApiError(404, "the server could not find the requested resource")
        if request.method == "GET":
            return _json(self.store.get(resource, namespace, name))
        if request.method == "PUT":
            obj, warnings = self.store.update(
                resource,
                namespace,
                name,
                await _body(request),
                status=status,
                **_write_options(query),
            )
            return _json(obj, 200, warnings)
        if request.method == "PATCH":
            content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
            obj, warnings = self.store.patch(
                resource,
                namespace,
                name,
                content_type,
                await _read(request),
                status=status,
                **_write_options(query),
            )
            return _json(obj, 200, warnings)
        if request.method == "DELETE":
            options = await _body(request) if await request.read() else {}
            preconditions = options.get("preconditions") if isinstance(options, dict) else None
            dry_run = query.get("dryRun") == "All"
            return _json(
                self.store.delete(resource, namespace, name, preconditions, dry_run=dry_run)
            )
        raise _not_allowed(request.method)

    def _route(self, path: str) -> tuple[Resource, str | None, str | None, str | None] | None:
        """(resource, namespace, name, subresource) for a resource path; None for discovery.
        namespace None: every namespace (or a cluster-scoped resource)."""
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "v1"]:
            group, version, rest = "", "v1", parts[2:]
        elif parts[0] == "apis" and len(parts) >= 3:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return None
        if not rest or rest == [""]:
            return None
        namespace = None
        if rest[0] == "namespaces" and len(rest) >= 3:
            candidate = self.store.resource(group, version, rest[2])
            if candidate is not None and candidate.namespaced:
                namespace, rest = rest[1], rest[2:]
        resource = self.store.resource(group, version, rest[0])
        if (
            resource is None
            or len(rest) > 3
            or (resource.namespaced and namespace is None and len(rest) > 1)
        ):
            raise ApiError(404, "the server could not find the requested resource", details={})
        name = rest[1] if len(rest) > 1 else None
        subresource = rest[2] if len(rest) > 2 else None
        if subresource not in (None, "status"):
            raise ApiError(404, "the server could not find the requested resource")
        return resource, namespace, name, subresource

    async def _proxy(
        self, request: web.Request, namespace: str, target: str, path: str | None
    ) -> web.Response:
        """The service proxy (`kubectl get --raw .../services/https:NAME:PORT/proxy/PATH`):
        to the first ready endpoint of the Service's EndpointSlices, on the slice's port of
        that Service port's name. Like kube-apiserver it does not verify an https
        endpoint's certificate, and answers 503 when there is no endpoint or no answer."""
        scheme, name, port = _proxy_target(target)
        service = self.get("v1", "Service", namespace, name)
        ports = service["spec"].get("ports") or []
        chosen = next((p for p in ports if port in ("", p.get("name"), str(p["port"]))), None)
        if chosen is None:
            raise ApiError(503, f'no endpoints available for service "{name}"')
        address = self._ready_endpoint(namespace, name, chosen.get("name", ""))
        if address is None:
            raise ApiError(503, f'no endpoints available for service "{name}"')

        url = f"{scheme}://{address}/{path or ''}"
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
                session.request(request.method, url, ssl=False) as answer,
            ):
                body = await answer.read()
                kind = answer.headers.get("Content-Type", "text/plain")
                return web.Response(
                    status=answer.status, body=body, content_type=kind.split(";")[0]
                )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise ApiError(503, f"error trying to reach service: {exc}") from None

    def _ready_endpoint(self, namespace: str, service: str, port_name: str) -> str | None:
        """host:port of the first ready endpoint of the Service's slices, or None."""
        resource = self.store.resource_of("discovery.k8s.io/v1", "EndpointSlice")
        selector = Selector.parse(resource, namespace, f"kubernetes.io/service-name={service}", "")
        for item in self.store.list_objects(resource, selector)[0]:
            port = next(
                (p["port"] for p in item.get("ports") or [] if p.get("name", "") == port_name),
                None,
            )
            for endpoint in item.get("endpoints") or []:
                if port is not None and (endpoint.get("conditions") or {}).get("ready", True):
                    host = endpoint["addresses"][0]
                    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return None

    def _inject_fault(self, verb: str, kind: str | None) -> None:
        with self._lock:
            for fault in self._faults:
                if fault.kinds is not None and kind not in fault.kinds:
                    continue
                if fault.count > 0 and verb in fault.verbs:
                    fault.count -= 1
                    raise ApiError(fault.code, f"injected fault ({verb}, {fault.code})")

    def _list(
        self, resource: Resource, namespace: str | None, query: dict[str, str]
    ) -> web.Response:
        selector = _selector(resource, namespace, query)
        items, revision = self.store.list_objects(resource, selector)
        start = 0
        if query.get("continue"):
            start = json.loads(base64.urlsafe_b64decode(query["continue"]))["start"]
        limit = int(query.get("limit") or 0)
        page = items[start : start + limit] if limit else items[start:]
        meta: Json = {"resourceVersion": str(revision)}
        if limit and start + limit < len(items):
            token = json.dumps({"start": start + limit, "rv": revision}).encode()
            meta["continue"] = base64.urlsafe_b64encode(token).decode()
            meta["remainingItemCount"] = len(items) - start - limit
        if not resource.custom:  # typed lists carry kind and apiVersion once, not per item
            for item in page:
                item.pop("kind", None)
                item.pop("apiVersion", None)
        listed = {
            "kind": resource.kind + "List",
            "apiVersion": resource.api_version,
            "metadata": meta,
            "items": page,
        }
        return _json(listed)

    def _delete_collection(
        self, resource: Resource, namespace: str | None, query: dict[str, str]
    ) -> web.Response:
        items, _ = self.store.list_objects(resource, _selector(resource, namespace, query))
        deleted = []
        for item in items:
            meta = item["metadata"]
            with contextlib.suppress(ApiError):  # gone meanwhile: nothing to delete
                deleted.append(self.store.delete(resource, meta.get("namespace", ""), meta["name"]))
        listed = {
            "kind": resource.kind + "List",
            "apiVersion": resource.api_version,
            "metadata": {"resourceVersion": str(self.store.revision)},
            "items": deleted,
        }
        return _json(listed)

    async def _watch(
        self, request: web.Request, resource: Resource, namespace: str | None, query: dict[str, str]
    ) -> web.StreamResponse:
        selector = _selector(resource, namespace, query)
        loop = asyncio.get_running_loop()
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        try:
            backlog, watcher, revision = self.store.watch(
                resource, selector, query.get("resourceVersion"), loop
            )
        except ApiError as error:
            if error.code != 410:
                raise
            await response.prepare(request)  # 410 arrives as an event of a 200 watch
            await _write_event(response, {"type": "ERROR", "object": error.status})
            return response
        await response.prepare(request)
        stream = _WatchStream(
            resource, selector, response, watcher, revision, self.bookmark_interval
        )
        try:
            timeout = float(query["timeoutSeconds"]) if query.get("timeoutSeconds") else 1800.0
            bookmarks = query.get("allowWatchBookmarks") in _TRUE
            await stream.run(request, backlog, loop.time() + timeout, bookmarks)
        finally:
            self.store.unwatch(watcher)
        return response

    def _discovery(self, path: str) -> Json:
        major, minor = self.kubernetes_version.split(".")
        if path == "/version":
            return {
                "major": major,
                "minor": minor,
                "gitVersion": f"v{self.kubernetes_version}.0",
                "gitCommit": "0" * 40,
                "gitTreeState": "clean",
                "buildDate": "2024-08-13T07:28:49Z",
                "goVersion": "go1.22.5",
                "compiler": "gc",
                "platform": "linux/amd64",
            }
        if path == "/api":
            return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
        groups: dict[str, list[str]] = {}
        for resource in self.store.resources.values():
            if resource.group:
                versions = groups.setdefault(resource.group, [])
                if resource.version not in versions:
                    versions.append(resource.version)
        if path == "/apis":
            return {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [_group(g, v) for g, v in sorted(groups.items())],
            }
        parts = path.strip("/").split("/")
        if parts[0] == "apis" and len(parts) == 2 and parts[1] in groups:
            return {"kind": "APIGroup", "apiVersion": "v1", **_group(parts[1], groups[parts[1]])}
        if path == "/api/v1" or (parts[0] == "apis" and len(parts) == 3):
            group, version = ("", "v1") if path == "/api/v1" else (parts[1], parts[2])
            listed = [
                r for r in self.store.resources.values() if (r.group, r.version) == (group, version)
            ]
            if listed:
                return _resource_list(listed)
        raise ApiError(404, "the server could not find the requested resource")


@dataclass
class _WatchStream:
    """One watch's response: the backlog, then live events, bookmarks, until it ends."""

    resource: Resource
    selector: Selector
    response: web.StreamResponse
    watcher: Watcher
    progress: int  # the revision every event up to which this watch has seen
    bookmark_interval: float

    async def run(
        self, request: web.Request, backlog: list[Event], deadline: float, bookmarks: bool
    ) -> None:
        loop = asyncio.get_running_loop()
        for event in backlog:
            await self._send(event)
        next_bookmark = loop.time() + self.bookmark_interval
        while (now := loop.time()) < deadline:
            wait = min(deadline, next_bookmark if bookmarks else deadline, now + 0.25) - now
            try:
                item = await asyncio.wait_for(self.watcher.queue.get(), max(wait, 0))
            except TimeoutError:
                if request.transport is None or request.transport.is_closing():
                    return  # the client went away
                if bookmarks and loop.time() >= next_bookmark:
                    await self._bookmark()
                    next_bookmark = loop.time() + self.bookmark_interval
                continue
            if item == CUT and request.transport is not None:
                request.transport.abort()
                return
            if isinstance(item, str):
                return
            if not await self._send(item):
                return

    async def _send(self, event: Event) -> bool:
        self.progress = max(self.progress, event.revision)
        seen_as = project(event, self.selector)
        if seen_as is None:
            return True
        obj = dict(event.obj, apiVersion=self.resource.api_version)
        return await _write_event(self.response, {"type": seen_as, "object": obj})

    async def _bookmark(self) -> None:
        obj = {
            "kind": self.resource.kind,
            "apiVersion": self.resource.api_version,
            "metadata": {"resourceVersion": str(self.progress)},
        }
        await _write_event(self.response, {"type": "BOOKMARK", "object": obj})


async def _write_event(response: web.StreamResponse, event: Json) -> bool:
    try:
        await response.write(json.dumps(event, separators=(",", ":")).encode() + b"\n")
    except (ConnectionError, RuntimeError):
        return False
    return True


def _proxy_target(target: str) -> tuple[str, str, str]:
    """`https:NAME:PORT`, `NAME:PORT` or `NAME` -> (scheme, name, port name or number)."""
    parts = target.split(":")
    if parts[0] in ("http", "https"):
        scheme, rest = parts[0], parts[1:]
    else:
        scheme, rest = "http", parts
    return scheme, rest[0], rest[1] if len(rest) > 1 else ""


def _not_allowed(method: str) -> ApiError:
    return ApiError(
        405, f"the server does not allow this method on the requested resource ({method})"
    )


def _verb(method: str, target: Any, query: dict[str, str]) -> str:
    if target is None:
        return "discovery"
    named = target[2] is not None
    if method == "GET":
        if query.get("watch") in _TRUE:
            return "watch"
        return "get" if named else "list"
    if method == "DELETE" and not named:
        return "deletecollection"
    return {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(
        method, method.lower()
    )


def _selector(resource: Resource, namespace: str | None, query: dict[str, str]) -> Selector:
    return Selector.parse(
        resource, namespace, query.get("labelSelector", ""), query.get("fieldSelector", "")
    )


def _write_options(query: dict[str, str]) -> dict[str, bool]:
    validation = query.get("fieldValidation", "Warn")
    if validation not in ("Ignore", "Warn", "Strict"):
        raise ApiError(
            400, f'fieldValidation must be one of "Ignore", "Warn" or "Strict", not {validation!r}'
        )
    return {"strict": validation == "Strict", "dry_run": query.get("dryRun") == "All"}


#: The largest request body kube-apiserver reads (3 MiB; a larger one is a 413).
MAX_REQUEST_BYTES = 3 * 1024 * 1024


async def _read(request: web.Request) -> bytes:
    raw = await request.read()
    if len(raw) > MAX_REQUEST_BYTES:
        raise ApiError(413, f"Request entity too large: limit is {MAX_REQUEST_BYTES}")
    return raw


async def _body(request: web.Request) -> Any:
    raw = await _read(request)
    try:
        if "yaml" in request.headers.get("Content-Type", ""):
            return yaml.safe_load(raw)
        return json.loads(raw)
    except (ValueError, yaml.YAMLError) as error:
        raise ApiError(400, f"the object provided is unrecognized: {error}") from None


def _json(obj: Json, status: int = 200, warnings: list[str] | None = None) -> web.Response:
    quoted = [json.dumps(w) for w in warnings or []]  # 299 - "unknown field \"spec.x\""
    headers = {"Warning": ", ".join(f"299 - {q}" for q in quoted)} if quoted else {}
    return web.json_response(obj, status=status, headers=headers)


def _status_response(error: ApiError) -> web.Response:
    headers = {"Retry-After": "1"} if error.code in (429, 503) else {}
    return web.json_response(error.status, status=error.code, headers=headers)


def _group(name: str, versions: list[str]) -> Json:
    listed = [{"groupVersion": f"{name}/{v}", "version": v} for v in versions]
    return {"name": name, "versions": listed, "preferredVersion": listed[0]}


def _resource_list(resources: list[Resource]) -> Json:
    first = resources[0]
    listed = []
    for r in resources:
        verbs = ["create", "delete", "get", "list", "patch", "update", "watch"]
        listed.append(
            {
                "name": r.plural,
                "singularName": r.singular,
                "namespaced": r.namespaced,
                "kind": r.kind,
                "verbs": verbs,
                "shortNames": list(r.short_names),
            }
        )
        if r.status:
            listed.append(
                {
                    "name": f"{r.plural}/status",
                    "singularName": "",
                    "kind": r.kind,
                    "namespaced": r.namespaced,
                    "verbs": ["get", "patch", "update"],
                }
            )
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": first.api_version,
        "resources": listed,
    }


@functools.cache
def _documents(path: Path) -> tuple[Any, ...]:
    """The YAML documents of a CRD file, parsed once per test process: every fake API
    server starts with the same CRDs, and parsing them (pure-Python YAML) cost more
    than the rest of its start."""
    return tuple(yaml.safe_load_all(path.read_text()))


# --- fixtures -------------------------------------------------------------------------


@asynccontextmanager
async def fake_api_server(
    root: Path, *, crds: Iterable[Path] = DEFAULT_CRDS, **options: Any
) -> AsyncIterator[FakeApiServer]:
    """A FakeApiServer on this event loop. A client in this process must not block the
    loop (run the sync `kubernetes` client with asyncio.to_thread); a client process,
    such as the control plane, just gets the kubeconfig."""
    server = FakeApiServer(root, crds=crds, **options)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@contextmanager
def fake_api_server_thread(
    root: Path, *, crds: Iterable[Path] = DEFAULT_CRDS, **options: Any
) -> Iterator[FakeApiServer]:
    """A FakeApiServer on its own event loop in a thread: for sync tests and sync clients."""
    server = FakeApiServer(root, crds=crds, **options)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fake-apiserver", daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(timeout=10)
        yield server
    finally:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(server.stop(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
