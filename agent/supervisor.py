"""The main process of `workers: N` (N > 1): one identity, one admin port, one config.

It is the agent of agent/app.py with everything that speaks to the outside world
kept in one place: the CA (one CSR per rotation for the whole agent), the control
plane (one stream per pod), the config and policy files and SIGHUP, the Workload
API, and the admin and status ports. It serves no traffic itself: N worker
processes (agent/worker.py) do, each with its own listener on every port
(SO_REUSEPORT: the kernel spreads new connections over them).

What the workers run comes from here, checked once: each SVID (key, chain and
bundle, over the worker's socketpair, never on disk) as it is installed or its
bundle changes, and each config with its policies as start, a reload or a
snapshot settles it. A listener address is bound here first, with SO_REUSEPORT
but never listening (the kernel gives such a socket no connections): that is the
check that the reload may proceed (an address another process holds is refused
before any worker changes), it resolves a `:0` port to one port every worker
shares, and it keeps that port for the agent while a worker restarts.
A worker that refuses a config it was sent (it could not bind) leaves the reload
refused, and the workers that took it go back to the previous one.

A worker that dies is started again, given the SVID and the config, and counted
(outrider_worker_restarts_total); the connections it held are lost, the other
workers' are not. More than MAX_RESTARTS within RESTART_WINDOW and the agent
drains and exits non-zero, so the kubelet restarts it and the pod's events show it.
SIGTERM drains every worker at once: each stops accepting and gives its
connections limits.drain_timeout, as a single process does.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import signal
import socket
import time
from collections.abc import Iterable
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.adapters.ports import cannot_listen
from agent.adapters.workers import (
    SCRAPE_TIMEOUT,
    Merged,
    Restarts,
    Worker,
    end,
    families,
    merge,
    spawn,
)
from agent.app import Agent, Settings, capture_configs
from agent.config import AgentConfig
from agent.core.svid import Svid
from identity.configfile import Listen

log = logging.getLogger("outrider.agent.workers")

#: How long a worker has to take a config (bind its listeners) before the reload is
#: refused and the worker killed (`_take`); the environment may set it (tests do).
APPLY_TIMEOUT = float(os.environ.get("OUTRIDER_WORKER_APPLY_TIMEOUT", "30"))
#: A worker's settings version when it did not answer a switch: none is in force.
UNKNOWN = -1
#: What a new worker gets beyond APPLY_TIMEOUT for its first settings: its interpreter's
#: start and imports, all workers at once on a node that may be busy.
STARTUP = 60.0
#: How often every worker is asked to answer (`_heartbeat`); one that does not within
#: APPLY_TIMEOUT is killed and started again.
HEARTBEAT = APPLY_TIMEOUT / 6
#: Kills of one worker for not answering within STALL_WINDOW past which it is broken,
#: not the node slow (a stall kills every worker once): the agent ends, for the kubelet
#: to start the pod again, as after a crash loop.
MAX_STALLS = 3
STALL_WINDOW = max(20 * APPLY_TIMEOUT, 60.0)
#: Beyond limits.drain_timeout, what a draining worker gets to exit before it is killed.
EXIT_GRACE = 5.0


def _unanswered(worker: Worker, answer: object) -> bool:
    return isinstance(answer, TimeoutError) and worker.process.returncode is None


def _kill(worker: Worker, why: str, *, silent: bool = True) -> None:
    """End a worker whose settings are unknown; the supervisor's `_watch` starts it again.
    `silent`: it did not answer (the supervisor's own doing, never counted against the
    restart budget); else its channel broke, as when it dies on its own (counted)."""
    log.error("worker %d (pid %d): %s; killed, to start again", worker.index, worker.pid, why)
    worker.running, worker.killed = UNKNOWN, worker.killed or silent  # a kill stays one
    with contextlib.suppress(ProcessLookupError):
        os.kill(worker.pid, signal.SIGKILL)


def svid_parts(svid: Svid) -> tuple[bytes, bytes, bytes, str]:
    """What a worker rebuilds `svid` from: key, chain and bundle as PEM, the SPIFFE ID."""
    return svid.key_pem(), svid.chain_pem(), svid.bundle.to_pem(), str(svid.spiffe_id)


def addresses(config: AgentConfig) -> dict[str, Listen]:
    """Each listener's name (as /config_dump and the ready line say it) and address."""
    named = {f"inbound[{i}]": c.listen for i, c in enumerate(config.inbound)}
    named |= {f"outbound[{c.name}]": c.listen for c in config.outbound if c.listen is not None}
    captures = capture_configs(config)
    if captures is not None:
        named["capture[inbound]"] = captures[0].listen
        named["capture[outbound]"] = captures[1].listen
    return named


