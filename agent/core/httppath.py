"""The one normalized request path that both the policy and the app see.

An authorization check on a path is only as good as the agreement between
the path it checks and the path the app routes. So the agent normalizes the
request-target once, matches the policy against the result and forwards that
same result to the app; anything whose meaning could differ between two
readers (`%00`, malformed escapes, encoded `/` or `\\`, `..;`) is refused with a
400 instead of being guessed at.

Normalization follows RFC 3986 (6.2.2): decode only the unreserved characters,
upper-case the hex of every other escape, then remove dot segments (5.2.4).
It also turns `\\` into `/` and merges runs of `/`, as most app servers do,
and percent-encodes the few ASCII characters that are never valid raw in a
URI (`"<>^`{|}`), so a raw and an encoded spelling cannot differ.
"""

from __future__ import annotations

import re
import string

__all__ = ["BadPath", "normalize_host", "normalize_target", "without_parameters"]

_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_MALFORMED = re.compile(r"%(?![0-9A-Fa-f]{2})")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
# Space, controls and anything outside ASCII: none may appear raw in a request line.
_FORBIDDEN = re.compile(r"[^\x21-\x7e]")
_NOT_URI = re.compile(r'["<>^`{|}]')
_DOT_PARAMS = re.compile(r"/\.\.?;")
_PORT = re.compile(r":[0-9]*\Z")
#: A path normalization leaves as it is: segments of unreserved characters, none empty,
#: none starting with a dot (so none is `.` or `..`), maybe a trailing `/`. No escape,
#: no `\\`, no `;`: nothing to decode, merge or remove. Most requests' paths.
_NORMAL = re.compile(r"(?:/[A-Za-z0-9_~-][A-Za-z0-9._~-]*)+/?|/")


class BadPath(ValueError):
    """A request-target the agent refuses (400) rather than guess how the app reads it."""


def normalize_target(target: str) -> tuple[str, str]:
    """Split an origin-form request-target into (normalized path, raw query).

    The query (the text after the first `?`, without it) is kept verbatim for
    the app and is never matched, but held, as the path is, to printable ASCII
    (what a request line can carry: an HTTP/2 `:path` could carry more); a
    `#fragment` is dropped. Idempotent.
    """
    target = target.partition("#")[0]
    path, _, query = target.partition("?")
    bad = _FORBIDDEN.search(query) if query else None
    if bad:
        raise BadPath(f"query has the character {bad[0]!r}; a query may only hold printable ASCII")
    if _NORMAL.fullmatch(path):
        return path, query  # what `_normalized` would give, for less
    return _normalized(path), query


def _normalized(path: str) -> str:
    """The steps: escapes made canonical, `\\` as `/`, `..;` refused, dot segments removed."""
    if not path.startswith("/"):
        raise BadPath(f"request-target {_shown(path)} must start with '/'")
    path = _canonical_escapes(path).replace("\\", "/")
    if _DOT_PARAMS.search(path):
        raise BadPath(
            "path has a dot segment with parameters ('..;' or '.;'); refused because some"
            " app servers (Tomcat, for one) read it as '..'"
        )
    return _merge_and_remove_dot_segments(path)


def without_parameters(path: str) -> str:
    """A normalized path as Java servlet containers (Tomcat, Jetty, Spring) route it: each
    segment's parameters removed (`/a;x/b;y=1` -> `/a/b`, RFC 3986 3.3), and the empty
    segments that leaves merged (`/;x/admin` -> `/admin`).

    The app receives the path with its parameters (a `;jsessionid=` is the app's
    business), so the policy matches this form as well as the path as sent
    (agent.core.policy). Only a raw `;` separates: `%3B` is data. A segment that
    would become `.` or `..` cannot occur: `normalize_target` refuses `.;` and `..;`.
    """
    stripped = "/".join(segment.partition(";")[0] for segment in path.split("/"))
    return _merge_and_remove_dot_segments(stripped)


def normalize_host(host: str) -> str:
    """The Host (or :authority) as matched: lower-case, without port or trailing dot."""
    name, colon, port = host.rpartition(":") if ":" in host else (host, "", "")
    if (
        ":" not in name
        and not name.endswith(".")
        and (not colon or (port.isascii() and (not port or port.isdigit())))
    ):
        return name.lower()  # a name (or IPv4) and maybe a port: what the loop would give
    return _stripped(host)


def _stripped(host: str) -> str:
    """Ports and trailing dots off until none is left (`normalize_host`, step by step)."""
    while True:
        shorter = _PORT.sub("", host).rstrip(".")
        if shorter == host:
            return host.lower()
        host = shorter


def _canonical_escapes(path: str) -> str:
    bad = _FORBIDDEN.search(path)
    if bad:
        raise BadPath(f"path has the character {bad[0]!r}; a path may only hold printable ASCII")
    malformed = _MALFORMED.search(path)
    if malformed:
        escape = path[malformed.start() : malformed.start() + 3]
        raise BadPath(
            f"malformed percent-encoding {escape!r}: '%' must be followed by two hex digits"
        )
    path = _NOT_URI.sub(lambda m: f"%{ord(m[0]):02X}", path)
    return _ESCAPE.sub(_decode_unreserved, path)


def _decode_unreserved(escape: re.Match[str]) -> str:
    char = chr(int(escape[1], 16))
    if char == "\0":
        raise BadPath("path has an encoded NUL (%00)")
    if char in "/\\":
        raise BadPath(
            f"path has an encoded {char!r} ({escape[0]}); refused because an app may decode"
            " it into a path separator after the policy has matched"
        )
    return char if char in _UNRESERVED else escape[0].upper()


def _merge_and_remove_dot_segments(path: str) -> str:
    """Drop empty segments (merging `//`), then RFC 3986 5.2.4 on an absolute path."""
    segments = path[1:].split("/")
    kept: list[str] = []
    for segment in segments:
        if segment == "..":
            if kept:
                kept.pop()
        elif segment not in (".", ""):
            kept.append(segment)
    trailing_slash = bool(kept) and segments[-1] in (".", "..", "")
    return "/" + "/".join(kept) + ("/" if trailing_slash else "")


def _shown(text: str) -> str:
    return repr(text if len(text) <= 64 else text[:64] + "...")
