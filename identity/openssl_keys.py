"""Private keys and CSRs through OpenSSL: generate a P-256 key, read one from PEM, sign a CSR.

What goes out is bytes (`KeyMaterial`: PKCS#8 DER, its SubjectPublicKeyInfo,
OpenSSL's name of the key type); the ctypes buffers a private key passes
through on the way are wiped once used. Keys are made and CSRs signed the ways
that work with and without identity.openssl_engine (which gives EC keys OpenSSL's
built-in method). Needs OpenSSL 3.0 (`EVP_PKEY_generate`,
`EVP_PKEY_get0_type_name`); before it, ValueError.
"""

from __future__ import annotations

import ctypes
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from ctypes import c_long as _LONG
from ctypes import c_void_p as _P
from typing import NamedTuple

from identity.openssl import (
    EVP_PKCS82PKEY,
    EVP_PKEY2PKCS8,
    BIO_free,
    BIO_new_mem_buf,
    CRYPTO_free,
    EC_KEY_free,
    EVP_PKEY_CTX_free,
    EVP_PKEY_CTX_new_from_name,
    EVP_PKEY_CTX_set_group_name,
    EVP_PKEY_free,
    EVP_PKEY_generate,
    EVP_PKEY_get0_type_name,
    EVP_PKEY_get1_EC_KEY,
    EVP_PKEY_keygen_init,
    EVP_PKEY_new,
    EVP_PKEY_set1_EC_KEY,
    EVP_sha256,
    PEM_read_bio,
    PKCS8_PRIV_KEY_INFO_free,
    X509_REQ_free,
    X509_REQ_new,
    X509_REQ_set_pubkey,
    X509_REQ_set_version,
    X509_REQ_sign,
    bytes_at,
    clean_errors,
    d2i,
    d2i_AutoPrivateKey,
    d2i_PKCS8_PRIV_KEY_INFO,
    i2d,
    i2d_PKCS8_PRIV_KEY_INFO,
    i2d_PUBKEY,
    i2d_X509_REQ,
    openssl_error,
)

__all__ = ["KeyMaterial", "generate_p256", "key_from_pem", "sign_csr"]


class KeyMaterial(NamedTuple):
    """A private key as bytes: PKCS#8 DER, its SubjectPublicKeyInfo DER, its type."""

    pkcs8: bytes
    spki: bytes
    algorithm: str


def generate_p256() -> KeyMaterial:
    """A fresh P-256 key from OpenSSL's DRBG."""
    if EVP_PKEY_generate is None:
        raise ValueError(f"key generation needs OpenSSL 3.0 or later, not {ssl.OPENSSL_VERSION}")
    with clean_errors():
        ctx = EVP_PKEY_CTX_new_from_name(None, b"EC", None)
        if not ctx:
            raise openssl_error("EVP_PKEY_CTX_new_from_name")
        pkey = _P()
        try:
            if (
                EVP_PKEY_keygen_init(ctx) != 1
                # P-256 by the name that OpenSSL's built-in EC method knows too
                # (identity.openssl_engine), as its providers do
                or EVP_PKEY_CTX_set_group_name(ctx, b"prime256v1") != 1
                or EVP_PKEY_generate(ctx, ctypes.byref(pkey)) != 1
            ):
                raise openssl_error("cannot generate a P-256 key")
            return _material(int(pkey.value or 0))
        finally:
            EVP_PKEY_CTX_free(ctx)
            if pkey.value:
                EVP_PKEY_free(pkey.value)


_PRIVATE_KEY_LABELS = (b"PRIVATE KEY", b"EC PRIVATE KEY", b"RSA PRIVATE KEY")


def key_from_pem(data: bytes) -> KeyMaterial:
    """The first private key block of `data`: unencrypted PKCS#8, SEC1 or PKCS#1.

    Blocks of other kinds (certificates) are skipped. An encrypted key is refused
    without asking for a passphrase: the PEM is only split here (PEM_read_bio), and
    neither an encrypted block nor one with headers (Proc-Type) is ever decoded.
    """
    with clean_errors():
        source = ctypes.create_string_buffer(data, len(data))
        bio = BIO_new_mem_buf(source, len(data))
        if not bio:
            raise openssl_error("BIO_new_mem_buf")
        try:
            label, headers, der = _next_pem_block(bio)
            while label not in _PRIVATE_KEY_LABELS:
                if label == b"ENCRYPTED PRIVATE KEY":
                    raise ValueError("the private key is encrypted")
                label, headers, der = _next_pem_block(bio)
        finally:
            BIO_free(bio)
            ctypes.memset(source, 0, len(data))
        if headers:  # RFC 1421's Proc-Type: 4,ENCRYPTED and its DEK-Info
            raise ValueError("the private key is encrypted (it has PEM headers)")
        pkey = d2i(d2i_AutoPrivateKey, EVP_PKEY_free, der, f"not a {label.decode()}", secret=True)
        try:
            return _material(pkey)
        finally:
            EVP_PKEY_free(pkey)


