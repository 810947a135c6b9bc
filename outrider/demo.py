"""`outrider demo`: the whole mesh on loopback, no cluster needed.

It starts a CA (`outrider ca serve`), a backend and a frontend sample app,
and an agent (`outrider agent run`) beside each. The frontend calls the
backend through its agent's outbound listener while short-lived SVIDs rotate
under the traffic; then the demo prints what happened and stops every
process. ServiceAccount tokens come from a fake Kubernetes issuer whose JWKS
the CA trusts.

The backend's agent parses HTTP and enforces a policy: the frontend may GET
/api/*, and everything else is denied. Every DENIED_EVERY-th request the
frontend asks for /admin/settings, which must come back 403. The frontend's
agent parses HTTP too (`protocol: http` outbound), so its requests share
pooled mTLS connections however often the frontend app reconnects.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from ca.authn.fake_issuer import FakeTokenIssuer
from ca.signers.local import init_ca
from identity import SpiffeId, TrustDomain

TRUST_DOMAIN = TrustDomain("demo.outrider.local")
FRONTEND, BACKEND = "frontend", "backend"
RATE = 20  # frontend requests a second
NEW_CONNECTION_EVERY = RATE  # requests; the app reconnects about once a second
DENIED_EVERY = 10  # requests; one in ten asks for a path the policy denies
PROGRESS_EVERY = 2.0  # seconds
BACKDATE = 5  # seconds; an agent renews near half of BACKDATE + TTL
STARTUP_TIMEOUT = 20.0
_CA_READY = re.compile(r"gRPC \(TLS\) on (\S+), HTTP on (\S+)")
_AGENT_READY = re.compile(r"ready as \S+: (.*)$", re.MULTILINE)


class DemoFailed(Exception):
    """A process did not start; the message carries the end of its log."""


def workload(name: str) -> SpiffeId:
    return SpiffeId.parse(f"spiffe://{TRUST_DOMAIN}/ns/demo/sa/{name}")


@dataclass
class Child:
    """One `python -m outrider ...` process, logging to a file in the demo's directory."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    bound: dict[str, str] = field(default_factory=dict)

    @classmethod
    def start(cls, workdir: Path, name: str, *args: str) -> Child:
        log = workdir / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "outrider", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=workdir,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        return cls(name, process, log)

    async def ready(self, pattern: re.Pattern[str]) -> re.Match[str]:
        """The log line saying it is serving (with the ports the kernel chose)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STARTUP_TIMEOUT
        while loop.time() < deadline and self.process.poll() is None:
            if match := pattern.search(self.log.read_text(errors="replace")):
                return match
            await asyncio.sleep(0.05)
        raise self.failed("did not start")

    def failed(self, what: str) -> DemoFailed:
        tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-15:])
        return DemoFailed(f"{self.name} {what} (exit code {self.process.poll()}):\n{tail}")

    def url(self, path: str) -> str:
        return f"http://{self.bound['admin']}{path}"


def stop_all(children: list[Child]) -> None:
    """SIGTERM every process at once (agents drain for up to 2s), wait, kill stragglers."""
    for child in children:
        if child.process.poll() is None:
            child.process.terminate()
    for child in children:
        try:
            child.process.wait(10)
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()


@dataclass
class Snapshot:
    """What an agent's admin server says: /certs and /metrics."""

    certs: dict[str, Any]
    metrics: str

    def samples(self, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
        return [
            (sample.labels, sample.value)
            for family in text_string_to_metric_families(self.metrics)
            for sample in family.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        ]

    def total(self, name: str, **labels: str) -> int:
        return int(sum(value for _, value in self.samples(name, **labels)))

    @property
    def rotations(self) -> int:  # the first SVID counts as a success too
        return max(0, self.total("outrider_svid_rotations_total", result="success") - 1)


@dataclass
class Traffic:
    ok: int = 0  # allowed and answered by the backend
    denied: int = 0  # denied by the policy with a 403, as they should be
    failed: int = 0  # anything else
    last_error: str = ""


POLICY = """\
# The frontend may GET /api/*; with default_action deny, nothing else is allowed.
policies:
  - name: frontend-reads-api
    action: ALLOW
    rules:
      - name: get-api
        from: {principals: ["%s"]}
        to: {methods: [GET], paths: ["/api/*"]}
"""


# --- setup ---------------------------------------------------------------------


def write_ca(workdir: Path, ttl: int) -> Path:
    """A fresh CA directory, a fake token issuer it trusts, a token per workload."""
    init_ca(workdir / "ca", TRUST_DOMAIN, datetime.now(UTC), force=False)
    issuer = FakeTokenIssuer()
    (workdir / "jwks.json").write_text(json.dumps(issuer.jwks()))
    for name in (FRONTEND, BACKEND):
        (workdir / f"{name}.token").write_text(issuer.token("demo", name))
    config = {
        "signer": {"dir": "ca"},
        "listen": {"grpc": "127.0.0.1:0", "http": "127.0.0.1:0"},
        "serving_cert": {"names": ["localhost", "127.0.0.1"]},
        "issuance": {"default_ttl": f"{ttl}s", "max_ttl": "1h", "backdate": f"{BACKDATE}s"},
        "authn": {"kubernetes": {"issuer": issuer.issuer, "jwks_file": "jwks.json"}},
        "audit_log": "audit.log",
    }
    path = workdir / "ca.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def start_agent(
    children: list[Child], workdir: Path, name: str, ca: str, ttl: int, **listeners: Any
) -> Child:
    config = {
        "identity": {
            "spiffe_id": str(workload(name)),
            "token_file": f"{name}.token",
            "ttl": f"{ttl}s",
            "output_dir": f"{name}-svid",
        },
        "ca": {"address": ca, "server_name": "localhost", "bundle_file": "ca/bundle.pem"},
        "limits": {"drain_timeout": "2s"},
        "admin": "127.0.0.1:0",
        **listeners,
    }
    path = workdir / f"{name}-agent.yaml"
    path.write_text(yaml.safe_dump(config))
    agent = Child.start(workdir, f"{name}-agent", "agent", "run", "--config", str(path))
    children.append(agent)
    ready = await agent.ready(_AGENT_READY)
    agent.bound = dict(part.split(" ", 1) for part in ready[1].split(", "))
    return agent


