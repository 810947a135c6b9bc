"""identity.cert.PrivateKey: made and read by OpenSSL, as cryptography reads them,
and its CSR is the one the rotator sends and the CA accepts."""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from ca.core import csr as ca_csr
from identity import SpiffeId, openssl
from identity.cert import PrivateKey

PEM = serialization.Encoding.PEM
DER = serialization.Encoding.DER
PKCS8 = serialization.PrivateFormat.PKCS8
TRADITIONAL = serialization.PrivateFormat.TraditionalOpenSSL
SPKI = serialization.PublicFormat.SubjectPublicKeyInfo
UNENCRYPTED = serialization.NoEncryption()
WORKLOAD = SpiffeId.parse("spiffe://example.org/ns/shop/sa/web")


def pkcs8(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(DER, PKCS8, UNENCRYPTED)


def spki(key: PrivateKeyTypes) -> bytes:
    return key.public_key().public_bytes(DER, SPKI)


def test_a_generated_key_is_a_p256_key_to_cryptography() -> None:
    key = PrivateKey.generate_p256()
    theirs = serialization.load_der_private_key(key.der, password=None)
    assert isinstance(theirs, ec.EllipticCurvePrivateKey)
    assert isinstance(theirs.curve, ec.SECP256R1)
    assert key.algorithm == "EC"
    assert key.spki == spki(theirs)
    assert key.der == pkcs8(theirs)
    assert PrivateKey.generate_p256().der != key.der


def test_to_pem_is_cryptographys_pkcs8_pem() -> None:
    key = PrivateKey.generate_p256()
    theirs = serialization.load_der_private_key(key.der, password=None)
    assert key.to_pem() == theirs.private_bytes(PEM, PKCS8, UNENCRYPTED)
    assert PrivateKey.from_pem(key.to_pem()) == key


KEYS = {
    "EC": ec.generate_private_key(ec.SECP256R1()),
    "RSA": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "ED25519": ed25519.Ed25519PrivateKey.generate(),
}
FORMATS = [
    ("EC", PKCS8, b"PRIVATE KEY"),
    ("EC", TRADITIONAL, b"EC PRIVATE KEY"),  # SEC1
    ("RSA", PKCS8, b"PRIVATE KEY"),
    ("RSA", TRADITIONAL, b"RSA PRIVATE KEY"),  # PKCS#1
    ("ED25519", PKCS8, b"PRIVATE KEY"),
]


@pytest.mark.parametrize(("algorithm", "form", "label"), FORMATS)
def test_from_pem_reads_cryptographys_pems(
    algorithm: str, form: serialization.PrivateFormat, label: bytes
) -> None:
    theirs = KEYS[algorithm]
    pem = theirs.private_bytes(PEM, form, UNENCRYPTED)
    assert pem.startswith(b"-----BEGIN " + label + b"-----")
    key = PrivateKey.from_pem(pem)
    assert key.algorithm == algorithm
    assert key.der == pkcs8(theirs)  # PKCS#8 whatever it came in
    assert key.spki == spki(theirs)


def test_from_pem_skips_blocks_that_are_not_keys() -> None:
    key = PrivateKey.generate_p256()
    certificate = b"-----BEGIN CERTIFICATE-----\nMAMCAQE=\n-----END CERTIFICATE-----\n"
    assert PrivateKey.from_pem(b"text\n" + certificate + key.to_pem() + b"more") == key


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"no PEM here",
        b"-----BEGIN CERTIFICATE-----\nMAMCAQE=\n-----END CERTIFICATE-----\n",
        b"-----BEGIN PRIVATE KEY-----\nMAMCAQE=\n-----END PRIVATE KEY-----\n",
        b"-----BEGIN PRIVATE KEY-----\n!!!!\n-----END PRIVATE KEY-----\n",
        b"-----BEGIN PRIVATE KEY-----\nMAMCAQE=\n",
    ],
    ids=["empty", "no PEM", "no key", "not a key", "not base64", "no END"],
)
def test_from_pem_refuses(data: bytes) -> None:
    with pytest.raises(ValueError):
        PrivateKey.from_pem(data)
    assert openssl.ERR_get_error() == 0


def encrypted_pems() -> dict[str, bytes]:
    """Encrypted keys in both PEM forms, and an encrypted PKCS#8 under the plain label."""
    key = KEYS["EC"]
    encryption = serialization.BestAvailableEncryption(b"secret")
    pkcs8_pem = key.private_bytes(PEM, PKCS8, encryption)
    return {
        "ENCRYPTED PRIVATE KEY": pkcs8_pem,
        "Proc-Type: 4,ENCRYPTED": key.private_bytes(PEM, TRADITIONAL, encryption),
        "EncryptedPrivateKeyInfo as PRIVATE KEY": pkcs8_pem.replace(b"ENCRYPTED ", b""),
    }


