"""The webhook's HTTP side: /mutate (AdmissionReview v1), /healthz and /metrics.

`/mutate/capture-disabled` is the same mutation without capture, for the
namespaces labelled outrider.io/capture=disabled (deploy/base/webhook.yaml
sends those there).

The body is limited while it is read (aiohttp's client_max_size, and the
Content-Length before reading) and in time, its nesting and size in arrays
and objects before it is parsed (core.review.decode); each refusal is a 4xx
with a one-line reason. Parsing
and mutation run in a worker thread, so a large review cannot hold up the
event loop for the requests behind it.

Large bodies are also bounded together (`BodyBudget`): a review declaring more
than SMALL_BODY (a pod's is some KiB) is read and answered only within
BODIES_AT_ONCE times max_body_bytes for all of them; past that, bodies arriving
for READ_GRACE or longer are cut to make room, and if none is, it is refused 503
`busy` at once. Forty callers that each sent all but a byte of 3 MiB made the
injector hold 267 MiB, past its pod's 256 Mi limit; under `failurePolicy: Ignore`
a killed injector admits pods without the agent. Not queued: a connection waiting
for the budget still held ~1.1 MiB of TLS and HTTP buffers. Every refused
request's connection is closed, the rest of its body unread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

from identity.registry import SUB_MILLISECOND, component_registry
from identity.serving import CLOSE_REASONS
from identity.throttle import LogThrottle, held_back
from identity.webserving import reports_progress
from injector.config import Limits
from injector.core import (
    INJECTED,
    MUTATE,
    MUTATE_WITHOUT_CAPTURE,
    Admission,
    BadRequest,
    Settings,
    admit,
    decode,
    settings_for,
)

log = logging.getLogger("outrider.injector")

#: The API server sends a review in one go and waits at most 30 s for the answer.
BODY_TIMEOUT = 10.0
#: Review bodies larger than SMALL_BODY read and answered at once, in max_body_bytes
#: (`BodyBudget`). A pod's review is typically 5-20 KiB, so the API server's own traffic
#: never meets the budget, and callers that hold it (four declared 3 MiB and sent a
#: byte, and every review was refused for as long as they waited) lock out none of it.
#: A body up to SMALL_BODY, sent all but a byte, costs the injector ~165 KiB: ~165 MiB
#: at max_connections 1000, within its pod's 256 Mi (at 256 KiB it was ~0.9 GiB).
BODIES_AT_ONCE = 4
SMALL_BODY = 32 * 1024
_BUCKETS = (*SUB_MILLISECOND, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class InjectorMetrics:
    def __init__(self) -> None:
        self.registry = component_registry("injector")
        self.admissions = Counter(
            "outrider_injector_admissions",
            "AdmissionReviews answered, by result (injected, skipped, error, bad_request) "
            "and reason",
            ["result", "reason"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "outrider_injector_admission_duration_seconds",
            "Time from request to answer, body read included",
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.connections_closed = Counter(
            "outrider_injector_connections_closed",
            f"Connections closed at a limit, by reason ({', '.join(CLOSE_REASONS)})",
            ["reason"],
            registry=self.registry,
        )
        for reason in CLOSE_REASONS:  # exported at 0 from the start, for rates and alerts
            self.connections_closed.labels(reason)
        self.connections_open = Gauge(
            "outrider_injector_connections_open",
            "Connections open now, TLS handshakes in progress included",
            registry=self.registry,
        )

    def connection_closed(self, reason: str) -> None:
        self.connections_closed.labels(reason).inc()


#: The API server sends a review's body at once: one still arriving after this long is a
#: caller's, and at the budget it is cut to make room (`BodyBudget`).
READ_GRACE = 1.0


@dataclass(eq=False)
class _Hold:
    size: int
    since: float
    transport: asyncio.Transport | None
    reading: bool = True  # its body is still arriving


class BodyBudget:
    """Bytes of review bodies being read or answered, over every connection, at most
    `limit`: each review holds its Content-Length (or the most a body may be) from
    before it is read until it is answered. At the limit, bodies that have been arriving
    for READ_GRACE or longer are cut, the oldest first, to make room; a review that still
    finds no room is refused `busy`. Callers that declare large bodies and send a byte
    then hold the budget for a second at a time, never for the body timeout."""

    def __init__(self, limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._free = limit
        self._holds: set[_Hold] = set()
        self._clock = clock

    @contextlib.contextmanager
    def held(self, size: int, transport: asyncio.Transport | None = None) -> Iterator[_Hold]:
        """Hold `size` bytes of the budget; BadRequest `busy` if they cannot be had."""
        now = self._clock()
        if size > self._free:
            self._make_room(size, now)
        if size > self._free:
            message = "other reviews hold the bytes this one needs; try again"
            raise BadRequest("busy", message, status=503)
        hold = _Hold(size, now, transport)
        self._holds.add(hold)
        self._free -= size
        try:
            yield hold
        finally:
            self._let_go(hold)

    def _let_go(self, hold: _Hold) -> None:
        if hold in self._holds:
            self._holds.discard(hold)
            self._free += hold.size

    def _make_room(self, size: int, now: float) -> None:
        slow = [h for h in self._holds if h.reading and now - h.since >= READ_GRACE]
        for hold in sorted(slow, key=lambda h: h.since):
            if self._free >= size:
                return
            self._let_go(hold)
            if hold.transport is not None:
                hold.transport.abort()


def make_app(
    settings: Settings,
    limits: Limits,
    metrics: InjectorMetrics,
    *,
    body_timeout: float = BODY_TIMEOUT,
    clock: Callable[[], float] = time.perf_counter,
) -> web.Application:
    budget = BodyBudget(BODIES_AT_ONCE * limits.max_body_bytes)
    lines = LogThrottle()

    async def mutate(request: web.Request) -> web.Response:
        started = clock()
        try:
            chosen = settings_for(settings, request.path, list(request.query.items()))
            size = _declared(request, limits.max_body_bytes)
            with budget.held(size if size > SMALL_BODY else 0, request.transport) as hold:
                body = await _read(request, limits.max_body_bytes, body_timeout)
                hold.reading = False
                admission = await asyncio.to_thread(_answer, body, chosen, limits.max_json_depth)
        except BadRequest as exc:
            metrics.admissions.labels("bad_request", exc.reason).inc()
            metrics.duration.observe(clock() - started)
            held = lines.admit(exc.reason, time.monotonic())
            if held is not None:  # a caller can cause these as fast as it can ask
                log.info("refused a request from %s: %s%s", request.remote, exc, held_back(held))
            refused = web.Response(status=exc.status, text=f"{exc}\n")
            refused.force_close()  # what is left of its body is not read, nor kept
            return refused
        metrics.admissions.labels(admission.result, admission.reason).inc()
        metrics.duration.observe(clock() - started)
        _log(admission)
        return web.Response(
            body=json.dumps(admission.review, separators=(",", ":")),
            content_type="application/json",
        )

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def get_metrics(request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    # reports_progress: the acceptor's idle timeout counts answered requests, not bytes
    app = web.Application(client_max_size=limits.max_body_bytes, middlewares=[reports_progress])
    app.router.add_post(MUTATE, mutate)
    app.router.add_post(MUTATE_WITHOUT_CAPTURE, mutate)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", get_metrics)
    return app


def _too_large(limit: int) -> BadRequest:
    return BadRequest("too_large", f"the body exceeds {limit} bytes", status=413)


def _declared(request: web.Request, limit: int) -> int:
    """What the body may be: its Content-Length, refused past `limit`; else `limit`."""
    if request.content_length is None:
        return limit
    if request.content_length > limit:
        raise _too_large(limit)
    return request.content_length


async def _read(request: web.Request, limit: int, within: float) -> bytes:
    try:
        async with asyncio.timeout(within):
            return await request.read()  # stops reading past client_max_size
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(limit) from None
    except TimeoutError:
        raise BadRequest("slow_body", f"the body took more than {within:g} s", 408) from None
    except ConnectionError:  # gone, or cut to make room (`BodyBudget`)
        raise BadRequest("slow_body", "the connection ended before the body did", 408) from None


def _answer(body: bytes, settings: Settings, max_depth: int) -> Admission:
    return admit(decode(body, max_depth), settings)


def _log(admission: Admission) -> None:
    if admission.error is not None:
        log.error(
            "cannot inject %s, letting it through unchanged",
            admission.pod,
            exc_info=admission.error,
        )
    elif admission.result == INJECTED or admission.reason == "not_a_pod":
        log.debug("%s: %s", admission.pod, admission.reason)
    else:
        log.info("%s: not injected (%s)", admission.pod, admission.reason)
