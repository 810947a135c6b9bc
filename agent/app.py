"""`outrider agent run`: the identity manager, the listeners and the admin server.

Start: admin first (so /healthz answers and /ready says 503), then the first
SVID, then the listeners, then ready. SIGHUP or a change to the config file
or a policy file reloads both without dropping connections. Start and every
reload check the config and its policies together (`settle`) and open new
listeners in full before anything switches, so a reload the agent would
refuse at start is refused, and a refused one changes nothing.
With `control:` the listeners wait for the control plane's first snapshot
(agent/adapters/control_plane.py): until then admin and status answer and
/ready says 503. Each snapshot's `inbound`, `outbound` and `policy` replace
the bootstrap's (the config file or variable) and go through the same check
and switch as a reload; a reload of the bootstrap keeps the last snapshot's.
SIGTERM drains: /ready turns 503, listeners stop accepting, connections still
in their handshake close, open connections get up to limits.drain_timeout to
finish, then the agent exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import logging
import os
import random
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from agent import config as agent_config
from agent.adapters import admin, memory
from agent.adapters.bundle_sync import BundleSync
from agent.adapters.listener_info import listener_rows
from agent.adapters.listeners import (
    H2_INBOUND,
    H2_OUTBOUND,
    ConfigT,
    Connections,
    InboundCapture,
    InboundListener,
    Listener,
    OutboundCapture,
    OutboundListener,
)
from agent.adapters.metrics import AgentMetrics
from agent.adapters.rotator import IdentityManager, SignFn
from agent.adapters.runtime import Runtime
from agent.adapters.tls import Contexts
from agent.adapters.tracing import Observer
from agent.adapters.upstreams import prune_series
from agent.config import (
    AgentConfig,
    ControlEndpoint,
    Document,
    Inbound,
    Outbound,
    snapshot_version_error,
    with_snapshot,
)
from agent.core.captured import Captured
from agent.core.policy import PolicySet, duplicates
from agent.core.policyfile import PolicyError, load_policy_files
from agent.core.svid import Svid
from identity import openssl_engine
from identity.appprotocol import H2, L7
from identity.configfile import ConfigError, Listen

if TYPE_CHECKING:  # imported where configured: an agent without them loads none
    from agent.adapters.control_plane import ControlPlaneSubscription
    from agent.adapters.workload_api import WorkloadApiServer

log = logging.getLogger("outrider.agent")

T = TypeVar("T")

#: How often the config file is checked for changes.
WATCH_INTERVAL = 1.0
#: A refused snapshot's reason, as logged and Nacked: the first errors, each cut short.
#: The control plane takes Nacks of 64 KiB at most and ends the stream of a longer one.
NACK_ERRORS, NACK_ERROR_CHARS = 20, 300


def bounded_errors(errors: list[str]) -> list[str]:
    """The first NACK_ERRORS of `errors`, each at most NACK_ERROR_CHARS, and how many more."""
    shown = [e if len(e) <= NACK_ERROR_CHARS else e[:NACK_ERROR_CHARS] + "..." for e in errors]
    if len(shown) > NACK_ERRORS:
        shown = [*shown[:NACK_ERRORS], f"... and {len(shown) - NACK_ERRORS} more errors"]
    return shown


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Settings:
    """What the agent runs: a config and the policies read under it, checked together."""

    config: AgentConfig
    policies: PolicySet


def settle(config: AgentConfig, *, imports: bool = True, start: bool = False) -> Settings:
    """`config` with its policy files, as one whole; PolicyError if they do not fit.

    The one check that start and every reload run, so a reload cannot bring
    in what a restart would refuse. Unless told not to (`imports`: the main process of
    `workers: N` serves no traffic), it imports what `config` uses (`import_used`): at
    `start` before anything else is allocated (imported later, amid start-up's
    short-lived objects, the same modules take more memory), and for a reload or a
    snapshot on the thread that checks it, not on the event loop.
    """
    settings = Settings(config, load_policies(config))
    if imports:
        import_used(config, start=start)
    return settings


Opened = tuple[
    dict[Listen, Listener[Inbound]],
    dict[Listen, Listener[Outbound]],
    dict[Listen, Listener[InboundCapture]],
    dict[Listen, Listener[OutboundCapture]],
]


@dataclass(frozen=True)
class Snapshot:
    """The control plane's snapshot running now: its version and its keys, as sent."""

    version: str
    raw: dict[str, Any]


