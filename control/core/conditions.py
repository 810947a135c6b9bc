"""Reading an object's metadata, and writing the status conditions users read back.

Conditions follow metav1.Condition: `lastTransitionTime` moves only when
`status` flips, so compiling the same world twice gives the same status and
the shell writes nothing. That needs the object's current status (it comes
with the object) and the time of this compile, passed in: the core reads no
clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

__all__ = ["EPOCH", "Meta", "condition", "meta", "summary", "timestamp"]

#: What `now` is when the caller gives none: a valid time that reads as "unknown".
EPOCH = "1970-01-01T00:00:00Z"
#: Messages stay short enough for `kubectl describe` (the API allows 32768).
MAX_MESSAGE = 2000


@dataclass(frozen=True)
class Meta:
    namespace: str
    name: str
    uid: str
    generation: int
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    created: str  # RFC 3339, sorts like the time it names; "" if unknown


def meta(obj: Mapping[str, Any], key: tuple[str, str]) -> Meta:
    """The object's metadata; namespace and name default to the key it was stored under."""
    raw = obj.get("metadata") or {}
    generation = raw.get("generation")
    return Meta(
        str(raw.get("namespace") or key[0]),
        str(raw.get("name") or key[1]),
        str(raw.get("uid") or ""),
        generation if isinstance(generation, int) and not isinstance(generation, bool) else 0,
        _strings(raw.get("labels")),
        _strings(raw.get("annotations")),
        str(raw.get("creationTimestamp") or ""),
    )


def _strings(raw: object) -> Mapping[str, str]:
    if not isinstance(raw, dict):
        return {}
    return {str(k): v for k, v in raw.items() if isinstance(v, str)}


def timestamp(now: datetime | None) -> str:
    """RFC 3339 in UTC, to the second, as Kubernetes writes times."""
    if now is None:
        return EPOCH
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(
    kind: str,
    ok: bool,
    reason: str,
    message: str,
    generation: int,
    previous: Sequence[Mapping[str, Any]],
    now: str,
) -> dict[str, Any]:
    """One condition; it keeps the previous lastTransitionTime while its status holds."""
    status = "True" if ok else "False"
    old = next((c for c in previous if isinstance(c, dict) and c.get("type") == kind), None)
    since = now
    if old is not None and old.get("status") == status and old.get("lastTransitionTime"):
        since = str(old["lastTransitionTime"])
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE - 3] + "..."
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": since,
    }


def previous_conditions(obj: Mapping[str, Any]) -> Sequence[Mapping[str, Any]]:
    """The object's current `status.conditions` (what the control plane wrote last)."""
    conditions = (obj.get("status") or {}).get("conditions")
    return conditions if isinstance(conditions, list) else []


def summary(problems: Iterable[str], limit: int = 5) -> str:
    """Problems joined by '; ', the first `limit` of them and how many more."""
    items = list(dict.fromkeys(problems))
    shown = "; ".join(items[:limit])
    return shown + (f"; and {len(items) - limit} more" if len(items) > limit else "")
