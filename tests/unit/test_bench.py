"""bench/: reading wrk's output, the control-plane figures, and the README table the harness
rewrites."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import yaml

from bench import capture, dataplane, grpc_calls, l4_tail
from bench.control_plane import PATHS, percentile, pods_yaml, policy_yaml, summarize
from bench.dataplane import NOT_MEASURED
from bench.load import Load, parse_wrk
from bench.report import END, START, control_table, goals, into_readme, markdown

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


def test_a_percentile_of_a_second_or_more_is_read_as_wrk_pads_it() -> None:
    slow = WRK.replace("     99%   23.63ms", "     99%    1.30s ")
    assert parse_wrk(slow).p99_ms == 1300.0


def test_output_that_is_not_wrk_is_an_error_not_a_zero() -> None:
    with pytest.raises(RuntimeError, match="unexpected wrk output"):
        parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_the_readme_table_is_replaced_between_its_markers_only() -> None:
    readme = f"# Outrider\n\n{START}\nold table\n{END}\n\n## Development\n"
    once = into_readme(readme, "| new | table |\n")
    assert once == f"# Outrider\n\n{START}\n| new | table |\n{END}\n\n## Development\n"
    assert into_readme(once, "| new | table |\n") == once
    assert into_readme("# no markers\n", "| table |\n") == "# no markers\n"


def test_p99_is_a_change_that_was_measured_the_slowest_of_twenty() -> None:
    seconds = [0.1 + i / 1000 for i in range(19)] + [0.9]
    assert percentile(seconds, 99) == 0.9
    assert percentile(seconds, 50) == seconds[9]
    assert percentile([0.3], 99) == 0.3
    with pytest.raises(ValueError, match="no values"):
        percentile([], 99)


def test_a_fleet_is_summarized_in_milliseconds() -> None:
    summary = summarize(100, [0.040, 0.020, 0.030, 0.250])
    assert summary == {
        "agents": 100, "changes": 4, "p50_ms": 35.0, "p99_ms": 250.0, "max_ms": 250.0
    }  # fmt: skip


def test_the_fake_cluster_holds_every_pod_and_the_change_flips_the_path() -> None:
    docs = list(yaml.safe_load_all(pods_yaml(300)))
    pods = [d for d in docs if d["kind"] == "Pod"]
    assert [p["metadata"]["name"] for p in pods] == [f"pod-{i}" for i in range(300)]
    assert {p["spec"]["serviceAccountName"] for p in pods} == {"bench"}
    assert len({p["status"]["podIP"] for p in pods}) == 300
    before, after = (yaml.safe_load(policy_yaml(path)) for path in PATHS)
    assert before["metadata"] == after["metadata"]  # the same object, edited
    assert before["spec"]["rules"][0]["to"]["paths"] != after["spec"]["rules"][0]["to"]["paths"]


def test_the_captured_fleet_has_services_each_with_its_share_of_the_pods() -> None:
    """--captured: every pod captured, each Service's EndpointSlice naming its pods at
    their IPs, so every snapshot holds an entry per Service."""
    docs = list(yaml.safe_load_all(pods_yaml(20, services=5)))
    pods = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Pod"}
    assert all(p["spec"]["initContainers"][0]["name"] == "outrider-capture" for p in pods.values())
    slices = [d for d in docs if d["kind"] == "EndpointSlice"]
    assert len(slices) == len([d for d in docs if d["kind"] == "Service"]) - 1 == 5
    for item in slices:
        service = item["metadata"]["labels"]["kubernetes.io/service-name"]
        assert len(item["endpoints"]) == 4
        for endpoint in item["endpoints"]:
            member = pods[endpoint["targetRef"]["name"]]
            assert member["metadata"]["labels"]["svc"] == service
            assert endpoint["addresses"] == [member["status"]["podIP"]]


FLEETS = [
    {"agents": 1, "changes": 20, "p50_ms": 31.3, "p99_ms": 32.2, "max_ms": 32.2, "rss_mib": 53.4,
     "peak_rss_mib": 53.4, "cpu_s_changes": 0.01, "cpu_s_total": 0.27},
    {"agents": 2000, "changes": 20, "p50_ms": 244.3, "p99_ms": 1259.6, "max_ms": 1259.6,
     "rss_mib": 94.4, "peak_rss_mib": 99.0, "cpu_s_changes": 0.77, "cpu_s_total": 1.77},
]  # fmt: skip
RIVAL = {"text": "Istio publishes no push time.", "sources": ["https://istio.io/x"]}


def record(control: dict[str, object]) -> dict[str, object]:
    return {
        "date": "2026-12-06", "machine": "2 CPUs", "command": "make bench", "rounds": 1,
        "seconds": 3.0, "summary": [], "ca": {"rows": []}, "control": control,
        "dataplane": {"rss_idle_mib": {}, "rss_peak_mib": {}},
    }  # fmt: skip


def test_the_control_plane_row_gives_percentiles_memory_and_cpu_per_fleet() -> None:
    lines = control_table(FLEETS)
    assert lines[2] == "| 1 | 20 | 31.3 | 32.2 | 53.4 (53.4) | 0.01 / 0.27 |"
    assert lines[3] == "| 2000 | 20 | 244.3 | 1259.6 | 94.4 (99.0) | 0.77 / 1.77 |"
    text = markdown(record({"rows": FLEETS, "rival": RIVAL}))
    assert "Rival: Istio publishes no push time. (https://istio.io/x)" in text


def test_the_aim_is_judged_at_two_thousand_agents_only() -> None:
    aim = "control plane: API change to every agent's ACK, p99 < 1 s at 2,000 agents"
    missed = dict((g, (m, ok)) for g, m, ok in goals(record({"rows": FLEETS, "rival": RIVAL})))
    assert missed[aim] == ("1260 ms", False)
    small = dict((g, (m, ok)) for g, m, ok in goals(record({"rows": FLEETS[:1], "rival": RIVAL})))
    assert small[aim] == (NOT_MEASURED, None)
    assert "Control plane" not in markdown(record({}))


def test_memory_is_judged_on_every_outrider_process_and_workers_on_the_capped_pair() -> None:
    rec = record({})
    rec["dataplane"] = {
        "rss_idle_mib": {"outrider l4": {"client": 40.0}, "outrider l7 observed": {"server": 44.0},
                         "envoy l4": {"client": 90.0}},
        "rss_peak_mib": {"outrider l4 2 workers": {"server worker 1": 58.0},
                         "envoy l4": {"client": 99.0}},
    }  # fmt: skip
    pairs = [{"pair": "outrider l4 capped", "per_s": 1000.0},
             {"pair": "outrider l4 2 workers capped", "per_s": 1650.0}]  # fmt: skip
    rec["summary"] = [{"name": "workers_capped", "rows": pairs}]
    judged = {g: (m, ok) for g, m, ok in goals(rec)}
    assert judged["agent RSS ≤ 45 MB idle"] == ("46.1 MB max", False)  # 44 MiB, in MB
    assert judged["agent RSS ≤ 60 MB peak"] == ("60.8 MB max", False)
    workers = "`workers: 2` ≥ 1.7x one worker, each held to the same CPU per worker"
    assert judged[workers] == ("1.65x", False)


def test_capture_is_judged_against_the_explicit_path_of_the_same_run() -> None:
    samples = {
        "keepalive": {
            "captured": [0.0010, 0.0011, 0.0012, 0.0013, 0.0050],
            "explicit": [0.0009, 0.0010, 0.0010, 0.0011, 0.0040],
        },
        "new_connection": {"captured": [0.003], "explicit": [0.002]},
    }
    result = capture.summarize(samples)
    kept = result["keepalive"]
    assert kept["rows"]["captured"] == {"requests": 5, "p50_ms": 1.2, "p99_ms": 5.0}
    assert kept["rows"]["explicit"] == {"requests": 5, "p50_ms": 1.0, "p99_ms": 4.0}
    assert (kept["p50_ratio"], kept["added_p50_ms"]) == (1.2, 0.2)
    assert (kept["p99_ratio"], kept["added_p99_ms"]) == (1.25, 1.0)
    assert result["new_connection"]["added_p50_ms"] == 1.0
    text = markdown({**record({}), "capture": result})
    assert (
        "| the Service `10.32.0.10:8080` (captured) | kept-alive connection | 5 | 1.200 | 5.000"
        " | 1.20 / 1.25 | +0.200 / +1.000 |"
    ) in text
    assert (
        "| its agent's `127.0.0.1:15001` (explicit) | a connection per request | 1 | 2.000"
        " | 2.000 | - | - |"
    ) in text
    assert "Transparent capture" not in markdown(record({}))


# h2load 1.52 with gRPC framing (bench/grpc_calls.py), 12-byte messages echoed: 3 of the 20
# answered calls were refusals (trailers-only, no message), 1 call got a 503.
H2LOAD = """\
finished in 1.00s, 21.00 req/s, 1.20KB/s
requests: 21 total, 21 started, 21 done, 20 succeeded, 1 failed, 0 errored, 0 timeout
status codes: 20 2xx, 0 3xx, 0 4xx, 1 5xx
traffic: 1.20KB (1230) total, 1.00KB (1020) headers (space savings 90.00%), 204B (204) data
"""


def test_a_grpc_call_counts_as_answered_only_with_its_message() -> None:
    load = grpc_calls.parse_h2load(H2LOAD, [1.0] * 19 + [9.0], seconds=1.0)
    assert (load.requests, load.per_s) == (17, 17.0)
    assert load.detail == {"no_message": 3, "not_2xx": 1}
    assert load.errors == 4
    assert (load.p50_ms, round(load.p99_ms, 2)) == (1.0, 7.48)  # interpolated: 1 + 0.81 * 8


def test_h2load_output_without_a_call_is_an_error_not_a_zero() -> None:
    with pytest.raises(RuntimeError, match="unexpected h2load output"):
        grpc_calls.parse_h2load("connect to 127.0.0.1:1 failed\n", [], 1.0)
    nothing = H2LOAD.replace("(204) data", "(0) data")
    with pytest.raises(RuntimeError, match="completed no call"):
        grpc_calls.parse_h2load(nothing, [1.0], 1.0)


def test_the_grpc_scenarios_compare_the_agents_with_envoy_in_the_same_run() -> None:
    (unary, streams) = [s for s in dataplane.scenarios(50) if s.name.startswith("grpc")]
    assert unary.pairs == streams.pairs == ("direct grpc", "outrider grpc", "envoy grpc")
    runs = [
        {"scenario": "grpc_streams", "pair": pair, "load": asdict(Load(n, n, 1.0, 2.0, 0)),
         "costs": {}, "machine_cores": 1.0, "handshakes": None, "rotations": None}
        for pair, n in (("direct grpc", 9000), ("outrider grpc", 3000), ("envoy grpc", 4000))
    ]  # fmt: skip
    record = {"scenarios": [{"name": "grpc_streams", "pairs": streams.pairs}], "runs": runs}
    (summary,) = dataplane.summarize(record)
    rows = {row["pair"]: row for row in summary["rows"]}
    assert rows["outrider grpc"]["per_s_vs_envoy"] == 0.75


def test_the_table_says_which_commit_it_measured() -> None:
    """The README's table outlives the code it measured: its first line names the commit,
    so a reader can tell how far the code has moved since (`git log COMMIT..`)."""
    text = markdown({**record({}), "commit": "a6ffccd"})
    assert text.startswith("Measured 2026-12-06 at commit a6ffccd on 2 CPUs;")
    assert markdown(record({})).startswith("Measured 2026-12-06 on 2 CPUs;")  # older results


def test_the_table_says_whether_the_agent_ran_compiled() -> None:
    """Compiled and pure agents differ by a quarter of their L7 CPU: a figure says which."""
    text = markdown({**record({}), "commit": "a6ffccd", "agent": "compiled by mypyc"})
    assert text.startswith(
        "Measured 2026-12-06 at commit a6ffccd, the agent's hot path compiled by mypyc on 2 CPUs;"
    )


def test_the_l4_tail_p99_is_wrks_with_its_coordinated_omission_correction() -> None:
    """One request in a hundred took 21 ms, the rest 1 ms, over 1 connection in 1.2 s (an
    interval of 10 ms): wrk adds a sample at 11 ms for it, and its p99 is that (uncorrected,
    1 ms); without the long request, 1 ms."""
    latencies = [21_000] + [1_000] * 119
    assert l4_tail.wrk_p99(latencies, 1, 1_200_000) == 11.0
    assert l4_tail.wrk_p99(latencies[1:], 1, 1_200_000) == 1.0


def test_the_l4_tail_p99_counts_a_burst_of_long_first_requests() -> None:
    """50 connections whose first requests waited 100 ms, in a run of 10,000 requests of
    1 ms over 0.2 s (an interval of 1 ms): 98 synthetic samples each, 4,900 in all, set
    the p99 near the first requests' wait, not the steady state's 1 ms."""
    latencies = [100_000] * 50 + [1_000] * 9_950
    assert l4_tail.wrk_p99(latencies, 50, 200_000) > 50


def test_the_l4_tail_tells_a_stall_of_every_connection_from_requests_late_one_by_one() -> None:
    """10,000 requests of 1 ms on 50 connections; 100 of them took 8 ms. Ending in one 2 ms
    window (the pipeline held up at once), they are all a stall; ending 10 ms apart (each
    late on its own), none is."""
    steady = [(n * 20, 1_000) for n in range(9_900)]
    together = [(500_000 + n, 8_000) for n in range(100)]
    apart = [(n * 10_000, 8_000) for n in range(100)]
    assert l4_tail.stalled_share(steady + together, 50) == 1.0
    assert l4_tail.stalled_share(steady + apart, 50) == 0.0
