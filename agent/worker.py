"""A worker process of `workers: N`: `python -m agent.worker FD INDEX`.

It serves the agent's listeners (each bound with SO_REUSEPORT beside the other
workers') and nothing else: it makes no CSR, reads no config or policy file,
subscribes to no control plane and has no admin port. All of that is the main
process's (agent/supervisor.py), which sends over the socketpair FD:
- ("svid", key, chain, bundle, SPIFFE ID): installed as a rotation is
  (IdentityManager.install: new connections use it, pools retire the old);
- ("settings", seq, Settings): the config and policies the main process checked,
  opened and switched to as a reload is; answered {"seq", "error"};
- ("scrape", seq): answered with this process's metrics, for the main's /metrics;
- ("ping", seq): answered {"seq"}: the main's heartbeat, which kills a worker that
  answers nothing (a stalled one would go on being handed connections);
- ("drain",): stop accepting, give open connections limits.drain_timeout, exit 0.
The end of the channel (the main process gone) drains too, as does SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import signal
import socket
import sys
from datetime import UTC, datetime
from typing import Any

from agent.adapters import memory
from agent.adapters.workers import families, from_main, receive, send, to_main
from agent.app import Agent, Settings
from agent.config import AgentConfig, PolicyConfig
from agent.core.svid import Svid
from identity import SpiffeId, TrustBundle, logs, openssl_engine
from identity.cert import Cert, PrivateKey

log = logging.getLogger("outrider.agent.worker")


def worker_view(config: AgentConfig) -> AgentConfig:
    """`config` as a worker runs it: the main process alone writes the SVID's files, talks
    to the control plane, serves the Workload API and reads the policy files (their
    policies arrive checked, in the settings)."""
    return dataclasses.replace(
        config,
        identity=dataclasses.replace(config.identity, output_dir=None),
        control=None,
        workload_api=None,
        policy=PolicyConfig(default_action=config.policy.default_action),
        workers=1,
    )


def rebuilt(key_pem: bytes, chain_pem: bytes, bundle_pem: bytes, spiffe_id: str) -> Svid:
    """The main process's SVID, from what it sent: checked there, as the CA's answer was
    (and kept there, expired or not, as one process keeps it), so taken as it is."""
    key = PrivateKey.from_pem(key_pem)
    chain = tuple(Cert.all_from_pem(chain_pem))
    parsed = SpiffeId.parse(spiffe_id)
    return Svid(parsed, chain, key, TrustBundle.from_pem(parsed.trust_domain, bundle_pem))


class WorkerAgent(Agent):
    """The listeners of agent/app.py's Agent, with identity and settings from the main."""

    def __init__(self, settings: Settings, index: int) -> None:
        super().__init__(worker_view(settings.config))
        self.index = index
        self.runtime.reuse_port = True
        self._expiry: asyncio.TimerHandle | None = None

    def take_svid(self, svid: Svid) -> None:
        self.identity.use(svid)  # as the main checked it and chose its roots
        if self._expiry is not None:
            self._expiry.cancel()
        # Past its NotAfter no pooled connection may carry traffic on it, as in one process.
        left = (svid.not_after - datetime.now(UTC)).total_seconds()
        self._expiry = asyncio.get_running_loop().call_later(max(left, 0), self.identity.expired)

    async def serve(self, settings: Settings) -> None:
        """Serve `settings` (opened and switched to as a reload); OSError changes nothing."""
        new = Settings(worker_view(settings.config), settings.policies)
        first = not self._listening
        await self._apply(new)
        if first:
            churn = memory.return_freed_memory(lambda: self.connections.accepted)
            self._tasks.append(asyncio.create_task(churn, name="memory"))
            gc.freeze()
            self._listening = True
            log.info("worker %d (pid %d) serving: %s", self.index, os.getpid(), self.bound)


async def run(fd: int, index: int) -> None:
    log.info(openssl_engine.install())  # as the main does: before any handshake
    loop = asyncio.get_running_loop()
    ending = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, ending.set)
    channel = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_unix_connection(sock=channel)
    state: dict[str, Any] = {"agent": None, "svid": None}
    messages = asyncio.create_task(_answer(reader, writer, index, state, ending))
    await ending.wait()
    messages.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await messages
    agent: WorkerAgent | None = state["agent"]
    if agent is not None:
        await agent.drain()
        await agent.stop()
    writer.close()


async def _answer(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    index: int,
    state: dict[str, Any],
    ending: asyncio.Event,
) -> None:
    try:
        while (frame := await receive(reader)) is not None:
            kind, *rest = from_main(frame)
            agent: WorkerAgent | None = state["agent"]
            if kind == "svid":
                try:
                    state["svid"] = rebuilt(*rest)
                    if agent is not None:
                        agent.take_svid(state["svid"])
                except Exception:  # a bug of ours: the SVID in use stays, as a failed rotation
                    log.exception("worker %d cannot install the SVID it was sent", index)
            elif kind == "settings":
                seq, settings = rest
                error = None
                try:
                    if agent is None:
                        agent = state["agent"] = WorkerAgent(settings, index)
                        agent.take_svid(state["svid"])
                    await agent.serve(settings)
                except OSError as exc:
                    error = str(exc)
                except Exception as exc:  # a bug of ours: refused, said, and the worker lives
                    log.exception("worker %d cannot serve the config", index)
                    error = repr(exc)
                send(writer, to_main({"seq": seq, "error": error}))
            elif kind == "scrape":
                (seq,) = rest
                collected = families(agent.metrics.registry) if agent is not None else []
                accepted = agent.connections.accepted if agent is not None else 0
                send(writer, to_main({"seq": seq, "families": collected, "accepted": accepted}))
            elif kind == "ping":
                (seq,) = rest
                send(writer, to_main({"seq": seq}))
            elif kind == "drain":
                break
    finally:
        ending.set()  # a drain, or the main process gone: this worker ends too


def main(argv: list[str]) -> None:
    fd, index = int(argv[1]), int(argv[2])
    named = os.environ.get("OUTRIDER_LOG_LEVEL", "").upper()
    logging.basicConfig(
        level=logging.getLevelNamesMapping().get(named, logging.INFO),
        format=f"%(asctime)s %(levelname)s %(name)s[worker {index}]: %(message)s",
        stream=sys.stderr,
    )
    logs.off_the_loop()
    # The main process forwards what concerns the workers: a terminal's Ctrl-C reaches
    # the whole process group, and a SIGHUP is the main's to reload.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    import uvloop

    uvloop.run(run(fd, index))


if __name__ == "__main__":
    main(sys.argv)
