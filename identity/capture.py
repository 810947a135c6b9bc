"""The capture rules: which TCP of a pod the agent receives, as one nftables script.

Inbound TCP to any port of the pod goes to the agent's inbound capture port, so
no caller reaches the app without passing the agent; the app's outbound TCP goes
to the outbound capture port, so the app calls a Service by its usual address and
still gets mTLS. The agent reads where each connection was going with
SO_ORIGINAL_DST (agent/adapters/capture.py).

Never captured:
- the agent's own connections (`meta skuid`): it connects out to peers and in to
  the app, and a captured agent connection would come back to the agent, a loop;
  except those to the pod's own IP (a Service whose endpoint is this pod), which
  go to the inbound capture port as a peer's would. The agent hands a captured
  inbound connection to the app at the pod IP it was sent to, from HANDOFF_SOURCE
  (Istio's 127.0.0.6): that source tells the hand-off from such a call;
- loopback (`lo`): the app's 127.0.0.1 (and its own pod IP, which the kernel
  routes over lo) is the pod talking to itself;
- the agent's own ports inbound (the capture ports, and the excluded ones such
  as the status port 15020 that the kubelet probes), and what an operator excludes;
- inbound packets to an address that is not the pod's (`fib daddr type`): a
  neighbour can route anything to the pod, and the agent hands a connection on to
  where it was going; the kernel forwards them or drops them, as without the mesh
  (it forwards only where the pod's ip_forward is on). 127.0.0.1 put on the wire is
  the pod's own address: captured, and refused by the agent (`local_destination`).

Everything lives in one table, `inet outrider`, replaced in one `nft -f`
transaction: applying twice is the same as applying once, and a reader never
sees half a ruleset. `ruleset()` is pure: the init container applies it inside
the pod today, and a CNI plugin could write the same script from the node.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from identity.injected import (
    ADMIN_PORT,
    AGENT_UID,
    INBOUND_CAPTURE_PORT,
    OUTBOUND_CAPTURE_PORT,
    OUTBOUND_LISTENER_PORTS,
    STATUS_PORT,
)

TABLE = "outrider"
FAMILY = "inet"
#: Where the agent dials the app from, by IP version, when it hands it a captured inbound
#: connection at the address the caller sent it to (the pod IP, never 127.0.0.1: a port the
#: app binds on loopback only stays the pod's own, as without the mesh). Istio's addresses.
#: lo holds all of 127.0.0.0/8 but only ::1 of IPv6: `outrider capture apply` adds ::6
#: (from ::1 the kernel's reset of a closed port would never reach the agent).
HANDOFF_SOURCE = {4: "127.0.0.6", 6: "::6"}


def handoff_source(host: str) -> str:
    """The hand-off source for an app at `host` (an IP address): of its IP version."""
    return HANDOFF_SOURCE[6 if ":" in host else 4]


def pod_address(host: str) -> str | None:
    """`host`, a local address a connection reached, if the agent may hand the app a
    connection there (an IPv4-mapped one as IPv4); None for loopback (a neighbour can put
    127.0.0.1 on the wire, and a loopback-only port must stay the pod's own, as without
    the mesh), link-local (which needs the interface the caller came by; Kubernetes
    reaches pods at their pod IPs), unspecified, and the hand-off sources themselves."""
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_loopback or address.is_link_local or address.is_unspecified:
        return None
    plain = str(address)
    return None if plain in HANDOFF_SOURCE.values() else plain


#: UIDs are 32-bit; (uid_t)-1 means "no UID" to the kernel.
_MAX_UID = 2**32 - 2


class CaptureRulesError(ValueError):
    """Capture settings that cannot be applied: every problem, each with its setting's name
    (`inbound_port`; the command line says `--inbound-port`)."""

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(f"{name}: {why}" for name, why in self.problems))


@dataclass(frozen=True)
class CaptureRules:
    """What a pod's capture redirects and what it leaves alone.

    Port lists come back sorted without repeats and CIDRs in their canonical form
    (10.0.0.0/8, fd00::/8), so two equal settings give the same script.
    """

    inbound_port: int = INBOUND_CAPTURE_PORT
    outbound_port: int = OUTBOUND_CAPTURE_PORT
    agent_uid: int = AGENT_UID
    exclude_inbound_ports: tuple[int, ...] = (STATUS_PORT,)
    exclude_outbound_ports: tuple[int, ...] = ()
    exclude_outbound_cidrs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        errors: list[tuple[str, str]] = []
        for name in ("inbound_port", "outbound_port"):
            _check_port(getattr(self, name), name, errors)
            if why := agent_port_error(getattr(self, name)):
                errors.append((name, f"{getattr(self, name)} {why}"))
        if self.inbound_port == self.outbound_port and not errors:
            errors.append(
                (
                    "outbound_port",
                    f"{self.outbound_port} is the inbound_port too:"
                    " the agent serves the two apart, so they must differ",
                )
            )
        _check_uid(self.agent_uid, errors)
        for name in ("exclude_inbound_ports", "exclude_outbound_ports"):
            ports = tuple(getattr(self, name))
            for port in ports:
                _check_port(port, name, errors)
            if not errors:
                object.__setattr__(self, name, tuple(sorted(set(ports))))
        if isinstance(self.exclude_outbound_cidrs, str):
            errors.append(("exclude_outbound_cidrs", "give a list of CIDRs, not one string"))
            raise CaptureRulesError(errors)
        cidrs = _networks(self.exclude_outbound_cidrs, errors)
        if errors:
            raise CaptureRulesError(errors)
        object.__setattr__(self, "exclude_outbound_cidrs", cidrs)

    @property
    def inbound_kept(self) -> tuple[int, ...]:
        """Inbound ports not redirected: the agent's capture ports and the excluded ones."""
        return tuple(sorted({self.inbound_port, self.outbound_port, *self.exclude_inbound_ports}))


