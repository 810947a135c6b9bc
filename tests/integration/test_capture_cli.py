"""`outrider capture apply|show|remove` as the init container runs it, and as an operator
reads its errors.

The commands that change rules run in a pod (a network namespace of their own),
never in this machine's; the ones that must fail before reaching nft run here,
with a PATH on which there is no nft to reach.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from identity.capture import CaptureRules, ruleset
from outrider.cli import main
from tests.netns import Pod, PodNetwork

#: What the injector's outrider-capture init container holds: root, with these and no others.
INIT_CONTAINER_CAPS = (
    "setpriv",
    "--bounding-set=-all,+net_admin,+net_raw",
    "--inh-caps=-all",
    "--",
)


def outrider(
    pod: Pod, *args: str, user: int | None = None, limit: tuple[str, ...] = ()
) -> tuple[int, str, str]:
    command = [*limit, sys.executable, "-m", "outrider", "capture", *args]
    done = pod.run(command, user=user, check=False)
    return done.returncode, done.stdout, done.stderr


@pytest.fixture
def no_nft(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PATH without nft: a command that tried to run it here could not change this machine."""
    monkeypatch.setenv("PATH", str(tmp_path))


def test_apply_with_the_init_containers_capabilities_show_and_remove(
    pods: PodNetwork, nft: str
) -> None:
    pod = pods.add_pod("app")
    flags = ("--exclude-outbound-ports", "5432", "--exclude-outbound-cidrs", "10.96.0.0/12")
    code, out, err = outrider(
        pod, "apply", "--agent-uid", "1337", *flags, limit=INIT_CONTAINER_CAPS
    )
    assert code == 0, err
    assert out == (
        "capture on: inbound TCP -> :15006 (except ports 15006,15007,15020),"
        " outbound TCP -> :15007 (except UID 1337, loopback, ports 5432, 10.96.0.0/12)\n"
    )
    code, shown, err = outrider(pod, "show")
    assert code == 0, err
    assert shown == pod.run([nft, "list", "table", "inet", "outrider"]).stdout
    assert "redirect to :15006" in shown and "ip daddr 10.96.0.0/12 return" in shown
    # The agent's IPv6 hand-off source is on lo (capture.md): once, however often applied.
    assert outrider(pod, "apply", limit=INIT_CONTAINER_CAPS)[0] == 0
    assert loopback_ipv6(pod) == ["::1/128", "::6/128"]
    assert outrider(pod, "remove")[:2] == (0, "capture off: table inet outrider removed\n")
    assert pod.run([nft, "list", "ruleset"]).stdout.strip() == ""
    assert outrider(pod, "show")[:2] == (0, "capture off: no table inet outrider\n")
    # Removing again is fine, and does not claim to have removed anything.
    assert outrider(pod, "remove")[:2] == (0, "capture off: no table inet outrider to remove\n")


def loopback_ipv6(pod: Pod) -> list[str]:
    shown = pod.run(["ip", "-6", "-o", "address", "show", "dev", "lo"]).stdout.split()
    return sorted(shown[i + 1] for i, word in enumerate(shown) if word == "inet6")


@pytest.mark.parametrize(
    "off",
    [
        ("net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.lo.disable_ipv6=1"),
        ("net.ipv6.conf.lo.disable_ipv6=1", "net.ipv6.conf.eth0.disable_ipv6=1"),
    ],
    ids=["all", "each interface"],
)
def test_apply_in_a_pod_without_ipv6_captures_ipv4_and_adds_no_address(
    pods: PodNetwork, nft: str, off: tuple[str, ...]
) -> None:
    pod = pods.add_pod("app")
    pod.run(["sysctl", "-qw", *off])
    code, out, err = outrider(pod, "apply", limit=INIT_CONTAINER_CAPS)
    assert code == 0, err
    assert out.startswith("capture on: ") and err == ""
    assert loopback_ipv6(pod) == []


