"""identity.cert frees what OpenSSL allocates: thousands of operations, successful and
refused, leave the process's resident memory where it was.

A leaked X509 is a few KiB, a leaked EVP_PKEY or store context more: 8,000 parses
leaking one would grow by about 10 MiB (the control below leaks 12,000).
Bounded in count; no sleeps.
"""

from __future__ import annotations

import contextlib
import os

import pytest
from cryptography import x509

from identity import openssl
from identity.cert import Cert, PrivateKey, verify_chain
from tests.floods import rss_kib
from tests.unit.agent import pki
from tests.unit.identity.test_cert import build, raw, repeated

PARSES = 8_000
KEYS = 200
CHAINS = 200
ALLOWED_GROWTH_KIB = 4 * 1024


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    signer = pki.make_signer(tmp_path_factory.mktemp("ca"))
    chain = [Cert.from_der(der) for der in pki.sign_leaf(signer, pki.new_key())]
    roots = [Cert.from_der(der) for der in pki.bundle_der(signer)]
    san = (x509.SubjectAlternativeName([x509.UniformResourceIdentifier("x:y")]), False)
    return {
        "ders": [
            chain[0].der,
            chain[1].der,
            repeated(san, 0x11),  # malformed: repeated
            build([raw("2.5.29.19", b"\x30\x00\x00", True)]),  # malformed: not DER
            chain[0].der[:-7],  # refused: truncated
            chain[0].der + b"\x00",  # refused: trailing
        ],
        "chain": chain,
        "roots": roots,
        "pem": PrivateKey.generate_p256().to_pem(),
    }


def exercise(material: dict[str, object], parses: int, keys: int, chains: int) -> None:
    ders, chain, roots, pem = (
        material["ders"],
        material["chain"],
        material["roots"],
        material["pem"],
    )
    assert isinstance(ders, list) and isinstance(chain, list) and isinstance(roots, list)
    assert isinstance(pem, bytes)
    for i in range(parses):
        with contextlib.suppress(ValueError):
            Cert.from_der(ders[i % len(ders)])
    for _ in range(keys):
        PrivateKey.generate_p256().csr()
        PrivateKey.from_pem(pem)
        with contextlib.suppress(ValueError):
            PrivateKey.from_pem(pem.replace(b"PRIVATE KEY", b"ENCRYPTED PRIVATE KEY"))
    for _ in range(chains):
        verify_chain(chain, roots)
        with contextlib.suppress(ValueError):
            verify_chain(chain[:1], roots)


def test_nothing_leaks(material: dict[str, object]) -> None:
    exercise(material, PARSES // 10, KEYS // 10, CHAINS // 10)  # allocator pools warm
    before = rss_kib(os.getpid())
    exercise(material, PARSES, KEYS, CHAINS)
    grown = rss_kib(os.getpid()) - before
    assert grown < ALLOWED_GROWTH_KIB, f"resident memory grew by {grown} KiB"


def test_the_check_sees_a_leak(
    material: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control: with X509_free skipped, 12,000 parses grow past the bound, even in a
    test worker whose allocator already holds a few MiB free from earlier tests."""
    monkeypatch.setattr(openssl, "X509_free", lambda x: None)
    before = rss_kib(os.getpid())
    exercise(material, PARSES * 3 // 2, 0, 0)
    assert rss_kib(os.getpid()) - before > ALLOWED_GROWTH_KIB
