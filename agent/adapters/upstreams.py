"""An outbound upstream at run time: discovery feeding it, health checks, the pool, mTLS dials.

`LiveUpstream` wraps the pure `agent.core.upstream.Upstream` with what moves:
one discovery task per distinct source (agent/adapters/discovery.py), whose
every publication replaces the members of the subsets that use it; an active
health checker when configured; the outcomes of real traffic (`record`) for
outlier detection; the circuit breaker and retry budget; the pool of idle
mTLS connections (HTTP mode); and the gauges of endpoint states.

A reload keeps what it does not change: the members as last discovered, the
health table (ejections and check verdicts carry over, under the new
settings) and the pool, so flipping weights for blue/green moves traffic and
nothing else. Endpoints that leave lose their idle pooled connections at
once; requests in flight on them finish. A discovery watch that fails
outright (no in-cluster credentials yet) starts again after
DISCOVERY_RESTART seconds.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import ssl
from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING, TypeVar

from prometheus_client import Counter

from agent.adapters import discovery
from agent.adapters.metrics import AgentMetrics, TalliedHistogram, Tally, clock, tallied
from agent.adapters.pool import Pool
from agent.adapters.runtime import Runtime
from agent.adapters.tls import dialling, kept, refusal_reason
from agent.config import Outbound
from agent.core.accesslog import Tls
from agent.core.discovery import Source
from agent.core.health import ActiveCheck, Event, Transition
from agent.core.resilience import CircuitBreaker, RetryBudget
from agent.core.upstream import Endpoint, Upstream

if TYPE_CHECKING:  # built with the first h2 stream: see LiveUpstream.h2pool
    from agent.adapters.h2client import H2Pool

log = logging.getLogger("outrider.agent")

OUTBOUND, HEALTH = "outbound", "health"
#: How often endpoint gauges are refreshed and ended ejections logged.
TICK = 1.0
#: Seconds before a discovery watch that failed outright is started again.
DISCOVERY_RESTART = 10.0
P = TypeVar("P", bound=asyncio.BaseProtocol)


class DialError(Exception):
    """No verified mTLS connection to an endpoint: refused, unreachable, or the wrong peer."""


class LiveUpstream:
    """One outbound's upstream: built by the constructor (nothing runs, nothing is
    counted), run by `start`, stopped by `close`, which undoes what `start` did.

    Its metric series are the agent's to prune (`prune_series`): they go when no
    running upstream has its name, whether it closed on a reload, was refused
    with one, or was renamed; a drain keeps them for the last scrape.
    """

    counted: Counted  # bound by start(): an upstream that never ran shows in no metric

    def __init__(self, config: Outbound, runtime: Runtime, rng: random.Random) -> None:
        self.runtime = runtime
        self.rng = rng
        self.config = config
        self.core = Upstream(config.balancer, _weights(config), config.health)
        self.breaker = CircuitBreaker(config.circuit_breaker)
        self.budget = RetryBudget(
            config.retries.budget_percent, config.retries.min_retry_concurrency
        )
        self.pool = Pool(config.pool_idle_timeout)
        self._h2pool: H2Pool | None = None
        self.published: dict[Source, dict[Endpoint, int]] = {}
        self._watches: dict[Source, asyncio.Task[None]] = {}
        self._restart: asyncio.TimerHandle | None = None
        self._tick: asyncio.Task[None] | None = None
        self._checks: asyncio.Task[None] | None = None
        self._running = False
        self._closed = False
        # The loop it runs on, from start(): every request reads its clock, and each
        # get_running_loop() is a getpid() system call on Python 3.11.
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def h2pool(self) -> H2Pool:
        """Its shared h2 connections (`http2` and `grpc`), built with its first stream:
        an upstream that never speaks h2 loads no h2 client (agent/adapters/h2client.py).
        Built closed once the upstream is (a stream of a connection taken before a reload
        closed it): what it dials then carries that stream and closes, pooled by nobody."""
        if self._h2pool is None:
            from agent.adapters.h2client import H2Pool

            self._h2pool = H2Pool(self.config.pool_idle_timeout)
            if self._closed:
                self._h2pool.close()
        return self._h2pool

    @property
    def running(self) -> bool:
        """Started and not closed: discovery and health checks run."""
        return self._running

    def start(self) -> None:
        self._running = True
        self._loop = asyncio.get_running_loop()
        self.counted = Counted(self.runtime.metrics, self.name)
        self._watch_sources()
        self._tick = asyncio.create_task(self._refresh(), name=f"upstream {self.name}")
        self._start_checks()

    def close(self) -> None:
        """Stop discovery, ticks and checks; close the idle pool."""
        self._running = False
        self._closed = True
        for task in [*self._watches.values(), self._tick, self._checks]:
            if task is not None:
                task.cancel()
        self._watches.clear()
        self._tick = self._checks = None
        if self._restart is not None:
            self._restart.cancel()
            self._restart = None
        self.pool.close()
        if self._h2pool is not None:
            self._h2pool.close()

    def reconfigure(self, config: Outbound) -> None:
        """Follow a new config (a running upstream); what it does not change carries over."""
        if config == self.config:
            return
        old, self.config = self.config, config
        if config.name != old.name and self._running:  # renamed in place: metrics follow
            self.counted = Counted(self.runtime.metrics, config.name)
        if config.circuit_breaker != old.circuit_breaker:  # in-flight work releases the old one
            self.breaker = CircuitBreaker(config.circuit_breaker)
        if config.retries != old.retries:
            self.budget = RetryBudget(
                config.retries.budget_percent, config.retries.min_retry_concurrency
            )
        health = self.core.health  # ejections and check verdicts carry over
        health.reconfigure(config.health)
        core = Upstream(config.balancer, _weights(config), health)
        core.load = self.core.load
        members: dict[str, Mapping[Endpoint, int]] = {}
        for subset in config.subsets:
            if subset.source in self.published:
                members[subset.name] = self.published[subset.source]
            elif subset.name in self.core.subsets:  # a new source: keep the members until it
                members[subset.name] = self.core.subsets[subset.name].members  # publishes
        core.update_all(members)  # at once: a shared health table keeps every subset's health
        gone = self.core.endpoints() - core.endpoints()
        self.core = core
        self.pool.drop(gone)
        h2pool = self._h2pool
        if h2pool is not None:
            h2pool.drop(gone)
        if config.server_ids != old.server_ids:
            # Its pooled connections were verified against the IDs it trusted before: none
            # carries a new request (in-flight ones finish), as none would be dialled now.
            self.pool.retire_all()
            if h2pool is not None:
                h2pool.retire_all()
        self.pool.set_idle_timeout(config.pool_idle_timeout)
        if h2pool is not None:
            h2pool.set_idle_timeout(config.pool_idle_timeout)
        if self._running:
            self._watch_sources()
            if config.health.active != old.health.active:
                self._start_checks()
            self._count_states()

    def _start_checks(self) -> None:
        if self._checks is not None:
            self._checks.cancel()
            self._checks = None
        if self.config.health.active is not None:
            check = self._check_all(self.config.health.active)
            self._checks = asyncio.create_task(check, name=f"health {self.name}")

    # -- endpoints -----------------------------------------------------------------------

    def _watch_sources(self) -> None:
        """One discovery task per distinct source; stop those no subset uses any more."""
        wanted = {subset.source for subset in self.config.subsets}
        for source in set(self._watches) - wanted:
            self._watches.pop(source).cancel()
            self.published.pop(source, None)
        for source in wanted - set(self._watches):
            publish = functools.partial(self._publish, source)
            task = asyncio.create_task(
                discovery.watch(source, publish), name=f"discovery {self.name}"
            )
            task.add_done_callback(functools.partial(self._watch_ended, source))
            self._watches[source] = task

    def _watch_ended(self, source: Source, task: asyncio.Task[None]) -> None:
        """A watch that failed outright (e.g. no in-cluster credentials yet) starts again."""
        if task.cancelled() or task.exception() is None or not self._running:
            return
        log.error(
            "upstream %s: discovery failed, again in %.0fs: %s",
            self.name,
            DISCOVERY_RESTART,
            task.exception(),
        )
        if self._watches.get(source) is task:
            del self._watches[source]
        if self._restart is None:
            loop = asyncio.get_running_loop()
            self._restart = loop.call_later(DISCOVERY_RESTART, self._restart_watches)

    def _restart_watches(self) -> None:
        self._restart = None
        self._watch_sources()

    def _publish(self, source: Source, members: dict[Endpoint, int]) -> None:
        self.published[source] = members
        gone: set[Endpoint] = set()
        for subset in self.config.subsets:
            if subset.source == source:
                gone |= self.core.update(subset.name, members)
        gone -= self.core.endpoints()
        self.pool.drop(gone)
        if self._h2pool is not None:
            self._h2pool.drop(gone)
        log.info(
            "upstream %s: %d endpoint(s): %s",
            self.name,
            len(members),
            ", ".join(sorted(map(str, members))) or "none",
        )
        self._count_states()

    def keeps(self, endpoint: Endpoint) -> bool:
        """Whether a connection to `endpoint` may go back to the pool: a member, not ejected."""
        try:
            return self.core.health.state(endpoint, self._now()) != "ejected"
        except KeyError:  # it left
            return False

    # -- health --------------------------------------------------------------------------

    def record(self, endpoint: Endpoint, event: Event) -> None:
        """An outcome of real traffic (or of an active check) on `endpoint`."""
        transition = self.core.health.record(endpoint, event, self._now())
        if transition is not None:
            self._transitioned(transition)

    def _transitioned(self, transition: Transition) -> None:
        if transition.new == "ejected":
            self.counted.ejections.inc()
            self.pool.drop({transition.endpoint})
            if self._h2pool is not None:
                self._h2pool.drop({transition.endpoint})
        log.warning(
            "upstream %s: %s %s -> %s (%s)",
            self.name,
            transition.endpoint,
            transition.old,
            transition.new,
            transition.reason,
        )
        self._count_states()

    def _count_states(self) -> None:
        # Looked up each time (once a second, or on a change): a reload that renames
        # this upstream prunes the old name's children.
        if not self._running:  # closed: a request still in flight must not bring them back
            return
        gauge = self.runtime.metrics.upstream_endpoints
        for state, count in self.core.health.counts(self._now()).items():
            gauge.labels(self.name, state).set(count)

    async def _refresh(self) -> None:
        while True:
            contexts = self.runtime.contexts
            if contexts.client is not None:  # the SVID or bundle rotated
                self.pool.retire(contexts.client)
            if contexts.h2_client is not None and self._h2pool is not None:
                self._h2pool.retire(contexts.h2_client)
            for transition in self.core.health.expired(self._now()):
                self._transitioned(transition)
            self._count_states()
            await asyncio.sleep(TICK)

    async def _check_all(self, check: ActiveCheck) -> None:
        """Check every endpoint each interval (the first after a random part of one)."""
        await asyncio.sleep(self.rng.uniform(0, check.interval))
        while True:
            endpoints = sorted(self.core.endpoints(), key=str)
            results = await asyncio.gather(
                *(self._check(e, check) for e in endpoints), return_exceptions=True
            )
            for endpoint, passed in zip(endpoints, results, strict=True):
                if isinstance(passed, BaseException):  # one odd answer fails its check only
                    log.warning("upstream %s: check of %s: %r", self.name, endpoint, passed)
                self.record(endpoint, "check_passed" if passed is True else "check_failed")
            await asyncio.sleep(check.interval)

    async def _check(self, endpoint: Endpoint, check: ActiveCheck) -> bool:
        """A TCP connect, or a GET over mTLS answered 2xx, within the check's timeout."""
        try:
            async with asyncio.timeout(check.timeout):
                if check.kind == "tcp":
                    _, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
                    writer.close()
                    return True
                return await self._http_check(endpoint, check.path)
        except (OSError, ssl.SSLError, TimeoutError, EOFError, DialError, ValueError):
            return False  # ValueError: a first line over the reader's limit

    async def _http_check(self, endpoint: Endpoint, path: str) -> bool:
        reader = asyncio.StreamReader(limit=16 * 1024)
        transport, _, _ = await self.dial(
            endpoint, lambda: asyncio.StreamReaderProtocol(reader), direction=HEALTH
        )
        try:
            request = f"GET {path} HTTP/1.1\r\nHost: {self.name}\r\nConnection: close\r\n\r\n"
            transport.write(request.encode())
            status = await reader.readline()
            return status[:10] in (b"HTTP/1.1 2", b"HTTP/1.0 2") and status[10:12].isdigit()
        finally:
            transport.abort()

    # -- connections ---------------------------------------------------------------------

    async def dial(
        self, endpoint: Endpoint, factory: Callable[[], P], *, direction: str = OUTBOUND
    ) -> tuple[asyncio.Transport, P, Tls | None]:
        """A verified mTLS connection to `endpoint`, or DialError; counted under `direction`,
        in connections_total by the server's SPIFFE ID once it is one the upstream expects:
        the one place an outbound mTLS connection is made, pooled or not. With it, when
        access logs or tracing are on, its peer and TLS as lines give them (else None):
        read once here, for every request the connection carries.

        Active health checks count theirs under "health": they are not traffic.
        """
        runtime, loop = self.runtime, asyncio.get_running_loop()
        context, limits = runtime.contexts.client_for(self.config.protocol), runtime.limits
        assert context is not None, "upstreams start after the first SVID"
        started = clock()
        deadline = (
            self.config.timeouts.connect
            or (limits.connect_timeout + limits.handshake_timeout).total_seconds()
        )
        try:
            async with asyncio.timeout(deadline):
                with dialling(context, endpoint, self.config.server_ids):  # a saved session
                    transport, protocol = await loop.create_connection(
                        factory,
                        endpoint.host,
                        endpoint.port,
                        ssl=context,
                        server_hostname="",
                        ssl_handshake_timeout=limits.handshake_timeout.total_seconds(),
                    )
        except (OSError, ssl.SSLError, TimeoutError, EOFError) as exc:
            if not _before_tls(exc):
                runtime.refused(direction, refusal_reason(exc))
            raise DialError(f"{endpoint}: {exc or type(exc).__name__}") from None
        ssl_object = transport.get_extra_info("ssl_object")
        peer = runtime.peer(ssl_object, "server", direction)
        if peer is None or peer not in self.config.server_ids:
            transport.abort()
            if peer is not None:
                runtime.refused(direction, "wrong_server_id")
            # The traceback of the DialError keeps this frame, and whoever keeps the error
            # (a reference cycle, a log handler) would keep the aborted TLS transport too.
            del transport, protocol, ssl_object
            raise DialError(f"{endpoint} presented {peer or 'no SVID'}, not an ID of the upstream")
        runtime.verified(direction, ssl_object, peer, started)
        runtime.established(direction, peer)
        kept(ssl_object, peer)  # its session may be offered to this endpoint again
        observer = runtime.observer
        tls = None if observer is None else observer.tls(peer, ssl_object)
        return transport, protocol, tls

    def _now(self) -> float:
        loop = self._loop
        return (loop or asyncio.get_running_loop()).time()


