"""SPIFFE ID and trust domain parsing: one table row per rule, then properties."""

from __future__ import annotations

import re
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from identity.spiffe_id import MAX_ID_BYTES, InvalidSpiffeId, SpiffeId, TrustDomain

EXAMPLE = TrustDomain("example.org")

# ---------------------------------------------------------------------------
# Table tests
# ---------------------------------------------------------------------------

VALID_IDS = [
    pytest.param("spiffe://example.org", "example.org", "", id="trust-domain-only"),
    pytest.param("spiffe://example.org/a", "example.org", "/a", id="one-segment"),
    pytest.param(
        "spiffe://k8s-west.example.com/ns/staging/sa/default",
        "k8s-west.example.com",
        "/ns/staging/sa/default",
        id="workload",
    ),
    pytest.param("spiffe://td_1/A.b-C_9", "td_1", "/A.b-C_9", id="segment-charset"),
    pytest.param(
        "spiffe://x/.../..a/a..", "x", "/.../..a/a..", id="dots-that-are-not-dot-segments"
    ),
    pytest.param("spiffe://1.2.3.4/a", "1.2.3.4", "/a", id="ip-like-trust-domain"),
]


@pytest.mark.parametrize(("text", "trust_domain", "path"), VALID_IDS)
def test_parse_valid(text: str, trust_domain: str, path: str) -> None:
    spiffe_id = SpiffeId.parse(text)
    assert spiffe_id.trust_domain == TrustDomain(trust_domain)
    assert spiffe_id.path == path
    assert str(spiffe_id) == text


INVALID_IDS = [
    pytest.param("", "must not be empty", id="empty"),
    pytest.param("example.org/a", "must start with 'spiffe://'", id="no-scheme"),
    pytest.param("spiffe:example.org/a", "must start with 'spiffe://'", id="no-slashes"),
    pytest.param("https://example.org/a", "scheme 'https' is not 'spiffe'", id="wrong-scheme"),
    pytest.param("SPIFFE://example.org/a", "must be lowercase 'spiffe'", id="uppercase-scheme"),
    pytest.param("Spiffe://example.org", "must be lowercase 'spiffe'", id="mixed-case-scheme"),
    pytest.param("spiffe://", "trust domain must not be empty", id="no-trust-domain"),
    pytest.param("spiffe:///a", "trust domain must not be empty", id="empty-trust-domain"),
    pytest.param("spiffe://Ex.org/a", "trust domain 'Ex.org' must be lowercase", id="uppercase-td"),
    pytest.param("spiffe://example.org:443/a", "must not have a port", id="port"),
    pytest.param("spiffe://example.org:/a", "must not have a port", id="empty-port"),
    pytest.param("spiffe://user@example.org/a", "must not have userinfo", id="userinfo"),
    pytest.param(
        "spiffe://ex%41.org/a", "trust domain 'ex%41.org' must not use percent", id="td-pct"
    ),
    pytest.param("spiffe://ex!.org", "contains '!'", id="td-bad-char"),
    pytest.param("spiffe://exämple.org", "contains 'ä'", id="td-non-ascii"),
    pytest.param("spiffe://example.org/", "must not have a trailing slash", id="slash-only"),
    pytest.param("spiffe://example.org/a/", "must not have a trailing slash", id="trailing-slash"),
    pytest.param("spiffe://example.org//a", "must not have an empty segment", id="empty-segment"),
    pytest.param("spiffe://example.org/a//b", "must not have an empty segment", id="inner-empty"),
    pytest.param("spiffe://example.org/.", "path segment '.' is not allowed", id="dot"),
    pytest.param("spiffe://example.org/a/../b", "path segment '..' is not allowed", id="dot-dot"),
    pytest.param("spiffe://example.org/a?x=1", "must not have a query", id="query"),
    pytest.param("spiffe://example.org?x", "must not have a query", id="query-on-td"),
    pytest.param("spiffe://example.org/a#f", "must not have a fragment", id="fragment"),
    pytest.param("spiffe://example.org/a%2Fb", "must not use percent-encoding", id="path-pct"),
    pytest.param("spiffe://example.org/a b", "path segment 'a b' contains ' '", id="space"),
    pytest.param("spiffe://example.org/a:b", "contains ':'", id="colon-in-path"),
    pytest.param("spiffe://example.org/é", "contains 'é'", id="path-non-ascii"),
    pytest.param(
        "spiffe://example.org/" + "a" * MAX_ID_BYTES, "the maximum is 2048", id="too-long"
    ),
    pytest.param("spiffe://" + "a" * 256, "the maximum is 255", id="trust-domain-too-long"),
]


