"""The app's own probes, which the agent performs for the kubelet (bootstrap `probes:`).

With capture on, strict mTLS refuses the kubelet's probes (the kubelet holds no
SVID), so the injector rewrites each to `GET /app-health/<container>/<kind>` on the
agent's status port and hands the original to the agent, which performs it
against 127.0.0.1 and answers 200 or 503. These are the probes as data, and the
few decisions about them; agent/adapters/probes.py does the I/O.

Only the port comes from the probe: the host is always 127.0.0.1, so no config
can point the agent at another host and make it a proxy for whoever can reach
the status port.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Literal
from urllib.parse import urljoin, urlsplit

__all__ = [
    "APP_HEALTH",
    "AppProbe",
    "Grpc",
    "HttpGet",
    "TcpSocket",
    "header_error",
    "http_passed",
    "informational",
    "path_error",
    "redirected",
    "request_head",
    "request_path_error",
    "status_code",
]

APP_HEALTH = "/app-health/"
HOST = "127.0.0.1"
#: The kubelet's default, and its unit: whole seconds.
DEFAULT_TIMEOUT = timedelta(seconds=1)

_PROBE_PATH = re.compile(r"/app-health/[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?/[a-z]{1,16}")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}")
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]{0,4096}")
_REQUEST_PATH = re.compile(r"[\x21-\x7e]{1,2048}")

Scheme = Literal["HTTP", "HTTPS"]


@dataclass(frozen=True)
class HttpGet:
    """GET `path` from the app's `port` (at 127.0.0.1, or a captured pod's IP): a final 2xx
    or 3xx passes (redirects to that host followed, as the kubelet follows those to the
    host it asked; `redirected`)."""

    port: int
    path: str = "/"
    scheme: Scheme = "HTTP"  # HTTPS: TLS without verifying the app's certificate, as the kubelet
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class TcpSocket:
    """Connect to 127.0.0.1:`port`: the connection being accepted passes."""

    port: int


@dataclass(frozen=True)
class Grpc:
    """grpc.health.v1.Health/Check on 127.0.0.1:`port` (plain h2c, as the kubelet):
    SERVING passes, anything else fails."""

    port: int
    service: str = ""


@dataclass(frozen=True)
class AppProbe:
    """One probe of the app, served at `path` of the status (and admin) server."""

    path: str
    action: HttpGet | TcpSocket | Grpc
    timeout: timedelta = DEFAULT_TIMEOUT


def path_error(path: str) -> str | None:
    """Why the agent would not serve a probe at `path` (None: it would). Only under
    /app-health/<container>/, so no probe can hide /ready, /metrics or each other."""
    if _PROBE_PATH.fullmatch(path) is None:
        return "must be /app-health/<container>/<kind>, as the injector writes it"
    return None


def header_error(name: str, value: str) -> str | None:
    """Why the agent would not send this header (None: it would): a name that is not an
    HTTP token, or a control character in the value (a CR or LF would split the request)."""
    if _HEADER_NAME.fullmatch(name) is None:
        return "a header name is an HTTP token (letters, digits and !#$%&'*+.^_`|~-)"
    if _HEADER_VALUE.fullmatch(value) is None:
        return "a header value holds no control characters, at most 4096 bytes"
    return None


def request_path_error(path: str) -> str | None:
    if _REQUEST_PATH.fullmatch(path) is None:
        return "must be a request path of printable ASCII without spaces"
    return None


#: Headers of the probe's own that are never sent: the request frames itself, a GET with
#: no body (Go's client, the kubelet's, leaves out the first three the same way), on a
#: connection the agent closes after the answer (its own `Connection: close`).
_FRAMING = frozenset({"content-length", "transfer-encoding", "trailer", "connection"})


def request_head(probe: HttpGet, host: str = HOST) -> bytes:
    """The GET as the kubelet would send it to `host` (its Host, User-Agent and Accept,
    each replaced by a header of the probe's own with that name, and none of the probe's
    headers that frame a request)."""
    path = request_path(probe)
    headers = {
        "host": ("Host", _authority(host, probe.port)),
        "user-agent": ("User-Agent", "kube-probe/outrider"),
        "accept": ("Accept", "*/*"),
    }
    own = [(name, value) for name, value in probe.headers if name.lower() not in _FRAMING]
    for name, _ in own:
        headers.pop(name.lower(), None)
    lines = [f"GET {path} HTTP/1.1", *(f"{n}: {v}" for n, v in headers.values())]
    lines += [f"{n}: {v}" for n, v in own]
    lines += ["Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1")


def _hostname(netloc: str) -> str:
    """A URL's host as written, as Go's `URL.Hostname` reads it (the kubelet compares
    that): without user info, port or brackets, and not lower-cased."""
    host = netloc.rpartition("@")[2]
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.partition(":")[0]


def _authority(host: str, port: int) -> str:
    """`host:port` as a URL and a Host header write it: an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


#: Redirects followed before the probe fails, as the kubelet's.
MAX_REDIRECTS = 10


def redirected(probe: HttpGet, location: str, host: str = HOST) -> HttpGet | None:
    """The request the kubelet would make for a redirect to `location`, or None if it
    would not follow it (another host: the redirect itself passes). It follows one to
    the host it asked (`host`: 127.0.0.1, or the pod IP of a captured pod), whatever the
    port or scheme, so no redirect can make the agent ask anything else."""
    base = f"{probe.scheme.lower()}://{_authority(host, probe.port)}{request_path(probe)}"
    try:
        target = urlsplit(urljoin(base, location.strip()))
        port = target.port or (443 if target.scheme == "https" else 80)
    except ValueError:
        return None
    if target.scheme not in ("http", "https") or _hostname(target.netloc) != host:
        return None
    path = target.path or "/"
    path += f"?{target.query}" if target.query else ""
    if request_path_error(path):
        return None
    headers = probe.headers
    if urlsplit(location.strip()).netloc:  # absolute: the Host is the new URL's
        headers = tuple(h for h in headers if h[0].lower() != "host")
    scheme: Scheme = "HTTPS" if target.scheme == "https" else "HTTP"
    return replace(probe, port=port, path=path, scheme=scheme, headers=headers)


def request_path(probe: HttpGet) -> str:
    return probe.path if probe.path.startswith("/") else "/" + probe.path


def informational(status: int) -> bool:
    """A 1xx answer that another follows (103 Early Hints, 100 Continue): not 101, after
    which the connection speaks another protocol."""
    return 100 <= status < 200 and status != 101


def http_passed(status: int) -> bool:
    """The kubelet's rule: 200 to 399 passes."""
    return 200 <= status < 400


_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-5][0-9][0-9])(?: [^\r\n]*)?\r?\n")


def status_code(line: bytes) -> int | None:
    """The status of an HTTP/1.x status line; None if `line` is not one."""
    match = _STATUS_LINE.fullmatch(line)
    return int(match[1]) if match else None
