"""`outrider control serve` as a real process, against agents that lie or misbehave.

An agent is authenticated, but what it says is its own text: the versions it
acks or nacks, its Nack's error, the version it claims to run. None of it may
forge what an operator reads in /debug/agents or `outrider proxy-status`. And
it is authenticated only as long as its SVID lasts.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.encoding.base import CodecBase
from grpclib.exceptions import GRPCError, StreamTerminatedError

from identity.proto import control_pb2
from identity.proto.control_grpc import ControlPlaneStub
from tests.apiserver import FakeApiServer, fake_api_server
from tests.certs import Shape, SigningCa, issue
from tests.control_process import (
    NAMESPACES,
    ControlProcess,
    eventually,
    outrider,
    pod,
    subscribed,
)
from tests.control_process import TestCa as CaDirectory  # not a test class
from tests.support import scraped

REFUSALS = 300
FORGED_ROW = "shop/admin  spiffe://example.org/ns/shop/sa/admin  0123456789abcdef  SYNCED"


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[FakeApiServer]:
    async with fake_api_server(tmp_path / "api") as server:
        server.apply(NAMESPACES)
        server.apply(pod("shop", "web", "web"))
        yield server


async def test_an_agents_answers_cannot_forge_rows_or_escapes_in_proxy_status(
    control: ControlProcess,
) -> None:
    claimed = "\x1b[2Jv\n" + FORGED_ROW
    credential = control.ca.workload("shop", "web")
    async with subscribed(control, credential, "web", running_version=claimed) as agent:
        version, _ = await agent.next()  # what it claims to run is no version: it is sent one
        await agent.ack("\x1b[31mnever sent\n" + FORGED_ROW)
        await agent.nack(version, "policy: bad\x1b[2J\n" + FORGED_ROW + "\x07")

        async def nacked() -> bool:
            return (await control.debug("/debug/agents"))[1][0]["nack"] is not None

        await eventually(nacked)
        (shown,) = (await control.debug("/debug/agents"))[1]
        table = await outrider("proxy-status", "--control", control.debug_url)
    assert shown["sent"] == shown["latest"] == version
    assert shown["acked"] is None  # an Ack of a version never sent is no Ack
    assert shown["nack"] == {"version": version, "error": f"policy: bad[2J; {FORGED_ROW}"}
    assert table.returncode == 0, table.stderr
    _, row = table.stdout.splitlines()  # one agent, one row
    assert row.startswith("shop/web ") and "\x1b" not in table.stdout and "\x07" not in row
    assert not any("\x1b" in line for line in control.log)


async def test_a_late_ack_of_a_version_sent_before_is_recorded(
    control: ControlProcess, api: FakeApiServer
) -> None:
    async with subscribed(control, control.ca.workload("shop", "web"), "web") as agent:
        first, _ = await agent.next()
        api.apply(pod("shop", "web", "web").replace("app: web", "app: web, tier: x"))
        api.apply(
            "apiVersion: security.outrider.io/v1alpha1\nkind: AuthorizationPolicy\n"
            "metadata: {name: deny, namespace: shop}\nspec: {}\n"
        )
        second, _ = await agent.next()
        await agent.ack(first)  # the answer to the first push, after the second one left

        async def acked() -> bool:
            return bool((await control.debug("/debug/agents"))[1][0]["acked"] == first)

        await eventually(acked)
        await agent.ack(second)

        async def synced() -> bool:
            return bool((await control.debug("/debug/agents"))[1][0]["acked"] == second)

        await eventually(synced)


async def test_a_subscription_ends_when_the_svid_it_was_opened_with_expires(
    control: ControlProcess,
) -> None:
    """A healthy agent reconnects with each renewed SVID; one whose SVID expired (it cannot
    renew: its pod is gone, its key was taken) is authenticated no more."""
    shape = Shape(uris=("spiffe://example.org/ns/shop/sa/web",), valid_until=timedelta(seconds=3))
    short_lived = issue(SigningCa.load(control.ca.directory), shape)
    started = 0.0
    with pytest.raises(GRPCError) as ended:  # the stream's status, as the stream closes
        async with subscribed(control, short_lived, "web") as agent:
            await agent.next()
            started = time.monotonic()
            async with asyncio.timeout(8):  # until the stream ends (a newer snapshot may
                while await agent.stream.recv_message() is not None:  # come first)
                    pass
                # The stream ended in trailers before the connection went: raise their
                # status (`subscribed` cancels the stream, trailers unread), or, if the
                # connection is gone by now, the stream's exit raises it from them.
                await agent.stream.end()
                await agent.stream.recv_trailing_metadata()
    assert ended.value.status == Status.UNAUTHENTICATED
    assert "expired" in str(ended.value.message)
    assert time.monotonic() - started < 4


async def test_an_agent_repeating_a_nack_is_logged_once(control: ControlProcess) -> None:
    """A Nack costs the agent a few bytes and the control plane a log line of up to
    2,000 characters: repeated, it is logged once."""
    async with subscribed(control, control.ca.workload("shop", "web"), "web") as agent:
        version, _ = await agent.next()
        for _ in range(200):
            await agent.nack(version, "policy: " + "x" * 1900)
        await agent.nack(version, "policy: the last word")

        async def last_word() -> bool:
            (shown,) = (await control.debug("/debug/agents"))[1]
            return bool(shown["nack"]["error"] == "policy: the last word")

        await eventually(last_word)

        async def logged() -> bool:
            return any("the last word" in line for line in control.log)

        await eventually(logged)  # the process's stderr is read as it comes
    refused = [line for line in control.log if "refused version" in line]
    assert len(refused) == 2, f"{len(refused)} lines for 2 distinct Nacks"


async def test_connections_verified_by_a_root_the_bundle_lost_are_ended(
    control: ControlProcess, tmp_path: Path
) -> None:
    """A root removed from the bundle (rotated out after a compromise) stops being
    trusted at once: not only for new handshakes, but for the agents connected with it."""
    started = 0.0
    with pytest.raises(StreamTerminatedError):
        async with subscribed(control, control.ca.workload("shop", "web"), "web") as agent:
            await agent.next()
            started = time.monotonic()
            replacement = CaDirectory.create(tmp_path / "new-ca")
            (tmp_path / "svid" / "bundle.pem").write_bytes(replacement.bundle_pem)
            async with asyncio.timeout(8):
                await agent.stream.recv_message()
    assert time.monotonic() - started < 4
    assert any("the trust bundle lost a root" in line for line in control.log)


async def test_a_refusal_asked_again_and_again_is_counted_each_time_and_logged_once(
    control: ControlProcess,
) -> None:
    """An SVID of the namespace but another service account, asking for the pod in a
    loop on one connection: a log line each time would be a flood of the caller's making."""
    channel = control.channel(control.ca.workload("shop", "intruder"))
    hello = control_pb2.AgentMessage(hello=control_pb2.Hello(pod_name="web"))
    refused = 0
    try:
        for _ in range(REFUSALS):
            with contextlib.suppress(GRPCError):
                async with ControlPlaneStub(channel).Subscribe.open() as stream:
                    await stream.send_message(hello)
                    await stream.recv_message()
            refused += 1
    finally:
        channel.close()
    _, metrics = await control.debug("/metrics")
    assert scraped(metrics, "outrider_control_subscriptions_denied_total") == REFUSALS
    assert sum("subscription refused" in line for line in control.log) == 1


