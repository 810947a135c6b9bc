"""PolicySet.decide: every field and its `not` form, precedence, defaults, dry runs, audits."""

from __future__ import annotations

import itertools
import time
from dataclasses import replace
from urllib.parse import unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.httppath import BadPath, normalize_target, without_parameters
from agent.core.policy import (
    MAX_PLANS,
    Action,
    Condition,
    Decision,
    Field,
    Pattern,
    Policy,
    PolicySet,
    Record,
    Request,
    Rule,
)
from identity import SpiffeId, TrustDomain

TD = TrustDomain("example.org")
TRUSTED = frozenset({TD})
FRONTEND = SpiffeId.parse("spiffe://example.org/ns/shop/sa/frontend")
BACKEND = SpiffeId.parse("spiffe://example.org/ns/shop/sa/backend")
OTHER_NS = SpiffeId.parse("spiffe://example.org/ns/lab/sa/frontend")
FOREIGN = SpiffeId.parse("spiffe://partner.net/ns/shop/sa/frontend")
NOT_K8S = SpiffeId.parse("spiffe://example.org/ns/job/pod/nightly")  # no namespace

HTTP = Request(
    source=FRONTEND,
    port=8080,
    method="GET",
    path="/api/orders",
    host="api.example.org",
    headers={"x-role": ("reader",)},
)
TCP = Request(source=FRONTEND, port=8080)


def cond(key: str, *patterns: str | int) -> Condition:
    """cond("not_paths", "/admin*"); cond("when.x-role", "a") and cond("when.x-role.not", "a")."""
    texts = tuple(Pattern(str(p)) for p in patterns)
    if key.startswith("when."):
        header, _, negated = key.removeprefix("when.").partition(".")
        return Condition("headers", texts, negated == "not", header)
    field: Field = key.removeprefix("not_")  # type: ignore[assignment]
    return Condition(field, texts, key.startswith("not_"))


def policy(
    action: Action, *rules: tuple[Condition, ...], name: str = "p", dry_run: bool = False
) -> Policy:
    return Policy(
        name, action, tuple(Rule(f"r{i}", c) for i, c in enumerate(rules)), dry_run=dry_run
    )


def decide(
    *policies: Policy, request: Request = HTTP, default: str = "allow-authenticated"
) -> Decision:
    return PolicySet(policies, default).decide(request, TRUSTED)  # type: ignore[arg-type]


# -- every field, and its not form: (condition, a request it matches, one it does not) -----

FIELDS = [
    ("principals-exact", cond("principals", str(FRONTEND)), HTTP, replace(HTTP, source=BACKEND)),
    (
        "principals-prefix",
        cond("principals", "spiffe://example.org/ns/shop/*"),
        HTTP,
        replace(HTTP, source=OTHER_NS),
    ),
    ("principals-any", cond("principals", "*"), HTTP, replace(HTTP, source=None)),
    ("not_principals", cond("not_principals", str(BACKEND)), HTTP, replace(HTTP, source=BACKEND)),
    ("namespaces", cond("namespaces", "shop"), HTTP, replace(HTTP, source=OTHER_NS)),
    (
        "namespaces-not-k8s",
        cond("namespaces", "job"),
        replace(HTTP, source=SpiffeId.parse("spiffe://example.org/ns/job/sa/nightly")),
        replace(HTTP, source=NOT_K8S),
    ),
    ("not_namespaces", cond("not_namespaces", "lab"), HTTP, replace(HTTP, source=OTHER_NS)),
    (
        "not_namespaces-not-k8s",
        cond("not_namespaces", "lab"),
        replace(HTTP, source=NOT_K8S),
        replace(HTTP, source=OTHER_NS),
    ),
    ("trust_domains", cond("trust_domains", "example.org"), HTTP, replace(HTTP, source=FOREIGN)),
    (
        "not_trust_domains",
        cond("not_trust_domains", "partner.net"),
        HTTP,
        replace(HTTP, source=FOREIGN),
    ),
    ("ports", cond("ports", 8080, 8443), HTTP, replace(HTTP, port=9090)),
    ("ports-tcp", cond("ports", 8080), TCP, replace(TCP, port=9090)),
    ("not_ports", cond("not_ports", 9090), HTTP, replace(HTTP, port=9090)),
    ("methods", cond("methods", "GET", "HEAD"), HTTP, replace(HTTP, method="POST")),
    ("methods-case", cond("not_methods", "DELETE"), HTTP, replace(HTTP, method="delete")),
    ("not_methods", cond("not_methods", "POST"), HTTP, replace(HTTP, method="POST")),
    ("paths-exact", cond("paths", "/api/orders"), HTTP, replace(HTTP, path="/api/orders/1")),
    ("paths-prefix", cond("paths", "/api/*"), HTTP, replace(HTTP, path="/apiary")),
    ("paths-suffix", cond("paths", "*/orders"), HTTP, replace(HTTP, path="/api/orders.json")),
    ("paths-any", cond("paths", "*"), HTTP, TCP),
    ("not_paths", cond("not_paths", "/admin/*"), HTTP, replace(HTTP, path="/admin/users")),
    ("hosts-exact", cond("hosts", "api.example.org"), HTTP, replace(HTTP, host="example.org")),
    ("hosts-suffix", cond("hosts", "*.example.org"), HTTP, replace(HTTP, host="example.org")),
    ("hosts-missing", cond("hosts", "api.example.org"), HTTP, replace(HTTP, host=None)),
    (
        "not_hosts",
        cond("not_hosts", "admin.example.org"),
        HTTP,
        replace(HTTP, host="admin.example.org"),
    ),
    ("not_hosts-missing", cond("not_hosts", "x.org"), replace(HTTP, host=None), TCP),
    ("header-values", cond("when.x-role", "reader"), HTTP, replace(HTTP, headers={})),
    (
        "header-prefix",
        cond("when.x-role", "read*"),
        HTTP,
        replace(HTTP, headers={"x-role": ("admin",)}),
    ),
    ("header-any", cond("when.x-role", "*"), HTTP, replace(HTTP, headers={"x-other": ("reader",)})),
    (
        "header-not_values",
        cond("when.x-role.not", "admin"),
        HTTP,
        replace(HTTP, headers={"x-role": ("reader", "admin")}),
    ),
    ("header-not_values-missing", cond("when.x-role.not", "admin"), replace(HTTP, headers={}), TCP),
]


