"""normalize_target: the one path the policy matches and the app receives."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.httppath import (
    BadPath,
    _normalized,
    _stripped,
    normalize_host,
    normalize_target,
    without_parameters,
)

NORMALIZED = [
    ("/a/b", "/a/b", ""),
    ("/", "/", ""),
    ("/a/./b", "/a/b", ""),
    ("/a/../b", "/b", ""),
    ("/../../a", "/a", ""),
    ("/a/b/..", "/a/", ""),
    ("/a/.", "/a/", ""),
    ("/..", "/", ""),
    ("/a/b/", "/a/b/", ""),
    ("//a///b", "/a/b", ""),
    ("/a//../b", "/b", ""),
    ("/a\\b", "/a/b", ""),
    ("/api\\..\\admin", "/admin", ""),
    ("/%2e%2e/admin", "/admin", ""),
    ("/api/%2E%2e/admin", "/admin", ""),
    ("/api/.%2e/admin", "/admin", ""),
    ("/%61dmin/%7e%5F", "/admin/~_", ""),
    ("/a%3bb", "/a%3Bb", ""),
    ("/caf%c3%a9", "/caf%C3%A9", ""),
    ("/%25", "/%25", ""),
    ("/%252e%252e/admin", "/%252e%252e/admin", ""),
    ("/a;b/c", "/a;b/c", ""),
    ('/a"b|c', "/a%22b%7Cc", ""),
    ("/a?b=1&c=/../x", "/a", "b=1&c=/../x"),
    ("/a/../b?q#frag", "/b", "q"),
    ("/a#frag?not-a-query", "/a", ""),
    ("/a?", "/a", ""),
    ("/a?%00", "/a", "%00"),
]


@pytest.mark.parametrize(("target", "path", "query"), NORMALIZED)
def test_normalize_target(target: str, path: str, query: str) -> None:
    assert normalize_target(target) == (path, query)


REFUSED = [
    ("", "must start with '/'"),
    ("a/b", "must start with '/'"),
    ("*", "must start with '/'"),
    ("http://host/a", "must start with '/'"),
    ("/a%00", "NUL"),
    ("/a%0", "malformed"),
    ("/a%", "malformed"),
    ("/a%zz", "malformed"),
    ("/a%%41", "malformed"),
    ("/a%2fb", "encoded '/'"),
    ("/a%2Fb", "encoded '/'"),
    ("/a%5cb", "encoded '\\\\'"),
    ("/a b", "printable ASCII"),
    ("/a\tb", "printable ASCII"),
    ("/a\x7fb", "printable ASCII"),
    ("/a\x00b", "printable ASCII"),
    ("/caf\u00e9", "printable ASCII"),
    ("/a/..;/admin", "'..;'"),
    ("/a/%2e%2e;x/admin", "'..;'"),
    ("/a/.;/admin", "'..;'"),
]


@pytest.mark.parametrize(("target", "problem"), REFUSED)
def test_refused_targets(target: str, problem: str) -> None:
    with pytest.raises(BadPath, match=re.escape(problem)):
        normalize_target(target)


@pytest.mark.parametrize(
    ("host", "normalized"),
    [
        ("Api.Example.COM", "api.example.com"),
        ("api.example.com:8080", "api.example.com"),
        ("api.example.com.", "api.example.com"),
        ("api.example.com.:80", "api.example.com"),
        ("api.example.com:", "api.example.com"),
        ("api.example.com:80.", "api.example.com"),
        ("[::1]:8080", "[::1]"),
        ("[::1]", "[::1]"),
        ("", ""),
    ],
)
def test_normalize_host(host: str, normalized: str) -> None:
    assert normalize_host(host) == normalized
    assert normalize_host(normalized) == normalized


# -- properties ---------------------------------------------------------------------------

_TARGET_CHARS = "/.%\\?#;aAz09-_~2eEfF5cC"


@settings(max_examples=400)
@given(st.text(_TARGET_CHARS, max_size=30).map(lambda text: "/" + text))
def test_normalization_is_idempotent(target: str) -> None:
    try:
        path, _ = normalize_target(target)
    except BadPath:
        return
    assert normalize_target(path) == (path, "")


@settings(max_examples=400)
@given(st.text("/.aZ09-_~%;\\", max_size=20))
def test_a_path_taken_as_it_is_is_what_the_steps_give(path: str) -> None:
    """normalize_target takes most paths as they are (nothing to decode, merge or remove):
    exactly those the steps would give back unchanged."""
    try:
        steps = _normalized(path)
    except BadPath:
        steps = None
    try:
        taken = normalize_target(path)[0]
    except BadPath:
        taken = None
    assert taken == steps


@settings(max_examples=400)
@given(st.text(":.[]aZ09\u0661", max_size=12))
def test_a_host_taken_at_once_is_what_stripping_step_by_step_gives(host: str) -> None:
    assert normalize_host(host) == _stripped(host)


@given(st.text(st.characters(codec="ascii"), max_size=20))
def test_normalize_host_is_idempotent(host: str) -> None:
    once = normalize_host(host)
    assert normalize_host(once) == once


# A path is drawn as what it means (segments of canonical units) and rendered
# raw in one of many spellings; every spelling must normalize to the RFC 3986
# resolution of the meaning. This is what makes "the policy saw the same path
# the app routes" hold for encodings, dot segments and separators together.

_UNRESERVED = "abcXYZ019-._~"
# Escapes of characters that are not unreserved stay escaped (only their hex is upper-cased).
_KEPT_ESCAPES = ["%3B", "%20", "%C3", "%A9", "%25", "%3F", "%23", "%7C"]
_RAW_SUBDELIMS = "!$&'()*+,;=:@"


@st.composite
def _unit(draw: st.DrawFn) -> tuple[str, str]:
    """(canonical text, raw spelling) of one character of a segment."""
    kind = draw(st.sampled_from(["unreserved", "escape", "subdelim"]))
    if kind == "unreserved":
        char = draw(st.sampled_from(_UNRESERVED))
        escaped = f"%{ord(char):02x}"
        return char, draw(st.sampled_from([char, escaped, escaped.upper()]))
    if kind == "escape":
        escape = draw(st.sampled_from(_KEPT_ESCAPES))
        return escape, draw(st.sampled_from([escape, escape.lower()]))
    char = draw(st.sampled_from(_RAW_SUBDELIMS))
    return char, char


@st.composite
def _segment(draw: st.DrawFn) -> tuple[str, str]:
    """(canonical, raw) of a segment: a name, or a dot segment in some spelling."""
    kind = draw(st.sampled_from(["name", "name", ".", ".."]))
    if kind != "name":
        dots = [draw(st.sampled_from([".", "%2e", "%2E"])) for _ in kind]
        return kind, "".join(dots)
    units = draw(st.lists(_unit(), min_size=1, max_size=5))
    canonical = "".join(c for c, _ in units)
    # Names that are dot segments, or dot segments with ';' params, are not names.
    if canonical.split(";")[0] in (".", ".."):
        return "x", "x"
    return canonical, "".join(r for _, r in units)


@st.composite
def _raw_path(draw: st.DrawFn) -> tuple[str, str, str]:
    """(raw target, expected normalized path, expected query)."""
    segments = draw(st.lists(_segment(), max_size=6))
    trailing = draw(st.booleans())
    canonical = "/" + "/".join(c for c, _ in segments) + ("/" if trailing and segments else "")
    raw = ""
    for _, spelling in segments:
        # The first separator must be '/': a target starting with '\\' is not origin-form.
        separators = ["/", "//", "/\\"] + (["\\", "///"] if raw else [])
        raw += draw(st.sampled_from(separators)) + spelling
    raw += "/" if trailing and segments else ""
    raw = raw or "/"
    query = draw(st.sampled_from(["", "a=1", "b=/../x", "%2F"]))
    raw += ("?" + query if query or draw(st.booleans()) else "") + draw(
        st.sampled_from(["", "#", "#frag/.."])
    )
    return raw, rfc3986_remove_dot_segments(canonical), query


def rfc3986_remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4, step by step as written there (the reference model)."""
    inp, out = path, ""
    while inp:
        if inp.startswith("../"):
            inp = inp[3:]
        elif inp.startswith("./"):
            inp = inp[2:]
        elif inp.startswith("/./"):
            inp = "/" + inp[3:]
        elif inp == "/.":
            inp = "/"
        elif inp.startswith("/../") or inp == "/..":
            inp = "/" + inp[4:] if inp != "/.." else "/"
            out = out[: max(out.rfind("/"), 0)]
        elif inp in (".", ".."):
            inp = ""
        else:
            end = inp.find("/", 1)
            segment = inp if end == -1 else inp[:end]
            out += segment
            inp = inp[len(segment) :]
    return out


