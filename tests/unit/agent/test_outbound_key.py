"""What ring_hash and maglev hash for an HTTP request: a header, a cookie, or the source."""

from __future__ import annotations

import pytest

from agent.adapters.outbound_http import _key

HEADERS = [
    (b"Host", b"backend"),
    (b"X-User", b"alice"),
    (b"Cookie", b"theme=dark; session=s3cr3t;lang=en"),
    (b"cookie", b"later=1"),
]


@pytest.mark.parametrize(
    ("hash_on", "expected"),
    [
        pytest.param(None, None, id="no-hashing"),
        pytest.param(("header", "x-user"), b"alice", id="header-any-case"),
        pytest.param(("header", "x-missing"), None, id="header-missing"),
        pytest.param(("cookie", "session"), b"s3cr3t", id="cookie"),
        pytest.param(("cookie", "lang"), b"en", id="cookie-without-space"),
        pytest.param(("cookie", "later"), b"1", id="second-cookie-header"),
        pytest.param(("cookie", "Session"), None, id="cookie-names-are-case-sensitive"),
        pytest.param(("cookie", "sess"), None, id="cookie-prefix-is-not-a-match"),
        pytest.param(("source", ""), b"10.1.2.3", id="source-address"),
    ],
)
def test_the_hash_key(hash_on: tuple[str, str] | None, expected: bytes | None) -> None:
    assert _key(hash_on, HEADERS, b"10.1.2.3") == expected
