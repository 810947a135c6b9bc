"""The OpenSSL that the ssl module already loaded, bound with ctypes: X.509 and keys.

The agent reads, checks and makes its certificates through this binding so that
it never imports `cryptography`, whose Rust extension (with its own copy of
OpenSSL) is 8.6 MiB of an idle agent's memory. The library is the very
libcrypto that `_ssl` is linked against (`RTLD_NOLOAD`: never another one found
on the disk), checked to be the version `ssl` reports.

This is the only module that says ctypes. Every function is declared with its
argument and result types (pointers as `c_void_p`, never the default int),
every input is a copy with its length (or OpenSSL's own memory with its
length), and everything OpenSSL allocates for us is freed in `finally`.
OpenSSL is never handed a Python object's address to keep. What goes out is
Python values: `bytes`, `int`, `str`, `datetime`. A failing call raises
ValueError carrying OpenSSL's first error, and each operation clears the
thread's error queue before and after, so no error of ours leaks into the ssl
module's next message (nor one of its into ours). ctypes releases the GIL
around each call; the objects are this thread's own, so that is safe.

Tested with OpenSSL 3.0. Certificates and chains need 1.1.1 or later (whose
paths here are untested); keys need 3.0 (`EVP_PKEY_generate`,
`EVP_PKEY_get0_type_name`) and raise ValueError before it.
"""

from __future__ import annotations

import ctypes
import os
import ssl
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, NamedTuple

__all__ = [
    "EXFLAG_BCONS",
    "EXFLAG_CA",
    "EXFLAG_INVALID",
    "KeyMaterial",
    "ParsedCert",
    "generate_p256",
    "key_from_pem",
    "parse_certificate",
    "sign_csr",
    "verify_certificate",
]

# X509_get_extension_flags (x509v3.h)
EXFLAG_BCONS = 0x1
EXFLAG_CA = 0x10
EXFLAG_INVALID = 0x80

_NID_KEY_USAGE = 83
_NID_EXT_KEY_USAGE = 126
_NID_SUBJECT_ALT_NAME = 85
#: The extensions cryptography decodes (it keeps any other as raw bytes), by OID.
#: Each is decoded here by the ASN.1 item of OpenSSL's own extension method,
#: then encoded back to the same bytes, then held to what cryptography's types
#: add to the ASN.1 (`_RULES`).
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
_GEN_EMAIL, _GEN_DNS, _GEN_URI = 1, 2, 6  # the IA5String names of a GENERAL_NAME
_GEN_X400, _GEN_DIRNAME, _GEN_EDIPARTY, _GEN_IPADD = 3, 4, 5, 7
_V_ASN1_OBJECT, _V_ASN1_INTEGER, _V_ASN1_NEG_INTEGER = 6, 2, 0x102
_V_ASN1_UTF8STRING, _V_ASN1_PRINTABLESTRING, _V_ASN1_IA5STRING = 12, 19, 22
_V_ASN1_UTCTIME, _V_ASN1_GENERALIZEDTIME = 23, 24
_NID_CPS_QUALIFIER, _NID_USER_NOTICE = 164, 165
_V_ASN1_UNDEF, _V_ASN1_NULL, _V_ASN1_SEQUENCE = -1, 5, 16
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
        frozenset({_V_ASN1_UNDEF}),
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
        frozenset({_V_ASN1_UNDEF, _V_ASN1_NULL}),
    ),
    "1.2.840.10045.2.1": frozenset({_V_ASN1_OBJECT, _V_ASN1_NULL, _V_ASN1_SEQUENCE}),  # EC
    "1.2.840.113549.1.1.10": frozenset({_V_ASN1_UNDEF, _V_ASN1_SEQUENCE}),  # RSASSA-PSS
    "1.2.840.10040.4.1": frozenset({_V_ASN1_SEQUENCE}),  # DSA
    "1.2.840.10046.2.1": frozenset({_V_ASN1_SEQUENCE}),  # DH (X9.42)
    "1.2.840.113549.1.3.1": frozenset({_V_ASN1_SEQUENCE}),  # dhKeyAgreement
}
_TLS_FEATURES = frozenset(
    {5, 17}
)  # status_request, status_request_v2: cryptography's TLSFeatureType
_BIO_CTRL_RESET = 1
_BIO_CTRL_INFO = 3
#: XN_FLAG_RFC2253 without ASN1_STRFLGS_ESC_MSB: UTF-8 text, as RFC 4514 writes it,
#: rather than each byte above 127 escaped as \XX.
_XN_FLAG_RFC4514 = 0x1110317 & ~0x4
_X509_V_FLAG_X509_STRICT = 0x20
_X509_V_FLAG_NO_CHECK_TIME = 0x200000
_MAX_ERROR = 256
_NOT_A_CERTIFICATE = "not a DER X.509 certificate"

_P = ctypes.c_void_p
_INT = ctypes.c_int
_LONG = ctypes.c_long
_ULONG = ctypes.c_ulong
_U32 = ctypes.c_uint32
_STR = ctypes.c_char_p


def _load() -> ctypes.CDLL:
    """The libcrypto `_ssl` is linked against; ImportError if it is not loaded."""
    name = "libcrypto.so.3" if ssl.OPENSSL_VERSION_INFO[0] >= 3 else "libcrypto.so.1.1"
    try:
        lib = ctypes.CDLL(name, mode=os.RTLD_NOLOAD)
    except OSError as exc:
        raise ImportError(f"the ssl module ({ssl.OPENSSL_VERSION}) did not load {name}") from exc
    lib.OpenSSL_version_num.argtypes = []
    lib.OpenSSL_version_num.restype = _ULONG
    if lib.OpenSSL_version_num() != ssl.OPENSSL_VERSION_NUMBER:
        raise ImportError(f"{name} is not the OpenSSL of the ssl module ({ssl.OPENSSL_VERSION})")
    return lib


_lib = _load()


def _fn(name: str, restype: Any, *argtypes: Any, optional: bool = False) -> Any:
    """Declare `name`; an `optional` one (newer OpenSSL only) is None where absent."""
    try:
        function = getattr(_lib, name)
    except AttributeError:
        if optional:
            return None
        raise
    function.restype = restype
    function.argtypes = list(argtypes)
    return function


