"""A DER certificate read by OpenSSL: its facts, and whether cryptography would refuse it.

`parse_certificate` is what `identity.cert.Cert` is made from: serial, names,
validity, the extension flags, keyUsage, extKeyUsage, the URI SANs and the
public key's DER, read in one pass; and `malformed`, set exactly where
cryptography would refuse the certificate. For that, each extension
cryptography decodes (`_DECODED_BY_CRYPTOGRAPHY`) is decoded with the ASN.1
item of OpenSSL's own method for it and encoded back to the same bytes, then
held to `identity.x509_rules`; the whole certificate is encoded back too, and
the parameters of its algorithms checked (`_ALGORITHM_PARAMETERS`).
"""

from __future__ import annotations

import ctypes
import ssl
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from ctypes import c_int as _INT
from ctypes import c_void_p as _P
from datetime import datetime
from typing import Any, NamedTuple

from identity.openssl import (
    BIO_CTRL_INFO,
    BIO_CTRL_RESET,
    EXFLAG_INVALID,
    GEN_URI,
    V_ASN1_NEG_INTEGER,
    V_ASN1_NULL,
    V_ASN1_OBJECT,
    V_ASN1_SEQUENCE,
    V_ASN1_UNDEF,
    ASN1_item_d2i,
    ASN1_item_free,
    ASN1_item_i2d,
    ASN1_STRING_get0_data,
    ASN1_STRING_length,
    ASN1_STRING_type,
    BIO_ctrl,
    BIO_free,
    BIO_new,
    BIO_s_mem,
    CRYPTO_free,
    ERR_clear_error,
    GENERAL_NAME_get0_value,
    NID_ext_key_usage,
    NID_key_usage,
    NID_subject_alt_name,
    OBJ_obj2nid,
    OBJ_obj2txt,
    OBJ_txt2nid,
    SCT_LIST_free,
    X509_ALGOR_get0,
    X509_EXTENSION_get_critical,
    X509_EXTENSION_get_data,
    X509_EXTENSION_get_object,
    X509_EXTENSION_set_critical,
    X509_get0_notAfter,
    X509_get0_notBefore,
    X509_get0_serialNumber,
    X509_get0_signature,
    X509_get0_tbs_sigalg,
    X509_get_ext,
    X509_get_ext_count,
    X509_get_extension_flags,
    X509_get_issuer_name,
    X509_get_subject_name,
    X509_get_version,
    X509_get_X509_PUBKEY,
    X509_NAME_print_ex,
    X509_PUBKEY_get0_param,
    X509_set_version,
    X509V3_EXT_get_nid,
    asn1_item,
    bytes_at,
    clean_errors,
    d2i_SCT_LIST,
    i2d,
    i2d_re_X509_tbs,
    i2d_SCT_LIST,
    i2d_X509,
    i2d_X509_PUBKEY,
    openssl_error,
    stack_items,
    string_data,
    x509_to_read,
)
from identity.x509_rules import EXTENSION_RULES, name_problem, read_time

__all__ = ["ParsedCert", "parse_certificate"]


