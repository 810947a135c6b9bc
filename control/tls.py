"""The control plane's TLS: its own SVID served, agents' SVIDs required and verified.

The files are the control plane's own agent sidecar's output (identity
output_dir): the SVID, its key and the trust bundle, all replaced as they
rotate. They are checked every `RELOAD_INTERVAL`; when any changed and the
three load together, a new context takes new connections (a bundle that lost
a root cannot be changed in place), and open streams go on, unless the bundle
lost a certificate: then every open connection was verified against a root
no longer trusted, and is ended so that its agent handshakes again (a stream
ended alone would be opened again on the same connection, unverified). A set
that does not load (half-written, a key not matching yet) keeps the current
context.

TLS 1.3 only, no session tickets or cache (identity.serving): every
handshake verifies the agent's chain against the bundle, strict X.509, and
the agent's SPIFFE ID is read from the verified leaf by `peer_spiffe_id`.
ALPN offers h2 only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import Callable
from datetime import datetime

from control.config import TlsFiles
from identity import SpiffeId, SvidError, TrustDomain, check_leaf
from identity.cert import Cert
from identity.serving import tls_server_context
from identity.tlsfiles import load_cert_chain

log = logging.getLogger("outrider.control.tls")

RELOAD_INTERVAL = 1.0
Stamp = tuple[tuple[int, int, int], ...]


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """A context from the three files; OSError or ssl.SSLError if they do not load together."""
    cert, key, bundle = (
        files.cert_file.read_bytes(),
        files.key_file.read_bytes(),
        files.bundle_file.read_bytes(),
    )
    context = tls_server_context()
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    context.set_alpn_protocols(["h2"])
    try:
        context.load_verify_locations(cadata=bundle.decode("ascii"))
    except UnicodeDecodeError as exc:
        raise ssl.SSLError(f"{files.bundle_file} is not PEM") from exc
    load_cert_chain(context, cert, key)
    return context


def trusted(files: TlsFiles) -> frozenset[bytes]:
    """The bundle's certificates, DER: what a change of bundle may have removed."""
    try:
        certs = Cert.all_from_pem(files.bundle_file.read_bytes())
    except ValueError:
        return frozenset()
    return frozenset(cert.der for cert in certs)


def stamp(files: TlsFiles) -> Stamp:
    """What changes when a file is replaced: inode, size and mtime (symlinks followed)."""
    paths = (files.cert_file, files.key_file, files.bundle_file)
    return tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in map(os.stat, paths))


async def follow(
    files: TlsFiles,
    use: Callable[[ssl.SSLContext], None],
    seen: Stamp,
    untrusted: Callable[[], None],
    interval: float = RELOAD_INTERVAL,
) -> None:
    """Hand `use` a new context whenever the files' stamp is no longer `seen`; call
    `untrusted()` after one whose bundle lost a certificate the last one had."""
    roots = trusted(files)
    while True:
        await asyncio.sleep(interval)
        try:
            now = stamp(files)
        except OSError:
            continue  # between the removal and the rename of a replacement
        if now == seen:
            continue
        seen = now
        try:
            context = server_context(files)
        except (OSError, ssl.SSLError) as exc:
            log.warning("keeping the current SVID and bundle: %s", exc)
        else:
            use(context)
            log.info("loaded the new SVID and bundle from %s", files.cert_file.parent)
            before, roots = roots, trusted(files)
            if before - roots:
                log.warning("the trust bundle lost a root: every agent connects again")
                untrusted()


def peer_spiffe_id(
    der: bytes | None, trust_domain: TrustDomain, now: datetime
) -> tuple[SpiffeId, datetime]:
    """The SPIFFE ID of the client certificate OpenSSL verified, and when it expires;
    SvidError if it is no X.509-SVID of `trust_domain` fit for a client."""
    if der is None:  # CERT_REQUIRED makes this unreachable; refuse rather than assume
        raise SvidError("no_uri_san", "no client certificate")
    try:
        cert = Cert.from_der(der)
    except ValueError as exc:
        raise SvidError("malformed_extensions", f"unreadable client certificate: {exc}") from None
    spiffe_id = check_leaf(cert, usage="client", now=now)
    if not spiffe_id.member_of(trust_domain):
        raise SvidError(
            "foreign_trust_domain", f"{spiffe_id} is not in trust domain {trust_domain}"
        )
    return spiffe_id, cert.not_after