# fmt: off
# Errors and memory
ERR_get_error = _fn("ERR_get_error", _ULONG)
ERR_error_string_n = _fn("ERR_error_string_n", None, _ULONG, _P, ctypes.c_size_t)
ERR_clear_error = _fn("ERR_clear_error", None)
OSSL_LIB_CTX_new = _fn("OSSL_LIB_CTX_new", _P, optional=True)
OSSL_PROVIDER_load = _fn("OSSL_PROVIDER_load", _P, _P, _STR, optional=True)
CRYPTO_free = _fn("CRYPTO_free", None, _P, _STR, _INT)
# BIOs
BIO_s_mem = _fn("BIO_s_mem", _P)
BIO_new = _fn("BIO_new", _P, _P)
BIO_new_mem_buf = _fn("BIO_new_mem_buf", _P, _P, _INT)
BIO_free = _fn("BIO_free", _INT, _P)
BIO_ctrl = _fn("BIO_ctrl", _LONG, _P, _INT, _LONG, _P)
# Certificates
d2i_X509 = _fn("d2i_X509", _P, _P, _P, _LONG)
X509_free = _fn("X509_free", None, _P)
X509_new_ex = _fn("X509_new_ex", _P, _P, _STR, optional=True)
X509_get_extension_flags = _fn("X509_get_extension_flags", _U32, _P)
X509_get_ext_count = _fn("X509_get_ext_count", _INT, _P)
X509_get_ext = _fn("X509_get_ext", _P, _P, _INT)
X509_EXTENSION_get_object = _fn("X509_EXTENSION_get_object", _P, _P)
X509_EXTENSION_get_data = _fn("X509_EXTENSION_get_data", _P, _P)
X509_EXTENSION_get_critical = _fn("X509_EXTENSION_get_critical", _INT, _P)
X509_EXTENSION_set_critical = _fn("X509_EXTENSION_set_critical", _INT, _P, _INT)
X509_get_version = _fn("X509_get_version", _LONG, _P)
X509_set_version = _fn("X509_set_version", _INT, _P, _LONG)
i2d_X509 = _fn("i2d_X509", _INT, _P, _P)
i2d_re_X509_tbs = _fn("i2d_re_X509_tbs", _INT, _P, _P)
X509_get0_signature = _fn("X509_get0_signature", None, _P, _P, _P)
X509_get0_tbs_sigalg = _fn("X509_get0_tbs_sigalg", _P, _P)
X509_PUBKEY_get0_param = _fn("X509_PUBKEY_get0_param", _INT, _P, _P, _P, _P, _P)
X509_ALGOR_get0 = _fn("X509_ALGOR_get0", None, _P, _P, _P, _P)
X509V3_EXT_get_nid = _fn("X509V3_EXT_get_nid", _P, _INT)
X509V3_EXT_d2i = _fn("X509V3_EXT_d2i", _P, _P)
OBJ_txt2nid = _fn("OBJ_txt2nid", _INT, _STR)
X509_NAME_entry_count = _fn("X509_NAME_entry_count", _INT, _P)
X509_NAME_get_entry = _fn("X509_NAME_get_entry", _P, _P, _INT)
X509_NAME_ENTRY_get_data = _fn("X509_NAME_ENTRY_get_data", _P, _P)
X509_NAME_ENTRY_set = _fn("X509_NAME_ENTRY_set", _INT, _P)
X509_NAME_new = _fn("X509_NAME_new", _P)
X509_NAME_free = _fn("X509_NAME_free", None, _P)
X509_NAME_add_entry = _fn("X509_NAME_add_entry", _INT, _P, _P, _INT, _INT)
i2d_X509_NAME = _fn("i2d_X509_NAME", _INT, _P, _P)
X509_NAME_get0_der = _fn("X509_NAME_get0_der", _INT, _P, _P, _P)
ASN1_PRINTABLE_type = _fn("ASN1_PRINTABLE_type", _INT, _P, _INT)
ASN1_TYPE_get = _fn("ASN1_TYPE_get", _INT, _P)
SCT_get_version = _fn("SCT_get_version", _INT, _P)
SCT_LIST_free = _fn("SCT_LIST_free", None, _P)
d2i_SCT_LIST = _fn("d2i_SCT_LIST", _P, _P, _P, _LONG)
i2d_SCT_LIST = _fn("i2d_SCT_LIST", _INT, _P, _P)
ASN1_item_d2i = _fn("ASN1_item_d2i", _P, _P, _P, _LONG, _P)
ASN1_item_i2d = _fn("ASN1_item_i2d", _INT, _P, _P, _P)
ASN1_item_free = _fn("ASN1_item_free", None, _P, _P)
OBJ_obj2nid = _fn("OBJ_obj2nid", _INT, _P)
OBJ_obj2txt = _fn("OBJ_obj2txt", _INT, _P, _INT, _P, _INT)
GENERAL_NAME_get0_value = _fn("GENERAL_NAME_get0_value", _P, _P, _P)
OPENSSL_sk_num = _fn("OPENSSL_sk_num", _INT, _P)
OPENSSL_sk_value = _fn("OPENSSL_sk_value", _P, _P, _INT)
OPENSSL_sk_new_null = _fn("OPENSSL_sk_new_null", _P)
OPENSSL_sk_push = _fn("OPENSSL_sk_push", _INT, _P, _P)
OPENSSL_sk_free = _fn("OPENSSL_sk_free", None, _P)
ASN1_STRING_get0_data = _fn("ASN1_STRING_get0_data", _P, _P)
ASN1_STRING_length = _fn("ASN1_STRING_length", _INT, _P)
ASN1_STRING_type = _fn("ASN1_STRING_type", _INT, _P)
ASN1_TIME_to_tm = _fn("ASN1_TIME_to_tm", _INT, _P, _P)
X509_get0_notBefore = _fn("X509_get0_notBefore", _P, _P)
X509_get0_notAfter = _fn("X509_get0_notAfter", _P, _P)
X509_get0_serialNumber = _fn("X509_get0_serialNumber", _P, _P)
X509_get_subject_name = _fn("X509_get_subject_name", _P, _P)
X509_get_issuer_name = _fn("X509_get_issuer_name", _P, _P)
X509_NAME_print_ex = _fn("X509_NAME_print_ex", _INT, _P, _P, _INT, _ULONG)
X509_get_X509_PUBKEY = _fn("X509_get_X509_PUBKEY", _P, _P)
i2d_X509_PUBKEY = _fn("i2d_X509_PUBKEY", _INT, _P, _P)
# Keys
EVP_PKEY_CTX_new_from_name = _fn("EVP_PKEY_CTX_new_from_name", _P, _P, _STR, _STR, optional=True)
EVP_PKEY_keygen_init = _fn("EVP_PKEY_keygen_init", _INT, _P)
EVP_PKEY_CTX_set_group_name = _fn("EVP_PKEY_CTX_set_group_name", _INT, _P, _STR, optional=True)
EVP_PKEY_generate = _fn("EVP_PKEY_generate", _INT, _P, _P, optional=True)
EVP_PKEY_CTX_free = _fn("EVP_PKEY_CTX_free", None, _P)
EVP_PKEY_free = _fn("EVP_PKEY_free", None, _P)
EVP_PKEY_get0_type_name = _fn("EVP_PKEY_get0_type_name", _STR, _P, optional=True)
EVP_PKEY2PKCS8 = _fn("EVP_PKEY2PKCS8", _P, _P)
EVP_PKCS82PKEY = _fn("EVP_PKCS82PKEY", _P, _P)
d2i_PKCS8_PRIV_KEY_INFO = _fn("d2i_PKCS8_PRIV_KEY_INFO", _P, _P, _P, _LONG)
i2d_PKCS8_PRIV_KEY_INFO = _fn("i2d_PKCS8_PRIV_KEY_INFO", _INT, _P, _P)
PKCS8_PRIV_KEY_INFO_free = _fn("PKCS8_PRIV_KEY_INFO_free", None, _P)
d2i_AutoPrivateKey = _fn("d2i_AutoPrivateKey", _P, _P, _P, _LONG)
i2d_PUBKEY = _fn("i2d_PUBKEY", _INT, _P, _P)
PEM_read_bio = _fn("PEM_read_bio", _INT, _P, _P, _P, _P, _P)
# Requests
X509_REQ_new = _fn("X509_REQ_new", _P)
X509_REQ_free = _fn("X509_REQ_free", None, _P)
X509_REQ_set_version = _fn("X509_REQ_set_version", _INT, _P, _LONG)
X509_REQ_set_pubkey = _fn("X509_REQ_set_pubkey", _INT, _P, _P)
X509_REQ_sign = _fn("X509_REQ_sign", _INT, _P, _P, _P)
i2d_X509_REQ = _fn("i2d_X509_REQ", _INT, _P, _P)
EVP_sha256 = _fn("EVP_sha256", _P)
# Chains
X509_STORE_new = _fn("X509_STORE_new", _P)
X509_STORE_free = _fn("X509_STORE_free", None, _P)
X509_STORE_add_cert = _fn("X509_STORE_add_cert", _INT, _P, _P)
X509_STORE_CTX_new = _fn("X509_STORE_CTX_new", _P)
X509_STORE_CTX_free = _fn("X509_STORE_CTX_free", None, _P)
X509_STORE_CTX_init = _fn("X509_STORE_CTX_init", _INT, _P, _P, _P, _P)
X509_STORE_CTX_get0_param = _fn("X509_STORE_CTX_get0_param", _P, _P)
X509_STORE_CTX_get_error = _fn("X509_STORE_CTX_get_error", _INT, _P)
X509_VERIFY_PARAM_set_flags = _fn("X509_VERIFY_PARAM_set_flags", _INT, _P, _ULONG)
X509_verify_cert = _fn("X509_verify_cert", _INT, _P)
X509_verify_cert_error_string = _fn("X509_verify_cert_error_string", _STR, _LONG)
# fmt: on