def agent_port_error(port: object) -> str | None:
    """Why the agent cannot listen for captured traffic on `port` (None: it can)."""
    if port in (ADMIN_PORT, STATUS_PORT):
        return "is the agent's admin or status port"
    if port in OUTBOUND_LISTENER_PORTS and port not in (
        INBOUND_CAPTURE_PORT,
        OUTBOUND_CAPTURE_PORT,
    ):
        return (
            f"is in {OUTBOUND_LISTENER_PORTS.start}-{OUTBOUND_LISTENER_PORTS.stop - 1}, "
            "the agent's explicit outbound listeners"
            f" (only {INBOUND_CAPTURE_PORT} and {OUTBOUND_CAPTURE_PORT} are kept out of it)"
        )
    return None


def _check_port(port: object, name: str, errors: list[tuple[str, str]]) -> None:
    if isinstance(port, str) and port.strip().isdigit():  # `["9090"]` in injector.yaml
        errors.append((name, f"{port!r} is a string: write the port as a number, {port.strip()}"))
    elif isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        errors.append((name, f"{port!r} is not a TCP port (1-65535)"))


def _check_uid(uid: object, errors: list[tuple[str, str]]) -> None:
    if isinstance(uid, bool) or not isinstance(uid, int) or not 0 <= uid <= _MAX_UID:
        errors.append(("agent_uid", f"{uid!r} is not a UID (0-{_MAX_UID})"))
    elif uid == 0:
        errors.append(
            (
                "agent_uid",
                "0 would leave every root process of the pod uncaptured;"
                f" run the agent as a UID of its own ({AGENT_UID})",
            )
        )


def _networks(cidrs: Iterable[object], errors: list[tuple[str, str]]) -> tuple[str, ...]:
    """The CIDRs canonical and collapsed: nft refuses overlapping intervals in one set."""
    parsed: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for cidr in cidrs:
        try:
            parsed.append(ipaddress.ip_network(str(cidr).strip()))
        except ValueError as exc:
            errors.append(("exclude_outbound_cidrs", f"{cidr!r}: {_why(exc, str(cidr))}"))
    v4 = [n for n in parsed if isinstance(n, ipaddress.IPv4Network)]
    v6 = [n for n in parsed if isinstance(n, ipaddress.IPv6Network)]
    collapsed = [*ipaddress.collapse_addresses(v4), *ipaddress.collapse_addresses(v6)]
    return tuple(str(n) for n in collapsed)


