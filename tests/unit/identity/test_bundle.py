"""Trust bundles: construction rules and the PEM, DER and SPIFFE JSON encodings."""

from __future__ import annotations

import base64
import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
)
from cryptography.x509.oid import NameOID

from identity.bundle import BundleError, TrustBundle
from identity.cert import Cert
from identity.spiffe_id import TrustDomain

TD = TrustDomain("example.org")
START = datetime(2030, 1, 1, tzinfo=UTC)

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def make_cert(key: SigningKey, *, name: str, days: int = 365, ca: bool = True) -> Cert:
    """A self-signed certificate (built by cryptography, read by OpenSSL); ``ca`` sets
    BasicConstraints."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(START)
        .not_valid_after(START + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://example.org")]),
            critical=False,
        )
    )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return Cert.from_der(builder.sign(key, algorithm).public_bytes(Encoding.DER))


EC_KEY = ec.generate_private_key(ec.SECP256R1())
EC_KEY_2 = ec.generate_private_key(ec.SECP384R1())
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ED_KEY = ed25519.Ed25519PrivateKey.generate()

OLD_ROOT = make_cert(EC_KEY, name="old root", days=100)
NEW_ROOT = make_cert(EC_KEY_2, name="new root", days=400)
RSA_ROOT = make_cert(RSA_KEY, name="rsa root", days=200)
ED_ROOT = make_cert(ED_KEY, name="ed25519 root", days=300)
LEAF = make_cert(EC_KEY, name="leaf", ca=False)


def b64(cert: Cert) -> str:
    return base64.b64encode(cert.der).decode()


def jwks(*keys: dict[str, Any], **members: Any) -> str:
    return json.dumps({"keys": list(keys), **members})


def x509_jwk(root: Cert) -> dict[str, Any]:
    """The JWK this bundle writes for ``root``, for building test documents."""
    document = json.loads(TrustBundle(TD, (root,)).to_spiffe_json())
    jwk: dict[str, Any] = document["keys"][0]
    return jwk


# ---------------------------------------------------------------------------
# Construction
# ---------------------------------------------------------------------------


def test_several_roots_keep_their_order() -> None:
    bundle = TrustBundle(TD, (OLD_ROOT, NEW_ROOT))
    assert bundle.roots == (OLD_ROOT, NEW_ROOT)
    assert bundle.trust_domain == TD


def test_duplicate_roots_are_removed_keeping_order() -> None:
    copy = Cert.from_der(NEW_ROOT.der)
    bundle = TrustBundle(TD, (NEW_ROOT, OLD_ROOT, copy, OLD_ROOT))
    assert bundle.roots == (NEW_ROOT, OLD_ROOT)
    assert bundle == TrustBundle(TD, (NEW_ROOT, OLD_ROOT))


def test_roots_given_as_a_list_become_a_tuple() -> None:
    bundle = TrustBundle(TD, [OLD_ROOT])  # type: ignore[arg-type]
    assert bundle.roots == (OLD_ROOT,)
    assert hash(bundle) == hash(TrustBundle(TD, (OLD_ROOT,)))


def test_no_roots_rejected() -> None:
    with pytest.raises(BundleError, match=re.escape("trust bundle for example.org has no roots")):
        TrustBundle(TD, ())


def test_non_ca_root_rejected() -> None:
    with pytest.raises(BundleError, match=r"root 1 \('CN=leaf'\) is not a CA certificate"):
        TrustBundle(TD, (OLD_ROOT, LEAF))


def test_root_without_basic_constraints_rejected() -> None:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bare")])
    bare = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(EC_KEY.public_key())
        .serial_number(1)
        .not_valid_before(START)
        .not_valid_after(START + timedelta(days=1))
        .sign(EC_KEY, hashes.SHA256())
    )
    with pytest.raises(BundleError, match="no BasicConstraints"):
        TrustBundle(TD, (Cert.from_der(bare.public_bytes(Encoding.DER)),))


def test_trust_domain_must_be_a_trust_domain() -> None:
    with pytest.raises(TypeError, match="must be a TrustDomain"):
        TrustBundle("example.org", (OLD_ROOT,))  # type: ignore[arg-type]


def test_roots_must_be_certificates() -> None:
    with pytest.raises(TypeError, match="must be Cert"):
        TrustBundle(TD, (OLD_ROOT.der,))  # type: ignore[arg-type]


def test_earliest_expiry() -> None:
    bundle = TrustBundle(TD, (NEW_ROOT, OLD_ROOT, RSA_ROOT))
    assert bundle.earliest_expiry == START + timedelta(days=100)
    assert bundle.earliest_expiry.tzinfo is not None


# ---------------------------------------------------------------------------
# PEM and DER
# ---------------------------------------------------------------------------


def test_pem_round_trip_with_two_roots() -> None:
    bundle = TrustBundle(TD, (OLD_ROOT, NEW_ROOT))
    pem = bundle.to_pem()
    assert pem.count(b"-----BEGIN CERTIFICATE-----") == 2
    assert TrustBundle.from_pem(TD, pem) == bundle


def test_der_round_trip() -> None:
    bundle = TrustBundle(TD, (OLD_ROOT, RSA_ROOT))
    ders = bundle.to_der()
    assert ders == [OLD_ROOT.der, RSA_ROOT.der]
    assert TrustBundle.from_der(TD, iter(ders)) == bundle


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(b"", "no PEM certificates could be loaded", id="empty"),
        pytest.param(b"not a pem file", "no PEM certificates could be loaded", id="garbage"),
        pytest.param(
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            "no PEM certificates could be loaded",
            id="bad-certificate-body",
        ),
        pytest.param(
            EC_KEY.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()),
            "contains a private key",
            id="private-key",
        ),
        pytest.param(
            OLD_ROOT.to_pem()
            + EC_KEY.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()),
            "contains a private key",
            id="certificate-and-private-key",
        ),
        pytest.param(
            OLD_ROOT.to_pem()
            + EC_KEY.private_bytes(Encoding.PEM, PrivateFormat.TraditionalOpenSSL, NoEncryption()),
            "contains a private key",
            id="certificate-and-ec-private-key",
        ),
        pytest.param(LEAF.to_pem(), "is not a CA certificate", id="leaf"),
    ],
)
def test_from_pem_rejects(data: bytes, message: str) -> None:
    with pytest.raises(BundleError, match=re.escape(message)):
        TrustBundle.from_pem(TD, data)


def test_words_about_private_keys_are_not_a_key() -> None:
    """Text between certificates is ignored: a comment is not a PEM key block."""
    data = b"# never put a PRIVATE KEY in this ConfigMap\n" + OLD_ROOT.to_pem()
    assert TrustBundle.from_pem(TD, data).roots == (OLD_ROOT,)


def test_from_der_rejects_garbage_naming_the_item() -> None:
    with pytest.raises(BundleError, match="certificate 1 is not valid DER"):
        TrustBundle.from_der(TD, [OLD_ROOT.der, b"\x30\x03abc"])


def test_from_der_rejects_empty() -> None:
    with pytest.raises(BundleError, match="no roots"):
        TrustBundle.from_der(TD, [])


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every certificate Cert.from_der reads from here on."""
    seen: list[bytes] = []
    read = Cert.from_der

    def counted(cls: type[Cert], der: bytes) -> Cert:
        seen.append(der)
        return read(der)

    monkeypatch.setattr(Cert, "from_der", classmethod(counted))
    return seen


