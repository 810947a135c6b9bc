"""What one policy decision costs: `PolicySet.decide` on the L7 bench's 10-rule policy.

    python -m bench.policy_micro [--decisions 100000]

The policy is the one `make bench` gives the server agent in `l7_keepalive`
(bench/peers.py POLICY_RULES: nine rules for other callers, the tenth lets the
bench's client GET /api/*); the requests are what the HTTP adapter asks about for
wrk's `GET /api/items` (allowed by the tenth rule), the same from a caller no rule
names (denied, its explanation read as the denial's log line reads it), and an L4
connection from the client. Prints microseconds of CPU (time.process_time) per
decision for each; no network, no processes, bounded by the decision count.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.core.policy import PolicySet, Request  # noqa: E402
from agent.core.policyfile import parse_policies  # noqa: E402
from identity import SpiffeId, TrustDomain  # noqa: E402

# As in bench/peers.py, without importing the process harness it needs for the rest.
TRUST_DOMAIN = "example.org"
PORT = 8080


def _workload(name: str) -> SpiffeId:
    return SpiffeId.parse(f"spiffe://{TRUST_DOMAIN}/ns/demo/sa/{name}")


def bench_policy() -> PolicySet:
    """bench/peers.py's outrider_policy(POLICY_RULES), parsed as the agent parses its file."""
    rules = [
        {
            "name": f"rule-{n}",
            "from": {"principals": [str(principal)]},
            "to": {"methods": ["GET"], "paths": [prefix + "*"]},
        }
        for n, (principal, prefix) in enumerate(
            [(_workload(f"svc{n}"), f"/v{n}/") for n in range(1, 10)]
            + [(_workload("client"), "/api/")],
            1,
        )
    ]
    text = yaml.safe_dump({"policies": [{"name": "bench", "action": "ALLOW", "rules": rules}]})
    return PolicySet(parse_policies(text, "bench.yaml"))


def _request(source: SpiffeId, method: str | None = "GET") -> Request:
    if method is None:
        return Request(source, PORT)
    host = f"127.0.0.1:{PORT}"
    return Request(source, PORT, method, "/api/items", "127.0.0.1", {"host": (host,)})


def per_decision(decide: Callable[[], object], count: int) -> float:
    """Microseconds of CPU per call, after a warm-up of a tenth of `count`."""
    for _ in range(count // 10):
        decide()
    start = time.process_time()
    for _ in range(count):
        decide()
    return (time.process_time() - start) / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, default=100_000)
    args = parser.parse_args()
    policies = bench_policy()
    trusted = frozenset({TrustDomain(TRUST_DOMAIN)})
    allowed = _request(_workload("client"))
    denied = _request(_workload("stranger"))
    l4 = _request(_workload("client"), method=None)
    assert policies.decide(allowed, trusted).allowed
    assert not policies.decide(denied, trusted).allowed

    def deny_and_explain() -> str:
        return policies.decide(denied, trusted).reason

    cases: list[tuple[str, Callable[[], object]]] = [
        ("allowed GET /api/items (rule 10 of 10)", lambda: policies.decide(allowed, trusted)),
        ("denied, reason read (a denial's log line)", deny_and_explain),
        ("L4 connection (no ALLOW rule can match)", lambda: policies.decide(l4, trusted)),
    ]
    print(f"PolicySet.decide, bench 10-rule policy, {args.decisions} decisions each")
    for name, call in cases:
        print(f"  {per_decision(call, args.decisions):7.2f} us  {name}")


if __name__ == "__main__":
    main()
