"""The one error type caller authentication raises.

It lives apart from ``kubernetes.py`` so that the JWKS sources can raise it
without importing the verifier: imports run errors <- jwks <- kubernetes.
"""

from __future__ import annotations

from typing import Literal, get_args

TokenReason = Literal[
    "malformed",
    "unsigned",
    "unsupported_alg",
    "unknown_key",
    "bad_signature",
    "unknown_issuer",
    "wrong_audience",
    "expired",
    "not_yet_valid",
    "invalid_claims",
    "jwks_unavailable",
]

# Every reason token verification can give, so metrics can pre-register them.
TOKEN_REASONS: frozenset[str] = frozenset(get_args(TokenReason))


class AuthnError(Exception):
    """A caller could not be authenticated.

    ``reason`` is a metric label and must come from a fixed set: the token
    verifier uses ``TOKEN_REASONS``; other authenticators (e.g. SVID
    renewal) add their own literals. It is never built from request data.
    ``message`` is for humans. Neither ever contains the bearer token: the
    token is a credential, and logs are read by more people than the CA.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