@pytest.mark.parametrize(
    ("condition", "matching", "other"), [pytest.param(*case[1:], id=case[0]) for case in FIELDS]
)
def test_each_field_allows_what_it_matches_and_nothing_else(
    condition: Condition, matching: Request, other: Request
) -> None:
    allow = policy("ALLOW", (condition,))
    assert decide(allow, request=matching, default="deny").rule == "r0"
    denied = decide(allow, request=other, default="deny")
    assert not denied.allowed
    # A rule that lists to.ports does not govern other ports: the default decides there.
    assert denied.rule == ("deny" if condition.key == "ports" else "no ALLOW rule matched")


SOURCE_KEYS = ["principals", "namespaces", "trust_domains"]
ANY_SOURCE = {"principals": "*", "namespaces": "shop", "trust_domains": "example.org"}


@pytest.mark.parametrize("key", SOURCE_KEYS + [f"not_{k}" for k in SOURCE_KEYS])
def test_plaintext_matches_a_negated_source_field_in_a_deny_or_audit_only(key: str) -> None:
    """Plaintext has no principal, namespace or trust domain: a positive `from` field
    never matches it, a negated one matches in a DENY (Istio's `notPrincipals: ["*"]`
    denies plaintext) and an AUDIT (which finds the plaintext callers before a port is
    made strict), and never lets it in through an ALLOW: fail closed both ways."""
    plaintext = replace(HTTP, source=None)
    condition = cond(key, ANY_SOURCE[key.removeprefix("not_")])
    negated = key.startswith("not_")
    assert not condition.matches(plaintext)
    assert condition.matches(plaintext, "DENY") == negated
    audited = decide(policy("AUDIT", (condition,)), request=plaintext).records
    assert [r.kind for r in audited] == (["audit"] if negated else [])
    assert not decide(policy("ALLOW", (condition,)), request=plaintext).allowed
    denied = decide(policy("DENY", (condition,)), request=plaintext)
    assert (denied.policy == "p", denied.allowed) == (negated, False)  # else: the default


HTTP_CONDITIONS = [
    cond("methods", "GET"),
    cond("not_methods", "POST"),
    cond("paths", "*"),
    cond("not_paths", "/admin/*"),
    cond("hosts", "api.example.org"),
    cond("not_hosts", "x.org"),
    cond("when.x-role", "*"),
    cond("when.x-role.not", "admin"),
]


@pytest.mark.parametrize("condition", HTTP_CONDITIONS, ids=lambda c: c.key)
def test_on_an_l4_connection_http_fields_fail_closed(condition: Condition) -> None:
    # HTTP/2 on an HTTP port is relayed at L4 on the client's ALPN word alone:
    # an ALLOW on paths must not let it in, and a DENY on paths must keep it out.
    assert not condition.matches(TCP)
    assert not decide(policy("ALLOW", (condition,)), request=TCP).allowed
    denied = decide(policy("DENY", (condition, cond("ports", 8080))), request=TCP)
    assert (denied.allowed, denied.policy) == (False, "p")
    assert f"{condition.key} cannot be checked on an L4 connection" in denied.reason
    assert decide(policy("DENY", (condition, cond("ports", 9090))), request=TCP).allowed
    trial = policy("DENY", (condition,), dry_run=True)
    assert decide(trial, request=TCP).records == (Record("dry_run_deny", "p", "r0"),)
    assert decide(policy("AUDIT", (condition,)), request=TCP).records == ()


@pytest.mark.parametrize(
    ("condition", "source"),
    [
        (cond("principals", "spiffe://td/ns/x/sa/a.b"), "spiffe://td/ns/x/sa/aXb"),
        (cond("principals", "spiffe://td/ns/x/sa/a.b"), "spiffe://td/ns/x/sa/a.bc"),
        (cond("principals", "spiffe://td/ns/x/sa/a.b"), "spiffe://td.evil/ns/x/sa/a.b"),
        (cond("principals", "spiffe://td/ns/x/*"), "spiffe://td.evil/ns/x/sa/a"),
        (cond("principals", "spiffe://td/ns/x/*"), "spiffe://td/ns/xy/sa/a"),
        (cond("trust_domains", "td"), "spiffe://td.evil/ns/x/sa/a"),
        (cond("trust_domains", "td"), "spiffe://evil.td/ns/x/sa/a"),
        (cond("trust_domains", "td"), "spiffe://tdx/ns/x/sa/a"),
        (cond("namespaces", "x"), "spiffe://td/ns/xy/sa/a"),
        (cond("namespaces", "x"), "spiffe://td/ns/y/sa/x"),
        (cond("namespaces", "x"), "spiffe://td/ns/x/sa/a/extra"),
    ],
)
def test_matching_is_literal(condition: Condition, source: str) -> None:
    assert not condition.matches(replace(HTTP, source=SpiffeId.parse(source)))


# -- how policies combine -------------------------------------------------------------------

GET_API = policy("ALLOW", (cond("methods", "GET"), cond("paths", "/api/*")), name="read-api")
NO_ORDERS = policy("DENY", (cond("paths", "/api/orders"),), name="no-orders")


@pytest.mark.parametrize("order", [(GET_API, NO_ORDERS), (NO_ORDERS, GET_API)])
def test_a_matching_deny_wins_over_a_matching_allow(order: tuple[Policy, Policy]) -> None:
    decision = decide(*order)
    assert (decision.allowed, decision.policy, decision.rule) == (False, "no-orders", "r0")
    assert "path '/api/orders' matches paths [/api/orders]" in decision.reason


def test_rules_are_ored_and_fields_in_a_rule_are_anded() -> None:
    either = policy("ALLOW", (cond("paths", "/other"),), (cond("paths", "/api/*"),))
    assert decide(either).rule == "r1"
    both = policy("ALLOW", (cond("principals", str(BACKEND)), cond("paths", "/api/*")))
    assert not decide(both).allowed  # the path matches, the principal does not
    values = policy("ALLOW", (cond("principals", str(BACKEND), str(FRONTEND)),))
    assert decide(values).allowed  # values in one field are ORed


