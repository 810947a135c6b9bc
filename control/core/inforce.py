"""Which version of a policy the agents enforce: the object's own, or the one its status
recorded as in force.

An AuthorizationPolicy or TrafficPolicy edited into an object the agents
cannot use must not vanish: a typo in a security team's edit must not drop
a DENY. So the version in force lives in the object's own status,
`status.inForce: {generation, spec}`, written beside the conditions whenever
the object is valid and carried over unchanged while it is not. The control
plane's replicas are stateless: each reads that record from the API server,
so a replica started after the bad edit, or every replica after a restart,
compiles the same version and writes the same status as the others. Nothing
depends on what one process happened to see.

- `spec` is copied as the API server returned it (defaulted; the CRDs keep
  unknown fields, which a valid spec has none of), so compiling the copy
  gives exactly what compiling the object gave.
- The copy doubles the status' share of the object: a policy is a few
  kilobytes, the API server's limit per object about 1.5 MiB.
- A policy deleted and created again under its name is a new object (new
  uid) with an empty status: it inherits nothing.
- A record that no longer compiles (an older control plane accepted what
  this one refuses, or the status was written by hand) is dropped: the
  object is then not enforced, and its status says so.
- Whoever may write the status subresource decides what is enforced while
  the spec is invalid: only the control plane's ClusterRole may.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

from control.core.conditions import Meta

__all__ = ["Verdict", "judge", "policy_status", "recorded"]

T = TypeVar("T")

#: status.inForce as written: {"generation": int, "spec": the spec as read}.
Record = Mapping[str, Any]


@dataclass(frozen=True)
class Verdict(Generic[T]):
    """One policy object as compiled: what is in force, and what its status records."""

    #: What the agents get: this version, the recorded one, or nothing.
    in_force: T | None
    #: This version's problems as `field.path: problem`; empty when it is valid.
    errors: list[str]
    #: status.inForce to write; None: nothing is in force.
    record: Record | None

    @property
    def generation(self) -> int:
        """The generation of the version in force (meaningful only when one is)."""
        return int(self.record["generation"]) if self.record is not None else 0


def judge(
    obj: Mapping[str, Any],
    m: Meta,
    compile: Callable[[Mapping[str, Any], Meta], T | list[str]],
) -> Verdict[T]:
    """The object compiled; if it is invalid, the version its status records instead."""
    result = compile(obj, m)
    if not isinstance(result, list):
        spec = obj.get("spec")
        return Verdict(result, [], {"generation": m.generation, "spec": _copy(spec or {})})
    record = recorded(obj)
    if record is None:
        return Verdict(None, result, None)
    then = {**obj, "spec": record["spec"]}  # the compilers read the rest from `m`
    kept = compile(then, replace(m, generation=record["generation"]))
    if isinstance(kept, list):
        return Verdict(None, result, None)
    # Carried over as it was (only what the schema keeps), so the status stays the same.
    return Verdict(kept, result, {"generation": record["generation"], "spec": record["spec"]})


def recorded(obj: Mapping[str, Any]) -> Record | None:
    """The object's `status.inForce`, if it is well formed."""
    status = obj.get("status")
    record = status.get("inForce") if isinstance(status, Mapping) else None
    if not isinstance(record, Mapping):
        return None
    generation, spec = record.get("generation"), record.get("spec")
    if isinstance(generation, bool) or not isinstance(generation, int) or generation < 0:
        return None
    if not isinstance(spec, Mapping):
        return None
    return record


def policy_status(m: Meta, accepted: Mapping[str, Any], verdict: Verdict[Any]) -> dict[str, Any]:
    """The whole status to write, record included, for the next compile on any replica
    to find. It must replace the object's status (an update of /status, or a JSON patch
    `replace` of /status), not be merge-patched into it: a JSON merge patch keeps every
    key of the old record's spec that the new one left out (a dropped `selector` would
    stay), so the record would be wrong and never equal to what is written."""
    written: dict[str, Any] = {"observedGeneration": m.generation, "conditions": [accepted]}
    if verdict.record is not None:
        written["inForce"] = verdict.record
    return written


def _copy(value: Any) -> Any:
    """The spec's own copy, as JSON (the status is written as JSON; deepcopy is slower)."""
    return json.loads(json.dumps(value))