def _item(name: str) -> int:
    """The ASN1_ITEM of an ASN.1 type: a function's result in 3.x, a variable in 1.1.1."""
    if ssl.OPENSSL_VERSION_INFO[0] >= 3:
        return int(_fn(f"{name}_it", _P)())
    return ctypes.addressof(ctypes.c_char.in_dll(_lib, f"{name}_it"))


class _ExtensionMethod(ctypes.Structure):
    """The head of X509V3_EXT_METHOD (x509v3.h): the ASN.1 item an extension is (a
    function that answers it, in 3.x), if it has one."""

    _fields_ = (("ext_nid", _INT), ("ext_flags", _INT), ("it", _P))


def _extension_items() -> dict[int | str, int | None]:
    """The ASN1_ITEM of each extension cryptography decodes, as OpenSSL's own method
    for it says, by NID (by OID text where this OpenSSL has no NID: then a SEQUENCE
    OF ANY, the shape checked by `_RULES`). None: the method has d2i and i2d
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
            items[nid or oid] = _item("ASN1_SEQUENCE_ANY")
    return items


_EXTENSION_ITEMS = _extension_items()


def _parsing_context() -> int | None:
    """A library context with only the null provider, to parse certificates in.

    OpenSSL 3.0's d2i_X509 decodes the public key through provider look-ups that
    take 150 µs a certificate; Cert only needs the key's DER. Here there is no key
    manager to find, so that decoding gives up at once and the certificate is
    parsed in 20 µs. (1.1.1 has no library contexts, and no such cost.)
    """
    if OSSL_LIB_CTX_new is None or X509_new_ex is None:
        return None
    context = OSSL_LIB_CTX_new()
    if not context or not OSSL_PROVIDER_load(context, b"null"):
        raise ImportError("cannot make an OpenSSL library context to parse certificates in")
    return int(context)


_PARSING = _parsing_context()


class _Tm(ctypes.Structure):
    """struct tm, with room to spare: ASN1_TIME_to_tm writes the whole of the C one."""

    _fields_ = (
        ("tm_sec", _INT),
        ("tm_min", _INT),
        ("tm_hour", _INT),
        ("tm_mday", _INT),
        ("tm_mon", _INT),
        ("tm_year", _INT),
        ("tm_wday", _INT),
        ("tm_yday", _INT),
        ("tm_isdst", _INT),
        ("tm_gmtoff", _LONG),  # glibc and musl
        ("tm_zone", _P),
        ("_spare", ctypes.c_char * 64),
    )


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


class KeyMaterial(NamedTuple):
    """A private key as bytes: PKCS#8 DER, its SubjectPublicKeyInfo DER, its type."""

    pkcs8: bytes
    spki: bytes
    algorithm: str


