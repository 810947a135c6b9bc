"""The audit log: one JSON line per issuance or refusal.

Compliance teams grep it and ship it; it never contains a token, a CSR or a
key, only who asked, what they got or why not.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import datetime
from typing import TextIO


class AuditUnavailable(Exception):
    """A record could not be written: the CA answers nothing it cannot account for."""


class AuditLog:
    def __init__(self, stream: TextIO, clock: Callable[[], datetime], target: str = "-") -> None:
        self._stream = stream
        self._clock = clock
        self.target = target

    @classmethod
    def open(cls, target: str, clock: Callable[[], datetime]) -> AuditLog:
        """'-' is stdout; anything else a file appended to, line-buffered."""
        stream = sys.stdout if target == "-" else open(target, "a", buffering=1)  # noqa: SIM115
        return cls(stream, clock, target)

    def record(
        self,
        *,
        result: str,
        reason: str,
        caller: str | None,
        peer: str | None = None,
        pod: str | None = None,
        spiffe_id: str | None = None,
        serial: int | None = None,
        not_after: datetime | None = None,
    ) -> None:
        entry = {
            "time": self._clock().isoformat(),
            "event": "svid_sign",
            "result": result,
            "reason": reason,
            "caller": caller,
            "peer": peer,
            "pod": pod,
            "spiffe_id": spiffe_id,
            "serial": None if serial is None else f"{serial:x}",
            "not_after": None if not_after is None else not_after.isoformat(),
        }
        try:
            self._stream.write(json.dumps(entry, separators=(",", ":")) + "\n")
            self._stream.flush()
        except (OSError, ValueError) as exc:  # a full disk, a closed stream
            where = "stdout" if self.target == "-" else self.target
            said = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise AuditUnavailable(
                f"cannot write the audit log ({where}: {said}); free its disk or fix audit_log"
            ) from None
