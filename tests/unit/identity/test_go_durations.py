"""Durations are written as in Go (and kubectl, Envoy, Istio): `1h30m`, `1.5s`, `500ms`.

One parser (identity.configfile.parse_duration) reads every config key, the `ca mint
--ttl` flag and, for the shape Gateway API allows, route timeouts.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from control.core.routes import duration as gateway_duration
from identity.configfile import ConfigReader, parse_duration


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", timedelta(seconds=90)),
        ("5m", timedelta(minutes=5)),
        ("2d", timedelta(days=2)),  # not Go's, but configs have always taken it
        ("250ms", timedelta(milliseconds=250)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("1.5s", timedelta(seconds=1, milliseconds=500)),
        ("2h45m10.5s", timedelta(hours=2, minutes=45, seconds=10, milliseconds=500)),
        (".5m", timedelta(seconds=30)),
        ("1.s", timedelta(seconds=1)),
        ("300us", timedelta(microseconds=300)),
        ("300µs", timedelta(microseconds=300)),
        ("1000ns", timedelta(microseconds=1)),
        ("0", timedelta(0)),
        (" 10s ", timedelta(seconds=10)),
        ("0.1s", timedelta(milliseconds=100)),  # exact: not 0.1 as a float times a million
    ],
)
def test_go_durations_parse_exactly(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "text", ["10", "-1h", "+1h", "1 hour", "", "h", "1.5", "1y", "1h 30m", "1..5s", "\u0661s", True]
)
def test_what_is_not_a_duration_is_refused_with_examples(text: object) -> None:
    with pytest.raises(ValueError, match=r"is not a duration like 90s, 1h30m, 1.5s, 500ms or 2d"):
        parse_duration(text)


@pytest.mark.parametrize("text", ["1ns", "0.5ns", "0.0000000001s", "0." + "0" * 5000 + "1s"])
def test_a_duration_shorter_than_a_microsecond_is_refused_not_rounded_to_zero(text: str) -> None:
    with pytest.raises(ValueError, match="is shorter than a microsecond"):
        parse_duration(text)
    assert parse_duration("0.000s") == parse_duration("0ns") == timedelta(0)


@given(
    st.lists(
        st.tuples(st.integers(0, 10_000), st.sampled_from(["h", "m", "s", "ms", "us", "d"])),
        min_size=1,
        max_size=4,
    )
)
def test_a_sum_of_parts_is_the_sum_of_their_durations(parts: list[tuple[int, str]]) -> None:
    one = {"h": 3600e6, "m": 60e6, "s": 1e6, "ms": 1e3, "us": 1, "d": 86400e6}
    text = "".join(f"{n}{unit}" for n, unit in parts)
    expected = sum(int(n * one[unit]) for n, unit in parts)
    assert parse_duration(text) == timedelta(microseconds=expected)


def test_a_config_key_takes_go_durations(tmp_path: Path) -> None:
    reader = ConfigReader(tmp_path)
    raw = {"ttl": "1h30m", "timeout": "1.5s"}
    assert reader.duration(raw, "ttl", "identity.ttl", timedelta(0)) == timedelta(minutes=90)
    assert reader.duration(raw, "timeout", "ca.timeout", timedelta(0)) == timedelta(seconds=1.5)
    assert reader.errors == []


@pytest.mark.parametrize(
    ("text", "ms"),
    [("1h", 3_600_000), ("1m30s", 90_000), ("500ms", 500), ("1h1m1s1ms", 3_661_001)],
)
def test_route_timeouts_read_gateway_durations_with_the_one_parser(text: str, ms: int) -> None:
    assert gateway_duration(text) == ms


@pytest.mark.parametrize("text", ["1.5s", "2d", "123456s", "1h1m1s1ms1s", "", "0"])
def test_route_timeouts_keep_to_the_shape_gateway_api_allows(text: str) -> None:
    """GEP-2257: whole numbers of at most 5 digits, h/m/s/ms, at most four parts."""
    assert gateway_duration(text) is None


@pytest.mark.parametrize(
    "text", ["2562048h", "99999999999999h", "9" * 40 + "s", "9" * 5000 + "ns", "106752d1s"]
)
def test_a_duration_longer_than_go_allows_is_refused_not_an_overflow(text: str) -> None:
    # Go refuses more than 2562047h47m16.854775807s (int64 nanoseconds); Python's
    # timedelta or datetime arithmetic would raise OverflowError, which no caller expects.
    with pytest.raises(ValueError, match=r"is longer than 2562047h \(about 292 years\)"):
        parse_duration(text)
    reader = ConfigReader(Path("."))
    assert reader.duration({"ttl": text}, "ttl", "identity.ttl", timedelta(0)) == timedelta(0)
    assert reader.errors and reader.errors[0].startswith("identity.ttl: ")


def test_the_longest_go_duration_is_read() -> None:
    assert parse_duration("2562047h") == timedelta(hours=2562047)