# --- errors and memory ----------------------------------------------------------


def _error(what: str) -> ValueError:
    """`what`, with OpenSSL's first queued reason; the queue is left empty."""
    code = ERR_get_error()
    ERR_clear_error()
    if not code:
        return ValueError(what)
    text = ctypes.create_string_buffer(_MAX_ERROR)
    ERR_error_string_n(code, text, _MAX_ERROR)
    return ValueError(f"{what}: {text.value.decode(errors='replace')}")


@contextmanager
def _clean_errors() -> Iterator[None]:
    """An operation that starts and ends with an empty error queue."""
    ERR_clear_error()
    try:
        yield
    finally:
        ERR_clear_error()


def _i2d(encode: Callable[[Any, Any], int], obj: int, *, secret: bool = False) -> bytes:
    """The DER of `obj`: `encode(obj, NULL)` sizes it, `encode(obj, &p)` writes it.
    A `secret`'s buffer is wiped once copied."""
    size = encode(obj, None)
    if size <= 0:
        raise _error("cannot encode")
    buffer = ctypes.create_string_buffer(size)
    cursor = _P(ctypes.addressof(buffer))
    try:
        if encode(obj, ctypes.byref(cursor)) != size:
            raise _error("cannot encode")
        return buffer.raw
    finally:
        if secret:
            ctypes.memset(buffer, 0, size)


def _d2i(
    decode: Callable[[Any, Any, int], int | None],
    free: Callable[[int], None],
    der: bytes,
    what: str,
    *,
    into: int | None = None,
    secret: bool = False,
) -> int:
    """`decode` over a copy of `der`, which must be exactly one DER object; `free`
    releases what it made. `into`, an object `decode` fills, is freed on failure.
    A `secret`'s copy is wiped after."""
    if not der:
        if into:
            free(into)
        raise ValueError(f"{what}: empty input")
    buffer = ctypes.create_string_buffer(der, len(der))
    start = ctypes.addressof(buffer)
    cursor = _P(start)  # d2i moves it past what it read: a copy of the start
    target = _P(into)
    try:
        obj = decode(ctypes.byref(target) if into else None, ctypes.byref(cursor), len(der))
    finally:
        if secret:
            ctypes.memset(buffer, 0, len(der))
    if not obj:
        if target.value:  # d2i frees a reused object on failure, and says so with NULL
            free(target.value)
        raise _error(what)
    if cursor.value != start + len(der):
        free(obj)
        raise ValueError(f"{what}: {start + len(der) - (cursor.value or 0)} bytes after the DER")
    return obj


@contextmanager
def _x509_to_read(der: bytes) -> Iterator[int]:
    """The certificate parsed in _PARSING: its public key is left undecoded."""
    if _PARSING is None:
        x = _d2i(d2i_X509, X509_free, der, _NOT_A_CERTIFICATE)
    else:
        x = X509_new_ex(_PARSING, None)
        if not x:
            raise _error("X509_new_ex")
        x = _d2i(d2i_X509, X509_free, der, _NOT_A_CERTIFICATE, into=x)
    try:
        yield x
    finally:
        X509_free(x)


@contextmanager
def _bio(method: int) -> Iterator[int]:
    bio = BIO_new(method)
    if not bio:
        raise _error("BIO_new")
    try:
        yield bio
    finally:
        BIO_free(bio)


def _bio_text(bio: int) -> str:
    """What was written to a memory BIO, which is then emptied."""
    data = _P()
    size = BIO_ctrl(bio, _BIO_CTRL_INFO, 0, ctypes.byref(data))
    text = _at(data.value, size)
    BIO_ctrl(bio, _BIO_CTRL_RESET, 0, None)
    return text.decode(errors="replace")


def _at(pointer: int | None, size: int | None = None) -> bytes:
    """A copy of `size` bytes at `pointer` (up to its NUL if no size); NULL is empty."""
    if not pointer or (size is not None and size <= 0):
        return b""
    return ctypes.string_at(pointer, -1 if size is None else size)


def _string(asn1_string: int) -> bytes:
    return _at(ASN1_STRING_get0_data(asn1_string), ASN1_STRING_length(asn1_string))


# --- certificates -----------------------------------------------------------------


def parse_certificate(der: bytes) -> ParsedCert:
    """Read one DER certificate (nothing after it); ValueError saying why not."""
    with _clean_errors(), _x509_to_read(der) as x:
        flags = X509_get_extension_flags(x)
        with _bio(BIO_s_mem()) as bio:
            subject = _name(bio, X509_get_subject_name(x))
            issuer = _name(bio, X509_get_issuer_name(x))
        extensions = _extensions(x, flags)
        return ParsedCert(
            serial=_serial(x),
            subject=subject,
            issuer=issuer,
            not_before=_time(X509_get0_notBefore(x), "notBefore"),
            not_after=_time(X509_get0_notAfter(x), "notAfter"),
            flags=flags,
            key_usage=extensions.key_usage,
            key_usage_critical=extensions.key_usage_critical,
            extended_key_usage=extensions.extended_key_usage,
            uris=extensions.uris,
            spki=_i2d(i2d_X509_PUBKEY, X509_get_X509_PUBKEY(x)),
            malformed=extensions.malformed or _not_der_certificate(x, der),  # last: it changes x
        )


def _serial(x: int) -> int:
    integer = X509_get0_serialNumber(x)
    magnitude = int.from_bytes(_string(integer), "big")
    return -magnitude if ASN1_STRING_type(integer) == _V_ASN1_NEG_INTEGER else magnitude


def _name(bio: int, name: int) -> str:
    if X509_NAME_print_ex(bio, name, 0, _XN_FLAG_RFC4514) < 0:
        raise _error("cannot print a name")
    return _bio_text(bio)