def _next_pem_block(bio: int) -> tuple[bytes, bytes, bytes]:
    """(label, headers, DER) of the next PEM block; ValueError at the end."""
    label, headers, data, size = _P(), _P(), _P(), _LONG()
    if PEM_read_bio(bio, *(ctypes.byref(v) for v in (label, headers, data, size))) != 1:
        raise openssl_error("no private key in the PEM")
    try:
        return bytes_at(label.value), bytes_at(headers.value), bytes_at(data.value, size.value)
    finally:
        if data.value:
            ctypes.memset(data.value, 0, size.value)
        for pointer in (label, headers, data):
            CRYPTO_free(pointer.value, None, 0)


def _material(pkey: int) -> KeyMaterial:
    p8 = EVP_PKEY2PKCS8(pkey)
    if not p8:
        raise openssl_error("cannot export the key as PKCS#8")
    try:
        pkcs8 = i2d(i2d_PKCS8_PRIV_KEY_INFO, p8, secret=True)
    finally:
        PKCS8_PRIV_KEY_INFO_free(p8)
    return KeyMaterial(pkcs8, i2d(i2d_PUBKEY, pkey), _algorithm(pkey))


def _algorithm(pkey: int) -> str:
    if EVP_PKEY_get0_type_name is None:
        raise ValueError(f"key type names need OpenSSL 3.0 or later, not {ssl.OPENSSL_VERSION}")
    name = EVP_PKEY_get0_type_name(pkey)
    return name.decode() if name else "UNKNOWN"


@contextmanager
def _pkey(pkcs8: bytes) -> Iterator[int]:
    p8 = d2i(d2i_PKCS8_PRIV_KEY_INFO, PKCS8_PRIV_KEY_INFO_free, pkcs8, "not PKCS#8", secret=True)
    try:
        pkey = EVP_PKCS82PKEY(p8)
    finally:
        PKCS8_PRIV_KEY_INFO_free(p8)
    if not pkey:
        raise openssl_error("unusable PKCS#8 private key")
    try:
        yield pkey
    finally:
        EVP_PKEY_free(pkey)


def sign_csr(pkcs8: bytes, digest: bool) -> bytes:
    """A DER PKCS#10 request for the key: version 1, empty subject, no attributes,
    signed with SHA-256 (`digest`) or the key's own scheme (Ed25519)."""
    with clean_errors(), _pkey(pkcs8) as pkey, _signer(pkey) as signer:
        req = X509_REQ_new()
        if not req:
            raise openssl_error("X509_REQ_new")
        try:
            if (
                X509_REQ_set_version(req, 0) != 1
                or X509_REQ_set_pubkey(req, pkey) != 1
                or X509_REQ_sign(req, signer, EVP_sha256() if digest else None) <= 0
            ):
                raise openssl_error("cannot sign the CSR")
            return i2d(i2d_X509_REQ, req)
        finally:
            X509_REQ_free(req)


@contextmanager
def _signer(pkey: int) -> Iterator[int]:
    """What signs a CSR for `pkey`: an EC key as a built-in (legacy) EVP_PKEY of its
    EC_KEY, other keys as they are. Where identity.openssl_engine gives EC keys the
    built-in method, X509_REQ_sign cannot sign with a provider's EC key (it asks the
    provider for the AlgorithmIdentifier); with a built-in one it takes it from
    OpenSSL's table, with the engine or without."""
    if _algorithm(pkey) != "EC":
        yield pkey
        return
    ec_key = EVP_PKEY_get1_EC_KEY(pkey)
    if not ec_key:
        raise openssl_error("EVP_PKEY_get1_EC_KEY")
    signer = EVP_PKEY_new()
    try:
        if not signer or EVP_PKEY_set1_EC_KEY(signer, ec_key) != 1:
            raise openssl_error("cannot hold the EC key to sign with")
        yield signer
    finally:
        EC_KEY_free(ec_key)  # the signer took a reference of its own
        if signer:
            EVP_PKEY_free(signer)
