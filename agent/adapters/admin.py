"""The admin server (127.0.0.1:15000): readiness, health, metrics, config and certificates.

Nothing here can change the agent, and nothing here shows key material: the
config holds none, and /certs shows certificates only.

HTTP/1.1 is parsed by llhttp (httptools), the parser aiohttp and uvicorn use;
aiohttp itself would add 12 MB to every pod's sidecar for five GET routes.
Requests are bounded in size, only GET and HEAD are served, and a client may
keep its connection alive.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable
from datetime import datetime, timedelta
from http import HTTPStatus
from pathlib import Path
from typing import Any, Protocol, cast

import httptools
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent.adapters.metrics import AgentMetrics
from agent.config import AgentConfig
from agent.core.svid import Svid
from agent.core.upstream import Endpoint
from identity import SpiffeId, TrustDomain
from identity.configfile import Listen

#: A request head larger than this is refused (431) and the connection closed.
MAX_REQUEST_BYTES = 16 * 1024

Response = tuple[int, str, bytes]  # status, content type, body
TEXT, JSON = "text/plain; charset=utf-8", "application/json"


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


def routes(agent: AgentView) -> dict[str, Callable[[], Response]]:
    """Path -> handler; each handler answers from the agent's state at that moment."""

    def ready() -> Response:
        return (200, TEXT, b"ready\n") if agent.ready else (503, TEXT, b"not ready\n")

    def healthz() -> Response:
        return 200, TEXT, b"ok\n"

    def metrics() -> Response:
        return 200, CONTENT_TYPE_LATEST, generate_latest(agent.metrics.registry)

    def config_dump() -> Response:
        return _json({"config": plain(agent.config), "bound": agent.bound})

    def certs() -> Response:
        svid = agent.svid
        if svid is None:
            return _json({"svid": None}, 503)
        renewal = agent.next_renewal
        return _json(
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

    return {
        "/ready": ready,
        "/healthz": healthz,
        "/metrics": metrics,
        "/config_dump": config_dump,
        "/certs": certs,
    }


def _json(value: object, status: int = 200) -> Response:
    return status, JSON, json.dumps(value, indent=2).encode()


async def serve(agent: AgentView, host: str, port: int) -> asyncio.Server:
    handlers = routes(agent)
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: AdminProtocol(handlers), host, port)


class AdminProtocol(asyncio.Protocol):
    """One admin connection: parse requests with llhttp, answer each from `handlers`."""

    def __init__(self, handlers: dict[str, Callable[[], Response]]) -> None:
        self.handlers = handlers
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.received = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self.received > MAX_REQUEST_BYTES:
            return self._respond((431, TEXT, b"request too large\n"), keep_alive=False)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._respond((400, TEXT, b"bad request\n"), keep_alive=False)

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        path = httptools.parse_url(self.url).path.decode("ascii", "replace")
        handler = self.handlers.get(path)
        if handler is None:
            response: Response = (404, TEXT, b"not found\n")
        elif method not in (b"GET", b"HEAD"):
            response = (405, TEXT, b"method not allowed\n")
        else:
            response = handler()
        if method == b"HEAD":
            response = (response[0], response[1], b"")
        self._respond(response, keep_alive=self.parser.should_keep_alive())
        self.url, self.received = b"", 0

    def _respond(self, response: Response, *, keep_alive: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        status, content_type, body = response
        head = (
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
        )
        self.transport.write(head.encode() + body)
        if not keep_alive:
            self.transport.close()


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
