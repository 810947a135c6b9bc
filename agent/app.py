"""`outrider agent run`: the identity manager, the listeners and the admin server.

Start: admin first (so /healthz answers and /ready says 503), then the first
SVID, then the listeners, then ready. SIGHUP or a change to the config file
reloads it without dropping connections; a bad file keeps the running config.
SIGTERM drains: /ready turns 503, listeners stop accepting, open connections
get up to limits.drain_timeout to finish, then the agent exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
import signal
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent import config as agent_config
from agent.adapters import admin, memory
from agent.adapters.listeners import (
    ConfigT,
    Connections,
    InboundListener,
    Listener,
    OutboundListener,
)
from agent.adapters.metrics import AgentMetrics
from agent.adapters.rotator import IdentityManager, SignFn
from agent.adapters.runtime import Runtime
from agent.adapters.tls import Contexts
from agent.config import AgentConfig, Inbound, Outbound
from agent.core.policy import PolicySet
from agent.core.policyfile import PolicyError, load_policy_files
from agent.core.svid import Svid
from identity.configfile import ConfigError, Listen

log = logging.getLogger("outrider.agent")

#: How often the config file is checked for changes.
WATCH_INTERVAL = 1.0


def utcnow() -> datetime:
    return datetime.now(UTC)


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        *,
        now: Callable[[], datetime] = utcnow,
        rng: random.Random | None = None,
        sign: SignFn | None = None,
    ) -> None:
        self.config = config
        self.metrics = AgentMetrics()
        contexts = Contexts()
        self.runtime = Runtime(
            config.limits, contexts, self.metrics, now, config.identity.spiffe_id
        )
        self.runtime.policies = load_policies(config)  # PolicyError: refuse to start
        self.connections = Connections(self.metrics)
        self.identity = IdentityManager(
            config,
            contexts,
            self.metrics,
            now=now,
            rng=rng or random.SystemRandom(),
            sign=sign,
        )
        self.inbound: dict[Listen, Listener[Inbound]] = {}
        self.outbound: dict[Listen, Listener[Outbound]] = {}
        self.bound: dict[str, str] = {}
        self._listening = False
        self._draining = False
        self._tasks: list[asyncio.Task[None]] = []
        self._admin: admin.Servers | None = None

    @property
    def ready(self) -> bool:
        """Listening, not draining, and holding an SVID that has not expired."""
        svid = self.identity.svid
        serving = self._listening and not self._draining
        return serving and svid is not None and self.runtime.now() < svid.not_after

    @property
    def svid(self) -> Svid | None:
        return self.identity.svid

    @property
    def next_renewal(self) -> datetime | None:
        return self.identity.next_renewal

    async def start(self) -> None:
        self._admin = await admin.serve(self)
        self.bound.update(self._admin.bound)
        self._tasks.append(asyncio.create_task(self.identity.run(), name="identity"))
        churn = memory.return_freed_memory(lambda: self.connections.accepted)
        self._tasks.append(asyncio.create_task(churn, name="memory"))
        await self.identity.has_svid.wait()
        await self._apply_listeners(self.config)
        # What start-up built lives as long as the process: leave it out of every
        # later collection, whose full passes otherwise stall the loop for tens of ms.
        gc.freeze()
        self._listening = True
        log.info(
            "ready as %s: %s",
            self.config.identity.spiffe_id,
            ", ".join(f"{name} {address}" for name, address in self.bound.items()),
        )

    async def reconfigure(self, new: AgentConfig) -> None:
        """Apply a new config; open connections keep going under the old one.

        OSError (a new listener address cannot be bound) changes nothing.
        """
        await self._apply_listeners(new)
        old, self.config = self.config, new
        self.runtime.limits = new.limits
        self.identity.config = new
        self.reload_policies()  # other files, another default action, or other TCP ports
        if (new.identity, new.ca) != (old.identity, old.ca):
            self.identity.renew_now()
        if (new.admin, new.status) != (old.admin, old.status):
            log.warning("admin and status address changes take a restart")
        self.metrics.config_reloads.labels("agent", "ok").inc()
        log.info("config reloaded")

    def reload_policies(self) -> None:
        """Read the policy files again; a bad one keeps the policy in force."""
        try:
            policies = load_policies(self.config)
        except PolicyError as exc:
            self.metrics.config_reloads.labels("policy", "error").inc()
            log.error("policy reload refused, keeping the policy in force:\n  %s", exc)
            return
        if policies != self.runtime.policies:
            self.runtime.policies = policies
            self.metrics.config_reloads.labels("policy", "ok").inc()
            log.info("policy reloaded: %d policies", len(policies.policies))

    async def drain(self) -> None:
        """Stop accepting, let open connections finish up to the drain timeout."""
        self._draining = True
        for running in (self.inbound, self.outbound):
            for listener in running.values():
                listener.close()
        timeout = self.config.limits.drain_timeout.total_seconds()
        log.info("draining %d connection(s) for up to %.0fs", len(self.connections), timeout)
        left = await self.connections.drain(timeout)
        if left:
            log.warning("drain timeout: closed %d connection(s) still open", left)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._admin is not None:
            self._admin.close()

    async def _apply_listeners(self, config: AgentConfig) -> None:
        """Open new listeners, close removed ones, reconfigure the rest in place.

        Every new address is bound before anything else changes: if one cannot
        be bound, the ones just opened are closed and OSError leaves the
        running listeners as they were.
        """
        inbound = {c.listen: (f"inbound[{i}]", c) for i, c in enumerate(config.inbound)}
        outbound = {c.listen: (f"outbound[{c.name}]", c) for c in config.outbound}
        opened_in: dict[Listen, Listener[Inbound]] = {}
        opened_out: dict[Listen, Listener[Outbound]] = {}
        try:
            await self._open(self.inbound, inbound, InboundListener, opened_in)
            await self._open(self.outbound, outbound, OutboundListener, opened_out)
        except OSError:
            for opened in (opened_in, opened_out):
                for listener in opened.values():
                    listener.close()
            raise
        assert self._admin is not None
        self.bound = {
            **self._admin.bound,
            **_commit(self.inbound, opened_in, inbound),
            **_commit(self.outbound, opened_out, outbound),
        }

    async def _open(
        self,
        running: dict[Listen, Listener[ConfigT]],
        wanted: dict[Listen, tuple[str, ConfigT]],
        kind: type[Listener[ConfigT]],
        opened: dict[Listen, Listener[ConfigT]],
    ) -> None:
        """Bind the wanted addresses not yet running, into `opened`."""
        for listen, (_, listener_config) in wanted.items():
            if listen not in running:
                listener = kind(listener_config, self.runtime, self.connections)
                await listener.start(listen)
                opened[listen] = listener


def _commit(
    running: dict[Listen, Listener[ConfigT]],
    opened: dict[Listen, Listener[ConfigT]],
    wanted: dict[Listen, tuple[str, ConfigT]],
) -> dict[str, str]:
    """Swap in the opened listeners, close the unwanted, reconfigure the rest: name -> address."""
    for listen in set(running) - set(wanted):
        listener = running.pop(listen)
        listener.close()
        log.info("closed %s listener %s", listener.direction, listen)
    running.update(opened)
    bound = {}
    for listen, (name, listener_config) in wanted.items():
        running[listen].configure(listener_config)
        bound[name] = running[listen].address
    return bound


async def serve(path: Path | None, config: AgentConfig, stop: asyncio.Event) -> None:
    """Run until `stop` is set (SIGTERM), reloading on SIGHUP or when a file changes.

    The policy files are watched always; the config file too, unless the config
    was given inline (`path` None: the injector's environment variable), which
    is fixed for the process's life. A stop before the first SVID (the CA
    unreachable at start) exits at once.
    """
    agent = Agent(config)
    try:
        if await _unless_stopped(agent.start(), stop):
            await _serve_until(agent, path, stop)
            await agent.drain()
        else:
            log.info("stopped before the agent was ready")
    finally:
        await agent.stop()


async def _unless_stopped(work: Coroutine[Any, Any, object], stop: asyncio.Event) -> bool:
    """Run `work` to its end, or cancel it when `stop` is set first; True if it ended."""
    task, stopped = asyncio.create_task(work), asyncio.create_task(stop.wait())
    await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return False
    task.result()  # raise what start() raised
    return True


async def _serve_until(agent: Agent, path: Path | None, stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    reload = asyncio.Event()
    loop.add_signal_handler(signal.SIGHUP, reload.set)
    watched = lambda: ([path] if path else []) + list(agent.config.policy.files)  # noqa: E731
    watcher = asyncio.create_task(_watch(watched, reload))
    try:
        while await _unless_stopped(reload.wait(), stop):
            reload.clear()
            if path is not None:
                await _reload(agent, path)
            agent.reload_policies()
    finally:
        watcher.cancel()
        loop.remove_signal_handler(signal.SIGHUP)


async def _reload(agent: Agent, path: Path) -> None:
    try:
        new = agent_config.load(path)
    except ConfigError as exc:
        agent.metrics.config_reloads.labels("agent", "error").inc()
        log.error("config reload refused, keeping the running config: %s", exc)
        return
    if new == agent.config:
        return
    try:
        await agent.reconfigure(new)
    except OSError as exc:
        agent.metrics.config_reloads.labels("agent", "error").inc()
        log.error("config reload refused, keeping the running config: %s", exc)


async def _watch(files: Callable[[], list[Path]], reload: asyncio.Event) -> None:
    """Set `reload` when a file's content changes (a ConfigMap update swaps a symlink)."""
    last = _fingerprint(files())
    while True:
        await asyncio.sleep(WATCH_INTERVAL)
        current = _fingerprint(files())
        if current != last:
            last = current
            reload.set()


def _fingerprint(files: list[Path]) -> dict[Path, bytes | None]:
    content: dict[Path, bytes | None] = {}
    for path in files:
        try:
            content[path] = path.read_bytes()
        except OSError:
            content[path] = None
    return content


def load_policies(config: AgentConfig) -> PolicySet:
    """The policy files as one set; PolicyError if any is bad or uses HTTP fields on TCP ports."""
    policies = PolicySet(load_policy_files(config.policy.files), config.policy.default_action)
    tcp_ports = frozenset(i.app.port for i in config.inbound if i.protocol == "tcp")
    errors = policies.http_only_errors(tcp_ports)
    if errors:
        raise PolicyError(errors)
    return policies
