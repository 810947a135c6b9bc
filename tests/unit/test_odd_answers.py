"""`outrider check` and `proxy-status` given odd answers: fields missing, of the wrong type,
or not the document asked for (a proxy in the way, another service on the port, an older
or newer control plane). Each is a line that says what was wrong and what to do, or a
finding, never a traceback; what is well-formed is still judged.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from outrider import check, cli, debugapi

GOOD = {"pod": "shop/web-1", "spiffe_id": "spiffe://cluster.local/ns/shop/sa/web"}


@pytest.fixture
def control() -> Iterator[list[Any]]:
    """A loopback debug API answering whatever the test puts in `answer[0]`."""
    answer: list[Any] = [None]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(answer[0]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    answer.append(f"http://127.0.0.1:{server.server_address[1]}")
    try:
        yield answer
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.mark.parametrize("answer", [{"agents": []}, [1, 2], None, "text", [GOOD, "x"]])
def test_an_answer_that_is_not_a_list_of_agents_is_named_with_what_to_do(
    control: list[Any], answer: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    control[0] = answer
    assert cli.main(["proxy-status", "--control", control[1]]) == 1
    err = capsys.readouterr().err
    assert "/debug/agents" in err and "not a list of agents" in err
    assert "--control" in err  # what to do: is it the control plane's debug address?
    with pytest.raises(debugapi.Unreachable, match="not a list of agents"):
        debugapi.agents(control[1])


@pytest.mark.parametrize(
    "agent",
    [
        {"spiffe_id": "x"},
        {"pod": None, "spiffe_id": None},
        {**GOOD, "acked": 5, "latest": 5},
        {**GOOD, "nack": "refused", "sent": "v2"},
        {**GOOD, "nack": {"version": 3, "error": None}, "sent": 3},
    ],
)
def test_an_agent_with_fields_missing_or_of_another_type_is_still_a_row(
    control: list[Any], agent: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    control[0] = [GOOD, agent]
    assert cli.main(["proxy-status", "--control", control[1]]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 3 and "shop/web-1" in out
    listed = debugapi.agents(control[1])
    rows = debugapi.agent_rows(listed)
    assert all(isinstance(value, str) for row in rows for value in row.values())
    findings = check.agents_in_sync(listed, "")
    assert findings and all(f.fix for f in findings if f.status != "ok")


class OddCluster:
    """What `check.observe` reads, answering with the API's JSON as the test writes it."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.core = self.extensions = self.admission = self.version_api = self
        self.apps = self.custom = self

    def __getattr__(self, name: str) -> str:
        return name  # a "call": its name, which `read` looks up

    def read(self, call: str, *args: Any, **kwargs: Any) -> Any:
        return self.answers.get(call)

    def proxy(self, namespace: str, service: str, path: str) -> check.Probe:
        return check.Probe(503, "no endpoints")


HOOK_SERVICE = {"namespace": "outrider-system", "name": "outrider-injector", "port": 443}
LABELLED = {"outrider.io/inject": "enabled"}
ODD_ITEMS = [None, 3, "x", {}, {"metadata": None}, {"metadata": {"name": 7, "labels": "x"}}]


