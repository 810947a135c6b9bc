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
#: The extensions cryptography decodes that OpenSSL has an ASN.1 type for, by NID:
#: (the type, whether cryptography wants at least one element in it).
_EXTENSION_TYPES = {
    87: ("BASIC_CONSTRAINTS", False),
    83: ("ASN1_BIT_STRING", False),  # keyUsage
    126: ("EXTENDED_KEY_USAGE", True),
    85: ("GENERAL_NAMES", True),  # subjectAltName
    86: ("GENERAL_NAMES", True),  # issuerAltName
    82: ("ASN1_OCTET_STRING", False),  # subjectKeyIdentifier
    90: ("AUTHORITY_KEYID", False),
    89: ("CERTIFICATEPOLICIES", True),
    177: ("AUTHORITY_INFO_ACCESS", False),
    398: ("AUTHORITY_INFO_ACCESS", False),  # subjectInfoAccess
    103: ("CRL_DIST_POINTS", False),
    857: ("CRL_DIST_POINTS", False),  # freshestCRL
    666: ("NAME_CONSTRAINTS", False),
    401: ("POLICY_CONSTRAINTS", False),
    748: ("ASN1_INTEGER", False),  # inhibitAnyPolicy
    369: ("ASN1_NULL", False),  # OCSP noCheck
}
_GEN_EMAIL, _GEN_DNS, _GEN_URI = 1, 2, 6  # the IA5String names of a GENERAL_NAME
_V_ASN1_NEG_INTEGER = 0x102
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
X509_get_ext_d2i = _fn("X509_get_ext_d2i", _P, _P, _INT, _P, _P)
X509_EXTENSION_get_object = _fn("X509_EXTENSION_get_object", _P, _P)
X509_EXTENSION_get_data = _fn("X509_EXTENSION_get_data", _P, _P)
ASN1_item_d2i = _fn("ASN1_item_d2i", _P, _P, _P, _LONG, _P)
ASN1_item_i2d = _fn("ASN1_item_i2d", _INT, _P, _P, _P)
ASN1_item_free = _fn("ASN1_item_free", None, _P, _P)
OBJ_obj2nid = _fn("OBJ_obj2nid", _INT, _P)
OBJ_obj2txt = _fn("OBJ_obj2txt", _INT, _P, _INT, _P, _INT)
GENERAL_NAMES_free = _fn("GENERAL_NAMES_free", None, _P)
ASN1_BIT_STRING_free = _fn("ASN1_BIT_STRING_free", None, _P)
ASN1_OBJECT_free = _fn("ASN1_OBJECT_free", None, _P)
OPENSSL_sk_pop_free = _fn("OPENSSL_sk_pop_free", None, _P, _P)
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