#: The extensions cryptography decodes (it keeps any other as raw bytes), by OID.
#: Each is decoded here by the ASN.1 item of OpenSSL's own extension method,
#: then encoded back to the same bytes, then held to what cryptography's types
#: add to the ASN.1 (`EXTENSION_RULES`).
_DECODED_BY_CRYPTOGRAPHY = (
    "2.5.29.14",  # subjectKeyIdentifier
    "2.5.29.15",  # keyUsage
    "2.5.29.16",  # privateKeyUsagePeriod
    "2.5.29.17",  # subjectAltName
    "2.5.29.18",  # issuerAltName
    "2.5.29.19",  # basicConstraints
    "2.5.29.30",  # nameConstraints
    "2.5.29.31",  # cRLDistributionPoints
    "2.5.29.32",  # certificatePolicies
    "2.5.29.35",  # authorityKeyIdentifier
    "2.5.29.36",  # policyConstraints
    "2.5.29.37",  # extKeyUsage
    "2.5.29.46",  # freshestCRL
    "2.5.29.54",  # inhibitAnyPolicy
    "1.3.6.1.5.5.7.1.1",  # authorityInfoAccess
    "1.3.6.1.5.5.7.1.11",  # subjectInfoAccess
    "1.3.6.1.5.5.7.1.24",  # TLS feature
    "1.3.6.1.5.5.7.48.1.5",  # OCSP noCheck
    "1.3.6.1.4.1.11129.2.4.2",  # signed certificate timestamps
    "1.3.6.1.4.1.11129.2.4.3",  # precertificate poison
    "1.3.6.1.4.1.311.21.7",  # Microsoft certificate template
    "1.3.36.8.3.3",  # admissions
)
#: The parameters cryptography's AlgorithmIdentifier takes for an algorithm it
#: names (any, for one it does not), by the ASN.1 type of the parameters
#: (V_ASN1_UNDEF: absent), by OID.
_ALGORITHM_PARAMETERS = {
    **dict.fromkeys(
        (
            "1.3.101.110",  # X25519, X448, Ed25519, Ed448
            "1.3.101.111",
            "1.3.101.112",
            "1.3.101.113",
            *(f"2.16.840.1.101.3.4.3.{n}" for n in (9, 10, 11, 12)),  # ECDSA with SHA-3
        ),
        frozenset({V_ASN1_UNDEF}),
    ),
    **dict.fromkeys(
        (
            "1.3.14.3.2.26",  # SHA-1
            *(f"2.16.840.1.101.3.4.2.{n}" for n in (1, 2, 3, 4, 7, 8, 9, 10)),  # SHA-2, SHA-3
            "1.2.840.113549.1.1.1",  # rsaEncryption
            *(f"1.2.840.113549.1.1.{n}" for n in (5, 11, 12, 13, 14)),  # RSA with SHA-*
            "1.3.14.3.2.29",  # sha1WithRSASignature
            *(f"2.16.840.1.101.3.4.3.{n}" for n in (13, 14, 15, 16)),  # RSA with SHA-3
            *(f"1.2.840.10045.4.3.{n}" for n in (1, 2, 3, 4)),  # ECDSA with SHA-2
            *(f"2.16.840.1.101.3.4.3.{n}" for n in (1, 2, 3, 4)),  # DSA with SHA-2
            *(f"1.2.840.113549.2.{n}" for n in (7, 8, 9, 10, 11)),  # HMAC
        ),
        frozenset({V_ASN1_UNDEF, V_ASN1_NULL}),
    ),
    "1.2.840.10045.2.1": frozenset({V_ASN1_OBJECT, V_ASN1_NULL, V_ASN1_SEQUENCE}),  # EC
    "1.2.840.113549.1.1.10": frozenset({V_ASN1_UNDEF, V_ASN1_SEQUENCE}),  # RSASSA-PSS
    "1.2.840.10040.4.1": frozenset({V_ASN1_SEQUENCE}),  # DSA
    "1.2.840.10046.2.1": frozenset({V_ASN1_SEQUENCE}),  # DH (X9.42)
    "1.2.840.113549.1.3.1": frozenset({V_ASN1_SEQUENCE}),  # dhKeyAgreement
}
#: XN_FLAG_RFC2253 without ASN1_STRFLGS_ESC_MSB: UTF-8 text, as RFC 4514 writes it,
#: rather than each byte above 127 escaped as \XX.
_XN_FLAG_RFC4514 = 0x1110317 & ~0x4


class _ExtensionMethod(ctypes.Structure):
    """The head of X509V3_EXT_METHOD (x509v3.h): the ASN.1 item an extension is (a
    function that answers it, in 3.x), if it has one."""

    _fields_ = (("ext_nid", _INT), ("ext_flags", _INT), ("it", _P))


