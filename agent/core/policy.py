"""Who may call this workload, and how: the agent's one authorization engine.

The inbound listener asks about each mTLS connection (L4: source and port),
the HTTP adapter about each request (L7: also method, path, host, headers).
Both ask `PolicySet.decide`, a pure function of frozen values, so a policy
means the same thing on either layer and a table test covers both.

Policies are read from YAML (docs/policy.md) by agent.core.policyfile, in one
pass that reports every error as `FILE:LINE:COLUMN: key.path: problem`.

`decide` runs per request, so it takes a fast path: per (caller, port) the set
remembers which rules can apply there at all (their `from` and `to.ports`
conditions hold), and checks only their other conditions; and a decision's
`reason` is put into words only when something reads it (a denial's log line,
`outrider policy check`). `explain` is the full evaluation, the reference the
fast path is tested against, and what writes every reason.

A path with `;` parameters is matched twice, as sent and as Java servlet
containers route it (`/admin;x/users` as `/admin/users`), and allowed only if
both are (`PolicySet._both_forms`): the app receives it as sent, but may route
it without them.

Matching is literal: a value matches a pattern that is the same string, or
has one leading or trailing `*`. No regex, no glob: `a.b` never matches `aXb`
and trust domain `td` never matches `td.evil`.

What a request cannot answer fails closed. A source that is not
authenticated (None, plaintext) has no principal, namespace or trust domain:
its positive `from` conditions never match, and its negated ones
(`not_principals: ["*"]`, Istio's usual "deny plaintext") match in a DENY or
AUDIT rule only (an AUDIT records what a DENY would deny). An L4 request
(method None) has no method, path, host or headers to check: its HTTP
conditions, positive or negated, match in a DENY rule only. On a TCP port
such a policy is refused at load (`http_only_errors`); the case that remains
is HTTP/2 relayed at L4 on an HTTP port, where a client's ALPN claim must not
slip past a DENY on paths.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property, partial
from typing import Literal, get_args

from agent.core.httppath import BadPath, normalize_host, normalize_target, without_parameters
from identity import SpiffeId, TrustDomain

__all__ = [
    "Action",
    "Condition",
    "Decision",
    "DefaultAction",
    "Explanation",
    "Field",
    "Pattern",
    "Policy",
    "PolicySet",
    "Record",
    "Request",
    "Rule",
]

Action = Literal["ALLOW", "DENY", "AUDIT"]
DefaultAction = Literal["allow-authenticated", "deny"]
Field = Literal[
    "principals", "namespaces", "trust_domains", "ports", "methods", "paths", "hosts", "headers"
]
SOURCE_FIELDS: tuple[Field, ...] = ("principals", "namespaces", "trust_domains")
DESTINATION_FIELDS: tuple[Field, ...] = ("ports", "methods", "paths", "hosts")
HTTP_FIELDS = frozenset({"methods", "paths", "hosts", "headers"})
NO_ALLOW_MATCHED = "no ALLOW rule matched"
DEFAULT_POLICY = "default"
#: A reason as logged (Explanation) is cut here: it quotes the path, up to 60 KB, once per
#: rule that missed, and a log pipeline splits or drops long lines.
MAX_REASON = 4096

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
# `<namespace>/<name>`: what the control plane names an AuthorizationPolicy; each
# part as long as a Kubernetes DNS subdomain may be.
_QUALIFIED_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}/[A-Za-z0-9][A-Za-z0-9._-]{0,252}")
_METHOD = re.compile(r"[A-Z]+")
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DEFAULT_RULE_NAME = re.compile(r"rules\[[0-9]+\]")
_HOST = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*|\[[0-9a-f:.]+\]")
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")


# -- the request and the answer -------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """What the engine knows about one connection (L4) or request (L7)."""

    source: SpiffeId | None  # None: not authenticated
    port: int  # the app port of the inbound listener
    method: str | None = None  # None at L4 (TCP, or HTTP/2 passed through)
    path: str | None = None  # already normalized (httppath.normalize_target)
    host: str | None = None  # already normalized (httppath.normalize_host)
    # lower-case name -> every field value as received, in order
    headers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def __init__(
        self,
        source: SpiffeId | None,
        port: int,
        method: str | None = None,
        path: str | None = None,
        host: str | None = None,
        headers: Mapping[str, tuple[str, ...]] | None = None,
    ) -> None:
        # Written out (as the dataclass writes it): compiled, this is native code, where
        # the one dataclasses generates stays interpreted, and one is made per request.
        object.__setattr__(self, "source", source)
        object.__setattr__(self, "port", port)
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "path", path)
        object.__setattr__(self, "host", host)
        object.__setattr__(self, "headers", {} if headers is None else headers)
        self.__post_init__()

    def __post_init__(self) -> None:
        # A header under an upper-case name would be missed by every rule,
        # which turns `not_values` into a match: refuse the adapter's mistake.
        for name in self.headers:
            if name != name.lower():
                raise ValueError(f"header name {name!r} must be lower-case")

    @cached_property
    def principal(self) -> tuple[str, ...]:
        """The source's ID as text, once per request rather than once per rule."""
        return (str(self.source),) if self.source is not None else ()


