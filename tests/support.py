"""Helpers shared by the tests: CSRs of every shape, a CA directory, a CA process."""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import os
import queue
import random
import re
import resource
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO

import grpc
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID
from prometheus_client.parser import text_string_to_metric_families

from agent.adapters.ca_client import CaClient, tls_context
from ca.authn.dev import refusal as dev_refusal
from ca.authn.fake_issuer import FakeTokenIssuer
from ca.signers.local import init_ca
from identity import TrustDomain
from identity.proto import ca_pb2

TRUST_DOMAIN = TrustDomain("example.org")
WORKLOAD = f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/web"  # the identity of token("shop", "web")
SERVER_NAME = "localhost"
#: A DENY on one header's value: what the header-name tests try to get around.
DENY_ADMIN_ROLE = """\
policies:
  - name: guard
    action: DENY
    rules:
      - name: no-admins
        when: [{header: x-role, values: [admin]}]
"""
#: `ca serve --dev` (and `outrider demo`, whose CA runs in dev mode) refuses to start
#: where the machine looks like a pod, as it must: a CI job run in a pod skips its tests.
needs_dev_mode = pytest.mark.skipif(
    dev_refusal(os.environ) is not None, reason=str(dev_refusal(os.environ))
)
_READY = re.compile(r"gRPC \(TLS\) on [^ ]+:(\d+), HTTP on [^ ]+:(\d+)")


#: Whether agents give EC keys OpenSSL's built-in method here (identity.openssl_engine):
#: on OpenSSL 3.0 with the compiled build. Tests of it skip only where it does not apply,
#: and fail where it should be on and is not.
EC_ENGINE_APPLIES = ssl.OPENSSL_VERSION_INFO[:2] == (3, 0) and (
    importlib.util.find_spec("identity._ec_methods") is not None
)


#: Ports this process has handed out, so two servers of one test never get the same one.
_HANDED_OUT: set[int] = set()
_PORTS = random.Random()  # its own generator: a test that seeds `random` doesn't repeat ports
#: Under pytest-xdist each worker process hands out only its own share of the ports
#: (every _WORKERS-th, from its index), since _HANDED_OUT cannot see the others'.
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))