async def start_backend_app() -> tuple[web.AppRunner, int]:
    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"app": BACKEND, "says": "hello from the backend"})

    app = web.Application()
    app.router.add_route("*", "/{anything:.*}", hello)  # the policy decides, not the app
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, runner.addresses[0][1]


# --- running -------------------------------------------------------------------


async def call_backend(address: str, traffic: Traffic, until: float) -> None:
    """The frontend app: GET the backend through its agent, about RATE times a second."""
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        sent = 0
        while loop.time() < until:
            sent += 1
            headers = {"Connection": "close"} if sent % NEW_CONNECTION_EVERY == 0 else {}
            deny = sent % DENIED_EVERY == 0
            path = "/admin/settings" if deny else "/api/hello"
            try:
                async with session.get(f"http://{address}{path}", headers=headers) as response:
                    body = await response.json()
                if deny:
                    refused = response.status == 403 and body.get("error") == "denied"
                    traffic.denied += refused
                    traffic.failed += not refused
                else:
                    answered = response.status == 200 and body.get("app") == BACKEND
                    traffic.ok += answered
                    traffic.failed += not answered
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                traffic.failed += 1
                traffic.last_error = repr(exc)
            await asyncio.sleep(1 / RATE)


async def snapshots(agents: dict[str, Child]) -> dict[str, Snapshot]:
    taken = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        for name, agent in agents.items():
            try:
                async with session.get(agent.url("/certs")) as certs:
                    found = await certs.json()
                async with session.get(agent.url("/metrics")) as metrics:
                    taken[name] = Snapshot(found, await metrics.text())
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise agent.failed(f"stopped answering on its admin port ({exc!r})") from None
    return taken


