"""Keeps an upstream's endpoint set current: `watch(source, publish)`.

`publish` is called with the source's whole current set (endpoint -> weight)
each time it changes, never twice in a row with the same set:

- static: once, then the task waits until it is cancelled;
- DNS: every `refresh` seconds the host is resolved again (the loop's
  getaddrinfo, so /etc/hosts and the search path apply); a failed lookup
  keeps the last set, with one warning per outage and an info line when it
  ends. Nothing is published before the first lookup succeeds;
- Kubernetes: the Service's EndpointSlices are listed, then watched from the
  list's resourceVersion, one watch after another. A 410 Gone lists again at
  once (after a backoff if not a single event came since the last list); any
  other failure lists again after a capped, jittered backoff, keeping the last
  set meanwhile (one warning per outage). The set is ready endpoints,
  or, while none is ready, those serving while terminating (KEP-1672; see
  agent/core/discovery.py).

The Kubernetes API is a collaborator, `SliceApi`. Its calls block, so each
runs in a daemon thread that hands its results to the event loop; a daemon
thread never holds up the agent's exit, and the default executor (which
asyncio.run waits for) is not used. `KubernetesSliceApi` is the real one: it
talks to the API server with the pod's ServiceAccount token (in-cluster
config), so the agent's ServiceAccount needs RBAC get, list and watch on
endpointslices, and the pod must mount that token (the projected
`outrider-ca` token is for the CA and the API server refuses it).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import random
import socket
from collections.abc import Awaitable, Callable, Collection, Iterator
from datetime import timedelta
from typing import Any, Protocol

from agent.core.discovery import (
    DnsSource,
    Expired,
    KubernetesSource,
    SliceCache,
    Source,
    StaticSource,
)
from agent.core.endpoint import Endpoint
from identity.backoff import Backoff
from identity.kubewatch import ListWatch, WatchStream, call_in_thread

log = logging.getLogger("outrider.agent.discovery")

#: The source's whole current set: endpoint -> weight.
Publish = Callable[[dict[Endpoint, int]], None]
#: Resolves (host, port) to the endpoints to dial; raises OSError when it cannot.
Resolver = Callable[[str, int], Awaitable[Collection[Endpoint]]]

#: How long the API server keeps one watch open (timeoutSeconds). The thread
#: behind a cancelled watch ends no later than this, or at once with
#: KubernetesSliceApi, whose streams can be interrupted.
WATCH_SECONDS = 60
#: Connect timeout, and the time allowed for a list's answer.
REQUEST_SECONDS = 10.0
RELIST_BACKOFF = Backoff(initial=timedelta(seconds=1), maximum=timedelta(seconds=30))


class SliceApi(Protocol):
    """The Kubernetes API, as far as EndpointSlices go. Its calls block."""

    def list(self, namespace: str, label_selector: str) -> tuple[list[dict[str, Any]], str]:
        """The slices matching the selector, and the list's resourceVersion."""
        ...

    def watch(
        self, namespace: str, label_selector: str, resource_version: str
    ) -> Iterator[dict[str, Any]]:
        """Watch events after `resource_version`, as the API sends them.

        The iterator ends when the server closes the watch. If it has an
        `interrupt()` method, that is called from another thread to end it early.
        """
        ...