@dataclass(frozen=True)
class Record:
    """Something a policy noted without enforcing it (AUDIT, or a dry run)."""

    kind: Literal["audit", "dry_run_allow", "dry_run_deny"]
    policy: str
    rule: str


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer, and why: `reason`, one sentence, written on first use.

    `explanation` is that sentence, or what writes it: an allowed request is
    usually never explained, and wording one costs more than deciding it.
    Two decisions are equal when they decide the same way (the reason aside).
    """

    allowed: bool
    policy: str  # the deciding policy, or "default" when default_action decided
    rule: str  # the deciding rule, NO_ALLOW_MATCHED, or the default action
    explanation: str | Callable[[], str] = field(compare=False, repr=False)
    records: tuple[Record, ...] = ()

    def __init__(
        self,
        allowed: bool,
        policy: str,
        rule: str,
        explanation: str | Callable[[], str],
        records: tuple[Record, ...] = (),
    ) -> None:
        # Written out: compiled, native code (one decision per request; see Request).
        object.__setattr__(self, "allowed", allowed)
        object.__setattr__(self, "policy", policy)
        object.__setattr__(self, "rule", rule)
        object.__setattr__(self, "explanation", explanation)
        object.__setattr__(self, "records", records)

    @property
    def reason(self) -> str:
        """One sentence: why."""
        explanation = self.explanation
        if not isinstance(explanation, str):
            explanation = explanation()
            object.__setattr__(self, "explanation", explanation)  # written once
        return explanation


class Explanation:
    """A decision's reason as a log argument: worded only if the line is written, with
    the request's path (quoted in the reason) as `shown` says, when it says, and cut at
    MAX_REASON."""

    __slots__ = ("decision", "path", "shown")

    def __init__(self, decision: Decision, path: str | None = None, shown: str = "") -> None:
        self.decision, self.path, self.shown = decision, path, shown

    def __str__(self) -> str:
        reason = self.decision.reason
        if self.path and self.path != self.shown:
            reason = reason.replace(self.path, self.shown)  # first: the cut may split a path
        if len(reason) > MAX_REASON:  # the deciding policy first: the cut may drop its name
            decision = self.decision
            cut = f"{reason[:MAX_REASON]}... ({len(reason)} characters, cut)"
            return f"policy {decision.policy!r} rule {decision.rule!r}: {cut}"
        return reason


# -- patterns and conditions ----------------------------------------------------------------


@dataclass(frozen=True)
class Pattern:
    """A literal value, a `prefix*`, a `*suffix`, or `*` (anything); checked by Condition."""

    text: str

    def matches(self, value: str) -> bool:
        if self.text == "*":
            return True
        if self.text.endswith("*"):
            return value.startswith(self.text[:-1])
        if self.text.startswith("*"):
            return value.endswith(self.text[1:])
        return value == self.text


@dataclass(frozen=True)
class Condition:
    """One field of a rule: the request matches if any value matches any pattern.

    Negated (`not_<field>`, `not_values`), it matches if none does. What it answers
    where the request leaves room depends on its policy's action (`action`), so that
    the room never helps a caller: a field the request has no value for (an HTTP field
    on an L4 request, in a DENY rule only; a negated `from` field for an
    unauthenticated source, whose positive ones never match, in a DENY or AUDIT rule);
    a header's several readings (`header_matches`) widen a DENY or AUDIT rule and
    narrow an ALLOW one.
    """

    field: Field
    patterns: tuple[Pattern, ...]
    negated: bool = False
    header: str = ""  # the header's lower-case name, for field "headers"

    def __post_init__(self) -> None:
        if self.field not in get_args(Field):
            raise ValueError(f"unknown field {self.field!r}")
        if not self.patterns:
            raise ValueError(f"{self.key}: needs at least one value")
        if (self.field == "headers") != bool(HEADER_NAME.fullmatch(self.header)):
            raise ValueError(f"{self.key}: header {self.header!r} is not a lower-case name")
        for pattern in self.patterns:
            if check_value(self.field, pattern.text) != pattern.text:
                raise ValueError(f"{self.key}: {pattern.text!r} is not in canonical form")

    @property
    def key(self) -> str:
        """The policy key this condition was written as."""
        if self.field == "headers":
            return f"when[{self.header}].{'not_values' if self.negated else 'values'}"
        return f"{'not_' if self.negated else ''}{self.field}"

    def matches(self, request: Request, action: Action = "ALLOW") -> bool:
        if self.field == "headers" and request.method is not None:
            return self.header_matches(request.headers.get(self.header, ()), action)
        values = _values(self, request)
        if values is None:  # plaintext (a negated from field), or an L4 request (HTTP)
            if self.field in SOURCE_FIELDS:
                return self.negated and action != "ALLOW"
            return action == "DENY"
        return self.any_match(values) != self.negated

    def header_matches(self, lines: tuple[str, ...], action: Action) -> bool:
        """A header's field lines as the app may read them: a line whole (Go's
        Header.Get reads the first, a WSGI app them all joined), stripped of spaces and
        tabs or of every Unicode space (Python's str.strip, as wsgiref strips: U+00A0
        and U+0085 too); or one of its comma items (an app that parses a list). A DENY
        or AUDIT rule takes any reading that matches: `values` if a line or an item
        matches, `not_values` if a line does not. An ALLOW rule takes only what holds
        for every reading: `values` if every line matches whole (`Mozilla/*` holds for
        a browser's User-Agent, whose commas are no list), `not_values` if neither a
        line nor an item matches. So `x-tenant: globex` beside `x-tenant: acme`, or
        `x-tenant: globex, acme`, is denied by a DENY's `not_values: [acme]` and
        allowed by no ALLOW's `values: [acme]`."""
        if not lines:  # a missing header: it has no value that matches
            return self.negated
        forms = [form for line in lines for form in (line.strip(" \t"), line.strip())]
        whole = tuple(dict.fromkeys(forms))
        if len(whole) == 1 and "," not in whole[0]:
            return self.any_match(whole) != self.negated
        if self.negated == (action == "ALLOW"):  # not_values in ALLOW, values elsewhere
            items = header_values({self.header: lines}, self.header)
            return (self.any_match(whole) or self.any_match(items)) != self.negated
        return all(self.any_match((line,)) for line in whole) != self.negated

    def test(self, action: Action) -> Callable[[Request], bool]:
        """`matches(request, action)` as one call, for `PolicySet.decide`'s plans: a
        method or path condition (one value per request) reads its field directly."""
        field_name, negated = self.field, self.negated
        if field_name not in ("methods", "paths"):
            return partial(_matches, self, action)
        exact, prefixes, suffixes = self._exact, self._prefixes, self._suffixes
        anything = self._anything
        absent = action == "DENY"  # an L4 request (no method, no path): HTTP_FIELDS both

        if field_name == "methods":

            def test(request: Request) -> bool:
                method = request.method
                if method is None:
                    return absent
                value = method.upper()  # as _values gives it
                found = (
                    value in exact
                    or value.startswith(prefixes)
                    or value.endswith(suffixes)
                    or anything
                )
                return found != negated

        else:

            def test(request: Request) -> bool:
                if request.method is None:
                    return absent
                value = request.path
                if value is None:
                    return absent
                found = (
                    value in exact
                    or value.startswith(prefixes)
                    or value.endswith(suffixes)
                    or anything
                )
                return found != negated

        return test

    def any_match(self, values: tuple[str, ...]) -> bool:
        """Whether any value matches any pattern (negation aside): Pattern.matches of
        each, by one set lookup and one startswith / endswith per value."""
        exact, prefixes, suffixes = self._exact, self._prefixes, self._suffixes
        for value in values:
            if value in exact or value.startswith(prefixes) or value.endswith(suffixes):
                return True
            if self._anything:
                return True
        return False

    # Every request walks these: literal patterns are one set lookup, not a loop.
    @cached_property
    def _exact(self) -> frozenset[str]:
        return frozenset(p.text for p in self.patterns if not _wild(p.text))

    @cached_property
    def _prefixes(self) -> tuple[str, ...]:
        return tuple(p.text[:-1] for p in self.patterns if p.text != "*" and p.text.endswith("*"))

    @cached_property
    def _suffixes(self) -> tuple[str, ...]:
        return tuple(p.text[1:] for p in self.patterns if p.text != "*" and p.text.startswith("*"))

    @cached_property
    def _anything(self) -> bool:
        return any(p.text == "*" for p in self.patterns)

    def explain(self, request: Request, action: Action = "ALLOW") -> str:
        """Why this condition does or does not match, for Decision.reason."""
        values = _values(self, request)
        if values is None and self.field in SOURCE_FIELDS:
            if self.negated and action != "ALLOW":
                return f"{self.key} matches an unauthenticated source in a {action} rule"
            return f"{self.key} never matches an unauthenticated source"
        if values is None:
            answer = (
                "so a DENY rule assumes it matches" if action == "DENY" else "so it never matches"
            )
            return f"{self.key} cannot be checked on an L4 connection, {answer}"
        listed = ", ".join(pattern.text for pattern in self.patterns)
        verb = "matches" if self.any_match(values) else "does not match"
        lines = request.headers.get(self.header, ()) if self.field == "headers" else ()
        if lines:  # as header_matches reads them
            held = self.header_matches(lines, action)
            (line, *more) = lines
            if more or "," in line or line.strip(" \t") != line.strip():
                ways = "every way the app may read it" if action == "ALLOW" else "a way it may"
                verb = f"{'holds' if held else 'does not hold'} for {ways}:"
            else:
                verb = "matches" if held != self.negated else "does not match"
        shown = ", ".join(map(repr, values)) if values else "(none)"
        if values and self.field == "headers":
            # A header's value may be a secret (an API key, a cookie, a token) and the
            # reason goes to the agent's log, which never holds one (as the access log).
            shown = f"({len(values)} value{'s' if len(values) > 1 else ''}, not shown)"
        return f"{_LABELS[self.field]}{self.header} {shown} {verb} {self.key} [{listed}]"


def _wild(text: str) -> bool:
    return text.startswith("*") or text.endswith("*")


_LABELS: dict[Field, str] = {
    "principals": "source",
    "namespaces": "source namespace",
    "trust_domains": "source trust domain",
    "ports": "port",
    "methods": "method",
    "paths": "path",
    "hosts": "host",
    "headers": "header ",
}


def _matches(condition: Condition, action: Action, request: Request) -> bool:
    return condition.matches(request, action)


def _values(condition: Condition, request: Request) -> tuple[str, ...] | None:
    """The request's values for a condition's field; None if it has none to match at all."""
    source = request.source
    if condition.field in SOURCE_FIELDS:
        if source is None:
            return None
        if condition.field == "principals":
            return request.principal
        if condition.field == "namespaces":
            return _namespace(source)
        return (source.trust_domain.name,)
    if condition.field == "ports":
        return (str(request.port),)
    if request.method is None:
        return None
    if condition.field == "methods":
        # Upper-cased: some frameworks route `delete` as DELETE.
        return (request.method.upper(),)
    if condition.field == "paths":
        return None if request.path is None else (request.path,)
    if condition.field == "hosts":
        return () if request.host is None else (request.host,)
    return header_values(request.headers, condition.header)


def _namespace(source: SpiffeId) -> tuple[str, ...]:
    """The Kubernetes namespace of `spiffe://<td>/ns/<ns>/sa/<sa>`; () for any other shape."""
    segments = source.segments
    if len(segments) == 4 and segments[0] == "ns" and segments[2] == "sa":
        return (segments[1],)
    return ()


def header_values(headers: Mapping[str, tuple[str, ...]], name: str) -> tuple[str, ...]:
    """Every value of a header, however the client split them: field values split on ','."""
    return tuple(item.strip() for value in headers.get(name, ()) for item in value.split(","))


# -- rules, policies, the set ---------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """Conditions that must all match (AND); a rule without any matches every request."""

    name: str
    conditions: tuple[Condition, ...] = ()

    def __post_init__(self) -> None:
        if not _DEFAULT_RULE_NAME.fullmatch(self.name):
            check_name(self.name)

    def matches(self, request: Request, action: Action = "ALLOW") -> bool:
        for condition in self.conditions:  # noqa: SIM110 - per request: no generator
            if not condition.matches(request, action):
                return False
        return True

    def applies_to_port(self, port: int) -> bool:
        """True unless the rule lists `to.ports` without this port (not_ports aside)."""
        return all(
            condition.any_match((str(port),))
            for condition in self.conditions
            if condition.field == "ports" and not condition.negated
        )

    def ports_among(self, ports: frozenset[int]) -> frozenset[int]:
        """The `ports` this rule applies to (`applies_to_port` of each), by set: a port
        pattern is always literal, so a rule costs its listed ports, not every port."""
        found = ports
        for condition in self.conditions:
            if condition.field == "ports" and not condition.negated:
                found = found & frozenset(int(p.text) for p in condition.patterns)
        return found

    @property
    def http_fields(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([c.key for c in self.conditions if c.field in HTTP_FIELDS]))

    def explain(self, request: Request, action: Action = "ALLOW") -> str:
        if not self.conditions:
            return "the rule has no conditions, so it matches every request"
        return "; ".join(condition.explain(request, action) for condition in self.conditions)

    def first_miss(self, request: Request) -> str:
        return next(c.explain(request) for c in self.conditions if not c.matches(request))


@dataclass(frozen=True)
class Policy:
    """A named set of rules (OR) with one action; dry-run policies only record.

    An ALLOW policy without rules allows nothing: it applies to every port and
    matches no request, so it denies whatever no other ALLOW allows (Istio's
    `spec: {}`, a namespace's default-deny). DENY and AUDIT need a rule.
    """

    name: str
    action: Action
    rules: tuple[Rule, ...]
    dry_run: bool = False
    source: str = field(default="", compare=False)  # FILE:LINE:COLUMN, for messages

    def __post_init__(self) -> None:
        check_policy_name(self.name)
        if self.name == DEFAULT_POLICY:
            raise ValueError(f"{self.name!r} is reserved for the default action")
        if self.action not in get_args(Action):
            raise ValueError(f"action {self.action!r} is not one of ALLOW, DENY, AUDIT")
        if not self.rules and self.action != "ALLOW":
            raise ValueError(
                f"a {self.action} policy needs at least one rule (only an ALLOW may have none,"
                " and then it allows nothing)"
            )
        names = [rule.name for rule in self.rules]
        if len(set(names)) != len(names):
            raise ValueError(f"rule names must be unique within policy {self.name!r}")
        if self.dry_run and self.action == "AUDIT":
            raise ValueError("an AUDIT policy never enforces, so it cannot be a dry run")

    def applies_to(self, port: int) -> bool:
        """Whether this policy governs `port`; one without rules governs every port."""
        return not self.rules or any(rule.applies_to_port(port) for rule in self.rules)

    def first_match(self, request: Request) -> Rule | None:
        return next((rule for rule in self.rules if rule.matches(request, self.action)), None)


_RECORD_KIND: dict[Action, Literal["audit", "dry_run_allow", "dry_run_deny"]] = {
    "AUDIT": "audit",
    "ALLOW": "dry_run_allow",
    "DENY": "dry_run_deny",
}


# What can decide a request from one caller on one port: a policy's rules whose
# `from` and `to.ports` conditions hold there, in order, each with the conditions
# left to check on every request (none: it matches), as tests (`Condition.test`).
_Candidates = tuple[tuple[Policy, Rule, tuple[Callable[[Request], bool], ...]], ...]
_STATIC_FIELDS = frozenset({*SOURCE_FIELDS, "ports"})
MAX_PLANS = 1024  # (caller, port) pairs remembered per PolicySet; the oldest goes first


@dataclass(frozen=True, slots=True)
class _Plan:
    """`PolicySet.decide`'s shortcut for one (caller, port); see `PolicySet._plan`."""

    denies: _Candidates  # enforced DENY policies
    allows: _Candidates  # enforced ALLOW policies
    allow_applies: bool  # an enforced ALLOW governs the port: no match means deny
    # dry-run and AUDIT policies, each with its candidates, and whether a miss is
    # recorded (a dry-run ALLOW that governs the port: dry_run_deny)
    noted: tuple[tuple[Policy, _Candidates, bool], ...]


@dataclass(frozen=True)
class PolicySet:
    policies: tuple[Policy, ...] = ()
    default_action: DefaultAction = "allow-authenticated"
    # (caller, port) -> _Plan: a memo of pure functions of this frozen set, so a new
    # PolicySet (a reload) starts with none.
    _plans: dict[tuple[SpiffeId | None, int], _Plan] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )
    # The same plans by (id(caller), port), each beside the caller it was found for: a
    # connection's requests all carry the one SpiffeId object its handshake made, and
    # hashing that (a dataclass of a dataclass, in Python) cost more than deciding.
    # Holding the object keeps its id from being reused while its entry stands.
    _seen: dict[tuple[int, int], tuple[SpiffeId | None, _Plan]] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        if self.default_action not in get_args(DefaultAction):
            raise ValueError(f"default_action {self.default_action!r} is not one of {_ACTIONS}")
        problems = duplicates(self.policies)
        if problems:
            raise ValueError("; ".join(problems))

    def decide(
        self, request: Request, trust_domains: frozenset[TrustDomain], _one_form: bool = False
    ) -> Decision:
        """Enforced DENY first, then enforced ALLOW for the port, then default_action.

        The same answer as `explain` (a property test holds them to it), by the
        caller's and port's plan; the reason is worded only if read. A path with
        `;` parameters is decided in both its forms (`_both_forms`); any other
        path pays one `in` for that: `_one_form`, which only `_planned` sets, spares
        it a call (a positional default costs nothing; a keyword-only one, ~1%).
        """
        path = request.path
        if path and ";" in path and not _one_form:
            return self._both_forms(request, trust_domains, self._planned, worded=False)
        source, port = request.source, request.port
        seen = self._seen.get((id(source), port))
        if seen is not None and seen[0] is source:
            plan = seen[1]
        else:
            found = self._plans.get((source, port))
            plan = self._plan(request) if found is None else found
            if len(self._seen) >= MAX_PLANS:
                del self._seen[next(iter(self._seen))]
            self._seen[(id(source), port)] = (source, plan)
        records = _noted(plan.noted, request) if plan.noted else ()
        why = partial(self._reason, request, trust_domains)
        for policy, rule, rest in plan.denies:
            if _passes(rest, request):
                return Decision(False, policy.name, rule.name, why, records)
        for policy, rule, rest in plan.allows:
            if _passes(rest, request):
                return Decision(True, policy.name, rule.name, why, records)
        if plan.allow_applies:
            return Decision(False, DEFAULT_POLICY, NO_ALLOW_MATCHED, why, records)
        allowed = (
            self.default_action == "allow-authenticated"
            and source is not None
            and source.trust_domain in trust_domains
        )
        return Decision(allowed, DEFAULT_POLICY, self.default_action, why, records)

    def explain(self, request: Request, trust_domains: frozenset[TrustDomain]) -> Decision:
        """`decide` by every rule of every policy, the reason written at once."""
        path = request.path
        if path and ";" in path:
            return self._both_forms(request, trust_domains, self._explained, worded=True)
        return self._explained(request, trust_domains)

    def _explained(self, request: Request, trust_domains: frozenset[TrustDomain]) -> Decision:
        """`explain` for one form of the path."""
        records = tuple(self._records(request))
        if hit := _first_match(self._enforced("DENY"), request):
            return Decision(False, hit[0].name, hit[1].name, _matched(*hit, request), records)
        allows = [policy for policy in self._enforced("ALLOW") if policy.applies_to(request.port)]
        if hit := _first_match(allows, request):
            return Decision(True, hit[0].name, hit[1].name, _matched(*hit, request), records)
        if allows:
            reason = _none_matched(allows, request)
            return Decision(False, DEFAULT_POLICY, NO_ALLOW_MATCHED, reason, records)
        allowed, reason = self._default(request, trust_domains)
        return Decision(allowed, DEFAULT_POLICY, self.default_action, reason, records)

    def http_only_errors(self, tcp_ports: frozenset[int]) -> list[str]:
        """One error per rule that uses HTTP-only fields and applies to one of these TCP ports.

        Such a rule cannot be checked there (TCP has no method or path): in an
        ALLOW it would never allow, in a DENY it would deny every connection.
        """
        errors = []
        for policy in self.policies:
            for rule in policy.rules:
                if not rule.http_fields:
                    continue  # cheap first: a mesh's rules are mostly L4
                ports = sorted(rule.ports_among(tcp_ports))
                if ports:
                    at = f"{policy.source}: " if policy.source else ""
                    errors.append(
                        f"{at}policy {policy.name!r} rule {rule.name!r} uses"
                        f" {', '.join(rule.http_fields)} but applies to TCP port"
                        f" {', '.join(map(str, ports))}, where HTTP fields never match;"
                        " set `protocol: http` on that inbound port (http2 or grpc if it"
                        " speaks h2), or list the rule's HTTP ports in to.ports"
                    )
        return errors

    def _both_forms(
        self,
        request: Request,
        trust_domains: frozenset[TrustDomain],
        decide_form: Callable[[Request, frozenset[TrustDomain]], Decision],
        worded: bool,
    ) -> Decision:
        """A path with parameters (`/admin;x/users`), allowed only if allowed both as sent
        and as Java servlet containers route it (`/admin/users`, httppath.without_parameters).

        The app receives the path as sent, and an app that strips parameters before
        routing would otherwise get past a DENY on `/admin/*` or an ALLOW of `/public*`
        alone: so a DENY that matches either form denies, and what ALLOWs must allow
        both. A denial names the form that decided (`_deciding_form`); the
        records are each dry-run and AUDIT policy's as if it decided both forms alone.
        `decide` and `explain` both combine here, with their own `decide_form`.
        """
        assert request.path is not None  # a `;` in it brought the request here
        stripped_path = without_parameters(request.path)
        as_sent = decide_form(request, trust_domains)
        stripped = decide_form(replace(request, path=stripped_path), trust_domains)
        deciding = _deciding_form(as_sent, stripped)
        why: str | Callable[[], str]
        if worded:
            why = _both_reasons(stripped_path, deciding is stripped, deciding)
        else:
            why = partial(self._reason, request, trust_domains)
        records = self._both_records(as_sent.records, stripped.records)
        allowed = as_sent.allowed and stripped.allowed
        return Decision(allowed, deciding.policy, deciding.rule, why, records)

    def _both_records(
        self, as_sent: tuple[Record, ...], stripped: tuple[Record, ...]
    ) -> tuple[Record, ...]:
        """Per dry-run or AUDIT policy, in order: an AUDIT or a DENY dry run records the
        rule that matched either form (as sent first); an ALLOW dry run records an allow
        only if it allows both forms, else the deny it would have made."""
        if as_sent == stripped:
            return as_sent
        first = {record.policy: record for record in as_sent}
        second = {record.policy: record for record in stripped}
        records: list[Record] = []
        for policy in self.policies:
            one, other = first.get(policy.name), second.get(policy.name)
            if one is None or other is None:
                records.extend(r for r in (one, other) if r is not None)
            elif policy.action == "ALLOW" and "dry_run_deny" in (one.kind, other.kind):
                records.append(Record("dry_run_deny", policy.name, NO_ALLOW_MATCHED))
            else:
                records.append(one)
        return tuple(records)

    def _planned(self, request: Request, trust_domains: frozenset[TrustDomain]) -> Decision:
        """`decide` for the one form of the path `request` has, parameters or not."""
        return self.decide(request, trust_domains, True)

    def _reason(self, request: Request, trust_domains: frozenset[TrustDomain]) -> str:
        return self.explain(request, trust_domains).reason

    def _plan(self, request: Request) -> _Plan:
        """Which rules can apply to `request`'s caller on its port, remembered (bounded).

        `from` and `to.ports` conditions depend on nothing else, so each is checked
        once here; a rule one of them rules out is left out, and the rest keep their
        other conditions. A miss of the memo costs one full pass over the rules.
        """

        def candidates(policy: Policy) -> _Candidates:
            found = []
            for rule in policy.rules:
                static = [c for c in rule.conditions if c.field in _STATIC_FIELDS]
                if all(c.matches(request, policy.action) for c in static):
                    rest = tuple(
                        c.test(policy.action)
                        for c in rule.conditions
                        if c.field not in _STATIC_FIELDS
                    )
                    found.append((policy, rule, rest))
            return tuple(found)

        enforced = [policy for policy in self.policies if not policy.dry_run]
        denies = [p for p in enforced if p.action == "DENY"]
        allows = [p for p in enforced if p.action == "ALLOW" and p.applies_to(request.port)]
        plan = _Plan(
            denies=tuple(c for policy in denies for c in candidates(policy)),
            allows=tuple(c for policy in allows for c in candidates(policy)),
            allow_applies=bool(allows),
            noted=tuple(
                (
                    policy,
                    candidates(policy),
                    policy.action == "ALLOW" and policy.applies_to(request.port),
                )
                for policy in self.policies
                if policy.dry_run or policy.action == "AUDIT"
            ),
        )
        if len(self._plans) >= MAX_PLANS:
            del self._plans[next(iter(self._plans))]
        self._plans[(request.source, request.port)] = plan
        return plan

    def _enforced(self, action: Action) -> list[Policy]:
        return [p for p in self.policies if p.action == action and not p.dry_run]

    def _records(self, request: Request) -> Iterator[Record]:
        for policy in self.policies:
            if not (policy.dry_run or policy.action == "AUDIT"):
                continue
            rule = policy.first_match(request)
            if rule is not None:
                yield Record(_RECORD_KIND[policy.action], policy.name, rule.name)
            elif policy.action == "ALLOW" and policy.applies_to(request.port):
                yield Record("dry_run_deny", policy.name, NO_ALLOW_MATCHED)

    def _default(self, request: Request, trust_domains: frozenset[TrustDomain]) -> tuple[bool, str]:
        prefix = f"no ALLOW policy applies to port {request.port}, so default_action"
        if self.default_action == "deny":
            return False, f"{prefix} deny denies"
        source = request.source
        if source is None:
            return False, f"{prefix} allow-authenticated denies unauthenticated traffic"
        if source.trust_domain not in trust_domains:
            allowed = ", ".join(sorted(td.name for td in trust_domains)) or "none"
            return False, (
                f"{prefix} allow-authenticated denies {source}: its trust domain is not one"
                f" of the allowed ({allowed})"
            )
        return True, f"{prefix} allow-authenticated allows authenticated {source}"