def free_port() -> int:
    """A loopback port nothing listens on now, that only an explicit bind can take.

    For a server told its port in advance (one that restarts on the same port, or one
    whose address goes into another's config). A port from bind(0) would not do: it
    comes from the kernel's ephemeral range, so between the probe and the server's bind
    any outgoing connection on the machine may be given it as its local port, and the
    server then fails with "Address already in use". Ports below that range are never
    handed out by the kernel. Parallel test processes (pytest-xdist workers) draw from
    disjoint shares of the range.
    """
    low, high = (int(n) for n in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    outside = range(10_000, low) if low > 11_000 else range(high + 1, 65_536)
    outside = outside[_WORKER::_WORKERS]
    for _ in range(1000):
        port = _PORTS.choice(outside)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free loopback port in {outside}")


def make_csr(
    key: CertificateIssuerPrivateKeyTypes | None = None,
    *,
    uris: tuple[str, ...] = (),
    dns: tuple[str, ...] = (),
    ips: tuple[str, ...] = (),
    emails: tuple[str, ...] = (),
    ca: bool = False,
    common_name: str = "ignored by the CA",
) -> bytes:
    """A DER CSR; every name in it is what a hostile or confused caller might ask for."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    )
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dns]
    names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    names += [x509.RFC822Name(e) for e in emails]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
    digest = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, digest).public_bytes(serialization.Encoding.DER)


def weak_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def chain_pem(ders: list[bytes] | tuple[bytes, ...]) -> bytes:
    return b"".join(
        x509.load_der_x509_certificate(d).public_bytes(serialization.Encoding.PEM) for d in ders
    )


@dataclass
class LoopbackTls:
    """A self-signed server certificate for 127.0.0.1, trusted only through `ca_file`."""

    ca_file: Path
    server_context: ssl.SSLContext


def self_signed(
    common_name: str, dns_names: tuple[str, ...] = ()
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA certificate for 127.0.0.1 (and `dns_names`), valid for an hour."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                + [x509.DNSName(name) for name in dns_names]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def loopback_tls(directory: Path, common_name: str, dns_names: tuple[str, ...] = ()) -> LoopbackTls:
    """An HTTPS server identity for a stub on 127.0.0.1 (a JWKS endpoint, an API server)."""
    cert, key = self_signed(common_name, dns_names)
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key_pem(key))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return LoopbackTls(cert_file, context)


@dataclass
class CaSetup:
    """A CA directory, a fake token issuer it trusts, and a ca.yaml for both."""

    root: Path
    issuer: FakeTokenIssuer

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @property
    def config(self) -> Path:
        return self.root / "ca.yaml"

    @property
    def audit_log(self) -> Path:
        return self.root / "audit.log"

    @property
    def bundle_pem(self) -> bytes:
        return (self.ca_dir / "bundle.pem").read_bytes()

    def audit(self) -> list[dict[str, object]]:
        if not self.audit_log.exists():
            return []
        return [json.loads(line) for line in self.audit_log.read_text().splitlines()]

    def issued_count(self) -> int:
        return sum(1 for entry in self.audit() if entry["result"] == "issued")


def make_ca_setup(root: Path, **overrides: object) -> CaSetup:
    setup = CaSetup(root, FakeTokenIssuer())
    init_ca(setup.ca_dir, TRUST_DOMAIN, datetime.now(UTC), force=False)
    (root / "jwks.json").write_text(json.dumps(setup.issuer.jwks()))
    config: dict[str, object] = {
        "trust_domain": str(TRUST_DOMAIN),
        "signer": {"kind": "local", "dir": "ca"},
        "listen": {"grpc": "127.0.0.1:0", "http": "127.0.0.1:0"},
        "serving_cert": {"names": [SERVER_NAME, "127.0.0.1"]},
        "authn": {"kubernetes": {"issuer": setup.issuer.issuer, "jwks_file": "jwks.json"}},
        "audit_log": "audit.log",
    }
    config.update(overrides)
    setup.config.write_text(yaml.safe_dump(config))
    return setup


@dataclass
class CaProcess:
    grpc_port: int
    http_port: int
    process: subprocess.Popen[str]
    stderr: list[str]


def ca_client(setup: CaSetup, ca: CaProcess, **tls: bytes) -> CaClient:
    """Our client (grpclib); `tls` may carry the current SVID for renewal."""
    context = tls_context(setup.bundle_pem, **tls)
    return CaClient("127.0.0.1", ca.grpc_port, context, SERVER_NAME)


def grpcio_sign(channel: grpc.aio.Channel) -> grpc.aio.UnaryUnaryMultiCallable:
    """The Sign RPC through grpcio, the reference client other languages share."""
    return channel.unary_unary(
        "/outrider.ca.v1.CertificateAuthority/Sign",
        request_serializer=ca_pb2.SignRequest.SerializeToString,
        response_deserializer=ca_pb2.SignResponse.FromString,
    )


def grpcio_channel(bundle_pem: bytes, port: int) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(root_certificates=bundle_pem)
    options = [("grpc.ssl_target_name_override", SERVER_NAME)]
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, options)


def wait_for_line(
    process: subprocess.Popen[str],
    pattern: re.Pattern[str],
    seen: list[str],
    timeout: float,
    what: str,
) -> re.Match[str]:
    """Read `process`'s stderr into `seen` until a line matches, for at most `timeout`
    seconds (a process that says nothing, or stops mid-line, fails then: it never hangs
    the suite); the reading goes on in a thread, which keeps draining the pipe after, so
    a chatty process never blocks on a full one."""
    assert process.stderr is not None
    lines: queue.Queue[str | None] = queue.Queue()

    def read(stream: IO[str]) -> None:
        for line in stream:
            seen.append(line)
            lines.put(line)
        lines.put(None)  # the pipe closed: the process ended

    threading.Thread(target=read, args=(process.stderr,), daemon=True).start()
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            break
        if match := pattern.search(line):
            return match
    process.kill()
    raise AssertionError(f"{what} did not start in {timeout:g}s:\n" + "".join(seen))


def waited_for_a_cpu(pid: int | None = None, tid: int | None = None) -> float:
    """Seconds a thread has spent runnable but not running (Linux schedstat): on a busy
    machine, the time the scheduler took from it, not time its own code, a blocking call
    or a lock held it. Default: the calling thread; a process's main thread is `tid=pid`."""
    if pid is None:
        pid, tid = os.getpid(), threading.get_native_id()
    with open(f"/proc/{pid}/task/{tid or pid}/schedstat", "rb") as stat:
        return int(stat.read().split()[1]) / 1e9


def soft_fd_limit(soft: int | None) -> Callable[[], None] | None:
    """For Popen's preexec_fn: start the child with this soft open-file limit."""
    if soft is None:
        return None
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@contextmanager
def ca_process(
    config: Path,
    timeout: float = 20.0,
    *,
    fd_limit: int | None = None,
    prefix: Sequence[str] = (),
    dev: bool = False,
) -> Iterator[CaProcess]:
    """`outrider ca serve` as a real process; stopped with SIGTERM, which must exit 0.

    `fd_limit` is the soft open-file limit it starts with (default: ours).
    `prefix` goes before the command line: `Pod.prefix` (tests.netns) runs it in a pod.
    `dev`: `ca serve --dev`.
    """
    serve = ["ca", "serve", "--config", str(config), *(["--dev"] if dev else [])]
    process = subprocess.Popen(
        [*prefix, sys.executable, "-m", "outrider", *serve],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=soft_fd_limit(fd_limit),  # setrlimit only: safe before exec
    )
    seen: list[str] = []
    match = wait_for_line(process, _READY, seen, timeout, "CA")
    try:
        yield CaProcess(int(match[1]), int(match[2]), process, seen)
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=10)
        assert code == 0, f"CA exited {code} on SIGTERM"


def run_outrider(
    *args: str | Path,
    stdin: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """`outrider ARGS` as a user runs it, in a process of its own: exit code, stdout, stderr."""
    return subprocess.run(
        [sys.executable, "-m", "outrider", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        input=stdin,
        env=env,
    )


def whole_milliseconds(seconds: float) -> bool:
    """`seconds` (a histogram's sum) is a whole number of milliseconds, as it is when every
    observation it adds up came from a millisecond clock such as uvloop's `loop.time()`."""
    ms = seconds * 1000
    return abs(ms - round(ms)) < 1e-6


def scraped(text: str, name: str, **labels: str) -> float:
    """One sample from a /metrics page (Prometheus text); 0 when absent."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def ca_metrics_page(ca: CaProcess) -> str:
    """The CA's /metrics, as Prometheus scrapes it."""
    with urllib.request.urlopen(f"http://127.0.0.1:{ca.http_port}/metrics", timeout=5) as page:
        return str(page.read().decode())


def ca_metric(ca: CaProcess, name: str, **labels: str) -> float:
    return scraped(ca_metrics_page(ca), name, **labels)


def fill_disk(disk: Path, leave: int) -> None:
    """Take every free byte of the filesystem at `disk` but `leave` (into `disk/filler`)."""
    stat = os.statvfs(disk)
    (disk / "filler").write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - leave))
