"""ca.yaml: the `limits:` section, what a caller can hold before it is authenticated."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from ca.config import CaLimits, ConfigError, parse
from identity.grpcserving import GrpcLimits
from identity.serving import ConnectionLimits

BASE = Path("/etc/outrider")
MINIMAL = {
    "signer": {"dir": "ca"},
    "authn": {"kubernetes": {"issuer": "https://k8s", "jwks_file": "jwks.json"}},
}


def limits(raw: dict[str, Any]) -> CaLimits:
    return parse({**MINIMAL, "limits": raw}, base=BASE).limits


def test_the_defaults_bound_a_connection_and_a_message() -> None:
    assert parse(MINIMAL, base=BASE).limits == CaLimits(
        ConnectionLimits(1000, timedelta(seconds=10), timedelta(seconds=60)),
        GrpcLimits(max_message_bytes=16384, max_concurrent_streams=4),
    )


def test_every_key_is_read() -> None:
    raw = {
        "max_connections": 50,
        "handshake_timeout": "500ms",
        "idle_timeout": "2s",
        "max_message_bytes": 65536,
        "max_concurrent_streams": 1,
    }
    assert limits(raw) == CaLimits(
        ConnectionLimits(50, timedelta(milliseconds=500), timedelta(seconds=2)),
        GrpcLimits(65536, 1),
    )


def test_every_error_is_reported_with_its_key_path() -> None:
    raw = {
        "max_connections": 0,
        "handshake_timeout": "forever",
        "idle_timeout": "0s",
        "max_message_bytes": 1024,
        "max_concurrent_streams": "many",
        "max_streams": 2,
    }
    with pytest.raises(ConfigError) as error:
        limits(raw)
    assert sorted(e.split(":")[0] for e in error.value.errors) == [
        "limits.handshake_timeout",
        "limits.idle_timeout",
        "limits.max_concurrent_streams",
        "limits.max_connections",
        "limits.max_message_bytes",
        "limits.max_streams",
    ]
    assert "limits.max_message_bytes: must be an integer >= 4096" in error.value.errors