def _time(asn1_time: int, what: str) -> datetime:
    """A UTCTime or GeneralizedTime as DER (RFC 5280) writes it, seconds and Z, as
    cryptography reads it; ValueError otherwise."""
    tm = _Tm()
    if not asn1_time or ASN1_TIME_to_tm(asn1_time, ctypes.byref(tm)) != 1:
        raise _error(f"invalid {what} time")
    problem = _not_der_time(asn1_time)
    if problem:
        raise ValueError(f"{what}: {problem}")
    return datetime(
        tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, tzinfo=UTC
    )


def _not_der_time(asn1_time: int) -> str | None:
    size = {_V_ASN1_UTCTIME: 13, _V_ASN1_GENERALIZEDTIME: 15}.get(ASN1_STRING_type(asn1_time))
    data = _string(asn1_time)
    if len(data) != size or not data.endswith(b"Z"):
        return f"a time not in DER: {data.decode(errors='replace')!r}"
    return None


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
    same bytes) or breaks a rule of cryptography's type for it (`_RULES`). Then what
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
    key_usage = facts.get(_NID_KEY_USAGE)
    if not problem and flags & EXFLAG_INVALID and key_usage != 0:
        problem = "OpenSSL finds the extensions invalid"
    return _Extensions(
        key_usage=key_usage,
        key_usage_critical=key_usage is not None and critical[_NID_KEY_USAGE],
        extended_key_usage=facts.get(_NID_EXT_KEY_USAGE),
        uris=facts.get(_NID_SUBJECT_ALT_NAME) or (),
        malformed=problem,
    )


def _key_usage(bits: int) -> int:
    """The keyUsage bits as OpenSSL numbers them (KU_*): named bits 0-7 in the first
    byte, 8 in the second."""
    return int.from_bytes(_string(bits)[:2], "little")


def _extended_key_usage(purposes: int) -> frozenset[int]:
    """The NIDs of the extKeyUsage purposes (NID_undef, 0, for OIDs OpenSSL has none for)."""
    return frozenset(OBJ_obj2nid(purpose) for purpose in _items(purposes))


def _uris(names: int) -> tuple[str, ...]:
    """The URI SANs, in order (one not UTF-8 is refused by the SAN's rule)."""
    kind = _INT()
    uris = []
    for name in _items(names):
        value = GENERAL_NAME_get0_value(name, ctypes.byref(kind))
        if kind.value == _GEN_URI:
            uris.append(_string(value).decode(errors="replace"))
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
        if length != size or _at(encoded.value, size) != _at(start, size):
            return "not DER", fact
        rule = _RULES.get(key)
        return (rule(decoded) if rule else None), fact
    finally:
        CRYPTO_free(encoded.value, None, 0)  # i2d allocated it
        if item is None:
            SCT_LIST_free(decoded)
        else:
            ASN1_item_free(decoded, item)


_FACTS: dict[int | str, Callable[[int], Any]] = {
    _NID_KEY_USAGE: _key_usage,
    _NID_EXT_KEY_USAGE: _extended_key_usage,
    _NID_SUBJECT_ALT_NAME: _uris,
}


# --- cryptography's rules beyond the ASN.1 ------------------------------------------
# Each reads a decoded extension through the public struct of x509v3.h that OpenSSL
# decoded it into, and says what cryptography's type for it would refuse.


class _BasicConstraints(ctypes.Structure):
    _fields_ = (("ca", _INT), ("pathlen", _P))


class _AuthorityKeyId(ctypes.Structure):
    _fields_ = (("keyid", _P), ("issuer", _P), ("serial", _P))


class _AccessDescription(ctypes.Structure):
    _fields_ = (("method", _P), ("location", _P))


class _DistPoint(ctypes.Structure):
    _fields_ = (("distpoint", _P), ("reasons", _P), ("crl_issuer", _P), ("dp_reasons", _INT))


class _DistPointName(ctypes.Structure):
    _fields_ = (("type", _INT), ("name", _P), ("dpname", _P))


class _NameConstraints(ctypes.Structure):
    _fields_ = (("permitted", _P), ("excluded", _P))


class _GeneralSubtree(ctypes.Structure):
    _fields_ = (("base", _P), ("minimum", _P), ("maximum", _P))


class _PolicyConstraints(ctypes.Structure):
    _fields_ = (("require_explicit_policy", _P), ("inhibit_policy_mapping", _P))


class _PrivateKeyUsagePeriod(ctypes.Structure):
    _fields_ = (("not_before", _P), ("not_after", _P))


class _PolicyInfo(ctypes.Structure):
    _fields_ = (("policyid", _P), ("qualifiers", _P))


class _PolicyQualifierInfo(ctypes.Structure):
    _fields_ = (("pqualid", _P), ("d", _P))


class _UserNotice(ctypes.Structure):
    _fields_ = (("noticeref", _P), ("exptext", _P))


class _NoticeReference(ctypes.Structure):
    _fields_ = (("organization", _P), ("noticenos", _P))


class _Asn1Type(ctypes.Structure):  # ASN1_TYPE (asn1.h)
    _fields_ = (("type", _INT), ("value", _P))


def _items(stack: int | None) -> list[int]:
    return [OPENSSL_sk_value(stack, i) for i in range(OPENSSL_sk_num(stack))] if stack else []


def _first(*problems: Callable[[], str | None]) -> str | None:
    for problem in problems:
        found = problem()
        if found:
            return found
    return None


def _general_names(stack: int | None, *, constraint: bool = False) -> str | None:
    for name in _items(stack):
        problem = _general_name(name, constraint=constraint)
        if problem:
            return problem
    return None


def _general_name(name: int, *, constraint: bool = False) -> str | None:
    """What cryptography refuses in a GeneralName: an x400Address or ediPartyName, an
    IA5String (URI, DNS, email) that is not UTF-8, an iPAddress that is neither an
    address nor a network (`_ip_address`), a directoryName it refuses as a name."""
    kind = _INT()
    value = GENERAL_NAME_get0_value(name, ctypes.byref(kind))
    if kind.value in (_GEN_X400, _GEN_EDIPARTY):
        return "an x400Address or ediPartyName"
    if kind.value in (_GEN_URI, _GEN_DNS, _GEN_EMAIL):
        try:
            _string(value).decode()
        except UnicodeDecodeError:
            return "a name is not UTF-8"
    if kind.value == _GEN_IPADD:
        return _ip_address(_string(value), constraint)
    if kind.value == _GEN_DIRNAME:
        return _name_problem(value, as_text=True)
    return None


