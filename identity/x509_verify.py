"""Chain verification by OpenSSL's own path validation (X509_verify_cert).

Kept apart from parsing: it reads no facts, it asks OpenSSL whether a chain of
DER certificates leads to a trusted root, with X509_V_FLAG_X509_STRICT as the
agent's TLS contexts verify, and without time (callers check validity against
their own clock). `identity.cert.verify_chain` is its public face.
"""

from __future__ import annotations

from collections.abc import Sequence

from identity.openssl import (
    X509_V_FLAG_NO_CHECK_TIME,
    X509_V_FLAG_X509_STRICT,
    OPENSSL_sk_free,
    OPENSSL_sk_new_null,
    OPENSSL_sk_push,
    X509_STORE_add_cert,
    X509_STORE_CTX_free,
    X509_STORE_CTX_get0_param,
    X509_STORE_CTX_get_error,
    X509_STORE_CTX_init,
    X509_STORE_CTX_new,
    X509_STORE_free,
    X509_STORE_new,
    X509_verify_cert,
    X509_verify_cert_error_string,
    X509_VERIFY_PARAM_set_flags,
    clean_errors,
    openssl_error,
    x509_list,
)

__all__ = ["verify_certificate"]


def verify_certificate(chain: Sequence[bytes], roots: Sequence[bytes]) -> None:
    """X509_verify_cert of chain[0], with chain[1:] untrusted and `roots` trusted,
    X509_V_FLAG_X509_STRICT and without time; ValueError with OpenSSL's reason."""
    if not chain:
        raise ValueError("the chain is empty")
    with clean_errors(), x509_list([*chain, *roots]) as certs:
        leaf, intermediates, anchors = certs[0], certs[1 : len(chain)], certs[len(chain) :]
        store = X509_STORE_new()
        untrusted = OPENSSL_sk_new_null()
        ctx = X509_STORE_CTX_new()
        try:
            if not (store and untrusted and ctx):
                raise openssl_error("out of memory")
            for anchor in anchors:
                if X509_STORE_add_cert(store, anchor) != 1:
                    raise openssl_error("cannot trust a root")
            for intermediate in intermediates:
                if not OPENSSL_sk_push(untrusted, intermediate):
                    raise openssl_error("out of memory")
            if X509_STORE_CTX_init(ctx, store, leaf, untrusted) != 1:
                raise openssl_error("X509_STORE_CTX_init")
            param = X509_STORE_CTX_get0_param(ctx)
            X509_VERIFY_PARAM_set_flags(param, X509_V_FLAG_NO_CHECK_TIME | X509_V_FLAG_X509_STRICT)
            if X509_verify_cert(ctx) != 1:
                reason = X509_verify_cert_error_string(X509_STORE_CTX_get_error(ctx))
                raise ValueError((reason or b"verification failed").decode(errors="replace"))
        finally:
            X509_STORE_CTX_free(ctx)  # NULL is a no-op for each
            OPENSSL_sk_free(untrusted)
            X509_STORE_free(store)
