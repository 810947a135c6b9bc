"""Where a captured connection was going: SO_ORIGINAL_DST, read in this one place.

The capture rules (identity/capture.py) redirect a pod's inbound TCP to the
agent's inbound capture port and the app's outbound TCP to its outbound capture
port. The kernel's connection tracking keeps the address the peer asked for;
the agent asks for it here, on the accepted socket, to know which app port an
inbound connection is for and which upstream an outbound one is for.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Any, Protocol

#: SO_ORIGINAL_DST (linux/netfilter_ipv4.h) and IP6T_SO_ORIGINAL_DST
#: (linux/netfilter_ipv6/ip6_tables.h): the same number at two levels.
SO_ORIGINAL_DST = 80
SOL_IPV6 = getattr(socket, "SOL_IPV6", socket.IPPROTO_IPV6)
_SOCKADDR_IN = 16  # family, port, 4-byte address, zero padding
_SOCKADDR_IN6 = 28  # family, port, flow info, 16-byte address, scope id


class AcceptedSocket(Protocol):
    """What both a socket.socket and the transports' `get_extra_info("socket")` offer:
    asyncio's TransportSocket and uvloop's PseudoSocket."""

    @property
    def family(self) -> int: ...

    def getsockname(self) -> Any: ...

    def getsockopt(self, level: int, optname: int, buflen: int, /) -> bytes: ...


def original_destination(sock: AcceptedSocket | None) -> tuple[str, int] | None:
    """(ip, port) the peer connected to before the capture rules redirected it.

    None when the connection was not redirected: the kernel has no tracked
    original (getsockopt fails) or the original is the socket's own address
    (someone connected to the capture port itself); and when there is no socket
    any more (a transport closed already gives None). An IPv4 address reached
    through a dual-stack IPv6 socket comes back as plain IPv4.
    """
    if sock is None:
        return None
    found = _read(sock)
    if found is None:
        return None
    try:
        local = sock.getsockname()
    except OSError:  # closed meanwhile: nothing to serve
        return None
    if _same(found, (local[0], local[1])):
        return None
    return found


def _read(sock: AcceptedSocket) -> tuple[str, int] | None:
    if sock.family == socket.AF_INET6:
        # An IPv6 socket may carry an IPv4 connection (dual-stack, ::ffff:a.b.c.d):
        # its conntrack entry is IPv4, so the IPv4 level answers.
        return _ipv6(sock) or _ipv4(sock)
    if sock.family == socket.AF_INET:
        return _ipv4(sock)
    return None


def _ipv4(sock: AcceptedSocket) -> tuple[str, int] | None:
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN)
    except OSError:  # ENOENT: not tracked; ENOPROTOOPT: no conntrack here
        return None
    port, address = struct.unpack_from("!2xH4s", raw)
    return str(ipaddress.IPv4Address(address)), port


def _ipv6(sock: AcceptedSocket) -> tuple[str, int] | None:
    try:
        raw = sock.getsockopt(SOL_IPV6, SO_ORIGINAL_DST, _SOCKADDR_IN6)
    except OSError:
        return None
    port, address = struct.unpack_from("!2xH4x16s", raw)
    return _plain(ipaddress.IPv6Address(address)), port


def _plain(address: ipaddress.IPv6Address) -> str:
    """The address as the agent names it: an IPv4-mapped one as IPv4."""
    mapped = address.ipv4_mapped
    return str(mapped) if mapped is not None else str(address)


def _same(found: tuple[str, int], local: tuple[str, int]) -> bool:
    host = local[0].split("%", 1)[0]  # a scoped link-local name
    parsed = ipaddress.ip_address(host)
    name = _plain(parsed) if isinstance(parsed, ipaddress.IPv6Address) else str(parsed)
    return found == (name, local[1])