def _ip_address(data: bytes, constraint: bool) -> str | None:
    """cryptography reads 4 or 16 bytes as an address, 8 or 32 as a network (address
    and prefix mask, no host bits): only a network in name constraints."""
    if len(data) in (4, 16) and not constraint:
        return None
    if len(data) not in (8, 32):
        return f"an iPAddress of {len(data)} bytes"
    half = len(data) // 2
    address, mask = (int.from_bytes(part, "big") for part in (data[:half], data[half:]))
    hosts = ~mask & ((1 << (8 * half)) - 1)
    if hosts & (hosts + 1) or address & hosts:
        return "an iPAddress constraint that is no network"
    return None


#: The string types cryptography reads in a name (its _ASN1Type), by universal tag.
_NAME_STRING_TYPES = frozenset({4, 12, 18, 19, 20, 22, 23, 24, 26, 28, 30})
_V_ASN1_NUMERICSTRING = 18


def _name_problem(name: int, *, as_text: bool = False) -> str | None:
    """What cryptography refuses in a name that OpenSSL's decoder takes: a value of a
    type that is no string (`as_text`: only where cryptography makes the name a
    Python value, as for a directoryName in `.extensions`), a PrintableString or
    NumericString with a character outside its set, or a name that is not DER (a
    SET OF out of order, a primitive SET...), seen by building the name anew from
    its entries: OpenSSL encodes back the bytes it read for a name it decoded."""
    copy = X509_NAME_new()
    if not copy:
        raise _error("X509_NAME_new")
    encoded = _P()
    try:
        previous = -1
        for i in range(X509_NAME_entry_count(name)):
            entry = X509_NAME_get_entry(name, i)
            problem = _name_value(X509_NAME_ENTRY_get_data(entry), as_text)
            if problem:
                return problem
            rdn = X509_NAME_ENTRY_set(entry)
            if X509_NAME_add_entry(copy, entry, -1, -1 if rdn == previous else 0) != 1:
                raise _error("X509_NAME_add_entry")
            previous = rdn
        original, size = _P(), ctypes.c_size_t()
        if X509_NAME_get0_der(name, ctypes.byref(original), ctypes.byref(size)) != 1:
            raise _error("X509_NAME_get0_der")
        length = i2d_X509_NAME(copy, ctypes.byref(encoded))
        if length != size.value or _at(encoded.value, length) != _at(original.value, length):
            return "a name that is not DER"
        return None
    finally:
        CRYPTO_free(encoded.value, None, 0)
        X509_NAME_free(copy)


def _name_value(value: int, as_text: bool) -> str | None:
    kind = ASN1_STRING_type(value)
    if as_text and kind not in _NAME_STRING_TYPES:
        return f"a name attribute of ASN.1 type {kind}"
    if kind == _V_ASN1_NUMERICSTRING and _string(value).strip(b"0123456789 "):
        return "a NumericString name with other characters"
    if kind == _V_ASN1_PRINTABLESTRING:
        pointer, size = ASN1_STRING_get0_data(value), ASN1_STRING_length(value)
        if size and ASN1_PRINTABLE_type(pointer, size) != _V_ASN1_PRINTABLESTRING:
            return "a PrintableString name with other characters"
    return None


def _u64(integer: int | None, what: str) -> str | None:
    """cryptography reads these INTEGERs as u64: negative or 2**64 and up is refused."""
    if integer and (ASN1_STRING_type(integer) == _V_ASN1_NEG_INTEGER or len(_string(integer)) > 8):
        return f"{what} is not an unsigned 64-bit integer"
    return None


def _non_empty(stack: int) -> str | None:
    return None if OPENSSL_sk_num(stack) else "empty"


def _basic_constraints(decoded: int) -> str | None:
    bc = _BasicConstraints.from_address(decoded)
    if bc.ca not in (0, 0xFF):  # OpenSSL keeps the BOOLEAN's byte, and encodes it back
        return "cA is not a DER BOOLEAN"
    if bc.pathlen and not bc.ca:
        return "a pathLenConstraint without cA"
    return _u64(bc.pathlen, "pathLenConstraint")


def _authority_key_id(decoded: int) -> str | None:
    aki = _AuthorityKeyId.from_address(decoded)
    if bool(aki.issuer) != bool(aki.serial):
        return "authorityCertIssuer without authorityCertSerialNumber, or the reverse"
    return _general_names(aki.issuer)


def _access_descriptions(decoded: int) -> str | None:
    return _first(
        *(
            lambda d=d: _general_name(_AccessDescription.from_address(d).location)
            for d in _items(decoded)
        )
    )


def _distribution_points(decoded: int) -> str | None:
    for point in map(_DistPoint.from_address, _items(decoded)):
        if not point.distpoint and not point.crl_issuer:
            return "a distribution point with neither name nor CRL issuer"
        if point.distpoint:
            name = _DistPointName.from_address(point.distpoint)
            problem = _general_names(name.name) if name.type == 0 else None
            if problem:
                return problem
        problem = _general_names(point.crl_issuer)
        if problem:
            return problem
    return None


def _name_constraints(decoded: int) -> str | None:
    constraints = _NameConstraints.from_address(decoded)
    if not constraints.permitted and not constraints.excluded:
        return "neither permitted nor excluded subtrees"
    for subtrees in (constraints.permitted, constraints.excluded):
        if subtrees and not OPENSSL_sk_num(subtrees):
            return "an empty list of subtrees"
        for subtree in map(_GeneralSubtree.from_address, _items(subtrees)):
            if subtree.minimum and not any(_string(subtree.minimum)):
                return "a subtree's minimum encodes the default, 0"
            problem = (
                _general_name(subtree.base, constraint=True)
                or _u64(subtree.minimum, "minimum")
                or _u64(subtree.maximum, "maximum")
            )
            if problem:
                return problem
    return None


