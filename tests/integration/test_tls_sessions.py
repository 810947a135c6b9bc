"""The CA and the webhook keep no TLS sessions: each handshake verifies again, and
callers cannot make them hold session state.

OpenSSL with only OP_NO_TICKET still issues stateful TLS 1.3 tickets and caches
every session (and resumes TLS 1.2 sessions by ID), skipping the client chain's
verification on resumption and growing memory with every handshake.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests import floods
from tests.support import CaProcess
from tests.webhook import running_webhook

HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"


@dataclass
class TlsPort:
    port: int
    first_words: bytes  # what makes the server send something: tickets come with it


@pytest.fixture(params=["ca", "injector"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TlsPort]:
    if request.param == "ca":
        ca: CaProcess = request.getfixturevalue("ca")
        request.getfixturevalue("setup")
        yield TlsPort(ca.grpc_port, b"")  # gRPC servers speak first (SETTINGS)
        return
    with running_webhook(tmp_path_factory.mktemp("injector")) as webhook:
        yield TlsPort(webhook.port, HEALTHZ)


def handshake(
    port: TlsPort, context: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port.port), timeout=5)
    tls = context.wrap_socket(raw, server_hostname="localhost", session=session)
    tls.sendall(port.first_words)
    assert tls.recv(4096)
    return tls


def test_no_session_is_resumed(server: TlsPort) -> None:
    context = floods.client_context("h2")
    with handshake(server, context) as first:
        session = first.session
    assert session is not None and not session.has_ticket
    with handshake(server, context, session) as second:
        assert not second.session_reused


def test_tls_1_2_is_refused(server: TlsPort) -> None:
    """In TLS 1.2 OpenSSL caches sessions by ID, and Python cannot turn that off."""
    context = floods.client_context("h2")
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError):
        handshake(server, context)
