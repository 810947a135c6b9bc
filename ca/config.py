"""ca.yaml -> CaConfig, in one function that reports every error with its key path.

Example (every key but signer.dir and authn.kubernetes has a default):

    trust_domain: example.org          # checked against the CA directory
    signer: {kind: local, dir: ./ca}   # relative paths are from this file
    # or, with the root in Vault (trust_domain is then required):
    # signer:
    #   kind: vault
    #   mode: intermediate             # or per-certificate
    #   address: https://vault.vault.svc:8200
    #   ca_file: vault-ca.pem          # trust for Vault's TLS (default: the system's)
    #   mount: pki
    #   role: outrider-svid            # per-certificate: signs the SVIDs
    #   serving_role: outrider-ca      # per-certificate: signs the CA's own TLS cert
    #   intermediate_ttl: 24h          # intermediate: renewed at half its life
    #   name_constraints: false        # intermediate: ask for (and require) a critical
    #                                  # URI name constraint to the trust domain
    #   timeout: 10s
    #   auth: {method: kubernetes, role: outrider-ca}  # or approle, or token
    listen: {grpc: 0.0.0.0:8443, http: 0.0.0.0:8080}
    serving_cert: {names: [outrider-ca.outrider-system.svc, localhost], ttl: 24h}
    issuance: {default_ttl: 1h, max_ttl: 24h, backdate: 60s}
    authn:
      kubernetes:
        issuer: https://kubernetes.default.svc.cluster.local
        audience: outrider-ca
        jwks_file: jwks.json            # or jwks_url: https://... (+ jwks_ca_file)
        jwks_refresh: 5m
        leeway: 30s
    audit_log: "-"                     # stdout, or a file path
    limits:                            # what a caller can hold before it is authenticated
      max_connections: 1000            # per port, TLS handshakes included; more are closed
      handshake_timeout: 10s
      idle_timeout: 60s                # a connection with no request answered this long
      max_message_bytes: 16384         # one gRPC message (a CSR is at most ~2.3 KB)
      max_concurrent_streams: 4        # per connection

With `outrider ca serve --dev` (a laptop only: ca/authn/dev.py) there is no
`authn` section: the CA trusts the dev token issuer of `signer.dir`, and
listens on loopback addresses only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, get_args

from ca.core.issuance import IssuancePolicy
from identity import InvalidSpiffeId, TrustDomain
from identity.configfile import ConfigError, ConfigReader, Listen, is_loopback, read_yaml
from identity.grpcserving import GrpcLimits
from identity.serving import ConnectionLimits, read_limits

#: What a missing `jwks_file` means, said by `ca validate` and at start.
JWKS_READ = "read at every call; until it is, every token is refused jwks_unavailable"


@dataclass(frozen=True)
class TokenReviewSettings:
    """Ask the API server (TokenReview) instead of verifying tokens offline."""

    kubeconfig: Path | None = None  # None: the in-cluster config of the CA's own pod
    cache_ttl: timedelta = timedelta(seconds=10)
    require_pod_binding: bool = True


@dataclass(frozen=True)
class KubernetesAuthn:
    issuer: str
    audience: str = "outrider-ca"
    jwks_file: Path | None = None
    jwks_url: str | None = None
    jwks_ca_file: Path | None = None
    jwks_refresh: timedelta = timedelta(minutes=5)
    leeway: timedelta = timedelta(seconds=30)
    tokenreview: TokenReviewSettings | None = None


VaultMode = Literal["intermediate", "per-certificate"]
VaultAuthMethod = Literal["token", "approle", "kubernetes"]
SA_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")


@dataclass(frozen=True)
class VaultAuth:
    """How the CA logs in to Vault; secrets are read from files, never from the config."""

    method: VaultAuthMethod = "kubernetes"
    mount: str = "kubernetes"  # where the auth method is mounted
    token_file: Path | None = None  # token
    role_id: str | None = None  # approle
    secret_id_file: Path | None = None  # approle
    role: str | None = None  # kubernetes
    jwt_file: Path = SA_TOKEN  # kubernetes: the CA's own projected token


@dataclass(frozen=True)
class VaultSettings:
    address: str
    auth: VaultAuth
    mode: VaultMode = "intermediate"
    mount: str = "pki"
    role: str = "outrider-svid"
    serving_role: str = "outrider-ca"
    intermediate_ttl: timedelta = timedelta(hours=24)
    name_constraints: bool = False  # intermediate mode: a critical URI name constraint
    ca_file: Path | None = None
    timeout: timedelta = timedelta(seconds=10)


@dataclass(frozen=True)
class CaLimits:
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)
    grpc: GrpcLimits = field(default_factory=GrpcLimits)


MIN_MESSAGE_BYTES = 4096  # below this the largest CSR the CA accepts would not fit


@dataclass(frozen=True)
class CaConfig:
    signer_dir: Path | None
    kubernetes: KubernetesAuthn | None  # None only in dev mode
    trust_domain: TrustDomain | None = None
    grpc: Listen = Listen("0.0.0.0", 8443)  # noqa: S104 - a CA serves the cluster
    http: Listen = Listen("0.0.0.0", 8080)  # noqa: S104
    serving_names: tuple[str, ...] = ("outrider-ca.outrider-system.svc", "localhost")
    serving_ttl: timedelta = timedelta(hours=24)
    issuance: IssuancePolicy = field(default_factory=IssuancePolicy)
    audit_log: str = "-"
    vault: VaultSettings | None = None
    limits: CaLimits = field(default_factory=CaLimits)
    #: `ca serve --dev`: dev tokens (ca/authn/dev.py) instead of Kubernetes authn.
    dev: bool = False


_VAULT_KEYS = set(VaultSettings.__annotations__)
_VAULT_AUTH_KEYS = set(VaultAuth.__annotations__)
_LIMIT_KEYS = set(ConnectionLimits.__annotations__) | set(GrpcLimits.__annotations__)


def load(path: Path, *, dev: bool = False) -> CaConfig:
    """Read and validate `path`; raise ConfigError listing every problem.

    `dev`: for `ca serve --dev`, which has no `authn` and serves loopback only."""
    return parse(read_yaml(path), base=path.parent, source=str(path), dev=dev)


def parse(raw: object, *, base: Path, source: str = "config", dev: bool = False) -> CaConfig:
    reader = _Reader(base, dev)
    config = reader.config(raw)
    if reader.errors or config is None:
        raise ConfigError(source, reader.errors)
    return config


class _Reader(ConfigReader):
    def __init__(self, base: Path, dev: bool) -> None:
        super().__init__(base)
        self.dev = dev

    def config(self, raw: object) -> CaConfig | None:
        if not isinstance(raw, Mapping):
            self.fail("(top)", "the config must be a YAML mapping")
            return None
        known = {"trust_domain", "signer", "listen", "serving_cert", "issuance", "authn", "limits"}
        for unknown in sorted(set(raw) - known - {"audit_log"}):
            self.fail(unknown, "unknown key")
        trust_domain = self.trust_domain(raw)
        signer = self.section(raw, "signer", {"kind", "dir"} | _VAULT_KEYS)
        kind = signer.get("kind", "local")
        signer_dir, vault = None, None
        if kind == "local":
            for key in sorted(set(signer) & _VAULT_KEYS):
                self.fail(f"signer.{key}", "only for kind: vault")
            signer_dir = self.file(signer, "dir", "signer.dir")
            if signer_dir is None:
                self.fail("signer.dir", "required: the directory made by `outrider ca init`")
        elif kind == "vault":
            if "dir" in signer:
                self.fail("signer.dir", "only for kind: local")
            if trust_domain is None:
                self.fail("trust_domain", "required with signer kind vault")
            vault = self.vault(signer)
        else:
            self.fail("signer.kind", f"{kind!r} is not a signer (local or vault)")
        listen = self.section(raw, "listen", {"grpc", "http"})
        grpc = self.listen(listen, "grpc", "listen.grpc", CaConfig.grpc)
        http = self.listen(listen, "http", "listen.http", CaConfig.http)
        serving = self.section(raw, "serving_cert", {"names", "ttl"})
        names = self.names(serving)
        serving_ttl = self.duration(serving, "ttl", "serving_cert.ttl", CaConfig.serving_ttl)
        issuance = self.issuance(
            self.section(raw, "issuance", {"default_ttl", "max_ttl", "backdate"})
        )
        kubernetes = None
        if self.dev:
            self.dev_mode(raw, kind, grpc, http)
        else:
            kubernetes = self.kubernetes(self.section(raw, "authn", {"kubernetes"}))
        audit_log = self.string(raw, "audit_log", "audit_log", "-") or "-"
        limits = self.limits(self.section(raw, "limits", _LIMIT_KEYS))
        if self.errors or (signer_dir is None and vault is None):
            return None
        if kubernetes is None and not self.dev:
            return None
        return CaConfig(
            signer_dir=signer_dir,
            kubernetes=kubernetes,
            trust_domain=trust_domain,
            grpc=grpc,
            http=http,
            serving_names=names,
            serving_ttl=serving_ttl,
            issuance=issuance,
            audit_log=audit_log if audit_log == "-" else str(self.base / audit_log),
            vault=vault,
            limits=limits,
            dev=self.dev,
        )

    def dev_mode(self, raw: Mapping[str, Any], kind: object, grpc: Listen, http: Listen) -> None:
        """What --dev asks of the rest of the file: no authn, the local key, loopback only."""
        if "authn" in raw:
            self.fail(
                "authn",
                "not read with --dev, which trusts dev tokens (`outrider ca dev-token`) only:"
                " remove it, or run without --dev",
            )
        if kind != "local":
            self.fail("signer.kind", "--dev needs kind: local (the dev issuer's key is in its dir)")
        for name, listen in (("grpc", grpc), ("http", http)):
            if not is_loopback(listen.host):
                self.fail(
                    f"listen.{name}",
                    f"{listen} is not a loopback address: --dev serves this machine only"
                    " (127.0.0.1, ::1 or localhost)",
                )

    def limits(self, raw: Mapping[str, Any]) -> CaLimits:
        d = GrpcLimits()
        grpc = GrpcLimits(
            max_message_bytes=self.integer(
                raw,
                "max_message_bytes",
                "limits.max_message_bytes",
                d.max_message_bytes,
                minimum=MIN_MESSAGE_BYTES,
            ),
            max_concurrent_streams=self.integer(
                raw,
                "max_concurrent_streams",
                "limits.max_concurrent_streams",
                d.max_concurrent_streams,
            ),
        )
        return CaLimits(read_limits(self, raw, "limits", ConnectionLimits()), grpc)

    def vault(self, raw: Mapping[str, Any]) -> VaultSettings | None:
        d = VaultSettings(address="", auth=VaultAuth())
        address = self.string(raw, "address", "signer.address", None)
        if address is None:
            self.fail("signer.address", "required: Vault's URL, e.g. https://vault.vault.svc:8200")
        elif not address.startswith(("https://", "http://")):
            self.fail("signer.address", f"{address!r} is not an http(s):// URL")
        mode = raw.get("mode", d.mode)
        if mode not in get_args(VaultMode):
            self.fail("signer.mode", f"{mode!r} is not intermediate or per-certificate")
        auth = self.vault_auth(self.section(raw, "signer.auth", _VAULT_AUTH_KEYS))
        name_constraints = raw.get("name_constraints", d.name_constraints)
        if not isinstance(name_constraints, bool):
            self.fail("signer.name_constraints", "must be true or false")
        elif name_constraints and mode == "per-certificate":
            self.fail("signer.name_constraints", "only for mode: intermediate")
        settings = VaultSettings(
            address=address or "",
            auth=auth or d.auth,
            mode=mode,
            mount=self.string(raw, "mount", "signer.mount", d.mount) or d.mount,
            role=self.string(raw, "role", "signer.role", d.role) or d.role,
            serving_role=self.string(raw, "serving_role", "signer.serving_role", d.serving_role)
            or d.serving_role,
            intermediate_ttl=self.duration(
                raw, "intermediate_ttl", "signer.intermediate_ttl", d.intermediate_ttl
            ),
            name_constraints=name_constraints is True,
            ca_file=self.file(raw, "ca_file", "signer.ca_file"),
            timeout=self.duration(raw, "timeout", "signer.timeout", d.timeout),
        )
        return settings if address and auth else None

    def vault_auth(self, raw: Mapping[str, Any]) -> VaultAuth | None:
        method = raw.get("method", VaultAuth.method)
        if method not in get_args(VaultAuthMethod):
            self.fail("signer.auth.method", f"{method!r} is not token, approle or kubernetes")
            return None
        path = "signer.auth"
        wanted = {"token": {"token_file"}, "approle": {"role_id", "secret_id_file"}}
        wanted["kubernetes"] = {"role"}
        for key in sorted(wanted[method] - set(raw)):
            self.fail(f"{path}.{key}", f"required with method {method}")
        for key in sorted(set(raw) & (_VAULT_AUTH_KEYS - {"method", "mount"} - wanted[method])):
            if not (method == "kubernetes" and key == "jwt_file"):
                self.fail(f"{path}.{key}", f"not used by method {method}")
        return VaultAuth(
            method=method,
            mount=self.string(raw, "mount", f"{path}.mount", method) or method,
            token_file=self.file(raw, "token_file", f"{path}.token_file"),
            role_id=self.string(raw, "role_id", f"{path}.role_id", None),
            secret_id_file=self.file(raw, "secret_id_file", f"{path}.secret_id_file"),
            role=self.string(raw, "role", f"{path}.role", None),
            jwt_file=self.file(raw, "jwt_file", f"{path}.jwt_file") or SA_TOKEN,
        )

    def trust_domain(self, raw: Mapping[str, Any]) -> TrustDomain | None:
        if "trust_domain" not in raw:
            return None
        try:
            return TrustDomain.parse(str(raw["trust_domain"]))
        except InvalidSpiffeId as exc:
            self.fail("trust_domain", str(exc))
            return None

    def names(self, serving: Mapping[str, Any]) -> tuple[str, ...]:
        names = serving.get("names", list(CaConfig.serving_names))
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            self.fail("serving_cert.names", "must be a non-empty list of DNS names or IPs")
            return CaConfig.serving_names
        return tuple(names)

    def issuance(self, raw: Mapping[str, Any]) -> IssuancePolicy:
        defaults = IssuancePolicy()
        policy = IssuancePolicy(
            default_ttl=self.duration(
                raw, "default_ttl", "issuance.default_ttl", defaults.default_ttl
            ),
            max_ttl=self.duration(raw, "max_ttl", "issuance.max_ttl", defaults.max_ttl),
            backdate=self.duration(
                raw, "backdate", "issuance.backdate", defaults.backdate, zero_ok=True
            ),
        )
        if policy.default_ttl > policy.max_ttl:
            self.fail("issuance.default_ttl", f"exceeds max_ttl ({policy.max_ttl})")
        return policy

    def kubernetes(self, authn: Mapping[str, Any]) -> KubernetesAuthn | None:
        known = {
            "issuer",
            "audience",
            "jwks_file",
            "jwks_url",
            "jwks_ca_file",
            "jwks_refresh",
            "leeway",
            "tokenreview",
        }
        if "kubernetes" not in authn:
            self.fail(
                "authn.kubernetes",
                "required: the token issuer and its JWKS (on a laptop without a cluster:"
                " `outrider ca serve --dev`, docs/operations.md#dev-mode)",
            )
            return None
        raw = self.section(authn, "authn.kubernetes", known)
        path = "authn.kubernetes"
        review = self.tokenreview(raw) if "tokenreview" in raw else None
        issuer = self.string(raw, "issuer", f"{path}.issuer", None)
        if issuer is None and review is None:
            self.fail(f"{path}.issuer", "required: the cluster's service-account issuer URL")
        jwks_file = self.file(raw, "jwks_file", f"{path}.jwks_file")
        jwks_url = self.string(raw, "jwks_url", f"{path}.jwks_url", None)
        if review is not None and (jwks_file or jwks_url):
            self.fail(f"{path}.tokenreview", "use either tokenreview or a JWKS, not both")
        elif review is None and (jwks_file is None) == (jwks_url is None):
            self.fail(f"{path}.jwks_file", "set exactly one of jwks_file, jwks_url, tokenreview")
        if jwks_url is not None and not jwks_url.startswith("https://"):
            self.fail(f"{path}.jwks_url", "must be an https:// URL")
        defaults = KubernetesAuthn(issuer="")
        return KubernetesAuthn(
            issuer=issuer or "",
            audience=self.string(raw, "audience", f"{path}.audience", "outrider-ca") or "",
            jwks_file=jwks_file,
            jwks_url=jwks_url,
            jwks_ca_file=self.file(raw, "jwks_ca_file", f"{path}.jwks_ca_file"),
            jwks_refresh=self.duration(
                raw, "jwks_refresh", f"{path}.jwks_refresh", defaults.jwks_refresh
            ),
            leeway=self.duration(raw, "leeway", f"{path}.leeway", defaults.leeway, zero_ok=True),
            tokenreview=review,
        )

    def tokenreview(self, authn: Mapping[str, Any]) -> TokenReviewSettings:
        path = "authn.kubernetes.tokenreview"
        raw = self.section(authn, path, set(TokenReviewSettings.__annotations__))
        d = TokenReviewSettings()
        binding = self.flag(
            raw, "require_pod_binding", f"{path}.require_pod_binding", d.require_pod_binding
        )
        return TokenReviewSettings(
            kubeconfig=self.file(raw, "kubeconfig", f"{path}.kubeconfig"),
            cache_ttl=self.duration(raw, "cache_ttl", f"{path}.cache_ttl", d.cache_ttl),
            require_pod_binding=binding,
        )
