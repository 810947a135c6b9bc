"""`workers:`: what "auto" counts, what the config takes, how the workers' metrics add up."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.adapters.workers import (
    MAX_RESTARTS,
    Merged,
    Restarts,
    families,
    from_main,
    merge,
    to_worker,
)
from agent.app import Settings, _cpu_max
from agent.config import MAX_WORKERS, parse
from agent.core.health import HealthSettings, OutlierDetection
from agent.core.policy import PolicySet, Request
from agent.core.policyfile import parse_policies
from agent.core.resilience import BreakerLimits, RetryPolicy
from agent.core.workers import cpu_quota, usable_cpus
from tests.unit.agent.test_config import BASE, errors_of, full, minimal
from tests.unit.agent.test_policy_parse import EVERY_KEY


@pytest.mark.parametrize(
    ("cpu_max", "quota"),
    [
        ("200000 100000\n", 2),  # a Kubernetes limit of 2
        ("150000 100000", 1),  # 1500m: a second worker would have half a CPU's time
        ("50000 100000", 1),  # 500m
        ("max 100000\n", None),  # no limit
        (None, None),  # cgroup v1, or no cgroup file
        ("", None),
        ("garbage", None),
        ("0 100000", None),
    ],
)
def test_the_cgroup_quota_in_whole_cpus(cpu_max: str | None, quota: int | None) -> None:
    assert cpu_quota(cpu_max) == quota


def test_auto_is_the_smaller_of_the_affinity_mask_and_the_quota() -> None:
    assert usable_cpus(8, "200000 100000") == 2
    assert usable_cpus(2, "800000 100000") == 2
    assert usable_cpus(4, "max 100000") == 4
    assert usable_cpus(3, None) == 3


def test_the_quota_is_read_from_cgroup_v2_or_v1(tmp_path: Path) -> None:
    assert _cpu_max(tmp_path) is None  # neither mounted: the affinity mask alone
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_quota(_cpu_max(tmp_path)) is None
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    assert cpu_quota(_cpu_max(tmp_path)) == 3
    (tmp_path / "cpu.max").write_text("200000 100000\n")  # v2 first
    assert cpu_quota(_cpu_max(tmp_path)) == 2


def test_workers_default_to_one_and_take_a_count_or_auto() -> None:
    assert parse(minimal(), base=BASE).workers == 1
    assert parse({**minimal(), "workers": 4}, base=BASE).workers == 4
    assert parse({**minimal(), "workers": "auto"}, base=BASE).workers == "auto"


@pytest.mark.parametrize("value", [0, -1, MAX_WORKERS + 1, "two", True, 1.5])
def test_a_bad_worker_count_says_what_it_takes(value: Any) -> None:
    assert errors_of({**minimal(), "workers": value}) == [
        f'workers: must be "auto" or an integer from 1 to {MAX_WORKERS}'
    ]


def _process(connections: float, listeners: int, rotations: float) -> CollectorRegistry:
    registry = CollectorRegistry()
    counter = Counter("outrider_connections", "", ["direction"], registry=registry)
    counter.labels("inbound").inc(connections)
    info = Gauge("outrider_listener_info", "", ["port"], registry=registry)
    if listeners:
        info.labels("8443").set(1)
    Counter("outrider_svid_rotations", "", ["result"], registry=registry).labels("success").inc(
        rotations
    )
    return registry


def test_metrics_add_the_workers_up_and_keep_the_main_process_identity_series() -> None:
    main = _process(0, 0, 3)  # the main process renews; it serves no connection
    workers = [_process(5, 1, 7), _process(2, 1, 7)]  # each counts its installs
    text = generate_latest(
        Merged(merge(families(main), [families(w) for w in workers]))  # type: ignore[arg-type]
    ).decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("outrider_connections_total", (("direction", "inbound"),))] == 7
    assert samples[("outrider_listener_info", (("port", "8443"),))] == 1  # not 2
    assert samples[("outrider_svid_rotations_total", (("result", "success"),))] == 3
    assert text.count("# TYPE outrider_connections_total counter") == 1


def test_the_settings_reach_a_worker_as_the_main_process_checked_them() -> None:
    """A worker gets the config and policies as checked values (pickled, agent/adapters/
    workers.py), the compiled hot path's frozen classes among them: mypyc's refuse
    pickle's default way back in (their `__setattr__`), so they must still arrive whole."""
    policies = PolicySet(parse_policies(EVERY_KEY, "p.yaml"), default_action="deny")
    policies.decide(Request(None, 8080, "GET", "/api/x"), frozenset())  # a memo to carry
    settings = Settings(parse(full(), base=BASE), policies)
    resilience = (RetryPolicy(), BreakerLimits(), OutlierDetection(), HealthSettings())
    message = ("settings", 7, settings, *resilience)
    assert from_main(to_worker(message)) == message


def test_restarts_the_supervisor_made_itself_never_end_the_agent() -> None:
    """Workers killed for not answering (a node stalled: all of them at once) come back;
    only workers that die on their own, past the budget, end the agent."""
    now = [0.0]
    restarts = Restarts(lambda: now[0])
    assert all(restarts.allow(deliberate=True) for _ in range(3 * MAX_RESTARTS))
    assert all(restarts.allow() for _ in range(MAX_RESTARTS))  # the budget is whole
    assert not restarts.allow()
    assert restarts.total == 4 * MAX_RESTARTS + 1