def _extension_items() -> dict[int | str, int | None]:
    """The ASN1_ITEM of each extension cryptography decodes, as OpenSSL's own method
    for it says, by NID (by OID text where this OpenSSL has no NID: then a SEQUENCE
    OF ANY, the shape checked by `EXTENSION_RULES`). None: the method has d2i and i2d
    functions, not an item (the SCT list)."""
    items: dict[int | str, int | None] = {}
    for oid in _DECODED_BY_CRYPTOGRAPHY:
        nid = OBJ_txt2nid(oid.encode())
        method = X509V3_EXT_get_nid(nid) if nid else None
        it = _ExtensionMethod.from_address(method).it if method else None
        if method and it and ssl.OPENSSL_VERSION_INFO[0] >= 3:
            items[nid] = int(ctypes.CFUNCTYPE(_P)(it)())  # ASN1_ITEM_EXP: a function in 3.x
        elif method:
            items[nid] = it
        else:  # keyed as _extensions looks it up: by NID where OpenSSL has one
            items[nid or oid] = asn1_item("ASN1_SEQUENCE_ANY")
    return items


_EXTENSION_ITEMS = _extension_items()


class ParsedCert(NamedTuple):
    """What OpenSSL reads in a certificate; bits and flags as OpenSSL gives them."""

    serial: int
    subject: str
    issuer: str
    not_before: datetime
    not_after: datetime
    flags: int  # X509_get_extension_flags
    key_usage: int | None  # KU_* bits (x509v3.h); None: absent or unreadable
    key_usage_critical: bool
    extended_key_usage: frozenset[int] | None  # the purposes' NIDs; None: absent, unreadable
    uris: tuple[str, ...]
    spki: bytes
    malformed: str | None


# --- certificates -----------------------------------------------------------------


def parse_certificate(der: bytes) -> ParsedCert:
    """Read one DER certificate (nothing after it); ValueError saying why not."""
    with clean_errors(), x509_to_read(der) as x:
        flags = X509_get_extension_flags(x)
        # Caching the extensions also hashes the certificate, with a digest the parsing
        # context lacks: its "unsupported", left queued, would be the reason a later
        # failure (an impossible date) gives.
        ERR_clear_error()
        with _bio(BIO_s_mem()) as bio:
            subject = _name(bio, X509_get_subject_name(x))
            issuer = _name(bio, X509_get_issuer_name(x))
        extensions = _extensions(x, flags)
        return ParsedCert(
            serial=_serial(x),
            subject=subject,
            issuer=issuer,
            not_before=read_time(X509_get0_notBefore(x), "notBefore"),
            not_after=read_time(X509_get0_notAfter(x), "notAfter"),
            flags=flags,
            key_usage=extensions.key_usage,
            key_usage_critical=extensions.key_usage_critical,
            extended_key_usage=extensions.extended_key_usage,
            uris=extensions.uris,
            spki=i2d(i2d_X509_PUBKEY, X509_get_X509_PUBKEY(x)),
            malformed=extensions.malformed or _not_der_certificate(x, der),  # last: it changes x
        )


def _serial(x: int) -> int:
    integer = X509_get0_serialNumber(x)
    magnitude = int.from_bytes(string_data(integer), "big")
    return -magnitude if ASN1_STRING_type(integer) == V_ASN1_NEG_INTEGER else magnitude


def _name(bio: int, name: int) -> str:
    if X509_NAME_print_ex(bio, name, 0, _XN_FLAG_RFC4514) < 0:
        raise openssl_error("cannot print a name")
    return _bio_text(bio)


@contextmanager
def _bio(method: int) -> Iterator[int]:
    bio = BIO_new(method)
    if not bio:
        raise openssl_error("BIO_new")
    try:
        yield bio
    finally:
        BIO_free(bio)


def _bio_text(bio: int) -> str:
    """What was written to a memory BIO, which is then emptied."""
    data = _P()
    size = BIO_ctrl(bio, BIO_CTRL_INFO, 0, ctypes.byref(data))
    text = bytes_at(data.value, size)
    BIO_ctrl(bio, BIO_CTRL_RESET, 0, None)
    return text.decode(errors="replace")


class _Extensions(NamedTuple):
    key_usage: int | None
    key_usage_critical: bool
    extended_key_usage: frozenset[int] | None
    uris: tuple[str, ...]
    malformed: str | None