@pytest.mark.parametrize(
    ("condition", "allowed"),
    [(cond("when.x-role", "admin"), False), (cond("when.x-role.not", "admin"), True)],
)
def test_a_reason_names_the_header_but_never_shows_its_values(
    condition: Condition, allowed: bool
) -> None:
    """The reason is the agent's denial line: a header may hold an API key or a cookie."""
    secret = replace(HTTP, headers={"x-role": ("t0ken-1, t0ken-2",)})
    decision = decide(policy("ALLOW", (condition,)), request=secret, default="deny")
    assert decision.allowed is allowed
    assert "header x-role (2 values, not shown)" in decision.reason
    assert "t0ken" not in decision.reason


def test_an_allow_policy_governs_only_the_ports_it_applies_to() -> None:
    on_8080 = policy("ALLOW", (cond("ports", 8080), cond("paths", "/health")))
    denied = decide(on_8080)
    assert (denied.allowed, denied.policy, denied.rule) == (
        False,
        "default",
        "no ALLOW rule matched",
    )
    assert "path '/api/orders' does not match paths [/health]" in denied.reason
    other_port = decide(on_8080, request=replace(HTTP, port=9090))
    assert (other_port.allowed, other_port.rule) == (True, "allow-authenticated")
    assert not decide(on_8080, request=replace(HTTP, port=9090), default="deny").allowed


def test_an_allow_without_rules_allows_nothing_on_every_port() -> None:
    # Istio's `spec: {}`: a namespace default-deny beside the ALLOWs that open it.
    deny_all = Policy("shop/default-deny", "ALLOW", ())
    for request in (HTTP, TCP, replace(HTTP, port=9090), replace(HTTP, source=None)):
        denied = decide(deny_all, request=request)
        assert (denied.allowed, denied.policy, denied.rule) == (
            False,
            "default",
            "no ALLOW rule matched",
        )
        assert "shop/default-deny: has no rules, so it allows nothing" in denied.reason
    get_api = policy("ALLOW", (cond("methods", "GET"), cond("paths", "/api/*")), name="get-api")
    assert decide(deny_all, get_api).allowed
    assert not decide(deny_all, get_api, request=replace(HTTP, method="POST")).allowed
    assert not decide(deny_all, get_api, request=TCP).allowed
    assert PolicySet((deny_all,)).http_only_errors(frozenset({8080})) == []


def test_a_dry_run_allow_without_rules_records_every_request_it_would_deny() -> None:
    trial = Policy("shop/default-deny", "ALLOW", (), dry_run=True)
    decision = decide(trial)
    assert decision.allowed
    assert decision.records == (
        Record("dry_run_deny", "shop/default-deny", "no ALLOW rule matched"),
    )


def test_policy_names_may_carry_a_namespace() -> None:
    assert Policy("shop/frontend-reads-api", "ALLOW", ()).name == "shop/frontend-reads-api"
    longest = "n" * 253 + "/" + "x" * 253
    assert Policy(longest, "DENY", (Rule("r"),)).name == longest
    with pytest.raises(ValueError, match="or NAMESPACE/NAME"):
        Policy("shop/a/b", "ALLOW", ())


def test_a_rule_without_from_matches_plaintext() -> None:
    # Documented: to require an authenticated caller, say `principals: ["*"]`.
    plaintext = replace(HTTP, source=None)
    assert decide(policy("ALLOW", (cond("paths", "/api/*"),)), request=plaintext).allowed
    assert decide(policy("ALLOW", ()), request=plaintext).allowed


@pytest.mark.parametrize(
    ("request_", "default", "allowed", "why"),
    [
        (HTTP, "allow-authenticated", True, "allows authenticated spiffe://example.org"),
        (TCP, "allow-authenticated", True, "allows authenticated"),
        (replace(HTTP, source=FOREIGN), "allow-authenticated", False, "not one of the allowed"),
        (replace(HTTP, source=None), "allow-authenticated", False, "unauthenticated"),
        (HTTP, "deny", False, "default_action deny denies"),
        (replace(HTTP, source=None), "deny", False, "default_action deny denies"),
    ],
)
def test_default_action(request_: Request, default: str, allowed: bool, why: str) -> None:
    decision = decide(request=request_, default=default)
    assert (decision.allowed, decision.policy, decision.rule) == (allowed, "default", default)
    assert why in decision.reason


def test_audit_records_and_never_changes_the_outcome() -> None:
    audit = policy("AUDIT", (cond("paths", "/api/*"),), name="watch")
    deny = policy("DENY", (cond("methods", "GET"),), name="no-get")
    assert decide(audit).records == (Record("audit", "watch", "r0"),)
    assert decide(audit).allowed
    assert not decide(audit, deny).allowed
    assert decide(audit, deny).records == (Record("audit", "watch", "r0"),)
    assert decide(audit, request=replace(HTTP, path="/other")).records == ()


def test_a_dry_run_deny_records_what_it_would_deny() -> None:
    trial = policy("DENY", (cond("paths", "/api/*"),), name="trial", dry_run=True)
    decision = decide(trial)
    assert (decision.allowed, decision.rule) == (True, "allow-authenticated")
    assert decision.records == (Record("dry_run_deny", "trial", "r0"),)
    assert decide(trial, request=replace(HTTP, path="/x")).records == ()


def test_a_dry_run_allow_records_both_outcomes_where_it_applies() -> None:
    trial = policy("ALLOW", (cond("ports", 8080), cond("methods", "GET")), name="t", dry_run=True)
    matched = decide(trial)
    assert (matched.allowed, matched.rule) == (True, "allow-authenticated")
    assert matched.records == (Record("dry_run_allow", "t", "r0"),)
    missed = decide(trial, request=replace(HTTP, method="POST"))
    assert missed.allowed  # not enforced: the default decides
    assert missed.records == (Record("dry_run_deny", "t", "no ALLOW rule matched"),)
    assert decide(trial, request=replace(HTTP, port=9090)).records == ()
    # An enforced deny does not hide what the dry run would have done.
    assert decide(trial, default="deny").records == (Record("dry_run_allow", "t", "r0"),)