class Counted:
    """An upstream's metric children, bound once: `labels()` takes a lock and a lookup.

    Those counted on every request (its status, its duration, a pooled connection
    reused) are Tallies (agent/adapters/metrics.py): the HTTP/1.1 outbound, compiled,
    counts them with a `+=`; `request` does the same for the other protocols."""

    def __init__(self, metrics: AgentMetrics, name: str) -> None:
        self.name = name
        self.metrics = metrics
        self.duration = TalliedHistogram(metrics.upstream_request_duration.labels(name))
        self.retries = metrics.upstream_retries.labels(name)
        self.ejections = metrics.upstream_ejections.labels(name)
        self.new = metrics.upstream_connections.labels(name, "new")
        self.reused = metrics.upstream_connections.labels(name, "reused")
        self.reused_count = tallied(self.reused)
        self.codes: dict[int, Tally] = {}  # upstream_requests_total's, by status
        self._grpc: dict[int, Counter] = {}

    def code(self, status: int) -> Tally:
        """upstream_requests_total's child for `status`, bound on first use."""
        tally = self.codes.get(status)
        if tally is None:
            child = self.metrics.upstream_requests.labels(self.name, str(status))
            tally = self.codes[status] = tallied(child)
        return tally

    def request(self, status: int, seconds: float) -> None:
        self.code(status).value += 1.0
        self.duration.observe(seconds)

    def grpc(self, code: int) -> None:
        """A gRPC call's grpc-status, as the app got it."""
        counter = self._grpc.get(code)
        if counter is None:
            counter = self._grpc[code] = self.metrics.upstream_grpc_requests.labels(
                self.name, str(code)
            )
        counter.inc()

    def overflow(self, reason: str) -> None:
        self.metrics.upstream_overflows.labels(self.name, reason).inc()


#: The metrics with an `upstream` label, and their other labels in order.
_PER_UPSTREAM = {
    "upstream_requests": ("code",),
    "upstream_grpc_requests": ("grpc_status",),
    "upstream_request_duration": (),
    "upstream_endpoints": ("state",),
    "upstream_retries": (),
    "upstream_ejections": (),
    "upstream_overflows": ("reason",),
    "upstream_connections": ("kind",),
}


def prune_series(metrics: AgentMetrics, running: Collection[str]) -> None:
    """Take out of /metrics every series of an upstream not in `running` (by name)."""
    for attribute, others in _PER_UPSTREAM.items():
        metric = getattr(metrics, attribute)
        gone = {
            (sample.labels["upstream"], *(sample.labels[label] for label in others))
            for family in metric.collect()
            for sample in family.samples
            if sample.labels.get("upstream", "") not in running
        }
        for labels in gone:
            metric.remove(*labels)


def _weights(config: Outbound) -> dict[str, int]:
    return {subset.name: subset.weight for subset in config.subsets}


def _before_tls(exc: BaseException) -> bool:
    """A TCP connect that failed: no handshake took place, so none is counted."""
    return isinstance(exc, ConnectionRefusedError) or type(exc) is OSError  # unreachable
