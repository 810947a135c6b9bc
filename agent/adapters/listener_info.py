"""What outrider_listener_info says of each running listener: the port, its protocol and
whether it takes plaintext, so an audit can tell a strict port from a permissive one.

An explicit inbound is strict: mTLS only. The inbound capture listener serves every
port of the pod, each strict or permissive as `captured:` says: a row per port it
names, and one with port `*` for the rest (its default mode). Outbound, the agent
originates the connections: an outbound listener sends mTLS only (strict); the
outbound capture listener passes plaintext on to destinations outside the mesh
unless `captured.policy` is registry-only with no passthrough (then strict).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from agent.adapters.listeners import InboundCapture, Listener, OutboundCapture
from agent.adapters.metrics import ListenerRow
from agent.config import Inbound, Outbound

STRICT, PERMISSIVE = "strict", "permissive"


def listener_rows(listeners: Iterable[Listener[Any]]) -> Iterator[ListenerRow]:
    for listener in listeners:
        config = listener.config
        port = listener.address.rsplit(":", 1)[-1]
        if not port:  # not bound (a listener let go of its address on a refused reload)
            continue
        if isinstance(config, Inbound | Outbound):
            yield ListenerRow(listener.direction, port, config.protocol, STRICT)
        elif isinstance(config, InboundCapture):
            captured = config.captured
            for listed, _ in captured.ports:
                mode = captured.inbound(listed)
                yield ListenerRow("inbound", str(listed), mode.protocol, mode.mtls)
            yield ListenerRow("inbound", "*", "tcp", captured.mtls)
        elif isinstance(config, OutboundCapture):
            captured = config.captured
            closed = captured.policy == "registry-only" and not captured.passthrough
            yield ListenerRow("outbound", port, "tcp", STRICT if closed else PERMISSIVE)
