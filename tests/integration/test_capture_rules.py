"""The capture rules, applied with real nftables in real pods, send each connection where
they should, and the agent learns where it was going (SO_ORIGINAL_DST).

Each test makes its pods (network namespaces, tests/netns.py), applies the rules
in one, and connects with sockets of this process made inside the pods: a socket
made here belongs to root, a UID other than the agent's, so the rules capture it
as they capture an app. Only the agent's UID needs a process of its own.
"""

from __future__ import annotations

import asyncio
import select
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from agent.adapters.capture import original_destination
from agent.adapters.nft import Nft
from identity.capture import HANDOFF_SOURCE, CaptureRules, remove_script, ruleset
from identity.injected import AGENT_UID
from tests.netns import Pod, PodNetwork

TIMEOUT = 5.0


def apply(pod: Pod, nft: str, rules: CaptureRules) -> None:
    """As `outrider capture apply` does, in `pod`: the rules, and the hand-off source on lo."""
    Nft((*pod.prefix, nft)).apply(ruleset(rules))
    add = "import sys\nfrom agent.adapters.netlink import add_to_loopback as add\nadd(sys.argv[1])"
    pod.run([sys.executable, "-c", add, HANDOFF_SOURCE[6]])


@contextmanager
def listening(
    pod: Pod, host: str, port: int, family: socket.AddressFamily = socket.AF_INET
) -> Iterator[socket.socket]:
    """A listening socket in `pod`; `waiting(listener)` takes what reached it."""
    listener = pod.socket(family)
    with listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(16)
        listener.setblocking(False)
        yield listener


def waiting(listener: socket.socket, within: float = 0.0) -> socket.socket | None:
    """The connection that reached `listener` (waiting up to `within` seconds), if one did.

    connect() returns when the client has the server's SYN-ACK; the client's last
    ACK, which queues the connection for accept(), may still be on its way through
    the bridge: whatever must arrive is waited for. What must not arrive is checked
    after what must has arrived elsewhere, so it could not be late.
    """
    if not select.select([listener], [], [], within)[0]:
        return None
    connection, _ = listener.accept()
    return connection


def arrived(listener: socket.socket) -> bool:
    connection = waiting(listener, TIMEOUT)
    if connection is None:
        return False
    connection.close()
    return True


def connect(
    pod: Pod, host: str, port: int, family: socket.AddressFamily = socket.AF_INET
) -> socket.socket:
    client = pod.socket(family)
    client.settimeout(TIMEOUT)
    try:
        client.connect((host, port))
    except BaseException:
        client.close()
        raise
    return client


def reached(listener: socket.socket) -> tuple[str, int] | None:
    """Where the connection that reached `listener` was going; fails if none did."""
    connection = waiting(listener, TIMEOUT)
    assert connection is not None, f"nothing reached {listener.getsockname()}"
    with connection:
        return original_destination(connection)


def test_inbound_tcp_to_any_port_reaches_the_inbound_port_which_learns_the_port(
    pods: PodNetwork, nft: str
) -> None:
    client, server = pods.add_pod("client"), pods.add_pod("server")
    apply(server, nft, CaptureRules())
    with listening(server, "0.0.0.0", 15006) as inbound:
        for port in (8080, 443, 1, 65535):
            with connect(client, server.ip, port):
                assert reached(inbound) == (server.ip, port)


async def test_the_original_destination_is_read_from_an_event_loop_transport(
    pods: PodNetwork, nft: str
) -> None:
    client, server = pods.add_pod("client"), pods.add_pod("server")
    apply(server, nft, CaptureRules())
    seen: asyncio.Queue[tuple[str, int] | None] = asyncio.Queue()

    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.put_nowait(original_destination(writer.get_extra_info("socket")))
        writer.close()

    inbound = await server.start_server(accept, "0.0.0.0", 15006)
    try:
        _, writer = await client.open_connection(server.ip, 8080)
        assert await asyncio.wait_for(seen.get(), TIMEOUT) == (server.ip, 8080)
        writer.close()
    finally:
        inbound.close()


def test_ipv6_connections_are_captured_and_their_original_destination_read(
    pods: PodNetwork, nft: str
) -> None:
    client, server = pods.add_pod("client"), pods.add_pod("server")
    pods.add_ipv6(client)
    server_ip = pods.add_ipv6(server)
    apply(server, nft, CaptureRules())
    with listening(server, "::", 15006, socket.AF_INET6) as inbound:
        with connect(client, server_ip, 8080, socket.AF_INET6):
            assert reached(inbound) == (server_ip, 8080)
        apply(client, nft, CaptureRules())
        # The kernel redirects a pod's own outbound IPv6 to ::1, not to 127.0.0.1.
        with listening(client, "::1", 15007, socket.AF_INET6) as outbound:
            with connect(client, server_ip, 8080, socket.AF_INET6):
                assert reached(outbound) == (server_ip, 8080)
            assert waiting(inbound) is None


