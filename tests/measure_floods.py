"""Measure what floods of unauthenticated callers do to `ca serve` and `injector serve`.

    PYTHONPATH=. python -m tests.measure_floods message         # one 256 MB gRPC message
    PYTHONPATH=. python -m tests.measure_floods idle ca 1100 tls [hold seconds]
    PYTHONPATH=. python -m tests.measure_floods idle injector 1100 tcp
    PYTHONPATH=. python -m tests.measure_floods renewals 60    # handshakes for 60 s
    PYTHONPATH=. python -m tests.measure_floods agent admin 1100  # idle admin connections
    PYTHONPATH=. python -m tests.measure_floods agent plain 4000  # silent inbound connects
    PYTHONPATH=. python -m tests.measure_floods agent churn 2000  # mTLS connections, 50 at a time

Each server is a real process on 127.0.0.1 with the default limits, started with
a soft limit of 1024 open files (as in the field); what it holds is read from
/proc. OUTRIDER_CODE=DIR runs the servers from another checkout (the code before a
change) while this tool stays as it is; run it from outside both checkouts, with
PYTHONPATH naming this one, so the agent's `python -m` does not find the
current directory's code first. Not a test: the figures in the docs and in
reviews come from here.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import socketserver
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from identity.proto import ca_pb2
from tests import certs, floods
from tests.mesh import agent_process, inbound, served_agent_yaml, workload
from tests.support import (
    CaProcess,
    CaSetup,
    ca_process,
    grpcio_channel,
    grpcio_sign,
    make_ca_setup,
    make_csr,
)
from tests.webhook import running_webhook

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "admission"
SOFT_LIMIT = 1024


async def _sign(setup: CaSetup, ca: CaProcess, csr: bytes | None = None) -> str:
    async with grpcio_channel(setup.bundle_pem, ca.grpc_port) as channel:
        request = ca_pb2.SignRequest(csr=csr if csr is not None else make_csr())
        metadata = [("authorization", f"Bearer {setup.issuer.token('shop', 'web')}")]
        try:
            await grpcio_sign(channel)(request, metadata=metadata, timeout=120)
        except Exception as exc:  # what the caller saw is the figure
            return f"{type(exc).__name__}: {exc}"
        return "OK"


def sign(setup: CaSetup, ca: CaProcess, csr: bytes | None = None) -> str:
    return asyncio.run(_sign(setup, ca, csr))


@contextmanager
def ca(root: Path) -> Iterator[tuple[CaSetup, CaProcess]]:
    setup = make_ca_setup(root)
    with ca_process(setup.config, fd_limit=SOFT_LIMIT) as process:
        yield setup, process


def message(root: Path) -> None:
    with ca(root) as (setup, process):
        pid = process.process.pid
        print(f"CA at start: peak {floods.peak_rss_kib(pid)} KiB")
        size = 256 * 2**20
        context = floods.client_context("h2")
        answer = floods.oversized_call(process.grpc_port, context, size, send_at_most=size)
        print(f"h2 client, {size} bytes declared: {answer}")
        print(f"CA peak {floods.peak_rss_kib(pid)} KiB")
        print(f"grpcio, a 256 MB CSR: {sign(setup, process, bytes(size))}")
        print(f"CA peak {floods.peak_rss_kib(pid)} KiB")
        print(f"Sign after: {sign(setup, process)}")


def idle(root: Path, which: str, count: int, tls: bool, hold: float) -> None:
    with _server(root, which) as (port, pid, call, log):
        limits = Path(f"/proc/{pid}/limits").read_text().splitlines()
        print(next(line for line in limits if "open files" in line))
        print(f"at start: rss {floods.rss_kib(pid)} KiB, fds {floods.open_fds(pid)}")
        floods.raise_own_fd_limit()
        context = floods.client_context("h2") if tls else None
        with floods.idle_connections(port, count, tls=context) as flood:
            time.sleep(hold)
            print(f"{count} {'TLS' if tls else 'TCP'}: {len(flood.sockets)} opened")
            print(f"held {hold:g} s: rss {floods.rss_kib(pid)} KiB, fds {floods.open_fds(pid)}")
            print(f"closed by the server: {flood.closed_by_peer(0.1)}")
            print(f"a call meanwhile: {call()}")
        print("".join(line for line in log if "open-file limit" in line), end="")


@contextmanager
def _server(root: Path, which: str) -> Iterator[tuple[int, int, Callable[[], str], list[str]]]:
    if which == "ca":
        with ca(root) as (setup, process):
            yield (
                process.grpc_port,
                process.process.pid,
                lambda: sign(setup, process),
                process.stderr,
            )
        return
    with running_webhook(root, fd_limit=SOFT_LIMIT) as webhook:
        body = json.loads((FIXTURES / "deployment_pod.json").read_text())

        def review() -> str:
            try:
                return f"HTTP {webhook.request('POST', '/mutate', json.dumps(body).encode())[0]}"
            except (OSError, ssl.SSLError) as exc:
                return f"{type(exc).__name__}: {exc}"

        yield webhook.port, webhook.process.pid, review, webhook.log


def renewals(root: Path, seconds: float) -> None:
    """Handshakes as renewing agents make them, each offering the last session back."""
    with ca(root) as (_, process):
        context = floods.client_context("h2")
        before, count, resumed = floods.rss_kib(process.process.pid), 0, 0
        session = None
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            raw = socket.create_connection(("127.0.0.1", process.grpc_port))
            with context.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
                tls.recv(100)  # the server's SETTINGS; tickets, if any, come with them
                resumed += tls.session_reused
                session, count = tls.session, count + 1
        after = floods.rss_kib(process.process.pid)
        print(
            f"{count} handshakes in {seconds:g} s: rss {before} -> {after} KiB, {resumed} resumed"
        )


def agent(root: Path, what: str, count: int) -> None:
    """An agent before an echo app, attacked on its admin port (`admin`: idle connections)
    or its inbound (`plain`: connects that never speak; `churn`: mTLS connections closed
    again, 50 at a time)."""
    setup = make_ca_setup(root)
    with _echo_app() as app_port, ca_process(setup.config) as process:
        raw = served_agent_yaml(setup, process, "backend", inbound=inbound(app_port))
        with agent_process(root, "backend", raw) as running:
            pid = running.process.pid
            subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={SOFT_LIMIT}:20000"], check=True)
            floods.raise_own_fd_limit()
            time.sleep(1)
            print(f"at start: rss {floods.rss_kib(pid)} KiB, fds {floods.open_fds(pid)}")
            credential = certs.valid_svid(setup, workload("frontend"))
            context = certs.client_context(setup.bundle_pem, credential)
            port = int(running.bound["inbound[0]"].rsplit(":", 1)[1])

            def mtls() -> str:
                try:
                    raw_sock = socket.create_connection(("127.0.0.1", port), timeout=3)
                    with context.wrap_socket(raw_sock, server_hostname=None) as tls:
                        tls.sendall(b"ping")
                        return "OK" if tls.recv(4) == b"ping" else "no echo"
                except (OSError, ssl.SSLError) as exc:
                    return f"{type(exc).__name__}: {exc}"

            def ready() -> str:
                try:
                    return running.get("/ready").strip()
                except OSError as exc:
                    return f"{type(exc).__name__}: {exc}"

            if what == "churn":
                started = time.monotonic()
                with ThreadPoolExecutor(50) as pool:
                    list(pool.map(lambda _: mtls(), range(count)))
                print(f"{count} mTLS connections in {time.monotonic() - started:.1f} s")
                print(f"peak rss {floods.peak_rss_kib(pid)} KiB, fds {floods.open_fds(pid)}")
                return
            target = int(running.bound["admin"].rsplit(":", 1)[1]) if what == "admin" else port
            with floods.idle_connections(target, count) as flood:
                time.sleep(3)
                print(f"{count} idle {what} connections: {len(flood.sockets)} opened")
                print(f"rss {floods.rss_kib(pid)} KiB, fds {floods.open_fds(pid)}")
                print(f"/ready: {ready()}; an mTLS connection: {mtls()}")


@contextmanager
def _echo_app() -> Iterator[int]:
    class Echo(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            while data := self.request.recv(65536):
                self.request.sendall(data)

    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo) as server:
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield server.server_address[1]
        finally:
            server.shutdown()


def main(argv: list[str]) -> None:
    root = Path(tempfile.mkdtemp(prefix="outrider-floods-"))
    code = os.environ.get("OUTRIDER_CODE")
    if code:  # this tool has imported what it needs; the servers it starts run `code`
        os.environ["PYTHONPATH"] = code
    if argv[0] == "message":
        message(root)
    elif argv[0] == "idle":
        hold = float(argv[4]) if len(argv) > 4 else 2.0
        idle(root, argv[1], int(argv[2]), argv[3] == "tls", hold)
    elif argv[0] == "renewals":
        renewals(root, float(argv[1]))
    elif argv[0] == "agent":
        agent(root, argv[1], int(argv[2]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
