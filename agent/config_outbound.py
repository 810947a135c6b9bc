"""The `outbound:` section of agent.yaml -> Outbound, every error with its key path.

outbound:
  - name: backend                          # names the upstream in logs and metrics
    listen: 127.0.0.1:9001                 # the app connects here, plain
    destinations: [10.96.0.20:8080]        # captured: the app's connections to these
                                           # (a Service's ClusterIP:port) come here too;
                                           # an entry needs listen, destinations or both
    protocol: http                         # tcp (default): per connection;
                                           # http: per request, pooled mTLS upstream;
                                           # http2, grpc: h2c from the app, per stream,
                                           # multiplexed on pooled h2 mTLS connections
    server_ids: [spiffe://example.org/ns/shop/sa/backend]
    # Where the endpoints come from, one of:
    endpoints: [10.0.0.7:15443, {address: 10.0.0.8:15443, weight: 3}]
    dns: {name: backend.shop.svc:15443, refresh: 5s}
    kubernetes: {service: backend, namespace: shop, port: 15443}
    # ... or weighted subsets, each with one of the three (a 90/10 canary):
    subsets:
      - {name: v1, weight: 90, kubernetes: {service: backend-v1, namespace: shop}}
      - {name: v2, weight: 10, kubernetes: {service: backend-v2, namespace: shop}}
    balancer: round_robin                  # least_request, random, ring_hash, maglev
    hash_on: {header: x-user}              # or {cookie: session}, or source (the
                                           # client's address); ring_hash and maglev
    health:
      active: {kind: http, path: /healthz, interval: 5s, timeout: 1s,
               healthy_threshold: 2, unhealthy_threshold: 3}
      outlier: {consecutive_failures: 5, consecutive_5xx: 5, base_ejection: 30s,
                max_ejection: 300s, max_ejection_percent: 50}
      panic_threshold: 50                  # percent healthy below which all are used
    timeouts: {connect: 0s, per_try: 0s, request: 0s}   # 0s: no limit (connect:
                                           # limits' connect + handshake timeouts)
    retries: {max: 2, retry_on: [connect-failure, refused-stream, reset, 503, unavailable],
              non_idempotent: false, budget: {percent: 20, min_concurrency: 3}}
                                           # retry_on: failures (and timeout), HTTP
                                           # statuses, gRPC statuses by Envoy's names
    circuit_breaker: {max_connections: 1024, max_pending: 1024, max_requests: 1024}
    pool: {idle_timeout: 60s}              # http, http2, grpc: idle upstream connections
"""

from __future__ import annotations

import importlib.util
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal, TypeVar, cast

from agent.core.balancer import BALANCERS, BalancerKind
from agent.core.discovery import DnsSource, KubernetesSource, Source, StaticSource
from agent.core.grpc import Code
from agent.core.health import ActiveCheck, HealthSettings, OutlierDetection
from agent.core.resilience import FAILURES, BreakerLimits, RetryPolicy
from agent.core.upstream import Endpoint
from identity import InvalidSpiffeId, SpiffeId
from identity.appprotocol import H2, L7, PROTOCOLS, Protocol
from identity.configfile import ConfigReader, Listen

#: Why an agent without the Kubernetes client refuses a `kubernetes:` endpoint source.
KUBERNETES_MISSING = (
    "needs the kubernetes package, which the agent's image and dependency group leave out "
    "(an injected agent gets its endpoints from the control plane): list endpoints: or "
    "dns:, or install it beside the agent (pip install 'outrider[agent,control]')"
)


def kubernetes_installed() -> bool:
    """Whether the Kubernetes client can be imported (without importing it: tens of MB)."""
    return importlib.util.find_spec("kubernetes") is not None


