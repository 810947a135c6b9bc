"""The CA's gRPC TLS follows the bundle it serves: a caller's SVID is verified against the
roots of now, not those the CA started with (a Vault root rotation changes them under it).

Handshakes in memory, with the CA's own contexts (ca/api/tls.py), two CAs' certificates.
"""

from __future__ import annotations

import contextlib
import ssl
from pathlib import Path

from ca.api.tls import ServingTls
from identity import TrustBundle
from identity.tlsfiles import load_cert_chain
from tests import certs
from tests.support import TRUST_DOMAIN, WORKLOAD, make_ca_setup


def handshake(server: ssl.SSLContext, client: certs.Credential) -> str:
    """'ok' once both sides are done, else the server's error."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    load_cert_chain(context, client.chain_pem, client.key_pem)
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    caller = context.wrap_bio(c_in, c_out)
    ca = server.wrap_bio(s_in, s_out, server_side=True)
    try:
        for _ in range(10):
            for side, out, into in ((caller, c_out, s_in), (ca, s_out, c_in)):
                with contextlib.suppress(ssl.SSLWantReadError):
                    side.do_handshake()
                into.write(out.read())
        return "ok" if ca.getpeercert(binary_form=True) else "no certificate"
    except ssl.SSLError as exc:
        return exc.reason or str(exc)


def test_a_new_bundle_is_what_callers_svids_are_verified_against(tmp_path: Path) -> None:
    setups = [make_ca_setup(tmp_path / name) for name in ("old", "new")]
    old, new = (certs.SigningCa.load(setup.ca_dir) for setup in setups)
    bundles = [TrustBundle.from_pem(TRUST_DOMAIN, setup.bundle_pem) for setup in setups]
    serving = certs.issue(old, certs.Shape(dns=("outrider-ca.test",)))
    chain, key = certs.parsed(serving)
    served = [bundles[0]]
    tls = ServingTls(lambda: served[0], chain, key)
    under_old = certs.issue(old, certs.Shape(uris=(WORKLOAD,)))
    under_new = certs.issue(new, certs.Shape(uris=(WORKLOAD,)))
    assert handshake(tls.context, under_old) == "ok"
    assert handshake(tls.context, under_new) != "ok"
    served[0] = bundles[1]  # the root rotated: the CA serves the new bundle only
    assert handshake(tls.context, under_new) == "ok"
    assert handshake(tls.context, under_old) == "CERTIFICATE_VERIFY_FAILED"
    renewed = certs.issue(old, certs.Shape(dns=("outrider-ca.test",)))
    tls.credentials(*certs.parsed(renewed))  # the serving certificate renewed meanwhile
    assert handshake(tls.context, under_new) == "ok"