class _Bytes(CodecBase):
    """Sends bytes as they are: what a broken or hostile client puts on the wire."""

    __content_subtype__ = "proto"

    def encode(self, message: Any, message_type: Any) -> bytes:
        return message if isinstance(message, bytes) else bytes(message.SerializeToString())

    def decode(self, data: bytes, message_type: Any) -> Any:
        return data


@pytest.mark.parametrize("after_hello", [False, True])
async def test_a_message_that_is_no_protobuf_is_invalid_argument_not_a_logged_traceback(
    control: ControlProcess, after_hello: bool
) -> None:
    context = control.client_context(control.ca.workload("shop", "web"))
    channel = Channel("127.0.0.1", control.grpc_port, ssl=context, codec=_Bytes())
    path = "/outrider.control.v1.ControlPlane/Subscribe"
    hello = control_pb2.AgentMessage(hello=control_pb2.Hello(pod_name="web"))
    try:
        with pytest.raises(GRPCError) as refused:
            async with channel.request(path, Cardinality.STREAM_STREAM, None, None) as stream:
                if after_hello:
                    await stream.send_message(hello)
                    await stream.recv_message()
                await stream.send_message(b"\xff\xff\xff", end=True)
                while await stream.recv_message() is not None:  # raises if trailers-only
                    pass
                await stream.recv_trailing_metadata()  # raises the status otherwise
    finally:
        channel.close()
    assert refused.value.status == Status.INVALID_ARGUMENT
    assert "not a well-formed AgentMessage" in str(refused.value.message)
    assert not any("Traceback" in line or "Application error" in line for line in control.log)
