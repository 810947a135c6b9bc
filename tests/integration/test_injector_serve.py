"""`outrider injector serve` as a real process on 127.0.0.1, over HTTPS.

Bounded requests get fast 4xx answers and the webhook keeps serving; a pod
that breaks the mutation is let through and counted; every answer is an
AdmissionReview the API server can use.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from injector.config import Limits
from injector.core import BadRequest, Settings
from injector.webhook import BodyBudget, InjectorMetrics, make_app
from tests.webhook import MAX_BODY, Webhook, running_webhook

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "admission"


@pytest.fixture(scope="module")
def webhook(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Webhook]:
    with running_webhook(tmp_path_factory.mktemp("injector")) as running:
        yield running


def recorded(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def assert_still_serving(webhook: Webhook) -> None:
    assert webhook.request("GET", "/healthz")[:2] == (200, b"ok\n")
    response = webhook.review(recorded("deployment_pod"))
    assert response["allowed"] is True and "patch" in response


def test_a_pod_is_injected_over_https(webhook: Webhook) -> None:
    body = recorded("deployment_pod")
    response = webhook.review(body)
    assert response["uid"] == body["request"]["uid"]
    assert response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    assert patch[0]["path"] == "/spec/initContainers"
    assert webhook.metric(
        "outrider_injector_admissions_total", result="injected", reason="injected"
    )


def test_a_skipped_pod_gets_a_warning_an_audit_annotation_and_a_log_line(webhook: Webhook) -> None:
    response = webhook.review(recorded("host_network"))
    assert response["allowed"] is True and "patch" not in response
    assert response["auditAnnotations"] == {"injection": "host_network"}
    assert response["warnings"][0].startswith("outrider: not injected: hostNetwork")
    assert webhook.metric(
        "outrider_injector_admissions_total", result="skipped", reason="host_network"
    )
    assert eventually(
        lambda: any("monitoring/node-exporter-*: not injected" in x for x in webhook.log)
    )


def test_a_10_mb_body_gets_a_fast_413_and_the_webhook_keeps_serving(webhook: Webhook) -> None:
    before = webhook.metric(
        "outrider_injector_admissions_total", result="bad_request", reason="too_large"
    )
    status, body, seconds = webhook.request("POST", "/mutate", b"{" + b" " * 10_000_000 + b"}")
    print(f"\n10 MB AdmissionReview: HTTP {status} in {seconds * 1000:.1f} ms")
    assert status == 413
    assert body == f"the body exceeds {MAX_BODY} bytes\n".encode()
    assert seconds < 1.0
    assert_still_serving(webhook)
    after = webhook.metric(
        "outrider_injector_admissions_total", result="bad_request", reason="too_large"
    )
    assert after == before + 1


def test_a_body_without_length_is_refused_while_it_is_still_arriving(webhook: Webhook) -> None:
    # Chunked, over the limit, and never finished: only a server that counts while
    # reading can answer before the end of the body.
    with webhook.connect() as tls:
        tls.sendall(
            b"POST /mutate HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b" " * 65536
        started = time.perf_counter()
        for _ in range(MAX_BODY // len(chunk) + 2):
            tls.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        answer = tls.recv(4096)
        seconds = time.perf_counter() - started
    assert answer.startswith(b"HTTP/1.1 413"), answer[:100]
    assert seconds < 1.0
    assert_still_serving(webhook)


def test_10000_deep_json_gets_a_fast_400_and_the_webhook_keeps_serving(webhook: Webhook) -> None:
    deep = b'{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":'
    deep += b"[" * 10_000 + b"]" * 10_000 + b"}"
    status, body, seconds = webhook.request("POST", "/mutate", deep)
    print(f"\n10 000-deep JSON: HTTP {status} in {seconds * 1000:.1f} ms")
    assert (status, body) == (400, b"JSON nested more than 64 levels deep\n")
    assert seconds < 1.0
    assert_still_serving(webhook)
    assert webhook.metric(
        "outrider_injector_admissions_total", result="bad_request", reason="too_deep"
    )
    assert not any("RecursionError" in line for line in webhook.log)


@pytest.mark.parametrize("body", [b"", b"{not json", b'{"kind":"AdmissionReview"}'])
def test_what_is_not_an_admission_review_gets_a_400(webhook: Webhook, body: bytes) -> None:
    status, answer, _ = webhook.request("POST", "/mutate", body)
    assert status == 400
    assert answer.endswith(b"\n") and answer.count(b"\n") == 1


def test_a_pod_that_breaks_the_mutation_is_allowed_unchanged_and_counted(webhook: Webhook) -> None:
    body = recorded("deployment_pod")
    body["request"]["object"]["spec"]["containers"] = "not a list"
    before = webhook.metric("outrider_injector_admissions_total", result="error", reason="error")
    response = webhook.review(body)
    assert response == {
        "uid": body["request"]["uid"],
        "allowed": True,
        "warnings": ["outrider: not injected: internal error in the injector"],
        "auditAnnotations": {"injection": "error"},
    }
    after = webhook.metric("outrider_injector_admissions_total", result="error", reason="error")
    assert after == before + 1
    assert eventually(lambda: any("cannot inject shop/web-7d9c6b5f8-*" in x for x in webhook.log))
    assert not any("not a list" in line for line in webhook.log)  # the object is never logged
    assert_still_serving(webhook)


def test_metrics_have_the_admission_duration(webhook: Webhook) -> None:
    webhook.review(recorded("opted_out"))
    assert webhook.metric("outrider_injector_admission_duration_seconds_count") >= 1
    status, _, _ = webhook.request("GET", "/nowhere")
    assert status == 404


def test_a_sender_that_never_finishes_its_body_does_not_delay_shutdown(tmp_path: Path) -> None:
    with running_webhook(tmp_path) as webhook, webhook.connect() as tls:
        tls.sendall(b"POST /mutate HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n")
        tls.sendall(b" " * 1_000_000)
        assert tls.recv(4096).startswith(b"HTTP/1.1 413")
        # The rest of the body never comes; the server must not wait for it.
        webhook.process.send_signal(signal.SIGTERM)
        started = time.perf_counter()
        assert webhook.process.wait(timeout=10) == 0
        assert time.perf_counter() - started < 3.0


def eventually(check: Any, seconds: float = 2.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return bool(check())


async def test_a_body_that_trickles_in_is_cut_off_with_408(watchdog: None) -> None:
    metrics = InjectorMetrics()
    app = make_app(Settings(), Limits(), metrics, body_timeout=0.3)
    async with TestServer(app, host="127.0.0.1") as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"POST /mutate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        started = time.perf_counter()
        answer = await asyncio.wait_for(reader.read(4096), timeout=5)
        seconds = time.perf_counter() - started
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408")
    assert answer.endswith(b"the body took more than 0.3 s\n")
    assert 0.3 <= seconds < 2.0
    sample = metrics.registry.get_sample_value(
        "outrider_injector_admissions_total", {"result": "bad_request", "reason": "slow_body"}
    )
    assert sample == 1


class Transport:
    """What BodyBudget does to a review's connection: abort it, or not."""

    aborted = False

    def abort(self) -> None:
        self.aborted = True