def resolved(config: AgentConfig, ports: dict[Listen, Listen]) -> AgentConfig:
    """`config` with each listener address as reserved (a `:0` is a port number now)."""
    inbound = tuple(dataclasses.replace(c, listen=ports[c.listen]) for c in config.inbound)
    outbound = tuple(
        c if c.listen is None else dataclasses.replace(c, listen=ports[c.listen])
        for c in config.outbound
    )
    return dataclasses.replace(config, inbound=inbound, outbound=outbound)


def reserve(listen: Listen) -> socket.socket:
    """`listen` bound with SO_REUSEPORT, not listening: OSError if another process holds it."""
    try:
        family = socket.getaddrinfo(listen.host, listen.port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise cannot_listen(exc, str(listen)) from None
    try:
        # As socket.create_server sets them for the workers' listeners, so the kernel
        # counts this socket in the same group.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((listen.host, listen.port))
    except OSError as exc:
        sock.close()
        raise cannot_listen(exc, str(listen)) from None
    return sock


class _WorkerSeries(Collector):
    """outrider_workers, outrider_worker_restarts_total and, per worker, the connections
    it accepted (outrider_worker_connections_total): whether the kernel spreads the load."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def collect(self) -> Iterable[Metric]:
        running = GaugeMetricFamily(
            "outrider_workers", "Worker processes serving the listeners (`workers:`)"
        )
        running.add_metric([], len(self.supervisor.live))
        yield running
        restarts = CounterMetricFamily(
            "outrider_worker_restarts", "Worker processes started again after they died"
        )
        restarts.add_metric([], self.supervisor.restarts.total)
        yield restarts
        accepted = CounterMetricFamily(
            "outrider_worker_connections",
            "Connections each worker process accepted, by worker (0 to workers-1; a "
            "restarted worker counts from 0 again)",
            labels=["worker"],
        )
        for worker in self.supervisor.live:
            accepted.add_metric([str(worker.index)], worker.accepted)
        yield accepted


class Supervisor(Agent):
    """The agent's main process when `workers:` is more than 1 (module docstring)."""

    serves = False  # its workers do: it imports none of what the listeners use

    def __init__(self, config: AgentConfig, count: int, stop: asyncio.Event, **kw: Any) -> None:
        super().__init__(config, **kw)
        self.count = count
        self.stopping = stop  # set to end the agent (workers that cannot stay up)
        self.workers: list[Worker | None] = [None] * count
        #: Each listener address as configured -> its reserving socket.
        self.reserved: dict[Listen, socket.socket] = {}
        #: What the workers run: the settings with every address as reserved; its version.
        self.running: Settings | None = None
        self.version = 0
        self._seq = itertools.count(1)
        self.restarts = Restarts()
        #: Every watcher task, a restarting one included (its worker's replacement has
        #: a watcher of its own by then): each is cancelled on drain and stop.
        self._watchers: set[asyncio.Task[None]] = set()
        #: Workers (pids) killed when every worker stopped answering at once: the node was
        #: slow, so those kills are no sign of a broken worker.
        self._node_stalled: set[int] = set()
        #: When each worker index was last killed for not answering (within STALL_WINDOW).
        self._stalls: dict[int, list[float]] = {}
        self.identity.changed.append(self._hand_identity)
        self.metrics.registry.register(_WorkerSeries(self))
        self.scrape = self._scrape

    @property
    def live(self) -> list[Worker]:
        return [w for w in self.workers if w is not None and w.process.returncode is None]

    @property
    def ready(self) -> bool:
        """As one process's, and every worker runs the config in force."""
        workers = self.live
        serving = len(workers) == self.count and all(w.running == self.version for w in workers)
        return serving and super().ready

    async def start(self) -> None:
        await super().start()
        self._tasks.append(asyncio.create_task(self._heartbeat(), name="heartbeat"))

    async def _heartbeat(self) -> None:
        """Kill a worker that answers nothing within APPLY_TIMEOUT (stopped, or its loop
        stuck): the kernel would go on handing it a share of the new connections, each
        left waiting, while /ready said 200. `_watch` starts it again."""
        while True:
            await asyncio.sleep(HEARTBEAT)
            # One still taking its first settings has STARTUP more (`_take`): not asked.
            seq, workers = next(self._seq), [w for w in self.live if w.running > 0]
            answers = await asyncio.gather(
                *(w.ask(seq, APPLY_TIMEOUT, "ping", seq) for w in workers), return_exceptions=True
            )
            if self._draining or self.stopping.is_set():
                return
            silent = [w for w, a in zip(workers, answers, strict=True) if _unanswered(w, a)]
            for worker in silent:
                _kill(worker, f"no answer to a heartbeat within {APPLY_TIMEOUT:g}s")
            self._stalled(silent, workers)
            for worker, answer in zip(workers, answers, strict=True):
                if isinstance(answer, ConnectionError) and worker.process.returncode is None:
                    _kill(worker, "its channel ended", silent=False)  # not a stall: broken

    async def _run(self, new: Settings) -> None:
        """Reserve `new`'s addresses, have every worker serve it, then switch to it."""
        wanted = {listen for listen in addresses(new.config).values()}
        fresh: dict[Listen, socket.socket] = {}
        try:
            for listen in wanted - self.reserved.keys():
                fresh[listen] = reserve(listen)
            ports = {
                listen: Listen(listen.host, sock.getsockname()[1])
                for listen, sock in {**self.reserved, **fresh}.items()
            }
            running = Settings(resolved(new.config, ports), new.policies)
            await self._everywhere(running)
        except BaseException:
            for sock in fresh.values():
                sock.close()
            raise
        for listen in self.reserved.keys() - wanted:
            self.reserved.pop(listen).close()
        self.reserved.update(fresh)
        config = self.config = new.config
        self.runtime.limits = config.limits
        self.runtime.policies = new.policies
        self.runtime.spiffe_id = config.identity.spiffe_id
        self.identity.config = config
        admin = self._admin.bound if self._admin is not None else {}
        bound = addresses(running.config)
        self.bound = {**admin, **{name: str(listen) for name, listen in bound.items()}}

    async def _everywhere(self, running: Settings) -> None:
        """Every worker serves `running` (started first if need be); OSError, and the
        workers back on the previous settings, if one refuses it. A worker that does
        not answer does not hold the switch back: `_take` kills it, and `_watch` starts
        it again on `running`, in force by then (it waits for the switch to end)."""
        previous, version = self.running, self.version + 1
        for index, worker in enumerate(self.workers):
            if worker is None:
                self.workers[index] = await self._start(index)
        workers = self.live
        answers = await asyncio.gather(
            *(self._take(worker, running, version) for worker in workers), return_exceptions=True
        )
        self._stalled([w for w in workers if w.killed and w.running == UNKNOWN], workers)
        errors = [a for a in answers if a is not None]
        if errors:
            for problem in errors:
                if not isinstance(problem, str | OSError):
                    raise problem
            if previous is not None:
                took = [w for w, a in zip(workers, answers, strict=True) if a is None]
                back = await asyncio.gather(*(self._take(w, previous, self.version) for w in took))
                for worker, refused in zip(took, back, strict=True):
                    if refused is not None:  # on neither: started again on `previous`
                        why = f"refused the settings it ran before: {refused}"
                        _kill(worker, why, silent=False)
            raise OSError(f"a worker refused the config: {errors[0]}")
        self.running, self.version = running, version

    async def _take(self, worker: Worker, settings: Settings, version: int) -> str | None:
        """`worker` serves `settings` as `version`: None once it does, or once it is
        killed for not answering; else why it refused them.

        A worker that does not answer is killed: it may still take the settings late,
        or not, and serve other settings than the rest with nobody the wiser. `_watch`
        starts it again on the settings in force."""
        seq = next(self._seq)
        within = APPLY_TIMEOUT if worker.running else APPLY_TIMEOUT + STARTUP
        try:
            answer = await worker.ask(seq, within, "settings", seq, settings)
        except TimeoutError:
            _kill(worker, f"no answer within {within:g}s")
            return None
        except ConnectionError as exc:  # gone: on its own (a crash), or killed already
            if worker.running != UNKNOWN:
                _kill(worker, str(exc), silent=False)
            return None
        if answer.get("error"):
            return str(answer["error"])
        worker.running = version
        return None

    def _stalled(self, silent: list[Worker], asked: list[Worker]) -> None:
        """Every worker asked stopped answering at once: the node, not one of them."""
        if silent and len(silent) == len(asked):
            self._node_stalled.update(worker.pid for worker in silent)

    async def _start(self, index: int) -> Worker:
        worker = await spawn(index)
        log.info("worker %d started (pid %d)", index, worker.pid)
        if self.identity.svid is not None:
            worker.tell("svid", *svid_parts(self.identity.svid))
        task = asyncio.create_task(self._watch(worker), name=f"worker-{index}")
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)
        return worker

    async def _watch(self, worker: Worker) -> None:
        """Start `worker` again when it dies, unless the agent is ending."""
        code = await worker.process.wait()
        if self._draining or self.stopping.is_set():
            return
        log.error("worker %d (pid %d) exited with %s", worker.index, worker.pid, code)
        now, before = time.monotonic(), self._stalls.get(worker.index, [])
        stalled = worker.killed and worker.pid not in self._node_stalled
        self._node_stalled.discard(worker.pid)
        stalls = [t for t in before if now - t < STALL_WINDOW] + ([now] if stalled else [])
        self._stalls[worker.index] = stalls
        if len(stalls) > MAX_STALLS:
            self.failure = (
                f"worker {worker.index} stopped answering {len(stalls)} times within"
                f" {STALL_WINDOW:g}s: it is broken, not the node slow"
            )
        elif not self.restarts.allow(deliberate=worker.killed):
            self.failure = (
                f"workers died {len(self.restarts.times)} times within a minute; "
                "the last exited with " + str(code)
            )
        if self.failure:
            log.error("%s: giving up", self.failure)
            self.stopping.set()
            return
        async with self._switching:  # not while a reload is being sent to the workers
            replacement = self.workers[worker.index] = await self._start(worker.index)
            if self.running is not None:
                problem = await self._take(replacement, self.running, self.version)
                if problem is not None:  # never left without settings: again, counted
                    _kill(replacement, f"restarted but cannot serve: {problem}", silent=False)

    def _hand_identity(self) -> None:
        """A new SVID or trust bundle: every worker installs it, as a rotation."""
        svid = self.identity.svid
        if svid is None:
            return
        parts = svid_parts(svid)
        for worker in self.live:
            worker.tell("svid", *parts)

    async def _scrape(self) -> bytes:
        """/metrics of the whole agent: this process's and every worker's, merged."""
        seq = next(self._seq)
        workers = self.live
        answers = await asyncio.gather(
            *(w.ask(seq, SCRAPE_TIMEOUT, "scrape", seq) for w in workers), return_exceptions=True
        )
        collected = []
        for worker, answer in zip(workers, answers, strict=True):
            if isinstance(answer, BaseException):
                log.warning("worker %d left out of /metrics: %r", worker.index, answer)
                continue
            worker.accepted = int(answer["accepted"])
            collected.append(answer["families"])
        merged = merge(families(self.metrics.registry), collected)
        return generate_latest(Merged(merged))

    async def drain(self) -> None:
        """Every worker drains at once, as one process does; this one waits for them."""
        self._draining = True
        if self._control_task is not None:
            self._control_task.cancel()
        for task in list(self._watchers):  # a restart waits on a new worker's start
            task.cancel()
        async with self._switching:  # a snapshot being sent finishes first
            workers = self.live
            for worker in workers:
                worker.tell("drain")
        timeout = self.config.limits.drain_timeout.total_seconds()
        log.info("draining %d worker(s) for up to %.0fs", len(workers), timeout)
        await asyncio.gather(*(end(worker, timeout + EXIT_GRACE) for worker in workers))

    async def stop(self) -> None:
        for task in [*self._watchers, *self._tasks]:  # the heartbeat first of all
            task.cancel()
        for worker in self.live:  # stopped before ready, or not drained
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGTERM)
        await asyncio.gather(
            *(end(w, EXIT_GRACE) for w in self.workers if w is not None), return_exceptions=True
        )
        for sock in self.reserved.values():
            sock.close()
        self.reserved.clear()
        await super().stop()
