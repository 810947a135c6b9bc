"""`outrider injector serve` as a real process on 127.0.0.1, for the tests that need one."""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.support import loopback_tls, scraped, soft_fd_limit, wait_for_line

_READY = re.compile(r"serving /mutate on https://[^ ]+:(\d+)")
MAX_BODY = 3 * 1024 * 1024


@dataclass
class Webhook:
    port: int
    context: ssl.SSLContext
    process: subprocess.Popen[str]
    log: list[str]

    def request(
        self, method: str, path: str, body: bytes | None = None, timeout: float = 10.0
    ) -> tuple[int, bytes, float]:
        """Status, body and seconds taken, on a new connection."""
        connection = http.client.HTTPSConnection(
            "127.0.0.1", self.port, context=self.context, timeout=timeout
        )
        started = time.perf_counter()
        try:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.read(), time.perf_counter() - started
        finally:
            connection.close()

    def connect(self) -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        return self.context.wrap_socket(raw, server_hostname="127.0.0.1")

    def review(self, body: dict[str, Any]) -> dict[str, Any]:
        status, answer, _ = self.request("POST", "/mutate", json.dumps(body).encode())
        assert status == 200, answer
        return json.loads(answer)["response"]

    def metric(self, name: str, **labels: str) -> float:
        _, text, _ = self.request("GET", "/metrics")
        return scraped(text.decode(), name, **labels)


@contextmanager
def running_webhook(
    root: Path, limits: dict[str, object] | None = None, *, fd_limit: int | None = None
) -> Iterator[Webhook]:
    """`outrider injector serve` as a real process; `limits` go to its `limits:`."""
    tls = loopback_tls(root, "injector")
    config = root / "injector.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listen": "127.0.0.1:0",
                "tls": {"cert_file": "cert.pem", "key_file": "key.pem"},
                "limits": {"max_body_bytes": MAX_BODY, **(limits or {})},
            }
        )
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "outrider", "injector", "serve", "--config", str(config)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        preexec_fn=soft_fd_limit(fd_limit),  # setrlimit only: safe before exec
    )
    log: list[str] = []
    match = wait_for_line(process, _READY, log, 20.0, "injector")
    context = ssl.create_default_context(cafile=tls.ca_file)
    try:
        yield Webhook(int(match[1]), context, process, log)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
