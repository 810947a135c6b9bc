"""The policy's decision on an inbound connection (L4) or request (L7), counted and said.

An inbound listener (agent/adapters/listeners.py) holds one `Authorizer`; each HTTP
connection it serves asks it through a `Caller`, which keeps what stays the same on
that connection (the peer, the app port, the trust domains its `allow` names, the
listen address for the deny line). This runs on every inbound request, so it is a
module of its own, written to compile with mypyc (listeners.py cannot: the capture
listeners subclass its classes from Python).

What each decision leaves, as docs/observability.md says:
- `outrider_authz_decisions_total{decision, policy, rule}`: the decision, and each
  dry-run or AUDIT record it carries, counted once (Tallies: metrics.py);
- an enforced deny: `outrider_authz_denials_total`, and an INFO line per caller a while
  (not per denial: a caller can be denied as fast as it connects), its reason worded
  only if the line is written.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

from agent.adapters.metrics import Tally, tallied
from agent.adapters.runtime import refusal_line
from agent.core.accesslog import MAX_METHOD, logged_path
from agent.core.captured import admit_plaintext
from agent.core.policy import Decision, Explanation, Request

if TYPE_CHECKING:
    from agent.adapters.runtime import Runtime
    from agent.config import Inbound
    from identity import SpiffeId, TrustDomain
    from identity.configfile import Listen

log = logging.getLogger("outrider.agent")

INBOUND: Final = "inbound"


class Authorizer:
    """One inbound listener's decisions: the policy set in force at each call (a reload
    replaces `runtime.policies` whole), the counter's children bound once per labels."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        #: The authz counter's children by labels, bound once: `labels()` takes a lock
        #: and builds a key on every call, and this one is counted on every request.
        self._decisions: dict[tuple[str, str, str], Tally] = {}

    def decide(self, request: Request, config: Inbound) -> Decision:
        """The decision on `request` to the port `config` serves, counted (and a deny said)."""
        return self.decided(request, config.allow.trusted_domains, config.listen)

    def caller(self, peer: SpiffeId | None, config: Inbound) -> Caller:
        """What decides each request of `peer`'s connection (None: a plaintext caller)."""
        return Caller(self, peer, config)

    def decided(
        self, request: Request, trusted_domains: frozenset[TrustDomain], listen: Listen
    ) -> Decision:
        decision = self.runtime.policies.decide(request, trusted_domains)
        source = request.source
        if source is None:  # only a permissive captured port lets one come this far
            decision = admit_plaintext(decision)
        allowed = decision.allowed
        self._count("allow" if allowed else "deny", decision.policy, decision.rule)
        records = decision.records
        if records:
            for record in records:
                self._count(record.kind, record.policy, record.rule)
        if not allowed:
            self._denied(request, decision, listen)
        return decision

    def _count(self, kind: str, policy: str, rule: str) -> None:
        key = (kind, policy, rule)
        tally = self._decisions.get(key)
        if tally is None:
            child = self.runtime.metrics.authz_decisions.labels(kind, policy, rule)
            tally = self._decisions[key] = tallied(child)
        tally.value += 1.0

    def _denied(self, request: Request, decision: Decision, listen: Listen) -> None:
        """An enforced deny: counted, and a line per caller a while."""
        source = request.source
        self.runtime.metrics.denied(decision.policy, decision.rule, source)
        # A line per caller a while, not per denial: a caller (a plaintext one on a
        # permissive port, above all) can be denied as fast as it connects.
        caller = str(source) if source else "a plaintext caller"
        # The method and path as the access log shows them: cut (h2 lets a caller send
        # any token as :method), and a `;jsessionid=` value is a secret.
        path, method = request.path, (request.method or "")[:MAX_METHOD]
        shown = logged_path(path, query=False) if path else ""
        refusal_line(
            self.runtime.refusal_lines,
            log,
            (INBOUND, "denied", caller),
            "inbound %s: denied %s to port %d from %s: %s",
            listen,
            f"{method} {shown}" if method else "a connection",
            request.port,
            caller,
            Explanation(decision, path, shown),  # worded only if the line is written
            level=logging.INFO,
        )


class Caller:
    """One connection's requests, decided (http.Authorize): what stays the same on the
    connection is read once, when it is let in, not on every request."""

    def __init__(self, authorizer: Authorizer, peer: SpiffeId | None, config: Inbound) -> None:
        self.authorizer = authorizer
        self.peer = peer
        self.port: int = config.app.port
        self.trusted_domains: frozenset[TrustDomain] = config.allow.trusted_domains
        self.listen: Listen = config.listen

    def __call__(
        self, method: str, path: str, host: str | None, headers: dict[str, tuple[str, ...]]
    ) -> Decision:
        request = Request(self.peer, self.port, method, path, host, headers)
        return self.authorizer.decided(request, self.trusted_domains, self.listen)