def test_bodies_arriving_for_a_second_are_cut_to_make_room_else_busy() -> None:
    """Bodies are bounded together. A review whose bytes are not free cuts bodies that
    have been arriving for READ_GRACE (the API server sends its at once), oldest first,
    and is refused 503 `busy` if that is not enough; one being answered is never cut."""
    now = [0.0]
    budget = BodyBudget(100, clock=lambda: now[0])
    slow, parsed = Transport(), Transport()
    with budget.held(60, slow):  # type: ignore[arg-type]
        now[0] = 0.5
        with pytest.raises(BadRequest) as refused, budget.held(60):
            pass
        assert (refused.value.status, refused.value.reason) == (503, "busy")
        now[0] = 1.5
        with budget.held(60) as hold:  # the slow one is cut for it
            assert slow.aborted
            hold.reading = False  # read: now answered, never cut
            now[0] = 3.0
            with pytest.raises(BadRequest), budget.held(60, parsed):  # type: ignore[arg-type]
                pass
            with budget.held(40):
                pass
    with budget.held(100):  # every byte given back, the cut one's once
        pass


def test_sighup_does_not_stop_the_injector(webhook: Webhook) -> None:
    """A stopped injector under `failurePolicy: Ignore` admits pods without the agent."""
    webhook.process.send_signal(signal.SIGHUP)
    assert_still_serving(webhook)
    assert webhook.process.poll() is None


def test_the_capture_disabled_webhook_path_injects_without_capture(webhook: Webhook) -> None:
    def names(path: str) -> list[str]:
        status, answer, _ = webhook.request("POST", path, json.dumps(recorded("probes")).encode())
        assert status == 200, answer
        patch = json.loads(base64.b64decode(json.loads(answer)["response"]["patch"]))
        [containers] = [op["value"] for op in patch if op["path"] == "/spec/initContainers"]
        return [c["name"] for c in containers] + [
            op["path"] for op in patch if "Probe" in op["path"]
        ]

    assert names("/mutate") == [
        "outrider-capture",
        "outrider-agent",
        "/spec/containers/0/livenessProbe",
        "/spec/containers/0/readinessProbe",
        "/spec/containers/0/startupProbe",
    ]
    assert names("/mutate/capture-disabled") == ["outrider-agent"]


def test_a_query_is_a_counted_400(webhook: Webhook) -> None:
    body = json.dumps(recorded("probes")).encode()
    status, answer, _ = webhook.request("POST", "/mutate?capture=disabled", body)
    assert (status, answer) == (
        400,
        b"/mutate takes no query: a namespace labelled outrider.io/capture=disabled "
        b"is sent to /mutate/capture-disabled\n",
    )
    assert webhook.metric(
        "outrider_injector_admissions_total", result="bad_request", reason="bad_query"
    )
    assert_still_serving(webhook)


def test_refusals_are_counted_each_and_said_once_a_while(webhook: Webhook) -> None:
    """Any caller causes a refusal, as fast as it can ask: a line for each would let it
    fill the log (and, with stderr stalled, the pipe)."""
    body = json.dumps(recorded("probes")).encode()
    admissions = "outrider_injector_admissions_total"

    def said() -> int:
        return sum("refused a request" in line and "query" in line for line in webhook.log)

    lines, counted = said(), webhook.metric(admissions, result="bad_request", reason="bad_query")
    for _ in range(20):
        assert webhook.request("POST", "/mutate?flood=1", body)[0] == 400
    assert webhook.metric(admissions, result="bad_request", reason="bad_query") == counted + 20
    assert said() - lines <= 1
