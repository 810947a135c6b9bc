"""The OpenSSL that the ssl module already loaded, bound with ctypes: the binding proper.

The agent reads, checks and makes its certificates through this binding so that
it never imports `cryptography`, whose Rust extension (with its own copy of
OpenSSL) is 8.6 MiB of an idle agent's memory. The library is the very
libcrypto that `_ssl` is linked against (`RTLD_NOLOAD`: never another one found
on the disk), checked to be the version `ssl` reports.

This module loads it and declares every function the binding calls, under its C
name, with its argument and result types (pointers as `c_void_p`, never the
default int); it holds the constants of OpenSSL's headers that the binding
uses, under their C names, and the helpers that own OpenSSL's memory and turn
its error queue into ValueError. The modules above it, each importing only
from here (and x509_parse from x509_rules), do the work:

- `identity.x509_rules`: cryptography's rules beyond the ASN.1, for extensions,
  names and times;
- `identity.x509_parse`: a certificate's facts, and whether cryptography would
  refuse it;
- `identity.openssl_keys`: keys (generate, read PEM) and CSRs;
- `identity.x509_verify`: chain verification;
- `identity.openssl_engine`: on OpenSSL 3.0, EC keys through OpenSSL's built-in
  method, which makes every certificate a handshake reads cheaper to decode (its
  callback is C: identity/_ec_methods.c).

No other module says ctypes. Every input is a copy with its
length (or OpenSSL's own memory with its length), and everything OpenSSL
allocates for us is freed in `finally`. OpenSSL is never handed a Python
object's address to keep. What goes out is Python values: `bytes`, `int`,
`str`, `datetime`. A failing call raises ValueError carrying OpenSSL's first
error (`openssl_error`), and each operation clears the thread's error queue
before and after (`clean_errors`), so no error of ours leaks into the ssl
module's next message (nor one of its into ours). ctypes releases the GIL
around each call; the objects are this thread's own, so that is safe.

`__all__` names the constants and helpers; the declared functions are public
too, by their C names, and are left out of it.

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
from typing import Any

__all__ = [
    "BIO_CTRL_INFO",
    "BIO_CTRL_RESET",
    "EVP_PKEY_EC",
    "EXFLAG_BCONS",
    "EXFLAG_CA",
    "EXFLAG_INVALID",
    "GEN_DIRNAME",
    "GEN_DNS",
    "GEN_EDIPARTY",
    "GEN_EMAIL",
    "GEN_IPADD",
    "GEN_URI",
    "GEN_X400",
    "V_ASN1_GENERALIZEDTIME",
    "V_ASN1_IA5STRING",
    "V_ASN1_INTEGER",
    "V_ASN1_NEG_INTEGER",
    "V_ASN1_NULL",
    "V_ASN1_NUMERICSTRING",
    "V_ASN1_OBJECT",
    "V_ASN1_PRINTABLESTRING",
    "V_ASN1_SEQUENCE",
    "V_ASN1_UNDEF",
    "V_ASN1_UTCTIME",
    "V_ASN1_UTF8STRING",
    "X509_V_FLAG_NO_CHECK_TIME",
    "X509_V_FLAG_X509_STRICT",
    "NID_ext_key_usage",
    "NID_id_qt_cps",
    "NID_id_qt_unotice",
    "NID_key_usage",
    "NID_subject_alt_name",
    "asn1_item",
    "bytes_at",
    "clean_errors",
    "d2i",
    "i2d",
    "openssl_error",
    "stack_items",
    "string_data",
    "x509_list",
    "x509_to_read",
]


# X509_get_extension_flags (x509v3.h)
EXFLAG_BCONS = 0x1
EXFLAG_CA = 0x10
EXFLAG_INVALID = 0x80
# NIDs (obj_mac.h), GENERAL_NAME types (x509v3.h), ASN.1 tags (asn1.h), BIO controls
# (bio.h) and verification flags (x509_vfy.h): the constants the modules above use
NID_key_usage = 83
NID_ext_key_usage = 126
NID_subject_alt_name = 85
GEN_EMAIL, GEN_DNS, GEN_URI = 1, 2, 6  # the IA5String names of a GENERAL_NAME
GEN_X400, GEN_DIRNAME, GEN_EDIPARTY, GEN_IPADD = 3, 4, 5, 7
V_ASN1_OBJECT, V_ASN1_INTEGER, V_ASN1_NEG_INTEGER = 6, 2, 0x102
V_ASN1_UTF8STRING, V_ASN1_PRINTABLESTRING, V_ASN1_IA5STRING = 12, 19, 22
V_ASN1_UTCTIME, V_ASN1_GENERALIZEDTIME = 23, 24
NID_id_qt_cps, NID_id_qt_unotice = 164, 165
V_ASN1_UNDEF, V_ASN1_NULL, V_ASN1_SEQUENCE = -1, 5, 16
V_ASN1_NUMERICSTRING = 18
BIO_CTRL_RESET = 1
BIO_CTRL_INFO = 3
X509_V_FLAG_X509_STRICT = 0x20
X509_V_FLAG_NO_CHECK_TIME = 0x200000
EVP_PKEY_EC = 408  # NID_X9_62_id_ecPublicKey (evp.h, obj_mac.h)
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
EVP_PKEY_new = _fn("EVP_PKEY_new", _P)
EVP_PKEY_get1_EC_KEY = _fn("EVP_PKEY_get1_EC_KEY", _P, _P)
EVP_PKEY_set1_EC_KEY = _fn("EVP_PKEY_set1_EC_KEY", _INT, _P, _P)
EC_KEY_free = _fn("EC_KEY_free", None, _P)
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
# Engines (none in 4.0, nor in a build without them)
ENGINE_new = _fn("ENGINE_new", _P, optional=True)
ENGINE_set_id = _fn("ENGINE_set_id", _INT, _P, _STR, optional=True)
ENGINE_set_name = _fn("ENGINE_set_name", _INT, _P, _STR, optional=True)
ENGINE_set_pkey_meths = _fn("ENGINE_set_pkey_meths", _INT, _P, _P, optional=True)
ENGINE_get_pkey_meths = _fn("ENGINE_get_pkey_meths", _P, _P, optional=True)
ENGINE_register_pkey_meths = _fn("ENGINE_register_pkey_meths", _INT, _P, optional=True)
ENGINE_get_pkey_meth_engine = _fn("ENGINE_get_pkey_meth_engine", _P, _INT, optional=True)
ENGINE_finish = _fn("ENGINE_finish", _INT, _P, optional=True)
EVP_PKEY_meth_find = _fn("EVP_PKEY_meth_find", _P, _INT, optional=True)
# fmt: on


def asn1_item(name: str) -> int:
    """The ASN1_ITEM of an ASN.1 type: a function's result in 3.x, a variable in 1.1.1."""
    if ssl.OPENSSL_VERSION_INFO[0] >= 3:
        return int(_fn(f"{name}_it", _P)())
    return ctypes.addressof(ctypes.c_char.in_dll(_lib, f"{name}_it"))


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


