"""On OpenSSL 3.0, EC public keys decoded by OpenSSL's built-in method: a handshake a
quarter cheaper.

OpenSSL 3.0 decodes the public key of every certificate it reads through a
provider decoder that it builds afresh each time (`OSSL_DECODER_CTX_new_for_pkey`):
about 105 µs of the 136 µs a P-256 certificate takes. A full mTLS handshake reads
two a side (the peer's leaf and its intermediate); a resumed one reads the peer's
leaf from the ticket, and again in each copy CPython makes of a session.

3.0 still decodes a key with its built-in method, as 1.1.1 did, when an ENGINE is
registered for the key's type (`x509_pubkey_decode`): 31 µs a certificate. So
`install()` registers an engine for id-ecPublicKey whose method is OpenSSL's own
built-in EC method (`EVP_PKEY_meth_find`). Nothing here does cryptography: EC keys
are then decoded, checked, signed with and derived by that built-in code, the
code of OpenSSL 1.1.1, which 3.0 keeps for engines and legacy keys. Per handshake
and side (`python -m bench.handshake_micro --part memory`): full 1,000 → 720 µs,
resumed 495/710 → 356/430 µs (client/server), a session's copy 188 → 50 µs.

While the engine is registered, OpenSSL 3.0 gives every EC operation the engine's
method, and two things only providers do stop working: making a key by a
provider's group name ("P-256") and signing a CSR (`ASN1_item_sign` asks the
provider for the signature's AlgorithmIdentifier). `providers()` lifts the
registration around such work (identity.openssl_keys); handshakes running
meanwhile decode the slow way, nothing else changes for them.

Only on 3.0, where it was measured: 1.1.1 has no such cost, 4.0 no engines, and
the versions between are left as they are. Not when another engine already has
EC keys (an HSM's, loaded by OPENSSL_CONF), and not with
OUTRIDER_OPENSSL_EC_ENGINE=off in the agent's environment, the operator's way back
to OpenSSL's default.
"""

from __future__ import annotations

import ctypes
import os
import ssl
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from ctypes import c_int as _INT
from ctypes import c_void_p as _P
from typing import Any

from identity.openssl import (
    EVP_PKEY_EC,
    ENGINE_finish,
    ENGINE_get_pkey_meth_engine,
    ENGINE_new,
    ENGINE_register_pkey_meths,
    ENGINE_set_id,
    ENGINE_set_name,
    ENGINE_set_pkey_meths,
    ENGINE_unregister_pkey_meths,
    EVP_PKEY_meth_find,
    clean_errors,
)

__all__ = ["SWITCH", "install", "installed", "providers"]

SWITCH = "OUTRIDER_OPENSSL_EC_ENGINE"

# int (*)(ENGINE *, EVP_PKEY_METHOD **, const int **nids, int nid): engine.h
_NIDS_OUT = ctypes.POINTER(ctypes.POINTER(_INT))
_Methods = ctypes.CFUNCTYPE(_INT, _P, ctypes.POINTER(_P), _NIDS_OUT, _INT)
_NIDS = (_INT * 1)(EVP_PKEY_EC)
_lock = threading.Lock()
_engine: int | None = None
_lifted = 0  # how many `providers()` blocks are open


def _methods(engine: int, method: Any, nids: Any, nid: int) -> int:
    if not method:  # which key types it has: asked at registration
        nids[0] = ctypes.cast(_NIDS, ctypes.POINTER(_INT))
        return 1
    if nid == EVP_PKEY_EC:
        method[0] = _EC_METHOD
        return 1
    method[0] = None
    return 0


_EC_METHOD = EVP_PKEY_meth_find(EVP_PKEY_EC) if EVP_PKEY_meth_find is not None else None
# OpenSSL keeps the callback's address for the life of the process, and may call it
# from any thread: it must never be freed, not even as the interpreter ends.
_CALLBACK = _Methods(_methods)
ctypes.pythonapi.Py_IncRef(ctypes.py_object(_CALLBACK))


def install(environ: Mapping[str, str] = os.environ) -> str:
    """Register the engine, once, unless it does not apply here; what was done, for
    the start-up log."""
    global _engine
    if environ.get(SWITCH) == "off":
        return f"OpenSSL's own EC key decoding ({SWITCH}=off)"
    if ssl.OPENSSL_VERSION_INFO[:2] != (3, 0):
        return f"OpenSSL's own EC key decoding ({ssl.OPENSSL_VERSION}: the engine is for 3.0)"
    if ENGINE_new is None or not _EC_METHOD:
        return f"OpenSSL's own EC key decoding ({ssl.OPENSSL_VERSION} has no engines)"
    with _lock, clean_errors():
        if _engine is not None:
            return _INSTALLED
        other = ENGINE_get_pkey_meth_engine(EVP_PKEY_EC)
        if other:
            ENGINE_finish(other)
            return "OpenSSL's EC keys are another engine's (OPENSSL_CONF): left to it"
        engine = ENGINE_new()
        if not (
            engine
            and ENGINE_set_id(engine, b"outrider-builtin-ec")
            and ENGINE_set_name(engine, b"OpenSSL's built-in EC key method")
            and ENGINE_set_pkey_meths(engine, ctypes.cast(_CALLBACK, _P))
            and (_lifted or ENGINE_register_pkey_meths(engine))
        ):
            return "OpenSSL's own EC key decoding (the engine could not be registered)"
        _engine = int(engine)  # never freed: OpenSSL's tables point at it
    return _INSTALLED


_INSTALLED = (
    "EC keys through OpenSSL 3.0's built-in method: certificates decode 4x faster"
    f" in handshakes ({SWITCH}=off to turn off)"
)


def installed() -> bool:
    """Whether OpenSSL now gives EC keys the engine's method."""
    if ENGINE_get_pkey_meth_engine is None:
        return False
    with clean_errors():
        engine = ENGINE_get_pkey_meth_engine(EVP_PKEY_EC)
        if engine:
            ENGINE_finish(engine)
    return _engine is not None and engine == _engine


@contextmanager
def providers() -> Iterator[None]:
    """OpenSSL's providers for EC keys in the block: the engine is unregistered while
    any thread is in one, and registered again when the last leaves."""
    global _lifted
    with _lock:
        if _engine is not None and _lifted == 0:
            ENGINE_unregister_pkey_meths(_engine)
        _lifted += 1
    try:
        yield
    finally:
        with _lock:
            _lifted -= 1
            if _engine is not None and _lifted == 0:
                ENGINE_register_pkey_meths(_engine)
