"""bench/: reading wrk's output, and the README table the harness rewrites."""

from __future__ import annotations

import pytest

from bench.load import parse_wrk
from bench.report import END, START, into_readme

# wrk 4.1.0 with --latency, as printed through a proxy that dropped some requests.
WRK = """\
Running 3s test @ http://127.0.0.1:40001/api/items
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.10ms  520.00us  23.63ms   90.00%
    Req/Sec    44.8k     2.1k    47.0k    70.00%
  Latency Distribution
     50%  0.99ms
     75%    1.20ms
     90%    1.50ms
     99%   23.63ms
  134000 requests in 3.00s, 20.00MB read
  Socket errors: connect 0, read 3, write 0, timeout 2
  Non-2xx or 3xx responses: 7
Requests/sec:  44641.00
Transfer/sec:      6.60MB
"""


def test_wrk_output_gives_rate_percentiles_and_every_error() -> None:
    load = parse_wrk(WRK)
    assert (load.requests, load.per_s) == (134000, 44641.0)
    assert (load.p50_ms, load.p99_ms) == (0.99, 23.63)
    assert load.detail == {"read": 3, "timeout": 2, "non_2xx": 7}
    assert load.errors == 12


def test_output_that_is_not_wrk_is_an_error_not_a_zero() -> None:
    with pytest.raises(RuntimeError, match="unexpected wrk output"):
        parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_the_readme_table_is_replaced_between_its_markers_only() -> None:
    readme = f"# Outrider\n\n{START}\nold table\n{END}\n\n## Development\n"
    once = into_readme(readme, "| new | table |\n")
    assert once == f"# Outrider\n\n{START}\n| new | table |\n{END}\n\n## Development\n"
    assert into_readme(once, "| new | table |\n") == once
    assert into_readme("# no markers\n", "| table |\n") == "# no markers\n"
