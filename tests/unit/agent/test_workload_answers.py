"""What the Workload API and SDS answer (agent/core/workload.py), and the `workload_api` key."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.config import ConfigError, WorkloadApiConfig, parse
from agent.core import workload
from agent.core.svid import Svid
from identity.proto import envoy_tls_pb2
from tests.unit.agent.test_config import minimal


@pytest.mark.parametrize(
    ("metadata", "refused"),
    [
        ({"workload.spiffe.io": "true"}, False),
        ({}, True),
        ({"workload.spiffe.io": "True"}, True),  # the spec's value is the string "true"
        ({"workload.spiffe.io": "1"}, True),
    ],
)
def test_the_security_header_must_say_true(metadata: dict[str, str], refused: bool) -> None:
    assert (workload.header_refusal(metadata) == workload.MISSING_HEADER) is refused


APP = workload.PeerCredentials(pid=0, uid=1000, gid=1000)  # pid 0: another PID namespace


@pytest.mark.parametrize(
    ("credentials", "uids", "refused"),
    [
        (None, frozenset(), True),  # not a Unix socket's caller
        (APP, frozenset(), False),  # one pod, one identity: every process of the pod
        (APP, frozenset({1000}), False),
        (APP, frozenset({1001, 0}), True),  # only the UIDs listed
    ],
)
def test_callers_are_attested_by_their_peer_credentials(
    credentials: workload.PeerCredentials | None, uids: frozenset[int], refused: bool
) -> None:
    assert (workload.caller_refusal(credentials, uids) is not None) is refused


def test_the_x509_svid_answer_carries_the_chain_its_key_and_the_roots(svid: Svid) -> None:
    (answer,) = workload.x509_svid_response(svid).svids
    assert answer.spiffe_id == str(svid.spiffe_id)
    leaf_der = svid.leaf.der
    assert answer.x509_svid.startswith(leaf_der) and len(answer.x509_svid) > len(leaf_der)
    assert answer.x509_svid_key == svid.key.der
    key = serialization.load_der_private_key(answer.x509_svid_key, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert answer.bundle == b"".join(svid.bundle.to_der())


def test_the_bundles_answer_is_keyed_by_the_trust_domain_id(svid: Svid) -> None:
    answer = workload.x509_bundles_response(svid.bundle)
    assert dict(answer.bundles) == {"spiffe://example.org": b"".join(svid.bundle.to_der())}


@pytest.mark.parametrize(
    ("names", "served"),
    [
        ([], ["default", "ROOTCA"]),  # none asked: both, by their default names
        (["default"], ["default"]),
        (["spiffe://example.org/ns/shop/sa/web", "spiffe://example.org"], None),
        (["ROOTCA", "ROOTCA"], ["ROOTCA"]),  # repeats once
    ],
)
def test_sds_serves_the_names_spire_serves(
    svid: Svid, names: list[str], served: list[str] | None
) -> None:
    found = workload.secrets(names, svid.spiffe_id, svid.bundle, svid)
    assert [s.name for s in found] == (names if served is None else served)


@pytest.mark.parametrize(
    ("names", "unserved"),
    [
        ([], []),
        (["default", "ROOTCA", ""], []),
        (["ROOTCA", "unknown", "unknown"], ["unknown"]),
        (["spiffe://example.org/ns/shop/sa/other"], ["spiffe://example.org/ns/shop/sa/other"]),
        (["spiffe://example.org.evil", "DEFAULT"], ["spiffe://example.org.evil", "DEFAULT"]),
    ],
)
def test_sds_names_the_agent_does_not_serve_are_found(
    svid: Svid, names: list[str], unserved: list[str]
) -> None:
    assert workload.unserved(names, svid.spiffe_id) == unserved


def test_sds_secrets_hold_pem_inline_and_only_the_svid_holds_a_key(svid: Svid) -> None:
    found = workload.secrets([], svid.spiffe_id, svid.bundle, svid)
    certificate, roots = found
    assert certificate.tls_certificate.certificate_chain.inline_bytes == svid.chain_pem()
    assert certificate.tls_certificate.private_key.inline_bytes == svid.key_pem()
    assert roots.validation_context.trusted_ca.inline_bytes == svid.bundle.to_pem()
    assert workload.keys_in(found) == 1
    assert x509.load_pem_x509_certificates(roots.validation_context.trusted_ca.inline_bytes)


def test_a_discovery_response_is_typed_as_envoys_secret(svid: Svid) -> None:
    response = workload.discovery_response(
        workload.secrets([], svid.spiffe_id, svid.bundle, svid), "1-ab", "n1"
    )
    assert response.type_url == workload.SECRET_TYPE
    assert {r.type_url for r in response.resources} == {workload.SECRET_TYPE}
    assert envoy_tls_pb2.Secret.FromString(response.resources[0].value).name == "default"
    assert (response.version_info, response.nonce) == ("1-ab", "n1")


def test_workload_api_is_read_with_its_socket_relative_to_the_config() -> None:
    config = parse({**minimal(), "workload_api": {"socket": "run/socket"}}, base=Path("/etc/o"))
    assert config.workload_api == WorkloadApiConfig(Path("/etc/o/run/socket"))
    section = {"socket": "/run/socket", "uids": [1000, 0]}
    config = parse({**minimal(), "workload_api": section}, base=Path("/etc/o"))
    assert config.workload_api == WorkloadApiConfig(Path("/run/socket"), frozenset({0, 1000}))
    assert parse(minimal(), base=Path("/etc/o")).workload_api is None


@pytest.mark.parametrize(
    ("section", "error"),
    [
        ({}, "workload_api.socket: required"),
        ({"socket": "/" + "s" * 120}, "workload_api.socket: /sss"),
        ({"socket": "/run/s", "mode": "0777"}, "workload_api.mode"),
        ({"socket": "/run/s", "uids": [1000, "app"]}, "workload_api.uids[1]: a UID"),
        ({"socket": "/run/s", "uids": [-1]}, "workload_api.uids[0]: a UID"),
        ({"socket": "/run/s", "uids": 1000}, "workload_api.uids: must be a list"),
    ],
)
def test_a_bad_workload_api_section_is_refused_with_its_key_path(
    section: dict[str, str], error: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        parse({**minimal(), "workload_api": section}, base=Path("/etc/o"))
    assert any(line.startswith(error) for line in refused.value.errors), refused.value.errors


def test_the_bundle_alone_is_served_without_an_svid(svid: Svid) -> None:
    """Before the first SVID is minted: an SDS answer that names only the bundle needs none."""
    assert not workload.needs_svid(["ROOTCA"], svid.spiffe_id)
    assert workload.needs_svid([], svid.spiffe_id)  # none named: both, the SVID among them
    assert workload.needs_svid([str(svid.spiffe_id)], svid.spiffe_id)
    (roots,) = workload.secrets(["ROOTCA"], svid.spiffe_id, svid.bundle, None)
    assert roots.validation_context.trusted_ca.inline_bytes == svid.bundle.to_pem()
