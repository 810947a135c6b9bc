"""The admin server (127.0.0.1:15000): readiness, health, metrics, config and certificates.

Nothing here can change the agent, and nothing here shows key material: the
config holds none, and /certs shows certificates only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent.adapters.metrics import AgentMetrics
from agent.config import AgentConfig
from agent.core.svid import Svid
from agent.core.upstream import Endpoint
from identity import SpiffeId, TrustDomain
from identity.configfile import Listen


class AgentView(Protocol):
    config: AgentConfig
    metrics: AgentMetrics
    bound: dict[str, str]

    @property
    def ready(self) -> bool: ...

    @property
    def svid(self) -> Svid | None: ...

    @property
    def next_renewal(self) -> datetime | None: ...


def make_app(agent: AgentView) -> web.Application:
    async def ready(request: web.Request) -> web.Response:
        if agent.ready:
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready\n")

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(agent.metrics.registry),
            headers={"Content-Type": CONTENT_TYPE_LATEST},
        )

    async def config_dump(request: web.Request) -> web.Response:
        return web.json_response({"config": plain(agent.config), "bound": agent.bound})

    async def certs(request: web.Request) -> web.Response:
        svid = agent.svid
        if svid is None:
            return web.json_response({"svid": None}, status=503)
        renewal = agent.next_renewal
        return web.json_response(
            {
                "spiffe_id": str(svid.spiffe_id),
                "serial": svid.serial,
                "not_before": svid.not_before.isoformat(),
                "not_after": svid.not_after.isoformat(),
                "next_renewal": renewal.isoformat() if renewal else None,
                "chain": [describe(cert) for cert in svid.chain],
                "bundle": {
                    "trust_domain": str(svid.bundle.trust_domain),
                    "roots": [describe(root) for root in svid.bundle.roots],
                },
            }
        )

    app = web.Application()
    routes: dict[str, Callable[[web.Request], Any]] = {
        "/ready": ready,
        "/healthz": healthz,
        "/metrics": metrics,
        "/config_dump": config_dump,
        "/certs": certs,
    }
    for path, handler in routes.items():
        app.router.add_get(path, handler)
    return app


def describe(cert: x509.Certificate) -> dict[str, str]:
    return {
        "subject": cert.subject.rfc4514_string(),
        "serial": f"{cert.serial_number:x}",
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "sha256": cert.fingerprint(hashes.SHA256()).hex(),
    }


def plain(value: object) -> Any:
    """A config value as JSON: durations in seconds, names and paths as strings."""
    if isinstance(value, SpiffeId | TrustDomain | Listen | Endpoint | Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, tuple | list):
        return [plain(item) for item in value]
    if isinstance(value, frozenset | set):
        return sorted(str(item) for item in value)
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)
