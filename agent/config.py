"""agent.yaml -> AgentConfig, in one function that reports every error with its key path.

Example (only identity.spiffe_id, ca.address and ca.bundle_file are required):

    identity:
      spiffe_id: spiffe://example.org/ns/shop/sa/web   # who this pod is
      token_file: /var/run/secrets/outrider/token      # projected SA token
      ttl: 1h                                          # asked of the CA; 0s = its default
      output_dir: /var/run/outrider                    # optional: write svid.pem/key
      svid_file: web-svid/svid.pem                     # optional: start from this SVID
      key_file: web-svid/svid.key                      # (`outrider ca mint`), then renew with it
    ca:
      address: outrider-ca.outrider-system.svc:8443
      server_name: outrider-ca.outrider-system.svc     # default: the address's host
      bundle_file: /etc/outrider/bundle.pem            # the first trust bundle
      bundle_refresh: 5s                               # how often to ask the CA's bundle
      timeout: 10s
      backoff: {initial: 1s, max: 30s}                 # while the CA is unreachable
    inbound:                                           # mTLS in, plain to the app
      - listen: 0.0.0.0:15443
        app: 127.0.0.1:8080
        protocol: http                                 # or tcp (default), http2, grpc
        allow: {spiffe_ids: [], trust_domains: [example.org]}  # default: own domain
    outbound:                                          # plain in, mTLS out
      - name: backend                                  # agent/config_outbound.py: all keys
        listen: 127.0.0.1:9001
        protocol: http                                 # per request: pooled, retried
        endpoints: [backend.shop.svc:15443]            # or dns:, kubernetes:, subsets:
        server_ids: [spiffe://example.org/ns/shop/sa/backend]
    limits: {handshake_timeout: 10s, connect_timeout: 5s, idle_timeout: 1h,
             max_connections: 10000, max_pending_handshakes: 512, drain_timeout: 30s,
             admin_max_connections: 32, admin_request_timeout: 5s, admin_idle_timeout: 60s,
             headers_with_underscores: reject}  # or drop; either way never passed on
    admin: 127.0.0.1:15000                             # every route: keep it on loopback
    status: 0.0.0.0:15020                              # optional: /ready /healthz /metrics
    policy:                                            # docs/policy.md
      files: [/etc/outrider/policy/policy.yaml]        # watched, reloaded when changed
      policies: [{name: guard, action: DENY, rules: [{}]}]  # inline, in the files' format
      default_action: allow-authenticated              # or deny, when no ALLOW policy applies
    capture:                                           # optional: the pod's traffic is captured
      inbound_port: 15006                              # (nft, `outrider capture apply`): the agent
      outbound_port: 15007                             # serves 0.0.0.0:15006 and 127.0.0.1:15007
    captured:                                          # how captured traffic is served
      inbound: {mtls: strict, ports: {"8080": {protocol: http}, "8081": {mtls: permissive}}}
      outbound: {policy: allow-any, passthrough: ["10.96.0.1:443"]}   # or registry-only
    probes:                                            # the app's, for the kubelet (injector)
      /app-health/web/readyz: {httpGet: {path: /ready, port: 8080}, timeoutSeconds: 1}
      /app-health/web/livez: {tcpSocket: {port: 8080}}  # grpc: {port: 9090, service: ""}
    control:                                           # optional: the third config source
      address: outrider-control.outrider-system.svc:15012
      server_name: outrider-control.outrider-system.svc  # default: the address's host
      spiffe_id: spiffe://example.org/ns/outrider-system/sa/outrider-control  # the default
      pod: web-7d9c-x2x4z                              # default: $POD_NAME
      backoff: {initial: 1s, max: 5s}                  # while the control plane is away
      timeout: 10s                                     # connect, handshake, first config
    workload_api:                                      # optional: docs/workload-api.md
      socket: /var/run/outrider/workload/socket        # SPIFFE Workload API + Envoy SDS
      uids: [1000]                                     # optional: only these callers (SO_PEERCRED)
    access_log: {mode: off, sample: 1.0, query: false} # or denied, all: JSON lines on stdout
    tracing: {otlp_endpoint: "", sample: 1.0, service_name: ""}  # OTLP/HTTP; off when ""
    tls: {resumption: true, ticket_lifetime: 5m}       # TLS 1.3 resumption between agents

With `control:` the control plane streams snapshots holding `inbound`,
`outbound`, `policy` and `captured`; each replaces those keys of this file (the bootstrap)
and the whole is read again by `parse`, the one reader of every source.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, cast, get_args

from agent.config_outbound import Outbound, OutboundReader
from agent.core.accesslog import MODES as ACCESS_LOG_MODES
from agent.core.accesslog import AccessLogConfig
from agent.core.authz import AllowList
from agent.core.captured import (
    MTLS_MODES,
    OUTBOUND_POLICIES,
    Captured,
    MtlsMode,
    PortOverride,
)
from agent.core.headers import UNDERSCORE_ACTIONS, UnderscoreAction
from agent.core.policy import DefaultAction, Policy
from agent.core.policyfile import PolicyError, parse_policy_list
from agent.core.resumption import MAX_TICKET_LIFETIME, Resumption
from agent.core.tracecontext import TracingConfig
from agent.core.upstream import Endpoint
from identity import InvalidSpiffeId, SpiffeId, TrustDomain
from identity.appprotocol import PROTOCOLS, Protocol
from identity.backoff import Backoff
from identity.configfile import ConfigError, Listen, is_loopback, parse_yaml, read_yaml
from identity.injected import ADMIN_PORT, INBOUND_CAPTURE_PORT, OUTBOUND_CAPTURE_PORT, STATUS_PORT
from identity.jsonbounds import brackets, deeper_than
from identity.probes import (
    AppProbe,
    Grpc,
    HttpGet,
    Scheme,
    TcpSocket,
    header_error,
    path_error,
    request_path_error,
)

__all__ = [
    "AgentConfig",
    "ConfigError",
    "ControlEndpoint",
    "Document",
    "Outbound",
    "decode_snapshot",
    "load",
    "parse",
    "parse_snapshot",
    "parse_text",
    "read",
    "read_text",
    "snapshot_version_error",
    "with_snapshot",
]

DEFAULT_TOKEN = Path("/var/run/secrets/outrider/token")


@dataclass(frozen=True)
class IdentityConfig:
    spiffe_id: SpiffeId
    token_file: Path = DEFAULT_TOKEN
    ttl: timedelta = timedelta(0)
    output_dir: Path | None = None
    #: An SVID to start from (`ca mint`, or output_dir's own), read once at start; the
    #: token is asked for only when it is missing, expired or not this workload's.
    svid_file: Path | None = None
    key_file: Path | None = None


@dataclass(frozen=True)
class CaEndpoint:
    host: str
    port: int
    server_name: str
    bundle_file: Path
    timeout: timedelta = timedelta(seconds=10)
    backoff: Backoff = field(default_factory=Backoff)
    bundle_refresh: timedelta = timedelta(seconds=5)  # SPIRE agents sync every 5 s too


#: Every agent asks the CA for its bundle this often at most.
MIN_BUNDLE_REFRESH = timedelta(seconds=1)


@dataclass(frozen=True)
class Inbound:
    listen: Listen
    app: Endpoint
    allow: AllowList
    protocol: Protocol = "tcp"
    #: The address the agent dials the app from: a captured port's hand-off source
    #: (identity.capture.HANDOFF_SOURCE); None, the kernel's choice. Not a config key:
    #: never in the config file, nor in the admin's /config.
    source: str | None = field(default=None, metadata={"config": False})

    @property
    def local_addr(self) -> tuple[str, int] | None:
        """`source` as asyncio's create_connection takes it."""
        return None if self.source is None else (self.source, 0)


