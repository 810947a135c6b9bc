"""Adding an address to the pod's loopback, for `outrider capture apply`.

The agent hands a captured IPv6 connection to the app from ::6 (identity.capture.
HANDOFF_SOURCE), which lo does not hold until it is added: this sends the one rtnetlink
message `ip -6 address replace ::6/128 dev lo nodad` sends, so the init container needs
no iproute2. IPv4 needs nothing: all of 127.0.0.0/8 is lo's already.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from pathlib import Path

_RTM_NEWADDR = 20
_NLMSG_ERROR = 2
_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_REPLACE, _NLM_F_CREATE = 0x1, 0x4, 0x100, 0x400
_IFA_ADDRESS, _IFA_LOCAL = 1, 2
_IFA_F_NODAD = 0x02  # loopback does no duplicate address detection: usable at once
_RT_SCOPE_HOST = 254
_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, interface
_ATTRIBUTE = struct.Struct("=HH")  # rtattr: length, type


class NetlinkError(OSError):
    """The kernel refused the address (errno and strerror say why)."""


def add_to_loopback(address: str) -> bool:
    """Put `address` (/128 or /32) on lo, as `ip address replace` does: True once it is
    there, False when the pod has no IPv6 (nothing to hand off over it); NetlinkError
    otherwise (EPERM without NET_ADMIN)."""
    ip = ipaddress.ip_address(address)
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    packed = ip.packed
    attributes = b"".join(
        _ATTRIBUTE.pack(_ATTRIBUTE.size + len(packed), kind) + packed
        for kind in (_IFA_LOCAL, _IFA_ADDRESS)
    )
    body = _IFADDRMSG.pack(
        family, ip.max_prefixlen, _IFA_F_NODAD, _RT_SCOPE_HOST, socket.if_nametoindex("lo")
    )
    flags = _NLM_F_REQUEST | _NLM_F_ACK | _NLM_F_CREATE | _NLM_F_REPLACE
    message = _HEADER.pack(_HEADER.size + len(body) + len(attributes), _RTM_NEWADDR, flags, 1, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.settimeout(5.0)
        sock.send(message + body + attributes)
        reply = sock.recv(65536)
    length, kind, _, _, _ = _HEADER.unpack_from(reply)
    if kind != _NLMSG_ERROR or length < _HEADER.size + 4:
        raise NetlinkError(errno.EPROTO, f"unexpected rtnetlink reply of type {kind}")
    (code,) = struct.unpack_from("=i", reply, _HEADER.size)
    if code == 0 or -code == errno.EEXIST:
        return True
    if ip.version == 6 and -code in (errno.EACCES, errno.EAFNOSUPPORT) and _ipv6_off():
        return False  # IPv6 is off in the pod (disable_ipv6): the agent takes none
    if ip.version == 6 and -code == errno.EACCES:
        raise NetlinkError(
            -code,
            "IPv6 is off on lo (net.ipv6.conf.lo.disable_ipv6=1) but not in the pod:"
            " turn it on for lo, or off for the whole pod (net.ipv6.conf.all.disable_ipv6=1)",
        )
    raise NetlinkError(-code, os.strerror(-code))


def _ipv6_off() -> bool:
    """IPv6 is off for the whole pod (`all`, or every interface but lo), not on lo alone:
    then the pod's IPv6 callers could not be handed to the app."""
    conf = Path("/proc/sys/net/ipv6/conf")
    try:
        if (conf / "all" / "disable_ipv6").read_text().strip() == "1":
            return True
        others = [c for c in conf.iterdir() if c.name not in ("all", "default", "lo")]
        return all((c / "disable_ipv6").read_text().strip() == "1" for c in others)
    except OSError:
        return True  # no IPv6 in this kernel at all
