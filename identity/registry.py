"""Every component's Prometheus registry starts the same way: one home for what it holds.

Each component (agent, ca, control, injector) exposes, beside its own series:
`outrider_build_info{component, version, python}` = 1 (the version from
identity/build.py, so a dashboard and an auditor see which build answers), and
the `process_*` (CPU, memory, open fds, start time) and `python_*` (interpreter,
GC) series of prometheus_client's standard collectors, read at scrape time only.

`*_created` series are off in every component: they double every counter and
histogram and tell an auditor nothing a counter's reset does not.
"""

from __future__ import annotations

from typing import Literal

from prometheus_client import (
    CollectorRegistry,
    Gauge,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)

from identity.build import PYTHON, VERSION

Component = Literal["agent", "ca", "control", "injector"]

disable_created_metrics()  # type: ignore[no-untyped-call]

#: Seconds every duration histogram's buckets start from: at or below 100 µs, so a
#: sub-millisecond handshake, request or signature lands in a bucket of its own.
SUB_MILLISECOND = (0.0001, 0.00025, 0.0005)


def component_registry(component: Component) -> CollectorRegistry:
    """A new registry for `component`, holding its build info and the process collectors."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    build = Gauge(
        "outrider_build_info",
        "1, labelled with the component and the version and Python it runs",
        ["component", "version", "python"],
        registry=registry,
    )
    build.labels(component, VERSION, PYTHON).set(1)
    return registry