def test_a_root_pasted_twenty_thousand_times_is_read_once(reads: list[bytes]) -> None:
    """A bundle file (1 MiB of ConfigMap holds 1,400 copies) is read on the agent's event
    loop whenever it changes: each different certificate is read once."""
    assert TrustBundle.from_pem(TD, OLD_ROOT.to_pem() * 20_000).roots == (OLD_ROOT,)
    assert TrustBundle.from_der(TD, [NEW_ROOT.der] * 20_000).roots == (NEW_ROOT,)
    assert reads == [OLD_ROOT.der, NEW_ROOT.der]


def test_more_than_a_hundred_different_certificates_are_refused_unread(
    reads: list[bytes],
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "root")])
    certs = [
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(START)
        .not_valid_after(START + timedelta(days=1))
        .sign(key, hashes.SHA256())
        for serial in range(1, 102)
    ]
    ders = [cert.public_bytes(Encoding.DER) for cert in certs]
    pem = b"".join(cert.public_bytes(Encoding.PEM) for cert in certs)
    with pytest.raises(BundleError, match="101 different certificates; at most 100"):
        TrustBundle.from_pem(TD, pem)
    with pytest.raises(BundleError, match="101 different certificates; at most 100"):
        TrustBundle.from_der(TD, ders)
    assert reads == []


