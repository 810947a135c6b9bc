"""Taking a port: what the agent says when it cannot.

`address already in use` alone sends a user looking for a stranger on the
port. Usually it is the agent itself: a restart (a new pod's agent on the
same node's host port, `outrider agent run` started again by hand, a
supervisor's restart) while the previous process still drains its
connections. A draining agent keeps its admin and status ports, so that
/ready answers 503 until it exits, for up to limits.drain_timeout.
"""

from __future__ import annotations

import errno

__all__ = ["cannot_listen"]

IN_USE = (
    "another process listens there; if it is this agent's previous process, still "
    "draining its connections after a SIGTERM (it keeps its admin port until it exits, "
    "up to limits.drain_timeout), start this one after that process has exited"
)


def cannot_listen(exc: OSError, where: str) -> OSError:
    """The error to raise for `exc` from binding `where`: which address, and for an
    address in use, why it may be and what to do."""
    said = exc.strerror or str(exc)
    if exc.errno == errno.EADDRINUSE:
        said = f"{said}: {IN_USE}"
    return OSError(exc.errno, f"cannot listen on {where}: {said}")