#: ASN1_ITEM of each type in _EXTENSION_TYPES, by NID.
_EXTENSION_ITEMS = {
    nid: (_item(name), non_empty) for nid, (name, non_empty) in _EXTENSION_TYPES.items()
}


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
        key_usage, key_usage_critical = _key_usage(x)
        uris, names_problem = _uris(x)
        return ParsedCert(
            serial=_serial(x),
            subject=subject,
            issuer=issuer,
            not_before=_time(X509_get0_notBefore(x), "notBefore"),
            not_after=_time(X509_get0_notAfter(x), "notAfter"),
            flags=flags,
            key_usage=key_usage,
            key_usage_critical=key_usage_critical,
            extended_key_usage=_extended_key_usage(x),
            uris=uris,
            spki=_i2d(i2d_X509_PUBKEY, X509_get_X509_PUBKEY(x)),
            malformed=_malformed(x, flags, key_usage) or names_problem,
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
    tm = _Tm()
    if not asn1_time or ASN1_TIME_to_tm(asn1_time, ctypes.byref(tm)) != 1:
        raise _error(f"invalid {what} time")
    return datetime(
        tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, tzinfo=UTC
    )


# X509_get_key_usage and X509_get_extended_key_usage answer 0 for a certificate OpenSSL
# finds invalid (EXFLAG_INVALID): these read the extensions whatever else is wrong.


def _key_usage(x: int) -> tuple[int | None, bool]:
    """The keyUsage bits as OpenSSL numbers them (KU_*), and whether it is critical."""
    critical = _INT()
    bits = X509_get_ext_d2i(x, _NID_KEY_USAGE, ctypes.byref(critical), None)
    if not bits:
        return None, False
    try:
        data = _string(bits)  # named bits 0-7 in the first byte, 8 in the second
    finally:
        ASN1_BIT_STRING_free(bits)
    return int.from_bytes(data[:2], "little"), critical.value == 1


def _extended_key_usage(x: int) -> frozenset[int] | None:
    """The NIDs of the extKeyUsage purposes (NID_undef, 0, for OIDs OpenSSL has none for)."""
    purposes = X509_get_ext_d2i(x, _NID_EXT_KEY_USAGE, None, None)
    if not purposes:
        return None
    try:
        return frozenset(
            OBJ_obj2nid(OPENSSL_sk_value(purposes, i)) for i in range(OPENSSL_sk_num(purposes))
        )
    finally:
        OPENSSL_sk_pop_free(purposes, ctypes.cast(ASN1_OBJECT_free, _P))


def _uris(x: int) -> tuple[tuple[str, ...], str | None]:
    """The URI SANs in order (none when the SAN is absent, repeated or undecodable), and
    why the SAN is unusable if one of its IA5Strings (URI, DNS, email) is not UTF-8, as
    cryptography reads them."""
    names = X509_get_ext_d2i(x, _NID_SUBJECT_ALT_NAME, None, None)
    if not names:
        return (), None
    try:
        kind = _INT()
        uris, problem = [], None
        for i in range(OPENSSL_sk_num(names)):
            value = GENERAL_NAME_get0_value(OPENSSL_sk_value(names, i), ctypes.byref(kind))
            if kind.value not in (_GEN_URI, _GEN_DNS, _GEN_EMAIL):
                continue
            data = _string(value)
            try:
                text = data.decode()
            except UnicodeDecodeError:
                text, problem = data.decode(errors="replace"), "a SAN is not UTF-8"
            if kind.value == _GEN_URI:
                uris.append(text)
        return tuple(uris), problem
    finally:
        GENERAL_NAMES_free(names)


def _malformed(x: int, flags: int, key_usage: int | None) -> str | None:
    """Why the extensions are unusable, as cryptography would refuse them: an OID
    repeated, or a value of a type cryptography decodes (`_EXTENSION_TYPES`) that is
    not one DER value of that type (decoded by OpenSSL, then encoded back to the same
    bytes), or an empty list where one is required. Then what else makes OpenSSL mark
    the certificate EXFLAG_INVALID (a negative pathLenConstraint, ...), except an
    empty keyUsage, which cryptography reads as all false."""
    seen: set[int | str] = set()
    for i in range(X509_get_ext_count(x)):
        extension = X509_get_ext(x, i)
        oid = X509_EXTENSION_get_object(extension)
        nid = OBJ_obj2nid(oid)
        key: int | str = nid or _oid_text(oid)
        if key in seen:
            return f"duplicate extension {_oid_text(oid)}"
        seen.add(key)
        if nid in _EXTENSION_ITEMS:
            item, non_empty = _EXTENSION_ITEMS[nid]
            problem = _not_der(X509_EXTENSION_get_data(extension), item, non_empty)
            if problem:
                return f"extension {_oid_text(oid)}: {problem}"
    if flags & EXFLAG_INVALID and key_usage != 0:
        return "OpenSSL finds the extensions invalid"
    return None


def _not_der(value: int, item: int, non_empty: bool) -> str | None:
    """What keeps the ASN1_OCTET_STRING `value` from holding one DER value of ASN.1
    type `item`, if anything."""
    start, size = ASN1_STRING_get0_data(value), ASN1_STRING_length(value)
    cursor = _P(start)
    decoded = ASN1_item_d2i(None, ctypes.byref(cursor), size, item)
    if not decoded:
        return "undecodable"
    encoded = _P()
    try:
        if cursor.value != start + size:
            return "bytes after the value"
        if non_empty and OPENSSL_sk_num(decoded) == 0:
            return "empty"
        if ASN1_item_i2d(decoded, ctypes.byref(encoded), item) != size or (
            _at(encoded.value, size) != _at(start, size)
        ):
            return "not DER"
        return None
    finally:
        CRYPTO_free(encoded.value, None, 0)  # ASN1_item_i2d allocated it
        ASN1_item_free(decoded, item)


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
