"""`outrider policy check`: one request, decided by the agent's own engine, as a verdict.

The handler in cli.py reads the flags and the policies; what the request's headers
mean and what the verdict says (for a person, or as JSON/YAML) live here, plain data
in and out, so the text and `-o json` cannot tell different stories.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from agent.core.headers import underscore_refusal
from agent.core.http1 import RELAYED_UPGRADES, connection_tokens, hop_by_hop
from agent.core.policy import Decision

Verdict = dict[str, Any]


def request_headers(pairs: Sequence[str]) -> tuple[dict[str, tuple[str, ...]], Verdict | None]:
    """`--header NAME=VALUE`s as the agent sees them (names lower-cased, repeats kept);
    with the deny the agent gives before any policy when a name has an underscore (its
    default, limits.headers_with_underscores). ValueError for a pair that is not NAME=VALUE."""
    headers: dict[str, tuple[str, ...]] = {}
    for header in pairs:
        name, equals, value = header.partition("=")
        if not equals or not name:
            raise ValueError(f"--header {header!r} is not NAME=VALUE")
        if "_" in name:
            return headers, refused(underscore_refusal(name.encode()))
        headers[name.lower()] = (*headers.get(name.lower(), ()), value)
    # What ends at the agent never reaches the app, nor a rule (agent/adapters/http.py);
    # an upgrade the agent relays (a WebSocket) keeps its Upgrade (http1.RequestParser).
    fields = [
        (name.encode(), value.encode()) for name, values in headers.items() for value in values
    ]
    connection = connection_tokens(fields)
    offered = {t.strip().lower().encode() for v in headers.get("upgrade", ()) for t in v.split(",")}
    relayed = b"upgrade" in connection and bool(offered) and offered <= RELAYED_UPGRADES
    hop = hop_by_hop(connection, upgrade=relayed)
    return {name: values for name, values in headers.items() if name.encode() not in hop}, None


def refused(why: str) -> Verdict:
    """A request the agent answers 400 before asking any policy."""
    return {"decision": "deny", "status": 400, "why": why}


def decided(decision: Decision, path: str | None, asked_path: str | None) -> Verdict:
    """What the policies decided; the path as matched when normalizing changed it."""
    verdict: Verdict = {"decision": "allow" if decision.allowed else "deny"}
    if path is not None and path != asked_path:
        verdict["path"] = path
        verdict["normalized_from"] = asked_path or "(none)"
    verdict |= {"policy": decision.policy, "rule": decision.rule, "why": decision.reason}
    verdict["records"] = [
        {"kind": r.kind, "policy": r.policy, "rule": r.rule} for r in decision.records
    ]
    return verdict


def text(verdict: Mapping[str, Any]) -> str:
    lines = [verdict["decision"]]
    if "status" in verdict:  # refused before any policy was asked
        lines.append(f"status: {verdict['status']} (refused before any policy)")
        return "\n".join([*lines, f"why: {verdict['why']}"])
    if "path" in verdict:
        lines.append(f"path: {verdict['path']} (normalized from {verdict['normalized_from']})")
    lines += [f"policy: {verdict['policy']}", f"rule: {verdict['rule']}", f"why: {verdict['why']}"]
    lines += [
        f"record: {r['kind']} policy={r['policy']} rule={r['rule']}" for r in verdict["records"]
    ]
    return "\n".join(lines)