# --- errors and memory ----------------------------------------------------------


def openssl_error(what: str) -> ValueError:
    """`what`, with OpenSSL's first queued reason; the queue is left empty."""
    code = ERR_get_error()
    ERR_clear_error()
    if not code:
        return ValueError(what)
    text = ctypes.create_string_buffer(_MAX_ERROR)
    ERR_error_string_n(code, text, _MAX_ERROR)
    return ValueError(f"{what}: {text.value.decode(errors='replace')}")


@contextmanager
def clean_errors() -> Iterator[None]:
    """An operation that starts and ends with an empty error queue."""
    ERR_clear_error()
    try:
        yield
    finally:
        ERR_clear_error()


def i2d(encode: Callable[[Any, Any], int], obj: int, *, secret: bool = False) -> bytes:
    """The DER of `obj`: `encode(obj, NULL)` sizes it, `encode(obj, &p)` writes it.
    A `secret`'s buffer is wiped once copied."""
    size = encode(obj, None)
    if size <= 0:
        raise openssl_error("cannot encode")
    buffer = ctypes.create_string_buffer(size)
    cursor = _P(ctypes.addressof(buffer))
    try:
        if encode(obj, ctypes.byref(cursor)) != size:
            raise openssl_error("cannot encode")
        return buffer.raw
    finally:
        if secret:
            ctypes.memset(buffer, 0, size)


def d2i(
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
        raise openssl_error(what)
    if cursor.value != start + len(der):
        free(obj)
        raise ValueError(f"{what}: {start + len(der) - (cursor.value or 0)} bytes after the DER")
    return obj


@contextmanager
def x509_to_read(der: bytes) -> Iterator[int]:
    """The certificate parsed in _PARSING: its public key is left undecoded."""
    if _PARSING is None:
        x = d2i(d2i_X509, X509_free, der, _NOT_A_CERTIFICATE)
    else:
        x = X509_new_ex(_PARSING, None)
        if not x:
            raise openssl_error("X509_new_ex")
        x = d2i(d2i_X509, X509_free, der, _NOT_A_CERTIFICATE, into=x)
    try:
        yield x
    finally:
        X509_free(x)


def bytes_at(pointer: int | None, size: int | None = None) -> bytes:
    """A copy of `size` bytes at `pointer` (up to its NUL if no size); NULL is empty."""
    if not pointer or (size is not None and size <= 0):
        return b""
    return ctypes.string_at(pointer, -1 if size is None else size)


def string_data(asn1_string: int) -> bytes:
    return bytes_at(ASN1_STRING_get0_data(asn1_string), ASN1_STRING_length(asn1_string))


def stack_items(stack: int | None) -> list[int]:
    return [OPENSSL_sk_value(stack, i) for i in range(OPENSSL_sk_num(stack))] if stack else []


@contextmanager
def x509_list(ders: Sequence[bytes]) -> Iterator[list[int]]:
    certs: list[int] = []
    try:
        for der in ders:
            certs.append(d2i(d2i_X509, X509_free, der, _NOT_A_CERTIFICATE))
        yield certs
    finally:
        for x in certs:
            X509_free(x)