# -- path parameters: `/admin;x/users` is `/admin/users` to a Java app ----------------------

NO_ADMIN = policy("DENY", (cond("paths", "/admin/*"),), name="no-admin")


@pytest.mark.parametrize(
    ("deny", "path"),
    [
        (cond("paths", "/admin/*"), "/admin;x/users"),
        (cond("paths", "/admin/*"), "/;x/admin/users"),
        (cond("paths", "/secret"), "/secret;"),
        (cond("paths", "*.php"), "/index.php;x"),
        (cond("paths", "/admin"), "/admin;jsessionid=1"),
    ],
)
def test_a_deny_matching_the_path_without_parameters_denies(deny: Condition, path: str) -> None:
    normalized, _ = normalize_target(path)
    decision = decide(policy("DENY", (deny,), name="d"), request=replace(HTTP, path=normalized))
    assert (decision.allowed, decision.policy, decision.rule) == (False, "d", "r0")
    stripped = without_parameters(normalized)
    assert f"without its ';' parameters ({stripped!r}" in decision.reason


def test_a_deny_matching_the_path_as_sent_denies_and_says_so() -> None:
    deny = policy("DENY", (cond("paths", "/admin;*"),), name="d")
    decision = decide(deny, NO_ADMIN, request=replace(HTTP, path="/admin;x/users"))
    assert (decision.allowed, decision.policy) == (False, "d")  # as sent decides first
    assert decision.reason.startswith("the path as sent is denied: DENY policy 'd'")
    assert ";x" not in decision.reason.partition(":")[0]  # the parameters are not repeated


def test_an_allow_must_allow_both_forms() -> None:
    app = policy("ALLOW", (cond("paths", "/app/*"),), name="app")
    session = decide(app, NO_ADMIN, request=replace(HTTP, path="/app/page;jsessionid=abc"))
    assert (session.allowed, session.policy, session.rule) == (True, "app", "r0")
    assert session.reason.startswith(
        "the path is allowed as sent and without its ';' parameters ('/app/page', as Java"
        " servlet containers route it): ALLOW policy 'app'"
    )
    pages = policy("ALLOW", (cond("paths", "*.html"),), name="pages")
    sneaky = decide(pages, request=replace(HTTP, path="/admin;x.html"))  # routed as /admin
    assert (sneaky.allowed, sneaky.rule) == (False, "no ALLOW rule matched")
    assert "without its ';' parameters ('/admin'" in sneaky.reason


def test_a_deny_policy_names_the_denial_whichever_form_it_matched() -> None:
    """As in one evaluation, where DENY comes first: the metrics and the log line name
    `no-admin`, not the ALLOW that the path as sent missed."""
    app = policy("ALLOW", (cond("paths", "/app/*", "/admin/*"),), name="app")
    decision = decide(app, NO_ADMIN, request=replace(HTTP, path="/admin;x/users"))
    assert (decision.allowed, decision.policy, decision.rule) == (False, "no-admin", "r0")
    assert decision.reason.startswith("the path without its ';' parameters ('/admin/users'")


def test_paths_with_parameters_leave_other_decisions_alone() -> None:
    assert decide(NO_ADMIN, request=replace(HTTP, path="/api;v=2/orders")).allowed
    assert decide(NO_ADMIN, request=replace(HTTP, path="/api/orders%3B/admin/x")).allowed
    assert not decide(NO_ADMIN, request=replace(HTTP, path="/admin/x")).allowed
    assert not decide(NO_ADMIN, request=TCP).allowed  # L4 fails closed, as before


def test_dry_runs_and_audits_record_what_either_form_would_do() -> None:
    trial = replace(NO_ADMIN, name="trial", dry_run=True)
    watch = policy("AUDIT", (cond("paths", "/admin/*"),), name="watch")
    pages = policy("ALLOW", (cond("paths", "*.html"),), name="pages", dry_run=True)
    hidden = decide(trial, watch, pages, request=replace(HTTP, path="/admin;x/a.html"))
    assert hidden.allowed  # nothing enforced
    assert hidden.records == (
        Record("dry_run_deny", "trial", "r0"),
        Record("audit", "watch", "r0"),
        Record("dry_run_allow", "pages", "r0"),
    )
    sneaky = decide(pages, request=replace(HTTP, path="/admin;x.html"))
    assert sneaky.records == (Record("dry_run_deny", "pages", "no ALLOW rule matched"),)


def test_http_only_errors_name_rules_that_could_never_match_on_a_tcp_port() -> None:
    everywhere = Policy(
        "web", "ALLOW", (Rule("paths", (cond("paths", "/api/*"),)), Rule("any", ())), source="f:1:1"
    )
    on_http = Policy("http", "DENY", (Rule("r", (cond("ports", 8080), cond("methods", "PUT"))),))
    errors = PolicySet((everywhere, on_http)).http_only_errors(frozenset({5432, 8080}))
    assert len(errors) == 2
    assert errors[0].startswith("f:1:1: policy 'web' rule 'paths' uses paths")
    assert "TCP port 5432, 8080" in errors[0]
    assert "policy 'http' rule 'r' uses methods but applies to TCP port 8080" in errors[1]
    assert len(PolicySet((everywhere, on_http)).http_only_errors(frozenset({5432}))) == 1
    assert PolicySet((on_http,)).http_only_errors(frozenset()) == []