@dataclass(frozen=True)
class Limits:
    handshake_timeout: timedelta = timedelta(seconds=10)
    connect_timeout: timedelta = timedelta(seconds=5)
    idle_timeout: timedelta = timedelta(hours=1)
    max_connections: int = 10_000
    max_pending_handshakes: int = 512
    drain_timeout: timedelta = timedelta(seconds=30)
    #: A request header name with an underscore (or any character but letters, digits and
    #: `-`): refuse the request, or drop the header
    #: (agent/core/headers.py says why either way, never pass it on).
    headers_with_underscores: UnderscoreAction = "reject"
    # The admin and status servers, each: callers there are not authenticated.
    admin_max_connections: int = 32
    admin_request_timeout: timedelta = timedelta(seconds=5)
    admin_idle_timeout: timedelta = timedelta(seconds=60)


@dataclass(frozen=True)
class PolicyConfig:
    """The authorization policies, from files (watched and reloaded) and inline (what the
    control plane sends), and what decides when no ALLOW policy applies."""

    files: tuple[Path, ...] = ()
    default_action: DefaultAction = "allow-authenticated"
    policies: tuple[Policy, ...] = ()


#: Where the control plane runs (deploy/): its SVID names this namespace and account.
CONTROL_NAMESPACE, CONTROL_ACCOUNT = "outrider-system", "outrider-control"


#: While the control plane is away the agent runs its last config, and a change made
#: meanwhile waits for the reconnect: so retry within seconds, not the CA's 30 s. A
#: reconnect costs the control plane one TLS handshake (~2 ms of CPU): 2,000 agents
#: retrying every 5 s take a fifth of a core.
CONTROL_BACKOFF = Backoff(timedelta(seconds=1), timedelta(seconds=5))
CA_BACKOFF = Backoff()


@dataclass(frozen=True)
class ControlEndpoint:
    """The control plane the agent takes `inbound`, `outbound` and `policy` from.

    `spiffe_id` is the only identity it takes config from: any other SVID of the
    trust domain (every workload holds one) could otherwise pose as it.
    `pod` None: the agent's shell reads $POD_NAME (the downward API).
    """

    host: str
    port: int
    server_name: str
    spiffe_id: SpiffeId
    pod: str | None = None
    backoff: Backoff = CONTROL_BACKOFF
    #: The connect and handshake, the first snapshot of a stream, and how long a stream
    #: must last to count as the control plane's return (agent/adapters/control_plane.py).
    timeout: timedelta = timedelta(seconds=10)


@dataclass(frozen=True)
class CapturePorts:
    """`capture:` (the injector's): the pod's TCP is redirected to these ports of the agent."""

    inbound_port: int = INBOUND_CAPTURE_PORT
    outbound_port: int = OUTBOUND_CAPTURE_PORT

    @property
    def inbound(self) -> Listen:
        return Listen("0.0.0.0", self.inbound_port)  # noqa: S104 (the pod's every address)

    @property
    def outbound(self) -> Listen:
        return Listen("127.0.0.1", self.outbound_port)  # the app's own traffic only


