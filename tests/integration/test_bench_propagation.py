"""bench/control_plane.py end to end, small: a policy edit reaches 1 and 10 agents, timed.

The full row (2,000 agents) runs in `make bench`; this proves the harness
drives the real pieces (fake API server, `outrider control serve`, the
simulated agents' process) and reads sane figures back, in a few seconds.
"""

from __future__ import annotations

import pytest

from bench.control_plane import measure_fleet


@pytest.mark.parametrize("agents", [1, 10])
def test_an_api_change_reaches_every_agent_and_is_timed(agents: int) -> None:
    row = measure_fleet(agents, changes=3, cap=20.0, per_change=10.0)
    assert (row["agents"], row["changes"]) == (agents, 3)
    assert 0 < row["p50_ms"] <= row["p99_ms"] < 10_000
    assert row["peak_rss_mib"] >= row["rss_mib"] > 0
    assert row["cpu_s_total"] >= row["cpu_s_changes"] >= 0