def _why(exc: ValueError, cidr: str) -> str:
    if "has host bits set" in str(exc):
        network = ipaddress.ip_network(cidr.strip(), strict=False)
        return f"host bits set (did you mean {network}?)"
    return "not an IPv4 or IPv6 CIDR such as 10.0.0.0/8 or fd00::/8"


def rules_from_flags(
    *,
    inbound_port: str | None = None,
    outbound_port: str | None = None,
    agent_uid: str | None = None,
    exclude_inbound_ports: str | None = None,
    exclude_outbound_ports: str | None = None,
    exclude_outbound_cidrs: str | None = None,
) -> CaptureRules:
    """CaptureRules from the command line's text (None: the default; lists comma-separated,
    "" for none), or CaptureRulesError with every problem of every flag at once."""
    errors: list[tuple[str, str]] = []
    given: dict[str, Any] = {}
    for name, text in (
        ("inbound_port", inbound_port),
        ("outbound_port", outbound_port),
        ("agent_uid", agent_uid),
    ):
        if text is not None and (number := _number(name, text, errors)) is not None:
            given[name] = number
    for name, text in (
        ("exclude_inbound_ports", exclude_inbound_ports),
        ("exclude_outbound_ports", exclude_outbound_ports),
    ):
        if text is not None:
            numbers = (_number(name, item, errors) for item in _items(name, text, errors))
            given[name] = tuple(n for n in numbers if n is not None)
    if exclude_outbound_cidrs is not None:
        cidrs = _items("exclude_outbound_cidrs", exclude_outbound_cidrs, errors)
        given["exclude_outbound_cidrs"] = cidrs
    try:
        rules = CaptureRules(**given)  # a value that did not parse is left out: said once
    except CaptureRulesError as exc:
        errors.extend(exc.problems)
    if errors:
        raise CaptureRulesError(errors)
    return rules


def flag(name: str) -> str:
    """The command line's flag for setting `name`: inbound_port is --inbound-port."""
    return "--" + name.replace("_", "-")


def to_flags(rules: CaptureRules) -> list[str]:
    """The flags that give `rules` to `outrider capture apply` (what the injector writes into
    the init container; rules_from_flags reads them back). Every setting is written but
    an empty outbound exclusion, which is the default."""
    args: list[str] = []
    for name in ("inbound_port", "outbound_port", "agent_uid"):
        args += [flag(name), str(getattr(rules, name))]
    args += [flag("exclude_inbound_ports"), ",".join(map(str, rules.exclude_inbound_ports))]
    for name in ("exclude_outbound_ports", "exclude_outbound_cidrs"):
        if values := getattr(rules, name):
            args += [flag(name), ",".join(map(str, values))]
    return args


def flag_text(args: Sequence[str], name: str) -> str | None:
    """The text `args` give setting `name` (`--name V` or `--name=V`; the last one, as the
    command's parser takes it); None when they give none."""
    option, text = flag(name), None
    for i, arg in enumerate(args):
        if arg == option and i + 1 < len(args):
            text = args[i + 1]
        elif arg.startswith(option + "="):
            text = arg.partition("=")[2]
    return text


def _items(name: str, text: str, errors: list[tuple[str, str]]) -> tuple[str, ...]:
    if not text.strip():
        return ()
    items = tuple(item.strip() for item in text.split(","))
    if "" in items:
        errors.append((name, f"{text!r} has an empty item: separate values with single commas"))
    return tuple(item for item in items if item)


def _number(name: str, text: str, errors: list[tuple[str, str]]) -> int | None:
    """ASCII digits only: int() would also read `80_80`, `+8080` and other scripts' digits."""
    digits = text.strip()
    if digits.isascii() and digits.isdecimal():
        return int(digits)
    errors.append((name, f"{text!r} is not a number"))
    return None


