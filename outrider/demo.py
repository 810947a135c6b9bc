"""`outrider demo`: the whole mesh on loopback, no cluster needed.

It starts a CA (`outrider ca serve`), a backend and a frontend sample app,
and an agent (`outrider agent run`) beside each. The frontend calls the
backend through its agent's outbound listener while short-lived SVIDs rotate
under the traffic; then the demo prints what happened and stops every
process. The CA runs in dev mode (`ca serve --dev`, ca/authn/dev.py): each
agent's token is a dev token, shaped like a projected ServiceAccount token
and checked by the CA's own verifier.

With `--keep DIR` the demo runs in DIR, on ports chosen free beforehand, and
leaves everything there with a README.md of the commands that start the same
mesh by hand: the commands the demo itself ran (`COMMANDS`).

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
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from ca.authn.dev import DEFAULT_TOKEN_LIFETIME, DevIssuer
from ca.authn.dev import refusal as dev_refusal
from ca.signers.local import init_ca
from identity import SpiffeId, TrustDomain
from identity.files import PRIVATE, write_atomic

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
BACKEND_APP_DIR = "backend-app"  # what `python3 -m http.server` serves when run by hand
HELLO = {"app": BACKEND, "says": "hello from the backend"}

#: What runs each process, from the demo's directory: the demo starts them so, and
#: `--keep`'s README.md tells a user to, word for word.
COMMANDS = {
    "ca": ("ca", "serve", "--dev", "--config", "ca.yaml"),
    f"{BACKEND}-agent": ("agent", "run", "--config", f"{BACKEND}-agent.yaml"),
    f"{FRONTEND}-agent": ("agent", "run", "--config", f"{FRONTEND}-agent.yaml"),
}


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
    def start(cls, workdir: Path, name: str) -> Child:
        log = workdir / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "outrider", *COMMANDS[name]],
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


@dataclass(frozen=True)
class Ports:
    """Where each process listens on 127.0.0.1; 0 lets the kernel choose."""

    ca_grpc: int = 0
    ca_http: int = 0
    backend_inbound: int = 0
    backend_admin: int = 0
    frontend_outbound: int = 0
    frontend_admin: int = 0
    backend_app: int = 0

    @classmethod
    def free(cls, rng: random.Random) -> Ports:
        """Ports free now, for configs a user starts again later (port 0 would move).

        Outside the kernel's ephemeral range: a port from there could be given to any
        outgoing connection (an agent's, to the CA) before its server binds it.
        """
        try:
            text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
            low, high = (int(n) for n in text.split())
        except (OSError, ValueError):  # not Linux: IANA's dynamic range, macOS's too
            low, high = 49152, 65535
        outside = range(10_000, low) if low > 11_000 else range(high + 1, 65_536)
        ports: list[int] = []
        for port in rng.sample(outside, min(len(outside), 1000)):
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError:
                    continue
            ports.append(port)
            if len(ports) == len(cls.__annotations__):
                return cls(*ports)
        raise DemoFailed(f"no {len(cls.__annotations__)} free loopback ports in {outside}")


def local(port: int) -> str:
    return f"127.0.0.1:{port}"


def write_ca(workdir: Path, ttl: int, ports: Ports) -> None:
    """A fresh CA directory, a dev CA config, a dev token per workload."""
    init_ca(workdir / "ca", TRUST_DOMAIN, datetime.now(UTC), force=False)
    issuer = DevIssuer.open(workdir / "ca")
    for name in (FRONTEND, BACKEND):
        write_atomic(workdir / f"{name}.token", issuer.token(workload(name)).encode(), PRIVATE)
    config = {
        "signer": {"dir": "ca"},
        "listen": {"grpc": local(ports.ca_grpc), "http": local(ports.ca_http)},
        "serving_cert": {"names": ["localhost", "127.0.0.1"]},
        "issuance": {"default_ttl": f"{ttl}s", "max_ttl": "1h", "backdate": f"{BACKDATE}s"},
        "audit_log": "audit.log",
    }
    (workdir / "ca.yaml").write_text(yaml.safe_dump(config))


async def start_agent(
    children: list[Child], workdir: Path, name: str, ca: str, ttl: int, admin: int, **listeners: Any
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
        "admin": local(admin),
        **listeners,
    }
    (workdir / f"{name}-agent.yaml").write_text(yaml.safe_dump(config))
    agent = Child.start(workdir, f"{name}-agent")
    children.append(agent)
    ready = await agent.ready(_AGENT_READY)
    agent.bound = dict(part.split(" ", 1) for part in ready[1].split(", "))
    return agent


async def start_backend_app(workdir: Path, port: int) -> tuple[web.AppRunner, int]:
    """The backend app; also written out as files for `python3 -m http.server` by hand."""
    hello_file = workdir / BACKEND_APP_DIR / "api" / "hello"
    hello_file.parent.mkdir(parents=True)
    hello_file.write_text(json.dumps(HELLO) + "\n")

    async def hello(request: web.Request) -> web.Response:
        return web.json_response(HELLO)

    app = web.Application()
    app.router.add_route("*", "/{anything:.*}", hello)  # the policy decides, not the app
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
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


def ttl_for(duration: float) -> int:
    return max(10, math.ceil(duration))  # renewal near (ttl - BACKDATE) / 2: mid-run


async def demo(
    workdir: Path, children: list[Child], duration: float, ports: Ports
) -> tuple[list[str], list[str]]:
    """Start everything, run the traffic; the summary lines and the problems found."""
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    loop.add_signal_handler(signal.SIGTERM, main.cancel)  # `kill` cleans up like Ctrl-C
    ttl = ttl_for(duration)
    write_ca(workdir, ttl, ports)
    ca = Child.start(workdir, "ca")
    children.append(ca)
    ca_grpc, ca_http = (await ca.ready(_CA_READY)).groups()
    runner, app_port = await start_backend_app(workdir, ports.backend_app)
    try:
        (workdir / "policy.yaml").write_text(POLICY % workload(FRONTEND))
        inbound = {
            "listen": local(ports.backend_inbound),
            "app": local(app_port),
            "protocol": "http",
        }
        policy = {"files": ["policy.yaml"], "default_action": "deny"}
        backend = await start_agent(
            children,
            workdir,
            BACKEND,
            ca_grpc,
            ttl,
            ports.backend_admin,
            inbound=[inbound],
            policy=policy,
        )
        outbound = {
            "name": BACKEND,
            "listen": local(ports.frontend_outbound),
            "protocol": "http",
            "endpoints": [backend.bound["inbound[0]"]],
            "server_ids": [str(workload(BACKEND))],
        }
        frontend = await start_agent(
            children, workdir, FRONTEND, ca_grpc, ttl, ports.frontend_admin, outbound=[outbound]
        )
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
    ]
    return lines, failures(after, traffic)


# --- by hand (--keep) ----------------------------------------------------------

BY_HAND = """\
# The Outrider demo, by hand

`outrider demo --keep` made this directory on {made}: a CA for the trust
domain {trust_domain}, configs for two agents, their tokens, a policy and the
backend app's files. The demo started the CA and the agents with exactly the
`outrider` commands below. Run each command from this directory, each in its
own terminal, in this order, with `outrider` on your PATH (in the repository,
`. .venv/bin/activate` after `make demo`).

> **DEV MODE: UNSAFE OUTSIDE A LAPTOP.** The CA runs with `--dev`: it issues
> an SVID to whoever holds a dev token (the `*.token` files here, valid until
> {expiry}) without any Kubernetes check. It listens on 127.0.0.1 only and
> refuses to start in a pod. Whoever can read this directory can be any
> workload of {trust_domain}.

1. The CA, in dev mode (it logs a warning saying so):

```sh
{ca}
```

2. The backend's agent: mTLS in on {backend_inbound}, plain HTTP to the app on
   {app}, enforcing `policy.yaml` (the frontend may GET /api/*, nothing else):

```sh
{backend_agent}
```

3. The frontend's agent: plain HTTP in on {frontend_outbound}, mTLS out to the
   backend's agent, which must present {backend_id}:

```sh
{frontend_agent}
```

4. The backend app, serving the files in `{app_dir}/`:

```sh
python3 -m http.server {app_port} --bind 127.0.0.1 --directory {app_dir}
```

5. A request through both agents, as the frontend app would send it; the
   backend app answers `{hello}`:

```sh
curl -sS http://{frontend_outbound}/api/hello
```

6. A request the backend's agent denies, with 403:

```sh
curl -sS -o /dev/null -w '%{{http_code}}\\n' http://{frontend_outbound}/admin/settings
```

What to look at: each agent's `/certs` and `/metrics` on its admin port
(backend http://{backend_admin}, frontend http://{frontend_admin}), the CA's
`/metrics` on http://{ca_http}, and `audit.log`, one JSON line per SVID the CA
issued. SVIDs live {ttl}s, so they rotate as you watch; `issuance.default_ttl`
in `ca.yaml` and `identity.ttl` in the agent configs make them last longer.
The ports were free when this directory was made: if one is taken now, change
it in the YAML files and in these commands.

A token for another workload (and its own agent config), or new ones once
these expire:

```text
outrider ca dev-token --dir ca --spiffe-id spiffe://{trust_domain}/ns/demo/sa/NAME --out NAME.token
```
"""


def write_by_hand(workdir: Path, ports: Ports, ttl: int) -> None:
    """The README.md of `--keep`: the demo's own commands, and what to look at."""
    now = datetime.now(UTC)
    commands = {name: "outrider " + shlex.join(args) for name, args in COMMANDS.items()}
    text = BY_HAND.format(
        made=now.strftime("%Y-%m-%d %H:%M UTC"),
        expiry=(now + DEFAULT_TOKEN_LIFETIME - timedelta(minutes=1)).strftime("%Y-%m-%d %H:%M UTC"),
        trust_domain=TRUST_DOMAIN,
        ca=commands["ca"],
        backend_agent=commands[f"{BACKEND}-agent"],
        frontend_agent=commands[f"{FRONTEND}-agent"],
        backend_id=workload(BACKEND),
        backend_inbound=local(ports.backend_inbound),
        frontend_outbound=local(ports.frontend_outbound),
        backend_admin=local(ports.backend_admin),
        frontend_admin=local(ports.frontend_admin),
        ca_http=local(ports.ca_http),
        app=local(ports.backend_app),
        app_port=ports.backend_app,
        app_dir=BACKEND_APP_DIR,
        ttl=ttl,
        hello=json.dumps(HELLO),
    )
    (workdir / "README.md").write_text(text)


def keep_dir(keep: Path) -> Path:
    """`--keep DIR`, made now; refused when it holds anything (the demo writes keys there)."""
    try:
        keep.mkdir(parents=True, exist_ok=True)
        if any(keep.iterdir()):
            raise SystemExit(
                f"outrider demo: --keep {keep}: the directory is not empty; give a new one"
                " (the demo writes a CA and its keys there)"
            )
    except OSError as exc:
        raise SystemExit(f"outrider demo: --keep {keep}: {exc.strerror or exc}") from None
    return keep.resolve()


def run(duration: float = 20.0, keep: Path | None = None) -> None:
    """Exit 0 when no request failed and every agent rotated its SVID; 1 otherwise.

    With `keep`, run in that directory on fixed ports and leave it, README.md and all."""
    if (refused := dev_refusal(os.environ)) is not None:  # before a directory is made
        raise SystemExit(f"outrider demo: its CA runs in dev mode, so: {refused}")
    workdir = keep_dir(keep) if keep else Path(tempfile.mkdtemp(prefix="outrider-demo-"))
    try:
        ports = Ports.free(random.SystemRandom()) if keep else Ports()
    except DemoFailed as exc:
        raise SystemExit(f"outrider demo: {exc}") from None
    children: list[Child] = []
    try:
        lines, problems = asyncio.run(demo(workdir, children, duration, ports))
    except (KeyboardInterrupt, asyncio.CancelledError):
        stop_all(children)
        if keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
        print("\ninterrupted: every process stopped", file=sys.stderr)
        raise SystemExit(130) from None
    except DemoFailed as exc:
        lines, problems = [], [str(exc)]
    finally:
        stop_all(children)  # idempotent; also covers an unexpected error
    kept = "kept" if keep else "kept only on failure"
    lines.append(f"logs        {workdir}/{{ca,backend-agent,frontend-agent}}.log ({kept})")
    print("\n== summary\n" + "\n".join(lines), flush=True)
    if problems:
        print(f"demo FAILED: {'; '.join(problems)}\nlogs kept in {workdir}", file=sys.stderr)
        raise SystemExit(1)
    if keep is None:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        write_by_hand(workdir, ports, ttl_for(duration))
    print(
        "demo OK: no request failed, the policy denied what it should, and each agent"
        " rotated its SVID under traffic"
    )
    if keep is not None:
        print(f"kept in {workdir}: start it by hand with the commands in {workdir}/README.md")
    else:
        print(
            "its files are gone: `outrider demo --keep DIR` keeps them, with a README.md of"
            " the commands that start this mesh by hand"
        )