def pod_name(config: AgentConfig, environ: Mapping[str, str], source: str = "config") -> str | None:
    """The pod the agent names to the control plane: control.pod, else $POD_NAME (the
    injector sets it from the downward API); ConfigError if neither says."""
    if config.control is None:
        return None
    pod = config.control.pod or environ.get("POD_NAME")
    if not pod:
        raise ConfigError(
            source, ["control.pod: required when $POD_NAME is not set: the pod's name"]
        )
    return pod


def check_tracing(config: AgentConfig, environ: Mapping[str, str], source: str = "config") -> None:
    """The OTLP exporter's environment variables (agent/adapters/otlp.py), when tracing is
    on: ConfigError naming one that cannot be used, before the agent starts."""
    if not config.tracing.otlp_endpoint:
        return
    from agent.adapters import otlp

    try:
        otlp.settings(config.tracing.otlp_endpoint, environ)
    except ValueError as error:
        raise ConfigError(source, [f"tracing: {error}"]) from None


def observer(config: AgentConfig, metrics: AgentMetrics) -> Observer | None:
    """Access logs and tracing as configured; None when both are off (nothing to pay)."""
    if not config.access_log.on and not config.tracing.otlp_endpoint:
        return None
    return Observer(
        config.access_log,
        config.tracing,
        str(config.identity.spiffe_id),
        dropped=metrics.access_log_dropped.inc,
        spans_counted=_spans_counted(config, metrics),
    )


def _spans_counted(config: AgentConfig, metrics: AgentMetrics) -> Callable[[str, int], None]:
    """outrider_spans_total's children, bound once and shown from the start at 0; none on
    an agent that sends no spans."""
    if not config.tracing.otlp_endpoint:
        return lambda result, spans: None
    children = {result: metrics.spans.labels(result) for result in ("sent", "dropped")}
    return lambda result, spans: children[result].inc(spans)


