"""What a caller can make `outrider injector serve` hold is bounded, and reviews go on.

A failing webhook under `failurePolicy: Ignore` admits pods without the agent,
so a flood of connections must not stop AdmissionReviews. Small limits in
injector.yaml keep each test to a second or so.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import floods
from tests.webhook import Webhook, running_webhook

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "admission"
CLOSED = "outrider_injector_connections_closed_total"
TIGHT = {"max_connections": 20, "handshake_timeout": "500ms", "idle_timeout": "500ms"}


@pytest.fixture(scope="module")
def webhook(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Webhook]:
    with running_webhook(tmp_path_factory.mktemp("injector"), TIGHT, fd_limit=256) as running:
        yield running


def review() -> dict[str, Any]:
    return json.loads((FIXTURES / "deployment_pod.json").read_text())  # type: ignore[no-any-return]


def test_connections_that_send_nothing_are_closed_and_counted(webhook: Webhook) -> None:
    idle = webhook.metric(CLOSED, reason="idle_timeout")
    slow = webhook.metric(CLOSED, reason="handshake_timeout")
    with (
        floods.idle_connections(webhook.port, 5, tls=floods.client_context()) as handshaken,
        floods.idle_connections(webhook.port, 5) as plain,
    ):
        assert handshaken.closed_by_peer(within=5) == 5
        assert plain.closed_by_peer(within=5) == 5
    assert webhook.metric(CLOSED, reason="idle_timeout") >= idle + 5
    assert webhook.metric(CLOSED, reason="handshake_timeout") >= slow + 5


def test_over_the_cap_connections_are_closed_at_once_and_reviews_go_on(webhook: Webhook) -> None:
    before = webhook.metric(CLOSED, reason="max_connections")
    with floods.idle_connections(webhook.port, 30) as flood:
        assert flood.closed_by_peer(within=0.3) == 10
        assert flood.closed_by_peer(within=5) == 30  # the rest, at the handshake timeout
        assert webhook.review(review())["allowed"] is True
    assert webhook.metric(CLOSED, reason="max_connections") == before + 10


def test_the_open_file_limit_is_raised_to_the_hard_limit(webhook: Webhook) -> None:
    limits = Path(f"/proc/{webhook.process.pid}/limits").read_text()
    soft, hard = next(line for line in limits.splitlines() if "open files" in line).split()[3:5]
    assert soft == hard
    assert any(f"open-file limit: {hard}" in line for line in webhook.log)


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Webhook]:
    """A cap of 20 and an idle timeout far longer than a test: only the cap protects."""
    limits = {"max_connections": 20, "idle_timeout": "30s"}
    with running_webhook(tmp_path_factory.mktemp("injector"), limits) as running:
        yield running


HEAD = b"POST /mutate HTTP/1.1\r\nHost: injector\r\nContent-Length: 1000\r\n"


@pytest.mark.parametrize("first", [b"", HEAD + b"\r\n"], ids=["head", "body"])
def test_a_request_trickled_a_byte_at_a_time_does_not_lock_reviews_out(
    capped: Webhook, first: bytes
) -> None:
    """A slowloris at the cap, on the request's head or on its body: a byte every
    0.3 s is not progress, so a trickling connection makes
    room and the review goes through."""
    context = floods.client_context()
    with floods.trickling_connections(
        capped.port, 20, HEAD + b"a" * 100, every=0.3, tls=context, first=first
    ):
        assert capped.review(review())["allowed"] is True


def test_bodies_sent_all_but_a_byte_hold_a_bounded_amount_of_memory(tmp_path: Path) -> None:
    """Twenty callers each sending all but a byte of a 3 MiB review (the default limit):
    the injector held 6 MiB for each, and forty took it past its pod's 256 Mi. Now
    only BODIES_AT_ONCE of them are read; the others are refused `busy` and closed."""
    size = 3 * 1024 * 1024
    head = f"POST /mutate HTTP/1.1\r\nHost: injector\r\nContent-Length: {size}\r\n\r\n"
    with running_webhook(tmp_path) as webhook:
        before = floods.rss_kib(webhook.process.pid)
        context = floods.client_context()
        with floods.unfinished_bodies(webhook.port, 20, head.encode(), size, tls=context):
            time.sleep(2)  # every sender has sent, or waits on the injector
            grown = floods.peak_rss_kib(webhook.process.pid) - before
        assert grown < 60 * 1024, f"{grown // 1024} MiB more held for 20 unfinished bodies"


def test_callers_holding_the_large_body_budget_lock_out_no_pod_review(tmp_path: Path) -> None:
    """Four callers declaring 3 MiB bodies hold every byte of the large-body budget; a
    pod's review is still answered, not refused `busy`, small or 43 KiB (which was refused
    3 of 3): under failurePolicy Ignore a refused review is a pod without its agent."""
    size = 3 * 1024 * 1024
    head = f"POST /mutate HTTP/1.1\r\nHost: injector\r\nContent-Length: {size}\r\n\r\n"
    large = review()  # a pod of `kubectl apply`: its last-applied-configuration, 40 KB
    annotations = large["request"]["object"]["metadata"].setdefault("annotations", {})
    annotations["kubectl.kubernetes.io/last-applied-configuration"] = "x" * 40_000
    with running_webhook(tmp_path) as webhook:
        context = floods.client_context()
        with floods.unfinished_bodies(webhook.port, 4, head.encode(), size, tls=context):
            time.sleep(1.2)  # every body is being read, for longer than READ_GRACE
            for _ in range(3):
                assert webhook.review(review())["allowed"] is True
            for _ in range(3):  # over 32 KiB: the held bodies are cut for it
                assert webhook.review(large)["allowed"] is True
