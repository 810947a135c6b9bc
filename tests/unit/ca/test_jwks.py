"""JWKS sources: a file that reloads, and an HTTPS endpoint over real loopback TLS."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web

from ca.authn.errors import AuthnError
from ca.authn.fake_issuer import FakeTokenIssuer
from ca.authn.jwks import FileJwks, HttpsJwks, key_set_from_document, plan_fetch
from ca.authn.kubernetes import TokenPolicy, TokenVerifier
from tests.support import LoopbackTls, loopback_tls

NOW = datetime.fromtimestamp(1_700_000_000, UTC)
INTERVAL = timedelta(minutes=5)
GAP = timedelta(seconds=10)


class FakeClock:
    def __init__(self, now: datetime = NOW) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, by: timedelta) -> None:
        self.now += by


def kids(keys: jwt.PyJWKSet) -> set[str | None]:
    return {key.key_id for key in keys}


async def unavailable(source: FileJwks | HttpsJwks, *, refresh: bool = False) -> AuthnError:
    with pytest.raises(AuthnError) as caught:
        await source.key_set(refresh=refresh)
    assert caught.value.reason == "jwks_unavailable"
    return caught.value


# --- parsing -------------------------------------------------------------------


def test_only_public_signing_keys_are_kept() -> None:
    good = FakeTokenIssuer(kid="good").jwks()["keys"][0]
    document = {
        "keys": [
            good,
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
            {**good, "kid": "enc", "use": "enc"},
            {**good, "kid": "private", "d": "AAAA"},
            "not a key",
        ]
    }
    assert kids(key_set_from_document(document)) == {"good"}


@pytest.mark.parametrize(
    "document",
    [{}, {"keys": []}, {"keys": {}}, [], {"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}],
)
def test_a_key_set_without_usable_keys_is_unavailable(document: Any) -> None:
    with pytest.raises(AuthnError) as caught:
        key_set_from_document(document)
    assert caught.value.reason == "jwks_unavailable"


# --- FileJwks ------------------------------------------------------------------


def write_atomically(path: Path, text: str) -> None:
    """As kubelet does for ConfigMaps: never a half-written file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def test_file_jwks_reloads_when_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    write_atomically(path, json.dumps(FakeTokenIssuer(kid="one").jwks()))
    source = FileJwks(path)
    first = await source.key_set()
    assert kids(first) == {"one"}
    assert await source.key_set() is first  # unchanged file: not re-parsed
    write_atomically(path, json.dumps(FakeTokenIssuer(kid="two").jwks()))
    assert kids(await source.key_set()) == {"two"}


