"""List-watch every kind the mesh is compiled from; the API's calls, status writes included.

Per kind, identity.kubewatch's ListWatch: list, then watch from the list's
resourceVersion with bookmarks, one watch after another. A 410 Gone lists
again at once (after a backoff if no event came since the last list); any
other failure lists again after a capped, jittered backoff, keeping the last
state meanwhile (one warning per outage). A kind the API server does not serve (404: its CRD is not
installed, as Gateway API often is not) is asked again every
`NOT_INSTALLED_RETRY`, logged once, and holds no objects; it does not hold
up readiness, unless it is one of the `REQUIRED`, once its 404 has been confirmed
(`NOT_FOUND_CONFIRMATIONS`: an API server that just restarted answers 404 for a
moment). A 404 for a kind listed before is an outage: its objects are kept.

The Kubernetes API is a collaborator, `ClusterApi`; its calls block, and run
in daemon threads (identity.kubewatch). `KubernetesClusterApi` is the real
one, from a kubeconfig file or the pod's in-cluster config. Objects are kept
as the API's JSON (camelCase dicts).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

from control.core.mesh import KINDS, Key
from identity.backoff import Backoff
from identity.kubewatch import (
    Expired,
    ListWatch,
    ObjectCache,
    WatchStream,
    call_in_thread,
    key_of,
)

log = logging.getLogger("outrider.control.informers")

#: How long the API server keeps one watch open (timeoutSeconds).
WATCH_SECONDS = 300
#: Connect timeout, and the time allowed for a list's or a write's answer.
REQUEST_SECONDS = 10.0
NOT_INSTALLED_RETRY = 30.0
#: A 404 for a kind never listed is asked again this many times, NOT_FOUND_CONFIRM seconds
#: apart, before the kind counts as not installed: kube-apiserver answers 404 for custom
#: resources that exist, for a moment after it restarts (when the control plane restarts
#: too, as often as not). Until then the kind holds readiness as a kind being listed does:
#: one 404 must not send agents a mesh without the TrafficPolicies and routes for 30 s.
NOT_FOUND_CONFIRMATIONS = 3
NOT_FOUND_CONFIRM = 2.0
RELIST_BACKOFF = Backoff(initial=timedelta(seconds=1), maximum=timedelta(seconds=30))
_GONE = 410  # Gone: the resourceVersion is older than the API server keeps


@dataclass(frozen=True)
class Resource:
    """Where the API serves a kind."""

    kind: str
    group: str  # "" for the core group
    version: str
    plural: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


RESOURCES: dict[str, Resource] = {
    r.kind: r
    for r in (
        Resource("Pod", "", "v1", "pods"),
        Resource("Service", "", "v1", "services"),
        Resource("EndpointSlice", "discovery.k8s.io", "v1", "endpointslices"),
        Resource(
            "AuthorizationPolicy", "security.outrider.io", "v1alpha1", "authorizationpolicies"
        ),
        Resource("PeerAuthentication", "security.outrider.io", "v1alpha1", "peerauthentications"),
        Resource("TrafficPolicy", "networking.outrider.io", "v1alpha1", "trafficpolicies"),
        Resource("HTTPRoute", "gateway.networking.k8s.io", "v1", "httproutes"),
        Resource("GRPCRoute", "gateway.networking.k8s.io", "v1", "grpcroutes"),
    )
}
assert set(RESOURCES) == set(KINDS), "every kind the mesh reads has a resource"


class NotInstalled(Exception):
    """404 on a collection: the API server does not serve this kind (no CRD)."""


class Gone(Exception):
    """404 on one object: it was deleted before its status was written."""


class Conflict(Exception):
    """409: the object changed since it was read; the watch brings the newer one."""


class Refused(Exception):
    """The API server refused a status as it is (422 Invalid, 400, 403): writing the same
    again would be refused again."""


#: Answers to a write that the same write would get again.
_REFUSALS = (400, 403, 413, 422)
#: How kube-apiserver passes on etcd's refusal of an object over its size limit (a 500,
#: which is otherwise a passing fault): the same write would be refused again.
_TOO_LARGE = "request is too large"


class ClusterApi(Protocol):
    """The Kubernetes API, as far as the control plane goes. Its calls block."""

    def list(self, resource: Resource) -> tuple[list[dict[str, Any]], str]:
        """Every object of the kind in every namespace, and the list's resourceVersion.
        Raises NotInstalled when the API does not serve the kind."""
        ...

    def watch(self, resource: Resource, resource_version: str) -> Iterator[dict[str, Any]]:
        """Watch events after `resource_version`; raises Expired on 410. The iterator
        may have `interrupt()`, called from another thread to end it early."""
        ...

    def replace_status(self, resource: Resource, obj: Mapping[str, Any]) -> None:
        """Replace the object's status, whole, through the status subresource (an update,
        not a merge patch: a merge patch would keep keys the new status left out). `obj`
        carries the resourceVersion it was read at: raises Conflict if it changed since,
        Gone if it is no more, Refused if the API server will not take this status."""
        ...


#: Kinds whose absence is never "none of them": AuthorizationPolicy, PeerAuthentication and
#: TrafficPolicy are Outrider's own CRDs, installed together before the control plane. A
#: mesh compiled without the first would send agents no DENY policy; without the second, it
#: would turn every PERMISSIVE captured pod STRICT and shut out the callers a migration
#: still needs; without the third, drop every balancer and circuit breaker.
#: A 404 for one holds readiness until it is listed.
REQUIRED = frozenset(KINDS) - {"HTTPRoute", "GRPCRoute"}  # all but the Gateway API's


#: The kinds whose status the control plane writes (control.core: conditions, and the
#: version in force). It computes that status from the rest of the object alone, the
#: same on every replica, so a change of status only is no change of the mesh.
OWN_STATUS = frozenset(
    {"AuthorizationPolicy", "PeerAuthentication", "TrafficPolicy", "HTTPRoute", "GRPCRoute"}
)


class KindCache(ObjectCache):
    """The objects of one kind, without `metadata.managedFields`: kilobytes per object
    that nothing here reads (client-go's informers trim them too).

    `own_status`: an update that changes only the status (and so the resourceVersion)
    is kept but is not a change. Each status write comes back through the watch, and
    would otherwise cost a compile and a sweep over every subscriber.
    """

    def __init__(self, own_status: bool = False) -> None:
        super().__init__()
        self.own_status = own_status

    def replace(self, items: Iterable[dict[str, Any]], resource_version: str) -> None:
        super().replace(map(_trimmed, items), resource_version)

    def apply(self, event: Mapping[str, Any]) -> bool:
        obj = event.get("object")
        if not (isinstance(obj, dict) and event.get("type") in ("ADDED", "MODIFIED")):
            return super().apply(event)
        obj = _trimmed(obj)
        before = self.objects.get(key_of(obj))
        changed = super().apply({**event, "object": obj})
        if not (self.own_status and before is not None):
            return changed
        return _without_status(before) != _without_status(obj)


def _without_status(obj: Mapping[str, Any]) -> dict[str, Any]:
    metadata = {k: v for k, v in (obj.get("metadata") or {}).items() if k != "resourceVersion"}
    return {**{k: v for k, v in obj.items() if k != "status"}, "metadata": metadata}


def _trimmed(obj: dict[str, Any]) -> dict[str, Any]:
    metadata = obj.get("metadata")
    if isinstance(metadata, dict) and "managedFields" in metadata:
        obj = {**obj, "metadata": {k: v for k, v in metadata.items() if k != "managedFields"}}
    return obj


class Informers:
    """One list-watch per kind; `on_change()` after anything changed."""

    def __init__(
        self,
        api: ClusterApi,
        on_change: Callable[[], None],
        *,
        restarted: Callable[[str], None] = lambda kind: None,
        backoff: Backoff = RELIST_BACKOFF,
        not_installed_retry: float = NOT_INSTALLED_RETRY,
        not_found_confirm: float = NOT_FOUND_CONFIRM,
        rng: random.Random | None = None,
    ) -> None:
        self.api = api
        self.caches = {kind: KindCache(kind in OWN_STATUS) for kind in KINDS}
        self.listed: set[str] = set()  # kinds listed at least once
        self.missing: set[str] = set()  # kinds the API does not serve, as of the last ask
        self.on_change = on_change
        self.restarted = restarted
        self.backoff = backoff
        self.not_installed_retry = not_installed_retry
        self.not_found_confirm = not_found_confirm
        self.rng = rng or random.Random()  # noqa: S311 - jitter needs no secrecy

    @property
    def objects(self) -> dict[str, Mapping[Key, Mapping[str, Any]]]:
        """kind -> (namespace, name) -> object: what compile_mesh reads."""
        return {kind: cache.objects for kind, cache in self.caches.items()}

    def synced(self) -> bool:
        """Every kind the API serves has been listed once."""
        return all(kind in self.listed or kind in self.missing for kind in KINDS)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            for kind in KINDS:
                tasks.create_task(_KindWatch(self, RESOURCES[kind]).run())


class _KindWatch(ListWatch):
    """One kind, listed and watched; a kind the API does not serve is asked again slowly."""

    def __init__(self, informers: Informers, resource: Resource) -> None:
        self.informers = informers
        self.resource = resource
        self.not_found = 0  # 404s in a row for a kind never listed (NOT_FOUND_CONFIRMATIONS)
        cache = informers.caches[resource.kind]
        super().__init__(
            resource.kind,
            cache,
            lambda: informers.api.list(resource),
            lambda version: informers.api.watch(resource, version),
            on_list=self._listed,
            on_change=informers.on_change,
            held=lambda: f"{len(cache)} objects",
            backoff=informers.backoff,
            rng=informers.rng,
            log=log,
            thread_name=f"outrider-watch-{resource.plural}",
        )

    def _listed(self) -> None:
        kind, informers = self.resource.kind, self.informers
        if kind in informers.listed:
            informers.restarted(kind)
        if kind in informers.missing:
            log.info("%s: the API serves it now (%d objects)", kind, len(self.cache))
        informers.missing.discard(kind)
        informers.listed.add(kind)
        self.not_found = 0
        informers.on_change()

    async def failed(self, error: Exception) -> None:
        """A 404 for a kind never listed: its CRD is not installed, ask again slowly. A 404
        for a kind listed before is an outage like any other, and keeps what it held:
        kube-apiserver answers 404 for custom resources that exist for a moment after a
        restart and between replicas that have not all seen the CRD, while a CRD really
        deleted deletes its objects first, which the watch brings as DELETED events.
        Dropping them on a 404 would take every DENY policy away from the agents."""
        kind, informers = self.resource.kind, self.informers
        if isinstance(error, NotInstalled) and kind in REQUIRED and kind not in informers.listed:
            error = NotInstalled(
                f"the API server does not serve {self.resource.api_version} {kind} (are"
                " deploy/base/crds applied?); not ready until it does"
            )
        if not isinstance(error, NotInstalled) or kind in informers.listed or kind in REQUIRED:
            self.not_found = 0  # 404s in a row only
            await super().failed(error)
            return
        if kind not in informers.missing:
            self.not_found += 1
            if self.not_found < NOT_FOUND_CONFIRMATIONS:
                await asyncio.sleep(informers.not_found_confirm)
                return
            log.warning(
                "%s (%s): the API server does not serve it (CRD not installed?); asking again"
                " every %.0f s",
                kind,
                self.resource.api_version,
                informers.not_installed_retry,
            )
            informers.missing.add(kind)
            # This may be the last kind to be settled (its 404 after every other kind's
            # list): the change that makes the informers synced, announced like a list.
            informers.on_change()
        await asyncio.sleep(informers.not_installed_retry)


class KubernetesClusterApi:
    """The API server, from a kubeconfig file or the pod's in-cluster config.

    Objects are read raw (the API's JSON), not through the client's models:
    custom kinds have none, and the compiler reads camelCase keys.
    """

    def __init__(self, kubeconfig: Path | None, *, watch_seconds: int = WATCH_SECONDS) -> None:
        from kubernetes import client, config

        configuration = client.Configuration()
        if kubeconfig is not None:
            config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=str(kubeconfig), client_configuration=configuration
            )
        else:
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        api_client = client.ApiClient(configuration)
        # Any: with _preload_content=False the client returns the raw urllib3 response.
        self._core: Any = client.CoreV1Api(api_client)
        self._discovery: Any = client.DiscoveryV1Api(api_client)
        self._custom: Any = client.CustomObjectsApi(api_client)
        self._api_exception: type[Exception] = client.ApiException
        self.watch_seconds = watch_seconds

    def _lister(self, resource: Resource) -> Callable[..., Any]:
        if resource.kind == "Pod":
            return self._core.list_pod_for_all_namespaces  # type: ignore[no-any-return]
        if resource.kind == "Service":
            return self._core.list_service_for_all_namespaces  # type: ignore[no-any-return]
        if resource.kind == "EndpointSlice":
            return self._discovery.list_endpoint_slice_for_all_namespaces  # type: ignore[no-any-return]

        def custom(**kwargs: Any) -> Any:
            return self._custom.list_cluster_custom_object(
                resource.group, resource.version, resource.plural, **kwargs
            )

        return custom

    def _status(self, error: Exception) -> int | None:
        return getattr(error, "status", None) if isinstance(error, self._api_exception) else None

    def list(self, resource: Resource) -> tuple[list[dict[str, Any]], str]:
        try:
            response = self._lister(resource)(
                _preload_content=False, _request_timeout=REQUEST_SECONDS
            )
        except Exception as error:
            if self._status(error) == 404:
                raise NotInstalled(resource.kind) from None
            raise
        try:
            body = json.loads(response.data)
        finally:
            response.release_conn()
        return list(body.get("items") or ()), str(body["metadata"]["resourceVersion"])

    def watch(self, resource: Resource, resource_version: str) -> Iterator[dict[str, Any]]:
        try:
            response = self._lister(resource)(
                watch=True,
                resource_version=resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=self.watch_seconds,
                _preload_content=False,
                # The server sends nothing while nothing changes: allow the whole watch.
                _request_timeout=(REQUEST_SECONDS, self.watch_seconds + REQUEST_SECONDS),
            )
        except Exception as error:
            status = self._status(error)
            if status == _GONE:
                raise Expired(str(error)) from error
            if status == 404:
                raise NotInstalled(resource.kind) from None
            raise
        return WatchStream(response)

    def replace_status(self, resource: Resource, obj: Mapping[str, Any]) -> None:
        namespace, name = key_of(obj)
        body = {**obj, "apiVersion": resource.api_version, "kind": resource.kind}
        try:
            self._custom.replace_namespaced_custom_object_status(
                resource.group,
                resource.version,
                namespace,
                resource.plural,
                name,
                body,
                _request_timeout=REQUEST_SECONDS,
            )
        except Exception as error:
            code = self._status(error)
            if code == 409:
                raise Conflict(f"{resource.kind} {namespace}/{name}") from None
            if code == 404:
                raise Gone(f"{resource.kind} {namespace}/{name}") from None
            said = str(getattr(error, "body", "") or error)
            if code in _REFUSALS or (code == 500 and _TOO_LARGE in said):
                raise Refused(f"{code} {said}") from None
            raise


async def open_cluster_api(kubeconfig: Path | None) -> KubernetesClusterApi:
    """The real API, made in a thread: loading a kubeconfig reads files and may run a plugin."""
    return await call_in_thread(KubernetesClusterApi, kubeconfig, name="outrider-kubeconfig")
