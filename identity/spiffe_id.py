"""SPIFFE IDs and trust domains, validated once at construction.

A SPIFFE ID is the identity every other part of Outrider authorizes on, so
the parser is deliberately strict: it accepts exactly the grammar of the
SPIFFE-ID specification and nothing a lenient URI parser would also accept
(``urllib.parse`` happily takes ``SPIFFE://Ex.org:443/a/../b?x``). Two
spellings of the same identity must never both be valid, otherwise a policy
written against one can be bypassed with the other.

Every rejection raises :class:`InvalidSpiffeId` with a message that names the
offending part, because the text usually comes from an operator's config or a
peer's certificate and whoever reads the log must see whose fault it is.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

__all__ = ["MAX_ID_BYTES", "MAX_TRUST_DOMAIN_BYTES", "InvalidSpiffeId", "SpiffeId", "TrustDomain"]

SCHEME = "spiffe"
PREFIX = "spiffe://"
#: Interoperability limit of SPIFFE-ID spec section 2.3, counting scheme and separator.
MAX_ID_BYTES = 2048
#: RFC 3986 limits a URI host to 255 characters (SPIFFE-ID spec section 2.3).
MAX_TRUST_DOMAIN_BYTES = 255

_TRUST_DOMAIN_CHARS = frozenset(string.ascii_lowercase + string.digits + ".-_")
_SEGMENT_CHARS = frozenset(string.ascii_letters + string.digits + ".-_")


class InvalidSpiffeId(ValueError):
    """Text or parts that do not form a valid SPIFFE ID or trust domain."""


@dataclass(frozen=True, slots=True)
class TrustDomain:
    """The authority part of a SPIFFE ID: the name of one trust root."""

    name: str

    def __post_init__(self) -> None:
        _check_trust_domain_name(self.name)

    @classmethod
    def parse(cls, text: str) -> TrustDomain:
        """Accept a bare name (``example.org``) or its ID (``spiffe://example.org``)."""
        if "://" not in text:
            return cls(text)
        authority, path = _split_id(text)
        if path:
            raise InvalidSpiffeId(f"trust domain {text!r} must not have a path")
        return cls(authority)

    @property
    def id(self) -> SpiffeId:
        """The trust domain's own SPIFFE ID, as carried by its signing authority."""
        return SpiffeId(self, "")

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A SPIFFE ID: a trust domain plus a path that is ``""`` or ``/seg/seg...``."""

    trust_domain: TrustDomain
    path: str

    def __post_init__(self) -> None:
        if not isinstance(self.trust_domain, TrustDomain):
            raise TypeError(f"trust_domain must be a TrustDomain, not {self.trust_domain!r}")
        _check_path(self.path)
        _check_length(str(self))

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        """Parse ``spiffe://<trust domain>[/<segment>...]``; anything else is rejected."""
        _check_length(text)
        authority, path = _split_id(text)
        return cls(TrustDomain(authority), path)

    @classmethod
    def from_segments(cls, trust_domain: TrustDomain, *segments: str) -> SpiffeId:
        """Build an ID from unescaped path segments, each checked on its own.

        A segment containing ``/`` is an error rather than being split, so a
        value taken from elsewhere (a namespace, an account name) can never
        smuggle in extra path levels.
        """
        for segment in segments:
            _check_segment(segment)
        return cls(trust_domain, "".join("/" + segment for segment in segments))

    @classmethod
    def for_workload(
        cls, trust_domain: TrustDomain, namespace: str, service_account: str
    ) -> SpiffeId:
        """The Kubernetes convention ``spiffe://<td>/ns/<namespace>/sa/<service account>``."""
        return cls.from_segments(trust_domain, "ns", namespace, "sa", service_account)

    @property
    def segments(self) -> tuple[str, ...]:
        """The path split into segments; ``()`` for a trust domain's own ID."""
        if not self.path:
            return ()
        return tuple(self.path[1:].split("/"))

    def member_of(self, trust_domain: TrustDomain) -> bool:
        """Whether this ID was issued in ``trust_domain``."""
        return self.trust_domain == trust_domain

    def __str__(self) -> str:
        return f"{PREFIX}{self.trust_domain.name}{self.path}"


def _split_id(text: str) -> tuple[str, str]:
    """Split ``spiffe://authority/path`` after checking the parts URIs share."""
    _check_scheme(text)
    rest = text[len(PREFIX) :]
    # Query and fragment are reported before the authority is checked, so
    # ``spiffe://example.org?x`` names the query rather than a bad character.
    if "?" in rest:
        raise InvalidSpiffeId(f"SPIFFE ID {text!r} must not have a query")
    if "#" in rest:
        raise InvalidSpiffeId(f"SPIFFE ID {text!r} must not have a fragment")
    authority, slash, path = rest.partition("/")
    return authority, slash + path


def _check_scheme(text: str) -> None:
    if text.startswith(PREFIX):
        return
    if not text:
        raise InvalidSpiffeId("SPIFFE ID must not be empty")
    scheme, sep, _ = text.partition("://")
    if not sep:
        raise InvalidSpiffeId(f"SPIFFE ID {text!r} must start with {PREFIX!r}")
    if scheme.lower() == SCHEME:
        raise InvalidSpiffeId(f"scheme {scheme!r} must be lowercase {SCHEME!r}")
    raise InvalidSpiffeId(f"scheme {scheme!r} is not {SCHEME!r}")


def _check_length(text: str) -> None:
    # surrogatepass: a lone surrogate is rejected later as a bad character,
    # not here as an encoding crash.
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_ID_BYTES:
        raise InvalidSpiffeId(f"SPIFFE ID is {size} bytes long; the maximum is {MAX_ID_BYTES}")


def _check_trust_domain_name(name: str) -> None:
    if not isinstance(name, str):
        raise TypeError(f"trust domain name must be a str, not {name!r}")
    if not name:
        raise InvalidSpiffeId("trust domain must not be empty")
    for char in name:
        if char not in _TRUST_DOMAIN_CHARS:
            raise InvalidSpiffeId(_trust_domain_char_problem(name, char))
    if len(name) > MAX_TRUST_DOMAIN_BYTES:
        raise InvalidSpiffeId(
            f"trust domain is {len(name)} bytes long; the maximum is {MAX_TRUST_DOMAIN_BYTES}"
        )


def _trust_domain_char_problem(name: str, char: str) -> str:
    """Explain the first bad character in URI terms, since that is how it got there."""
    if char == ":":
        return f"trust domain {name!r} must not have a port"
    if char == "@":
        return f"trust domain {name!r} must not have userinfo"
    if char == "%":
        return f"trust domain {name!r} must not use percent-encoding"
    if char == "/":
        return f"trust domain {name!r} must not have a path"
    if char in string.ascii_uppercase:
        return f"trust domain {name!r} must be lowercase"
    return (
        f"trust domain {name!r} contains {char!r}; only lowercase letters, digits,"
        " '.', '-' and '_' are allowed"
    )


def _check_path(path: str) -> None:
    if not isinstance(path, str):
        raise TypeError(f"path must be a str, not {path!r}")
    if not path:
        return
    if not path.startswith("/"):
        raise InvalidSpiffeId(f"path {path!r} must start with '/'")
    if path.endswith("/"):
        raise InvalidSpiffeId(f"path {path!r} must not have a trailing slash")
    for segment in path[1:].split("/"):
        if not segment:
            raise InvalidSpiffeId(f"path {path!r} must not have an empty segment ('//')")
        _check_segment(segment)


def _check_segment(segment: str) -> None:
    if not segment:
        raise InvalidSpiffeId("path segment must not be empty")
    if segment in (".", ".."):
        raise InvalidSpiffeId(f"path segment {segment!r} is not allowed")
    for char in segment:
        if char not in _SEGMENT_CHARS:
            raise InvalidSpiffeId(_segment_char_problem(segment, char))


def _segment_char_problem(segment: str, char: str) -> str:
    if char == "%":
        return f"path segment {segment!r} must not use percent-encoding"
    if char == "/":
        return f"path segment {segment!r} must not contain '/'"
    return (
        f"path segment {segment!r} contains {char!r}; only letters, digits,"
        " '.', '-' and '_' are allowed"
    )
