"""TokenReview: a cached acceptance ends when the token it was for expires."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import jwt
import pytest
from kubernetes.client import Configuration, V1TokenReviewStatus, V1UserInfo

from ca.authn.errors import AuthnError
from ca.authn.tokenreview import POD_NAME_EXTRA, POD_UID_EXTRA, ReviewPolicy, TokenReviewer

T0 = datetime(2030, 1, 1, tzinfo=UTC)


class Reviewer(TokenReviewer):
    """The API server's real rule for exp, without the HTTP."""

    reviews = 0

    async def _review(self, token: str) -> V1TokenReviewStatus | None:
        self.reviews += 1
        exp = jwt.decode(token, options={"verify_signature": False})["exp"]
        if self._clock().timestamp() >= exp:
            return V1TokenReviewStatus(
                authenticated=False, error="service account token has expired"
            )
        user = V1UserInfo(
            username="system:serviceaccount:demo:web",
            extra={POD_NAME_EXTRA: ["web-1"], POD_UID_EXTRA: ["0f1e"]},
        )
        return V1TokenReviewStatus(authenticated=True, audiences=["outrider-ca"], user=user)


async def test_a_cached_review_does_not_outlive_the_token() -> None:
    now = [T0]
    reviewer = Reviewer(
        Configuration(host="https://127.0.0.1:6443"),
        ReviewPolicy(cache_ttl=timedelta(seconds=30)),
        lambda: now[0],
    )
    token = jwt.encode(
        {"exp": int((T0 + timedelta(seconds=2)).timestamp()), "aud": ["outrider-ca"]},
        "k" * 32,
        "HS256",
    )
    assert (await reviewer.verify(token)).service_account == "web"
    now[0] = T0 + timedelta(seconds=20)  # the token expired 18 s ago
    with pytest.raises(AuthnError):
        await reviewer.verify(token)
    await reviewer.close()
