"""The capture rules as settings and as the nft script they become (identity/capture.py).

What the script does to real traffic is tested in real pods
(tests/integration/test_capture_rules.py); here, which lines each setting gives and
which settings are refused, and why.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from identity.capture import (
    CaptureRules,
    CaptureRulesError,
    flag_text,
    pod_address,
    redirects,
    rules_from_flags,
    ruleset,
    summary,
    to_flags,
)

DEFAULT_SCRIPT = """\
add table inet outrider
delete table inet outrider
table inet outrider {
  chain prerouting {
    type nat hook prerouting priority dstnat; policy accept;
    iifname "lo" return
    meta l4proto != tcp return
    tcp dport { 15006, 15007, 15020 } return
    fib daddr type != local return
    meta l4proto tcp redirect to :15006
  }
  chain output {
    type nat hook output priority -100; policy accept;
    meta l4proto != tcp return
    meta skuid 1337 oifname "lo" ip saddr != 127.0.0.6 ip daddr != 127.0.0.0/8 \
tcp dport != { 15006, 15007, 15020 } redirect to :15006
    meta skuid 1337 oifname "lo" ip6 saddr != ::6 ip6 daddr != ::1 \
tcp dport != { 15006, 15007, 15020 } redirect to :15006
    meta skuid 1337 return
    oifname "lo" return
    meta l4proto tcp redirect to :15007
  }
}
"""


def test_the_default_rules_capture_everything_but_loopback_the_agent_and_its_ports() -> None:
    assert ruleset(CaptureRules()) == DEFAULT_SCRIPT


def chain(script: str, name: str) -> list[str]:
    """The rule lines of chain `name` in `script`, without its header."""
    lines = script.split(f"chain {name} {{\n", 1)[1].split("  }", 1)[0].splitlines()
    return [line.strip() for line in lines[1:]]


@pytest.mark.parametrize(
    ("rules", "prerouting_kept", "output_returns"),
    [
        (CaptureRules(exclude_inbound_ports=()), "{ 15006, 15007 }", []),
        (
            CaptureRules(inbound_port=16006, outbound_port=16007, exclude_inbound_ports=(9090,)),
            "{ 9090, 16006, 16007 }",
            [],
        ),
        (
            CaptureRules(exclude_outbound_ports=(5432, 22, 5432)),
            "{ 15006, 15007, 15020 }",
            ["tcp dport { 22, 5432 } return"],
        ),
        (
            CaptureRules(exclude_outbound_cidrs=("10.96.0.0/12",)),
            "{ 15006, 15007, 15020 }",
            ["ip daddr { 10.96.0.0/12 } return"],
        ),
        (
            CaptureRules(exclude_outbound_cidrs=("fd00::/8", "169.254.169.254", "2001:DB8::/32")),
            "{ 15006, 15007, 15020 }",
            [
                "ip daddr { 169.254.169.254/32 } return",
                "ip6 daddr { 2001:db8::/32, fd00::/8 } return",
            ],
        ),
        (  # overlapping networks are one interval: nft refuses overlaps in a set
            CaptureRules(exclude_outbound_cidrs=("10.0.0.0/8", "10.96.0.0/12", "11.0.0.0/8")),
            "{ 15006, 15007, 15020 }",
            ["ip daddr { 10.0.0.0/7 } return"],
        ),
        (
            CaptureRules(exclude_outbound_cidrs=("fd00::/8",), exclude_outbound_ports=(53,)),
            "{ 15006, 15007, 15020 }",
            ["ip6 daddr { fd00::/8 } return", "tcp dport { 53 } return"],
        ),
    ],
)
def test_exclusions_become_return_rules_before_the_redirect(
    rules: CaptureRules, prerouting_kept: str, output_returns: list[str]
) -> None:
    script = ruleset(rules)
    assert chain(script, "prerouting")[2:] == [
        f"tcp dport {prerouting_kept} return",
        "fib daddr type != local return",
        f"meta l4proto tcp redirect to :{rules.inbound_port}",
    ]
    assert chain(script, "output")[0] == "meta l4proto != tcp return"
    # The agent's calls to the pod's own IP come back as a peer's, to the inbound port; its
    # hand-offs to the app (from 127.0.0.6, ::1) do not.
    for line, family, source in zip(
        chain(script, "output")[1:3], ("ip", "ip6"), ("127.0.0.6", "::6"), strict=True
    ):
        never = f"{family} saddr != {source} {family} daddr != "
        assert line.startswith(f'meta skuid {rules.agent_uid} oifname "lo" {never}')
        assert line.endswith(f"redirect to :{rules.inbound_port}")
        assert f"tcp dport != {prerouting_kept} redirect" in line
    assert chain(script, "output")[3:5] == [
        f"meta skuid {rules.agent_uid} return",
        'oifname "lo" return',
    ]
    assert chain(script, "output")[5:] == [
        *output_returns,
        f"meta l4proto tcp redirect to :{rules.outbound_port}",
    ]


def test_equal_settings_written_differently_are_equal_rules_and_one_script() -> None:
    one = CaptureRules(exclude_outbound_ports=(80, 22), exclude_outbound_cidrs=("FD00::0/8",))
    two = CaptureRules(exclude_outbound_ports=(22, 80, 22), exclude_outbound_cidrs=("fd00::/8",))
    assert one == two and hash(one) == hash(two) and ruleset(one) == ruleset(two)


@pytest.mark.parametrize(
    ("settings", "problems"),
    [
        ({"inbound_port": 0}, [("inbound_port", "0 is not a TCP port (1-65535)")]),
        ({"outbound_port": 65536}, [("outbound_port", "65536 is not a TCP port (1-65535)")]),
        ({"inbound_port": True}, [("inbound_port", "True is not a TCP port (1-65535)")]),
        (
            {"inbound_port": "15006"},
            [("inbound_port", "'15006' is a string: write the port as a number, 15006")],
        ),
        ({"inbound_port": "http"}, [("inbound_port", "'http' is not a TCP port (1-65535)")]),
        (
            {"inbound_port": 15007},
            [
                (
                    "outbound_port",
                    "15007 is the inbound_port too: the agent serves the two apart,"
                    " so they must differ",
                )
            ],
        ),
        (
            {"inbound_port": 15020, "outbound_port": 15020},
            [
                ("inbound_port", "15020 is the agent's admin or status port"),
                ("outbound_port", "15020 is the agent's admin or status port"),
            ],
        ),
        ({"agent_uid": -1}, [("agent_uid", "-1 is not a UID (0-4294967294)")]),
        ({"agent_uid": 2**32 - 1}, [("agent_uid", "4294967295 is not a UID (0-4294967294)")]),
        (
            {"agent_uid": 0},
            [
                (
                    "agent_uid",
                    "0 would leave every root process of the pod uncaptured;"
                    " run the agent as a UID of its own (1337)",
                )
            ],
        ),
        (
            {"exclude_inbound_ports": (15020, 0), "exclude_outbound_ports": (70000,)},
            [
                ("exclude_inbound_ports", "0 is not a TCP port (1-65535)"),
                ("exclude_outbound_ports", "70000 is not a TCP port (1-65535)"),
            ],
        ),
        (
            {"exclude_outbound_cidrs": ("10.1.2.3/8", "fd00::1/8", "10.0.0.0/33", "pods")},
            [
                (
                    "exclude_outbound_cidrs",
                    "'10.1.2.3/8': host bits set (did you mean 10.0.0.0/8?)",
                ),
                ("exclude_outbound_cidrs", "'fd00::1/8': host bits set (did you mean fd00::/8?)"),
                (
                    "exclude_outbound_cidrs",
                    "'10.0.0.0/33': not an IPv4 or IPv6 CIDR such as 10.0.0.0/8 or fd00::/8",
                ),
                (
                    "exclude_outbound_cidrs",
                    "'pods': not an IPv4 or IPv6 CIDR such as 10.0.0.0/8 or fd00::/8",
                ),
            ],
        ),
        (
            {"exclude_outbound_cidrs": "10.0.0.0/8"},
            [("exclude_outbound_cidrs", "give a list of CIDRs, not one string")],
        ),
    ],
)
def test_bad_settings_are_refused_each_naming_its_setting(
    settings: dict[str, Any], problems: list[tuple[str, str]]
) -> None:
    with pytest.raises(CaptureRulesError) as refused:
        CaptureRules(**settings)
    assert refused.value.problems == problems


@pytest.mark.parametrize(
    ("flags", "rules"),
    [
        ({}, CaptureRules()),
        (
            {"inbound_port": " 16006", "agent_uid": "1000", "exclude_inbound_ports": "15020, 9090"},
            CaptureRules(inbound_port=16006, agent_uid=1000, exclude_inbound_ports=(9090, 15020)),
        ),
        ({"exclude_inbound_ports": ""}, CaptureRules(exclude_inbound_ports=())),
        (
            {"exclude_outbound_cidrs": "10.96.0.0/12,fd00::/8", "exclude_outbound_ports": "53"},
            CaptureRules(
                exclude_outbound_cidrs=("10.96.0.0/12", "fd00::/8"), exclude_outbound_ports=(53,)
            ),
        ),
    ],
)
def test_flags_give_the_rules_they_say(flags: dict[str, str], rules: CaptureRules) -> None:
    assert rules_from_flags(**flags) == rules


@pytest.mark.parametrize("text", ["80_80", "+8080", "٨٠٨٠", "8080.0", "0x1f90"])
def test_a_port_flag_is_ascii_digits_only(text: str) -> None:
    """int() reads each of these as 8080 (but the last two): only digits are a number."""
    with pytest.raises(CaptureRulesError) as refused:
        rules_from_flags(inbound_port=text, exclude_inbound_ports=f"9090,{text}")
    assert refused.value.problems == [
        ("inbound_port", f"{text!r} is not a number"),
        ("exclude_inbound_ports", f"{text!r} is not a number"),
    ]


def test_every_bad_flag_is_reported_at_once() -> None:
    with pytest.raises(CaptureRulesError) as refused:
        rules_from_flags(inbound_port="x", exclude_outbound_ports="22,ssh", agent_uid="0")
    assert refused.value.problems == [
        ("inbound_port", "'x' is not a number"),
        ("exclude_outbound_ports", "'ssh' is not a number"),
        (
            "agent_uid",
            "0 would leave every root process of the pod uncaptured;"
            " run the agent as a UID of its own (1337)",
        ),
    ]


def listed(**redirect_ports: int) -> dict[str, Any]:
    """What `nft -j list table inet outrider` says, cut to what is read from it."""
    rules = [
        {"rule": {"table": "outrider", "chain": chain, "expr": [{"redirect": {"port": port}}]}}
        for chain, port in redirect_ports.items()
    ]
    return {"nftables": [{"metainfo": {"version": "1.0.6"}}, *rules]}


def test_the_summary_checks_what_the_kernel_holds_against_the_rules() -> None:
    rules = CaptureRules(exclude_outbound_ports=(53,), exclude_outbound_cidrs=("fd00::/8",))
    assert redirects(listed(prerouting=15006, output=15007)) == {
        "prerouting": 15006,
        "output": 15007,
    }
    assert summary(rules, listed(prerouting=15006, output=15007)) == (
        "capture on: inbound TCP -> :15006 (except ports 15006,15007,15020),"
        " outbound TCP -> :15007 (except UID 1337, loopback, ports 53, fd00::/8)"
    )
    with pytest.raises(CaptureRulesError, match="redirects nothing after applying"):
        summary(rules, {"nftables": []})
    with pytest.raises(CaptureRulesError, match=r"redirects \{'prerouting': 15006\}"):
        summary(rules, listed(prerouting=15006))


@pytest.mark.parametrize(
    "rules",
    [
        CaptureRules(),
        CaptureRules(exclude_inbound_ports=()),
        CaptureRules(
            inbound_port=16006,
            agent_uid=1000,
            exclude_outbound_ports=(53, 5432),
            exclude_outbound_cidrs=("10.96.0.0/12", "fd00::/8"),
        ),
    ],
)
def test_the_flags_the_injector_writes_give_the_command_the_same_rules(
    rules: CaptureRules,
) -> None:
    args = to_flags(rules)
    names = [f.name for f in dataclasses.fields(CaptureRules)]
    assert rules_from_flags(**{name: flag_text(args, name) for name in names}) == rules
    assert flag_text([*args, "--agent-uid=7"], "agent_uid") == "7"  # the last one counts


@pytest.mark.parametrize(
    ("local", "handed_to"),
    [
        ("10.0.0.5", "10.0.0.5"),
        ("::ffff:10.0.0.5", "10.0.0.5"),
        ("fd00::5", "fd00::5"),
        ("127.0.0.1", None),
        ("127.1.2.3", None),
        ("::1", None),
        ("::ffff:127.0.0.1", None),
        ("fe80::1", None),
        ("fe80::1%eth0", None),
        ("169.254.0.9", None),
        ("0.0.0.0", None),
        ("::", None),
        ("127.0.0.6", None),
        ("::6", None),
    ],
)
def test_the_agent_hands_connections_only_to_the_pods_own_addresses(
    local: str, handed_to: str | None
) -> None:
    """A loopback-only port stays the pod's own: loopback, link-local, unspecified and the
    hand-off sources are never where the agent hands a caller (or a probe) to the app."""
    assert pod_address(local) == handed_to