def test_a_connection_that_was_not_redirected_has_no_original_destination(
    pods: PodNetwork, nft: str
) -> None:
    client, server = pods.add_pod("client"), pods.add_pod("server")
    apply(server, nft, CaptureRules())
    with (
        listening(server, "0.0.0.0", 15006) as inbound,
        connect(client, server.ip, 15006),  # to the capture port itself
    ):
        assert reached(inbound) is None
    with (
        socket.create_server(("127.0.0.1", 0)) as plain,  # no capture here at all
        socket.create_connection(plain.getsockname(), TIMEOUT),
    ):
        connection, _ = plain.accept()
        with connection:
            assert original_destination(connection) is None
    assert original_destination(connection) is None  # closed
    assert original_destination(None) is None  # what a closed transport gives


def test_outbound_tcp_of_the_app_reaches_the_outbound_port_with_where_it_was_going(
    pods: PodNetwork, nft: str
) -> None:
    app, other = pods.add_pod("app"), pods.add_pod("other")
    apply(app, nft, CaptureRules())
    with (
        listening(app, "127.0.0.1", 15007) as outbound,
        listening(other, "0.0.0.0", 8080) as target,
    ):
        for host, port in ((other.ip, 8080), ("10.96.0.10", 80), (pods.node_ip, 443)):
            with connect(app, host, port):
                assert reached(outbound) == (host, port)
        assert waiting(target) is None


def test_the_agent_uids_connections_are_never_captured_and_an_app_uids_are(
    pods: PodNetwork, nft: str
) -> None:
    app, other = pods.add_pod("app"), pods.add_pod("other")
    apply(app, nft, CaptureRules(agent_uid=AGENT_UID))
    dial = (
        "import socket, sys\nsocket.create_connection((sys.argv[1], int(sys.argv[2])), 5).close()\n"
    )
    with (
        listening(app, "127.0.0.1", 15007) as outbound,
        listening(other, "0.0.0.0", 8080) as target,
    ):
        app.run([sys.executable, "-c", dial, other.ip, "8080"], user=AGENT_UID)
        assert arrived(target), "the agent's connection did not reach its peer"
        assert waiting(outbound) is None, "the agent's own connection was captured: a loop"
        app.run([sys.executable, "-c", dial, other.ip, "8080"], user=1000)
        assert reached(outbound) == (other.ip, 8080)
        assert waiting(target) is None


def test_the_agent_reaches_the_app_at_the_pod_ip_only_from_its_hand_off_source(
    pods: PodNetwork, nft: str
) -> None:
    """The agent's call to its own pod IP (a Service it serves itself) goes to the inbound
    capture port, as a peer's would; its hand-off of an inbound connection, to the same
    address from HANDOFF_SOURCE, reaches the app's port itself. IPv4 and IPv6."""
    app = pods.add_pod("app")
    app_ipv6 = pods.add_ipv6(app)
    apply(app, nft, CaptureRules())
    dial = (
        "import socket, sys\n"
        "family = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET\n"
        "with socket.socket(family) as s:\n"
        "    if sys.argv[3]: s.bind((sys.argv[3], 0))\n"
        "    s.settimeout(5); s.connect((sys.argv[1], int(sys.argv[2])))\n"
    )
    for family, host, version in (
        (socket.AF_INET, app.ip, 4),
        (socket.AF_INET6, app_ipv6, 6),
    ):
        wildcard = "::" if version == 6 else "0.0.0.0"
        with (
            listening(app, wildcard, 8080, family) as local,
            listening(app, wildcard, 15006, family) as inbound,
        ):
            app.run([sys.executable, "-c", dial, host, "8080", ""], user=AGENT_UID)
            assert reached(inbound) == (host, 8080), f"{host}: the agent's call to itself"
            assert waiting(local) is None
            source = HANDOFF_SOURCE[version]
            app.run([sys.executable, "-c", dial, host, "8080", source], user=AGENT_UID)
            connection = waiting(local, TIMEOUT)
            assert connection is not None, f"{host}: the hand-off from {source} was captured"
            with connection:
                assert connection.getpeername()[0] == source
            assert waiting(inbound) is None