def ruleset(rules: CaptureRules) -> str:
    """The nft script that makes the pod's table exactly `rules`, in one transaction.

    `add table` then `delete table` removes any earlier version (and does not fail
    when there is none) before the new one is written; nft applies a file whole or
    not at all.
    """
    lines = [
        f"add table {FAMILY} {TABLE}",
        f"delete table {FAMILY} {TABLE}",
        f"table {FAMILY} {TABLE} {{",
        "  chain prerouting {",
        "    type nat hook prerouting priority dstnat; policy accept;",
        '    iifname "lo" return',
        "    meta l4proto != tcp return",
        f"    tcp dport {_set(rules.inbound_kept)} return",
        "    fib daddr type != local return",
        f"    meta l4proto tcp redirect to :{rules.inbound_port}",
        "  }",
        "  chain output {",
        "    type nat hook output priority -100; policy accept;",
        "    meta l4proto != tcp return",
        *_to_itself(rules),
        f"    meta skuid {rules.agent_uid} return",
        '    oifname "lo" return',
        *_cidr_returns(rules.exclude_outbound_cidrs),
        *_port_returns(rules.exclude_outbound_ports),
        f"    meta l4proto tcp redirect to :{rules.outbound_port}",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def _to_itself(rules: CaptureRules) -> list[str]:
    """The agent's own connections to the pod's own IP (not 127.0.0.1): to the inbound port.

    A pod that calls a Service it serves itself gets its own IP as the endpoint, and its
    agent dials it with mTLS; the kernel routes that over lo, which prerouting skips, so
    without this the ClientHello would land on the app's port. Redirected here, it comes
    to the inbound capture port like any peer's (SO_ORIGINAL_DST: the pod IP and port).
    The agent's hand-off of an inbound connection to the app goes to the pod IP as well,
    from HANDOFF_SOURCE: it is let through.
    """
    kept = _set(rules.inbound_kept)
    return [
        f'    meta skuid {rules.agent_uid} oifname "lo" {family} saddr != {HANDOFF_SOURCE[version]}'
        f" {family} daddr != {loopback} tcp dport != {kept} redirect to :{rules.inbound_port}"
        for version, family, loopback in ((4, "ip", "127.0.0.0/8"), (6, "ip6", "::1"))
    ]


def remove_script() -> str:
    """The nft script that removes the table, whether or not it is there."""
    return f"add table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n"


def _set(items: Sequence[object]) -> str:
    return "{ " + ", ".join(str(item) for item in items) + " }"


def _cidr_returns(cidrs: Sequence[str]) -> list[str]:
    v4 = [c for c in cidrs if ":" not in c]
    v6 = [c for c in cidrs if ":" in c]
    return [
        f"    {family} daddr {_set(group)} return"
        for family, group in (("ip", v4), ("ip6", v6))
        if group
    ]


def _port_returns(ports: Sequence[int]) -> list[str]:
    return [f"    tcp dport {_set(ports)} return"] if ports else []


def redirects(listing: dict[str, Any]) -> dict[str, int]:
    """Each chain of the table in `nft -j list table` output -> the port it redirects to.

    The shell reads the table back after applying it and checks it against
    `rules` with this: what the kernel holds, not what was sent. A chain's last
    redirect is its catch-all (output's first ones send the agent's calls to its
    own pod IP to the inbound port).
    """
    found: dict[str, int] = {}
    for item in listing.get("nftables", []):
        rule = item.get("rule")
        if not isinstance(rule, dict) or rule.get("table") != TABLE:
            continue
        for expression in rule.get("expr", []):
            redirect = expression.get("redirect") if isinstance(expression, dict) else None
            if isinstance(redirect, dict) and isinstance(redirect.get("port"), int):
                found[str(rule.get("chain"))] = redirect["port"]
    return found


def summary(rules: CaptureRules, listing: dict[str, Any]) -> str:
    """One line saying what the applied table does; CaptureRulesError if it is not `rules`."""
    want = {"prerouting": rules.inbound_port, "output": rules.outbound_port}
    got = redirects(listing)
    if got != want:
        raise CaptureRulesError(
            [("table", f"{FAMILY} {TABLE} redirects {got or 'nothing'} after applying, not {want}")]
        )
    kept = ",".join(map(str, rules.inbound_kept))
    excluded = [f"UID {rules.agent_uid}", "loopback"]
    if rules.exclude_outbound_ports:
        excluded.append("ports " + ",".join(map(str, rules.exclude_outbound_ports)))
    excluded.extend(rules.exclude_outbound_cidrs)
    return (
        f"capture on: inbound TCP -> :{rules.inbound_port} (except ports {kept}),"
        f" outbound TCP -> :{rules.outbound_port} (except {', '.join(excluded)})"
    )