class Agent:
    #: Whether this process serves the listeners, and so imports what they use: the main
    #: process of `workers: N` (agent/supervisor.py) does not, its workers do.
    serves: ClassVar[bool] = True

    def __init__(
        self,
        config: AgentConfig,
        *,
        now: Callable[[], datetime] = utcnow,
        rng: random.Random | None = None,
        sign: SignFn | None = None,
        document: Document | None = None,
        pod: str | None = None,
    ) -> None:
        #: The watched files as the last load read them: the watcher's baseline for a file
        #: it has not looked at yet (`serve` adds the config file as it read it at start).
        self.read = _fingerprint(list(config.policy.files))  # as settle reads them next
        settings = settle(config, imports=self.serves, start=True)  # PolicyError: refuse
        self.config = config
        self.last_read = config  # the config file as last read, refused or not
        if config.control is not None and document is None:
            raise ValueError("an agent with control: needs its bootstrap as read (document)")
        #: The bootstrap as read (file or variable): what each snapshot is merged into.
        self.bootstrap = document
        self.snapshot: Snapshot | None = None
        self._switching = asyncio.Lock()  # one reload or snapshot at a time
        self._configured = asyncio.Event()  # the first snapshot runs (with `control:`)
        self.metrics = AgentMetrics(
            config.identity.spiffe_id, control_plane=config.control is not None
        )
        contexts = Contexts()
        self.runtime = Runtime(
            config.limits,
            contexts,
            self.metrics,
            now,
            config.identity.spiffe_id,
            settings.policies,
            observer=observer(config, self.metrics),
        )
        self.connections = Connections(self.metrics)
        self.identity = IdentityManager(
            config,
            contexts,
            self.metrics,
            now=now,
            rng=rng or random.SystemRandom(),
            sign=sign,
        )
        self.bundle_sync = BundleSync(self.identity)
        #: `workload_api:`: the SPIFFE Workload API and SDS for the pod's processes.
        self.workload_api: WorkloadApiServer | None = None
        if config.workload_api is not None:
            from agent.adapters.workload_api import WorkloadApiServer

            self.workload_api = WorkloadApiServer(
                config.workload_api, self.identity, self.metrics, config.ca.backoff
            )
        self.control: ControlPlaneSubscription | None = None
        self._control_task: asyncio.Task[None] | None = None
        if config.control is not None:
            pod = pod or config.control.pod
            if pod is None:
                raise ValueError("an agent with control: needs its pod's name")
            initial = config.control
            from agent.adapters.control_plane import ControlPlaneSubscription

            self.control = ControlPlaneSubscription(
                lambda: self.config.control or initial,
                pod,
                self,
                self.identity,
                self.metrics,
                now=now,
                rng=rng or random.SystemRandom(),
            )
        self.inbound: dict[Listen, Listener[Inbound]] = {}
        self.outbound: dict[Listen, Listener[Outbound]] = {}
        #: The capture listeners (`capture:`), one each at most.
        self.capture_inbound: dict[Listen, Listener[InboundCapture]] = {}
        self.capture_outbound: dict[Listen, Listener[OutboundCapture]] = {}
        self._unused_captured_logged = False
        self.bound: dict[str, str] = {}
        self.metrics.listening(lambda: listener_rows(self._listeners()))
        self._listening = False
        self._draining = False
        self._tasks: list[asyncio.Task[None]] = []
        self._admin: admin.Servers | None = None
        #: /metrics, when more than this process's registry answers it (`workers:`).
        self.scrape: Callable[[], Awaitable[bytes]] | None = None
        #: Why the agent ended on its own, to exit non-zero (workers that would not stay up).
        self.failure: str | None = None

    @property
    def settings(self) -> Settings:
        """What runs now: the config, and the policies in force (in the runtime)."""
        return Settings(self.config, self.runtime.policies)

    def watched(self, path: Path | None) -> list[Path]:
        """The files a reload reads: the config file, and the policy files of the running
        config and of the one last read (a fix to a refused config's new policy file counts)."""
        policies = dict.fromkeys((*self.config.policy.files, *self.last_read.policy.files))
        return ([path] if path else []) + list(policies)

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
    def running_version(self) -> str:
        """The control plane's version of the config running now; "" before the first."""
        return self.snapshot.version if self.snapshot else ""

    @property
    def control_state(self) -> dict[str, Any] | None:
        """For /config_dump: where the config comes from and which version runs."""
        if self.control is None or self.config.control is None:
            return None
        endpoint: ControlEndpoint = self.config.control
        return {
            "address": f"{endpoint.host}:{endpoint.port}",
            "spiffe_id": str(endpoint.spiffe_id),
            "pod": self.control.pod,
            "connected": self.control.connected,
            "version": self.running_version or None,
        }

    @property
    def next_renewal(self) -> datetime | None:
        return self.identity.next_renewal

    async def start(self) -> None:
        self._admin = await admin.serve(self, self.scrape)
        self.bound.update(self._admin.bound)
        self._tasks.append(asyncio.create_task(self.identity.run(), name="identity"))
        churn = memory.return_freed_memory(lambda: self.connections.accepted)
        self._tasks.append(asyncio.create_task(churn, name="memory"))
        await self.identity.has_svid.wait()
        self._tasks.append(asyncio.create_task(self.bundle_sync.run(), name="bundle"))
        if self.workload_api is not None:
            await self.workload_api.start()
        if self.control is not None:
            assert self.config.control is not None
            self._control_task = asyncio.create_task(self.control.run(), name="control")
            self._tasks.append(self._control_task)
            log.info(
                "waiting for the first config from the control plane %s:%d (%s) for pod %s "
                "before listening; /ready says 503 meanwhile",
                self.config.control.host,
                self.config.control.port,
                self.config.control.spiffe_id,
                self.control.pod,
            )
            await self._configured.wait()  # its listeners are open: take_snapshot opened them
        else:
            async with self._switching:  # workers (supervisor.py) restarted meanwhile wait
                await self._run(self.settings)
        # What start-up built lives as long as the process: leave it out of every
        # later collection, whose full passes otherwise stall the loop for tens of ms.
        gc.freeze()
        self._listening = True
        log.info(
            "ready as %s: %s",
            self.config.identity.spiffe_id,
            ", ".join(f"{name} {address}" for name, address in self.bound.items()),
        )

    async def reload(self, path: Path | None) -> None:
        """Read the config file (None: keep the running config) and the policy files again.

        The two apply together, checked as at start, or not at all: a refusal is
        logged with what to fix, counted, and leaves everything as it was.
        Counted as kind "agent" when the config file changed, else "policy".
        """
        kind = "agent" if path is not None else "policy"
        try:
            async with self._switching:  # merged with the snapshot running, not one before it
                read = _fingerprint([path] if path else [])  # as load reads it next
                document, config = self.bootstrap, self.config  # the policy files alone
                if path is not None:
                    document = agent_config.read(path)
                    # Off the loop: merged with a large snapshot, this is seconds of work.
                    config = await _off_loop(self._with_snapshot(document).parse)
                self.last_read = config
                self.read = {**read, **_fingerprint(list(config.policy.files))}  # as settle reads
                kind = "agent" if config != self.config else "policy"
                new = await _off_loop(partial(settle, imports=self.serves), config)
                unchanged = new == self.settings
                if not unchanged:
                    await self._apply(new)
                self.bootstrap = document
            if unchanged:
                return
        except (ConfigError, PolicyError, OSError) as exc:
            self.metrics.config_reloads.labels(kind, "error").inc()
            problems = "\n  ".join(str(exc).splitlines())
            log.error("reload refused, the running config and policy stay; fix:\n  %s", problems)
            return
        self.metrics.config_reloads.labels(kind, "ok").inc()
        log.info(
            "%s reloaded: %d policies",
            "config" if kind == "agent" else "policy",
            len(new.policies.policies),
        )

    def _with_snapshot(self, document: Document) -> Document:
        """The bootstrap `document` with the running snapshot's keys, if one runs."""
        if self.snapshot is None or self.config.control is None:
            return document
        return with_snapshot(document, self.snapshot.raw, source=document.source)

    async def take_snapshot(self, version: str, config_json: bytes) -> str | None:
        """Run a control-plane snapshot as a reload would: None once it runs, else why not.

        Its keys replace the bootstrap's and the whole is checked by the one
        parser and `settle`, then switched to at once (open connections keep
        going). A refused one changes nothing: the reason, with its key paths,
        is logged, counted and returned for the Nack (bounded: the control
        plane ends a stream whose Nack is too long, and would send it again).
        """
        problem = snapshot_version_error(version)
        if problem is not None:
            return self._refused("(unusable)", [problem])
        source = f"snapshot {version}"
        try:
            async with self._switching:  # merged into the bootstrap as last reloaded
                if self._draining:  # the drain closed the listeners: open none
                    return self._refused(version, ["(top): the agent is shutting down"])
                assert self.bootstrap is not None  # an agent with control: has one
                # Checked on a thread: near its 4 MiB bound a snapshot takes seconds to
                # read, and the event loop serves traffic and probes meanwhile. Pure work:
                # a snapshot names no files (policy.files is refused).
                raw, config, new = await _off_loop(
                    _check_snapshot, self.bootstrap, config_json, source, self.serves
                )
                if self.snapshot == Snapshot(version, raw):
                    return None  # a resync after a reconnect: nothing changed
                if new != self.settings or not self._configured.is_set():
                    await self._apply(new)
                self.snapshot = Snapshot(version, raw)
                self.last_read = config
        except (ConfigError, PolicyError) as exc:
            return self._refused(version, exc.errors)
        except OSError as exc:
            return self._refused(version, [f"a listener cannot open: {exc}"])
        self.metrics.control_plane_updates.labels("applied").inc()
        log.info(
            "config version %s from the control plane runs: %d inbound, %d outbound, %d policies",
            version,
            len(config.inbound),
            len(config.outbound),
            len(new.policies.policies),
        )
        self._configured.set()
        return None

    def _refused(self, version: str, errors: list[str]) -> str:
        self.metrics.control_plane_updates.labels("rejected").inc()
        shown = bounded_errors(errors)
        log.error(
            "config version %s from the control plane refused; version %s keeps running; "
            "fix:\n  %s",
            version,
            self.running_version or "(none yet: not listening)",
            "\n  ".join(shown),
        )
        return "\n".join(shown)

    async def reconfigure(self, config: AgentConfig) -> None:
        """Switch to `config` and its policy files; open connections keep going under the old.

        PolicyError (the policies do not fit it) or OSError (a new listener
        address cannot be bound) changes nothing.
        """
        new = settle(config, imports=self.serves)
        async with self._switching:
            await self._apply(new)

    async def _run(self, new: Settings) -> None:
        """Serve `new`: its listeners opened, then switched to; OSError changes nothing."""
        self._switch(new, await self._open(new.config))

    async def _apply(self, new: Settings) -> None:
        old = self.config
        if self.serves and unimported(new.config):  # settled elsewhere: a worker's, say
            await _off_loop(import_used, new.config)
        await self._run(new)
        if (new.config.identity, new.config.ca) != (old.identity, old.ca):
            self.identity.renew_now()
        if new.config.control != old.control and self.control is not None:
            # A stream to the control plane the bootstrap no longer names (another
            # address, another SPIFFE ID: the old one may be distrusted) ends now.
            self.control.resubscribe("control: changed in the bootstrap")
        if (new.config.admin, new.config.status) != (old.admin, old.status):
            log.warning("admin and status address changes take a restart")
        if new.config.workload_api != old.workload_api:
            log.warning("workload_api changes take a restart")
        if new.config.workers != old.workers:
            log.warning("workers changes take a restart")

    async def drain(self) -> None:
        """Stop accepting, let open connections finish up to the drain timeout."""
        self._draining = True
        if self._control_task is not None:
            self._control_task.cancel()  # no snapshot may open a listener now
        async with self._switching:  # a snapshot being applied (shielded) opens first
            for listener in self._listeners():
                listener.close()
        self.runtime.close_pending()
        timeout = self.config.limits.drain_timeout.total_seconds()
        log.info("draining %d connection(s) for up to %.0fs", len(self.connections), timeout)
        left = await self.connections.drain(timeout)
        if left:
            log.warning("drain timeout: closed %d connection(s) still open", left)

    async def stop(self) -> None:
        """Undo what start did, in reverse: listeners (if drain has not), tasks, admin."""
        for listener in reversed(self._listeners()):
            listener.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.workload_api is not None:
            await self.workload_api.close()
        if self._admin is not None:
            self._admin.close()
        if self.runtime.observer is not None:  # its last lines; queued spans, bounded
            await asyncio.to_thread(self.runtime.observer.close)

    async def _open(self, config: AgentConfig) -> Opened:
        """A listener for each of `config`'s addresses not served yet: built, bound, started.

        Every address is bound before any listener starts. On any failure
        (OSError: an address in use) what was opened is closed again, in
        reverse, and the running listeners are as they were (one that let go
        of its port for a move takes it back).
        """
        captures = capture_configs(config)
        async with contextlib.AsyncExitStack() as undo:
            undo.callback(self._prune_series)  # last: the running set's series stay
            self._release_moved(undo, config)
            inbound = self._bind(undo, self.inbound, config.inbound, InboundListener)
            outbound = self._bind(undo, self.outbound, _listened(config), OutboundListener)
            capture_inbound: dict[Listen, Listener[InboundCapture]] = {}
            capture_outbound: dict[Listen, Listener[OutboundCapture]] = {}
            if captures is not None:
                from agent.adapters.capture_listeners import (
                    InboundCaptureListener,
                    OutboundCaptureListener,
                )

                capture_inbound = self._bind(
                    undo, self.capture_inbound, captures[:1], InboundCaptureListener
                )
                capture_outbound = self._bind(
                    undo, self.capture_outbound, captures[1:], OutboundCaptureListener
                )
            opened = (inbound, outbound, capture_inbound, capture_outbound)
            for listener in [l for running in opened for l in running.values()]:  # noqa: E741
                await listener.start()
            undo.pop_all()  # all opened: from here on they are the caller's
        return opened

    def _listeners(self) -> list[Listener[Any]]:
        """Every running listener: inbound ones first, the capture ones last."""
        running = (self.inbound, self.outbound, self.capture_inbound, self.capture_outbound)
        return [listener for listeners in running for listener in listeners.values()]

    def _release_moved(self, undo: contextlib.AsyncExitStack, config: AgentConfig) -> None:
        """Running listeners `config` drops whose port one of its new addresses overlaps
        (127.0.0.1:P -> 0.0.0.0:P): the kernel would refuse the new bind beside them, so
        they let go first, and take the address back if the reload is refused."""
        wanted = {c.listen for c in config.inbound} | {_address(c) for c in _listened(config)}
        wanted |= {c.listen for c in capture_configs(config) or ()}
        running: dict[Listen, Listener[Any]] = {
            _address(listener.config): listener for listener in self._listeners()
        }
        new = wanted - running.keys()
        for listen, listener in running.items():
            if listen not in wanted and any(listen.clashes(other) for other in new):
                listener.release()
                undo.push_async_callback(_retake, listener)

    def _bind(
        self,
        undo: contextlib.AsyncExitStack,
        running: dict[Listen, Listener[ConfigT]],
        wanted: tuple[ConfigT, ...],
        kind: type[Listener[ConfigT]],
    ) -> dict[Listen, Listener[ConfigT]]:
        opened: dict[Listen, Listener[ConfigT]] = {}
        for listener_config in wanted:
            listen = _address(listener_config)
            if listen not in running:
                listener = kind(listener_config, self.runtime, self.connections)
                undo.callback(listener.close)
                listener.bind(listen)
                opened[listen] = listener
        return opened

    def _switch(self, new: Settings, opened: Opened) -> None:
        """Run `new` from the next connection on, in one step (nothing here awaits)."""
        config = self.config = new.config
        self.runtime.limits = config.limits
        self.runtime.policies = new.policies
        self.runtime.spiffe_id = config.identity.spiffe_id  # as start derived it
        self.identity.config = config
        self.identity.reconfigured()  # tls: resumption
        inbound = {c.listen: (f"inbound[{i}]", c) for i, c in enumerate(config.inbound)}
        outbound = {_address(c): (f"outbound[{c.name}]", c) for c in _listened(config)}
        captures = capture_configs(config)
        capture_in = {c.listen: ("capture[inbound]", c) for c in captures[:1]} if captures else {}
        capture_out = {c.listen: ("capture[outbound]", c) for c in captures[1:]} if captures else {}
        self.bound = {
            **(self._admin.bound if self._admin is not None else {}),  # a worker has none
            **_commit(self.inbound, opened[0], inbound),
            **_commit(self.outbound, opened[1], outbound),
        }
        if captures is not None or self.capture_inbound or self.capture_outbound:
            self._switch_captures(opened, capture_in, capture_out)
        if captures is None and config.captured != Captured() and not self._unused_captured_logged:
            self._unused_captured_logged = True
            log.info("captured: is set but capture: is not (no traffic is captured): unused")
        self._prune_series()

    def _switch_captures(
        self,
        opened: Opened,
        capture_in: dict[Listen, tuple[str, InboundCapture]],
        capture_out: dict[Listen, tuple[str, OutboundCapture]],
    ) -> None:
        """`_switch`'s part for the capture listeners: opened, running or closing now."""
        from agent.adapters.capture_listeners import (
            InboundCaptureListener,
            OutboundCaptureListener,
        )

        explicit = {
            listener.config.name: listener.live
            for listener in self.outbound.values()
            if isinstance(listener, OutboundListener)
        }
        for listener in [*opened[3].values(), *self.capture_outbound.values()]:
            assert isinstance(listener, OutboundCaptureListener)
            listener.explicit = explicit  # before configure: it keeps only what these lack
        _hand_over(self.capture_inbound, opened[2], capture_in)
        _hand_over(self.capture_outbound, opened[3], capture_out)
        self.bound.update(_commit(self.capture_inbound, opened[2], capture_in))
        self.bound.update(_commit(self.capture_outbound, opened[3], capture_out))
        # The ports as bound (a config may say :0): never relayed to as an app's.
        bound_ports = frozenset(Listen.parse(address).port for address in self.bound.values())
        for capture_listener in self.capture_inbound.values():
            assert isinstance(capture_listener, InboundCaptureListener)
            capture_listener.bound_ports = bound_ports

    def _prune_series(self) -> None:
        """/metrics shows the upstreams of the running config, and no other."""
        prune_series(self.metrics, {upstream.name for upstream in self.config.outbound})


