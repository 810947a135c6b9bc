"""The CA follows gRPC's length prefixes as bytes arrive, however they are split."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from identity.grpcserving import Framing, MessageTooLarge

LIMIT = 100


def message(length: int) -> bytes:
    return b"\0" + struct.pack(">I", length) + bytes(length)


def feed_split(framing: Framing, data: bytes, cuts: list[int]) -> None:
    edges = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    for start, end in itertools.pairwise(edges):
        framing.feed(data[start:end])


@given(
    lengths=st.lists(st.integers(0, LIMIT), max_size=5),
    cuts=st.lists(st.integers(0, 10_000), max_size=20),
)
def test_messages_within_the_limit_pass_however_split(lengths: list[int], cuts: list[int]) -> None:
    feed_split(Framing(LIMIT), b"".join(message(n) for n in lengths), cuts)


@given(
    before=st.lists(st.integers(0, LIMIT), max_size=3),
    declared=st.integers(LIMIT + 1, 2**32 - 1),
    cuts=st.lists(st.integers(0, 10_000), max_size=20),
)
def test_a_prefix_over_the_limit_is_refused_as_soon_as_it_is_complete(
    before: list[int], declared: int, cuts: list[int]
) -> None:
    prefix = b"\0" + struct.pack(">I", declared)
    with pytest.raises(MessageTooLarge, match=f"message of {declared} bytes"):
        feed_split(Framing(LIMIT), b"".join(message(n) for n in before) + prefix, cuts)


def test_an_incomplete_prefix_waits_for_the_rest() -> None:
    framing = Framing(LIMIT)
    framing.feed(b"\0\0\0")
    with pytest.raises(MessageTooLarge):
        framing.feed(b"\1\0")  # 256 bytes
