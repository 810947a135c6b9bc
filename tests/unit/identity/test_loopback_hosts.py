"""Which hosts only this machine can reach: what a `--dev` CA and an agent snapshot's
plain-text listeners must bind to (identity.configfile.is_loopback, their one check)."""

from __future__ import annotations

import pytest

from identity.configfile import is_loopback


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.3.2.1", True),  # all of 127/8
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),  # every address, not loopback
        ("::", False),
        ("10.0.0.5", False),
        ("localhost.example.org", False),
        ("", False),
    ],
)
def test_only_loopback_addresses_and_localhost_are_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