async def test_file_jwks_fails_closed_and_recovers(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    source = FileJwks(path)
    await unavailable(source)  # missing
    write_atomically(path, json.dumps(FakeTokenIssuer(kid="one").jwks()))
    assert kids(await source.key_set()) == {"one"}
    write_atomically(path, "{not json")
    await unavailable(source)
    await unavailable(source)  # still broken, still refused
    write_atomically(path, json.dumps(FakeTokenIssuer(kid="two").jwks()))
    assert kids(await source.key_set()) == {"two"}
    path.unlink()
    await unavailable(source)


# --- the fetch plan, as a table ---------------------------------------------------

RECENT, OLD = NOW - timedelta(seconds=1), NOW - timedelta(minutes=6)


@pytest.mark.parametrize(
    ("fetched_at", "last_attempt", "refresh", "action"),
    [
        (None, None, False, "fetch"),  # cold start
        (None, RECENT, False, "fail"),  # it just failed: don't wait out another timeout
        (None, OLD, False, "fetch"),
        (RECENT, RECENT, False, "serve"),
        (RECENT, RECENT, True, "serve"),  # unknown kid, but we just looked
        (NOW - timedelta(minutes=1), NOW - timedelta(minutes=1), True, "fetch"),
        (OLD, OLD, False, "fetch"),  # stale
        (OLD, RECENT, False, "fail"),  # stale, and the refetch just failed
        (NOW + timedelta(hours=1), NOW + timedelta(hours=1), False, "fetch"),  # clock went back
    ],
)
def test_fetch_plan(
    fetched_at: datetime | None, last_attempt: datetime | None, refresh: bool, action: str
) -> None:
    got = plan_fetch(
        now=NOW,
        fetched_at=fetched_at,
        last_attempt=last_attempt,
        refresh=refresh,
        refresh_interval=INTERVAL,
        min_refresh_gap=GAP,
    )
    assert got == action


# --- HttpsJwks against a real HTTPS server on loopback --------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LoopbackTls:
    return loopback_tls(tmp_path_factory.mktemp("pki"), "jwks test")


@dataclass
class JwksServer:
    """The API server's /openid/v1/jwks, with knobs for the failures we test."""

    document: dict[str, Any]
    runner: web.AppRunner | None = None
    url: str = ""
    requests: int = 0
    status: int = 200
    body: bytes | None = None
    authorizations: list[str | None] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        self.authorizations.append(request.headers.get("Authorization"))
        if self.status != 200:
            return web.Response(status=self.status, headers={"Location": "https://x/"})
        if self.body is not None:
            return web.Response(body=self.body)
        return web.json_response(self.document)

    async def start(self, context: ssl.SSLContext) -> None:
        app = web.Application()
        app.router.add_get("/openid/v1/jwks", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=context).start()
        port = self.runner.addresses[0][1]
        self.url = f"https://127.0.0.1:{port}/openid/v1/jwks"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@pytest.fixture
async def server(pki: LoopbackTls, watchdog: None) -> AsyncIterator[JwksServer]:
    served = JwksServer(FakeTokenIssuer(kid="k1").jwks())
    await served.start(pki.server_context)
    yield served
    await served.stop()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def source(
    server: JwksServer, pki: LoopbackTls, clock: FakeClock
) -> AsyncIterator[HttpsJwks]:
    jwks = HttpsJwks(
        server.url,
        clock=clock,
        ca_file=str(pki.ca_file),
        refresh_interval=INTERVAL,
        min_refresh_gap=GAP,
        timeout=2.0,
    )
    yield jwks
    await jwks.close()


async def test_serves_and_caches(source: HttpsJwks, server: JwksServer) -> None:
    assert kids(await source.key_set()) == {"k1"}
    assert kids(await source.key_set()) == {"k1"}
    assert server.requests == 1


async def test_concurrent_callers_share_one_fetch(source: HttpsJwks, server: JwksServer) -> None:
    results = await asyncio.gather(*(source.key_set() for _ in range(20)))
    assert all(kids(keys) == {"k1"} for keys in results)
    assert server.requests == 1


async def test_refetches_after_the_interval(
    source: HttpsJwks, server: JwksServer, clock: FakeClock
) -> None:
    await source.key_set()
    server.document = FakeTokenIssuer(kid="k2").jwks()
    clock.advance(INTERVAL - timedelta(seconds=1))
    assert kids(await source.key_set()) == {"k1"}
    clock.advance(timedelta(seconds=1))
    assert kids(await source.key_set()) == {"k2"}
    assert server.requests == 2


async def test_unknown_kid_refresh_is_rate_limited(
    source: HttpsJwks, server: JwksServer, clock: FakeClock
) -> None:
    await source.key_set()
    for _ in range(5):
        await source.key_set(refresh=True)
    assert server.requests == 1
    clock.advance(GAP)
    await source.key_set(refresh=True)
    await source.key_set(refresh=True)
    assert server.requests == 2


async def test_server_down_with_empty_cache_fails_closed(
    source: HttpsJwks, server: JwksServer, clock: FakeClock
) -> None:
    await server.stop()
    await unavailable(source)
    await unavailable(source)  # refused at once, without another attempt
    clock.advance(GAP)
    await unavailable(source)


async def test_server_down_with_fresh_cache_keeps_serving(
    source: HttpsJwks, server: JwksServer, clock: FakeClock
) -> None:
    await source.key_set()
    await server.stop()
    clock.advance(GAP)
    assert kids(await source.key_set(refresh=True)) == {"k1"}  # refresh failed, cache served
    clock.advance(INTERVAL - GAP - timedelta(seconds=1))
    assert kids(await source.key_set()) == {"k1"}


async def test_server_down_with_stale_cache_fails_closed(
    source: HttpsJwks, server: JwksServer, clock: FakeClock
) -> None:
    await source.key_set()
    await server.stop()
    clock.advance(INTERVAL)
    await unavailable(source)


async def test_recovers_when_the_server_is_back(
    source: HttpsJwks, server: JwksServer, clock: FakeClock
) -> None:
    server.status = 503
    await unavailable(source)
    server.status = 200
    clock.advance(GAP)
    assert kids(await source.key_set()) == {"k1"}


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (500, None),
        (302, None),
        (200, b"{not json"),
        (200, b'{"keys": []}'),
        (200, b" " * (2 << 20)),
    ],
    ids=["500", "redirect", "not-json", "no-keys", "too-big"],
)
async def test_bad_responses_fail_closed(
    source: HttpsJwks, server: JwksServer, status: int, body: bytes | None
) -> None:
    server.status, server.body = status, body
    await unavailable(source)


async def test_untrusted_certificate_fails_closed(server: JwksServer, clock: FakeClock) -> None:
    jwks = HttpsJwks(server.url, clock=clock)  # the system store does not know our CA
    try:
        await unavailable(jwks)
    finally:
        await jwks.close()
    assert server.requests == 0


async def test_sends_the_bearer_token(
    server: JwksServer, pki: LoopbackTls, clock: FakeClock, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("ca-own-token\n")
    jwks = HttpsJwks(
        server.url, clock=clock, ca_file=str(pki.ca_file), bearer_token_file=str(token_file)
    )
    try:
        await jwks.key_set()
    finally:
        await jwks.close()
    assert server.authorizations == ["Bearer ca-own-token"]


async def test_verifier_end_to_end(server: JwksServer, source: HttpsJwks, clock: FakeClock) -> None:
    issuer = FakeTokenIssuer(kid="k1")
    server.document = issuer.jwks()
    verifier = TokenVerifier(TokenPolicy(issuer=issuer.issuer), source, clock)
    caller = await verifier.verify(issuer.token("shop", "web", now=NOW))
    assert (caller.namespace, caller.service_account) == ("shop", "web")


@pytest.mark.parametrize(
    "url",
    ["http://kubernetes.default.svc/openid/v1/jwks", "ftp://x/jwks", "https:///jwks", "jwks"],
)
def test_only_https_urls_are_accepted(url: str) -> None:
    with pytest.raises(ValueError):
        HttpsJwks(url, clock=FakeClock())


def test_refresh_gap_must_fit_in_the_interval() -> None:
    with pytest.raises(ValueError):
        HttpsJwks("https://k/jwks", clock=FakeClock(), min_refresh_gap=timedelta(hours=1))