async def resolve_addresses(host: str, port: int) -> frozenset[Endpoint]:
    """Every address `host` resolves to (A and AAAA, /etc/hosts), as endpoints on `port`."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return frozenset(Endpoint(str(info[4][0]), port) for info in infos)


async def watch(
    source: Source,
    publish: Publish,
    *,
    resolve: Resolver = resolve_addresses,
    kubernetes: SliceApi | None = None,
    backoff: Backoff = RELIST_BACKOFF,
    rng: random.Random | None = None,
) -> None:
    """Publish `source`'s endpoint set whenever it changes, until cancelled.

    For a Kubernetes source without `kubernetes`, a `KubernetesSliceApi` is
    made; that raises if the agent does not run in a pod.
    """
    if isinstance(source, StaticSource):
        publish(dict(source.endpoints))
        await asyncio.get_running_loop().create_future()  # until cancelled
    elif isinstance(source, DnsSource):
        await _watch_dns(source, publish, resolve)
    else:
        api: SliceApi = (
            kubernetes
            if kubernetes is not None
            else await call_in_thread(KubernetesSliceApi, name="outrider-discovery")
        )
        # Jitter only spreads retries; it needs no secrecy.
        await _ServiceWatch(source, publish, api, backoff, rng or random.Random()).run()  # noqa: S311


class _Publisher:
    """Calls publish only when the set differs from the last one published."""

    def __init__(self, publish: Publish) -> None:
        self._publish = publish
        self.last: frozenset[Endpoint] | None = None

    def __call__(self, endpoints: frozenset[Endpoint]) -> None:
        if endpoints != self.last:
            self.last = endpoints
            self._publish(dict.fromkeys(sorted(endpoints, key=_order), 1))


def _order(endpoint: Endpoint) -> tuple[int, int, str, int]:
    """Addresses in numeric order (IPv4 first), then names: a stable order for the balancer."""
    try:
        address = ipaddress.ip_address(endpoint.host)
    except ValueError:
        return (9, 0, endpoint.host, endpoint.port)
    return (address.version, int(address), "", endpoint.port)


async def _watch_dns(source: DnsSource, publish: Publish, resolve: Resolver) -> None:
    publisher = _Publisher(publish)
    failing = False
    where = f"{source.host}:{source.port}"
    while True:
        try:
            found = frozenset(await resolve(source.host, source.port))
            if not found:
                raise OSError("no addresses")
        except OSError as error:
            if not failing:
                kept = len(publisher.last or ())
                log.warning("DNS %s: lookup failed (%s); keeping %d endpoints", where, error, kept)
            failing = True
        else:
            if failing:
                log.info("DNS %s: lookups work again (%d addresses)", where, len(found))
            failing = False
            publisher(found)
        await asyncio.sleep(source.refresh)


class _ServiceWatch(ListWatch):
    """A Service's EndpointSlices, listed and watched; each change of the set published."""

    def __init__(
        self,
        source: KubernetesSource,
        publish: Publish,
        api: SliceApi,
        backoff: Backoff,
        rng: random.Random,
    ) -> None:
        publisher = _Publisher(publish)
        cache = SliceCache()
        namespace, selector = source.namespace, source.label_selector

        def published() -> None:
            publisher(cache.endpoints(source.port))

        super().__init__(
            f"EndpointSlices of {namespace}/{source.service}",
            cache,
            lambda: api.list(namespace, selector),
            lambda version: api.watch(namespace, selector, version),
            on_list=published,
            on_change=published,
            held=lambda: f"{len(publisher.last or ())} endpoints",
            backoff=backoff,
            rng=rng,
            log=log,
            thread_name=f"outrider-discovery-{namespace}/{source.service}",
        )


class KubernetesSliceApi:
    """The API server, reached with the pod's ServiceAccount token (in-cluster config).

    The `kubernetes` package is imported here and not at module level: it
    costs the agent tens of MB, and only Kubernetes sources need it. Objects
    are returned as the API's JSON (camelCase dicts), read raw rather than
    through the client's models.
    """

    def __init__(self, configuration: Any = None, *, watch_seconds: int = WATCH_SECONDS) -> None:
        from kubernetes import client, config

        if configuration is None:
            configuration = client.Configuration()
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        # Any: with _preload_content=False the client returns the raw urllib3 response.
        self._api: Any = client.DiscoveryV1Api(client.ApiClient(configuration))
        self._api_exception: type[Exception] = client.ApiException
        self.watch_seconds = watch_seconds

    def list(self, namespace: str, label_selector: str) -> tuple[list[dict[str, Any]], str]:
        response = self._api.list_namespaced_endpoint_slice(
            namespace,
            label_selector=label_selector,
            _preload_content=False,
            _request_timeout=REQUEST_SECONDS,
        )
        try:
            body = json.loads(response.data)
        finally:
            response.release_conn()
        return list(body.get("items") or ()), str(body["metadata"]["resourceVersion"])

    def watch(
        self, namespace: str, label_selector: str, resource_version: str
    ) -> Iterator[dict[str, Any]]:
        try:
            response = self._api.list_namespaced_endpoint_slice(
                namespace,
                label_selector=label_selector,
                watch=True,
                resource_version=resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=self.watch_seconds,
                _preload_content=False,
                # The server sends nothing while nothing changes: allow the whole watch.
                _request_timeout=(REQUEST_SECONDS, self.watch_seconds + REQUEST_SECONDS),
            )
        except self._api_exception as error:
            if getattr(error, "status", None) == 410:
                raise Expired(str(error)) from error
            raise
        return WatchStream(response)
