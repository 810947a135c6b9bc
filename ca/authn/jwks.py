"""Where the CA finds the public keys that sign ServiceAccount tokens.

The API server publishes them as a JWKS (``/openid/v1/jwks``). The CA checks
tokens offline against that set, so the set itself is trust material: every
source here fails closed (``AuthnError("jwks_unavailable")``) rather than
verify against nothing, an unknown key set, or a key set too old to trust.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

import aiohttp
import jwt

from ca.authn.errors import AuthnError

Clock = Callable[[], datetime]
"""Returns the current time as an aware UTC datetime."""

# A cluster's JWKS is a few KB; the cap bounds what a hostile endpoint can make us buffer.
MAX_JWKS_BYTES = 1 << 20

# Signature keys only. A symmetric ("oct") key published in a JWKS is a shared
# secret anyone can read, so it must never verify anything.
_SIGNING_KEY_TYPES = frozenset({"RSA", "EC", "OKP"})

log = logging.getLogger(__name__)


class JwksSource(Protocol):
    """Supplies the issuer's current key set.

    ``refresh=True`` means "a token named a key I do not have": the source
    may look again (the issuer may have rotated), within its own rate limit.
    """

    async def key_set(self, *, refresh: bool = False) -> jwt.PyJWKSet: ...


def key_set_from_document(document: object) -> jwt.PyJWKSet:
    """Build a key set from a parsed JWKS, keeping only public signing keys.

    Keys PyJWT cannot use are skipped (as it does), but a set left with no
    usable key is an error: an empty set would refuse every caller quietly.
    """
    keys = document.get("keys") if isinstance(document, Mapping) else None
    if not isinstance(keys, list):
        raise AuthnError("jwks_unavailable", "JWKS has no 'keys' list")
    signing = [key for key in keys if _is_public_signing_key(key)]
    try:
        return jwt.PyJWKSet(signing)
    except jwt.PyJWTError as exc:
        raise AuthnError("jwks_unavailable", "JWKS holds no usable signing key") from exc


def key_set_from_json(data: bytes | str) -> jwt.PyJWKSet:
    """Parse a JWKS document as served or stored."""
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise AuthnError("jwks_unavailable", "JWKS is not valid JSON") from exc
    return key_set_from_document(document)


def _is_public_signing_key(key: object) -> bool:
    # "d" is the private part of RSA, EC and OKP keys: a JWKS that leaks one
    # no longer proves who signed anything.
    return (
        isinstance(key, dict)
        and key.get("kty") in _SIGNING_KEY_TYPES
        and key.get("use", "sig") == "sig"
        and "d" not in key
    )


class StaticJwks:
    """A key set fixed at construction: for tests, the demo, and pinned keys."""

    def __init__(self, document: Mapping[str, Any]) -> None:
        self._keys = key_set_from_document(document)

    async def key_set(self, *, refresh: bool = False) -> jwt.PyJWKSet:
        return self._keys


class FileJwks:
    """A JWKS file, e.g. mounted from a ConfigMap, re-read whenever it changes.

    Change is detected by (mtime, size, inode): kubelet updates ConfigMap
    volumes by swapping a symlink, which changes the inode even when the
    mtime granularity would hide a quick second write. A missing or invalid
    file refuses callers until it is fixed; it is re-read on every call
    while broken, so a fix takes effect at once.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = os.fspath(path)
        self._stamp: tuple[int, int, int] | None = None
        self._keys: jwt.PyJWKSet | None = None

    async def key_set(self, *, refresh: bool = False) -> jwt.PyJWKSet:
        """Every call already notices a changed file, so ``refresh`` adds nothing."""
        stamp = self._stat()
        if self._keys is None or stamp != self._stamp:
            # Reading and parsing go to a thread; the stat above is cheap enough inline.
            self._keys = await asyncio.to_thread(self._load)
            self._stamp = stamp
        return self._keys

    def _stat(self) -> tuple[int, int, int]:
        try:
            st = os.stat(self._path)
        except OSError as exc:
            raise AuthnError("jwks_unavailable", f"cannot stat JWKS file {self._path}") from exc
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _load(self) -> jwt.PyJWKSet:
        try:
            with open(self._path, "rb") as f:
                data = f.read(MAX_JWKS_BYTES + 1)
        except OSError as exc:
            raise AuthnError("jwks_unavailable", f"cannot read JWKS file {self._path}") from exc
        if len(data) > MAX_JWKS_BYTES:
            raise AuthnError("jwks_unavailable", f"JWKS file {self._path} is too large")
        return key_set_from_json(data)


Action = Literal["serve", "fetch", "fail"]


def _within(start: datetime | None, now: datetime, span: timedelta) -> bool:
    # A clock that went backwards makes the age negative: trust nothing then.
    return start is not None and timedelta(0) <= now - start < span