@pytest.mark.parametrize(("text", "message"), INVALID_IDS)
def test_parse_invalid_names_the_problem(text: str, message: str) -> None:
    with pytest.raises(InvalidSpiffeId, match=_literal(message)):
        SpiffeId.parse(text)


def test_length_limit_is_inclusive() -> None:
    prefix = "spiffe://example.org/"
    at_limit = prefix + "a" * (MAX_ID_BYTES - len(prefix))
    assert len(at_limit) == MAX_ID_BYTES
    assert str(SpiffeId.parse(at_limit)) == at_limit
    with pytest.raises(InvalidSpiffeId, match="2049 bytes"):
        SpiffeId.parse(at_limit + "a")


def test_length_limit_applies_to_constructed_ids() -> None:
    with pytest.raises(InvalidSpiffeId, match="the maximum is 2048"):
        SpiffeId.from_segments(EXAMPLE, *(["abcdefghi"] * 250))


def test_invalid_spiffe_id_is_a_value_error() -> None:
    assert issubclass(InvalidSpiffeId, ValueError)


# ---------------------------------------------------------------------------
# TrustDomain
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text", ["example.org", "spiffe://example.org"], ids=["bare", "as-spiffe-id"]
)
def test_trust_domain_parse(text: str) -> None:
    assert TrustDomain.parse(text) == EXAMPLE


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("", "trust domain must not be empty", id="empty"),
        pytest.param("Example.org", "must be lowercase", id="uppercase"),
        pytest.param("example.org:8443", "must not have a port", id="port"),
        pytest.param("me@example.org", "must not have userinfo", id="userinfo"),
        pytest.param("ex%2eorg", "must not use percent-encoding", id="percent"),
        pytest.param("example.org/a", "must not have a path", id="bare-with-path"),
        pytest.param("spiffe://example.org/a", "must not have a path", id="id-with-path"),
        pytest.param("spiffe://example.org/", "must not have a path", id="id-with-slash"),
        pytest.param("https://example.org", "scheme 'https' is not 'spiffe'", id="wrong-scheme"),
        pytest.param("spiffe://example.org?x", "must not have a query", id="query"),
        pytest.param("exa mple.org", "contains ' '", id="space"),
    ],
)
def test_trust_domain_invalid(text: str, message: str) -> None:
    with pytest.raises(InvalidSpiffeId, match=_literal(message)):
        TrustDomain.parse(text)


def test_trust_domain_basics() -> None:
    assert str(EXAMPLE) == "example.org"
    assert EXAMPLE.id == SpiffeId.parse("spiffe://example.org")
    assert str(EXAMPLE.id) == "spiffe://example.org"
    assert {TrustDomain("a.org"), TrustDomain("a.org")} == {TrustDomain("a.org")}


def test_trust_domain_rejects_non_string() -> None:
    with pytest.raises(TypeError):
        TrustDomain(b"example.org")  # type: ignore[arg-type]


def test_trust_domain_is_frozen() -> None:
    with pytest.raises(AttributeError):
        EXAMPLE.name = "other.org"  # type: ignore[misc]


# ---------------------------------------------------------------------------
# SpiffeId construction and accessors
# ---------------------------------------------------------------------------


def test_from_segments() -> None:
    spiffe_id = SpiffeId.from_segments(EXAMPLE, "payments", "web-fe")
    assert str(spiffe_id) == "spiffe://example.org/payments/web-fe"
    assert spiffe_id.segments == ("payments", "web-fe")
    assert SpiffeId.from_segments(EXAMPLE) == EXAMPLE.id