async def show_progress(agents: dict[str, Child], traffic: Traffic, until: float) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    while loop.time() < until:
        await asyncio.sleep(max(0.0, min(PROGRESS_EVERY, until - loop.time())))
        rotations = " ".join(f"{n} {s.rotations}" for n, s in (await snapshots(agents)).items())
        print(
            f"  {loop.time() - start:3.0f}s  requests ok {traffic.ok} denied {traffic.denied}"
            f" failed {traffic.failed}"
            f"  rotations {rotations}",
            flush=True,
        )


# --- reporting -----------------------------------------------------------------


def openssl_verdict(workdir: Path) -> str:
    """What an auditor's own tool says of the backend's current SVID."""
    if shutil.which("openssl") is None:
        return "openssl not installed; skipped"
    # openssl from PATH on purpose: the auditor's own tool, not ours.
    svid = "backend-svid/svid.pem"  # leaf and intermediate, written by the agent
    verify = subprocess.run(
        ["openssl", "verify", "-x509_strict", "-CAfile", "ca/root.pem", "-untrusted", svid, svid],
        cwd=workdir,
        capture_output=True,
        text=True,
    )
    return (verify.stdout or verify.stderr).strip()


def summary(before: dict[str, Snapshot], after: dict[str, Snapshot], traffic: Traffic) -> list[str]:
    error = f" (last error: {traffic.last_error})" if traffic.last_error else ""
    lines = [
        f"requests    ok {traffic.ok}, denied by policy {traffic.denied}, failed"
        f" {traffic.failed}{error}"
    ]
    backend = after[BACKEND]
    for decision in ("allow", "deny"):
        for labels, count in backend.samples("outrider_authz_decisions_total", decision=decision):
            lines.append(
                f"authz       backend agent {decision}: {count:.0f}"
                f" (policy {labels['policy']}, rule {labels['rule']})"
            )
    for name, direction in ((BACKEND, "inbound"), (FRONTEND, "outbound")):
        ok, refused = (
            after[name].total("outrider_tls_handshakes_total", direction=direction, result=result)
            for result in ("ok", "refused")
        )
        lines.append(f"handshakes  {name} agent {direction}: ok {ok}, refused {refused}")
    frontend = after[FRONTEND]
    requests = frontend.total("outrider_upstream_requests_total", upstream=BACKEND)
    new, reused = (
        frontend.total("outrider_upstream_connections_total", upstream=BACKEND, kind=kind)
        for kind in ("new", "reused")
    )
    lines.append(
        f"upstream    frontend agent -> {BACKEND}: {requests} requests on {new} mTLS"
        f" connections ({reused} times one was reused from the pool)"
    )
    for name, snap in after.items():
        for labels, count in snap.samples("outrider_peer_connections_total"):
            lines.append(
                f"peer seen   by the {name} agent: {labels['peer_id']}"
                f" ({labels['tls_version']}, connections {count:.0f})"
            )
    for name, snap in after.items():
        first, last = before[name].certs["serial"], snap.certs["serial"]
        times = "once" if snap.rotations == 1 else f"{snap.rotations} times"
        changed = f"rotated {times}" if first != last else "NOT rotated"
        lines.append(f"serial      {name}: {first} -> {last} ({changed})")
    return lines


def failures(after: dict[str, Snapshot], traffic: Traffic) -> list[str]:
    problems = [f"{traffic.failed} requests failed"] if traffic.failed else []
    if traffic.ok == 0:
        problems.append("no request got through")
    if traffic.denied == 0:
        problems.append("no request was denied by the policy")
    problems += [
        f"the {n} agent did not rotate its SVID" for n, s in after.items() if s.rotations < 1
    ]
    return problems


# --- the demo ------------------------------------------------------------------