def _extensions(x: int, flags: int) -> _Extensions:
    """One pass over the extensions: keyUsage, extKeyUsage and the URI SANs read from
    the values decoded to check them (a fact is absent when its extension is repeated
    or undecodable), and why cryptography would refuse the extensions: an OID
    repeated, or a value of an extension it decodes (`_DECODED_BY_CRYPTOGRAPHY`) that
    is not one DER value of its type (decoded by OpenSSL, then encoded back to the
    same bytes) or breaks a rule of cryptography's type for it (`EXTENSION_RULES`). Then what
    else makes OpenSSL mark the certificate EXFLAG_INVALID (a negative
    pathLenConstraint, ...), except an empty keyUsage, which cryptography reads as
    all false. X509_get_key_usage and X509_get_extended_key_usage would answer 0 for
    such a certificate: these facts are read whatever else is wrong."""
    facts: dict[int, Any] = {}
    critical: dict[int, bool] = {}
    seen: set[int | str] = set()
    problem = None
    for i in range(X509_get_ext_count(x)):
        extension = X509_get_ext(x, i)
        oid = X509_EXTENSION_get_object(extension)
        nid = OBJ_obj2nid(oid)
        key: int | str = nid or _oid_text(oid)
        is_critical = X509_EXTENSION_get_critical(extension)
        # critical as 0xFF or absent, for _not_der_certificate to compare the DER with
        X509_EXTENSION_set_critical(extension, is_critical)
        if key in seen:
            problem = problem or f"duplicate extension {_oid_text(oid)}"
            facts[nid] = None
            continue
        seen.add(key)
        if key in _EXTENSION_ITEMS:
            wrong, facts[nid] = _not_der(X509_EXTENSION_get_data(extension), key)
            critical[nid] = bool(is_critical)
            if wrong:
                problem = problem or f"extension {_oid_text(oid)}: {wrong}"
    key_usage = facts.get(NID_key_usage)
    if not problem and flags & EXFLAG_INVALID and key_usage != 0:
        problem = "OpenSSL finds the extensions invalid"
    return _Extensions(
        key_usage=key_usage,
        key_usage_critical=key_usage is not None and critical[NID_key_usage],
        extended_key_usage=facts.get(NID_ext_key_usage),
        uris=facts.get(NID_subject_alt_name) or (),
        malformed=problem,
    )


def _key_usage(bits: int) -> int:
    """The keyUsage bits as OpenSSL numbers them (KU_*): named bits 0-7 in the first
    byte, 8 in the second."""
    return int.from_bytes(string_data(bits)[:2], "little")


def _extended_key_usage(purposes: int) -> frozenset[int]:
    """The NIDs of the extKeyUsage purposes (NID_undef, 0, for OIDs OpenSSL has none for)."""
    return frozenset(OBJ_obj2nid(purpose) for purpose in stack_items(purposes))


def _uris(names: int) -> tuple[str, ...]:
    """The URI SANs, in order (one not UTF-8 is refused by the SAN's rule)."""
    kind = _INT()
    uris = []
    for name in stack_items(names):
        value = GENERAL_NAME_get0_value(name, ctypes.byref(kind))
        if kind.value == GEN_URI:
            uris.append(string_data(value).decode(errors="replace"))
    return tuple(uris)


