"""Which request header names the agent passes on: one rule for both HTTP directions.

CGI and WSGI servers (Python's wsgiref, PEP 3333 apps behind them, PHP under
CGI, nginx with `underscores_in_headers`) turn a header's name into an
environment key by upper-casing it and replacing `-` with `_`: `X_Role` and
`X-Role` both reach the app as `HTTP_X_ROLE`. PHP goes further, under every
SAPI (its built-in server, FPM, CGI): `.` and ` ` in a variable name become
`_` too, so `X.Role` is `$_SERVER['HTTP_X_ROLE']` as well. A policy rule on
`x-role` never sees those spellings, and a framing header spelled
`Transfer_Encoding` frames the body for such an app and not for the agent's
parser. So only names of letters, digits and `-` reach an app or an upstream
(Apache httpd passes no other name to a CGI app, for the same reason); a
request naming any other header (the token characters llhttp lets through:
`_`, `.`, `!#$%&'*+^`|~`) is refused (the default) or the header dropped
(`limits.headers_with_underscores`), as Envoy's
`headers_with_underscores_action` does with REJECT_REQUEST and DROP_HEADER
for `_` alone.

A value is held to what an HTTP/1.1 request line's parser (llhttp) takes in one:
no control character but HTAB (RFC 9110 5.5), which HTTP/2 lets through but
NUL, CR and LF. An h2 request carrying one gets the 400 its HTTP/1.1 form gets.
"""

from __future__ import annotations

import re
import string
from typing import Literal, get_args

UnderscoreAction = Literal["reject", "drop"]
UNDERSCORE_ACTIONS: tuple[UnderscoreAction, ...] = get_args(UnderscoreAction)  # default first

Verdict = Literal["keep", "reject", "drop"]

#: The characters of a name every app server reads as itself.
PLAIN = (string.ascii_letters + string.digits + "-").encode()


#: A control character a field value may not hold (HTAB may).
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def plain(name: bytes) -> bool:
    """True if `name` is letters, digits and `-` only: no app server folds it onto another."""
    return bool(name) and not name.translate(None, PLAIN)


def screen(name: bytes, action: UnderscoreAction) -> Verdict:
    """What happens to a request carrying a header named `name`."""
    return "keep" if plain(name) else action


def underscore_refusal(name: bytes) -> str:
    """Why a request was refused, for the caller: the name, and what to send instead."""
    shown = name[:64].decode("latin-1")
    odd = name.translate(None, PLAIN)[:1].decode("latin-1")
    what = "has an underscore" if odd == "_" else f"has {odd!r}"
    return (
        f"header name {shown!r} {what}; app servers read it as the same header as its "
        "hyphen spelling, so it is refused: send letters, digits and '-' only"
    )


def control_in(value: bytes) -> str | None:
    """The first control character `value` holds that no field value may, or None."""
    found = _CONTROL.search(value)
    return None if found is None else found[0].decode("latin-1")