@pytest.mark.parametrize("form", encrypted_pems())
def test_an_encrypted_key_is_refused(form: str) -> None:
    with pytest.raises(ValueError):
        PrivateKey.from_pem(encrypted_pems()[form])
    assert openssl.ERR_get_error() == 0


def on_a_terminal(argv: list[str]) -> tuple[int, bytes]:
    """Run `argv` as the leader of a new session whose controlling terminal is a fresh
    pty, as an agent started by hand would be: (exit status, what it wrote to /dev/tty).
    A prompt for a passphrase waits for input forever: the child is killed (status -9)
    once it has prompted, or after 20 s."""
    leader, follower = os.openpty()  # the follower stays open here: no EIO on the leader
    tty = os.ttyname(follower)
    child = subprocess.Popen(
        [sys.executable, "-c", _SESSION, tty, *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    written = b""
    deadline = time.monotonic() + 20
    try:
        while child.poll() is None and time.monotonic() < deadline:
            if b"pass phrase" in written.lower():
                break
            ready, _, _ = select.select([leader], [], [], 0.2)
            if ready:
                try:
                    written += os.read(leader, 4096)
                except OSError:
                    break
        if child.poll() is None:
            child.kill()
        return child.wait(), written
    finally:
        os.close(leader)
        os.close(follower)


# Become a session leader, take the pty as the controlling terminal (the first one
# a session leader opens), then run the rest of argv with it as stdin/stdout/stderr.
_SESSION = """
import os, sys
os.setsid()
fd = os.open(sys.argv[1], os.O_RDWR)
for n in (0, 1, 2):
    os.dup2(fd, n)
os.execvp(sys.argv[2], sys.argv[2:])
"""


@pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command is the control")
def test_an_encrypted_key_never_prompts_on_the_terminal(tmp_path: Path) -> None:
    encrypted = tmp_path / "key.pem"
    encrypted.write_bytes(encrypted_pems()["Proc-Type: 4,ENCRYPTED"])
    # The control: OpenSSL's own default, a prompt on /dev/tty that waits.
    status, written = on_a_terminal(["openssl", "pkey", "-noout", "-in", str(encrypted)])
    assert b"pass phrase" in written.lower(), (status, written)
    for form, pem in encrypted_pems().items():
        encrypted.write_bytes(pem)
        code = (
            "import sys, pathlib; from identity.cert import PrivateKey\n"
            "try: PrivateKey.from_pem(pathlib.Path(sys.argv[1]).read_bytes())\n"
            "except ValueError as exc: print('refused:', exc); sys.exit(3)\n"
        )
        status, written = on_a_terminal([sys.executable, "-c", code, str(encrypted)])
        assert status == 3, (form, status, written)
        assert b"refused" in written and b"pass phrase" not in written.lower(), form


def test_repr_shows_no_key_material() -> None:
    key = PrivateKey.generate_p256()
    assert repr(key) == "PrivateKey(EC, ...)"
    assert key.der.hex() not in repr(key) and key.der.hex() not in str(key)


# --- the CSR ------------------------------------------------------------------------


def test_the_csr_is_the_one_cryptography_makes_for_the_rotator() -> None:
    key = PrivateKey.generate_p256()
    request = x509.load_der_x509_csr(key.csr())
    assert request.is_signature_valid
    assert request.subject == x509.Name([])
    assert len(request.extensions) == 0 and len(request.attributes) == 0
    assert isinstance(request.signature_hash_algorithm, hashes.SHA256)
    assert request.public_key().public_bytes(DER, SPKI) == key.spki
    # What agent/adapters/rotator.py builds today with cryptography, byte for byte
    # but for the signature (ECDSA's is random)
    theirs = serialization.load_der_private_key(key.der, password=None)
    assert isinstance(theirs, ec.EllipticCurvePrivateKey)
    built = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    assert (
        request.tbs_certrequest_bytes == built.sign(theirs, hashes.SHA256()).tbs_certrequest_bytes
    )


def test_the_ca_accepts_the_csr() -> None:
    """Through the CA's own CSR checks (ca/core/csr.py), as the Sign RPC runs them."""
    key = PrivateKey.generate_p256()
    request = ca_csr.parse(key.csr())
    public = ca_csr.check(request, WORKLOAD)
    assert public.public_bytes(DER, SPKI) == key.spki


@pytest.mark.parametrize("algorithm", ["RSA", "ED25519"])
def test_csrs_of_other_keys_verify(algorithm: str) -> None:
    key = PrivateKey.from_pem(KEYS[algorithm].private_bytes(PEM, PKCS8, UNENCRYPTED))
    request = x509.load_der_x509_csr(key.csr())
    assert request.is_signature_valid
    assert request.public_key().public_bytes(DER, SPKI) == key.spki