_ACTIONS = ", ".join(get_args(DefaultAction))


def _deciding_form(as_sent: Decision, stripped: Decision) -> Decision:
    """Which form's decision stands for both: a denial by a DENY policy first (as in one
    evaluation, where DENY comes first), then any denial, the path as sent before the
    path without parameters; when both are allowed, the path as sent."""
    denials = [decision for decision in (as_sent, stripped) if not decision.allowed]
    by_deny = [decision for decision in denials if decision.policy != DEFAULT_POLICY]
    return (by_deny or denials or [as_sent])[0]


def _both_reasons(stripped_path: str, by_stripped: bool, deciding: Decision) -> str:
    """Which form of a path with parameters decided, and why. The path as sent is not
    repeated: its parameters may hold a session ID (the access log redacts them)."""
    routed = f"without its ';' parameters ({stripped_path!r}, as Java servlet containers route it)"
    if by_stripped:
        return f"the path {routed} is denied: {deciding.reason}"
    if not deciding.allowed:
        return f"the path as sent is denied: {deciding.reason}"
    return f"the path is allowed as sent and {routed}: {deciding.reason}"


def _passes(tests: tuple[Callable[[Request], bool], ...], request: Request) -> bool:
    for test in tests:  # noqa: SIM110 - per request: no generator
        if not test(request):
            return False
    return True


