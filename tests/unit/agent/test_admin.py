"""plain(): the config as /config_dump shows it, JSON with durations in seconds."""

from __future__ import annotations

import json
from pathlib import Path

from agent.adapters.admin import plain
from agent.config import parse

BASE = Path("/etc/outrider")
WEB = "spiffe://example.org/ns/shop/sa/web"
BACKEND = "spiffe://example.org/ns/shop/sa/backend"
API = "spiffe://example.org/ns/shop/sa/api"

RAW = {
    "identity": {"spiffe_id": WEB, "ttl": "90m", "output_dir": "out"},
    "ca": {
        "address": "outrider-ca.outrider.svc:8443",
        "bundle_file": "bundle.pem",
        "timeout": "250ms",
        "backoff": {"initial": "2s", "max": "1m"},
    },
    "inbound": [
        {
            "app": "[::1]:8080",
            "allow": {"spiffe_ids": [BACKEND, API], "trust_domains": ["b.org", "a.org"]},
        }
    ],
    "outbound": [
        {
            "name": "backend",
            "listen": "127.0.0.1:9001",
            "endpoints": ["backend.shop.svc:15443", "10.0.0.7:15443"],
            "server_ids": [BACKEND, API],
        }
    ],
    "limits": {"max_connections": 64},
}


def test_the_config_as_plain_data() -> None:
    assert plain(parse(RAW, base=BASE)) == {
        "identity": {
            "spiffe_id": WEB,
            "token_file": "/var/run/secrets/outrider/token",
            "ttl": 5400.0,
            "output_dir": "/etc/outrider/out",
            "svid_file": None,
            "key_file": None,
        },
        "ca": {
            "host": "outrider-ca.outrider.svc",
            "port": 8443,
            "server_name": "outrider-ca.outrider.svc",
            "bundle_file": "/etc/outrider/bundle.pem",
            "timeout": 0.25,
            "backoff": {"initial": 2.0, "maximum": 60.0, "multiplier": 2.0},
            "bundle_refresh": 5.0,
        },
        "inbound": [
            {
                "listen": "0.0.0.0:15443",
                "app": "[::1]:8080",
                "allow": {"spiffe_ids": [API, BACKEND], "trust_domains": ["a.org", "b.org"]},
                "protocol": "tcp",
            }
        ],
        "outbound": [
            {
                "name": "backend",
                "listen": "127.0.0.1:9001",
                "server_ids": [API, BACKEND],
                "subsets": [
                    {
                        "name": "default",
                        "weight": 1,
                        "source": {
                            "endpoints": [["backend.shop.svc:15443", 1], ["10.0.0.7:15443", 1]]
                        },
                    }
                ],
                "protocol": "tcp",
                "balancer": "round_robin",
                "hash_on": None,
                "health": {
                    "active": None,
                    "outlier": {
                        "consecutive_failures": 5,
                        "consecutive_5xx": 5,
                        "base_ejection": 30.0,
                        "max_ejection": 300.0,
                        "max_ejection_percent": 50,
                    },
                    "panic_threshold": 50,
                },
                "timeouts": {"connect": 0.0, "per_try": 0.0, "request": 0.0},
                "retries": {
                    "retries": 2,
                    "on": ["connect-failure", "refused-stream", "reset"],
                    "statuses": ["503"],
                    "non_idempotent": False,
                    "budget_percent": 20.0,
                    "min_retry_concurrency": 3,
                    "grpc_statuses": ["14"],
                },
                "circuit_breaker": {
                    "max_connections": 1024,
                    "max_pending": 1024,
                    "max_requests": 1024,
                },
                "pool_idle_timeout": 60.0,
                "destinations": [],
            }
        ],
        "limits": {
            "handshake_timeout": 10.0,
            "connect_timeout": 5.0,
            "idle_timeout": 3600.0,
            "max_connections": 64,
            "max_pending_handshakes": 512,
            "drain_timeout": 30.0,
            "headers_with_underscores": "reject",
            "admin_max_connections": 32,
            "admin_request_timeout": 5.0,
            "admin_idle_timeout": 60.0,
        },
        "admin": "127.0.0.1:15000",
        "policy": {"files": [], "default_action": "allow-authenticated", "policies": []},
        "status": None,
        "control": None,
        "capture": None,
        "captured": {"mtls": "strict", "ports": [], "policy": "allow-any", "passthrough": []},
        "probes": [],
        "workload_api": None,
        "access_log": {"mode": "off", "sample": 1.0, "query": False},
        "tracing": {"otlp_endpoint": "", "sample": 1.0, "service_name": ""},
        "tls": {"resumption": True, "ticket_lifetime": 300.0},
    }


def test_the_plain_config_survives_a_json_round_trip() -> None:
    data = plain(parse(RAW, base=BASE))
    assert json.loads(json.dumps(data)) == data


def test_sets_are_sorted_so_the_dump_is_stable() -> None:
    first = json.dumps(plain(parse(RAW, base=BASE)))
    reordered = json.loads(json.dumps(RAW))
    reordered["outbound"][0]["server_ids"].reverse()
    reordered["inbound"][0]["allow"]["trust_domains"].reverse()
    assert json.dumps(plain(parse(reordered, base=BASE))) == first


def test_an_optional_section_left_out_is_null_or_empty() -> None:
    raw = {"identity": {"spiffe_id": WEB}, "ca": RAW["ca"]}
    data = plain(parse(raw, base=BASE))
    assert data["identity"]["output_dir"] is None
    assert data["identity"]["ttl"] == 0.0
    assert data["inbound"] == []
    assert data["outbound"] == []