def capture_configs(config: AgentConfig) -> tuple[InboundCapture, OutboundCapture] | None:
    """What the two capture listeners serve under `config`; None without `capture:`, and
    then their module (agent/adapters/capture_listeners.py) is not loaded."""
    if config.capture is None:
        return None
    from agent.adapters import capture_listeners

    return capture_listeners.capture_configs(config)


def import_used(config: AgentConfig, *, start: bool = False) -> None:
    """Import the modules of what `config` uses that an agent loads only when one does,
    before it applies (start, a reload, a control-plane snapshot, a worker's settings):
    the first connection to use one then waits on no import (the h2 stack is 20-30 ms
    of CPU), and an agent that never uses one never pays its memory. Each is imported
    where it is built too, so this only moves the wait: `settle` calls it (at start,
    and on the thread that checks a reload or a snapshot), `_apply` for what was
    settled elsewhere (a worker's), off the event loop.
    """
    for name in unimported(config, start=start):
        importlib.import_module(name)


def unimported(config: AgentConfig, *, start: bool = False) -> list[str]:
    """The modules `config` uses that are not imported yet.

    The h2 stack (agent/adapters/listeners.py, H2_INBOUND and H2_OUTBOUND): an inbound
    (or captured) port that speaks `http2` or `grpc`, or `http`, which an h2 peer may
    pick by ALPN; an upstream that speaks `http2` or `grpc`. The capture listeners with
    `capture:`. At `start`, the h2 stack for an agent with `control:` too: its ports
    come with the first snapshot, after start-up, where the same modules took 2.3 MiB
    of idle RSS rather than 0.5 (the injected sidecar's usual `http` port); an agent
    whose snapshots never use it pays 0.7 MiB for that.
    """
    modules: list[str] = []
    if start and config.control is not None:
        modules += (*H2_INBOUND, *H2_OUTBOUND)
    ports = [item.protocol for item in config.inbound]
    if config.capture is not None:
        modules.append("agent.adapters.capture_listeners")
        ports += [override.protocol for _, override in config.captured.ports]
    if any(protocol in L7 for protocol in ports):
        modules += H2_INBOUND
    if any(item.protocol in H2 for item in config.outbound):
        modules += H2_OUTBOUND
    return [name for name in dict.fromkeys(modules) if name not in sys.modules]


