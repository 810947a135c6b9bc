"""The memory handshakes of bench/handshake_micro.py through pyOpenSSL: the OpenSSL that
cryptography bundles (4.x) instead of the system's (stdlib ssl, 3.0 here).

Only for measuring what a switch would save: pyOpenSSL is not a dependency of the agent
(`pip install pyOpenSSL`, with `--no-deps` so cryptography stays as pinned, or into a
separate `--target` on PYTHONPATH). The contexts are the agent's (agent/adapters/tls.py)
as far as pyOpenSSL can say them: TLS 1.2 at least, the same TLS 1.2 ciphers, no
renegotiation or compression, peer certificate required and verified against the bundle's
roots with X509_STRICT, the same chains and keys; and after each handshake the same
SPIFFE check (`peer_id`, fed the peer's DER), not counted (nor is it in the stdlib
figures: the loopback part counts it).

What pyOpenSSL cannot say, and how it leans: it has no `SSL_CTX_set_num_tickets`, so the
server sends OpenSSL's default two TLS 1.3 tickets per handshake (stateful ones with
resumption off: SSL_OP_NO_TICKET, no session cache), where the agent sends one or none:
its figures are if anything too high. The key exchange group is the agent's X25519, or
OpenSSL 4's default (X25519MLKEM768 first: post-quantum hybrid, ~25% more CPU a handshake).

What a pyOpenSSL data plane would take (not built; for the round that decides):

- uvloop's TLS (`ssl=` on create_connection / connect_accepted_socket) takes only an
  ssl.SSLContext, so the agent would dial and accept plain TCP and run TLS itself: a
  protocol of its own between the TCP transport and the relay / HTTP / h2 protocols,
  owning an `SSL.Connection(ctx, None)` (memory BIOs): data_received -> bio_write ->
  do_handshake or recv until WantRead -> bio_read -> transport.write; an
  asyncio.Transport to the protocol above (write, writelines, pause/resume_reading,
  write-buffer limits and pause/resume_writing passed through, close with close_notify,
  abort, get_extra_info), the handshake timeout, and the byte accounting.
- What the agent reads of a handshake today through `ssl_object` (version, cipher,
  session_reused, selected_alpn_protocol, getpeercert(binary_form=True)) through an
  adapter: pyOpenSSL has get_protocol_version_name, get_cipher_name,
  get_alpn_proto_negotiated and get_peer_certificate, but no session_reused (only the
  private binding `OpenSSL._util.lib`, as here), no SSL_CTX_set_num_tickets and no
  TLS 1.3 ciphersuite setter; refusal_reason's labels from pyOpenSSL's error tuples and
  the verify result instead of ssl.SSLError / SSLCertVerificationError.
- Sessions: `get_session` is a reference, not a DER copy (3 us against ~150, and the
  offer is free where CPython copies again on every offer); but a connection freed
  without a shutdown marks its session not resumable (OpenSSL's ssl_clear_bad_session:
  CPython never shows it, as it copies), so every close, abort included, must call
  set_shutdown; and OpenSSL's own client session cache must stay off (with it, a
  resumed connection's new ticket marks the offered session not resumable), the agent's
  SessionCache doing that job as now. The server's session cache can be turned off too
  (SESS_CACHE_OFF), which closes the TLS 1.2 resume-by-ID gap docs/agent.md documents.
- Dependencies: pyOpenSSL 26.4 pins cryptography < 51 (installed: 51.0.1; it runs with
  --no-deps); PyCA keeps pyOpenSSL for compatibility and no longer recommends it for
  new code; its private bindings shrink between releases.
- The record layer: a 100-byte record encrypted and decrypted in memory costs ~2.0 us
  through the stdlib SSLObject, ~5.3 through pyOpenSSL's send/recv (its Python
  wrappers), and ~2.0 through the same calls on the cffi binding directly (`records`,
  `--pyopenssl` prints it): the keep-alive path, where the agent is at 1.00x Envoy
  (~25 us a request), must use the binding, not the wrappers.
"""

from __future__ import annotations

import asyncio
import socket
import time
from datetime import UTC, datetime
from typing import Any

from OpenSSL import SSL, crypto
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib  # pyOpenSSL has no session_reused()

from agent.adapters.tls import _TLS12_CIPHERS, peer_id
from agent.core.svid import Svid