T = TypeVar("T")
HashOn = tuple[Literal["header", "cookie", "source"], str]
_CHECKS: tuple[Literal["tcp", "http"], ...] = ("tcp", "http")
#: retry_on's gRPC statuses, by the names Envoy's config gives them.
GRPC_RETRY_ON: dict[str, int] = {
    "cancelled": Code.CANCELLED,
    "deadline-exceeded": Code.DEADLINE_EXCEEDED,
    "resource-exhausted": Code.RESOURCE_EXHAUSTED,
    "internal": Code.INTERNAL,
    "unavailable": Code.UNAVAILABLE,
}
_SOURCES = ("endpoints", "dns", "kubernetes")


@dataclass(frozen=True)
class Subset:
    name: str
    weight: int
    source: Source


@dataclass(frozen=True)
class Timeouts:
    """Seconds; 0 means no limit, except `connect`, the TCP connect and TLS handshake,
    where 0 means limits.connect_timeout + limits.handshake_timeout."""

    connect: float = 0.0
    per_try: float = 0.0
    request: float = 0.0


@dataclass(frozen=True)
class Outbound:
    name: str
    listen: Listen | None  # None: served for its `destinations` only (capture)
    server_ids: frozenset[SpiffeId]
    subsets: tuple[Subset, ...]
    protocol: Protocol = "tcp"
    balancer: BalancerKind = "round_robin"
    hash_on: HashOn | None = None
    health: HealthSettings = field(default_factory=HealthSettings)
    timeouts: Timeouts = Timeouts()
    retries: RetryPolicy = field(default_factory=RetryPolicy)
    circuit_breaker: BreakerLimits = field(default_factory=BreakerLimits)
    pool_idle_timeout: float = 60.0
    #: Original destinations (IP:port) the outbound capture listener sends to this upstream.
    destinations: tuple[Endpoint, ...] = ()


_KEYS = {
    "name",
    "listen",
    "destinations",
    "protocol",
    "server_ids",
    "subsets",
    "balancer",
    "hash_on",
    "health",
    "timeouts",
    "retries",
    "circuit_breaker",
    "pool",
    *_SOURCES,
}


#: The longest upstream or subset name: `<service>.<namespace>:<port>` fits (63+1+63+1+15).
MAX_LABEL = 253


