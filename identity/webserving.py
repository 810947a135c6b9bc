"""aiohttp's side of the `Acceptor` (identity/serving.py): its handlers report progress.

A module of its own so that importing the acceptor does not load aiohttp: the
agent (its Workload API socket) accepts through it too, and aiohttp, about
10 MB resident with its C extensions, stays out of every pod.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from identity.serving import progress_of

__all__ = ["reports_progress"]


@web.middleware
async def reports_progress(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """aiohttp middleware: each request's handler reports to its connection's acceptor.

    aiohttp calls the handler once the request's head has arrived. A request
    whose body is still to come is not yet owed an answer: its sender could
    trickle the body for as long as the handler waits, so it stays idle, and
    displaceable, until it is answered.
    """
    progress = progress_of(request.transport)
    if progress is None or not _body_arrived(request):
        return await handler(request)
    progress.received()
    try:
        return await handler(request)
    finally:
        progress.answered()


def _body_arrived(request: web.Request) -> bool:
    if not request.body_exists:
        return True
    length = request.content_length
    return length is not None and request.content.total_bytes >= length
