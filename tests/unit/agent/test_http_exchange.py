"""The inbound HTTP exchange (agent/adapters/http.py) over fake transports: the client's
bytes in, what the app and the client are sent out; the app's answers fed by hand.

The shell is thin: pipelining, HEAD, early answers and the ordering of refusals
all show over fake transports, with no agent process to start.
"""

from __future__ import annotations

import asyncio
import json

from agent.adapters.http import HOLD_BYTES, PARSE_BYTES, REQUEST_COST, HttpExchange
from agent.core import http1
from agent.core.policy import Decision, PolicySet, Request
from agent.core.policyfile import parse_policies
from identity import SpiffeId
from tests.transports import Sent

#: The integration suite's policy (tests/integration/test_agent_http.py), minus the ALLOW.
POLICIES = PolicySet(
    parse_policies(
        """\
policies:
  - name: guard
    action: DENY
    rules:
      - name: admin
        to: {paths: ["/admin*"]}
      - name: internal-host
        to: {hosts: ["internal.example.org"]}
      - name: intruder
        when: [{header: x-role, values: [intruder]}]
""",
        "test",
    )
)
PEER = SpiffeId.parse("spiffe://example.org/ns/demo/sa/frontend")

GET = b"GET /api/items HTTP/1.1\r\nHost: backend\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
UPGRADE = (
    b"GET /chat HTTP/1.1\r\nHost: backend\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
SWITCHING = (
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)


def authorize(
    method: str, path: str, host: str | None, headers: dict[str, tuple[str, ...]]
) -> Decision:
    request = Request(PEER, 8080, method, path, host, headers)
    return POLICIES.decide(request, frozenset({PEER.trust_domain}))


class Exchange:
    def __init__(self) -> None:
        self.client, self.app = Sent(), Sent()
        self.statuses: list[int] = []
        self.refusals: list[str] = []
        self.broken: list[str] = []
        self.exchange = HttpExchange(
            self.client,  # type: ignore[arg-type]
            self.app,  # type: ignore[arg-type]
            authorize,
            b"By=a;URI=b",
            self.statuses.append,
            refused=self.refusals.append,
            broke=self.broken.append,
        )

    def send(self, raw: bytes) -> bytes:
        """The client sends `raw`; what the app was sent."""
        self.exchange.from_client(raw)
        return self.app.take()

    def answer(self, raw: bytes) -> bytes:
        """The app answers `raw`; what the client was sent."""
        self.exchange.from_app(raw)
        return self.client.take()


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


def test_keep_alive_pipelining_chunked_bodies_and_head() -> None:
    x = Exchange()
    chunked = (
        b"POST /api/items HTTP/1.1\r\nHost: backend\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n"
    )
    head = b"HEAD /api/items HTTP/1.1\r\nHost: backend\r\n\r\n"
    sent = x.send(GET + chunked + head + GET)
    assert sent.startswith(b"GET /api/items HTTP/1.1\r\n") and sent.count(b"HTTP/1.1") == 1
    assert x.answer(OK) == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    sent = x.app.take()
    assert sent.endswith(b"\r\n\r\n5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n")  # re-chunked
    assert x.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n")
    assert x.app.take().startswith(b"HEAD ")
    # A response to HEAD is whole at its head, whatever its length says.
    assert x.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n").endswith(b"\r\n\r\n")
    assert x.app.take().startswith(b"GET ")
    assert x.answer(OK).endswith(b"ok")
    assert x.statuses == [200] * 4 and not x.client.closed


def test_a_denied_request_after_allowed_ones_is_answered_in_order_then_closed() -> None:
    x = Exchange()
    sent = x.send(GET + b"GET /admin HTTP/1.1\r\nHost: backend\r\n\r\n" + GET)
    assert sent.count(b"GET ") == 1  # the second waits; the third is never read
    written = x.answer(OK)
    assert status_of(written) == 200
    assert b"HTTP/1.1 403 Forbidden" in written
    assert json.loads(written.rsplit(b"\r\n\r\n", 1)[1])["policy"] == "guard"
    assert x.client.closed and x.app.take() == b""


def test_an_early_answer_closes_the_connection_so_a_body_cannot_smuggle_a_request() -> None:
    x = Exchange()
    smuggled = b"GET /admin HTTP/1.1\r\nHost: backend\r\n\r\n"
    x.send(b"POST /api/early HTTP/1.1\r\nHost: backend\r\nContent-Length: 100\r\n\r\n")
    written = x.answer(OK)  # the app answers before it read the body
    assert b"connection: close" in written
    x.send(b"x" * 100 + smuggled)
    assert x.client.closed
    assert b"/admin" not in x.app.data


def test_the_host_a_rule_matches_is_read_as_the_app_reads_it() -> None:
    for host in (
        b"INTERNAL.example.org.",
        b"internal.example.org:8080",
        b"internal.example.org \t",
    ):
        x = Exchange()
        assert x.send(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n") == b""
        assert status_of(x.client.take()) == 403


def test_every_value_of_a_repeated_header_is_evaluated() -> None:
    for lines in (b"x-role: viewer\r\nx-role: intruder\r\n", b"X-Role: viewer, intruder\r\n"):
        x = Exchange()
        assert x.send(b"GET / HTTP/1.1\r\nHost: b\r\n" + lines + b"\r\n") == b""
        assert status_of(x.client.take()) == 403


def test_the_app_gets_the_agents_own_framing_and_connection_headers() -> None:
    x = Exchange()
    sent = x.send(
        b"GET /api/items HTTP/1.1\r\nHost: backend\r\nConnection: close, X-Hop\r\nX-Hop: 1\r\n"
        b"X-Forwarded-Client-Cert: forged\r\n\r\n"
    )
    assert sent == (
        b"GET /api/items HTTP/1.1\r\nHost: backend\r\n"
        b"x-forwarded-client-cert: By=a;URI=b\r\nconnection: close\r\n\r\n"
    )
    written = x.answer(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX_Forwarded-Client-Cert: leak\r\n\r\nok"
    )
    assert b"leak" not in written and b"connection: close" in written
    assert x.client.closed


def test_a_close_delimited_response_ends_the_clients_connection_with_the_apps() -> None:
    x = Exchange()
    x.send(GET)
    written = x.answer(b"HTTP/1.0 200 OK\r\n\r\nuntil the close")
    assert written == b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil the close"


def test_an_interim_response_is_passed_on_before_the_final_one() -> None:
    x = Exchange()
    x.send(
        b"POST /api/items HTTP/1.1\r\nHost: b\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
    )
    assert x.answer(b"HTTP/1.1 100 Continue\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert x.send(b"hi") == b"hi"
    assert status_of(x.answer(OK)) == 200 and x.statuses == [200]


def test_an_app_that_answers_what_nobody_asked_loses_both_connections() -> None:
    """What the app finished before it broke HTTP reaches the client, then both
    connections end (Envoy's way): a 204 with a body is still a 204."""
    for answered, status in ((OK + OK, 200), (b"HTTP/1.1 204 No Content\r\n\r\nbody", 204)):
        x = Exchange()
        x.send(GET)
        written = x.answer(answered)
        assert status_of(written) == status and written.count(b"HTTP/1.1") == 1
        assert x.client.closed and not x.client.aborted and x.app.aborted
        assert x.statuses == [status] and x.broken and "nobody asked" in x.broken[0]


def test_an_app_that_breaks_http_mid_response_loses_both_connections_at_once() -> None:
    """A head that breaks HTTP reaches the client not at all (closed: nothing of it was
    sent); a body that breaks after its head went out resets the client's connection,
    which says the response was cut."""
    x = Exchange()
    x.send(GET)
    assert x.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nBad Header: x\r\n\r\n") == b""
    assert x.client.closed and x.app.aborted and x.statuses == [] and x.broken
    x = Exchange()
    x.send(GET)
    x.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nhalf\r\n")
    x.answer(b"zz\r\n")  # not a chunk size
    assert x.client.aborted and x.app.aborted and x.statuses == []


def test_an_interim_response_never_carries_the_identity_header_to_the_client() -> None:
    x = Exchange()
    x.send(
        b"POST /api/items HTTP/1.1\r\nHost: b\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
    )
    hints = b"HTTP/1.1 103 Early Hints\r\nX-Forwarded-Client-Cert: leak\r\nLink: </a>\r\n\r\n"
    written = x.answer(hints)
    assert status_of(written) == 103 and b"leak" not in written and b"Link" in written


def test_an_allowed_upgrade_becomes_a_byte_stream_after_the_apps_101() -> None:
    x = Exchange()
    sent = x.send(UPGRADE)
    assert b"Upgrade: websocket" in sent and b"connection: Upgrade" in sent
    assert x.client.paused  # nothing but the new protocol may follow, once agreed
    assert x.send(b"\x81\x85early") == b""  # held until the app answers
    written = x.answer(SWITCHING + b"\x81\x02hi")
    assert written.startswith(b"HTTP/1.1 101 ") and written.endswith(b"\r\n\r\n\x81\x02hi")
    assert x.app.take() == b"\x81\x85early"
    assert not x.client.paused and x.statuses == [101]
    # From here on: bytes, both ways, nothing parsed (this would be a 400 as HTTP).
    assert x.send(b"GET /admin\n\n") == b"GET /admin\n\n"
    assert x.answer(b"\x88\x00") == b"\x88\x00"


def test_an_upgrade_the_policy_denies_never_reaches_the_app() -> None:
    x = Exchange()
    assert x.send(UPGRADE.replace(b"/chat", b"/admin/chat")) == b""
    assert status_of(x.client.take()) == 403 and x.client.closed


async def test_an_upgrade_the_app_refuses_goes_on_as_http() -> None:
    x = Exchange()
    x.send(UPGRADE)
    assert x.send(GET) == b""  # held: it might have been the new protocol
    assert status_of(x.answer(b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n\r\n")) == 426
    await asyncio.sleep(0)  # what was held is parsed from the loop, as any read
    assert x.app.take().startswith(b"GET /api/items HTTP/1.1")
    assert status_of(x.answer(OK)) == 200 and not x.client.paused


def test_an_http2_preface_is_answered_with_a_goaway_and_counted() -> None:
    x = Exchange()
    assert x.send(http1.H2_PREFACE + GET) == b""
    assert x.client.take() == http1.h2_refusal()
    assert x.refusals == ["protocol_mismatch"] and x.client.closed


def test_a_drained_connection_answers_what_it_read_with_connection_close() -> None:
    x = Exchange()
    x.send(GET)
    x.exchange.finish()
    written = x.answer(OK)
    assert b"connection: close" in written and x.client.closed


def test_a_trailer_cannot_give_the_app_a_host_the_policy_never_saw() -> None:
    x = Exchange()
    sent = x.send(
        b"POST /api/items HTTP/1.1\r\nHost: backend\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\nHost: internal.example.org\r\n\r\n"
    )
    assert sent.count(b"Host:") == 1 and b"internal.example.org" not in sent


def test_reading_stays_paused_while_an_upgrade_waits_for_its_answer() -> None:
    """What follows an Upgrade is held in memory until the app answers: flow control
    resuming the client (the app's write buffer drained) must not let it grow unbounded."""
    x = Exchange()
    x.send(UPGRADE)
    assert x.client.paused
    x.client.resume_reading()  # Relay: the app's transport drained its write buffer
    assert x.send(b"\x81\x85early") == b""
    assert x.client.paused  # at most one read is held per resume
    x.answer(SWITCHING)
    assert x.app.take() == b"\x81\x85early" and not x.client.paused


#: The most requests an exchange may hold: HOLD_BYTES of them, then one PARSE_BYTES piece's.
MAX_HELD = HOLD_BYTES // REQUEST_COST + PARSE_BYTES // len(GET) + 1


async def test_a_read_of_pipelined_requests_is_parsed_no_further_than_what_may_be_held() -> None:
    """Thousands of tiny pipelined GETs in one read behind a request in flight: the exchange
    holds a bounded number (each counted with REQUEST_COST), reading paused, the rest left
    unparsed; every one still reaches the app, in order, as the app answers."""
    x = Exchange()
    count = 64 * 1024 // len(GET)
    pipelined = b"".join(b"GET /api/%d HTTP/1.1\r\nHost: backend\r\n\r\n" % n for n in range(count))
    assert x.send(pipelined).count(b"GET ") == 1  # the first is in flight
    assert len(x.exchange.queue) <= MAX_HELD and x.exchange.unread and x.client.paused
    arrived = [0]
    while len(arrived) < count:
        x.answer(OK)
        await asyncio.sleep(0)  # parsing on runs from the loop, never inside a parse
        for line in x.app.take().split(b"\r\n"):
            if line.startswith(b"GET "):
                arrived.append(int(line.split(b"/")[2].split(b" ")[0]))
        assert len(x.exchange.queue) <= MAX_HELD
    assert arrived == list(range(count))
    assert not x.exchange.unread and not x.client.paused


async def test_reading_resumed_from_elsewhere_past_the_bound_is_paused_again() -> None:
    """The app's buffer draining resumes the client's reading (agent/adapters/relay.py):
    a read that finds HOLD_BYTES held already is kept unparsed, and reading paused again,
    or every further read would pile up unparsed."""
    x = Exchange()
    count = 64 * 1024 // len(GET)
    x.send(GET * count)
    assert x.client.paused and x.exchange.unread
    for _ in range(3):
        x.client.resume_reading()  # the app drained its buffer meanwhile
        waiting = len(x.exchange.unread)
        x.send(GET * 100)
        assert x.client.paused and len(x.exchange.unread) == waiting + 100 * len(GET)
    assert len(x.exchange.queue) <= MAX_HELD


async def test_requests_held_behind_a_declined_upgrade_are_bounded_as_any_read() -> None:
    x = Exchange()
    assert b"Upgrade: websocket" in x.send(UPGRADE + GET * (64 * 1024 // len(GET)))
    x.answer(OK)  # no 101: HTTP goes on, from what was held since
    await asyncio.sleep(0)
    assert len(x.exchange.queue) <= MAX_HELD and x.exchange.unread and x.client.paused


def test_a_break_after_a_finished_response_went_out_closes_without_cutting_it() -> None:
    """The finished response was written in an earlier read (it may still sit in the
    client's write buffer): the break closes the client's connection, never resets it."""
    x = Exchange()
    x.send(GET + GET)
    assert status_of(x.answer(OK)) == 200
    x.answer(b"HTTP/1.1 200 OK\r\nContent-Length: zz\r\n\r\n")
    assert x.client.closed and not x.client.aborted and x.app.aborted


def test_nothing_is_read_behind_an_upgrade_while_the_requests_before_it_are_answered() -> None:
    """Whatever follows an Upgrade waits for its answer, held in memory: answering the
    requests ahead of it must not give the client another read each (55 MiB a connection)."""
    x = Exchange()
    x.send(GET + GET + UPGRADE + b"\x81\x05hello")
    assert x.client.paused
    for _ in range(2):
        assert status_of(x.answer(OK)) == 200
        assert x.client.paused
