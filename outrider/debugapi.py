"""The control plane's debug API as its commands read it: `proxy-status`, `policy check
--live` and `check` ask the same questions and say the same things about the answers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from control import REPLICA_HEADER  # the package alone: no server is imported

DEBUG_URL = "http://127.0.0.1:15014"  # the control plane's debug port
PORT_FORWARD = "kubectl -n outrider-system port-forward deployment/outrider-control 15014:15014"
#: Each replica lists only its own agents: every one is asked, through a port-forward each.
EACH_REPLICA = (
    "kubectl -n outrider-system port-forward pod/POD 1501N:15014 for each pod of"
    " deployment/outrider-control, and one --control http://127.0.0.1:1501N for each"
)


class Unreachable(Exception):
    """The debug API did not answer, or answered with an error; the message says what to do."""


def get(base: str, path: str, timeout: float = 10.0) -> Any:
    """GET a JSON document from the control plane's debug port."""
    return _fetch(base, path, timeout)[0]


def _fetch(base: str, path: str, timeout: float) -> tuple[Any, str | None]:
    """The JSON document at `path` and the replica that answered (REPLICA_HEADER)."""
    import http.client  # here: an agent's process imports this module, and needs none
    import json
    import urllib.error
    import urllib.request

    url = base.rstrip("/") + path
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:  # noqa: S310 - http(s) only
            return json.loads(answer.read()), answer.headers.get(REPLICA_HEADER)
    except urllib.error.HTTPError as exc:
        try:
            why = exc.read().decode(errors="replace").strip() or exc.reason
        except (OSError, http.client.HTTPException):  # an error page cut short
            why = exc.reason
        raise Unreachable(f"{url}: {exc.code} {why}") from None
    except (
        urllib.error.URLError,
        OSError,
        ValueError,
        RecursionError,
        http.client.HTTPException,
    ) as exc:
        # HTTPException: not HTTP there (a TLS port), or an answer cut short;
        # RecursionError: JSON nested deeper than the parser goes.
        reason = getattr(exc, "reason", exc)
        raise Unreachable(
            f"cannot reach the control plane at {base}: {reason} (is `outrider control serve`"
            f" running, and is --control its debug address? From a workstation: {PORT_FORWARD})"
        ) from None


def agents(base: str, timeout: float = 10.0) -> list[Mapping[str, Any]]:
    """The agents /debug/agents lists; Unreachable when the answer is not a list of them
    (another service on the port, a proxy's page, a control plane of another shape)."""
    return _agents(base, timeout)[0]


def _agents(base: str, timeout: float) -> tuple[list[Mapping[str, Any]], str]:
    """`agents(base)`, and which replica answered (`base` if it does not say)."""
    answer, replica = _fetch(base, "/debug/agents", timeout)
    if not isinstance(answer, list) or not all(isinstance(a, Mapping) for a in answer):
        shape = type(answer).__name__ if not isinstance(answer, list) else "a list of other things"
        raise Unreachable(
            f"{base.rstrip('/')}/debug/agents answered {shape}, not a list of agents (is"
            f" --control the control plane's debug address? From a workstation: {PORT_FORWARD})"
        )
    return answer, replica or base.rstrip("/")


@dataclass(frozen=True)
class Replicas:
    """What the control-plane replicas asked said (each lists only the agents connected
    to it): their agents, how many distinct replicas answered, and why others did not."""

    agents: list[Mapping[str, Any]] = field(default_factory=list)
    answered: int = 0
    unreachable: list[str] = field(default_factory=list)


def agents_of(bases: Sequence[str], timeout: float = 10.0) -> Replicas:
    """The agents of every replica in `bases`. One replica reached through two addresses
    (two port-forwards that landed on one pod) is counted, and its agents listed, once."""
    found = Replicas()
    seen: set[str] = set()
    for base in dict.fromkeys(base.rstrip("/") for base in bases):
        try:
            listed, replica = _agents(base, timeout)
        except Unreachable as exc:
            found.unreachable.append(str(exc))
            continue
        if replica not in seen:
            seen.add(replica)
            found.agents.extend(listed)
    return Replicas(found.agents, len(seen), found.unreachable)


def ack_state(agent: Mapping[str, Any]) -> str:
    """SYNCED: the agent runs the latest version; NACK (why): it refused what it was sent;
    STALE: it has not acknowledged the latest yet."""
    nack = agent.get("nack")
    if isinstance(nack, Mapping) and nack.get("version") == agent.get("sent"):
        return f"NACK ({nack.get('error') or ''})"
    if agent.get("acked") is not None and agent.get("acked") == agent.get("latest"):
        return "SYNCED"
    return "STALE"


def agent_rows(agents: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """One row per agent: pod, SPIFFE ID, the version it runs (or was sent), ACK state;
    every cell text (`?` for what the answer left out), whatever the answer held."""
    return [
        {
            "pod": _cell(a.get("pod"), "?"),
            "spiffe_id": _cell(a.get("spiffe_id"), "?"),
            "version": _cell(a.get("acked") or a.get("sent"), "-"),
            "state": ack_state(a),
        }
        for a in agents
    ]


def _cell(value: Any, missing: str) -> str:
    return missing if value is None or value == "" else str(value)


def status_table(rows: Sequence[Mapping[str, str]]) -> str:
    """`proxy-status` for a person: aligned columns."""
    table = [("POD", "SPIFFE ID", "VERSION", "ACK STATE")]
    table += [(r["pod"], r["spiffe_id"], r["version"], r["state"]) for r in rows]
    widths = [max(len(row[column]) for row in table) for column in range(len(table[0]))]
    return "".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        + "\n"
        for row in table
    )