#: A Unix socket's path must fit `sockaddr_un.sun_path` (108 bytes, NUL included).
MAX_SOCKET_PATH = 107
#: The most worker processes `workers:` may ask for (each one a whole interpreter).
MAX_WORKERS = 64


@dataclass(frozen=True)
class WorkloadApiConfig:
    """`workload_api:`: serve the SPIFFE Workload API and Envoy SDS on `socket`.

    `uids`: the only callers' UIDs (as the kernel gives them, SO_PEERCRED) that are
    served; empty: every process of the pod that reaches the socket.
    """

    socket: Path
    uids: frozenset[int] = frozenset()


@dataclass(frozen=True)
class AgentConfig:
    identity: IdentityConfig
    ca: CaEndpoint
    inbound: tuple[Inbound, ...] = ()
    outbound: tuple[Outbound, ...] = ()
    limits: Limits = field(default_factory=Limits)
    admin: Listen = Listen("127.0.0.1", ADMIN_PORT)
    policy: PolicyConfig = PolicyConfig()
    status: Listen | None = None  # probes and metrics only, for the pod network
    control: ControlEndpoint | None = None
    capture: CapturePorts | None = None  # None: nothing captured, no capture listeners
    captured: Captured = field(default_factory=Captured)
    probes: tuple[AppProbe, ...] = ()  # the app's, served at /app-health/...
    workload_api: WorkloadApiConfig | None = None  # None: neither API is served
    access_log: AccessLogConfig = field(default_factory=AccessLogConfig)  # docs/observability.md
    tracing: TracingConfig = field(default_factory=TracingConfig)
    #: Processes serving the listeners (docs/agent.md#workers): a count, or "auto" for the
    #: CPUs the agent may use. 1: one process, as ever; more: a main process keeping the
    #: identity, admin and config, and that many workers sharing each port (SO_REUSEPORT).
    workers: int | Literal["auto"] = 1
    tls: Resumption = field(default_factory=Resumption)  # agent/core/resumption.py, docs/agent.md

    @property
    def trust_domain(self) -> TrustDomain:
        return self.identity.spiffe_id.trust_domain


#: The keys a control-plane snapshot holds; each replaces the bootstrap's.
SNAPSHOT_KEYS = ("inbound", "outbound", "policy", "captured")


@dataclass(frozen=True)
class Document:
    """agent.yaml as read and not yet checked: what a snapshot's keys are merged into.

    Every source (a file, an environment variable, a snapshot merged into either)
    is checked by the same `parse`, so a key means one thing wherever it comes from.
    """

    raw: object
    base: Path  # relative paths are resolved against it
    source: str  # where the errors say they are

    def parse(self) -> AgentConfig:
        return parse(self.raw, base=self.base, source=self.source)


def read(path: Path) -> Document:
    """The file, unchecked; ConfigError if it cannot be read as YAML."""
    return Document(read_yaml(path), path.parent, str(path))


def read_text(text: str, *, source: str) -> Document:
    """YAML given inline (the injector passes it in an environment variable), unchecked."""
    return Document(parse_yaml(text, source), Path.cwd(), source)


def load(path: Path) -> AgentConfig:
    """Read and validate `path`; raise ConfigError listing every problem."""
    return read(path).parse()


def parse_text(text: str, *, source: str) -> AgentConfig:
    """Validate YAML given inline (the injector passes it in an environment variable)."""
    return read_text(text, source=source).parse()


#: What a snapshot may ask of the JSON parser, checked on its bytes first: gRPC's default
#: message bound; nesting far past the deepest key path (a policy's
#: `policy.policies[i].rules[j].when[k].values[l]` is 8 deep), since the parser and the
#: policy reader recurse once per level; and arrays and objects, ~100 bytes each parsed.
MAX_SNAPSHOT_BYTES = 4 * 1024 * 1024
MAX_SNAPSHOT_DEPTH = 32
MAX_SNAPSHOT_CONTAINERS = 200_000
#: Listeners a snapshot may ask for, inbound and outbound together. A pod gets one per
#: container port and one per upstream it calls; each costs a file descriptor, and
#: checking them pairwise for clashes grows with the square (5,000 took 1.3 s of a
#: blocked event loop, 4 MiB of them would take minutes).
MAX_SNAPSHOT_LISTENERS = 1000
#: A version as the control plane makes them (16 hex digits) with room to spare; it
#: reaches log lines and /config_dump, so nothing that could forge or flood a line.
_VERSION = re.compile(r"[0-9A-Za-z._:-]{1,64}")


def snapshot_version_error(version: str) -> str | None:
    """Why `version` cannot name a snapshot (None: it can); never quotes it whole."""
    if _VERSION.fullmatch(version):
        return None
    shown = ascii(version[:32]) + ("..." if len(version) > 32 else "")
    return (
        f"(version): {shown} is not a snapshot version: 1 to 64 letters, digits, "
        "'.', '_', ':' or '-'"
    )


