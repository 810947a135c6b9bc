"""TLS 1.3 resumption, in memory with real OpenSSL: a resumed handshake carries the peer's
certificate for the agent's checks; new contexts (a rotation, a bundle change, the ticket
keys' lifetime) take no ticket from before; and the client's cache of sessions."""

from __future__ import annotations

import dataclasses
import gc
import ssl
from datetime import timedelta
from pathlib import Path

import pytest

from agent.adapters.tls import Contexts, ResumingContext, dialling, kept
from agent.core.resumption import Resumption, SessionCache
from agent.core.svid import Svid
from ca.signers.local import LocalSigner
from identity import SpiffeId, TrustBundle
from tests.unit.agent.pki import TD, bundle_der, der, in_memory, make_signer, svid_now

SERVER = SpiffeId.for_workload(TD, "shop", "backend")
CLIENT = SpiffeId.for_workload(TD, "shop", "web")
RESUMING = Resumption(resumption=True, ticket_lifetime=timedelta(minutes=5))
ENDPOINT = ("127.0.0.1", 15443)


@pytest.fixture(scope="module")
def live_signer(tmp_path_factory: pytest.TempPathFactory) -> LocalSigner:
    return make_signer(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def server_svid(live_signer: LocalSigner) -> Svid:
    return svid_now(live_signer, SERVER)


@pytest.fixture(scope="module")
def client_svid(live_signer: LocalSigner) -> Svid:
    return svid_now(live_signer, CLIENT)


def test_a_second_handshake_resumes_and_carries_the_peers_certificate(
    server_svid: Svid, client_svid: Svid
) -> None:
    """What the agent checks on every connection (SPIFFE ID, validity, allow-list) reads
    the peer's leaf: a resumed handshake has it from the session, on both sides."""
    server, client = Contexts.of(server_svid, RESUMING), Contexts.of(client_svid, RESUMING)
    assert client.client is not None and server.server is not None
    first, _ = in_memory(client.client, server.server)
    assert not first.session_reused and first.version() == "TLSv1.3"
    session = first.session
    assert session is not None and session.has_ticket
    c, s = in_memory(client.client, server.server, session)
    assert c.session_reused and s.session_reused
    assert s.getpeercert(binary_form=True) == der(client_svid.leaf)
    assert c.getpeercert(binary_form=True) == der(server_svid.leaf)


def test_new_server_contexts_take_no_ticket_from_before(
    server_svid: Svid, client_svid: Svid
) -> None:
    """A rotation or bundle change builds new contexts: the old ticket does not open."""
    server, client = Contexts.of(server_svid, RESUMING), Contexts.of(client_svid, RESUMING)
    assert client.client is not None and server.server is not None
    session = in_memory(client.client, server.server)[0].session
    rotated = Contexts.of(server_svid, RESUMING).server
    assert rotated is not None
    c, s = in_memory(client.client, rotated, session)
    assert not c.session_reused and not s.session_reused


def test_after_a_bundle_change_a_peer_the_new_roots_do_not_vouch_for_is_refused(
    server_svid: Svid, client_svid: Svid, tmp_path: Path
) -> None:
    """The ticket would have skipped the chain check; it is not taken, and the full
    handshake fails against the new roots."""
    server, client = Contexts.of(server_svid, RESUMING), Contexts.of(client_svid, RESUMING)
    assert client.client is not None and server.server is not None
    session = in_memory(client.client, server.server)[0].session
    other = make_signer(tmp_path / "other-ca")
    roots = TrustBundle.from_der(TD, bundle_der(other))
    changed = Contexts.of(dataclasses.replace(server_svid, bundle=roots), RESUMING).server
    assert changed is not None
    with pytest.raises(ssl.SSLError):
        in_memory(client.client, changed, session)


def test_the_ticket_keys_are_renewed_every_ticket_lifetime(
    server_svid: Svid, client_svid: Svid
) -> None:
    now = [1000.0]
    server = Contexts()
    server.clock = lambda: now[0]
    server.use(Contexts.of(server_svid, RESUMING))
    server.tickets_until = now[0] + 300  # as `of` sets it, on the fake clock
    client = Contexts.of(client_svid, RESUMING).client
    assert client is not None
    issuing = server.server_for("tcp")
    assert issuing is not None
    session = in_memory(client, issuing)[0].session
    now[0] += 299
    assert server.server_for("tcp") is issuing
    assert in_memory(client, issuing, session)[0].session_reused
    now[0] += 1
    renewed = server.server_for("tcp")
    assert renewed is not None and renewed is not issuing
    assert server.server_for("http2") is server.h2_server
    assert not in_memory(client, renewed, session)[0].session_reused


def test_off_no_tickets_and_no_sessions_kept(server_svid: Svid) -> None:
    contexts = Contexts.of(server_svid, Resumption(resumption=False))
    assert contexts.server is not None and contexts.server.num_tickets == 0
    assert contexts.server.options & ssl.OP_NO_TICKET
    assert not isinstance(contexts.client, ResumingContext)
    assert contexts.tickets_until is None
    on = Contexts.of(server_svid, RESUMING)
    assert on.server is not None and on.server.num_tickets == 1
    assert isinstance(on.client, ResumingContext) and isinstance(on.h2_client, ResumingContext)


def test_a_session_is_kept_only_once_its_server_passed_the_checks(
    server_svid: Svid, client_svid: Svid
) -> None:
    server, client = Contexts.of(server_svid, RESUMING), Contexts.of(client_svid, RESUMING)
    assert isinstance(client.client, ResumingContext) and server.server is not None
    sessions = client.client.sessions
    with dialling(client.client, ENDPOINT, {SERVER}):
        unchecked, _ = in_memory(client.client, server.server)
    del unchecked
    gc.collect()
    assert len(sessions) == 0
    with dialling(client.client, ENDPOINT, {SERVER}):
        checked, _ = in_memory(client.client, server.server)
    kept(checked, SERVER)
    del checked
    gc.collect()
    assert len(sessions) == 1
    with dialling(client.client, ENDPOINT, {SERVER}):
        resumed, _ = in_memory(client.client, server.server)
    assert resumed.session_reused
    with dialling(client.client, ENDPOINT, {workload_elsewhere()}):  # server_ids changed
        again, _ = in_memory(client.client, server.server)
    assert not again.session_reused


def test_a_session_is_offered_inside_its_dial_only(server_svid: Svid, client_svid: Svid) -> None:
    """A connection made after a dial (one that failed included) offers nothing and saves
    nothing: the endpoint and its server IDs are the dial's."""
    server, client = Contexts.of(server_svid, RESUMING), Contexts.of(client_svid, RESUMING)
    assert isinstance(client.client, ResumingContext) and server.server is not None
    with dialling(client.client, ENDPOINT, {SERVER}):
        first, _ = in_memory(client.client, server.server)
    kept(first, SERVER)
    del first
    gc.collect()
    assert len(client.client.sessions) == 1
    with pytest.raises(OSError), dialling(client.client, ENDPOINT, {SERVER}):
        raise OSError("connection refused")  # a dial that failed
    outside, _ = in_memory(client.client, server.server)
    assert not outside.session_reused
    kept(outside, SERVER)
    assert getattr(outside, "cache", None) is None  # nowhere to save its session
    with dialling(server.server, ENDPOINT, {SERVER}):  # not a resuming context: a no-op
        pass
    with dialling(client.client, ENDPOINT, {SERVER}):
        resumed, _ = in_memory(client.client, server.server)
    assert resumed.session_reused


def workload_elsewhere() -> SpiffeId:
    return SpiffeId.for_workload(TD, "shop", "elsewhere")


# --- the cache: which session a dial may offer -------------------------------------


def test_a_session_is_offered_within_its_lifetime_only() -> None:
    cache: SessionCache[str] = SessionCache(timedelta(minutes=5))
    cache.save(ENDPOINT, SERVER, "ticket", issued_at=1000.0)
    assert cache.offer(ENDPOINT, {SERVER}, now=1299.0) == "ticket"
    assert cache.offer(ENDPOINT, {SERVER}, now=1300.0) is None
    assert len(cache) == 0  # forgotten
    cache.save(ENDPOINT, SERVER, "ticket", issued_at=1000.0)
    assert cache.offer(ENDPOINT, {SERVER}, now=999.0) is None  # the clock went back


def test_a_session_is_offered_to_its_endpoint_and_a_server_still_expected() -> None:
    cache: SessionCache[str] = SessionCache(timedelta(minutes=5))
    cache.save(ENDPOINT, SERVER, "ticket", issued_at=1000.0)
    assert cache.offer(("127.0.0.1", 1), {SERVER}, now=1001.0) is None
    assert cache.offer(ENDPOINT, {CLIENT}, now=1001.0) is None
    assert cache.offer(ENDPOINT, {SERVER}, now=1001.0) is None  # dropped with the old ID


def test_the_newest_ticket_wins_and_the_cache_is_bounded() -> None:
    cache: SessionCache[str] = SessionCache(timedelta(minutes=5), max_sessions=2)
    cache.save(ENDPOINT, SERVER, "newer", issued_at=1010.0)
    cache.save(ENDPOINT, SERVER, "older", issued_at=1000.0)  # a long connection's, closed late
    assert cache.offer(ENDPOINT, {SERVER}, now=1011.0) == "newer"
    for port in range(3):
        cache.save(("10.0.0.1", port), SERVER, f"s{port}", issued_at=1011.0)
    assert len(cache) == 2
    assert cache.offer(("10.0.0.1", 0), {SERVER}, now=1012.0) is None  # the oldest went


def test_a_resumed_connection_gives_its_session_only_once_the_saved_one_is_half_aged() -> None:
    cache: SessionCache[str] = SessionCache(timedelta(minutes=5))
    assert cache.wants(ENDPOINT, now=1000.0)
    cache.save(ENDPOINT, SERVER, "ticket", issued_at=1000.0)
    assert not cache.wants(ENDPOINT, now=1149.0)
    assert cache.wants(ENDPOINT, now=1150.0)
    assert cache.wants(ENDPOINT, now=999.0)  # the clock went back
