"""Header names an app server folds onto another never reach the app, whatever their spelling.

Property: for every spelling of a header name (case, `-`, `_` or `.` between
its words, separators doubled or at the ends), the request the app receives,
read the way a CGI/WSGI server or PHP reads it (upper case, `-` and `.` as
`_`), never carries a header a DENY rule would have refused on its hyphen
spelling. The exchange
runs on fake transports: bytes in, the bytes each side was sent out.
"""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from agent.adapters.http import HttpExchange
from agent.core.headers import UNDERSCORE_ACTIONS, UnderscoreAction, plain, screen
from agent.core.policy import Decision, PolicySet, Request
from agent.core.policyfile import parse_policies
from identity import SpiffeId
from tests.support import DENY_ADMIN_ROLE
from tests.transports import Sent

POLICIES = PolicySet(parse_policies(DENY_ADMIN_ROLE, "test"))
PEER = SpiffeId.parse("spiffe://example.org/ns/demo/sa/frontend")


def authorize(
    method: str, path: str, host: str | None, headers: dict[str, tuple[str, ...]]
) -> Decision:
    request = Request(PEER, 8080, method, path, host, headers)
    return POLICIES.decide(request, frozenset({PEER.trust_domain}))


def send(
    head_lines: list[bytes], action: UnderscoreAction, identity: bytes = b"By=x;URI=y"
) -> tuple[Sent, Sent]:
    client, app = Sent(), Sent()
    exchange = HttpExchange(client, app, authorize, identity, lambda _: None, action)  # type: ignore[arg-type]
    lines = [b"GET / HTTP/1.1", b"Host: backend", *head_lines, b"", b""]
    exchange.from_client(b"\r\n".join(lines))
    return client, app


def as_cgi(head: bytes) -> dict[str, list[str]]:
    """The app's view of a request head, as wsgiref builds its environ and PHP its $_SERVER."""
    environ: dict[str, list[str]] = {}
    for line in head.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        key = "HTTP_" + name.decode("latin-1").upper().replace("-", "_").replace(".", "_")
        environ.setdefault(key, []).append(value.decode("latin-1").strip())
    return environ


def status(client: Sent) -> int:
    return int(client.data.split(b" ", 2)[1]) if client.data else 0


def spellings(words: list[str]) -> st.SearchStrategy[bytes]:
    """`words` joined by `-`s, `_`s and `.`s, each letter in either case, maybe edged with `_`."""
    letters = [st.sampled_from([c.lower(), c.upper()]) for c in "".join(words)]
    separators = st.lists(
        st.sampled_from(["-", "_", "__", "-_", ".", "-."]),
        min_size=len(words) - 1,
        max_size=len(words) - 1,
    )
    edges = st.sampled_from(["", "_"])

    @st.composite
    def spelled(draw: st.DrawFn) -> bytes:
        chars = [draw(s) for s in letters]
        seps = draw(separators)
        out, at = draw(edges), 0
        for i, word in enumerate(words):
            out += "".join(chars[at : at + len(word)])
            at += len(word)
            if i < len(seps):
                out += seps[i]
        return (out + draw(edges)).encode()

    return spelled()


ACTIONS = st.sampled_from(UNDERSCORE_ACTIONS)


@given(spellings(["x", "role"]), ACTIONS)
def test_no_spelling_of_a_denied_header_reaches_the_app(
    name: bytes, action: UnderscoreAction
) -> None:
    client, app = send([name + b": admin"], action)
    reached = as_cgi(app.data).get("HTTP_X_ROLE", []) if app.data else []
    assert "admin" not in reached
    if plain(name):
        assert status(client) == 403
    elif action == "reject":
        assert status(client) == 400 and not app.data
        detail = json.loads(client.data.split(b"\r\n\r\n", 1)[1])["detail"]
        assert "underscore" in detail or "has '.'" in detail  # the first it found
    else:  # dropped: the request goes on without it
        assert app.data and not client.data


@given(
    st.one_of(spellings(["transfer", "encoding"]), spellings(["content", "length"])),
    ACTIONS,
)
def test_no_framing_header_reaches_the_app_in_a_spelling_the_agent_did_not_frame_by(
    name: bytes, action: UnderscoreAction
) -> None:
    if plain(name):
        return  # the real framing header: llhttp frames by it, and so does the app
    _, app = send([name + b": 5"], action)
    assert all(plain(line.partition(b":")[0]) for line in app.data.split(b"\r\n")[1:-2])


@given(st.binary(min_size=1, max_size=20), ACTIONS)
def test_screen_keeps_exactly_the_names_of_letters_digits_and_hyphens(
    name: bytes, action: UnderscoreAction
) -> None:
    ordinary = all(chr(c).isascii() and (chr(c).isalnum() or c == ord("-")) for c in name)
    assert (screen(name, action) == "keep") == ordinary


def test_an_unauthenticated_caller_reaches_the_app_with_no_identity_header_at_all() -> None:
    """Permissive capture lets plaintext in with no peer: every x-forwarded-client-cert it
    sent is dropped and none is added, not even an empty one an app might read as a name."""
    forged = [b"X-Forwarded-Client-Cert: By=a;URI=spiffe://example.org/ns/demo/sa/admin"]
    for identity, expected in ((b"", []), (b"By=x;URI=y", ["By=x;URI=y"])):
        _, app = send(forged, "reject", identity)
        assert as_cgi(app.data).get("HTTP_X_FORWARDED_CLIENT_CERT", []) == expected
