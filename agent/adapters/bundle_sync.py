"""Keep the trust bundle in use current between renewals.

An SVID lives for an hour or more, and the bundle it came with used to be
the only one peers were verified against: a root the operator removed stayed
trusted until the next renewal. Here, as SPIRE agents do, the agent asks the
CA for its bundle every `ca.bundle_refresh` (5 s by default), and reads the
bundle file every second; SIGHUP and a change to the file ask the CA at
once. When the roots both list (`agent.core.trust`) differ from those in
use, the identity manager installs them with the same SVID: new connections
verify against them from then on. A renewed SVID, whose answer carries the
CA's bundle alone, goes into service with the roots both list too
(`peer_roots`): a root the file dropped is not trusted again, even briefly.

The channel to the CA presents no client certificate: GetBundle needs none,
and an SVID that chains to a root the CA has just dropped would fail the
handshake, locking out the agents that most need the new bundle. The CA's
certificate is verified against the bundle file and the CA's last bundle.
It is open only while asking: the CA caps its connections (`limits:` in
ca.yaml) against floods, and one held by every agent between asks would
fill that cap with as many agents and keep later callers (a new pod's first
Sign) out.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import ssl
from typing import TYPE_CHECKING

from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError

from agent.adapters.rotator import IdentityManager
from agent.adapters.tls import unreachable
from agent.config import CaEndpoint
from agent.core.svid import Svid
from agent.core.trust import peer_bundle
from identity import BundleError, TrustBundle, TrustDomain

if TYPE_CHECKING:
    from agent.adapters.ca_client import CaClient

log = logging.getLogger("outrider.agent.bundle")

#: How often the bundle file is read (a ConfigMap update swaps a symlink).
FILE_POLL = 1.0

#: What the agent does while the bundle file cannot be used.
_KEEPING = "peers are verified against the roots in use until it is fixed"

_CA_TROUBLE = (GRPCError, OSError, TimeoutError, StreamTerminatedError, ProtocolError, BundleError)


class BundleSync:
    def __init__(self, identity: IdentityManager) -> None:
        self.identity = identity
        identity.peer_roots = self.peer_roots
        self._wake = asyncio.Event()
        self._seen: Svid | None = None  # the SVID in use when last looked at
        self._from_ca: TrustBundle | None = None  # the CA's newest word
        self._file: tuple[bytes, TrustBundle | None] = (b"", None)  # its bytes, parsed
        self._problems: dict[str, str] = {}  # what is wrong now, by source: logged once

    def wake(self) -> None:
        """Ask the CA and read the file now (SIGHUP)."""
        self._wake.set()

    async def run(self) -> None:
        await self.identity.has_svid.wait()
        # Apart, so a CA that hangs for ca.timeout does not hold up the file.
        await asyncio.gather(self._follow_file(), self._follow_ca())

    async def _follow_file(self) -> None:
        while True:
            if self._read_file(self.identity.config.ca):
                self._wake.set()  # the operator changed the roots: ask the CA too
            self._apply()
            await asyncio.sleep(FILE_POLL)

    async def _follow_ca(self) -> None:
        while True:
            self._wake.clear()
            ca = self.identity.config.ca
            await self._ask_ca(ca)
            self._apply()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), ca.bundle_refresh.total_seconds())

    def _apply(self) -> None:
        """Install the roots both sources list, if they are not the ones in use."""
        svid = self.identity.svid
        if svid is None:
            return
        if svid is not self._seen:  # a renewal: its bundle is the CA's, as of now
            self._seen, self._from_ca = svid, self.identity.ca_bundle
        from_file = self._file[1]
        if from_file is None or self._from_ca is None:
            return  # the file cannot be used: keep what is in use
        try:
            wanted = peer_bundle(self._from_ca, from_file)
        except BundleError as exc:
            self._problem(
                "bundles",
                f"keeping the trust bundle in use: {exc}: the CA's bundle holds"
                f" {_roots(self._from_ca)}, the bundle file {self.identity.config.ca.bundle_file}"
                f" {_roots(from_file)}",
            )
            return
        self._problem("bundles", None)
        if wanted == svid.bundle:
            return
        try:
            self.identity.install_bundle(wanted)
        except ssl.SSLError as exc:
            self._problem("install", f"ssl cannot use the new trust bundle: {exc}")
            return
        self._seen = self.identity.svid
        log.info(
            "trust bundle changed: %d root(s), was %d; new connections verify against it",
            len(wanted.roots),
            len(svid.bundle.roots),
        )

    def peer_roots(self, from_ca: TrustBundle) -> TrustBundle:
        """The roots a renewed SVID goes into service with: those both list, as `_apply`
        would choose a second later. If the file cannot be used, those of the roots in
        use the CA still lists (`_apply` keeps them too): a root the file removed before
        it broke must not come back with the CA's answer. BundleError if that leaves none
        (before the first SVID, the file must be a trust bundle: IdentityManager checks it
        before asking): the CA's answer never brings a root of its own."""
        ca = self.identity.config.ca
        self._read_file(ca)
        svid, from_file = self.identity.svid, self._file[1]
        if from_file is not None:
            narrowing, source = from_file, f"the bundle file {ca.bundle_file}"
        elif svid is not None:
            narrowing, source = svid.bundle, "the trust bundle in use"
        else:
            why = self._problems.get("file", f"{ca.bundle_file} cannot be used")
            raise BundleError(f"no trust bundle to check it against: {why}")
        try:
            return peer_bundle(from_ca, narrowing)
        except BundleError as exc:
            raise BundleError(
                f"{exc}: the CA's bundle holds {_roots(from_ca)}, {source} {_roots(narrowing)}"
            ) from None

    def _read_file(self, ca: CaEndpoint) -> bool:
        """Read the bundle file; True if its content changed."""
        try:
            data = ca.bundle_file.read_bytes()
        except OSError as exc:
            # Unusable until read again: the same bytes back are then a change (and a fix).
            self._file = (b"", None)
            self._problem("file", f"cannot read {ca.bundle_file} ({exc}); {_KEEPING}")
            return False
        if data == self._file[0]:
            return False
        parsed = None
        try:
            parsed = TrustBundle.from_pem(self._trust_domain, data)
            self._problem("file", None)
        except BundleError as exc:
            self._problem("file", f"{ca.bundle_file} is not a trust bundle ({exc}); {_KEEPING}")
        self._file = (data, parsed)
        return True

    async def _ask_ca(self, ca: CaEndpoint) -> None:
        try:
            async with self._client(ca) as client:
                ders = await client.get_bundle(deadline=ca.timeout.total_seconds())
            bundle = TrustBundle.from_der(self._trust_domain, ders)
        except _CA_TROUBLE as exc:
            why = unreachable(exc, ca.server_name, ca.bundle_file)
            self._problem("ca", f"cannot get the CA's trust bundle ({why}); asking again")
            return
        self._problem("ca", None)
        self._from_ca = bundle

    def _client(self, ca: CaEndpoint) -> CaClient:
        """A channel to the CA, verified by every bundle known (closed after one ask)."""
        from agent.adapters.ca_client import CaClient, tls_context  # with the first CA call

        svid = self.identity.svid
        trusted = [self._file[1], self._from_ca, svid.bundle if svid else None]
        pem = b"".join(dict.fromkeys(b.to_pem() for b in trusted if b is not None))
        return CaClient(ca.host, ca.port, tls_context(pem), ca.server_name)

    @property
    def _trust_domain(self) -> TrustDomain:
        return self.identity.config.identity.spiffe_id.trust_domain

    def _problem(self, source: str, problem: str | None) -> None:
        """Log a problem when it starts and when it ends, not every second."""
        before = self._problems.pop(source, None)
        if problem is not None:
            self._problems[source] = problem
            if problem != before:
                log.warning("%s", problem)
        elif before is not None:
            log.info("trust bundle from %s: fine again", source)


def _roots(bundle: TrustBundle) -> str:
    """The roots of `bundle` as a log line names them, for an operator to compare: subject
    and SHA-256 fingerprint (`openssl x509 -noout -fingerprint -sha256`), whose start tells
    apart two roots of one name."""
    return "; ".join(
        f"'{root.subject}' (SHA-256 {hashlib.sha256(root.der).hexdigest()[:16].upper()}...)"
        for root in bundle.roots
    )