@pytest.mark.parametrize(
    "make",
    [
        lambda: Condition("paths", (Pattern("/a/../b"),)),
        lambda: Condition("paths", ()),
        lambda: Condition("hosts", (Pattern("API.example.org"),)),
        lambda: Condition("principals", (Pattern("spiffe://td*"),)),
        lambda: Condition("headers", (Pattern("x"),), header="X-Role"),
        lambda: Policy("p", "AUDIT", (Rule("r"),), dry_run=True),
        lambda: Policy("default", "ALLOW", (Rule("r"),)),
        lambda: Policy("p", "DENY", ()),
        lambda: Policy("p", "AUDIT", ()),
        lambda: Policy("a/b/c", "ALLOW", ()),
        lambda: Policy("/b", "ALLOW", ()),
        lambda: Policy("shop/" + "x" * 254, "ALLOW", ()),
        lambda: Policy("p", "ALLOW", (Rule("r"), Rule("r"))),
        lambda: PolicySet((Policy("p", "ALLOW", (Rule("r"),)),) * 2),
        lambda: Request(FRONTEND, 80, "GET", "/", headers={"X-Role": ("a",)}),
    ],
)
def test_invalid_values_are_refused_at_construction(make: object) -> None:
    with pytest.raises(ValueError):
        make()  # type: ignore[operator]


# -- properties ---------------------------------------------------------------------------

_IDS = [FRONTEND, BACKEND, OTHER_NS, FOREIGN, NOT_K8S]
_VOCABULARY: dict[Field, list[str]] = {
    "principals": [str(FRONTEND), str(BACKEND), "spiffe://example.org/ns/shop/*", "*"],
    "namespaces": ["shop", "lab"],
    "trust_domains": ["example.org", "partner.net"],
    "ports": ["8080", "9090"],
    "methods": ["GET", "POST", "DELETE"],
    "paths": ["/api/*", "/admin", "/admin/*", "*.json", "*"],
    "hosts": ["api.example.org", "*.example.org"],
    "headers": ["reader", "admin", "adm*", "*"],
}


@st.composite
def _conditions(draw: st.DrawFn, fields: tuple[Field, ...] = tuple(_VOCABULARY)) -> Condition:
    field = draw(st.sampled_from(fields))
    texts = draw(st.lists(st.sampled_from(_VOCABULARY[field]), min_size=1, max_size=2))
    header = "x-role" if field == "headers" else ""
    return Condition(field, tuple(map(Pattern, texts)), draw(st.booleans()), header)


_RULES = st.lists(_conditions(), max_size=3).map(tuple)


@st.composite
def _policies(
    draw: st.DrawFn,
    action: Action | None = None,
    conditions: st.SearchStrategy[tuple[Condition, ...]] = _RULES,
) -> Policy:
    rules = draw(st.lists(conditions, min_size=1, max_size=3))
    chosen = action or draw(st.sampled_from(["ALLOW", "DENY", "AUDIT"]))
    dry_run = chosen != "AUDIT" and draw(st.booleans())
    return policy(chosen, *rules, name=f"p{draw(st.integers(0, 10**6))}", dry_run=dry_run)


def _unique(policies: list[Policy]) -> tuple[Policy, ...]:
    return tuple(replace(p, name=f"{p.name}-{i}") for i, p in enumerate(policies))


_SETS = st.builds(
    lambda policies, default: PolicySet(_unique(policies), default),
    st.lists(_policies(), max_size=4),
    st.sampled_from(["allow-authenticated", "deny"]),
)
_HEADER_VALUES = st.lists(st.sampled_from(["reader", "admin", "adminx", " guest "]), max_size=3)


# Paths with parameters, which Java apps strip before routing: each differs from its routed form.
_WITH_PARAMETERS = [
    "/admin;x/y",
    "/admin;jsessionid=1",
    "/api;v=1/a.json",
    "/;x/admin",
    "/o;x.json",
]
_PATHS = ["/api/a.json", "/admin", "/admin/x", "/", "/other", *_WITH_PARAMETERS]


@st.composite
def _requests(draw: st.DrawFn, paths: list[str] = _PATHS) -> Request:
    source = draw(st.sampled_from([*_IDS, None]))
    port = draw(st.sampled_from([8080, 9090]))
    # Methods as h2 peers may send them too: upper-cased before matching (a plan's
    # compiled method test must do the same).
    method = draw(st.sampled_from([None, "GET", "POST", "get", "Delete", "PROPFIND"]))
    if method is None:
        return Request(source, port)
    path = draw(st.sampled_from(paths))
    host = draw(st.sampled_from([None, "api.example.org", "example.org"]))
    values = draw(_HEADER_VALUES)
    return Request(source, port, method, path, host, {"x-role": tuple(values)} if values else {})


# An ALLOW without rules (default-deny) as well: it governs every port.
_ANY_SETS = st.builds(
    lambda policies, default: PolicySet(_unique(policies), default),
    st.lists(
        st.one_of(
            _policies(),
            st.builds(lambda dry: Policy("deny-all", "ALLOW", (), dry_run=dry), st.booleans()),
        ),
        max_size=4,
    ),
    st.sampled_from(["allow-authenticated", "deny"]),
)

# Policies on paths alone: where a path with parameters and the path an app routes differ.
_PATH_SETS = st.builds(
    lambda policies, default: PolicySet(_unique(policies), default),
    st.lists(
        _policies(conditions=st.lists(_conditions(("paths",)), max_size=2).map(tuple)),
        max_size=4,
    ),
    st.sampled_from(["allow-authenticated", "deny"]),
)


@settings(max_examples=300)
@given(
    st.one_of(_ANY_SETS, _PATH_SETS),
    st.lists(_requests(), min_size=1, max_size=6),
    st.sampled_from([frozenset(), TRUSTED, frozenset({TD, TrustDomain("partner.net")})]),
)
def test_the_fast_path_decides_as_the_full_evaluation(
    policies: PolicySet, requests: list[Request], trusted: frozenset[TrustDomain]
) -> None:
    """decide (by the remembered plan of each caller and port) and explain (every rule)
    agree on the outcome, the deciding policy and rule, the records and the reason;
    twice each, so that repeated callers and ports take the remembered plan."""
    for request in requests * 2:
        fast, full = policies.decide(request, trusted), policies.explain(request, trusted)
        assert (fast.allowed, fast.policy, fast.rule, fast.records) == (
            full.allowed,
            full.policy,
            full.rule,
            full.records,
        )
        assert fast.reason == full.reason