@settings(max_examples=400)
@given(_raw_path())
def test_every_spelling_normalizes_to_the_rfc3986_resolution(case: tuple[str, str, str]) -> None:
    raw, expected, query = case
    assert normalize_target(raw) == (expected, query)


def test_the_reference_model_agrees_with_the_rfc_examples() -> None:
    # RFC 3986 5.2.4's own examples, so the model the property trusts is right.
    assert rfc3986_remove_dot_segments("/a/b/c/./../../g") == "/a/g"
    assert rfc3986_remove_dot_segments("mid/content=5/../6") == "mid/6"


@pytest.mark.parametrize(
    ("path", "routed"),
    [
        ("/a;x/b;y=1", "/a/b"),
        ("/secret;", "/secret"),
        ("/index.php;x", "/index.php"),
        ("/admin;x/users", "/admin/users"),
        ("/app/page;jsessionid=abc", "/app/page"),
        ("/;x/admin", "/admin"),  # the empty segment left is merged, as Tomcat does
        ("/admin/;x/users", "/admin/users"),
        ("/admin/;x", "/admin/"),
        ("/a;x/", "/a/"),
        ("/;x", "/"),
        ("/a;b;c/d", "/a/d"),
        ("/a%3Bx/b", "/a%3Bx/b"),  # an encoded ';' is data, not a separator
        ("/a/b", "/a/b"),
    ],
)
def test_without_parameters_is_the_path_servlet_containers_route(path: str, routed: str) -> None:
    assert without_parameters(normalize_target(path)[0]) == routed


@settings(max_examples=300)
@given(st.text(alphabet="/;.a=%3B", max_size=20).map(lambda text: "/" + text))
def test_a_path_without_parameters_is_normalized_and_has_no_separator(target: str) -> None:
    try:
        path, _ = normalize_target(target)
    except BadPath:
        return
    routed = without_parameters(path)
    assert ";" not in routed
    assert normalize_target(routed)[0] == routed