def _noted(
    noted: tuple[tuple[Policy, _Candidates, bool], ...], request: Request
) -> tuple[Record, ...]:
    """The records of dry-run and AUDIT policies, as `PolicySet._records` makes them."""
    records = []
    for policy, candidates, miss_recorded in noted:
        for _, rule, rest in candidates:
            if _passes(rest, request):
                records.append(Record(_RECORD_KIND[policy.action], policy.name, rule.name))
                break
        else:
            if miss_recorded:
                records.append(Record("dry_run_deny", policy.name, NO_ALLOW_MATCHED))
    return tuple(records)


def _first_match(policies: Iterable[Policy], request: Request) -> tuple[Policy, Rule] | None:
    for policy in policies:
        rule = policy.first_match(request)
        if rule is not None:
            return policy, rule
    return None


def _matched(policy: Policy, rule: Rule, request: Request) -> str:
    explained = rule.explain(request, policy.action)
    return f"{policy.action} policy {policy.name!r} rule {rule.name!r} matched: {explained}"


def _none_matched(allows: list[Policy], request: Request) -> str:
    misses = "; ".join(
        f"{policy.name}/{rule.name}: {rule.first_miss(request)}"
        if rule
        else f"{policy.name}: has no rules, so it allows nothing"
        for policy in allows
        for rule in policy.rules or (None,)
    )
    names = ", ".join(repr(policy.name) for policy in allows)
    return f"ALLOW policies {names} apply to port {request.port} but no rule matched ({misses})"