# ---------------------------------------------------------------------------
# SPIFFE bundle JSON
# ---------------------------------------------------------------------------


def test_spiffe_json_round_trip_with_every_key_type() -> None:
    bundle = TrustBundle(TD, (OLD_ROOT, NEW_ROOT, RSA_ROOT, ED_ROOT))
    data = bundle.to_spiffe_json(refresh_hint=300, sequence=7)
    assert TrustBundle.from_spiffe_json(TD, data) == bundle
    assert TrustBundle.from_spiffe_json(TD, data.decode()) == bundle


def test_spiffe_json_shape() -> None:
    document = json.loads(TrustBundle(TD, (OLD_ROOT,)).to_spiffe_json(refresh_hint=300, sequence=7))
    assert document["spiffe_refresh_hint"] == 300
    assert document["spiffe_sequence"] == 7
    [jwk] = document["keys"]
    assert set(jwk) == {"use", "kty", "crv", "x", "y", "x5c"}
    assert (jwk["use"], jwk["kty"], jwk["crv"]) == ("x509-svid", "EC", "P-256")
    assert jwk["x5c"] == [b64(OLD_ROOT)]


def test_spiffe_json_rsa_key_has_no_key_ops() -> None:
    [jwk] = json.loads(TrustBundle(TD, (RSA_ROOT,)).to_spiffe_json())["keys"]
    assert set(jwk) == {"use", "kty", "n", "e", "x5c"}
    assert jwk["e"] == "AQAB"


def test_spiffe_json_omits_unset_optional_members() -> None:
    document = json.loads(TrustBundle(TD, (OLD_ROOT,)).to_spiffe_json())
    assert set(document) == {"keys"}