@settings(max_examples=300)
@given(
    st.one_of(_ANY_SETS, _PATH_SETS),
    st.one_of(_requests(), _requests(_WITH_PARAMETERS)).filter(lambda r: r.method is not None),
)
def test_parameters_only_ever_deny_what_the_path_as_sent_allows(
    policies: PolicySet, request: Request
) -> None:
    """Strictly more restrictive than matching the path as sent alone (what the agent did
    before): allowed means allowed as sent and without parameters; nothing else changes."""
    decision = policies.decide(request, TRUSTED)
    as_sent = policies.decide(request, TRUSTED, True)  # the path as sent alone
    if request.path is None or ";" not in request.path:
        assert decision == as_sent
        return
    routed = policies.decide(replace(request, path=without_parameters(request.path)), TRUSTED)
    assert decision.allowed == (as_sent.allowed and routed.allowed)


def _servlet_route(path: str) -> str | None:
    """The path a servlet container (Tomcat, as its CoyoteAdapter does) routes, modelled on
    its own, not with httppath: each segment's raw `;...` removed, then percent-decoded,
    then dot segments removed and `//` merged; None where it refuses an encoded `/`."""
    stripped = "/".join(segment.partition(";")[0] for segment in path.split("/"))
    if "%2f" in stripped.lower() or "%5c" in stripped.lower():
        return None
    decoded = unquote(stripped)
    kept: list[str] = []
    for segment in decoded[1:].split("/"):
        if segment == "..":
            if kept:
                kept.pop()
        elif segment not in (".", ""):
            kept.append(segment)
    trailing = kept and decoded.rsplit("/", 1)[-1] in ("", ".", "..")
    return "/" + "/".join(kept) + ("/" if trailing else "")


_ROUTED_SETS = st.sampled_from(
    [
        PolicySet((policy("DENY", (cond("paths", "/admin/*"),)),)),
        PolicySet((policy("DENY", (cond("paths", "*.jsp"),)),)),
        PolicySet((policy("DENY", (cond("not_paths", "/public*"),)),)),
        PolicySet((policy("ALLOW", (cond("paths", "/public/*"),)),), "deny"),
        PolicySet((policy("ALLOW", (cond("paths", "*.php"),)),), "deny"),
        PolicySet((policy("ALLOW", (cond("not_paths", "/admin*"),)),), "deny"),
        PolicySet((policy("ALLOW", (cond("paths", "/public/x"),)),), "deny"),
    ]
)
_ROUTED_ATOMS = [
    "/",
    ";",
    "=1",
    "admin",
    "%61dmin",
    "public",
    "x",
    "x.php",
    "x.jsp",
    ".",
    "..",
    "%2e",
    "%3b",
    "%2f",
]


@settings(max_examples=500)
@given(_ROUTED_SETS, st.lists(st.sampled_from(_ROUTED_ATOMS), max_size=8))
def test_what_the_path_a_servlet_container_routes_is_denied_the_agent_denies(
    policies: PolicySet, atoms: list[str]
) -> None:
    """The property THREATS asks, against an independent model of the app: the decision on
    the path as the agent forwards it is never more permissive than on the path a Java app
    routes it to (a `%3B` decodes to a `;` that is data, so that route is left out)."""
    try:
        forwarded, _ = normalize_target("/" + "".join(atoms))
    except BadPath:
        return  # a 400: the app never sees it
    routed = _servlet_route(forwarded)
    if routed is None or ";" in routed:
        return
    request = replace(HTTP, path=forwarded)
    if not policies.decide(replace(request, path=routed), TRUSTED).allowed:
        assert not policies.decide(request, TRUSTED).allowed


def test_an_allowed_request_is_put_into_words_only_when_asked() -> None:
    allowed = decide(policy("ALLOW", (cond("paths", "/api/*"),)))
    assert allowed.allowed and not isinstance(allowed.explanation, str)
    why = "ALLOW policy 'p' rule 'r0' matched: path '/api/orders' matches paths [/api/*]"
    assert allowed.reason == why
    assert allowed.explanation == allowed.reason  # worded once


def test_plans_are_remembered_for_a_bounded_number_of_callers_and_ports() -> None:
    """A caller per port, more than are remembered: every decision is still right."""
    policies = PolicySet((policy("ALLOW", (cond("ports", 8080), cond("paths", "/api/*"))),))
    for port in [8080, *range(1000, 1000 + MAX_PLANS + 10), 8080]:
        other = policies.decide(replace(HTTP, port=port, path="/other"), TRUSTED)
        assert other.allowed == (port != 8080)  # the ALLOW governs port 8080 only
    assert policies.decide(replace(HTTP, port=8080, path="/api/x"), TRUSTED).allowed
    assert len(policies._plans) == len(policies._seen) == MAX_PLANS
    fresh = replace(policies)  # a new set (a reload) plans afresh
    assert fresh._plans == {} and fresh._seen == {}


def test_a_plan_found_by_the_callers_object_is_the_one_its_id_would_find() -> None:
    """Plans are found by the caller's object first (a connection's requests share it);
    an equal ID parsed again, or another caller, is decided by its own plan."""
    policies = PolicySet((policy("ALLOW", (cond("principals", str(FRONTEND)),)),))
    again = SpiffeId.parse(str(FRONTEND))
    for source, allowed in [(FRONTEND, True), (again, True), (OTHER_NS, False)] * 2:
        assert policies.decide(replace(HTTP, source=source), TRUSTED).allowed is allowed
    assert all(key[0] == id(caller) for key, (caller, _) in policies._seen.items())
    assert len(policies._seen) == 3 and len(policies._plans) == 2


def test_a_caller_whose_object_is_gone_never_borrows_the_plan_of_its_memory() -> None:
    """A plan is found by the caller's object: a connection's ID, parsed by its handshake,
    freed when it closes, and the next connection's, of another caller, may be made at the
    same address. More callers and ports than are remembered, each a new object: every
    decision is the caller's own."""
    policies = PolicySet((policy("ALLOW", (cond("principals", str(FRONTEND)),)),))
    addresses = set()
    for n in range(3 * MAX_PLANS):
        caller = SpiffeId.parse(str((FRONTEND, OTHER_NS)[n % 2]))
        addresses.add(id(caller))
        request = replace(HTTP, source=caller, port=1000 + n % (MAX_PLANS + 7))
        assert policies.decide(request, TRUSTED).allowed is (n % 2 == 0), n
        del caller, request
    assert len(addresses) < 3 * MAX_PLANS  # memory was reused: the case is made
    assert len(policies._seen) == MAX_PLANS


