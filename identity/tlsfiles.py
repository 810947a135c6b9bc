"""Give the ssl module a certificate and key that exist only in memory (and how long every
process's TLS close waits: TLS_SHUTDOWN_TIMEOUT).

`ssl.SSLContext.load_cert_chain` reads paths only. On Linux an anonymous
memory file (memfd) has a path under /proc/self/fd, so the private key never
touches a disk; elsewhere a private temporary directory is used and removed
before this returns.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from pathlib import Path

#: Seconds a TLS close waits for the peer's close_notify (the loop's default is 30 s): a
#: peer whose node froze, or that never answers one, would hold its connection (and a
#: server's slot of max_connections) that long after it was closed; the agent's
#: control-plane client would notice a frozen control plane after 50 s, not two pings.
TLS_SHUTDOWN_TIMEOUT = 1.0


def load_cert_chain(context: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    if hasattr(os, "memfd_create"):
        fds = [os.memfd_create(name, os.MFD_CLOEXEC) for name in ("outrider-chain", "outrider-key")]
        try:
            for fd, data in zip(fds, (chain_pem, key_pem), strict=True):
                os.write(fd, data)
            context.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}")
        finally:
            for fd in fds:
                os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="outrider-tls-") as tmp:
        chain_file, key_file = Path(tmp) / "chain.pem", Path(tmp) / "key.pem"
        chain_file.write_bytes(chain_pem)
        key_file.touch(mode=0o600)
        key_file.write_bytes(key_pem)
        context.load_cert_chain(chain_file, key_file)