def test_a_connection_routed_to_the_pod_for_another_address_is_not_captured(
    pods: PodNetwork, nft: str
) -> None:
    """A neighbour can route any address to the pod; only the pod's own are captured (the
    agent would hand such a connection on to where it was going, from the pod)."""
    app, other = pods.add_pod("app"), pods.add_pod("other")
    app_ipv6 = pods.add_ipv6(app)
    pods.add_ipv6(other)
    apply(app, nft, CaptureRules())
    elsewhere = {socket.AF_INET: "192.0.2.7", socket.AF_INET6: "2001:db8::7"}
    for family, via in ((socket.AF_INET, app.ip), (socket.AF_INET6, app_ipv6)):
        other.run(["ip", "route", "add", elsewhere[family], "via", via])
        wildcard = "::" if family == socket.AF_INET6 else "0.0.0.0"
        with listening(app, wildcard, 15006, family) as inbound:
            stray = other.socket(family)
            stray.setblocking(False)
            with stray:
                stray.connect_ex((elsewhere[family], 8080))  # a SYN, answered by nothing
                with connect(other, via, 8080, family):
                    assert reached(inbound) == (via, 8080)
                assert waiting(inbound, 0.2) is None, f"{elsewhere[family]} was captured"


def test_loopback_and_the_pods_own_ip_are_not_captured(pods: PodNetwork, nft: str) -> None:
    app = pods.add_pod("app")
    apply(app, nft, CaptureRules())
    with (
        listening(app, "0.0.0.0", 8080) as local,
        listening(app, "0.0.0.0", 15006) as inbound,
        listening(app, "127.0.0.1", 15007) as outbound,
    ):
        for host in ("127.0.0.1", app.ip):
            with connect(app, host, 8080):
                assert arrived(local), f"{host}:8080 did not reach the app"
        assert waiting(inbound) is None and waiting(outbound) is None


def test_excluded_ports_and_cidrs_are_not_captured(pods: PodNetwork, nft: str) -> None:
    app, other = pods.add_pod("app"), pods.add_pod("other")
    rules = CaptureRules(
        exclude_inbound_ports=(15020, 9090),
        exclude_outbound_ports=(5432,),
        exclude_outbound_cidrs=(f"{other.ip}/32", "fd00::/8"),
    )
    apply(app, nft, rules)
    with (
        listening(app, "0.0.0.0", 9090) as app_excluded,
        listening(app, "0.0.0.0", 15006) as inbound,
        listening(app, "127.0.0.1", 15007) as outbound,
        listening(other, "0.0.0.0", 8080) as other_app,
        socket.create_server((pods.node_ip, 5432)) as node_db,
    ):
        with connect(other, app.ip, 9090):
            assert arrived(app_excluded)
        with connect(app, other.ip, 8080):  # in an excluded CIDR
            assert arrived(other_app)
        with connect(app, pods.node_ip, 5432):  # an excluded port
            node_db.settimeout(TIMEOUT)
            node_db.accept()[0].close()
        assert waiting(inbound) is None and waiting(outbound) is None
        with connect(app, pods.node_ip, 5433):  # neither: captured
            assert reached(outbound) == (pods.node_ip, 5433)


def test_applying_twice_is_applying_once_and_a_change_replaces_the_rules(
    pods: PodNetwork, nft: str
) -> None:
    app = pods.add_pod("app")
    apply(app, nft, CaptureRules())
    once = app.run([nft, "list", "ruleset"]).stdout
    apply(app, nft, CaptureRules())
    assert app.run([nft, "list", "ruleset"]).stdout == once
    changed = CaptureRules(exclude_outbound_ports=(22,))
    apply(app, nft, changed)
    listed = app.run([nft, "list", "ruleset"]).stdout
    assert listed.count("table inet outrider") == 1 and "tcp dport 22 return" in listed


def test_removing_the_rules_leaves_the_pod_uncaptured(pods: PodNetwork, nft: str) -> None:
    client, server = pods.add_pod("client"), pods.add_pod("server")
    apply(server, nft, CaptureRules())
    Nft((*server.prefix, nft)).apply(remove_script())
    Nft((*server.prefix, nft)).apply(remove_script())  # and removing twice is fine
    assert server.run([nft, "list", "ruleset"]).stdout.strip() == ""
    with (
        listening(server, "0.0.0.0", 8080) as app,
        listening(server, "0.0.0.0", 15006) as inbound,
        connect(client, server.ip, 8080),
    ):
        assert arrived(app) and waiting(inbound) is None