def _policy_constraints(decoded: int) -> str | None:
    pc = _PolicyConstraints.from_address(decoded)
    if not pc.require_explicit_policy and not pc.inhibit_policy_mapping:
        return "empty"
    return _u64(pc.require_explicit_policy, "requireExplicitPolicy") or _u64(
        pc.inhibit_policy_mapping, "inhibitPolicyMapping"
    )


def _private_key_usage_period(decoded: int) -> str | None:
    period = _PrivateKeyUsagePeriod.from_address(decoded)
    if not period.not_before and not period.not_after:
        return "empty"
    problem = _der_time(period.not_before) or _der_time(period.not_after)
    if not problem and period.not_before and period.not_after:
        start, end = (
            _time(t, "privateKeyUsagePeriod") for t in (period.not_before, period.not_after)
        )
        if start > end:
            return "notBefore after notAfter"
    return problem


def _der_time(asn1_time: int | None) -> str | None:
    if not asn1_time:
        return None
    tm = _Tm()
    if ASN1_TIME_to_tm(asn1_time, ctypes.byref(tm)) != 1:
        return "an invalid time"
    return _not_der_time(asn1_time)


def _certificate_policies(decoded: int) -> str | None:
    if not OPENSSL_sk_num(decoded):
        return "empty"
    for policy in map(_PolicyInfo.from_address, _items(decoded)):
        for qualifier in map(_PolicyQualifierInfo.from_address, _items(policy.qualifiers)):
            kind = OBJ_obj2nid(qualifier.pqualid)
            if kind == _NID_CPS_QUALIFIER:
                if not _string(qualifier.d).isascii():
                    return "a CPS URI that is not ASCII"
            elif kind == _NID_USER_NOTICE:
                notice = _UserNotice.from_address(qualifier.d)
                texts = [notice.exptext]
                if notice.noticeref:
                    texts.append(_NoticeReference.from_address(notice.noticeref).organization)
                if any(_display_text(text) for text in texts):
                    return "a user notice's text is not of its type"
            else:
                return "a policy qualifier that is neither CPS URI nor user notice"
    return None


def _display_text(text: int | None) -> bool:
    """True if an IA5String is not ASCII, or a UTF8String not UTF-8."""
    if not text:
        return False
    kind, data = ASN1_STRING_type(text), _string(text)
    if kind == _V_ASN1_IA5STRING:
        return not data.isascii()
    if kind == _V_ASN1_UTF8STRING:
        try:
            data.decode()
        except UnicodeDecodeError:
            return True
    return False


def _inhibit_any_policy(decoded: int) -> str | None:
    """cryptography reads skipCerts as any non-negative integer."""
    if ASN1_STRING_type(decoded) == _V_ASN1_NEG_INTEGER:
        return "a negative skipCerts"
    return None


def _tls_features(decoded: int) -> str | None:
    features = _items(decoded)
    if not features:
        return "empty"
    for feature in features:
        negative = ASN1_STRING_type(feature) == _V_ASN1_NEG_INTEGER
        if negative or int.from_bytes(_string(feature), "big") not in _TLS_FEATURES:
            return "a TLS feature cryptography has no name for"
    return None


def _signed_certificate_timestamps(decoded: int) -> str | None:
    """cryptography reads only v1 SCTs; OpenSSL keeps one of another version as bytes."""
    if any(SCT_get_version(sct) != 0 for sct in _items(decoded)):
        return "an SCT that is not v1"
    return None


def _certificate_template(decoded: int) -> str | None:
    """SEQUENCE { templateID OID, majorVersion INTEGER (u32) OPTIONAL, minor OPTIONAL }."""
    fields = [_Asn1Type.from_address(field) for field in _items(decoded)]
    kinds = [field.type for field in fields]
    if not 1 <= len(kinds) <= 3 or kinds[0] != _V_ASN1_OBJECT:
        return "not a template ID and versions"
    for field in fields[1:]:
        if (
            field.type != _V_ASN1_INTEGER
            or ASN1_STRING_type(field.value) == _V_ASN1_NEG_INTEGER
            or len(_string(field.value)) > 4
        ):
            return "a template version that is not an unsigned 32-bit integer"
    return None


def _rules() -> dict[int | str, Callable[[int], str | None]]:
    by_oid: dict[str, Callable[[int], str | None]] = {
        "2.5.29.16": _private_key_usage_period,
        "2.5.29.17": lambda d: _non_empty(d) or _general_names(d),
        "2.5.29.18": lambda d: _non_empty(d) or _general_names(d),
        "2.5.29.19": _basic_constraints,
        "2.5.29.30": _name_constraints,
        "2.5.29.31": _distribution_points,
        "2.5.29.32": _certificate_policies,
        "2.5.29.35": _authority_key_id,
        "2.5.29.36": _policy_constraints,
        "2.5.29.37": _non_empty,
        "2.5.29.46": _distribution_points,
        "2.5.29.54": _inhibit_any_policy,
        "1.3.6.1.5.5.7.1.1": _access_descriptions,
        "1.3.6.1.5.5.7.1.11": _access_descriptions,
        "1.3.6.1.5.5.7.1.24": _tls_features,
        "1.3.6.1.4.1.11129.2.4.2": _signed_certificate_timestamps,
        "1.3.6.1.4.1.311.21.7": _certificate_template,
    }
    return {OBJ_txt2nid(oid.encode()) or oid: rule for oid, rule in by_oid.items()}


_RULES = _rules()


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
    validity's times are held to DER by _time.)
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
        if size != len(der) or _at(encoded.value, size) != der:
            return "the certificate is not DER"
    finally:
        CRYPTO_free(encoded.value, None, 0)
    return (
        _algorithms(x)
        or _name_problem(X509_get_subject_name(x))
        or _name_problem(X509_get_issuer_name(x))
    )


def _oid_text(oid: int, room: int = 128) -> str:
    """The dotted OID; OBJ_obj2txt says how long it is when it does not fit."""
    text = ctypes.create_string_buffer(room)
    size = OBJ_obj2txt(text, room, oid, 1)
    if size >= room:
        return _oid_text(oid, size + 1)
    return text.value.decode(errors="replace")


# --- keys ---------------------------------------------------------------------------