def context(svid: Svid, server: bool, resumed: bool, groups: bytes | None = None) -> SSL.Context:
    """The agent's context for `svid` in pyOpenSSL's words; `groups`: the key exchange
    groups (OpenSSL's list syntax), None for OpenSSL's default (4.x: X25519MLKEM768 first,
    post-quantum hybrid, where the stdlib agent does X25519)."""
    ctx = SSL.Context(SSL.TLS_METHOD)
    if groups is not None:
        assert _lib.SSL_CTX_set1_curves_list(ctx._context, groups) == 1, groups
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_cipher_list(_TLS12_CIPHERS.encode())
    options = SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_COMPRESSION
    if not resumed:
        options |= SSL.OP_NO_TICKET
    ctx.set_options(options)
    # No OpenSSL cache either side: the agent keeps its own (a client-side OpenSSL cache
    # marks a TLS 1.3 session not resumable once a resumed connection replaces it).
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    if server:
        ctx.set_session_id(b"outrider-bench")
    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, None)
    store = ctx.get_cert_store()
    assert store is not None
    for root in svid.bundle.roots:
        store.add_cert(crypto.load_certificate(crypto.FILETYPE_ASN1, root.der))
    store.set_flags(crypto.X509StoreFlags.X509_STRICT)
    ctx.use_certificate(crypto.load_certificate(crypto.FILETYPE_ASN1, svid.leaf.der))
    for cert in svid.chain[1:]:
        ctx.add_extra_chain_cert(crypto.load_certificate(crypto.FILETYPE_ASN1, cert.der))
    ctx.use_privatekey(crypto.load_privatekey(crypto.FILETYPE_ASN1, svid.key.der))
    ctx.check_privatekey()
    return ctx


def _pump(client: SSL.Connection, server: SSL.Connection, spent: list[int]) -> None:
    done = [False, False]
    tick = time.thread_time_ns
    sides = ((0, client, server), (1, server, client))
    for _ in range(10):
        for i, side, other in sides:
            if not done[i]:
                started = tick()
                try:
                    side.do_handshake()
                    done[i] = True
                    if i == 1:
                        side.send(b"x")
                except SSL.WantReadError:
                    pass
                spent[i] += tick() - started
            started = tick()
            try:
                data = side.bio_read(65536)
            except SSL.WantReadError:
                data = b""
            spent[i] += tick() - started
            if data:
                other.bio_write(data)
        if done[0] and done[1]:
            break
    else:
        raise AssertionError("handshake did not finish")
    started = tick()
    try:
        assert client.recv(1) == b"x"
    except SSL.WantReadError:
        raise AssertionError("no byte from the server") from None
    spent[0] += tick() - started


def _check(conn: SSL.Connection, usage: Any) -> None:
    """The agent's SPIFFE check on the peer's leaf (its DER, as peer_id reads it)."""
    cert = conn.get_peer_certificate()
    assert cert is not None
    der = crypto.dump_certificate(crypto.FILETYPE_ASN1, cert)
    peer_id(_Der(der), usage, datetime.now(UTC), _td(conn))


class _Der:
    def __init__(self, der: bytes) -> None:
        self.der = der

    def getpeercert(self, binary_form: bool = False) -> bytes:
        return self.der


_TRUST: dict[int, Any] = {}


def _td(conn: SSL.Connection) -> Any:
    return _TRUST[id(conn.get_context())]


def memory(
    server_svid: Svid,
    client_svid: Svid,
    handshakes: int,
    resumed: bool,
    groups: bytes | None = None,
) -> tuple[float, float, float]:
    """Microseconds of CPU per handshake: the client's, the server's, the client's session
    read (`get_session`: a reference, no copy)."""
    server_ctx = context(server_svid, True, resumed, groups)
    client_ctx = context(client_svid, False, resumed, groups)
    _TRUST[id(server_ctx)] = server_svid.spiffe_id.trust_domain
    _TRUST[id(client_ctx)] = client_svid.spiffe_id.trust_domain
    session = None
    spent = [0, 0]
    reads = 0
    tick = time.thread_time_ns
    for _ in range(handshakes + 1):
        these = [0, 0]
        started = tick()
        c = SSL.Connection(client_ctx, None)
        c.set_connect_state()
        if session is not None:
            c.set_session(session)
        these[0] += tick() - started
        started = tick()
        s = SSL.Connection(server_ctx, None)
        s.set_accept_state()
        these[1] += tick() - started
        _pump(c, s, these)
        _check(s, "client")  # not counted: nor is it in the stdlib figures
        _check(c, "server")
        # Freed without a shutdown, a connection marks its session not resumable (OpenSSL's
        # ssl_clear_bad_session; CPython gives out copies, so it never shows there): a
        # pyOpenSSL data plane must mark every closed connection shut down, as here.
        started = tick()
        c.set_shutdown(SSL.SENT_SHUTDOWN | SSL.RECEIVED_SHUTDOWN)
        these[0] += tick() - started
        if resumed and session is None:
            session = c.get_session()
            continue
        if resumed:
            assert _lib.SSL_session_reused(c._ssl), "the saved session was taken"
            if groups is not None:
                group = _ffi.string(_lib.SSL_get0_group_name(c._ssl)).decode()
                assert group.lower() == groups.decode().lower(), group
            started = tick()  # a reference (SSL_get1_session), not a copy
            assert c.get_session() is not None
            reads += tick() - started
        spent[0] += these[0]
        spent[1] += these[1]
    return spent[0] / handshakes / 1e3, spent[1] / handshakes / 1e3, reads / handshakes / 1e3