def _listened(config: AgentConfig) -> tuple[Outbound, ...]:
    """The outbound entries with a listener; the others serve captured destinations only."""
    return tuple(item for item in config.outbound if item.listen is not None)


def _address(config: Inbound | Outbound | InboundCapture | OutboundCapture) -> Listen:
    """A listener's address (an outbound entry without one has no listener)."""
    assert config.listen is not None
    return config.listen


async def _retake(listener: Listener[Any]) -> None:
    try:
        await listener.retake()
    except OSError as exc:  # taken meanwhile: the reload is refused all the same
        log.error("%s listener %s lost: %s", listener.direction, listener.config.listen, exc)


def _hand_over(
    running: dict[Listen, Listener[ConfigT]],
    opened: dict[Listen, Listener[ConfigT]],
    wanted: Mapping[Listen, object],
) -> None:
    """A capture port moved (a new listener, the old one closing): the new one takes the
    plain connections the old one let through, so that a port made strict, or an outbound
    policy made registry-only, closes them too; its configure would not see them else."""
    from agent.adapters.capture_listeners import InboundCaptureListener, OutboundCaptureListener

    leaving = [running[listen] for listen in set(running) - set(wanted)]
    for listener in opened.values():
        for old in leaving:
            if isinstance(listener, InboundCaptureListener):
                assert isinstance(old, InboundCaptureListener)
                listener.plaintext.update(old.plaintext)
            elif isinstance(listener, OutboundCaptureListener):
                assert isinstance(old, OutboundCaptureListener)
                listener.passed.update(old.passed)


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