@pytest.mark.parametrize(
    ("segment", "message"),
    [
        pytest.param("a/b", "path segment 'a/b' must not contain '/'", id="slash"),
        pytest.param("", "path segment must not be empty", id="empty"),
        pytest.param(".", "path segment '.' is not allowed", id="dot"),
        pytest.param("..", "path segment '..' is not allowed", id="dot-dot"),
        pytest.param("a%20b", "must not use percent-encoding", id="percent"),
        pytest.param("a?b", "contains '?'", id="question-mark"),
    ],
)
def test_from_segments_rejects(segment: str, message: str) -> None:
    with pytest.raises(InvalidSpiffeId, match=_literal(message)):
        SpiffeId.from_segments(EXAMPLE, "ok", segment)


def test_for_workload() -> None:
    spiffe_id = SpiffeId.for_workload(EXAMPLE, "payments", "api")
    assert str(spiffe_id) == "spiffe://example.org/ns/payments/sa/api"
    assert spiffe_id.segments == ("ns", "payments", "sa", "api")


def test_for_workload_cannot_smuggle_path_levels() -> None:
    with pytest.raises(InvalidSpiffeId, match="must not contain '/'"):
        SpiffeId.for_workload(EXAMPLE, "payments/sa/admin", "x")


@pytest.mark.parametrize(
    ("path", "message"),
    [
        pytest.param("a", "must start with '/'", id="relative"),
        pytest.param("/a/", "trailing slash", id="trailing-slash"),
        pytest.param("/a/./b", "'.' is not allowed", id="dot"),
    ],
)
def test_constructor_validates_path(path: str, message: str) -> None:
    with pytest.raises(InvalidSpiffeId, match=_literal(message)):
        SpiffeId(EXAMPLE, path)


def test_constructor_rejects_wrong_types() -> None:
    with pytest.raises(TypeError):
        SpiffeId("example.org", "/a")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        SpiffeId(EXAMPLE, None)  # type: ignore[arg-type]


def test_segments_of_trust_domain_id_is_empty() -> None:
    assert EXAMPLE.id.segments == ()


def test_member_of() -> None:
    spiffe_id = SpiffeId.parse("spiffe://example.org/a")
    assert spiffe_id.member_of(EXAMPLE)
    assert not spiffe_id.member_of(TrustDomain("example.com"))
    assert not SpiffeId.parse("spiffe://example.org.evil/a").member_of(EXAMPLE)


def test_equality_and_hash() -> None:
    a = SpiffeId.parse("spiffe://example.org/a")
    assert a == SpiffeId.from_segments(EXAMPLE, "a")
    assert hash(a) == hash(SpiffeId(EXAMPLE, "/a"))
    assert a != SpiffeId.parse("spiffe://example.org/A")


# ---------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------

TD_ALPHABET = string.ascii_lowercase + string.digits + ".-_"
SEGMENT_ALPHABET = string.ascii_letters + string.digits + ".-_"

trust_domains = st.text(TD_ALPHABET, min_size=1, max_size=40)
segments = st.text(SEGMENT_ALPHABET, min_size=1, max_size=20).filter(lambda s: s not in (".", ".."))
segment_lists = st.lists(segments, max_size=8)


@st.composite
def spiffe_ids(draw: st.DrawFn) -> SpiffeId:
    return SpiffeId.from_segments(TrustDomain(draw(trust_domains)), *draw(segment_lists))


@given(trust_domains, segment_lists)
def test_format_then_parse_round_trips(trust_domain: str, parts: list[str]) -> None:
    text = "spiffe://" + trust_domain + "".join("/" + part for part in parts)
    spiffe_id = SpiffeId.parse(text)
    assert str(spiffe_id) == text
    assert spiffe_id.trust_domain.name == trust_domain
    assert spiffe_id.segments == tuple(parts)


@given(spiffe_ids())
def test_parse_of_str_is_identity(spiffe_id: SpiffeId) -> None:
    assert SpiffeId.parse(str(spiffe_id)) == spiffe_id
    assert SpiffeId.from_segments(spiffe_id.trust_domain, *spiffe_id.segments) == spiffe_id
    assert TrustDomain.parse(str(spiffe_id.trust_domain.id)) == spiffe_id.trust_domain