@pytest.mark.parametrize(
    "members",
    [{"refresh_hint": -1}, {"sequence": -5}, {"sequence": True}],
    ids=["negative-hint", "negative-sequence", "bool-sequence"],
)
def test_to_spiffe_json_rejects_bad_optional_members(members: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must be a non-negative integer"):
        TrustBundle(TD, (OLD_ROOT,)).to_spiffe_json(**members)


def test_to_spiffe_json_rejects_key_types_jwk_cannot_express() -> None:
    root = make_cert(ec.generate_private_key(ec.SECP224R1()), name="p-224 root")
    with pytest.raises(BundleError, match="JWK cannot express"):
        TrustBundle(TD, (root,)).to_spiffe_json()


def test_jwt_svid_and_unknown_keys_are_ignored() -> None:
    jwt_key = {"use": "jwt-svid", "kty": "EC", "kid": "k1", "crv": "P-256", "x": "?", "y": "?"}
    unknown_use = {**x509_jwk(RSA_ROOT), "use": "wit-svid"}
    unknown_kty = {"use": "x509-svid", "kty": "oct", "k": "c2VjcmV0"}
    data = jwks(jwt_key, x509_jwk(OLD_ROOT), unknown_use, unknown_kty, spiffe_sequence=2)
    assert TrustBundle.from_spiffe_json(TD, data).roots == (OLD_ROOT,)


def test_only_jwt_svid_keys_means_no_roots() -> None:
    jwt_key = {"use": "jwt-svid", "kty": "EC", "kid": "k1"}
    with pytest.raises(BundleError, match="no roots"):
        TrustBundle.from_spiffe_json(TD, jwks(jwt_key))


def _with(root: Cert, **members: Any) -> dict[str, Any]:
    jwk = x509_jwk(root)
    jwk.update(members)
    return {name: value for name, value in jwk.items() if value is not None}


REJECTED_JSON = [
    pytest.param("{", "not valid JSON", id="truncated"),
    pytest.param(b"\xff\xfe\x00", "not valid JSON", id="not-utf8"),
    pytest.param("garbage", "not valid JSON", id="garbage"),
    pytest.param("[]", "must be a JSON object", id="array"),
    pytest.param("{}", "must have a 'keys' array", id="no-keys"),
    pytest.param('{"keys": {}}', "must have a 'keys' array", id="keys-not-array"),
    pytest.param('{"keys": [1]}', "key 0 must be a JSON object", id="key-not-object"),
    pytest.param(jwks(_with(OLD_ROOT, use=None)), "key 0 has no 'use'", id="no-use"),
    pytest.param(jwks(_with(OLD_ROOT, kty=None)), "key 0 has no 'kty'", id="no-kty"),
    pytest.param(
        jwks(x509_jwk(OLD_ROOT), spiffe_sequence="1"),
        "'spiffe_sequence' must be an integer",
        id="sequence-string",
    ),
    pytest.param(
        jwks(x509_jwk(OLD_ROOT), spiffe_refresh_hint=1.5),
        "'spiffe_refresh_hint' must be an integer",
        id="refresh-hint-float",
    ),
    pytest.param(
        jwks(x509_jwk(OLD_ROOT), _with(NEW_ROOT, x5c=[b64(NEW_ROOT), b64(OLD_ROOT)])),
        "key 1 must have exactly one certificate in 'x5c', has 2",
        id="x5c-two-certs",
    ),
    pytest.param(
        jwks(_with(OLD_ROOT, x5c=[])), "exactly one certificate in 'x5c', has 0", id="x5c-empty"
    ),
    pytest.param(
        jwks(_with(OLD_ROOT, x5c=None)), "exactly one certificate in 'x5c'", id="x5c-missing"
    ),
    pytest.param(
        jwks(_with(OLD_ROOT, x5c=b64(OLD_ROOT))),
        "exactly one certificate in 'x5c'",
        id="x5c-not-a-list",
    ),
    pytest.param(jwks(_with(OLD_ROOT, x5c=[1])), "must be base64 strings", id="x5c-number"),
    pytest.param(
        jwks(_with(OLD_ROOT, x5c=["not base64!"])), "not valid base64", id="x5c-bad-base64"
    ),
    pytest.param(
        jwks(_with(OLD_ROOT, x5c=[base64.b64encode(b"junk").decode()])),
        "certificate 0 is not valid DER",
        id="x5c-not-der",
    ),
    pytest.param(
        jwks(_with(OLD_ROOT, x5c=[b64(NEW_ROOT)])),
        "public key does not match the JWK",
        id="mismatched-key-same-type",
    ),
    pytest.param(
        jwks(_with(OLD_ROOT, x5c=[b64(RSA_ROOT)])),
        "public key does not match the JWK",
        id="mismatched-key-type",
    ),
    pytest.param(
        jwks(_with(OLD_ROOT, x=x509_jwk(NEW_ROOT)["x"])),
        "invalid EC key material",
        id="bad-coordinate-length",
    ),
    pytest.param(jwks(_with(OLD_ROOT, x=7)), "invalid EC key material", id="coordinate-number"),
    pytest.param(jwks(_with(OLD_ROOT, crv="P-999")), "invalid EC key material", id="bad-curve"),
    pytest.param(jwks(_with(RSA_ROOT, n=None)), "invalid RSA key material", id="rsa-no-modulus"),
    pytest.param(
        jwks(_with(OLD_ROOT, d="AAAA")), "carries private key material ['d']", id="private-ec"
    ),
    pytest.param(
        jwks(_with(OLD_ROOT, x5c=[b64(LEAF)])), "is not a CA certificate", id="non-ca-in-x5c"
    ),
]


@pytest.mark.parametrize(("data", "message"), REJECTED_JSON)
def test_from_spiffe_json_rejects(data: str | bytes, message: str) -> None:
    with pytest.raises(BundleError, match=re.escape(message)):
        TrustBundle.from_spiffe_json(TD, data)


def test_bundle_error_is_a_value_error() -> None:
    assert issubclass(BundleError, ValueError)
