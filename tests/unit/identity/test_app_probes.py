"""The app's probes (`probes:`, the injector's): read with every error at its key path,
and the few decisions about them (the request the agent sends, the kubelet's rule)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from agent.config import ConfigError, Document, parse, with_snapshot
from identity.probes import (
    AppProbe,
    Grpc,
    HttpGet,
    TcpSocket,
    http_passed,
    redirected,
    request_head,
    status_code,
)
from tests.unit.agent.test_config import BASE, errors_of, minimal


def with_probes(probes: object) -> dict[str, Any]:
    return {**minimal(), "probes": probes}


def test_every_kind_of_probe_is_read_as_the_injector_writes_it() -> None:
    raw = with_probes(
        {
            "/app-health/web/readyz": {
                "httpGet": {
                    "path": "/ready",
                    "port": 8080,
                    "scheme": "HTTPS",
                    "httpHeaders": [{"name": "X-Probe", "value": "yes"}],
                },
                "timeoutSeconds": 3,
            },
            "/app-health/web/livez": {"tcpSocket": {"port": 8080}},
            "/app-health/grpc-api/startupz": {"grpc": {"port": 9090, "service": "orders"}},
        }
    )
    assert parse(raw, base=BASE).probes == (
        AppProbe(
            "/app-health/web/readyz",
            HttpGet(8080, "/ready", "HTTPS", (("X-Probe", "yes"),)),
            timedelta(seconds=3),
        ),
        AppProbe("/app-health/web/livez", TcpSocket(8080)),
        AppProbe("/app-health/grpc-api/startupz", Grpc(9090, "orders")),
    )
    assert parse(minimal(), base=BASE).probes == ()


def test_every_mistake_in_probes_is_reported_at_once_with_its_key_path() -> None:
    raw = with_probes(
        {
            "/ready": {"tcpSocket": {"port": 1}},  # would hide the agent's own /ready
            "/app-health/a/readyz": {"tcpSocket": {"port": 1}, "grpc": {"port": 2}},
            "/app-health/b/readyz": {"tcpSocket": {"port": "http"}},
            "/app-health/c/readyz": {"httpGet": {"port": 80, "scheme": "FTP", "path": "/a b"}},
            "/app-health/d/readyz": {
                "httpGet": {"port": 80, "httpHeaders": [{"name": "X", "value": "a\r\nEvil: 1"}]}
            },
            "/app-health/e/readyz": {"grpc": {"port": 70000, "service": 5}},
            "/app-health/f/readyz": {"exec": {"command": ["true"]}, "timeoutSeconds": 0},
        }
    )
    assert errors_of(raw) == [
        "probes./ready: must be /app-health/<container>/<kind>, as the injector writes it",
        "probes./app-health/a/readyz: needs exactly one of httpGet, tcpSocket and grpc",
        "probes./app-health/b/readyz.tcpSocket.port: must be a port number, 1 to 65535 "
        "(the injector resolves names)",
        "probes./app-health/c/readyz.httpGet.path: must be a request path: printable "
        "ASCII, no spaces",
        "probes./app-health/c/readyz.httpGet.scheme: must be HTTP or HTTPS",
        "probes./app-health/d/readyz.httpGet.httpHeaders[0]: a header value holds no "
        "control characters, at most 4096 bytes",
        "probes./app-health/e/readyz.grpc.port: must be a port number, 1 to 65535 "
        "(the injector resolves names)",
        "probes./app-health/e/readyz.grpc.service: must be a service name (printable text)",
        "probes./app-health/f/readyz.exec: unknown key",
        "probes./app-health/f/readyz: needs exactly one of httpGet, tcpSocket and grpc",
    ]
    assert errors_of(with_probes([])) == [
        "probes: must be a mapping of /app-health/... paths to probes"
    ]


def test_the_request_is_the_kubelets_with_the_probes_own_headers_in_place() -> None:
    assert request_head(HttpGet(8080, "ready")) == (
        b"GET /ready HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: kube-probe/outrider\r\n"
        b"Accept: */*\r\nConnection: close\r\n\r\n"
    )
    own = HttpGet(8080, "/", headers=(("host", "web.shop"), ("X-A", "1")))
    assert request_head(own) == (
        b"GET / HTTP/1.1\r\nUser-Agent: kube-probe/outrider\r\nAccept: */*\r\n"
        b"host: web.shop\r\nX-A: 1\r\nConnection: close\r\n\r\n"
    )


def test_a_probes_own_framing_headers_are_dropped_as_the_kubelets_client_drops_them() -> None:
    # Go's Request.Write leaves out Content-Length, Transfer-Encoding and Trailer from the
    # headers and frames the request itself: a GET with none. Sent, `Content-Length: 9`
    # would have the app wait for a body until the probe timed out; `Connection` is ours.
    framing = ("Content-Length", "Transfer-Encoding", "trailer", "connection")
    own = HttpGet(8080, "/", headers=(*((name, "9") for name in framing), ("X-A", "1")))
    assert request_head(own) == (
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: kube-probe/outrider\r\n"
        b"Accept: */*\r\nX-A: 1\r\nConnection: close\r\n\r\n"
    )


@pytest.mark.parametrize(
    ("line", "status", "passed"),
    [
        (b"HTTP/1.1 200 OK\r\n", 200, True),
        (b"HTTP/1.0 302 Found\r\n", 302, True),
        (b"HTTP/1.1 399\r\n", 399, True),
        (b"HTTP/1.1 404 Not Found\r\n", 404, False),
        (b"HTTP/1.1 503 Service Unavailable\n", 503, False),
        (b"HTTP/1.1 101 Switching Protocols\r\n", 101, False),
    ],
)
def test_2xx_and_3xx_pass_as_for_the_kubelet(line: bytes, status: int, passed: bool) -> None:
    assert status_code(line) == status
    assert http_passed(status) is passed


@pytest.mark.parametrize(
    "line", [b"", b"SSH-2.0-OpenSSH\r\n", b"HTTP/2 200\r\n", b"HTTP/1.1 2000\r\n"]
)
def test_an_answer_that_is_not_http_is_no_status(line: bytes) -> None:
    assert status_code(line) is None


def test_a_snapshot_cannot_change_the_probes() -> None:
    # They are the pod's own (the injector's), like its identity and listeners' ports.
    bootstrap = Document(
        with_probes({"/app-health/web/livez": {"tcpSocket": {"port": 80}}}), BASE, "env"
    )
    other = {"probes": {"/app-health/web/livez": {"tcpSocket": {"port": 22}}}}
    with pytest.raises(ConfigError, match="probes: not a snapshot key"):
        with_snapshot(bootstrap, other, source="snapshot")


PROBE = HttpGet(8080, "/healthz", headers=(("Host", "web"), ("X-A", "1")))


@pytest.mark.parametrize(
    ("location", "followed"),
    [
        ("/healthz/", HttpGet(8080, "/healthz/", headers=PROBE.headers)),
        ("ok?full=1", HttpGet(8080, "/ok?full=1", headers=PROBE.headers)),
        ("http://127.0.0.1:9000/x", HttpGet(9000, "/x", headers=(("X-A", "1"),))),
        ("https://127.0.0.1/x", HttpGet(443, "/x", "HTTPS", (("X-A", "1"),))),
        ("http://elsewhere.example/", None),
        ("//elsewhere.example/", None),
        ("http://127.0.0.1.elsewhere.example/", None),
        ("http://127.0.0.1@elsewhere.example/", None),
        ("http://localhost:8080/", None),
        ("http://127.0.0.1:99999/", None),
        ("ftp://127.0.0.1/x", None),
        ("javascript:alert(1)", None),
    ],
)
def test_a_redirect_is_followed_only_to_the_host_asked(
    location: str, followed: HttpGet | None
) -> None:
    assert redirected(PROBE, location) == followed


@pytest.mark.parametrize(
    ("location", "followed"),
    [
        ("/healthz/", HttpGet(8080, "/healthz/", headers=PROBE.headers)),
        ("http://[fd00::5]:9000/x", HttpGet(9000, "/x", headers=(("X-A", "1"),))),
        ("http://[fd00::6]:9000/x", None),
        ("http://127.0.0.1:9000/x", None),
    ],
)
def test_a_captured_pods_ipv6_probe_follows_redirects_to_its_own_address(
    location: str, followed: HttpGet | None
) -> None:
    assert redirected(PROBE, location, "fd00::5") == followed


def test_a_probe_at_an_ipv6_address_sends_its_host_in_brackets() -> None:
    head = request_head(HttpGet(8080, "/ready"), "fd00::5")
    assert b"\r\nHost: [fd00::5]:8080\r\n" in head


def test_a_redirect_to_the_same_ipv6_address_written_otherwise_is_not_followed() -> None:
    """The kubelet compares the host as written (Go's `URL.Hostname`), case and all."""
    assert redirected(PROBE, "http://[FD00::5]:9000/x", "fd00::5") is None