def test_apply_where_only_lo_has_ipv6_off_says_what_to_change(pods: PodNetwork, nft: str) -> None:
    """The pod's IPv6 callers could never be handed to the app: not a silent success."""
    pod = pods.add_pod("app")
    pod.run(["sysctl", "-qw", "net.ipv6.conf.lo.disable_ipv6=1"])
    code, _, err = outrider(pod, "apply", limit=INIT_CONTAINER_CAPS)
    assert code == 1 and "Traceback" not in err
    assert "could not add ::6 to lo" in err and "net.ipv6.conf.lo.disable_ipv6=1" in err
    assert pod.run([nft, "list", "ruleset"]).stdout.strip() == ""  # nothing half done


def test_without_net_admin_apply_says_how_to_run_it_and_changes_nothing(
    pods: PodNetwork, nft: str
) -> None:
    pod = pods.add_pod("app")
    code, out, err = outrider(pod, "apply", user=1000)
    assert code == 1 and out == ""
    assert "needs NET_ADMIN and NET_RAW" in err and "outrider-capture init container" in err
    assert "Operation not permitted" in err and "Traceback" not in err
    assert pod.run([nft, "list", "ruleset"]).stdout.strip() == ""


@pytest.mark.usefixtures("nft")
def test_without_net_admin_show_and_remove_say_where_to_look_instead(pods: PodNetwork) -> None:
    pod = pods.add_pod("app")
    for command, doing in (("show", "reading"), ("remove", "removing")):
        code, out, err = outrider(pod, command, user=1000)
        assert code == 1 and out == ""
        assert f"nft was not permitted: {doing} the rules needs NET_ADMIN" in err
        assert "kubectl logs POD -c outrider-capture" in err
        assert "run it as the outrider-capture init container" not in err
        assert "Operation not permitted" in err and "Traceback" not in err


@pytest.mark.usefixtures("no_nft")
@pytest.mark.parametrize("command", [["apply"], ["show"], ["remove"]])
def test_without_nft_each_command_says_to_install_nftables(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["capture", *command]) == 1
    err = capsys.readouterr().err
    assert err == (
        "outrider: `nft` is not installed: the agent image carries nft; install nftables\n"
    )


@pytest.mark.usefixtures("no_nft")
def test_dry_run_prints_the_script_and_runs_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    flags = ["--inbound-port", "16006", "--exclude-inbound-ports", "15020,15090"]
    assert main(["capture", "apply", "--dry-run", *flags]) == 0
    printed = capsys.readouterr().out
    assert printed == ruleset(
        CaptureRules(inbound_port=16006, exclude_inbound_ports=(15020, 15090))
    )


@pytest.mark.usefixtures("no_nft")
def test_a_flag_is_taken_only_in_full_as_the_control_plane_reads_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`--exclude-inbound 8080` would leave 8080 uncaptured with no flag the control plane
    reads (identity.capture.flag_text) saying so: a usage error, and nothing runs."""
    with pytest.raises(SystemExit) as exited:
        main(["capture", "apply", "--dry-run", "--exclude-inbound", "8080"])
    assert exited.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "unrecognized arguments: --exclude-inbound 8080" in captured.err


@pytest.mark.usefixtures("no_nft")
def test_bad_values_are_all_named_by_their_flag_and_nothing_runs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = [
        "--inbound-port=http",
        "--outbound-port=70000",
        "--agent-uid=0",
        "--exclude-inbound-ports=15020,,9090",
        "--exclude-outbound-cidrs=10.0.0.1/8,fd00::/8,example.com",
    ]
    assert main(["capture", "apply", *args]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "outrider: invalid capture settings:",
        "  --inbound-port: 'http' is not a number",
        "  --exclude-inbound-ports: '15020,,9090' has an empty item:"
        " separate values with single commas",
        "  --outbound-port: 70000 is not a TCP port (1-65535)",
        "  --agent-uid: 0 would leave every root process of the pod uncaptured;"
        " run the agent as a UID of its own (1337)",
        "  --exclude-outbound-cidrs: '10.0.0.1/8': host bits set (did you mean 10.0.0.0/8?)",
        "  --exclude-outbound-cidrs: 'example.com': not an IPv4 or IPv6 CIDR"
        " such as 10.0.0.0/8 or fd00::/8",
    ]