def _not_der(value: int, key: int | str) -> tuple[str | None, Any]:
    """What keeps the ASN1_OCTET_STRING `value` from holding one DER value of the
    extension `key`'s type, as cryptography reads that type, if anything; and the
    fact `_FACTS` reads in the value, if it decodes."""
    item = _EXTENSION_ITEMS[key]
    start, size = ASN1_STRING_get0_data(value), ASN1_STRING_length(value)
    cursor = _P(start)
    if item is None:  # the SCT list: TLS-encoded inside an OCTET STRING
        decoded = d2i_SCT_LIST(None, ctypes.byref(cursor), size)
    else:
        decoded = ASN1_item_d2i(None, ctypes.byref(cursor), size, item)
    if not decoded:
        return "undecodable", None
    encoded = _P()
    try:
        read = _FACTS.get(key)
        fact = read(decoded) if read else None
        if cursor.value != start + size:
            return "bytes after the value", fact
        if item is None:
            length = i2d_SCT_LIST(decoded, ctypes.byref(encoded))
        else:
            length = ASN1_item_i2d(decoded, ctypes.byref(encoded), item)
        if length != size or bytes_at(encoded.value, size) != bytes_at(start, size):
            return "not DER", fact
        rule = EXTENSION_RULES.get(key)
        return (rule(decoded) if rule else None), fact
    finally:
        CRYPTO_free(encoded.value, None, 0)  # i2d allocated it
        if item is None:
            SCT_LIST_free(decoded)
        else:
            ASN1_item_free(decoded, item)


_FACTS: dict[int | str, Callable[[int], Any]] = {
    NID_key_usage: _key_usage,
    NID_ext_key_usage: _extended_key_usage,
    NID_subject_alt_name: _uris,
}


# --- the certificate around the extensions ------------------------------------------

_PARAMETERS_BY_NID = {
    OBJ_txt2nid(oid.encode()): types for oid, types in _ALGORITHM_PARAMETERS.items()
}


def _algorithms(x: int) -> str | None:
    """Parameters of the signature (twice) or key algorithm of a shape cryptography
    refuses for that algorithm, which OpenSSL takes as any ASN.1 value."""
    signature, outer = _P(), _P()
    X509_get0_signature(ctypes.byref(signature), ctypes.byref(outer), x)
    key = _P()
    X509_PUBKEY_get0_param(None, None, None, ctypes.byref(key), X509_get_X509_PUBKEY(x))
    for algorithm in (X509_get0_tbs_sigalg(x), outer.value, key.value):
        oid, kind = _P(), _INT()
        X509_ALGOR_get0(ctypes.byref(oid), ctypes.byref(kind), None, algorithm)
        allowed = _PARAMETERS_BY_NID.get(OBJ_obj2nid(oid))
        if allowed is not None and kind.value not in allowed:
            return f"{_oid_text(oid.value or 0)} with parameters of ASN.1 type {kind.value}"
    return None


def _not_der_certificate(x: int, der: bytes) -> str | None:
    """What cryptography refuses outside the extensions' values: a version other than
    v1 or v3; a certificate OpenSSL encodes back differently once the version and
    (by _extensions, which must come first) each extension's criticality are set
    anew from what it read (an encoded default,
    a BOOLEAN other than FF for TRUE, a non-zero unused bit, a long-form length...);
    a PrintableString or NumericString in a name with other characters. (The
    validity's times are held to DER by read_time.)
    (OpenSSL encodes back the names' bytes as it read them.)"""
    version = X509_get_version(x)
    if version not in (0, 2):
        return f"version field {version}: neither v1 (0) nor v3 (2)"
    # X509_set_version does nothing when the version is unchanged: the round trip
    # drops an INTEGER 0 written for v1. i2d_re_X509_tbs marks the TBS for encoding
    # anew (i2d_X509 would give back the bytes d2i_X509 kept).
    X509_set_version(x, 2 - version)
    X509_set_version(x, version)
    i2d_re_X509_tbs(x, None)
    encoded = _P()
    try:
        size = i2d_X509(x, ctypes.byref(encoded))
        if size != len(der) or bytes_at(encoded.value, size) != der:
            return "the certificate is not DER"
    finally:
        CRYPTO_free(encoded.value, None, 0)
    return (
        _algorithms(x)
        or name_problem(X509_get_subject_name(x))
        or name_problem(X509_get_issuer_name(x))
    )


def _oid_text(oid: int, room: int = 128) -> str:
    """The dotted OID; OBJ_obj2txt says how long it is when it does not fit."""
    text = ctypes.create_string_buffer(room)
    size = OBJ_obj2txt(text, room, oid, 1)
    if size >= room:
        return _oid_text(oid, size + 1)
    return text.value.decode(errors="replace")