async def serve(
    path: Path | None,
    config: AgentConfig,
    stop: asyncio.Event,
    *,
    document: Document | None = None,
    pod: str | None = None,
) -> None:
    """Run until `stop` is set (SIGTERM), reloading on SIGHUP or when a file changes.

    The policy files are watched always; the config file too, unless the config
    was given inline (`path` None: the injector's environment variable), which
    is fixed for the process's life. A stop before the first SVID (the CA
    unreachable at start) exits at once. `document` is `config` as read (what
    the control plane's snapshots merge into); `pod` the pod's name for it.
    """
    log.info(openssl_engine.install())  # before any handshake: see identity.openssl_engine
    read = _fingerprint([path] if path else [])  # what the caller just loaded `config` from
    if document is None and path is not None:
        document = agent_config.read(path)
    pod = pod or pod_name(config, os.environ)
    count = worker_count(config)
    agent: Agent
    if count == 1:  # one process, as ever: nothing of the workers' is loaded
        agent = Agent(config, document=document, pod=pod)
    else:
        from agent.supervisor import Supervisor

        agent = Supervisor(config, count, stop, document=document, pod=pod)
    agent.read.update(read)
    loop = asyncio.get_running_loop()
    reload = asyncio.Event()
    # Handled from start to exit: SIGHUP's default action ends the process, so one
    # (a config reloader's) before the first SVID or during the drain would kill the
    # agent and cut off what is in flight. Before serving it is a reload once ready;
    # during the drain, nothing.
    loop.add_signal_handler(signal.SIGHUP, reload.set)
    try:
        if await _unless_stopped(agent.start(), stop):
            await _serve_until(agent, path, stop, reload)
            await agent.drain()
        else:
            log.info("stopped before the agent was ready")
    finally:
        await agent.stop()
        loop.remove_signal_handler(signal.SIGHUP)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # not the default (exit) as it ends
    if agent.failure:  # exit non-zero: the kubelet restarts the container, and shows it
        raise SystemExit(f"agent: {agent.failure}")