def parse_snapshot(
    bootstrap: Document, data: bytes, *, source: str
) -> tuple[dict[str, Any], AgentConfig]:
    """A snapshot's bytes, decoded, merged into `bootstrap` and checked: its keys as sent and
    the config they make; ConfigError (named `source`) with every problem.

    Checked as the file is (`parse`), and beyond: its size and nesting before the JSON
    parser runs, its keys (`with_snapshot`), and listeners that take plain text only on
    loopback (`loopback_errors`).
    """
    raw = decode_snapshot(data, source)
    merged = with_snapshot(bootstrap, raw, source=source)
    assert isinstance(raw, dict)  # with_snapshot refused anything else
    # An outbound entry without `listen` (a captured pod's Service, destinations only) opens
    # nothing: a mesh of a few thousand Services is that many entries, and no listener.
    listeners = sum(
        1
        for k in ("inbound", "outbound")
        if isinstance(v := raw.get(k), list)
        for item in v
        if k == "inbound" or not isinstance(item, Mapping) or item.get("listen") is not None
    )
    if listeners > MAX_SNAPSHOT_LISTENERS:
        raise ConfigError(
            source,
            [
                f"inbound, outbound: {listeners} listeners; a snapshot opens at most "
                f"{MAX_SNAPSHOT_LISTENERS}"
            ],
        )
    config = merged.parse()
    errors = loopback_errors(config)
    if errors:
        raise ConfigError(source, errors)
    return raw, config


def decode_snapshot(data: bytes, source: str) -> object:
    if len(data) > MAX_SNAPSHOT_BYTES:
        raise ConfigError(
            source, [f"(top): {len(data)} bytes; a snapshot holds at most {MAX_SNAPSHOT_BYTES}"]
        )
    found = brackets(data)
    if len(found) > 2 * MAX_SNAPSHOT_CONTAINERS:
        raise ConfigError(
            source, [f"(top): more than {MAX_SNAPSHOT_CONTAINERS} arrays and objects"]
        )
    if deeper_than(found, MAX_SNAPSHOT_DEPTH):
        raise ConfigError(source, [f"(top): nested more than {MAX_SNAPSHOT_DEPTH} levels deep"])
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError: also an integer of more than 4,300 digits, which is no JSONDecodeError.
        raise ConfigError(source, [f"(top): not UTF-8 JSON: {str(exc)[:200]}"]) from None


def loopback_errors(config: AgentConfig) -> list[str]:
    """A snapshot's listeners that take plain text, off loopback: an outbound listener sends
    what it takes out with the pod's SVID (anyone on the pod network would call the mesh
    as this pod), and an inbound's app receives decrypted traffic (it is the pod's own)."""
    errors = [
        f"outbound[{i}].listen: {item.listen} is not a loopback address; a snapshot's "
        "outbound listeners take plain text, so only the pod itself may reach them "
        "(127.0.0.1, ::1 or localhost)"
        for i, item in enumerate(config.outbound)
        if item.listen is not None and not is_loopback(item.listen.host)
    ]
    errors += [
        f"inbound[{i}].app: {item.app} is not a loopback address; a snapshot sends "
        "decrypted traffic only to the pod's own app (127.0.0.1, ::1 or localhost)"
        for i, item in enumerate(config.inbound)
        if not is_loopback(item.app.host)
    ]
    return errors


def with_snapshot(bootstrap: Document, snapshot: object, *, source: str) -> Document:
    """The bootstrap with a snapshot's `inbound`, `outbound` and `policy` in place of its own.

    ConfigError (named `source`) if the snapshot is not a mapping or holds any
    other key: the bootstrap's identity, CA, listeners and limits are the pod's
    own (the injector's), and no stream may move them. Nor may it name files
    (`policy.files`): the agent would read them, and tell the control plane what
    it found in its Nack.
    """
    if not isinstance(snapshot, Mapping):
        raise ConfigError(
            source, ["(top): must be an object of inbound, outbound, policy and captured"]
        )
    others = sorted(str(key) for key in snapshot if key not in SNAPSHOT_KEYS)
    policy = snapshot.get("policy")
    if isinstance(policy, Mapping) and "files" in policy:
        others.append("policy.files")
    if others:
        raise ConfigError(
            source,
            [
                f"{key[:64]}: not a snapshot key; a snapshot holds only "
                f"{', '.join(SNAPSHOT_KEYS)} (policies inline, under policy.policies; "
                "the rest is the bootstrap's)"
                for key in others
            ],
        )
    raw = dict(bootstrap.raw) if isinstance(bootstrap.raw, Mapping) else {}
    for key in SNAPSHOT_KEYS:
        raw.pop(key, None)
    raw.update(snapshot)
    return Document(raw, bootstrap.base, source)


def parse(raw: object, *, base: Path, source: str = "config") -> AgentConfig:
    reader = _Reader(base)
    config = reader.config(raw)
    reader.check(source)
    assert config is not None  # no errors means every part was read
    return config


_TOP = {
    "identity",
    "ca",
    "inbound",
    "outbound",
    "limits",
    "admin",
    "status",
    "policy",
    "control",
    "capture",
    "captured",
    "probes",
    "workload_api",
    "access_log",
    "tracing",
    "workers",
    "tls",
}
_HTTP_GET = {"path", "port", "scheme", "httpHeaders"}
DEFAULT_ACTIONS: tuple[DefaultAction, ...] = get_args(DefaultAction)
_CA_KEYS = {"address", "server_name", "bundle_file", "timeout", "backoff", "bundle_refresh"}
_CONTROL_KEYS = {"address", "server_name", "spiffe_id", "pod", "backoff", "timeout"}
_POLICY_KEYS = {"files", "policies", "default_action"}
_CAPTURE_KEYS = {"inbound_port", "outbound_port"}


def _hours(duration: timedelta) -> str:
    return f"{duration.total_seconds() / 3600:g}h"


