"""`outrider policy check --header`: read as the agent reads a request's headers."""

from __future__ import annotations

import pytest

from outrider.policycheck import request_headers, text


def test_names_are_lower_cased_and_repeats_kept_in_order() -> None:
    headers, refusal = request_headers(["X-Role=admin", "x-role=ops", "Accept=a=b"])
    assert headers == {"x-role": ("admin", "ops"), "accept": ("a=b",)}
    assert refusal is None


def test_an_underscore_is_refused_400_before_any_policy_as_the_agent_does() -> None:
    _, refusal = request_headers(["X_Role=admin", "not a pair"])  # refused at the first
    assert refusal is not None
    assert text(refusal).splitlines()[:2] == ["deny", "status: 400 (refused before any policy)"]
    assert "X_Role" in refusal["why"]


@pytest.mark.parametrize("pair", ["X-Role", "=admin"])
def test_a_pair_that_is_not_name_equals_value_is_the_users_error(pair: str) -> None:
    with pytest.raises(ValueError, match="is not NAME=VALUE"):
        request_headers(["X-Role=admin", pair])
