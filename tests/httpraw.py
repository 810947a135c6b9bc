"""Raw HTTP/1.1 over mTLS to an agent's inbound port, so every trick reaches it as written."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tests import certs
from tests.mesh import AgentProcess, workload
from tests.support import CaSetup


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def mtls_socket(
    setup: CaSetup, address: str, who: str = "frontend", alpn: Sequence[str] = ()
) -> ssl.SSLSocket:
    """An mTLS connection to `address` ("host:port") with `who`'s SVID, offering `alpn`."""
    context = certs.client_context(setup.bundle_pem, certs.valid_svid(setup, workload(who)))
    if alpn:
        context.set_alpn_protocols(list(alpn))
    host, port = address.rsplit(":", 1)
    return context.wrap_socket(socket.create_connection((host, int(port)), timeout=5))


def connect(
    setup: CaSetup, agent: AgentProcess, who: str = "frontend", alpn: list[str] | None = None
) -> ssl.SSLSocket:
    """An mTLS connection to the agent's first inbound port, as `who`."""
    return mtls_socket(setup, agent.bound["inbound[0]"], who, alpn or ())


class Responses:
    """Responses read one at a time from a connection (they may share a TLS record)."""

    def __init__(self, tls: socket.socket) -> None:
        self.stream = _Stream(tls.makefile("rb"))

    def next(self, method: str = "GET") -> Reply | None:
        """The next response, or None if the connection closed first."""
        response = http.client.HTTPResponse(self.stream, method=method)  # type: ignore[arg-type]
        try:
            response.begin()
        except (http.client.RemoteDisconnected, ConnectionError, ssl.SSLError):
            return None
        return Reply(response.status, response.headers, response.read())


def exchange(
    setup: CaSetup,
    agent: AgentProcess,
    raw: bytes,
    methods: tuple[str, ...] = ("GET",),
    who: str = "frontend",
    alpn: list[str] | None = None,
) -> list[Reply]:
    """Send raw bytes over mTLS as `who`; read one response per method, or until closed."""
    replies = []
    with connect(setup, agent, who, alpn) as tls:
        tls.sendall(raw)
        responses = Responses(tls)
        for method in methods:
            reply = responses.next(method)
            if reply is None:
                break
            replies.append(reply)
    return replies


class _Stream:
    """What http.client.HTTPResponse asks of a socket: one reader shared by every response
    (responses may share a TLS record), which a finished response must not close."""

    def __init__(self, reader: Any) -> None:
        self.reader = reader

    def makefile(self, mode: str) -> Any:
        return self

    def __getattr__(self, name: str) -> Any:
        return getattr(self.reader, name)

    def close(self) -> None:
        pass


def get(target: str, *headers: str) -> bytes:
    lines = [f"GET {target} HTTP/1.1", "Host: backend", *headers, "", ""]
    return "\r\n".join(lines).encode("latin-1")


def one(setup: CaSetup, agent: AgentProcess, raw: bytes, who: str = "frontend") -> Reply:
    replies = exchange(setup, agent, raw, who=who)
    assert len(replies) == 1, "no response"
    return replies[0]