class _Reader(OutboundReader):
    def config(self, raw: object) -> AgentConfig | None:
        top = self.mapping(raw, "", _TOP)
        identity = self.identity(self.section(top, "identity", set(IdentityConfig.__annotations__)))
        ca = self.ca(self.section(top, "ca", _CA_KEYS))
        own_domain = identity.spiffe_id.trust_domain if identity else None
        inbound = tuple(
            self.inbound(item, f"inbound[{i}]", own_domain)
            for i, item in enumerate(self.items(top, "inbound", "inbound"))
        )
        outbound = tuple(
            self.outbound(item, f"outbound[{i}]")
            for i, item in enumerate(self.items(top, "outbound", "outbound"))
        )
        limits = self.limits(self.section(top, "limits", set(Limits.__annotations__)))
        admin = self.listen(top, "admin", "admin", AgentConfig.admin)
        status = None  # off unless asked for: two agents on one host would share its port
        if top.get("status") is not None:
            status = self.listen(top, "status", "status", Listen("0.0.0.0", STATUS_PORT))  # noqa: S104
        policy = self.policy(self.section(top, "policy", _POLICY_KEYS))
        control = None
        if top.get("control") is not None:
            control = self.control(self.section(top, "control", _CONTROL_KEYS), own_domain)
        capture = None
        if top.get("capture") is not None:
            capture = self.capture(self.section(top, "capture", _CAPTURE_KEYS))
        captured = self.captured(self.section(top, "captured", {"inbound", "outbound"}))
        workload_api = None
        if top.get("workload_api") is not None:
            workload_api = self.workload_api(self.section(top, "workload_api", {"socket", "uids"}))
        self.unique_listeners(admin, status, inbound, outbound, capture)
        self.unique_destinations(outbound)
        if self.errors or identity is None or ca is None:
            return None
        return AgentConfig(
            identity,
            ca,
            tuple(i for i in inbound if i is not None),
            tuple(o for o in outbound if o is not None),
            limits,
            admin,
            policy,
            status,
            control,
            capture,
            captured,
            probes=self.app_probes(top.get("probes")),
            workload_api=workload_api,
            access_log=self.access_log(
                self.section(top, "access_log", {"mode", "sample", "query"})
            ),
            tracing=self.tracing(
                self.section(top, "tracing", {"otlp_endpoint", "sample", "service_name"})
            ),
            workers=self.workers(top),
            tls=self.tls(self.section(top, "tls", {"resumption", "ticket_lifetime"})),
        )

    def tls(self, raw: Mapping[str, Any]) -> Resumption:
        default = Resumption()
        lifetime = self.duration(
            raw, "ticket_lifetime", "tls.ticket_lifetime", default.ticket_lifetime
        )
        if not timedelta(0) < lifetime <= MAX_TICKET_LIFETIME:
            self.fail(
                "tls.ticket_lifetime",
                f"must be more than 0s and at most {_hours(MAX_TICKET_LIFETIME)}: a resumed "
                "connection stands on a chain check made up to this long ago",
            )
            lifetime = default.ticket_lifetime
        return Resumption(
            self.flag(raw, "resumption", "tls.resumption", default.resumption), lifetime
        )

    def workers(self, top: Mapping[str, Any]) -> int | Literal["auto"]:
        """`workers:` a count of at most MAX_WORKERS, or "auto"."""
        value = top.get("workers", 1)
        if value == "auto":
            return "auto"
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_WORKERS:
            self.fail("workers", f'must be "auto" or an integer from 1 to {MAX_WORKERS}')
            return 1
        return value

    def access_log(self, raw: Mapping[str, Any]) -> AccessLogConfig:
        if raw.get("mode") is False:  # YAML 1.1 reads a bare `off` as false
            raw = {**raw, "mode": "off"}
        return AccessLogConfig(
            self.choice(raw, "mode", "access_log.mode", ACCESS_LOG_MODES),
            self.share(raw, "sample", "access_log.sample"),
            self.flag(raw, "query", "access_log.query"),
        )

    def tracing(self, raw: Mapping[str, Any]) -> TracingConfig:
        endpoint = raw.get("otlp_endpoint") or ""
        if not isinstance(endpoint, str):
            self.fail("tracing.otlp_endpoint", "host:port of an OTLP/HTTP receiver, or a URL")
            endpoint = ""
        elif endpoint and "://" not in endpoint:
            if self.endpoint(endpoint, "tracing.otlp_endpoint") is None:
                endpoint = ""
        elif endpoint and not endpoint.startswith(("http://", "https://")):
            self.fail("tracing.otlp_endpoint", "a URL must be http:// or https://")
            endpoint = ""
        name = self.string(raw, "service_name", "tracing.service_name", None)
        return TracingConfig(endpoint, self.share(raw, "sample", "tracing.sample"), name or "")

    def share(self, raw: Mapping[str, Any], key: str, path: str) -> float:
        """A probability: a number from 0 to 1 (default 1: everything)."""
        value = raw.get(key, 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            self.fail(path, "must be a number from 0 to 1")
            return 1.0
        return float(value)

    def workload_api(self, raw: Mapping[str, Any]) -> WorkloadApiConfig | None:
        socket = self.file(raw, "socket", "workload_api.socket")
        if socket is None:
            self.fail("workload_api.socket", "required: the Unix socket to serve the APIs on")
            return None
        if len(str(socket).encode()) > MAX_SOCKET_PATH:
            self.fail(
                "workload_api.socket",
                f"{str(socket)[:64]}...: a Unix socket's path is at most {MAX_SOCKET_PATH} bytes",
            )
            return None
        uids = []
        for i, uid in enumerate(self.items(raw, "uids", "workload_api.uids")):
            if not isinstance(uid, int) or isinstance(uid, bool) or not 0 <= uid < 2**32 - 1:
                self.fail(f"workload_api.uids[{i}]", "a UID: an integer from 0 to 4294967294")
                continue
            uids.append(uid)
        return WorkloadApiConfig(socket, frozenset(uids))

    def capture(self, raw: Mapping[str, Any]) -> CapturePorts:
        d = CapturePorts()
        ports = [
            self.port(raw, key, f"capture.{key}", getattr(d, key))
            for key in ("inbound_port", "outbound_port")
        ]
        if ports[0] == ports[1]:
            self.fail("capture.outbound_port", f"{ports[1]} is also capture.inbound_port")
        return CapturePorts(*ports)

    def port(self, raw: Mapping[str, Any], key: str, path: str, default: int) -> int:
        port = self.integer(raw, key, path, default)
        if port > 65535:
            self.fail(path, "a port: 1 to 65535")
            return default
        return port

    def captured(self, raw: Mapping[str, Any]) -> Captured:
        inbound = self.section(raw, "captured.inbound", {"mtls", "ports"})
        mtls: MtlsMode = self.choice(inbound, "mtls", "captured.inbound.mtls", MTLS_MODES)
        ports = inbound.get("ports", {})
        if not isinstance(ports, Mapping):
            self.fail("captured.inbound.ports", "must be a mapping of port -> {mtls, protocol}")
            ports = {}
        overrides = []
        for key, value in ports.items():
            path = f"captured.inbound.ports.{str(key)[:16]}"
            if not (isinstance(key, str | int) and str(key).isdigit() and 0 < int(key) <= 65535):
                self.fail(path, "not a port: a number 1 to 65535 (in quotes in JSON)")
                continue
            item = self.mapping(value, path, {"mtls", "protocol"})
            mode: MtlsMode | None = None
            if "mtls" in item:
                mode = self.choice(item, "mtls", f"{path}.mtls", MTLS_MODES)
            protocol: Protocol = self.choice(item, "protocol", f"{path}.protocol", PROTOCOLS)
            overrides.append((int(key), PortOverride(mode, protocol)))
        outbound = self.section(raw, "captured.outbound", {"policy", "passthrough"})
        policy = self.choice(outbound, "policy", "captured.outbound.policy", OUTBOUND_POLICIES)
        passthrough = self.addresses(outbound, "passthrough", "captured.outbound.passthrough")
        return Captured(mtls, tuple(sorted(overrides)), policy, frozenset(passthrough))

    def unique_destinations(self, outbound: Sequence[Outbound | None]) -> None:
        """A captured destination goes to one upstream: two would leave the choice to order."""
        owners: dict[Endpoint, int] = {}
        for i, item in enumerate(outbound):
            for j, destination in enumerate(item.destinations if item else ()):
                first = owners.setdefault(destination, i)
                if first != i:
                    self.fail(
                        f"outbound[{i}].destinations[{j}]",
                        f"{destination} is also a destination of outbound[{first}] "
                        f"({outbound[first].name!r}); a destination belongs to one upstream",  # type: ignore[union-attr]
                    )

    def identity(self, raw: Mapping[str, Any]) -> IdentityConfig | None:
        spiffe_id = self.spiffe_id(raw.get("spiffe_id"), "identity.spiffe_id")
        token_file = self.file(raw, "token_file", "identity.token_file") or DEFAULT_TOKEN
        ttl = self.duration(raw, "ttl", "identity.ttl", timedelta(0), zero_ok=True)
        output_dir = self.file(raw, "output_dir", "identity.output_dir")
        svid_file = self.file(raw, "svid_file", "identity.svid_file")
        key_file = self.file(raw, "key_file", "identity.key_file")
        if (svid_file is None) != (key_file is None):
            missing = "key_file" if key_file is None else "svid_file"
            self.fail(
                f"identity.{missing}",
                "svid_file and key_file go together: the SVID's chain and its key"
                " (`outrider ca mint --out DIR` writes DIR/svid.pem and DIR/svid.key)",
            )
        if spiffe_id is None:
            return None
        return IdentityConfig(spiffe_id, token_file, ttl, output_dir, svid_file, key_file)

    def ca(self, raw: Mapping[str, Any]) -> CaEndpoint | None:
        address = self.endpoint(raw.get("address"), "ca.address")
        server_name = self.string(raw, "server_name", "ca.server_name", None)
        bundle_file = self.file(raw, "bundle_file", "ca.bundle_file")
        if bundle_file is None:
            self.fail("ca.bundle_file", "required: the trust bundle (PEM) to trust the CA with")
        backoff = self.backoff(raw, "ca.backoff")
        timeout = self.duration(raw, "timeout", "ca.timeout", CaEndpoint.timeout)
        refresh = self.duration(
            raw, "bundle_refresh", "ca.bundle_refresh", CaEndpoint.bundle_refresh
        )
        if refresh < MIN_BUNDLE_REFRESH:
            self.fail("ca.bundle_refresh", f"at least {MIN_BUNDLE_REFRESH.total_seconds():g}s")
        if address is None or bundle_file is None or backoff is None:
            return None
        return CaEndpoint(
            address.host,
            address.port,
            server_name or address.host,
            bundle_file,
            timeout,
            backoff,
            refresh,
        )

    def backoff(
        self, raw: Mapping[str, Any], path: str, defaults: Backoff = CA_BACKOFF
    ) -> Backoff | None:
        """`{initial, max}` under `path`; None (reported) if initial exceeds max."""
        section = self.section(raw, path, {"initial", "max"})
        initial = self.duration(section, "initial", f"{path}.initial", defaults.initial)
        maximum = self.duration(section, "max", f"{path}.max", defaults.maximum)
        if initial > maximum:
            self.fail(f"{path}.initial", f"exceeds {path}.max ({maximum})")
            return None
        return Backoff(initial, maximum)

    def control(
        self, raw: Mapping[str, Any], own_domain: TrustDomain | None
    ) -> ControlEndpoint | None:
        address = self.endpoint(raw.get("address"), "control.address")
        server_name = self.string(raw, "server_name", "control.server_name", None)
        pod = self.string(raw, "pod", "control.pod", None)
        backoff = self.backoff(raw, "control.backoff", CONTROL_BACKOFF)
        timeout = self.duration(raw, "timeout", "control.timeout", ControlEndpoint.timeout)
        spiffe_id = None
        if "spiffe_id" in raw:
            spiffe_id = self.spiffe_id(raw["spiffe_id"], "control.spiffe_id")
            if spiffe_id is not None and own_domain and not spiffe_id.member_of(own_domain):
                self.fail(
                    "control.spiffe_id",
                    f"{spiffe_id} is not in trust domain {own_domain}, the only one whose "
                    "roots this agent holds",
                )
        elif own_domain is not None:
            spiffe_id = SpiffeId.for_workload(own_domain, CONTROL_NAMESPACE, CONTROL_ACCOUNT)
        if address is None or spiffe_id is None or backoff is None:
            return None
        host = address.host
        return ControlEndpoint(
            host, address.port, server_name or host, spiffe_id, pod, backoff, timeout
        )

    def inbound(self, raw: object, path: str, own_domain: TrustDomain | None) -> Inbound | None:
        item = self.mapping(raw, path, {"listen", "app", "allow", "protocol"})
        protocol = self.choice(item, "protocol", f"{path}.protocol", PROTOCOLS)
        listen = self.listen(item, "listen", f"{path}.listen", Listen("0.0.0.0", 15443))  # noqa: S104
        app = self.endpoint(item.get("app"), f"{path}.app")
        allow = self.section(item, f"{path}.allow", {"spiffe_ids", "trust_domains"})
        ids = self.spiffe_ids(allow, "spiffe_ids", f"{path}.allow.spiffe_ids")
        domains = frozenset(
            self.trust_domain(value, f"{path}.allow.trust_domains[{i}]")
            for i, value in enumerate(
                self.items(allow, "trust_domains", f"{path}.allow.trust_domains")
            )
        )
        if not allow and own_domain is not None:
            domains = frozenset({own_domain})
        if app is None:
            return None
        return Inbound(listen, app, AllowList(ids, frozenset(d for d in domains if d)), protocol)

    def policy(self, raw: Mapping[str, Any]) -> PolicyConfig:
        files = []
        for i, value in enumerate(self.items(raw, "files", "policy.files")):
            if isinstance(value, str) and value:
                files.append(self.base / value)
            else:
                self.fail(f"policy.files[{i}]", "a policy file's path")
        action = self.choice(raw, "default_action", "policy.default_action", DEFAULT_ACTIONS)
        return PolicyConfig(tuple(files), action, self.inline_policies(raw.get("policies")))

    def inline_policies(self, items: object) -> tuple[Policy, ...]:
        """`policy.policies`: checked by the policy files' own reader, errors and all."""
        if items is None:
            return ()
        if not isinstance(items, list):
            self.fail("policy.policies", "must be a list of policies, as under a file's policies:")
            return ()
        try:
            return parse_policy_list(items, "policy.policies")
        except PolicyError as exc:
            self.errors.extend(exc.errors)
            return ()

    def limits(self, raw: Mapping[str, Any]) -> Limits:
        d = Limits()
        return Limits(
            handshake_timeout=self.duration(
                raw, "handshake_timeout", "limits.handshake_timeout", d.handshake_timeout
            ),
            connect_timeout=self.duration(
                raw, "connect_timeout", "limits.connect_timeout", d.connect_timeout
            ),
            idle_timeout=self.duration(raw, "idle_timeout", "limits.idle_timeout", d.idle_timeout),
            max_connections=self.integer(
                raw, "max_connections", "limits.max_connections", d.max_connections
            ),
            max_pending_handshakes=self.integer(
                raw,
                "max_pending_handshakes",
                "limits.max_pending_handshakes",
                d.max_pending_handshakes,
            ),
            drain_timeout=self.duration(
                raw, "drain_timeout", "limits.drain_timeout", d.drain_timeout, zero_ok=True
            ),
            headers_with_underscores=self.choice(
                raw,
                "headers_with_underscores",
                "limits.headers_with_underscores",
                UNDERSCORE_ACTIONS,
            ),
            admin_max_connections=self.integer(
                raw,
                "admin_max_connections",
                "limits.admin_max_connections",
                d.admin_max_connections,
            ),
            admin_request_timeout=self.duration(
                raw,
                "admin_request_timeout",
                "limits.admin_request_timeout",
                d.admin_request_timeout,
            ),
            admin_idle_timeout=self.duration(
                raw, "admin_idle_timeout", "limits.admin_idle_timeout", d.admin_idle_timeout
            ),
        )

    def unique_listeners(
        self,
        admin: Listen,
        status: Listen | None,
        inbound: Sequence[Inbound | None],
        outbound: Sequence[Outbound | None],
        capture: CapturePorts | None = None,
    ) -> None:
        """No two listeners the kernel would not bind together (one address, or a wildcard
        and an address under it, on one port), and no two outbound listeners with one name."""
        listeners = [("admin", admin)] + ([("status", status)] if status else [])
        if capture is not None:
            listeners += [
                ("capture.inbound_port", capture.inbound),
                ("capture.outbound_port", capture.outbound),
            ]
        listeners += [(f"inbound[{i}].listen", c.listen) for i, c in enumerate(inbound) if c]
        listeners += [
            (f"outbound[{i}].listen", c.listen)
            for i, c in enumerate(outbound)
            if c and c.listen is not None
        ]
        for i, (path, address) in enumerate(listeners):
            earlier = [(p, a) for p, a in listeners[:i] if a.clashes(address)]
            if earlier:
                other, taken = earlier[0]
                where = f"{other} ({taken})" if taken != address else other
                self.fail(path, f"{address} is already the address of {where}")
            # The kernel binds any number on port 0, but the agent tells its inbound (and
            # its outbound) listeners apart by their address, keeping each across reloads.
            kind = path.partition("[")[0]
            twins = [p for p, a in listeners[:i] if a == address and p.partition("[")[0] == kind]
            if address.port == 0 and kind in ("inbound", "outbound") and twins:
                self.fail(
                    path,
                    f"{address} is also {twins[0]}: listeners on port 0 need a host each "
                    "(the agent tells them apart by their address)",
                )
        names: dict[str, int] = {}
        for i, item in enumerate(outbound):
            if item is not None and names.setdefault(item.name, i) != i:
                self.fail(
                    f"outbound[{i}].name", f"{item.name!r} is also outbound[{names[item.name]}]"
                )

    # --- probes: the app's, which the agent performs for the kubelet (identity/probes.py)

    def app_probes(self, raw: object) -> tuple[AppProbe, ...]:
        if raw is None:
            return ()
        if not isinstance(raw, Mapping):
            self.fail("probes", "must be a mapping of /app-health/... paths to probes")
            return ()
        found = []
        for key, spec in raw.items():
            path = f"probes.{str(key)[:80]}"
            problem = path_error(key) if isinstance(key, str) else "must be a string"
            if problem:
                self.fail(path, problem)
                continue
            probe = self.app_probe(key, spec, path)
            if probe is not None:
                found.append(probe)
        return tuple(found)

    def app_probe(self, key: str, raw: object, path: str) -> AppProbe | None:
        spec = self.mapping(raw, path, {"httpGet", "tcpSocket", "grpc", "timeoutSeconds"})
        kinds = [k for k in ("httpGet", "tcpSocket", "grpc") if k in spec]
        if len(kinds) != 1:
            self.fail(path, "needs exactly one of httpGet, tcpSocket and grpc")
            return None
        seconds = self.integer(spec, "timeoutSeconds", f"{path}.timeoutSeconds", 1)
        where = f"{path}.{kinds[0]}"
        action: HttpGet | TcpSocket | Grpc | None = None
        if kinds[0] == "httpGet":
            action = self.http_get(self.section(spec, where, _HTTP_GET), where)
        elif kinds[0] == "tcpSocket":
            port = self.probe_port(self.section(spec, where, {"port"}), where)
            action = None if port is None else TcpSocket(port)
        else:
            item = self.section(spec, where, {"port", "service"})
            port = self.probe_port(item, where)
            service = item.get("service", "")
            if not isinstance(service, str) or header_error("service", service):
                self.fail(f"{where}.service", "must be a service name (printable text)")
            elif port is not None:
                action = Grpc(port, service)
        return None if action is None else AppProbe(key, action, timedelta(seconds=seconds))

    def probe_port(self, raw: Mapping[str, Any], path: str) -> int | None:
        port = raw.get("port")
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            problem = "must be a port number, 1 to 65535 (the injector resolves names)"
            self.fail(f"{path}.port", problem)
            return None
        return port

    def http_get(self, raw: Mapping[str, Any], path: str) -> HttpGet | None:
        port = self.probe_port(raw, path)
        request = raw.get("path", "/")
        if not isinstance(request, str) or request_path_error(request):
            self.fail(f"{path}.path", "must be a request path: printable ASCII, no spaces")
            port = None
        scheme = raw.get("scheme", "HTTP")
        if scheme not in ("HTTP", "HTTPS"):
            self.fail(f"{path}.scheme", "must be HTTP or HTTPS")
            port = None
        headers: list[tuple[str, str]] = []
        for i, header in enumerate(self.items(raw, "httpHeaders", f"{path}.httpHeaders")):
            item = self.mapping(header, f"{path}.httpHeaders[{i}]", {"name", "value"})
            name, value = item.get("name"), item.get("value", "")
            if not isinstance(name, str) or not isinstance(value, str):
                self.fail(f"{path}.httpHeaders[{i}]", "name and value must be strings")
                port = None
            elif problem := header_error(name, value):
                self.fail(f"{path}.httpHeaders[{i}]", problem)
                port = None
            else:
                headers.append((name, value))
        if port is None:
            return None
        return HttpGet(port, request, cast(Scheme, scheme), tuple(headers))

    def trust_domain(self, value: object, path: str) -> TrustDomain | None:
        try:
            return TrustDomain.parse(str(value))
        except InvalidSpiffeId as exc:
            self.fail(path, str(exc))
            return None
