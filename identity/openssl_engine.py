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
and side (`python -m bench.handshake_micro --part memory`): full 991/963 → 698/669
µs (client/server), resumed 490/701 → 348/417 µs, a session's copy 188 → 49 µs.

OpenSSL asks the engine for the method on every EC operation, in the middle of
handshakes that run without the GIL, so the engine's callback is C
(identity/_ec_methods.c, built with the agent's compiled hot path): a Python one
would take the GIL back each time, and wait there behind any busy thread (a
config check, a tracing exporter). A pure-Python build has no engine.

While the engine is registered, OpenSSL 3.0 gives every EC operation the engine's
method, for provider keys too, and two things only providers do stop working with
it: making a key by a provider-only group name ("P-256", where the built-in method
knows "prime256v1") and signing a provider key's CSR (`ASN1_item_sign` asks the
provider for the signature's AlgorithmIdentifier). identity.openssl_keys does
both the way that works with and without the engine. The engine is never taken
away again: unregistering it while another thread made a P-256 key share mixed
the two kinds of key in that handshake, which then failed.

Only on 3.0, where it was measured: 1.1.1 has no such cost, 4.0 no engines, and
the versions between are left as they are. Not when another engine already has
EC keys (an HSM's, loaded by OPENSSL_CONF), and not with
OUTRIDER_OPENSSL_EC_ENGINE=off in the agent's environment, the operator's way back
to OpenSSL's default (`false`, `0` and `no` too; a value it does not know turns it
off as well, and says so).
"""

from __future__ import annotations

import os
import ssl
import threading
from collections.abc import Mapping

from identity.openssl import (
    EVP_PKEY_EC,
    ENGINE_finish,
    ENGINE_get_pkey_meth_engine,
    ENGINE_new,
    ENGINE_register_pkey_meths,
    ENGINE_set_id,
    ENGINE_set_name,
    ENGINE_set_pkey_meths,
    EVP_PKEY_meth_find,
    clean_errors,
)

try:
    from identity import _ec_methods
except ModuleNotFoundError:  # a pure-Python build (`make pure`, OUTRIDER_PURE=1, no C compiler)
    _ec_methods = None  # type: ignore[assignment]

__all__ = ["SWITCH", "install", "installed"]

SWITCH = "OUTRIDER_OPENSSL_EC_ENGINE"
_ON, _OFF = ("on", "true", "1", "yes", ""), ("off", "false", "0", "no")
_DEFAULT = "OpenSSL's own EC key decoding"
_INSTALLED = (
    "EC keys through OpenSSL 3.0's built-in method: certificates decode 4x faster"
    f" in handshakes ({SWITCH}=off to turn off)"
)
_lock = threading.Lock()
_engine: int | None = None


def install(environ: Mapping[str, str] = os.environ) -> str:
    """Register the engine, once, unless it does not apply here; what was done, for
    the start-up log."""
    global _engine
    switch = environ.get(SWITCH, "").strip().lower()
    if switch in _OFF:
        return f"{_DEFAULT} ({SWITCH}={environ[SWITCH].strip()})"
    if switch not in _ON:
        return f"{_DEFAULT}: {SWITCH}={environ[SWITCH]!r} is neither on nor off, so off"
    if ssl.OPENSSL_VERSION_INFO[:2] != (3, 0):
        return f"{_DEFAULT} ({ssl.OPENSSL_VERSION}: the engine is for 3.0)"
    if ENGINE_new is None or EVP_PKEY_meth_find is None:
        return f"{_DEFAULT} ({ssl.OPENSSL_VERSION} has no engines)"
    if _ec_methods is None:
        return f"{_DEFAULT} (a pure-Python build: the engine's callback is compiled C)"
    with _lock, clean_errors():
        if _engine is not None:
            return _INSTALLED
        other = ENGINE_get_pkey_meth_engine(EVP_PKEY_EC)
        if other:
            ENGINE_finish(other)
            return "OpenSSL's EC keys are another engine's (OPENSSL_CONF): left to it"
        method = EVP_PKEY_meth_find(EVP_PKEY_EC)
        engine = ENGINE_new()
        if not (
            method
            and engine
            and ENGINE_set_id(engine, b"outrider-builtin-ec")
            and ENGINE_set_name(engine, b"OpenSSL's built-in EC key method")
            and _ec_methods.set_method(method)
            and ENGINE_set_pkey_meths(engine, _ec_methods.callback())
            and ENGINE_register_pkey_meths(engine)
        ):
            return f"{_DEFAULT} (the engine could not be registered)"
        _engine = int(engine)  # never freed: OpenSSL's tables point at it
    return _INSTALLED


def installed() -> bool:
    """Whether OpenSSL now gives EC keys the engine's method."""
    if ENGINE_get_pkey_meth_engine is None:
        return False
    with clean_errors():
        engine = ENGINE_get_pkey_meth_engine(EVP_PKEY_EC)
        if engine:
            ENGINE_finish(engine)
    return _engine is not None and engine == _engine