def generate_p256() -> KeyMaterial:
    """A fresh P-256 key from OpenSSL's DRBG."""
    if EVP_PKEY_generate is None:
        raise ValueError(f"key generation needs OpenSSL 3.0 or later, not {ssl.OPENSSL_VERSION}")
    with _clean_errors():
        ctx = EVP_PKEY_CTX_new_from_name(None, b"EC", None)
        if not ctx:
            raise _error("EVP_PKEY_CTX_new_from_name")
        pkey = _P()
        try:
            if (
                EVP_PKEY_keygen_init(ctx) != 1
                or EVP_PKEY_CTX_set_group_name(ctx, b"P-256") != 1
                or EVP_PKEY_generate(ctx, ctypes.byref(pkey)) != 1
            ):
                raise _error("cannot generate a P-256 key")
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
    with _clean_errors():
        source = ctypes.create_string_buffer(data, len(data))
        bio = BIO_new_mem_buf(source, len(data))
        if not bio:
            raise _error("BIO_new_mem_buf")
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
        pkey = _d2i(d2i_AutoPrivateKey, EVP_PKEY_free, der, f"not a {label.decode()}", secret=True)
        try:
            return _material(pkey)
        finally:
            EVP_PKEY_free(pkey)


def _next_pem_block(bio: int) -> tuple[bytes, bytes, bytes]:
    """(label, headers, DER) of the next PEM block; ValueError at the end."""
    label, headers, data, size = _P(), _P(), _P(), _LONG()
    if PEM_read_bio(bio, *(ctypes.byref(v) for v in (label, headers, data, size))) != 1:
        raise _error("no private key in the PEM")
    try:
        return _at(label.value), _at(headers.value), _at(data.value, size.value)
    finally:
        if data.value:
            ctypes.memset(data.value, 0, size.value)
        for pointer in (label, headers, data):
            CRYPTO_free(pointer.value, None, 0)


def _material(pkey: int) -> KeyMaterial:
    p8 = EVP_PKEY2PKCS8(pkey)
    if not p8:
        raise _error("cannot export the key as PKCS#8")
    try:
        pkcs8 = _i2d(i2d_PKCS8_PRIV_KEY_INFO, p8, secret=True)
    finally:
        PKCS8_PRIV_KEY_INFO_free(p8)
    return KeyMaterial(pkcs8, _i2d(i2d_PUBKEY, pkey), _algorithm(pkey))


def _algorithm(pkey: int) -> str:
    if EVP_PKEY_get0_type_name is None:
        raise ValueError(f"key type names need OpenSSL 3.0 or later, not {ssl.OPENSSL_VERSION}")
    name = EVP_PKEY_get0_type_name(pkey)
    return name.decode() if name else "UNKNOWN"


@contextmanager
def _pkey(pkcs8: bytes) -> Iterator[int]:
    p8 = _d2i(d2i_PKCS8_PRIV_KEY_INFO, PKCS8_PRIV_KEY_INFO_free, pkcs8, "not PKCS#8", secret=True)
    try:
        pkey = EVP_PKCS82PKEY(p8)
    finally:
        PKCS8_PRIV_KEY_INFO_free(p8)
    if not pkey:
        raise _error("unusable PKCS#8 private key")
    try:
        yield pkey
    finally:
        EVP_PKEY_free(pkey)


def sign_csr(pkcs8: bytes, digest: bool) -> bytes:
    """A DER PKCS#10 request for the key: version 1, empty subject, no attributes,
    signed with SHA-256 (`digest`) or the key's own scheme (Ed25519)."""
    with _clean_errors(), _pkey(pkcs8) as pkey:
        req = X509_REQ_new()
        if not req:
            raise _error("X509_REQ_new")
        try:
            if (
                X509_REQ_set_version(req, 0) != 1
                or X509_REQ_set_pubkey(req, pkey) != 1
                or X509_REQ_sign(req, pkey, EVP_sha256() if digest else None) <= 0
            ):
                raise _error("cannot sign the CSR")
            return _i2d(i2d_X509_REQ, req)
        finally:
            X509_REQ_free(req)


# --- chains -------------------------------------------------------------------------


def verify_certificate(chain: Sequence[bytes], roots: Sequence[bytes]) -> None:
    """X509_verify_cert of chain[0], with chain[1:] untrusted and `roots` trusted,
    X509_V_FLAG_X509_STRICT and without time; ValueError with OpenSSL's reason."""
    if not chain:
        raise ValueError("the chain is empty")
    with _clean_errors(), _x509_list([*chain, *roots]) as certs:
        leaf, intermediates, anchors = certs[0], certs[1 : len(chain)], certs[len(chain) :]
        store = X509_STORE_new()
        untrusted = OPENSSL_sk_new_null()
        ctx = X509_STORE_CTX_new()
        try:
            if not (store and untrusted and ctx):
                raise _error("out of memory")
            for anchor in anchors:
                if X509_STORE_add_cert(store, anchor) != 1:
                    raise _error("cannot trust a root")
            for intermediate in intermediates:
                if not OPENSSL_sk_push(untrusted, intermediate):
                    raise _error("out of memory")
            if X509_STORE_CTX_init(ctx, store, leaf, untrusted) != 1:
                raise _error("X509_STORE_CTX_init")
            param = X509_STORE_CTX_get0_param(ctx)
            X509_VERIFY_PARAM_set_flags(
                param, _X509_V_FLAG_NO_CHECK_TIME | _X509_V_FLAG_X509_STRICT
            )
            if X509_verify_cert(ctx) != 1:
                reason = X509_verify_cert_error_string(X509_STORE_CTX_get_error(ctx))
                raise ValueError((reason or b"verification failed").decode(errors="replace"))
        finally:
            X509_STORE_CTX_free(ctx)  # NULL is a no-op for each
            OPENSSL_sk_free(untrusted)
            X509_STORE_free(store)


@contextmanager
def _x509_list(ders: Sequence[bytes]) -> Iterator[list[int]]:
    certs: list[int] = []
    try:
        for der in ders:
            certs.append(_d2i(d2i_X509, X509_free, der, _NOT_A_CERTIFICATE))
        yield certs
    finally:
        for x in certs:
            X509_free(x)