@pytest.mark.parametrize(
    "answers",
    [
        {"get_code": {"major": 1, "minor": None}},
        {"list_custom_resource_definition": {"items": None}},
        {"list_custom_resource_definition": {"items": ODD_ITEMS}},
        {"list_namespaced_pod": {"items": ODD_ITEMS}},
        {"list_namespace": {"items": ODD_ITEMS}},
        {"list_config_map_for_all_namespaces": {"items": ODD_ITEMS}},
        {"list_namespaced_service": {"items": ODD_ITEMS}},
        {"list_namespaced_service": ["not", "a", "list", "object"]},
        {"read_mutating_webhook_configuration": {"webhooks": [None, "x", {"clientConfig": 1}]}},
        {"list_cluster_custom_object": {"items": ODD_ITEMS}},
        {
            "list_cluster_custom_object": {
                "items": [
                    {"metadata": {"generation": "2"}, "status": {"conditions": "x"}},
                    {"metadata": {}, "status": {"conditions": [None, {"status": "False"}]}},
                    {"metadata": {}, "spec": {"parentRefs": [{"kind": "Service"}]}},
                    {"metadata": {}, "spec": {"parentRefs": "x"}, "status": {"parents": [1]}},
                    {"metadata": {}, "status": {"inForce": {"generation": None}}},
                ]
            }
        },
        {
            "read_mutating_webhook_configuration": {
                "webhooks": [{"clientConfig": {"service": {"name": "outrider-injector"}}}]
            },
            "list_namespaced_service": {"items": [{"metadata": {"name": "outrider-injector"}}]},
        },
        {
            "read_mutating_webhook_configuration": {
                "webhooks": [{"clientConfig": {"service": {"namespace": "x", "port": "https"}}}]
            }
        },
        {
            "read_mutating_webhook_configuration": {
                "webhooks": [{"clientConfig": {"service": HOOK_SERVICE, "caBundle": "Zm9v"}}]
            },
            "list_namespaced_service": {
                "items": [{"metadata": {"name": "outrider-injector"}, "spec": {"ports": [1, None]}}]
            },
            "list_namespace": {"items": [{"metadata": {"name": "shop", "labels": LABELLED}}]},
            "list_config_map_for_all_namespaces": {
                "items": [
                    {
                        "metadata": {"name": "outrider-trust-bundle", "namespace": "shop"},
                        "data": ["not", "a", "mapping"],
                    }
                ]
            },
        },
    ],
)
def test_odd_api_objects_are_findings_not_a_traceback(answers: dict[str, Any]) -> None:
    seen = check.observe(OddCluster(answers), ["http://127.0.0.1:9"])  # nothing listens there
    checks = check.evaluate(seen)
    assert check.result(checks)["ok"] is False
    assert all(c.fix for c in checks if c.status != "ok")
    check.text(check.result(checks))


def test_an_api_server_that_never_answers_is_told_after_one_timeout_not_three(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # urllib3 retried every read twice more: a 10 s timeout took 30 s, and printed
    # "Retrying (Retry(total=1 ...))" warnings between the user's lines.
    import socket
    import time

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # accepts (the kernel does), never answers
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "c",
                        "cluster": {"server": f"https://127.0.0.1:{listener.getsockname()[1]}"},
                    }
                ],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    try:
        cluster = check.Cluster(kubeconfig, None, timeout=0.3)
        started = time.monotonic()
        with pytest.raises(check.ApiUnreachable, match="cannot reach the API server"):
            check.observe(cluster, ["http://127.0.0.1:9"], pre=True)
        assert time.monotonic() - started < 0.8
        assert "Retrying" not in caplog.text
    finally:
        listener.close()


@pytest.mark.parametrize(
    "reply",
    [
        b"SSH-2.0-OpenSSH_9.6\r\n",  # not HTTP: a port-forward to the wrong port
        b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n[]",  # an answer cut short
        b"HTTP/1.1 500 Oops\r\ncontent-length: 100\r\n\r\nno",  # an error page cut short
        b"HTTP/1.1 200 OK\r\ncontent-length: 200000\r\n\r\n" + b"[" * 100000 + b"]" * 100000,
    ],
)
def test_a_replica_that_answers_no_http_fails_alone_and_the_others_are_listed(
    control: list[Any], reply: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    control[0] = [GOOD]
    odd = socket.socket()
    odd.bind(("127.0.0.1", 0))
    odd.listen(4)

    def answer_once() -> None:
        peer, _ = odd.accept()
        with peer:
            peer.recv(4096)
            peer.sendall(reply)

    thread = threading.Thread(target=answer_once, daemon=True)
    thread.start()
    try:
        address = f"http://127.0.0.1:{odd.getsockname()[1]}"
        assert cli.main(["proxy-status", "--control", control[1], "--control", address]) == 1
    finally:
        thread.join(timeout=5)
        odd.close()
    captured = capsys.readouterr()
    assert "shop/web-1" in captured.out  # the replica that answered
    assert address in captured.err
    assert "Traceback" not in captured.err