class TlsOverTransport(asyncio.Protocol):
    """The least of a pyOpenSSL TLS layer over a plain uvloop TCP transport: the
    handshake, then the first application bytes (what a data plane of its own would
    build on; see the module's docstring). `done` resolves with the first bytes read."""

    def __init__(self, conn: SSL.Connection, first: bytes | None = None) -> None:
        self.conn = conn
        self.first = first  # written once the handshake is done (the server's answer)
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.handshaken = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport
        self._step()

    def data_received(self, data: bytes) -> None:
        self.conn.bio_write(data)
        self._step()

    def _step(self) -> None:
        conn = self.conn
        try:
            if not self.handshaken:
                conn.do_handshake()
                self.handshaken = True
                if self.first is not None:
                    conn.send(self.first)
            if not self.done.done() and self.first is None:
                self.done.set_result(conn.recv(65536))
        except SSL.WantReadError:
            pass
        except SSL.Error as exc:
            if not self.done.done():
                self.done.set_exception(exc)
        self._flush()
        if self.first is not None and self.handshaken and not self.done.done():
            self.done.set_result(b"")

    def _flush(self) -> None:
        assert self.transport is not None
        while True:
            try:
                out = self.conn.bio_read(65536)
            except SSL.WantReadError:
                return
            if not out:
                return
            self.transport.write(out)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(exc or ConnectionError("closed"))

    def close(self) -> None:
        """As a data plane must on every close: else OpenSSL marks the session not
        resumable."""
        self.conn.set_shutdown(SSL.SENT_SHUTDOWN | SSL.RECEIVED_SHUTDOWN)
        assert self.transport is not None
        self.transport.abort()


async def loopback(
    server_svid: Svid, client_svid: Svid, resumed: bool, count: int, groups: bytes | None
) -> float:
    """Process time per connection, both sides (µs): TCP from uvloop, TLS from pyOpenSSL
    (`TlsOverTransport`), the same peer check as the agent's (`peer_id`), the client's
    session offered again as the agent's SessionCache would."""
    loop = asyncio.get_running_loop()
    server_ctx = context(server_svid, True, resumed, groups)
    client_ctx = context(client_svid, False, resumed, groups)
    _TRUST[id(server_ctx)] = server_svid.spiffe_id.trust_domain
    _TRUST[id(client_ctx)] = client_svid.spiffe_id.trust_domain
    listening = socket.create_server(("127.0.0.1", 0), backlog=1024)
    listening.setblocking(False)
    port = listening.getsockname()[1]
    session: SSL.Session | None = None

    async def serve() -> TlsOverTransport:
        sock, _ = await loop.sock_accept(listening)
        conn = SSL.Connection(server_ctx, None)
        conn.set_accept_state()
        _, tls = await loop.connect_accepted_socket(lambda: TlsOverTransport(conn, b"x"), sock)
        await tls.done
        _check(conn, "client")
        return tls

    async def one() -> None:
        nonlocal session
        serving = loop.create_task(serve())
        conn = SSL.Connection(client_ctx, None)
        conn.set_connect_state()
        if session is not None:
            conn.set_session(session)
        _, tls = await loop.create_connection(lambda: TlsOverTransport(conn), "127.0.0.1", port)
        assert await tls.done == b"x"
        _check(conn, "server")
        if resumed and session is None:
            session = conn.get_session()
        elif resumed:
            assert _lib.SSL_session_reused(conn._ssl), "the saved session was taken"
        server = await serving
        tls.close()
        server.close()
        await asyncio.sleep(0)

    await one()
    started = time.process_time()
    for _ in range(count):
        await one()
    took = time.process_time() - started
    listening.close()
    return took / count * 1e6


def records(server_svid: Svid, client_svid: Svid, count: int) -> tuple[float, float]:
    """Microseconds of CPU per 100-byte record, encrypted and decrypted, in memory after a
    handshake: through pyOpenSSL's Connection (send, bio_read, bio_write, recv), and
    through the same OpenSSL calls on its cffi binding directly (what a data plane's
    TLS layer would use on its hot path)."""
    client = SSL.Connection(context(client_svid, False, False, b"X25519"), None)
    client.set_connect_state()
    server = SSL.Connection(context(server_svid, True, False, b"X25519"), None)
    server.set_accept_state()
    _pump(client, server, [0, 0])
    message = b"x" * 100
    tick = time.thread_time_ns
    started = tick()
    for _ in range(count):
        client.send(message)
        server.bio_write(client.bio_read(65536))
        server.recv(65536)
    wrapped = (tick() - started) / count / 1e3
    out, into = _ffi.new("char[]", 65536), _ffi.new("char[]", 65536)
    c_ssl, s_ssl = client._ssl, server._ssl
    from_client, into_server = client._from_ssl, server._into_ssl
    started = tick()
    for _ in range(count):
        _lib.SSL_write(c_ssl, message, len(message))
        n = _lib.BIO_read(from_client, out, 65536)
        _lib.BIO_write(into_server, out, n)
        got = _lib.SSL_read(s_ssl, into, 65536)
        bytes(_ffi.buffer(into, got))
    direct = (tick() - started) / count / 1e3
    return wrapped, direct