def duplicates(policies: Sequence[Policy]) -> list[str]:
    first: dict[str, Policy] = {}
    errors = []
    for policy in policies:
        if policy.name in first:
            where = first[policy.name].source or "an earlier policy"
            at = f"{policy.source}: " if policy.source else ""
            errors.append(
                f"{at}name: duplicate policy name {policy.name!r} (first at {where});"
                " expected names unique across all policy files"
            )
        first.setdefault(policy.name, policy)
    return errors


# -- values: what each field accepts, in canonical form -------------------------------------


def check_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"{name!r} is not a valid name; expected 1-63 letters, digits, '.', '_' or '-',"
            " starting with a letter or digit"
        )
    return name


def check_policy_name(name: object) -> str:
    """A rule's name, or `<namespace>/<name>` (how the control plane names its policies)."""
    if isinstance(name, str) and _QUALIFIED_NAME.fullmatch(name):
        return name
    try:
        return check_name(name)
    except ValueError:
        raise ValueError(
            f"{name!r} is not a valid name; expected 1-63 letters, digits, '.', '_' or '-',"
            " starting with a letter or digit (or NAMESPACE/NAME)"
        ) from None


def check_value(field: Field, value: object) -> str:
    """The canonical text of a pattern for `field`; ValueError says what is expected."""
    if field == "ports":
        return _port(value)
    if not isinstance(value, str) or not value:
        hint = " (quote it: YAML reads it as a boolean)" if isinstance(value, bool) else ""
        raise ValueError(f"{value!r} is not a non-empty string{hint}")
    return _CHECKS[field](value)