def worker_count(config: AgentConfig) -> int:
    """`workers:` as a number: "auto" is the CPUs this process may use (its affinity mask,
    and its cgroup's CPU quota, which a Kubernetes CPU limit becomes)."""
    if config.workers != "auto":
        return config.workers
    from agent.core.workers import usable_cpus

    return usable_cpus(len(os.sched_getaffinity(0)), _cpu_max(Path("/sys/fs/cgroup")))


def _cpu_max(cgroup: Path) -> str | None:
    """The cgroup's CPU quota as cgroup v2's `cpu.max` says it ("max 100000": none), read
    from v2 or from v1's cpu controller; None when neither is mounted."""
    try:
        return (cgroup / "cpu.max").read_text()
    except OSError:
        pass
    try:
        quota = (cgroup / "cpu" / "cpu.cfs_quota_us").read_text().strip()
        period = (cgroup / "cpu" / "cpu.cfs_period_us").read_text().strip()
    except OSError:
        return None
    return f"{'max' if quota == '-1' else quota} {period}"


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


async def _serve_until(
    agent: Agent, path: Path | None, stop: asyncio.Event, reload: asyncio.Event
) -> None:
    watcher = asyncio.create_task(_watch(lambda: agent.watched(path), lambda: agent.read, reload))
    try:
        while await _unless_stopped(reload.wait(), stop):
            reload.clear()
            agent.bundle_sync.wake()  # SIGHUP also asks the CA for its bundle
            await agent.reload(path)
    finally:
        watcher.cancel()


