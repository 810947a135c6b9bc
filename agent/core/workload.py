"""What the Workload API and SDS answer, and whom: plain functions over the SVID handed out.

The agent hands its pod's app an SVID of the pod's identity with a key of its
own (never the agent's: agent/adapters/workload_api.py mints it), over a Unix
socket only the pod's containers can reach. Both APIs say the same thing in
two vocabularies:

- the SPIFFE Workload API (`X509SVIDResponse`, `X509BundlesResponse`): DER,
  certificates concatenated, the key as PKCS#8;
- Envoy's SDS: `Secret`s by name, PEM inline, the SVID as a `tls_certificate`
  and the bundle as a `validation_context`, named as SPIRE's agent names them
  ("default" and the SPIFFE ID for the SVID, "ROOTCA" and the trust domain's
  ID for the bundle), so an Envoy set up for SPIRE works unchanged.

Who may ask: the SPIFFE spec's security header on every Workload API call, and
peer credentials (SO_PEERCRED) the kernel vouches for on every connection.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from google.protobuf import any_pb2

from agent.core.svid import Svid
from identity import SpiffeId, TrustBundle, TrustDomain
from identity.chain import ChainError, check_chain
from identity.proto import envoy_core_pb2, envoy_discovery_pb2, envoy_tls_pb2, workload_pb2

#: The SPIFFE Workload API spec: every call carries `workload.spiffe.io: true`, so that a
#: server-side request forgery through some HTTP client cannot reach the API.
SECURITY_HEADER = "workload.spiffe.io"
#: The spec's words for the refusal (its status: INVALID_ARGUMENT).
MISSING_HEADER = "security header missing from request"

SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"  # noqa: S105
#: SPIRE's default names: an Envoy configured for SPIRE's SDS asks for these.
SVID_SECRET, BUNDLE_SECRET = "default", "ROOTCA"

Kind = Literal["tls_certificate", "validation_context"]


def header_refusal(metadata: Mapping[str, str]) -> str | None:
    """Why a Workload API call is refused for its metadata; None when it may go on."""
    if metadata.get(SECURITY_HEADER) != "true":
        return MISSING_HEADER
    return None


@dataclass(frozen=True)
class PeerCredentials:
    """SO_PEERCRED of a caller's connection, as the agent's namespaces see them.

    `pid` is 0 for a caller in another container's PID namespace (the usual case
    in a pod without shareProcessNamespace); `uid` and `gid` are the caller's.
    """

    pid: int
    uid: int
    gid: int


def caller_refusal(
    credentials: PeerCredentials | None, uids: frozenset[int] = frozenset()
) -> str | None:
    """Why a connection's caller is refused; None when it may call.

    One pod, one identity: whoever reaches the socket is in the pod (the socket
    lives in a volume only the pod's containers mount) and gets the pod's SVID,
    unless `uids` names the only UIDs to serve (a pod whose log shipper or debug
    container runs as another user than its app). A caller the kernel gives no
    credentials for did not come through a Unix socket of this host at all.
    """
    if credentials is None:
        return "no peer credentials: only a process on the pod's Unix socket may call"
    if uids and credentials.uid not in uids:
        return f"uid {credentials.uid} is not one of workload_api.uids"
    return None


def unusable_refusal(svid: Svid, now: datetime) -> str | None:
    """Why the SVID cannot be handed out now; None while it may.

    Expired, or not leading to the roots it goes out with (its root removed from
    the bundle while the CA signed no new one): no peer would accept it, and an
    app handed it fails every handshake without knowing why. Refused with
    UNAVAILABLE, the spec's clients back off, call again, and get the next one the
    CA signs. The bundle alone still goes out: it does not depend on the SVID.
    """
    if now >= svid.not_after:
        expired = svid.not_after.isoformat(timespec="seconds")
        return f"no valid SVID to hand out: the last expired at {expired}, none signed since"
    try:
        check_chain(svid.chain, svid.bundle)
    except ChainError as exc:
        return f"no valid SVID to hand out: the last does not lead to the trust bundle ({exc})"
    return None


def x509_svid_response(svid: Svid) -> workload_pb2.X509SVIDResponse:
    """FetchX509SVID's answer: the one SVID, its key, and the roots of its trust domain."""
    return workload_pb2.X509SVIDResponse(
        svids=[
            workload_pb2.X509SVID(
                spiffe_id=str(svid.spiffe_id),
                x509_svid=b"".join(cert.der for cert in svid.chain),
                x509_svid_key=svid.key.der,
                bundle=b"".join(svid.bundle.to_der()),
            )
        ]
    )


def x509_bundles_response(bundle: TrustBundle) -> workload_pb2.X509BundlesResponse:
    """FetchX509Bundles' answer: the roots, by trust domain ID (one: no federation).

    The agent's bundle alone: it goes out before any SVID is handed out, and after
    the last one expired."""
    return workload_pb2.X509BundlesResponse(
        bundles={_trust_domain_id(bundle.trust_domain): b"".join(bundle.to_der())}
    )


def secret_kind(name: str, spiffe_id: SpiffeId) -> Kind | None:
    """What the SDS secret `name` is, for the pod `spiffe_id`; None for a name not served."""
    if name in (SVID_SECRET, str(spiffe_id)):
        return "tls_certificate"
    if name in (BUNDLE_SECRET, _trust_domain_id(spiffe_id.trust_domain)):
        return "validation_context"
    return None


def unserved(names: Sequence[str], spiffe_id: SpiffeId) -> list[str]:
    """The names asked for that the agent does not serve (each once, in order; "" ignored).

    SPIRE's SDS refuses such a request (INVALID_ARGUMENT, "workload is not authorized
    for the requested identities"), and so does the agent: a typo or another
    workload's ID is said to Envoy, which logs it, rather than left for it to wait on.
    """
    return [name for name in dict.fromkeys(names) if name and secret_kind(name, spiffe_id) is None]


def unserved_refusal(names: Sequence[str], spiffe_id: SpiffeId) -> str:
    bundle_id = _trust_domain_id(spiffe_id.trust_domain)
    served = f"{SVID_SECRET} or {spiffe_id}, {BUNDLE_SECRET} or {bundle_id}"
    return f"secrets not served here: {', '.join(map(repr, names))} (served: {served})"


def _wanted(names: Sequence[str]) -> list[str]:
    return list(dict.fromkeys([name for name in names if name] or [SVID_SECRET, BUNDLE_SECRET]))


def needs_svid(names: Sequence[str], spiffe_id: SpiffeId) -> bool:
    """Whether an SDS answer for `names` holds the SVID (a bundle alone does not wait on it)."""
    return any(secret_kind(name, spiffe_id) == "tls_certificate" for name in _wanted(names))


def secrets(
    names: Sequence[str], spiffe_id: SpiffeId, bundle: TrustBundle, svid: Svid | None
) -> list[envoy_tls_pb2.Secret]:
    """The secrets asked for (none asked: the SVID and the bundle, by their default names);
    a name it does not serve (see `unserved`) is not in the answer. `svid` may be None
    only when no name asks for it (see `needs_svid`)."""
    found: list[envoy_tls_pb2.Secret] = []
    for name in _wanted(names):
        kind = secret_kind(name, spiffe_id)
        if kind == "tls_certificate":
            assert svid is not None, "secrets() asked for the SVID without one"
            found.append(
                envoy_tls_pb2.Secret(
                    name=name,
                    tls_certificate=envoy_tls_pb2.TlsCertificate(
                        certificate_chain=_inline(svid.chain_pem()),
                        private_key=_inline(svid.key_pem()),
                    ),
                )
            )
        elif kind == "validation_context":
            found.append(
                envoy_tls_pb2.Secret(
                    name=name,
                    validation_context=envoy_tls_pb2.CertificateValidationContext(
                        trusted_ca=_inline(bundle.to_pem())
                    ),
                )
            )
    return found


def keys_in(found: Sequence[envoy_tls_pb2.Secret]) -> int:
    """How many private keys an SDS answer hands out."""
    return sum(1 for secret in found if secret.HasField("tls_certificate"))


def discovery_response(
    found: Sequence[envoy_tls_pb2.Secret], version: str, nonce: str
) -> envoy_discovery_pb2.DiscoveryResponse:
    resources = [
        any_pb2.Any(type_url=SECRET_TYPE, value=secret.SerializeToString()) for secret in found
    ]
    return envoy_discovery_pb2.DiscoveryResponse(
        version_info=version, resources=resources, type_url=SECRET_TYPE, nonce=nonce
    )


def _inline(data: bytes) -> envoy_core_pb2.DataSource:
    return envoy_core_pb2.DataSource(inline_bytes=data)


def _trust_domain_id(trust_domain: TrustDomain) -> str:
    return f"spiffe://{trust_domain}"
