"""ServiceAccount token verification: every refusal class, and the happy paths."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given, settings
from hypothesis import strategies as st
from jwt.algorithms import RSAAlgorithm

from ca.authn.errors import TOKEN_REASONS
from ca.authn.fake_issuer import FakeTokenIssuer
from ca.authn.jwks import StaticJwks
from ca.authn.kubernetes import (
    AuthnError,
    KubernetesCaller,
    TokenPolicy,
    TokenVerifier,
    caller_from_claims,
)

NOW = datetime.fromtimestamp(1_700_000_000, UTC)
ISSUER = "https://kubernetes.default.svc.cluster.local"
REPO = Path(__file__).resolve().parents[3]


class FakeClock:
    def __init__(self, now: datetime = NOW) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class CountingJwks:
    """A JWKS source that counts refresh requests and can rotate on refresh."""

    def __init__(self, document: dict[str, Any], after_refresh: dict[str, Any] | None = None):
        self._keys = StaticJwks(document)
        self._after = StaticJwks(after_refresh) if after_refresh else None
        self.refreshes = 0

    async def key_set(self, *, refresh: bool = False) -> jwt.PyJWKSet:
        if refresh:
            self.refreshes += 1
            if self._after is not None:
                self._keys = self._after
        return await self._keys.key_set()


def b64(data: bytes | dict[str, Any]) -> str:
    raw = json.dumps(data).encode() if isinstance(data, dict) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@dataclass
class Keys:
    """Everything the token table needs: the trusted issuer, an RSA key, an impostor."""

    issuer: FakeTokenIssuer
    impostor: FakeTokenIssuer
    rsa_key: rsa.RSAPrivateKey

    def jwks(self) -> dict[str, Any]:
        public = self.rsa_key.public_key()
        rsa_jwks = [
            {**RSAAlgorithm.to_jwk(public, as_dict=True), "kid": "rsa-1", "alg": "RS256"},
            {**RSAAlgorithm.to_jwk(public, as_dict=True), "kid": "rsa-ps", "alg": "PS256"},
        ]
        return {"keys": self.issuer.jwks()["keys"] + rsa_jwks}

    def claims(self, ns: str = "shop", sa: str = "web", **overrides: Any) -> dict[str, Any]:
        return self.issuer.claims(ns, sa, now=NOW, **overrides)

    def token(self, ns: str = "shop", sa: str = "web", **kwargs: Any) -> str:
        return self.issuer.token(ns, sa, now=kwargs.pop("now", NOW), **kwargs)

    def rsa_token(self, alg: str = "RS256", kid: str = "rsa-1", **overrides: Any) -> str:
        return jwt.encode(self.claims(**overrides), self.rsa_key, alg, headers={"kid": kid})

    def unsigned(self, alg: str, signature: str = "") -> str:
        return f"{b64({'alg': alg, 'kid': self.issuer.kid})}.{b64(self.claims())}.{signature}"

    def hs256_with_public_key(self) -> str:
        """The classic confusion: sign HS256 with the RSA public key as the secret."""
        secret = self.rsa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        signing_input = f"{b64({'alg': 'HS256', 'kid': 'rsa-1'})}.{b64(self.claims())}"
        mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{b64(mac)}"


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(
        issuer=FakeTokenIssuer(ISSUER),
        impostor=FakeTokenIssuer(ISSUER),  # same kid, different key
        rsa_key=rsa.generate_private_key(public_exponent=65537, key_size=2048),
    )


def verifier_for(keys: Keys, clock: Callable[[], datetime] | None = None) -> TokenVerifier:
    return TokenVerifier(TokenPolicy(issuer=ISSUER), StaticJwks(keys.jwks()), clock or FakeClock())


def expected_caller(pod: str | None = "pod-0", uid: str | None = None) -> KubernetesCaller:
    return KubernetesCaller("shop", "web", pod, uid, "system:serviceaccount:shop:web")


async def refusal(verifier: TokenVerifier, token: str) -> AuthnError:
    with pytest.raises(AuthnError) as caught:
        await verifier.verify(token)
    assert caught.value.reason in TOKEN_REASONS
    if token:
        assert token not in str(caught.value)
    return caught.value


# --- the happy paths ---------------------------------------------------------


async def test_es256_token_gives_the_caller(keys: Keys) -> None:
    caller = await verifier_for(keys).verify(keys.token(pod_name="web-6d4cf56db6-x2x7z"))
    pod_uid = keys.claims(pod_name="web-6d4cf56db6-x2x7z")["kubernetes.io"]["pod"]["uid"]
    assert caller == expected_caller("web-6d4cf56db6-x2x7z", pod_uid)


@pytest.mark.parametrize(("alg", "kid"), [("RS256", "rsa-1"), ("PS256", "rsa-ps")])
async def test_rsa_tokens_give_the_caller(keys: Keys, alg: str, kid: str) -> None:
    caller = await verifier_for(keys).verify(keys.rsa_token(alg, kid))
    assert (caller.namespace, caller.service_account, caller.pod_name) == ("shop", "web", "pod-0")


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda k: k.token(audience="outrider-ca"), id="aud-list"),
        pytest.param(lambda k: k.token(aud="outrider-ca"), id="aud-string"),
        pytest.param(lambda k: k.token(audience=["api", "outrider-ca"]), id="aud-among-others"),
        pytest.param(lambda k: k.token(extra_header={"kid": None}), id="no-kid-tries-all"),
        pytest.param(lambda k: k.token(nbf=None), id="no-nbf"),
        pytest.param(lambda k: k.token(sa="web.v2"), id="dotted-sa"),
    ],
)
async def test_accepted_shapes(keys: Keys, make: Callable[[Keys], str]) -> None:
    caller = await verifier_for(keys).verify(make(keys))
    assert caller.namespace == "shop"


async def test_token_without_pod_is_accepted(keys: Keys) -> None:
    caller = await verifier_for(keys).verify(keys.token(pod_name=None))
    assert caller == expected_caller(None)


# --- one refusal per class ---------------------------------------------------

REFUSALS: list[Any] = [
    ("wrong_audience", lambda k: k.token(audience="kubernetes.default.svc")),
    ("wrong_audience", lambda k: k.token(audience=["api", "vault"])),
    ("wrong_audience", lambda k: k.token(aud=[7])),
    ("expired", lambda k: k.token(now=NOW - timedelta(hours=1))),
    ("not_yet_valid", lambda k: k.token(nbf=int(NOW.timestamp()) + 600)),
    ("unknown_issuer", lambda k: k.token(iss="https://evil.example")),
    ("unknown_issuer", lambda k: k.token(iss=ISSUER + "/")),
    ("bad_signature", lambda k: k.impostor.token("shop", "web", now=NOW)),
    ("bad_signature", lambda k: k.rsa_token(kid="rsa-1")[:-8] + "AAAAAAAA"),
    ("unsigned", lambda k: k.unsigned("none")),
    ("unsigned", lambda k: k.unsigned("NONE")),
    ("unsigned", lambda k: k.unsigned("nOnE", signature=k.token().rsplit(".", 1)[1])),
    ("unsupported_alg", lambda k: k.hs256_with_public_key()),
    ("unsupported_alg", lambda k: k.rsa_token("RS512")),
    ("unsupported_alg", lambda k: k.unsigned("ES256K")),
    ("unknown_key", lambda k: k.token(extra_header={"kid": "rotated-away"})),
    ("unknown_key", lambda k: k.rsa_token("RS256", kid=k.issuer.kid)),  # kid of an EC key
    ("unknown_key", lambda k: k.rsa_token("PS256", kid="rsa-1")),  # key bound to RS256
    ("unknown_key", lambda k: k.impostor.token(
        "shop", "web", now=NOW,
        extra_header={"kid": "mine", "jwk": k.impostor.jwks()["keys"][0]},
    )),
    ("malformed", lambda k: ""),
    ("malformed", lambda k: "not-a-jwt"),
    ("malformed", lambda k: "a.b"),
    ("malformed", lambda k: "!!.!!.!!"),
    ("malformed", lambda k: f"{b64(b'[1]')}.{b64(k.claims())}.c2ln"),
    ("malformed", lambda k: f"{b64({'kid': 'fake-1'})}.{b64(k.claims())}.c2ln"),
    ("malformed", lambda k: f"{b64({'alg': 'ES256', 'kid': 7})}.{b64(k.claims())}.c2ln"),
    ("malformed", lambda k: f"{b64({'alg': 'ES256', 'crit': ['x'], 'x': 1})}.e30.c2ln"),
    ("malformed", lambda k: k.token() + "." + "A" * 20_000),
    ("invalid_claims", lambda k: k.token(exp=None)),
    ("invalid_claims", lambda k: k.token(exp="1700003600")),
    ("invalid_claims", lambda k: k.token(nbf=True)),
    ("invalid_claims", lambda k: k.token(nbf=float("nan"))),
    ("invalid_claims", lambda k: k.token(exp=10**20)),
    ("invalid_claims", lambda k: k.token(sub=None)),
    ("invalid_claims", lambda k: k.token(aud=None)),
    ("invalid_claims", lambda k: k.token(iss=None)),
    ("invalid_claims", lambda k: k.token(**{"kubernetes.io": None})),
    ("invalid_claims", lambda k: k.token(**{"kubernetes.io": "shop/web"})),
    ("invalid_claims", lambda k: k.token(**{"kubernetes.io": {"serviceaccount": {"name": "web"}}})),
    ("invalid_claims", lambda k: k.token(**{"kubernetes.io": {"namespace": "shop"}})),
    ("invalid_claims", lambda k: k.token(**{"kubernetes.io": {
        "namespace": "shop", "serviceaccount": {"name": "web"}, "pod": "p"}})),
    ("invalid_claims", lambda k: k.token(**{"kubernetes.io": {
        "namespace": "shop", "serviceaccount": {"name": "web"}, "pod": {"name": 5}}})),
    ("invalid_claims", lambda k: k.token(pod_name="pod\nforged-log-line")),
    ("invalid_claims", lambda k: k.token(sub="system:serviceaccount:shop:admin")),
    ("invalid_claims", lambda k: k.token(sub="system:serviceaccount:kube-system:web")),
    ("invalid_claims", lambda k: k.token(sub="web")),
]  # fmt: skip


@pytest.mark.parametrize(("reason", "make"), REFUSALS)
async def test_refused(keys: Keys, reason: str, make: Callable[[Keys], str]) -> None:
    err = await refusal(verifier_for(keys), make(keys))
    assert err.reason == reason, err


BAD_NAMES = ["a/b", "..", ".", "%2e", "%2F", "Shop", "", "a" * 64, "-a", "a-", "a_b", "é", "a b"]


@pytest.mark.parametrize("name", BAD_NAMES)
async def test_namespace_that_would_break_a_spiffe_id(keys: Keys, name: str) -> None:
    token = keys.token(ns=name)  # sub is consistent, so only the name itself is at fault
    assert (await refusal(verifier_for(keys), token)).reason == "invalid_claims"


BAD_ACCOUNTS = [n for n in BAD_NAMES if n != "a" * 64] + ["a..b", ".a", "a.", "a/../b", "a" * 254]


@pytest.mark.parametrize("name", BAD_ACCOUNTS)
async def test_service_account_that_would_break_a_spiffe_id(keys: Keys, name: str) -> None:
    token = keys.token(sa=name)
    assert (await refusal(verifier_for(keys), token)).reason == "invalid_claims"


async def test_service_account_names_follow_kubernetes_not_dns_label_limits(keys: Keys) -> None:
    """Kubernetes bounds a ServiceAccount name at 253 characters, not each
    label at 63; refusing a name the API server accepts would lock it out."""
    name = "a" * 64 + "." + "b" * 188
    caller = await verifier_for(keys).verify(keys.token(sa=name))
    assert caller.service_account == name


async def test_every_token_reason_is_covered() -> None:
    covered = {reason for reason, _ in REFUSALS} | {"jwks_unavailable"}
    assert covered == TOKEN_REASONS


# --- time: the clock is injected and the leeway holds at both edges ----------


@pytest.mark.parametrize(
    ("at", "reason"),
    [
        (NOW + timedelta(minutes=10, seconds=30) - timedelta(microseconds=1), None),
        (NOW + timedelta(minutes=10, seconds=30), "expired"),
        (NOW - timedelta(seconds=30), None),
        (NOW - timedelta(seconds=30, microseconds=1), "not_yet_valid"),
    ],
)
async def test_leeway_at_both_edges(keys: Keys, at: datetime, reason: str | None) -> None:
    verifier = verifier_for(keys, FakeClock(at))
    token = keys.token(lifetime=timedelta(minutes=10))
    if reason is None:
        assert (await verifier.verify(token)).namespace == "shop"
    else:
        assert (await refusal(verifier, token)).reason == reason


# --- key lookup --------------------------------------------------------------


async def test_unknown_kid_refreshes_once_then_refuses(keys: Keys) -> None:
    source = CountingJwks(keys.jwks())
    verifier = TokenVerifier(TokenPolicy(issuer=ISSUER), source, FakeClock())
    assert (await refusal(verifier, keys.token(extra_header={"kid": "x"}))).reason == "unknown_key"
    assert source.refreshes == 1
    await verifier.verify(keys.token())
    assert source.refreshes == 1  # a known kid never asks for a refresh


async def test_unknown_kid_found_after_rotation(keys: Keys) -> None:
    rotated = FakeTokenIssuer(ISSUER, kid="fake-2")
    source = CountingJwks(keys.jwks(), after_refresh=rotated.jwks())
    verifier = TokenVerifier(TokenPolicy(issuer=ISSUER), source, FakeClock())
    assert await verifier.verify(rotated.token("shop", "web", now=NOW)) == expected_caller(
        "pod-0", rotated.claims("shop", "web")["kubernetes.io"]["pod"]["uid"]
    )


async def test_jwks_failure_refuses(keys: Keys) -> None:
    class Down:
        async def key_set(self, *, refresh: bool = False) -> jwt.PyJWKSet:
            raise AuthnError("jwks_unavailable", "down")

    verifier = TokenVerifier(TokenPolicy(issuer=ISSUER), Down(), FakeClock())
    assert (await refusal(verifier, keys.token())).reason == "jwks_unavailable"


async def test_symmetric_keys_in_the_jwks_are_never_used(keys: Keys) -> None:
    secret = b"s" * 32
    document = {"keys": [*keys.jwks()["keys"], {"kty": "oct", "kid": "hmac", "k": b64(secret)}]}
    policy = TokenPolicy(issuer=ISSUER)
    verifier = TokenVerifier(policy, StaticJwks(document), FakeClock())
    token = jwt.encode(keys.claims(), secret, "HS256", headers={"kid": "hmac"})
    assert (await refusal(verifier, token)).reason == "unsupported_alg"


# --- construction-time validation --------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"algorithms": ("HS256",)},
        {"algorithms": ("RS256", "none")},
        {"algorithms": ()},
        {"issuer": ""},
        {"audience": ""},
        {"leeway": timedelta(seconds=-1)},
        {"leeway": timedelta(hours=1)},
    ],
)
def test_unsafe_policy_is_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        TokenPolicy(**{"issuer": ISSUER, **kwargs})


def test_caller_validates_itself() -> None:
    with pytest.raises(ValueError, match="namespace"):
        KubernetesCaller("a/b", "web", None, None, "system:serviceaccount:a/b:web")
    with pytest.raises(ValueError, match="sub"):
        KubernetesCaller("shop", "web", None, None, "system:serviceaccount:shop:db")


# --- properties --------------------------------------------------------------

_SAFE = re.compile(r"[a-z0-9][-a-z0-9.]*")
_LABEL = st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")


def k8s_claims(ns: str, sa: str) -> dict[str, Any]:
    return {
        "sub": f"system:serviceaccount:{ns}:{sa}",
        "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa}},
    }


@settings(max_examples=300, deadline=None)
@given(ns=st.text(max_size=70), sa=st.text(max_size=70))
def test_only_safe_names_become_callers(ns: str, sa: str) -> None:
    try:
        caller = caller_from_claims(k8s_claims(ns, sa))
    except AuthnError as err:
        assert err.reason == "invalid_claims"
        return
    for name in (caller.namespace, caller.service_account):
        assert _SAFE.fullmatch(name) and ".." not in name and not name.endswith(".")
    assert len(caller.namespace) <= 63 and "." not in caller.namespace


@settings(max_examples=100, deadline=None)
@given(ns=_LABEL, sa=st.lists(_LABEL, min_size=1, max_size=3).map(".".join))
def test_every_kubernetes_name_is_accepted(ns: str, sa: str) -> None:
    caller = caller_from_claims(k8s_claims(ns, sa))
    assert (caller.namespace, caller.service_account) == (ns, sa)


@settings(max_examples=200, deadline=None)
@given(
    token=st.one_of(
        st.text(max_size=200),
        st.lists(st.binary(max_size=60).map(b64), min_size=1, max_size=4).map(".".join),
        st.dictionaries(st.text(max_size=5), st.none() | st.text(max_size=5)).map(
            lambda h: f"{b64(h)}.e30.c2ln"
        ),
    )
)
def test_any_garbage_gives_an_authn_error(keys: Keys, token: str) -> None:
    verifier = verifier_for(keys)
    with pytest.raises(AuthnError):
        asyncio.run(verifier.verify(token))


# --- the fake stays out of production ----------------------------------------


def test_no_production_module_imports_the_fake_issuer() -> None:
    offenders = [
        str(path.relative_to(REPO))
        for top in ("ca", "agent", "injector", "identity", "outrider")
        for path in (REPO / top).rglob("*.py")
        if "fake_issuer" in path.read_text(encoding="utf-8")
        and path.name != "fake_issuer.py"
        and "demo" not in path.name
    ]
    assert offenders == []