@settings(max_examples=300)
@given(
    st.one_of(_ANY_SETS, _PATH_SETS),
    st.lists(st.tuples(_requests(), st.booleans()), min_size=1, max_size=6),
)
def test_the_fast_path_decides_as_the_full_evaluation_for_a_caller_parsed_again(
    policies: PolicySet, requests: list[tuple[Request, bool]]
) -> None:
    """Each caller's ID, the one object or parsed again (a new connection's handshake):
    equal, not identical, it is decided as the full evaluation decides it."""
    for request, again in requests * 2:
        if again and request.source is not None:
            request = replace(request, source=SpiffeId.parse(str(request.source)))
        fast, full = policies.decide(request, TRUSTED), policies.explain(request, TRUSTED)
        assert (fast.allowed, fast.policy, fast.rule, fast.records) == (
            full.allowed,
            full.policy,
            full.rule,
            full.records,
        )


@settings(max_examples=300)
@given(_SETS, _policies("DENY"), _requests())
def test_adding_a_deny_policy_never_allows_what_was_denied(
    policies: PolicySet, deny: Policy, request: Request
) -> None:
    before = policies.decide(request, TRUSTED)
    after = replace(policies, policies=_unique([*policies.policies, deny])).decide(request, TRUSTED)
    assert before.allowed or not after.allowed


@settings(max_examples=300)
@given(_SETS, _RULES, _requests())
def test_adding_a_deny_rule_to_a_policy_never_allows_what_was_denied(
    policies: PolicySet, conditions: tuple[Condition, ...], request: Request
) -> None:
    denies = [p for p in policies.policies if p.action == "DENY"]
    if not denies:
        return
    target = denies[0]
    grown = replace(target, rules=(*target.rules, Rule("extra", conditions)))
    after = replace(
        policies, policies=tuple(grown if p is target else p for p in policies.policies)
    )
    assert policies.decide(request, TRUSTED).allowed or not after.decide(request, TRUSTED).allowed


@settings(max_examples=200)
@given(_conditions(), _requests())
def test_plaintext_matches_a_source_condition_only_negated_in_a_deny(
    condition: Condition, request: Request
) -> None:
    plaintext = replace(request, source=None)
    if condition.field in ("principals", "namespaces", "trust_domains"):
        assert not condition.matches(plaintext)
        assert condition.matches(plaintext, "DENY") == condition.negated


@settings(max_examples=200)
@given(
    _SETS,
    _requests(),
    st.lists(st.sampled_from(["reader", "admin", "adminx"]), max_size=4),
    st.data(),
)
def test_repeated_headers_however_split_are_allowed_only_if_each_value_is(
    policies: PolicySet, request: Request, values: list[str], data: st.DataObject
) -> None:
    """Lines or items, the app may read any one value: the request passes only if each
    would alone. (But for the documented limit: a prefix or suffix pattern in an ALLOW's
    values or a DENY's not_values reads whole lines, for a User-Agent's sake.)"""
    if request.method is None or not values or _reads_lines_only(policies):
        return
    # Cut the same values into field lines at random points, joined by "," or ", ".
    cuts = sorted(data.draw(st.sets(st.integers(1, len(values) - 1))) if len(values) > 1 else [])
    bounds = [0, *cuts, len(values)]
    joiner = data.draw(st.sampled_from([",", ", ", " ,"]))
    lines = tuple(joiner.join(values[a:b]) for a, b in itertools.pairwise(bounds))
    split = policies.decide(replace(request, headers={"x-role": lines}), TRUSTED)
    if split.allowed:
        for value in values:
            assert policies.decide(replace(request, headers={"x-role": (value,)}), TRUSTED).allowed


def _reads_lines_only(policies: PolicySet) -> bool:
    """Whether a header condition has a prefix or suffix pattern read on whole lines only."""
    return any(
        condition.field == "headers"
        and condition.negated == (policy.action != "ALLOW")
        and any(p.text != "*" and "*" in p.text for p in condition.patterns)
        for policy in policies.policies
        for rule in policy.rules
        for condition in rule.conditions
    )


@pytest.mark.parametrize(
    ("action", "condition", "lines", "matches"),
    [
        # A DENY: one value the condition holds for is enough.
        ("DENY", cond("when.x-tenant.not", "acme"), ("globex", "acme"), True),
        ("DENY", cond("when.x-tenant.not", "acme"), ("globex, acme",), True),
        ("DENY", cond("when.x-tenant.not", "acme"), ("acme", "acme"), False),
        ("DENY", cond("when.x-role", "admin"), ("reader", "admin"), True),
        # An ALLOW: it must hold for every value.
        ("ALLOW", cond("when.x-tenant", "acme"), ("globex", "acme"), False),
        ("ALLOW", cond("when.x-tenant", "acme"), ("acme, globex",), False),
        ("ALLOW", cond("when.x-tenant", "acme"), ("acme", "acme"), True),
        ("ALLOW", cond("when.x-role.not", "admin"), ("reader", "admin"), False),
        ("ALLOW", cond("when.x-role.not", "admin"), ("reader", "writer"), True),
    ],
)
def test_a_header_with_several_values_fails_closed(
    action: str, condition: Condition, lines: tuple[str, ...], matches: bool
) -> None:
    """The app may read any one of them (the first line, the last, all joined)."""
    request = replace(HTTP, headers={condition.header: lines})
    decided = decide(policy(action, (condition,)), request=request, default="deny")
    assert (decided.policy == "p") == matches
    assert decided.allowed == (action == "ALLOW" and matches)
    if action == "ALLOW" or matches:  # the reason names the header, never its values
        why = PolicySet((policy(action, (condition,)),), "deny").explain(request, TRUSTED).reason
        assert "(2 values, not shown)" in why and "hold" in why, why


