"""A wrong type anywhere in an outbound (what the compiled per-request modules read) is a
config error naming its key, never a TypeError; whatever the reader lets through builds
the upstream's balancer, health table, breaker and retry budget, built or compiled.

With the per-request modules compiled by mypyc a value whose type their annotations do
not allow raises TypeError where they receive it (a float weight in Balancer, a string
timeout), so the reader is the one place that must refuse it, with the key's path. The
sweep runs on whichever build is on PYTHONPATH.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator
from typing import Any

from agent.config import ConfigError, parse
from agent.core.discovery import StaticSource
from agent.core.resilience import CircuitBreaker, RetryBudget
from agent.core.upstream import Upstream
from tests.unit.agent.test_config import BACKEND, BASE, errors_of, minimal

#: Wrong types (and edge values) each leaf of the outbound is given in turn.
WRONG: tuple[object, ...] = (1.5, 2.0, True, False, "x", "", None, [], {}, -1, 0, 10**30, "1s")


def outbound() -> dict[str, Any]:
    return {
        "name": "backend",
        "listen": "127.0.0.1:9001",
        "protocol": "http",
        "server_ids": [str(BACKEND)],
        "subsets": [
            {"name": "v1", "weight": 90, "endpoints": [{"address": "10.0.0.1:15443", "weight": 3}]},
            {"name": "v2", "weight": 10, "endpoints": ["10.0.0.2:15443"]},
        ],
        "balancer": "ring_hash",
        "hash_on": {"header": "x-user"},
        "health": {
            "active": {
                "kind": "http",
                "path": "/healthz",
                "interval": "5s",
                "timeout": "1s",
                "healthy_threshold": 2,
                "unhealthy_threshold": 3,
            },
            "outlier": {
                "consecutive_failures": 5,
                "consecutive_5xx": 5,
                "base_ejection": "30s",
                "max_ejection": "300s",
                "max_ejection_percent": 50,
            },
            "panic_threshold": 50,
        },
        "timeouts": {"connect": "1s", "per_try": "2s", "request": "5s"},
        "retries": {
            "max": 2,
            "retry_on": ["connect-failure", 503, "unavailable"],
            "non_idempotent": False,
            "budget": {"percent": 20, "min_concurrency": 3},
        },
        "circuit_breaker": {"max_connections": 10, "max_pending": 10, "max_requests": 10},
        "pool": {"idle_timeout": "60s"},
    }


def leaves(node: object, path: tuple[str | int, ...] = ()) -> Iterator[tuple[str | int, ...]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from leaves(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from leaves(value, (*path, index))
    if path:
        yield path


def with_value(path: tuple[str | int, ...], value: object) -> dict[str, Any]:
    raw = {**minimal(), "outbound": [outbound()]}
    node: Any = raw["outbound"][0]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = copy.deepcopy(value)
    return raw


def run_upstream(raw: dict[str, Any]) -> None:
    """Build what agent/adapters/upstreams.py builds from the outbound, and pick from it."""
    for config in parse(raw, base=BASE).outbound:
        core = Upstream(config.balancer, {s.name: s.weight for s in config.subsets}, config.health)
        members = {
            s.name: dict(s.source.endpoints)
            for s in config.subsets
            if isinstance(s.source, StaticSource)
        }
        core.update_all(members)
        breaker = CircuitBreaker(config.circuit_breaker)
        budget = RetryBudget(config.retries.budget_percent, config.retries.min_retry_concurrency)
        rng = random.Random(1)
        subset = core.subset(rng)
        assert subset is not None
        assert core.choose(subset, (), 0.0, rng, key=b"u1") is not None
        assert breaker.acquire("max_requests")
        budget.request_started()
        budget.limit()


def test_every_wrong_type_in_an_outbound_is_a_config_error_or_runs() -> None:
    problems = []
    for path in leaves(outbound()):
        for value in WRONG:
            where = ".".join(map(str, path))
            try:
                run_upstream(with_value(path, value))
            except ConfigError as exc:
                if not any(error.startswith("outbound[0]") for error in exc.errors):
                    problems.append(f"{where} = {value!r}: the error names no outbound key")
            except Exception as exc:  # a TypeError from compiled code, or any crash
                problems.append(f"{where} = {value!r}: {type(exc).__name__}: {exc}")
    assert problems == []


def test_an_upstream_or_a_subset_named_null_is_an_error_not_left_out() -> None:
    raw = {**minimal(), "outbound": [outbound()]}
    raw["outbound"][0]["name"] = None
    assert "outbound[0].name: required: names the upstream in logs and metrics" in errors_of(raw)
    raw = {**minimal(), "outbound": [outbound()]}
    raw["outbound"][0]["subsets"][1]["name"] = None
    assert "outbound[0].subsets[1].name: required: names the subset in logs" in errors_of(raw)
