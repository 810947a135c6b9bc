"""Every component's /metrics passes `promtool check metrics` and the contract: its
build info, the process_ and python_ series, no `*_created`, latency buckets from 100 µs.

The agent's and the CA's pages are checked in tests/e2e/test_audit_questions.py, as
Prometheus scrapes them in a running mesh; the control plane's and the injector's here,
from the real processes. A histogram resolves sub-millisecond durations: a fake clock
puts a 200 µs admission in a bucket of its own.
"""

from __future__ import annotations

import json
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

from injector.config import Limits
from injector.core import Settings
from injector.webhook import InjectorMetrics, make_app
from tests.apiserver import fake_api_server
from tests.control_process import NAMESPACES, control_plane, ready
from tests.prometheus import exposition_problems
from tests.webhook import running_webhook

ADMISSION = Path(__file__).resolve().parents[1] / "fixtures" / "admission"


async def test_the_control_planes_metrics_pass_promtool_and_the_contract(tmp_path: Path) -> None:
    async with fake_api_server(tmp_path / "api") as api:
        api.apply(NAMESPACES)
        async with control_plane(tmp_path, api) as control:
            await ready(control)
            status, page = await control.debug("/metrics")
    assert status == 200
    assert exposition_problems(page, "control") == []


def test_the_injectors_metrics_pass_promtool_and_the_contract(tmp_path: Path) -> None:
    with running_webhook(tmp_path) as webhook:
        webhook.review(json.loads((ADMISSION / "opted_out.json").read_text()))
        status, page, _ = webhook.request("GET", "/metrics")
    assert status == 200
    assert exposition_problems(page.decode(), "injector") == []


async def test_a_sub_millisecond_admission_lands_in_a_bucket_below_a_millisecond() -> None:
    readings = iter([10.0, 10.0002])  # the request's start and end: 200 µs
    metrics = InjectorMetrics()
    app = make_app(Settings(), Limits(), metrics, clock=lambda: next(readings))
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        answer = await client.post("/mutate", data=b"not json")
        assert answer.status == 400
    bucket = "outrider_injector_admission_duration_seconds_bucket"
    read = metrics.registry.get_sample_value
    assert read(bucket, {"le": "0.0001"}) == 0
    assert read(bucket, {"le": "0.00025"}) == 1
