"""Access log records: which requests are logged, what a line holds, and what it never holds.

One JSON line per finished request (L7) or connection (L4), on stdout, as
Kubernetes collects a container's logs. The fields are fixed (FIELDS, in
this order, null where they do not apply) so a log pipeline can rely on
them. What a line never holds, whatever the request carried: a header's
value (only the trace ID and the request ID the agent itself checked or
made), a cookie, a token, a fragment, the userinfo or host of an
absolute-form target, the values of path parameters (`;jsessionid=...`), or
the query string, unless `query: true` asks for it, and even then the values
of parameters whose names say they are secret (token, password, signature
...) are replaced by "REDACTED". Path and method are cut (MAX_PATH,
MAX_METHOD): a caller chooses them, not a line's size.

Which requests: `mode` off (none: the default), denied (every request or
connection the policy denied) or all; `sample` thins the rest, never the
denials, which an auditor counts one by one.

Pure: the clock reading and the sampling draw are arguments.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Literal, get_args
from urllib.parse import unquote_plus

from agent.core.tracecontext import Propagated

Mode = Literal["off", "denied", "all"]
MODES: tuple[Mode, ...] = get_args(Mode)
Kind = Literal["http", "grpc", "tcp"]

FIELDS = (
    "time",
    "kind",
    "direction",
    "peer_id",
    "local_id",
    "method",
    "path",
    "status",
    "grpc_status",
    "decision",
    "policy",
    "rule",
    "bytes_in",
    "bytes_out",
    "duration_ms",
    "tls_version",
    "cipher",
    "upstream",
    "endpoint",
    "tries",
    "trace_id",
    "request_id",
    "error",
)

#: A logged path is cut here: a path is the caller's to choose, a log line's size is not.
MAX_PATH = 2048
#: And a method here (h2 lets a caller send any token as :method; the longest registered
#: one, UPDATEREDIRECTREF, has 17 characters).
MAX_METHOD = 32
REDACTED = "REDACTED"
#: Query parameters whose values are never logged, even with `query: true` (lowercase;
#: matched on the whole name and on its last `_`/`-`/`.` separated word).
SECRET_PARAMS = frozenset(
    {
        "token",
        "access_token",
        "id_token",
        "refresh_token",
        "auth",
        "authorization",
        "code",
        "key",
        "apikey",
        "api_key",
        "password",
        "passwd",
        "pwd",
        "secret",
        "client_secret",
        "signature",
        "sig",
        "session",
        "sessionid",
        "jsessionid",
        "phpsessid",
        "aspsessionid",
        "sid",
        "credential",
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
        "x-goog-signature",
        "x-goog-credential",
    }
)


@dataclass(frozen=True)
class AccessLogConfig:
    """`access_log:` in agent.yaml."""

    mode: Mode = "off"
    sample: float = 1.0  # the share of logged requests that are not denials
    query: bool = False  # log the query string (its secret-named values redacted)

    @property
    def on(self) -> bool:
        return self.mode != "off"


def logged(config: AccessLogConfig, denied: bool, draw: float) -> bool:
    """Whether a finished request gets a line; `draw` uniform in [0, 1)."""
    if denied:
        return config.mode != "off"
    return config.mode == "all" and (config.sample >= 1.0 or draw < config.sample)


@dataclass(frozen=True, slots=True)
class Tls:
    """The verified peer of a connection and its TLS, as a line gives them: made once per
    connection (an outbound one is pooled: each request it carries shares this), never per
    request. A plaintext connection has none: its lines say so with nulls."""

    peer_id: str
    version: str | None
    cipher: str | None


@dataclass(slots=True)
class Entry:
    """One request's (or connection's) line, filled in as it goes. `started` is the
    monotonic clock's reading at its start; `at` the wall clock's (Unix seconds)."""

    kind: Kind
    direction: str
    at: float
    started: float
    peer_id: str | None = None
    local_id: str | None = None
    method: str | None = None
    path: str | None = None
    status: int | None = None
    grpc_status: int | None = None
    decision: str | None = None
    policy: str | None = None
    rule: str | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    tls_version: str | None = None
    cipher: str | None = None
    upstream: str | None = None
    endpoint: str | None = None
    tries: int | None = None
    trace_id: str | None = None
    request_id: str | None = None
    error: str | None = None
    trace: Propagated | None = None  # this hop's span, when the request was propagated

    @property
    def denied(self) -> bool:
        return self.decision == "deny"

    def over(self, tls: Tls | None) -> None:
        """The connection this request (or connection) went out on: its peer and TLS, or
        (None) none: plaintext, or no connection was had."""
        if tls is None:
            self.peer_id = self.tls_version = self.cipher = None
        else:
            self.peer_id, self.tls_version, self.cipher = tls.peer_id, tls.version, tls.cipher


def logged_path(target: str, query: bool) -> str:
    """A request target as logged: its path, the values of its path parameters
    (`;jsessionid=...`) redacted, and its query only when `query` asks (redacted too).
    Any form a client may send is reduced to this: a fragment is dropped, and an
    absolute-form target (`http://user:pass@host/p`, as an app may write to a proxy)
    loses its scheme, userinfo and host; another form keeps only what follows a `@`."""
    target = target.partition("#")[0]
    if not target.startswith("/"):
        target = _origin_form(target)
    path, sep, rest = target.partition("?")
    path = path[:MAX_PATH]
    if ";" in path:  # cut again: each `;` of the caller's may be logged as `;REDACTED`
        path = _redact_parameters(path, query)[:MAX_PATH]
    if not query or not sep:
        return path
    return f"{path}?{redact_query(rest)}"[: MAX_PATH * 2]


def _origin_form(target: str) -> str:
    """`http://user:pass@host:80/p?q` as `/p?q`; `user@host:443` as `host:443`."""
    _, scheme, rest = target.partition("://")
    if not scheme:
        return target.rpartition("@")[2]
    slash = rest.find("/")
    query = rest.find("?")
    if slash < 0 or 0 <= query < slash:
        return "/" + (rest[query:] if query >= 0 else "")
    return rest[slash:]


def _redact_parameters(path: str, query: bool) -> str:
    """`path` with each segment's `;` parameters' values replaced by REDACTED: all of them,
    or with `query` those whose names say they are secret (a session ID in the path)."""
    segments = []
    for segment in path.split("/"):
        name, *parameters = segment.split(";")
        for parameter in parameters:
            key, eq, _ = parameter.partition("=")
            kept = query and not _secret(key)
            name += ";" + (parameter if kept else f"{key}={REDACTED}" if eq else REDACTED)
        segments.append(name)
    return "/".join(segments)


def redact_query(query: str) -> str:
    """`query` with the values of secret-named parameters replaced by REDACTED. Pairs are
    split on `&` and on `;` (which some servers take as a separator too)."""
    parts = _PAIRS.split(query)
    for n in range(0, len(parts), 2):
        name, eq, _ = parts[n].partition("=")
        if eq and _secret(name):
            parts[n] = f"{name}={REDACTED}"
    return "".join(parts)


_PAIRS = re.compile(r"([&;])")


def _secret(name: str) -> bool:
    """Whether a parameter's name says its value is secret: as the app reads the name
    (percent-decoded, `+` a space, a PHP-style `[...]` suffix dropped)."""
    lowered = unquote_plus(name).lower().partition("[")[0].strip()
    if lowered in SECRET_PARAMS:
        return True
    for sep in "_-.":
        lowered = lowered.rpartition(sep)[2]
    return lowered in SECRET_PARAMS


def line(entry: Entry, ended: float) -> str:
    """The JSON line for `entry`, finished at `ended` (the monotonic clock), no newline:
    FIELDS in order, as `json.dumps(record, separators=(",", ":"))` writes them (a test
    holds the two equal), built by one format string with only the variable strings
    escaped: a dict and the encoder's walk over it cost more than the rest of the line."""
    return _LINE % (
        _rfc3339(entry.at),
        entry.kind,
        entry.direction,
        _json(entry.peer_id),
        _json(entry.local_id),
        _json(entry.method),
        _json(entry.path),
        _json(entry.status),
        _json(entry.grpc_status),
        _json(entry.decision),
        _json(entry.policy),
        _json(entry.rule),
        _json(entry.bytes_in),
        _json(entry.bytes_out),
        round(max(ended - entry.started, 0.0) * 1000, 3),
        _json(entry.tls_version),
        _json(entry.cipher),
        _json(entry.upstream),
        _json(entry.endpoint),
        _json(entry.tries),
        _json(entry.trace_id),
        _json(entry.request_id),
        _json(entry.error),
    )