class OutboundReader(ConfigReader):
    """The outbound half of agent/config.py's reader."""

    def label(self, raw: Mapping[str, Any], key: str, path: str) -> str | None:
        """A name that goes into log lines and metric labels: printable, no whitespace (a
        newline would forge a log line), at most MAX_LABEL characters; None if absent."""
        value = self.string(raw, key, path, None)
        if value is None:
            return None
        if len(value) > MAX_LABEL or not value.isprintable() or any(c.isspace() for c in value):
            self.fail(
                path,
                f"{value[:32]!a}{'...' if len(value) > 32 else ''} is not a name: at most "
                f"{MAX_LABEL} printable characters, no spaces",
            )
            return None
        return value

    def outbound(self, raw: object, path: str) -> Outbound | None:
        item = self.mapping(raw, path, _KEYS)
        name = self.label(item, "name", f"{path}.name")
        if item.get("name") is None:  # absent or `name:` with no value (YAML null)
            self.fail(f"{path}.name", "required: names the upstream in logs and metrics")
        destinations = self.addresses(item, "destinations", f"{path}.destinations")
        listen = None
        if item.get("listen") is not None:
            listen = self.listen(item, "listen", f"{path}.listen", Listen("127.0.0.1", 0))
        elif "destinations" not in item:
            self.fail(
                f"{path}.listen",
                "required: 127.0.0.1:<port> the app connects to, or destinations "
                "(captured Service addresses), or both",
            )
        protocol = self.choice(item, "protocol", f"{path}.protocol", PROTOCOLS)
        server_ids = self.spiffe_ids(item, "server_ids", f"{path}.server_ids")
        if not server_ids:
            self.fail(f"{path}.server_ids", "required: the SPIFFE IDs the upstream may present")
        subsets = self.subsets(item, path)
        balancer = self.choice(item, "balancer", f"{path}.balancer", BALANCERS)
        hash_on = self.hash_on(item.get("hash_on"), f"{path}.hash_on")
        if hash_on is not None and balancer not in ("ring_hash", "maglev"):
            self.fail(f"{path}.hash_on", f"only ring_hash and maglev hash; balancer is {balancer}")
        if hash_on is not None and hash_on[0] != "source" and protocol not in L7:
            self.fail(f"{path}.hash_on", "a header or cookie needs protocol http, http2 or grpc")
        health = self.health(self.section(item, f"{path}.health", _HEALTH_KEYS), f"{path}.health")
        if protocol in H2 and health.active is not None and health.active.kind == "http":
            self.fail(
                f"{path}.health.active.kind",
                f"an http check speaks HTTP/1.1, which a protocol: {protocol} upstream refuses; "
                "use kind: tcp",
            )
        outbound = Outbound(
            name or "",
            listen,
            server_ids,
            subsets,
            protocol,
            balancer,
            hash_on,
            health,
            self.timeouts(
                self.section(item, f"{path}.timeouts", _TIMEOUT_KEYS), f"{path}.timeouts"
            ),
            self.retries(self.section(item, f"{path}.retries", _RETRY_KEYS), f"{path}.retries"),
            self.breaker(self.section(item, f"{path}.circuit_breaker", _BREAKER_KEYS), path),
            self.seconds(
                self.section(item, f"{path}.pool", {"idle_timeout"}),
                "idle_timeout",
                f"{path}.pool.idle_timeout",
                60.0,
            ),
            destinations,
        )
        return outbound if name is not None and subsets else None

    def addresses(self, item: Mapping[str, Any], key: str, path: str) -> tuple[Endpoint, ...]:
        """`ip:port` / `[v6]:port` literals, each once: what a captured app connects to."""
        found: list[Endpoint] = []
        for i, value in enumerate(self.items(item, key, path)):
            address = self.address(value, f"{path}[{i}]")
            if address in found:
                self.fail(f"{path}[{i}]", f"{address} is listed twice")
            elif address is not None:
                found.append(address)
        return tuple(found)

    def address(self, value: object, path: str) -> Endpoint | None:
        """An IP literal and a port (no name: the kernel reports addresses, not names)."""
        endpoint = self.endpoint(value, path)
        if endpoint is None:
            return None
        try:
            ip = ipaddress.ip_address(endpoint.host)
        except ValueError:
            self.fail(path, f"{value!r} is not ip:port or [v6]:port (an IP literal, no name)")
            return None
        return Endpoint(str(ip), endpoint.port)

    # -- where the endpoints come from ---------------------------------------------------

    def subsets(self, item: Mapping[str, Any], path: str) -> tuple[Subset, ...]:
        given = [key for key in _SOURCES if key in item]
        if "subsets" in item:
            if given:
                self.fail(f"{path}.{given[0]}", "give endpoints in subsets or here, not both")
                return ()
            subsets = tuple(
                self.subset(raw, f"{path}.subsets[{i}]")
                for i, raw in enumerate(self.items(item, "subsets", f"{path}.subsets"))
            )
            names: set[str] = set()
            for i, subset in enumerate(subsets):  # i: the index in `subsets`, invalid ones too
                if subset is not None and subset.name in names:
                    self.fail(f"{path}.subsets[{i}].name", f"{subset.name!r} is given twice")
                elif subset is not None:
                    names.add(subset.name)
            if not subsets:
                self.fail(f"{path}.subsets", "required: at least one subset")
            return tuple(s for s in subsets if s) if None not in subsets else ()
        source = self.source(item, path)
        return (Subset("default", 1, source),) if source else ()

    def subset(self, raw: object, path: str) -> Subset | None:
        item = self.mapping(raw, path, {"name", "weight", *_SOURCES})
        name = self.label(item, "name", f"{path}.name")
        if item.get("name") is None:  # absent or null: else the upstream would go unsaid
            self.fail(f"{path}.name", "required: names the subset in logs")
        weight = self.integer(item, "weight", f"{path}.weight", 1, minimum=0)
        source = self.source(item, path)
        return Subset(name, weight, source) if name and source else None

    def source(self, item: Mapping[str, Any], path: str) -> Source | None:
        given = [key for key in _SOURCES if key in item]
        if len(given) != 1:
            problem = "required: one of" if not given else "only one of"
            self.fail(f"{path}.endpoints", f"{problem} endpoints, dns, kubernetes")
            return None
        if given[0] == "dns":
            return self.dns(self.section(item, f"{path}.dns", {"name", "refresh"}), f"{path}.dns")
        if given[0] == "kubernetes":
            known = {"service", "namespace", "port"}
            return self.kubernetes(self.section(item, f"{path}.kubernetes", known), path)
        endpoints = [
            self.weighted(value, f"{path}.endpoints[{i}]")
            for i, value in enumerate(self.items(item, "endpoints", f"{path}.endpoints"))
        ]
        if not endpoints:
            self.fail(f"{path}.endpoints", "required: at least one host:port")
        seen: set[Endpoint] = set()
        for i, entry in enumerate(endpoints):
            if entry is not None and entry[0] in seen:  # one endpoint, one weight
                self.fail(f"{path}.endpoints[{i}]", f"{entry[0]} is listed twice")
                return None
            if entry is not None:
                seen.add(entry[0])
        if not endpoints or None in endpoints:
            return None
        return StaticSource(tuple(e for e in endpoints if e))

    def weighted(self, value: object, path: str) -> tuple[Endpoint, int] | None:
        if not isinstance(value, Mapping):
            endpoint = self.endpoint(value, path)
            return (endpoint, 1) if endpoint else None
        item = self.mapping(value, path, {"address", "weight"})
        endpoint = self.endpoint(item.get("address"), f"{path}.address")
        weight = self.integer(item, "weight", f"{path}.weight", 1)
        return (endpoint, weight) if endpoint else None

    def dns(self, raw: Mapping[str, Any], path: str) -> DnsSource | None:
        address = self.endpoint(raw.get("name"), f"{path}.name")
        refresh = self.seconds(raw, "refresh", f"{path}.refresh", 5.0)
        return DnsSource(address.host, address.port, refresh) if address else None

    def kubernetes(self, raw: Mapping[str, Any], path: str) -> KubernetesSource | None:
        """A Service's EndpointSlices, watched with the pod's token: it needs the Kubernetes
        client, which the agent image leaves out (an injected agent has no API access)."""
        service = self.string(raw, "service", f"{path}.kubernetes.service", None)
        namespace = self.string(raw, "namespace", f"{path}.kubernetes.namespace", None)
        port = self.integer(raw, "port", f"{path}.kubernetes.port", 15443)
        if port > 65535:
            self.fail(f"{path}.kubernetes.port", "a port: 1 to 65535")
        for key, value in (("service", service), ("namespace", namespace)):
            if value is None:
                self.fail(f"{path}.kubernetes.{key}", "required: the Service whose slices to watch")
        if service is None or namespace is None or port > 65535:
            return None
        if not kubernetes_installed():
            self.fail(f"{path}.kubernetes", KUBERNETES_MISSING)
            return None
        return KubernetesSource(service, namespace, port)

    def hash_on(self, raw: object, path: str) -> HashOn | None:
        if raw is None:
            return None
        if raw == "source":
            return ("source", "")
        item = self.mapping(raw, path, {"header", "cookie"})
        if len(item) != 1 or not all(isinstance(v, str) and v for v in item.values()):
            self.fail(path, "one of {header: NAME}, {cookie: NAME} or source")
            return None
        if not {"header", "cookie"} & set(item):
            return None  # an unknown key, already reported
        if "header" in item:
            return ("header", item["header"].lower())
        return ("cookie", item["cookie"])

    # -- health, timeouts, retries, circuit breaker --------------------------------------

    def health(self, raw: Mapping[str, Any], path: str) -> HealthSettings:
        active = None
        if "active" in raw:
            active = self.active(
                self.section(raw, f"{path}.active", _ACTIVE_KEYS), f"{path}.active"
            )
        outlier: OutlierDetection | None = OutlierDetection()
        if raw.get("outlier", {}) is None or raw.get("outlier") is False:
            outlier = None  # `outlier: off` turns ejection off
        elif "outlier" in raw:
            outlier = self.outlier(self.section(raw, f"{path}.outlier", _OUTLIER_KEYS), path)
        panic = self.integer(raw, "panic_threshold", f"{path}.panic_threshold", 50, minimum=0)
        if panic > 100:
            self.fail(f"{path}.panic_threshold", "a percentage: 0 to 100")
            panic = 50
        return HealthSettings(active, outlier, panic)

    def active(self, raw: Mapping[str, Any], path: str) -> ActiveCheck:
        d = ActiveCheck()
        kind = self.choice(raw, "kind", f"{path}.kind", _CHECKS)
        check_path = self.string(raw, "path", f"{path}.path", d.path) or d.path
        if not check_path.startswith("/"):
            self.fail(f"{path}.path", "must start with /")
            check_path = d.path
        return ActiveCheck(
            kind,
            check_path,
            self.seconds(raw, "interval", f"{path}.interval", d.interval),
            self.seconds(raw, "timeout", f"{path}.timeout", d.timeout),
            self.integer(
                raw, "healthy_threshold", f"{path}.healthy_threshold", d.healthy_threshold
            ),
            self.integer(
                raw, "unhealthy_threshold", f"{path}.unhealthy_threshold", d.unhealthy_threshold
            ),
        )

    def outlier(self, raw: Mapping[str, Any], path: str) -> OutlierDetection:
        d, p = OutlierDetection(), f"{path}.outlier"
        percent = self.integer(
            raw,
            "max_ejection_percent",
            f"{p}.max_ejection_percent",
            d.max_ejection_percent,
            minimum=0,
        )
        if percent > 100:
            self.fail(f"{p}.max_ejection_percent", "a percentage: 0 to 100")
            percent = d.max_ejection_percent
        base = self.seconds(raw, "base_ejection", f"{p}.base_ejection", d.base_ejection)
        most = self.seconds(raw, "max_ejection", f"{p}.max_ejection", d.max_ejection)
        if most < base:
            self.fail(f"{p}.max_ejection", "must be at least base_ejection")
            base, most = d.base_ejection, d.max_ejection
        return OutlierDetection(
            self.integer(
                raw, "consecutive_failures", f"{p}.consecutive_failures", d.consecutive_failures
            ),
            self.integer(raw, "consecutive_5xx", f"{p}.consecutive_5xx", d.consecutive_5xx),
            base,
            most,
            percent,
        )

    def timeouts(self, raw: Mapping[str, Any], path: str) -> Timeouts:
        d = Timeouts()
        return Timeouts(
            self.seconds(raw, "connect", f"{path}.connect", d.connect, zero_ok=True),
            self.seconds(raw, "per_try", f"{path}.per_try", d.per_try, zero_ok=True),
            self.seconds(raw, "request", f"{path}.request", d.request, zero_ok=True),
        )

    def retries(self, raw: Mapping[str, Any], path: str) -> RetryPolicy:
        d = RetryPolicy()
        on, statuses, grpc_statuses = set(), set(), set()
        for i, value in enumerate(self.items(raw, "retry_on", f"{path}.retry_on")):
            if value in FAILURES:
                on.add(value)
            elif isinstance(value, str) and value in GRPC_RETRY_ON:
                grpc_statuses.add(GRPC_RETRY_ON[value])
            elif isinstance(value, int) and 100 <= value <= 599 and not isinstance(value, bool):
                statuses.add(value)
            else:
                self.fail(
                    f"{path}.retry_on[{i}]",
                    f"{value!r} is not one of {', '.join(FAILURES)}, a gRPC status "
                    f"({', '.join(sorted(GRPC_RETRY_ON))}) or an HTTP status code (100-599)",
                )
        non_idempotent = raw.get("non_idempotent", False)
        if not isinstance(non_idempotent, bool):
            self.fail(f"{path}.non_idempotent", "must be true or false")
        budget = self.section(raw, f"{path}.budget", {"percent", "min_concurrency"})
        percent = budget.get("percent", d.budget_percent)
        if isinstance(percent, bool) or not isinstance(percent, int | float) or percent < 0:
            self.fail(f"{path}.budget.percent", "a percentage >= 0")
            percent = d.budget_percent
        given = "retry_on" in raw
        return RetryPolicy(
            self.integer(raw, "max", f"{path}.max", d.retries, minimum=0),
            frozenset(on) if given else d.on,
            frozenset(statuses) if given else d.statuses,
            non_idempotent is True,
            float(percent),
            self.integer(
                budget,
                "min_concurrency",
                f"{path}.budget.min_concurrency",
                d.min_retry_concurrency,
                minimum=0,
            ),
            frozenset(grpc_statuses) if given else d.grpc_statuses,
        )

    def breaker(self, raw: Mapping[str, Any], path: str) -> BreakerLimits:
        d, p = BreakerLimits(), f"{path}.circuit_breaker"
        return BreakerLimits(
            self.integer(raw, "max_connections", f"{p}.max_connections", d.max_connections),
            self.integer(raw, "max_pending", f"{p}.max_pending", d.max_pending),
            self.integer(raw, "max_requests", f"{p}.max_requests", d.max_requests),
        )

    def seconds(
        self, raw: Mapping[str, Any], key: str, path: str, default: float, *, zero_ok: bool = False
    ) -> float:
        return self.duration(
            raw, key, path, timedelta(seconds=default), zero_ok=zero_ok
        ).total_seconds()

    # -- shared with the rest of agent/config.py's reader --------------------------------

    def choice(self, raw: Mapping[str, Any], key: str, path: str, allowed: tuple[T, ...]) -> T:
        """One of `allowed` (the first is the default)."""
        value = raw.get(key, allowed[0])
        if value not in allowed:
            self.fail(path, f"{value!r} is not one of {', '.join(map(str, allowed))}")
            return allowed[0]
        return cast(T, value)

    def endpoint(self, value: object, path: str) -> Endpoint | None:
        if value is None:
            self.fail(path, "required: host:port")
            return None
        try:
            listen = Listen.parse(value)
        except ValueError as exc:
            self.fail(path, str(exc))
            return None
        if listen.port == 0:
            self.fail(path, "port 0 is not a port to connect to")
            return None
        return Endpoint(listen.host, listen.port)

    def spiffe_id(self, value: object, path: str) -> SpiffeId | None:
        if value is None:
            self.fail(path, "required: spiffe://<trust-domain>/ns/<namespace>/sa/<account>")
            return None
        try:
            spiffe_id = SpiffeId.parse(str(value))
        except InvalidSpiffeId as exc:
            self.fail(path, str(exc))
            return None
        if not spiffe_id.path:
            self.fail(path, "a workload ID needs a path, not only a trust domain")
            return None
        return spiffe_id

    def spiffe_ids(self, raw: Mapping[str, Any], key: str, path: str) -> frozenset[SpiffeId]:
        ids = (
            self.spiffe_id(value, f"{path}[{i}]")
            for i, value in enumerate(self.items(raw, key, path))
        )
        return frozenset(i for i in ids if i is not None)


_TIMEOUT_KEYS = set(Timeouts.__annotations__)
_HEALTH_KEYS = {"active", "outlier", "panic_threshold"}
_ACTIVE_KEYS = set(ActiveCheck.__annotations__)
_OUTLIER_KEYS = set(OutlierDetection.__annotations__)
_RETRY_KEYS = {"max", "retry_on", "non_idempotent", "budget"}
_BREAKER_KEYS = set(BreakerLimits.__annotations__)
