"""AllowList.decide: exact SPIFFE IDs and exact trust domains, nothing looser."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.core.authz import AllowList
from identity import SpiffeId, TrustDomain

TD = TrustDomain("td")


def ids(*texts: str) -> frozenset[SpiffeId]:
    return frozenset(SpiffeId.parse(text) for text in texts)


def domains(*names: str) -> frozenset[TrustDomain]:
    return frozenset(TrustDomain(name) for name in names)


ONLY_AB = AllowList(spiffe_ids=ids("spiffe://td/ns/x/sa/a.b"))
ONLY_TD = AllowList(trust_domains=domains("td"))

DECISIONS = [
    pytest.param(ONLY_AB, "spiffe://td/ns/x/sa/a.b", "allow", id="exact-id"),
    pytest.param(ONLY_AB, "spiffe://td/ns/x/sa/aXb", "deny", id="dot-is-not-a-wildcard"),
    pytest.param(ONLY_AB, "spiffe://td/ns/x/sa/a.bc", "deny", id="id-is-not-a-prefix"),
    pytest.param(ONLY_AB, "spiffe://td/ns/x/sa/a.b/c", "deny", id="no-child-paths"),
    pytest.param(ONLY_AB, "spiffe://td/ns/x/sa/a", "deny", id="no-parent-paths"),
    pytest.param(ONLY_AB, "spiffe://td/ns/X/sa/a.b", "deny", id="path-is-case-sensitive"),
    pytest.param(ONLY_AB, "spiffe://td.evil/ns/x/sa/a.b", "deny", id="same-path-other-domain"),
    pytest.param(ONLY_AB, "spiffe://td/ns/y/sa/other", "deny", id="id-list-is-not-a-domain"),
    pytest.param(ONLY_TD, "spiffe://td/ns/x/sa/anyone", "allow", id="trust-domain-match"),
    pytest.param(ONLY_TD, "spiffe://td.evil/ns/x/sa/a", "deny", id="not-td-dot-evil"),
    pytest.param(ONLY_TD, "spiffe://evil.td/ns/x/sa/a", "deny", id="not-evil-dot-td"),
    pytest.param(ONLY_TD, "spiffe://tdx/ns/x/sa/a", "deny", id="not-a-longer-name"),
    pytest.param(ONLY_TD, "spiffe://t/ns/x/sa/a", "deny", id="not-a-shorter-name"),
    pytest.param(
        AllowList(ids("spiffe://other/ns/x/sa/a"), domains("td")),
        "spiffe://other/ns/x/sa/a",
        "allow",
        id="either-list-allows",
    ),
    pytest.param(AllowList(), "spiffe://td/ns/x/sa/a", "deny", id="empty-denies"),
]


@pytest.mark.parametrize(("allow", "peer", "decision"), DECISIONS)
def test_decide(allow: AllowList, peer: str, decision: str) -> None:
    assert allow.decide(SpiffeId.parse(peer)) == decision


_LABEL = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=8)
_SEGMENT = st.text("abcdefghijklmnopqrstuvwxyzABC0123456789.-_", min_size=1, max_size=8).filter(
    lambda s: s not in {".", ".."}
)
_DOMAIN = st.lists(_LABEL, min_size=1, max_size=3).map(".".join)


def _id_in(domain: st.SearchStrategy[str]) -> st.SearchStrategy[SpiffeId]:
    return st.builds(
        lambda name, path: SpiffeId.parse(f"spiffe://{name}/" + "/".join(path)),
        domain,
        st.lists(_SEGMENT, min_size=1, max_size=4),
    )


_ID = _id_in(_DOMAIN)


@given(
    allowed=st.frozensets(_ID, max_size=4),
    tds=st.frozensets(_DOMAIN, max_size=3),
    data=st.data(),
)
def test_allowed_exactly_when_listed(
    allowed: frozenset[SpiffeId], tds: frozenset[str], data: st.DataObject
) -> None:
    # Draw the peer near the lists too, or a random ID would almost never be listed.
    near = [st.sampled_from(sorted(allowed, key=str))] if allowed else []
    near += [_id_in(st.sampled_from(sorted(tds)))] if tds else []
    peer = data.draw(st.one_of(_ID, *near))
    allow = AllowList(allowed, domains(*tds))
    listed = peer in allowed or str(peer.trust_domain) in tds
    assert allow.decide(peer) == ("allow" if listed else "deny")


@given(peer=_ID)
def test_an_empty_list_denies_everyone(peer: SpiffeId) -> None:
    assert AllowList().decide(peer) == "deny"