#: The line with its fixed parts written once: time, kind and direction are the agent's
#: own words (no escaping); duration_ms a float (repr, as json writes it); the rest JSON.
_LINE = (
    '{"time":"%s","kind":"%s","direction":"%s",'
    + ",".join(f'"{name}":%{"r" if name == "duration_ms" else "s"}' for name in FIELDS[3:])
    + "}"
)
#: One encoder for what is neither a string nor an int nor None (never, by Entry's types).
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)
_escaped = json.encoder.encode_basestring_ascii


def _json(value: object) -> str:
    """`value` as JSON: a string escaped (ASCII only, as ensure_ascii writes it)."""
    if value is None:
        return "null"
    if type(value) is str:
        return _escaped(value)
    if type(value) is int:
        return int.__repr__(value)
    return _ENCODER.encode(value)


_second: list[tuple[int, str]] = [(-1, "")]  # the last second formatted, and its text


def _rfc3339(at: float) -> str:
    """Unix seconds as RFC 3339 UTC with milliseconds: 2026-12-06T14:00:00.123Z. The
    date and time of day are formatted once per second (a burst shares them)."""
    whole = int(at)
    second, text = _second[0]
    if whole != second:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        _second[0] = (whole, text)
    return f"{text}.{int((at - whole) * 1000):03d}Z"