async def _watch(
    files: Callable[[], list[Path]],
    read: Callable[[], dict[Path, bytes | None]],
    reload: asyncio.Event,
) -> None:
    """Set `reload` when a file's content changes (a ConfigMap update swaps a symlink).

    A file starts as the load that named it read it (`read`: at start, or the
    reload that brought it into the set), not as it is at the watcher's first
    look, so an edit or a fix written in between is a change.
    """
    last = read()
    while True:
        await asyncio.sleep(WATCH_INTERVAL)
        current = _fingerprint(files())
        last = {**read(), **last}
        changed = any(current[path] != last[path] for path in current.keys() & last.keys())
        last = current
        if changed:
            reload.set()


def _fingerprint(files: list[Path]) -> dict[Path, bytes | None]:
    content: dict[Path, bytes | None] = {}
    for path in files:
        try:
            content[path] = path.read_bytes()
        except OSError:
            content[path] = None
    return content


def _check_snapshot(
    bootstrap: Document, data: bytes, source: str, imports: bool
) -> tuple[dict[str, Any], AgentConfig, Settings]:
    """A snapshot merged into `bootstrap` and settled: what take_snapshot switches to."""
    raw, config = agent_config.parse_snapshot(bootstrap, data, source=source)
    return raw, config, settle(config, imports=imports)


async def _off_loop(work: Callable[..., T], *args: Any) -> T:
    """`work(*args)` on a thread, with the collector paused: reading a config near a
    snapshot's 4 MiB bound takes seconds, which the event loop spends serving traffic and
    probes instead, and its millions of new objects made each full collection stop every
    thread, the loop's too, for over half a second. A thread of its own that ends with the
    work: the agent keeps no idle pool for a reload now and then."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def answer(result: T | None, error: BaseException | None) -> None:
        if done.cancelled():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result = _collector_paused(work, *args)
        except BaseException as exc:  # handed to the awaiting coroutine
            loop.call_soon_threadsafe(answer, None, exc)
        else:
            loop.call_soon_threadsafe(answer, result, None)

    threading.Thread(target=run, name="outrider-config", daemon=True).start()
    return await done


def _collector_paused(work: Callable[..., T], *args: Any) -> T:
    enabled = gc.isenabled()
    gc.disable()
    try:
        return work(*args)
    finally:
        if enabled:
            gc.enable()


def load_policies(config: AgentConfig) -> PolicySet:
    """The policy files and the inline policies as one set; PolicyError if any is bad, two
    share a name, or one uses HTTP fields on TCP ports."""
    combined = (*load_policy_files(config.policy.files), *config.policy.policies)
    clashes = duplicates(combined)  # each source has none within itself: checked as read
    if clashes:
        raise PolicyError(clashes)
    policies = PolicySet(combined, config.policy.default_action)
    tcp_ports = frozenset(i.app.port for i in config.inbound if i.protocol == "tcp")
    if config.capture is not None:  # the captured ports it names (any other is tcp too)
        tcp_ports |= {port for port, o in config.captured.ports if o.protocol == "tcp"}
    errors = policies.http_only_errors(tcp_ports)
    if errors:
        raise PolicyError(errors)
    return policies
