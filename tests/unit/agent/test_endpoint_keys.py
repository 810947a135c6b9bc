"""An endpoint is the one key of its address in every table (balancer load, pool, health),
however and wherever it was made."""

from __future__ import annotations

import pickle
import subprocess
import sys

from agent.core.endpoint import Endpoint


def test_endpoints_with_one_address_are_one_key() -> None:
    made, again = Endpoint("10.0.0.7", 8080), Endpoint("10.0.0.7", 8080)
    assert made == again and hash(made) == hash(again)
    assert {made: "pooled"}[again] == "pooled"
    assert made != Endpoint("10.0.0.7", 8081) and made != Endpoint("10.0.0.8", 8080)
    assert made != ("10.0.0.7", 8080)
    assert repr(made) == "Endpoint(host='10.0.0.7', port=8080)" and str(made) == "10.0.0.7:8080"


def test_an_endpoint_sent_to_a_worker_is_the_workers_key_for_it() -> None:
    """Workers get their config pickled; a string's hash differs from process to process,
    so an endpoint's hash is the receiving process's own, never the sender's."""
    sent = pickle.dumps(Endpoint("backend.shop", 8443))
    check = (
        "import pickle, sys; from agent.core.endpoint import Endpoint; "
        "got = pickle.loads(sys.stdin.buffer.read()); "
        "assert {Endpoint('backend.shop', 8443): 1}[got] == 1, 'not the same key'"
    )
    for seed in ("1", "2"):
        done = subprocess.run(
            [sys.executable, "-c", check],
            input=sent,
            capture_output=True,
            env={"PYTHONHASHSEED": seed, "PYTHONPATH": ":".join(sys.path)},
            timeout=30,
        )
        assert done.returncode == 0, done.stderr.decode()