def _uppercase_trust_domain(draw: st.DrawFn, td: str, path: str) -> str:
    upper = draw(st.sampled_from(string.ascii_uppercase))
    return f"spiffe://{td}{upper}{path}"


def _bad_char(draw: st.DrawFn, td: str, path: str) -> str:
    # Any character outside both alphabets, inserted in the trust domain or the path.
    bad = draw(st.characters(exclude_characters=SEGMENT_ALPHABET + "/?#", min_codepoint=1))
    if draw(st.booleans()):
        return f"spiffe://{td}{bad}{path}"
    return f"spiffe://{td}{path}/a{bad}b"


def _bad_segment(draw: st.DrawFn, td: str, path: str) -> str:
    segment = draw(st.sampled_from(["", ".", ".."]))
    return f"spiffe://{td}{path}/{segment}/end"


def _trailing_slash(draw: st.DrawFn, td: str, path: str) -> str:
    return f"spiffe://{td}{path}/"


def _query(draw: st.DrawFn, td: str, path: str) -> str:
    return f"spiffe://{td}{path}?{draw(st.text(SEGMENT_ALPHABET, max_size=5))}"


def _fragment(draw: st.DrawFn, td: str, path: str) -> str:
    return f"spiffe://{td}{path}#{draw(st.text(SEGMENT_ALPHABET, max_size=5))}"


def _percent(draw: st.DrawFn, td: str, path: str) -> str:
    encoded = draw(st.sampled_from(["%2F", "%41", "%2e", "%"]))
    if draw(st.booleans()):
        return f"spiffe://{td}{encoded}{path}"
    return f"spiffe://{td}{path}/a{encoded}"


def _port(draw: st.DrawFn, td: str, path: str) -> str:
    return f"spiffe://{td}:{draw(st.integers(0, 65535))}{path}"


def _userinfo(draw: st.DrawFn, td: str, path: str) -> str:
    user = draw(st.text(TD_ALPHABET, max_size=8))
    return f"spiffe://{user}@{td}{path}"


def _too_long(draw: st.DrawFn, td: str, path: str) -> str:
    text = f"spiffe://{td}{path}"
    padding = MAX_ID_BYTES - len(text)  # one past the limit, counting the "/"
    return text + "/" + "a" * padding + draw(st.text("abc", max_size=10))


def _wrong_scheme(draw: st.DrawFn, td: str, path: str) -> str:
    scheme = draw(
        st.sampled_from(["SPIFFE://", "Spiffe://", "spiffe:/", "spiffe:", "https://", "", "//"])
    )
    return f"{scheme}{td}{path}"


VIOLATIONS = [
    _uppercase_trust_domain,
    _bad_char,
    _bad_segment,
    _trailing_slash,
    _query,
    _fragment,
    _percent,
    _port,
    _userinfo,
    _too_long,
    _wrong_scheme,
]


@st.composite
def invalid_ids(draw: st.DrawFn) -> str:
    td = draw(trust_domains)
    path = "".join("/" + part for part in draw(segment_lists))
    violation = draw(st.sampled_from(VIOLATIONS))
    return violation(draw, td, path)


@given(invalid_ids())
def test_injected_violation_is_always_rejected(text: str) -> None:
    with pytest.raises(InvalidSpiffeId):
        SpiffeId.parse(text)


@given(st.text(max_size=60))
def test_arbitrary_text_parses_or_raises_invalid_spiffe_id(text: str) -> None:
    try:
        spiffe_id = SpiffeId.parse(text)
    except InvalidSpiffeId:
        return
    assert str(spiffe_id) == text


def _literal(message: str) -> str:
    """pytest.raises(match=...) takes a regex; these messages are literal text."""
    return re.escape(message)


def test_lone_surrogate_is_rejected_not_crashed() -> None:
    with pytest.raises(InvalidSpiffeId, match="contains"):
        SpiffeId.parse("spiffe://example.org/a\ud800")