BROWSER = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0"


@pytest.mark.parametrize(
    ("action", "condition", "lines", "matches"),
    [
        # A line's commas need not be a list: an ALLOW reads each line whole.
        ("ALLOW", cond("when.user-agent", "Mozilla/*"), (BROWSER,), True),
        ("DENY", cond("when.user-agent.not", "Mozilla/*"), (BROWSER,), False),
        ("ALLOW", cond("when.accept", "application/json"), ("application/json, text/*",), False),
        # An AUDIT rule records what a DENY would deny: any reading.
        ("AUDIT", cond("when.x-role", "admin"), ("admin", "viewer"), True),
        ("AUDIT", cond("when.x-role", "admin"), ("viewer, admin",), True),
        ("AUDIT", cond("when.x-role.not", "viewer"), ("viewer, admin",), True),
        # Python's str.strip (wsgiref's) takes U+00A0 and U+0085 off too: both are read.
        ("DENY", cond("when.x-role", "admin"), ("admin\xa0",), True),
        ("DENY", cond("when.x-role", "admin"), ("\x85admin",), True),
        ("ALLOW", cond("when.x-level.not", "root"), ("root\xa0",), False),
        ("ALLOW", cond("when.x-role", "admin"), ("admin\xa0",), False),
        ("ALLOW", cond("when.x-role", "admin"), ("admin",), True),
    ],
)
def test_a_header_line_is_read_whole_and_as_its_items_as_each_action_needs(
    action: Action, condition: Condition, lines: tuple[str, ...], matches: bool
) -> None:
    request = replace(HTTP, headers={condition.header: lines})
    assert condition.matches(request, action) == matches
    decided = decide(policy(action, (condition,)), request=request)
    if action == "AUDIT":
        assert [r.kind for r in decided.records] == (["audit"] if matches else [])


@settings(max_examples=300)
@given(_SETS, _requests(), st.lists(st.sampled_from(["reader", "admin", "adminx"]), min_size=2))
def test_several_values_are_allowed_only_if_each_alone_would_be(
    policies: PolicySet, request: Request, values: list[str]
) -> None:
    if request.method is None:
        return
    together = policies.decide(replace(request, headers={"x-role": tuple(values)}), TRUSTED)
    alone = [policies.decide(replace(request, headers={"x-role": (v,)}), TRUSTED) for v in values]
    if together.allowed:
        assert all(decision.allowed for decision in alone)


_GUARDED = PolicySet(
    (
        policy("DENY", (cond("paths", "/admin", "/admin/*"),), name="no-admin"),
        policy("DENY", (cond("paths", "*.bak"),), name="no-backups"),
        policy("ALLOW", (cond("paths", "/api/*"),), (cond("paths", "/"),), name="api"),
    )
)
_RAW_SEGMENTS = st.sampled_from(
    ["admin", "%61dmin", "api", "%61pi", ".", "%2e", "..", "%2E%2e", ".%2e", "x.bak", "x%2ebak"]
)


@settings(max_examples=300)
@given(st.lists(st.tuples(st.sampled_from(["/", "//", "\\", "/./"]), _RAW_SEGMENTS), max_size=5))
def test_the_decision_on_a_raw_path_is_the_decision_on_what_the_app_receives(
    parts: list[tuple[str, str]],
) -> None:
    raw = "/" + "".join(sep + seg for sep, seg in parts)
    path, _ = normalize_target(raw)
    # The app receives `path`; if it normalizes again it gets the same path and decision.
    again, _ = normalize_target(path)
    on_raw = _GUARDED.decide(replace(HTTP, path=path), TRUSTED)
    assert on_raw == _GUARDED.decide(replace(HTTP, path=again), TRUSTED)
    # And it is the decision on the plainly written path the spellings stand for.
    plain = raw.replace("\\", "/").replace("%61", "a").replace("%2e", ".").replace("%2E", ".")
    assert on_raw.allowed == _GUARDED.decide(replace(HTTP, path=_resolve(plain)), TRUSTED).allowed


def _resolve(path: str) -> str:
    """Dot segments and empty segments resolved the way a filesystem would."""
    stack: list[str] = []
    segments = path.split("/")
    for segment in segments:
        if segment == "..":
            stack = stack[:-1]
        elif segment not in ("", "."):
            stack.append(segment)
    return "/" + "/".join(stack) + ("/" if stack and segments[-1] in ("", ".", "..") else "")


@given(
    st.lists(st.lists(st.integers(1, 30), min_size=1, max_size=4), max_size=3),
    st.lists(st.integers(1, 30), max_size=4),
    st.frozensets(st.integers(1, 30), max_size=10),
)
def test_ports_among_is_applies_to_port_of_each(
    listed: list[list[int]], negated: list[int], ports: frozenset[int]
) -> None:
    conditions = [Condition("ports", tuple(Pattern(str(p)) for p in group)) for group in listed]
    if negated:
        conditions.append(Condition("ports", tuple(Pattern(str(p)) for p in negated), True))
    rule = Rule("r", tuple(conditions))
    assert rule.ports_among(ports) == {p for p in ports if rule.applies_to_port(p)}


def test_http_only_errors_cost_the_rules_not_rules_times_ports() -> None:
    """A snapshot may carry 1,000 TCP ports and tens of thousands of rules: every rule was
    checked against every port (60,000 x 1,000 took 17 s of the agent's CPU)."""
    l4 = [Rule(f"l4-{i}", (cond("namespaces", f"ns-{i}"),)) for i in range(20_000)]
    l7 = [Rule(f"l7-{i}", (cond("ports", 1), cond("paths", f"/{i}"))) for i in range(20_000)]
    policies = PolicySet((Policy("l4", "ALLOW", tuple(l4)), Policy("l7", "ALLOW", tuple(l7))))
    tcp_ports = frozenset(range(20_000, 21_000))
    started = time.process_time()  # CPU, not wall clock: a loaded machine doesn't fail it
    assert policies.http_only_errors(tcp_ports) == []
    assert time.process_time() - started < 3  # rules x ports took 17 s; rules alone ~0.05
