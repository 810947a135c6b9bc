"""The proxy pairs bench/ compares, each in the same topology on loopback:

    load generator -> client-side proxy (plain in, mTLS out)
                   -> server-side proxy (mTLS in, plain out) -> nginx backend

Every proxy presents an SVID from the same Outrider CA and trusts only its bundle:
the agents get theirs over gRPC from a running `outrider ca serve`, the others
from `outrider ca mint`. Each proxy runs one worker on one core, as an agent
(one event loop) does. Session resumption is off everywhere, so a new connection
is a full handshake for all of them; except in the `resumed` pairs (Outrider and
Envoy only), where each side resumes TLS 1.3 sessions with tickets that live 5 minutes.

What each side checks of its peer:
  outrider, envoy  the chain to the bundle and the peer's SPIFFE ID (URI SAN)
  haproxy          the chain to the bundle (HAProxy 2.6 cannot match a URI SAN)
  nginx            server side: the client's chain; client side: nothing, since
                   nginx's upstream check insists on a DNS name and SVIDs have none

At L7 the server-side proxies parse HTTP; Envoy also enforces a 10-rule RBAC
policy equal to the one Outrider's L7 policy will be given (POLICY_RULES).
The gRPC pairs (layer `grpc`: Outrider and Envoy only) speak h2c to the load
generator and the backend and h2 over mTLS (ALPN h2) between the proxies; the
server side checks each call's method against GRPC_POLICY_RULES (bench/grpc_calls.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

from bench.procs import NGINX_STREAM, cpu_capped, ensure_packages, started
from tests.envoy import (
    Svid,
    bootstrap,
    common_tls,
    envoy_process,
    static_cluster,
    tls_socket,
)
from tests.mesh import AgentProcess, agent_process, agent_yaml, inbound, outbound, workload
from tests.support import CaProcess, CaSetup, free_port

CLIENT, SERVER = workload("client"), workload("server")
BODY = "hello, mesh!\n"


@dataclass
class Pair:
    """What the load generator targets, and the proxy processes to watch (role -> pid)."""

    proxy: str  # outrider, envoy, haproxy, nginx, or direct (no proxy)
    layer: str  # l4, l7, grpc
    port: int
    pids: dict[str, int] = field(default_factory=dict)
    agents: list[AgentProcess] = field(default_factory=list)
    handshakes: Callable[[], int] | None = None  # full TLS handshakes so far, both sides
    spans: Callable[[], int] | None = None  # spans its OTLP receiver has taken (observed)

    @property
    def name(self) -> str:
        if self.proxy == "direct" and self.layer != "grpc":
            return "direct"  # the HTTP/1.1 backend, the first baseline
        return f"{self.proxy} {self.layer}"


def mint(setup: CaSetup, name: str, out: Path) -> Svid:
    command = [sys.executable, "-m", "outrider", "ca", "mint", "--dir", str(setup.ca_dir)]
    command += ["--spiffe-id", str(workload(name)), "--ttl", "4h", "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True, timeout=60)
    return Svid.from_dir(out)


# --- the backend ----------------------------------------------------------------------

_NGINX_MAIN = """\
daemon off;
master_process off;
worker_processes 1;
error_log {dir}/error.log warn;
pid {dir}/nginx.pid;
{modules}
events {{ worker_connections 8192; }}
"""
_NGINX_HTTP = """\
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
{body}
}}
"""


def _nginx(stack: ExitStack, workdir: Path, port: int, config: str, what: str) -> int:
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "nginx.conf"
    conf.write_text(config)
    command = ["nginx", "-p", str(workdir), "-e", str(workdir / "error.log"), "-c", str(conf)]
    return stack.enter_context(started(command, port, what, workdir / "stdout.log"))


def backend(stack: ExitStack, workdir: Path) -> tuple[int, int]:
    """nginx answering every request with a 13-byte body; (port, pid). Every scenario
    starts one first, so the tools it and the rivals need are installed here."""
    ensure_packages()
    port = free_port()
    body = f"""\
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{ default_type text/plain; return 200 "{BODY.strip()}\\n"; }}
    }}"""
    config = _NGINX_MAIN.format(dir=workdir, modules="") + _NGINX_HTTP.format(
        dir=workdir, body=body
    )
    return port, _nginx(stack, workdir, port, config, "nginx backend")


# --- Outrider -------------------------------------------------------------------------


def outrider(
    stack: ExitStack,
    setup: CaSetup,
    ca: CaProcess,
    backend_port: int,
    ttl: str = "1h",
    layer: str = "l4",
    observe: dict[str, Any] | None = None,
    variant: str = "observed",
    workers: int = 1,
    resumed: bool = False,
    cores_per_worker: float | None = None,
    launcher: Sequence[str] = ("-m", "outrider"),
) -> Pair:
    """Two `outrider agent run` processes with SVIDs (of lifetime `ttl`) from the running CA.

    At L7 the server side parses HTTP and enforces the 10-rule policy, and the
    client side parses it too and sends each request over pooled upstream
    connections (`protocol: http`), as Envoy's HTTP connection manager does.
    Layer `grpc`: the same with `protocol: grpc` and the gRPC policy. `observe`: both
    agents' access_log and tracing sections (the pair's layer gets " <variant>").
    `workers`: both agents' `workers:` (the pair's layer gets " N workers"); each worker
    process is watched too, as "<role> worker <n>".
    `resumed`: the agents resume TLS 1.3 sessions (`tls.resumption`, their default);
    every other pair turns it off, so a new connection is a full handshake.
    `cores_per_worker`: each agent's processes share a CPU quota of that many CPUs per
    worker (bench/procs.py cpu_capped; the pair's layer gets " capped").
    `launcher`: how Python runs each agent (bench/peak_rss.py: inside bench/peak_probe.py).
    """
    if resumed:
        observe, variant = {}, "resumed"
    if workers > 1:
        observe, variant = {**(observe or {}), "workers": workers}, f"{workers} workers"
    if cores_per_worker is not None:
        observe = observe or {}
        variant = f"{variant} capped" if workers > 1 else "capped"
    named = f"{layer}-{variant}".replace(" ", "-") if observe is not None else layer
    root, address = setup.root / f"outrider-{ttl}-{named}", f"127.0.0.1:{ca.grpc_port}"
    (root / "ca").mkdir(parents=True, exist_ok=True)
    (root / "ca" / "bundle.pem").write_bytes((setup.ca_dir / "bundle.pem").read_bytes())
    for name in ("client", "server"):  # real ServiceAccount tokens for the real CA
        token = setup.issuer.token("demo", name, lifetime=timedelta(hours=4))
        (root / f"{name}.token").write_text(token)
    tls = {"resumption": resumed, "ticket_lifetime": "5m"}
    common = {
        "ca_address": address,
        "limits": {"drain_timeout": "2s"},
        "tls": tls,
        **(observe or {}),
    }
    identity = {"ttl": ttl}
    protocol = _PROTOCOLS[layer]
    if layer != "l4":
        rules = GRPC_POLICY_RULES if layer == "grpc" else POLICY_RULES
        (root / "policy.yaml").write_text(yaml.safe_dump(outrider_policy(rules)))
        server_yaml = agent_yaml(
            root,
            "server",
            inbound=inbound(backend_port, protocol=protocol),
            policy={"files": [str(root / "policy.yaml")]},
            **common,
        )
    else:
        server_yaml = agent_yaml(root, "server", inbound=inbound(backend_port), **common)
    server_yaml["identity"].update(identity)
    server = stack.enter_context(agent_process(root, "server", server_yaml, launcher=launcher))
    upstream = outbound(server.bound["inbound[0]"], SERVER)
    upstream[0]["protocol"] = protocol
    client_yaml = agent_yaml(root, "client", outbound=upstream, **common)
    client_yaml["identity"].update(identity)
    client = stack.enter_context(agent_process(root, "client", client_yaml, launcher=launcher))
    port = int(client.bound["outbound[backend]"].rsplit(":", 1)[1])
    pids = {"client": client.process.pid, "server": server.process.pid}
    for role, agent in (("client", client), ("server", server)):
        pid = agent.process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        for index, child in enumerate(sorted(children, key=int)):
            pids[f"{role} worker {index}"] = int(child)
        if cores_per_worker is not None:
            mine = [p for r, p in pids.items() if r.split()[0] == role]
            stack.enter_context(cpu_capped(f"{named}-{role}", mine, cores_per_worker * workers))
    return Pair(
        "outrider",
        f"{layer} {variant}" if observe is not None else layer,
        port,
        pids,
        [client, server],
    )


def otlp_sink(stack: ExitStack, workdir: Path) -> tuple[int, Callable[[], int]]:
    """bench/otlp_sink.py as a process: its port, and how many spans it has received."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "bench.otlp_sink", str(port)]
    stack.enter_context(started(command, port, "OTLP sink", workdir / "otlp-sink.log"))

    def spans() -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/count", timeout=5) as answer:
            return int(json.load(answer)["spans"])

    return port, spans


def agent_counter(agent: AgentProcess, metric: str, **labels: str) -> float:
    """The sum of a counter's samples in an agent's /metrics whose labels include `labels`."""
    total = 0.0
    wanted = [f'{key}="{value}"' for key, value in labels.items()]
    for line in agent.metrics().splitlines():
        if line.startswith(metric + "{") and all(w in line for w in wanted):
            total += float(line.rsplit(" ", 1)[1])
    return total


# --- Envoy ----------------------------------------------------------------------------

_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_RBAC = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
_TCP_PROXY = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
_HTTP_OPTIONS_NAME = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_HTTP_OPTIONS = "type.googleapis.com/" + _HTTP_OPTIONS_NAME

# The 10-rule policy: nine rules for other callers and paths, then the one that lets
# the benchmark's client GET /api/*; every request is checked against all ten.
PolicyRules = list[tuple[str, str, str]]  # (principal, method, path prefix)
POLICY_RULES: PolicyRules = [(str(workload(f"svc{n}")), "GET", f"/v{n}/") for n in range(1, 10)]
POLICY_RULES.append((str(CLIENT), "GET", "/api/"))
# The same for gRPC: nine other callers' services, then every method of demo.Greeter for
# the benchmark's client (a gRPC call is a POST to /package.Service/Method).
GRPC_POLICY_RULES: PolicyRules = [
    (str(workload(f"svc{n}")), "POST", f"/demo.Service{n}/") for n in range(1, 10)
]
GRPC_POLICY_RULES.append((str(CLIENT), "POST", "/demo.Greeter/"))
_PROTOCOLS = {"l4": "tcp", "l7": "http", "grpc": "grpc"}


def outrider_policy(policy_rules: PolicyRules = POLICY_RULES) -> dict[str, Any]:
    """The rules as an Outrider policy: one ALLOW policy, ten rules."""
    rules = [
        {
            "name": f"rule-{n}",
            "from": {"principals": [principal]},
            "to": {"methods": [method], "paths": [prefix + "*"]},
        }
        for n, (principal, method, prefix) in enumerate(policy_rules, 1)
    ]
    return {"policies": [{"name": "bench", "action": "ALLOW", "rules": rules}]}


def _envoy_rbac(policy_rules: PolicyRules) -> dict[str, Any]:
    policies = {
        f"rule-{n}": {
            "principals": [{"authenticated": {"principal_name": {"exact": principal}}}],
            "permissions": [
                {
                    "and_rules": {
                        "rules": [
                            {"header": {"name": ":method", "string_match": {"exact": method}}},
                            {"url_path": {"path": {"prefix": prefix}}},
                        ]
                    }
                }
            ],
        }
        for n, (principal, method, prefix) in enumerate(policy_rules, 1)
    }
    rules = {"action": "ALLOW", "policies": policies}
    return {"name": "envoy.filters.http.rbac", "typed_config": {"@type": _RBAC, "rules": rules}}


def _envoy_filters(name: str, layer: str, cluster: str, *, policy: bool) -> list[dict[str, Any]]:
    if layer == "l4":
        config = {"@type": _TCP_PROXY, "stat_prefix": name, "cluster": cluster}
        return [{"name": "envoy.filters.network.tcp_proxy", "typed_config": config}]
    router = {"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}}
    route = {"match": {"prefix": "/"}, "route": {"cluster": cluster}}
    rules = GRPC_POLICY_RULES if layer == "grpc" else POLICY_RULES
    manager = {
        "@type": _HCM + "HttpConnectionManager",
        "stat_prefix": name,
        "codec_type": "HTTP2" if layer == "grpc" else "HTTP1",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}]},
        "http_filters": [_envoy_rbac(rules), router] if policy else [router],
    }
    if policy:  # the server side tells the app who called, as Outrider's L7 will
        manager["forward_client_cert_details"] = "SANITIZE_SET"
        manager["set_current_client_cert_details"] = {"uri": True}
    return [{"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]


def _h2(cluster: dict[str, Any]) -> dict[str, Any]:
    """The cluster speaking HTTP/2 to its endpoints (h2c, or h2 with ALPN over TLS)."""
    options = {"@type": _HTTP_OPTIONS, "explicit_http_config": {"http2_protocol_options": {}}}
    cluster["typed_extension_protocol_options"] = {_HTTP_OPTIONS_NAME: options}
    return cluster


def envoy(
    stack: ExitStack, setup: CaSetup, backend_port: int, layer: str, *, resumed: bool = False
) -> Pair:
    """Two Envoys; layer `grpc`: HTTP/2 on every hop (ALPN h2 between them), RBAC on the
    gRPC method, as `outrider grpc` does. `resumed`: the server issues stateless tickets
    (5 minutes) and the client keeps up to _SESSION_KEYS sessions to offer; otherwise
    neither resumes."""
    workdir = setup.root / f"envoy-{layer}{'-resumed' if resumed else ''}"
    client_svid = mint(setup, "client", workdir / "client-svid")
    server_svid = mint(setup, "server", workdir / "server-svid")
    h2 = layer == "grpc"
    alpn = {"alpn_protocols": ["h2"]} if h2 else {}
    downstream = tls_socket(
        "DownstreamTlsContext",
        {
            "require_client_certificate": True,
            "common_tls_context": {**common_tls(server_svid, [str(CLIENT)]), **alpn},
            **(_ENVOY_RESUMING if resumed else _ENVOY_NOT_RESUMING),
        },
    )
    backend = static_cluster("backend", backend_port, None)
    server_boot = bootstrap(
        "inbound",
        _envoy_filters("inbound", layer, "backend", policy=layer != "l4"),
        [_h2(backend) if h2 else backend],
        downstream,
    )
    server = stack.enter_context(envoy_process(server_boot, workdir, name="server"))
    upstream_tls = {**common_tls(client_svid, [str(SERVER)]), **alpn}
    upstream = tls_socket(
        "UpstreamTlsContext",
        {"common_tls_context": upstream_tls, "max_session_keys": _SESSION_KEYS if resumed else 0},
    )
    cluster = static_cluster("upstream", server.listener_port, upstream)
    client_boot = bootstrap(
        "outbound",
        _envoy_filters("outbound", layer, "upstream", policy=False),
        [_h2(cluster) if h2 else cluster],
        None,
    )
    client = stack.enter_context(envoy_process(client_boot, workdir, name="client"))

    def handshakes() -> int:
        return (
            sum(
                value
                for proxy in (client, server)
                for stat, value in proxy.stats().items()
                if stat.endswith("ssl.handshake")
            )
            // 2
        )  # each connection is counted once by each side

    pids = {"client": client.process.pid, "server": server.process.pid}
    named = f"{layer} resumed" if resumed else layer
    return Pair("envoy", named, client.listener_port, pids, handshakes=handshakes)


_ENVOY_NOT_RESUMING = {
    "disable_stateless_session_resumption": True,
    "disable_stateful_session_resumption": True,
}
_ENVOY_RESUMING = {"session_timeout": "300s"}  # stateless tickets, as the agents'
#: Envoy's client uses each TLS 1.3 session once (RFC 8446's advice) and keeps one by
#: default, which resumes about 1 connection in 12 under 50 at once: keep a session per
#: connection the load holds open.
_SESSION_KEYS = 128


# --- HAProxy --------------------------------------------------------------------------

_HAPROXY = """\
global
    nbthread 1
    maxconn 5000
    ssl-default-bind-options ssl-min-ver TLSv1.2 no-tls-tickets
    ssl-default-server-options ssl-min-ver TLSv1.2
defaults
    mode {mode}
    timeout connect 5s
    timeout client 60s
    timeout server 60s
{http}
frontend front
    bind 127.0.0.1:{listen}{bind_tls}
    default_backend back
backend back
    server next 127.0.0.1:{upstream}{server_tls}
"""


def _pem_bundle(svid: Svid, out: Path) -> Path:
    """HAProxy reads the chain and key from one file."""
    out.write_bytes(svid.chain.read_bytes() + svid.key.read_bytes())
    return out


def haproxy(stack: ExitStack, setup: CaSetup, backend_port: int, layer: str) -> Pair:
    workdir = setup.root / f"haproxy-{layer}"
    client_svid = mint(setup, "client", workdir / "client-svid")
    server_svid = mint(setup, "server", workdir / "server-svid")
    mode = "tcp" if layer == "l4" else "http"
    http = "    option http-keep-alive\n    http-reuse always" if layer == "l7" else ""
    client_port, server_port = free_port(), free_port()
    pids = {}
    for role, listen, upstream, bind_tls, server_tls in (
        (
            "server",
            server_port,
            backend_port,
            f" ssl crt {_pem_bundle(server_svid, workdir / 'server.pem')}"
            f" ca-file {server_svid.bundle} verify required",
            "",
        ),
        (
            "client",
            client_port,
            server_port,
            "",
            f" ssl crt {_pem_bundle(client_svid, workdir / 'client.pem')}"
            f" ca-file {client_svid.bundle} verify required no-ssl-reuse",
        ),
    ):
        conf = workdir / f"{role}.cfg"
        conf.write_text(
            _HAPROXY.format(
                mode=mode,
                http=http,
                listen=listen,
                upstream=upstream,
                bind_tls=bind_tls,
                server_tls=server_tls,
            )
        )
        command = ["haproxy", "-db", "-f", str(conf)]
        what = f"haproxy {layer} {role}"
        pids[role] = stack.enter_context(started(command, listen, what, workdir / f"{role}.log"))
    return Pair("haproxy", layer, client_port, pids)


# --- nginx ----------------------------------------------------------------------------


def nginx(stack: ExitStack, setup: CaSetup, backend_port: int, layer: str) -> Pair:
    workdir = setup.root / f"nginx-{layer}"
    client_svid = mint(setup, "client", workdir / "client-svid")
    server_svid = mint(setup, "server", workdir / "server-svid")
    client_port, server_port = free_port(), free_port()
    server_tls = f"""
        ssl_certificate {server_svid.chain};
        ssl_certificate_key {server_svid.key};
        ssl_client_certificate {server_svid.bundle};
        ssl_verify_client on;
        ssl_verify_depth 3;
        ssl_session_tickets off;
        ssl_session_cache off;"""
    client_tls = f"""
        proxy_ssl_certificate {client_svid.chain};
        proxy_ssl_certificate_key {client_svid.key};
        proxy_ssl_session_reuse off;"""
    if layer == "l4":
        modules = f"load_module {NGINX_STREAM};"
        blocks = {
            "server": f"""stream {{
    server {{ listen 127.0.0.1:{server_port} ssl backlog=4096; {server_tls}
        proxy_pass 127.0.0.1:{backend_port}; }}
}}""",
            "client": f"""stream {{
    server {{ listen 127.0.0.1:{client_port} backlog=4096;
        proxy_pass 127.0.0.1:{server_port}; proxy_ssl on; {client_tls} }}
}}""",
        }
    else:
        modules = ""
        proxy = 'proxy_http_version 1.1; proxy_set_header Connection "";'
        blocks = {
            "server": _NGINX_HTTP.format(
                dir=workdir / "server",
                body=f"""\
    upstream app {{ server 127.0.0.1:{backend_port}; keepalive 64; }}
    server {{ listen 127.0.0.1:{server_port} ssl backlog=4096; {server_tls}
        location / {{ proxy_pass http://app; {proxy} }} }}""",
            ),
            "client": _NGINX_HTTP.format(
                dir=workdir / "client",
                body=f"""\
    upstream mtls {{ server 127.0.0.1:{server_port}; keepalive 64; }}
    server {{ listen 127.0.0.1:{client_port} backlog=4096;
        location / {{ proxy_pass https://mtls; {proxy} {client_tls} }} }}""",
            ),
        }
    pids = {}
    for role, port in (("server", server_port), ("client", client_port)):
        where = workdir / role
        config = _NGINX_MAIN.format(dir=where, modules=modules) + blocks[role]
        pids[role] = _nginx(stack, where, port, config, f"nginx {layer} {role}")
    return Pair("nginx", layer, client_port, pids)