def _port(value: object) -> str:
    text = str(value)
    if isinstance(value, bool) or not isinstance(value, int | str) or not text.isdecimal():
        raise ValueError(f"{value!r} is not a port; expected an integer from 1 to 65535")
    if not text.isascii() or not 1 <= int(text) <= 65535:
        raise ValueError(f"port {value!r} is out of range; expected an integer from 1 to 65535")
    return str(int(text))


def _star(text: str) -> tuple[str, str]:
    """('exact'|'prefix'|'suffix'|'any', the text without its `*`)."""
    if text == "*":
        return "any", ""
    kind, core = "exact", text
    if text.endswith("*"):
        kind, core = "prefix", text[:-1]
    elif text.startswith("*"):
        kind, core = "suffix", text[1:]
    if "*" in core:
        raise ValueError(
            f"{text!r} has a '*' inside; patterns are literal with at most one '*',"
            " at the start (suffix) or the end (prefix)"
        )
    return kind, core


def _principal(text: str) -> str:
    kind, core = _star(text)
    if kind == "any":
        return text
    expected = "expected a SPIFFE ID such as spiffe://example.org/ns/NS/sa/SA, or a prefix of"
    expected += " one that ends in '*' after the trust domain's '/', or '*' for any peer"
    if kind == "exact":
        try:
            return str(SpiffeId.parse(text))
        except ValueError as exc:
            raise ValueError(f"{exc}; {expected}") from None
    authority, slash, _ = core.removeprefix("spiffe://").partition("/")
    # `spiffe://td*` would also match spiffe://td.evil: the prefix must pin the trust domain.
    if kind != "prefix" or not core.startswith("spiffe://") or not slash:
        raise ValueError(f"{text!r} is not a SPIFFE ID pattern; {expected}")
    try:
        TrustDomain(authority)
    except ValueError as exc:
        raise ValueError(f"{exc}; {expected}") from None
    return text