async def demo(
    workdir: Path, children: list[Child], duration: float
) -> tuple[list[str], list[str]]:
    """Start everything, run the traffic; the summary lines and the problems found."""
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    loop.add_signal_handler(signal.SIGTERM, main.cancel)  # `kill` cleans up like Ctrl-C
    ttl = max(10, math.ceil(duration))  # renewal near (ttl - BACKDATE) / 2: mid-run
    ca = Child.start(workdir, "ca", "ca", "serve", "--config", str(write_ca(workdir, ttl)))
    children.append(ca)
    ca_grpc, ca_http = (await ca.ready(_CA_READY)).groups()
    runner, app_port = await start_backend_app()
    try:
        (workdir / "policy.yaml").write_text(POLICY % workload(FRONTEND))
        inbound = {"listen": "127.0.0.1:0", "app": f"127.0.0.1:{app_port}", "protocol": "http"}
        policy = {"files": ["policy.yaml"], "default_action": "deny"}
        backend = await start_agent(
            children, workdir, BACKEND, ca_grpc, ttl, inbound=[inbound], policy=policy
        )
        outbound = {
            "name": BACKEND,
            "listen": "127.0.0.1:0",
            "protocol": "http",
            "endpoints": [backend.bound["inbound[0]"]],
            "server_ids": [str(workload(BACKEND))],
        }
        frontend = await start_agent(children, workdir, FRONTEND, ca_grpc, ttl, outbound=[outbound])
        agents = {FRONTEND: frontend, BACKEND: backend}
        address = frontend.bound[f"outbound[{BACKEND}]"]
        metrics = [f"http://{ca_http}/metrics (CA)"]
        metrics += [f"{agent.url('/metrics')} ({name} agent)" for name, agent in agents.items()]
        print(
            f"outrider demo: trust domain {TRUST_DOMAIN}, SVIDs for {ttl}s, CA on {ca_grpc}\n"
            f"  frontend app -> frontend agent {address} -> backend agent"
            f" {backend.bound['inbound[0]']} -> backend app 127.0.0.1:{app_port}\n"
            "  metrics while it runs: " + "\n                         ".join(metrics) + "\n"
            f"  policy: the frontend may GET /api/*; everything else is denied"
            f" ({workdir / 'policy.yaml'})\n"
            f"calling the backend {RATE} times a second for {duration:g}s, one call in"
            f" {DENIED_EVERY} for /admin/settings (Ctrl-C stops)",
            flush=True,
        )
        before, traffic = await snapshots(agents), Traffic()
        until = loop.time() + duration
        await asyncio.gather(
            call_backend(address, traffic, until), show_progress(agents, traffic, until)
        )
        after = await snapshots(agents)
    finally:
        await runner.cleanup()
    lines = summary(before, after, traffic)
    verdict = await asyncio.to_thread(openssl_verdict, workdir)
    lines += [
        f"openssl     verify -x509_strict of the backend's SVID: {verdict}",
        "metrics     " + "\n            ".join([*metrics, "(served while the demo ran)"]),
        f"logs        {workdir}/{{ca,backend-agent,frontend-agent}}.log (kept only on failure)",
    ]
    return lines, failures(after, traffic)


def run(duration: float = 20.0) -> None:
    """Exit 0 when no request failed and every agent rotated its SVID; 1 otherwise."""
    if duration <= 0:
        raise SystemExit("outrider demo: --duration must be more than 0 seconds")
    workdir = Path(tempfile.mkdtemp(prefix="outrider-demo-"))
    children: list[Child] = []
    try:
        lines, problems = asyncio.run(demo(workdir, children, duration))
    except (KeyboardInterrupt, asyncio.CancelledError):
        stop_all(children)
        shutil.rmtree(workdir, ignore_errors=True)
        print("\ninterrupted: every process stopped", file=sys.stderr)
        raise SystemExit(130) from None
    except DemoFailed as exc:
        lines, problems = [], [str(exc)]
    finally:
        stop_all(children)  # idempotent; also covers an unexpected error
    print("\n== summary\n" + "\n".join(lines) if lines else "", flush=True)
    if problems:
        print(f"demo FAILED: {'; '.join(problems)}\nlogs kept in {workdir}", file=sys.stderr)
        raise SystemExit(1)
    shutil.rmtree(workdir, ignore_errors=True)
    print(
        "demo OK: no request failed, the policy denied what it should, and each agent"
        " rotated its SVID under traffic"
    )
