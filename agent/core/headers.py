"""Which request header names the agent passes on: one rule for both HTTP directions.

CGI and WSGI servers (Python's wsgiref, PEP 3333 apps behind them, PHP under
CGI, nginx with `underscores_in_headers`) turn a header's name into an
environment key by upper-casing it and replacing `-` with `_`: `X_Role` and
`X-Role` both reach the app as `HTTP_X_ROLE`. A policy rule on `x-role` never
sees `X_Role`, and a framing header spelled `Transfer_Encoding` frames the
body for such an app and not for the agent's parser. So no header name with
an underscore reaches an app or an upstream: the request is refused (the
default) or the header dropped (`limits.headers_with_underscores`), as Envoy's
`headers_with_underscores_action` does with REJECT_REQUEST and DROP_HEADER.
"""

from __future__ import annotations

from typing import Literal, get_args

UnderscoreAction = Literal["reject", "drop"]
UNDERSCORE_ACTIONS: tuple[UnderscoreAction, ...] = get_args(UnderscoreAction)  # default first

Verdict = Literal["keep", "reject", "drop"]


def screen(name: bytes, action: UnderscoreAction) -> Verdict:
    """What happens to a request carrying a header named `name`."""
    return "keep" if b"_" not in name else action


def underscore_refusal(name: bytes) -> str:
    """Why a request was refused, for the caller: the name, and what to send instead."""
    shown = name[:64].decode("latin-1")
    return (
        f"header name {shown!r} has an underscore; app servers read it as the same header "
        "as its hyphen spelling, so it is refused: send it with '-'"
    )