def _namespace_name(text: str) -> str:
    if not _NAMESPACE.fullmatch(text):
        raise ValueError(
            f"{text!r} is not a namespace; expected a Kubernetes namespace name"
            " (lower-case letters, digits and '-'), matched exactly"
        )
    return text


def _trust_domain(text: str) -> str:
    try:
        return TrustDomain(text).name
    except ValueError as exc:
        raise ValueError(f"{exc}; expected a trust domain name such as example.org") from None


def _method(text: str) -> str:
    if not _METHOD.fullmatch(text):
        raise ValueError(
            f"{text!r} is not an HTTP method; expected an upper-case method such as"
            f" {text.upper() if text.isalpha() else 'GET'!r}, matched exactly"
        )
    return text


def _path(text: str) -> str:
    kind, core = _star(text)
    if kind == "any":
        return text
    if kind != "suffix" and not core.startswith("/"):
        raise ValueError(f"{text!r} does not start with '/'; expected a path such as /api/*")
    if "?" in core or "#" in core:
        raise ValueError(f"{text!r} has a query or fragment; paths are matched without them")
    # A prefix or suffix is a piece of a path: complete it with a plain segment
    # ("x") so that, say, the prefix "/a/." (of "/a/.well-known") is not read as
    # a dot segment.
    before, after = {"prefix": ("", "x"), "suffix": ("/x", "")}.get(kind, ("", ""))
    try:
        normalized, _ = normalize_target(before + core + after)
    except BadPath as exc:
        raise ValueError(f"{text!r}: {exc}") from None
    if normalized != before + core + after:
        fixed = normalized.removeprefix(before).removesuffix(after)
        fixed = {"prefix": fixed + "*", "suffix": "*" + fixed}.get(kind, fixed)
        raise ValueError(
            f"{text!r} never matches, because requests are matched after normalization;"
            f" expected the normalized form {fixed!r}"
        )
    return text


def _host(text: str) -> str:
    kind, core = _star(text)
    if kind not in ("exact", "suffix") or (kind == "suffix" and not core.startswith(".")):
        raise ValueError(
            f"{text!r}: expected a host name such as api.example.com, or *.example.com"
        )
    if ":" in core and not core.startswith("["):
        raise ValueError(f"{text!r} has a port; hosts are matched without one (use to.ports)")
    host = normalize_host(core)
    if not _HOST.fullmatch(host.removeprefix(".")):
        raise ValueError(f"{text!r} is not a host name; expected one such as api.example.com")
    return ("*" if kind == "suffix" else "") + host


def _header_value(text: str) -> str:
    _star(text)
    if "," in text:
        raise ValueError(
            f"{text!r} has a ','; a value is matched against one list item, or one whole"
            " line of a header (docs/policy.md, Headers), so expected one without ','"
        )
    return text


_CHECKS: dict[Field, Callable[[str], str]] = {
    "principals": _principal,
    "namespaces": _namespace_name,
    "trust_domains": _trust_domain,
    "methods": _method,
    "paths": _path,
    "hosts": _host,
    "headers": _header_value,
}
