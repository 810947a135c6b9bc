"""Where a redirected connection was going: SO_ORIGINAL_DST, read in this one place.

The pod's nft rules (`outrider capture apply`) redirect TCP to the agent's
capture ports; conntrack remembers the destination the client asked for, and
the kernel hands it back through getsockopt on the accepted socket.
"""

from __future__ import annotations

import socket

#: linux/netfilter_ipv4.h SO_ORIGINAL_DST and linux/netfilter_ipv6/ip6_tables.h
#: IP6T_SO_ORIGINAL_DST: both 80.
SO_ORIGINAL_DST = 80
_SOCKADDR_IN, _SOCKADDR_IN6 = 16, 28


def original_destination(sock: socket.socket) -> tuple[str, int] | None:
    """The (ip, port) a redirected connection was sent to; None when it was not redirected
    (getsockopt fails, or gives the socket's own local address)."""
    try:
        if sock.family == socket.AF_INET:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN)
            ip = socket.inet_ntop(socket.AF_INET, raw[4:8])
        elif sock.family == socket.AF_INET6:
            raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, _SOCKADDR_IN6)
            ip = socket.inet_ntop(socket.AF_INET6, raw[8:24])
        else:
            return None
        port = int.from_bytes(raw[2:4], "big")
        local = sock.getsockname()
    except OSError:
        return None
    if (ip, port) == (local[0], local[1]):
        return None
    return ip, port