def plan_fetch(
    *,
    now: datetime,
    fetched_at: datetime | None,
    last_attempt: datetime | None,
    refresh: bool,
    refresh_interval: timedelta,
    min_refresh_gap: timedelta,
) -> Action:
    """Decide whether a remote key set may be served, must be fetched, or is gone.

    A fresh cache is served, and refetched on request only once per gap, so
    tokens with made-up key ids cannot turn the CA into a load generator
    against the API server. A stale or empty cache is refetched, unless an
    attempt just failed: then callers are refused at once instead of each
    waiting out a timeout against an endpoint known to be down.
    """
    gap_open = not _within(last_attempt, now, min_refresh_gap)
    if _within(fetched_at, now, refresh_interval):
        return "fetch" if refresh and gap_open else "serve"
    return "fetch" if gap_open else "fail"


@dataclass(frozen=True)
class _Fetched:
    keys: jwt.PyJWKSet
    at: datetime


class HttpsJwks:
    """The issuer's JWKS endpoint, fetched over verified HTTPS and cached.

    ``bearer_token_file`` (an addition to the original interface) names the
    CA's own ServiceAccount token: by default the API server serves its JWKS
    only to authenticated callers. It is re-read on every fetch because
    kubelet rotates it.
    """

    def __init__(
        self,
        url: str,
        *,
        clock: Clock,
        ca_file: str | None = None,
        refresh_interval: timedelta = timedelta(minutes=5),
        min_refresh_gap: timedelta = timedelta(seconds=10),
        timeout: float = 5.0,
        bearer_token_file: str | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"JWKS URL must be https://host/...: {url!r}")
        if not timedelta(0) <= min_refresh_gap <= refresh_interval:
            raise ValueError("need 0 <= min_refresh_gap <= refresh_interval")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self._url = url
        self._clock = clock
        self._ssl = ssl.create_default_context(cafile=ca_file)
        self._refresh_interval = refresh_interval
        self._min_refresh_gap = min_refresh_gap
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._bearer_token_file = bearer_token_file
        self._cached: _Fetched | None = None
        self._last_attempt: datetime | None = None
        self._lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"HttpsJwks({self._url!r})"

    async def key_set(self, *, refresh: bool = False) -> jwt.PyJWKSet:
        cached = self._cached
        if cached is not None and self._plan(refresh) == "serve":
            return cached.keys
        # One fetch at a time; whoever waited re-plans and usually just serves its result.
        async with self._lock:
            return await self._serve_or_fetch(refresh)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _plan(self, refresh: bool) -> Action:
        return plan_fetch(
            now=self._clock(),
            fetched_at=self._cached.at if self._cached else None,
            last_attempt=self._last_attempt,
            refresh=refresh,
            refresh_interval=self._refresh_interval,
            min_refresh_gap=self._min_refresh_gap,
        )

    async def _serve_or_fetch(self, refresh: bool) -> jwt.PyJWKSet:
        action, cached = self._plan(refresh), self._cached
        if action == "serve" and cached is not None:
            return cached.keys
        if action == "fail":
            raise AuthnError("jwks_unavailable", f"{self._url} failed recently; no fresh keys")
        started = self._last_attempt = self._clock()
        try:
            keys = await self._fetch()
        except AuthnError as exc:
            if cached is None or not _within(cached.at, self._clock(), self._refresh_interval):
                raise
            log.warning("JWKS refresh failed, serving cached keys: %s", exc.message)
            return cached.keys
        self._cached = _Fetched(keys, started)
        return keys

    async def _fetch(self) -> jwt.PyJWKSet:
        headers = await self._auth_headers()
        try:
            async with self._http().get(
                self._url,
                ssl=self._ssl,
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
            ) as response:
                if response.status != 200:
                    raise AuthnError(
                        "jwks_unavailable", f"{self._url} answered HTTP {response.status}"
                    )
                body = await _read_bounded(response.content, self._url)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise AuthnError(
                "jwks_unavailable", f"fetching {self._url} failed: {type(exc).__name__}"
            ) from exc
        return key_set_from_json(body)

    async def _auth_headers(self) -> dict[str, str]:
        if self._bearer_token_file is None:
            return {}
        path = self._bearer_token_file
        try:
            token = await asyncio.to_thread(Path(path).read_text, encoding="utf-8")
        except OSError as exc:
            raise AuthnError("jwks_unavailable", f"cannot read bearer token {path}") from exc
        return {"Authorization": f"Bearer {token.strip()}"}

    def _http(self) -> aiohttp.ClientSession:
        # Created on first use, inside the running loop that will own it.
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session


async def _read_bounded(content: aiohttp.StreamReader, url: str) -> bytes:
    body = bytearray()
    async for chunk in content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > MAX_JWKS_BYTES:
            raise AuthnError("jwks_unavailable", f"{url} sent a JWKS over {MAX_JWKS_BYTES} bytes")
    return bytes(body)
