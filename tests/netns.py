"""Pods as real Linux network namespaces, so end-to-end tests run agents as in a pod.

Each pod gets its own network namespace with `lo` and an `eth0` holding the pod
IP: its 127.0.0.1, its 0.0.0.0:15443 and 127.0.0.1:15001 are its own, as in a
Kubernetes pod, and pods reach each other by pod IP. The "node" is this
machine's root namespace at the subnet's .1: a CA, a control plane or a fake
API server started on the host listens there and pods reach it.

The layout (needs root, as CI has)::

    root netns:   or-<pid>-<hex> .1/24   (veth: the node's address; a route to the pods)
                        |
    switch netns: node --- br0 --- p2 --- p3 ...      (netns `or-<pid>-<hex>`)
                                   |      |
    pod netns:                    eth0   eth0  .2, .3 ... (netns `or-<pid>-<hex>-<pod>`)

Why the bridge lives in a namespace of its own rather than in the root one: a
bridge in the root namespace sends pod-to-pod frames through the host's
iptables FORWARD chain when br_netfilter is loaded (bridge-nf-call-iptables=1,
as on this machine), so a host firewall with a DROP policy would cut pods off
from each other. In their own namespace no host rule sees them, and nothing of
the host (sysctls, firewall) is touched. Traffic between a pod and the node is
local delivery on the root side's veth; `ip_forward` is left as it is (off here), so
pods reach nothing but each other and the node.

Every name starts `or-<pid>-` of the process that made it: a network whose
process is gone (a crashed or killed run) is removed when the next one starts,
and a concurrent run's is left alone. (This assumes every run on the machine
sees the same PIDs, i.e. shares one PID namespace, as tests here do.)
"""

from __future__ import annotations

import asyncio
import ctypes
import ipaddress
import json
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

NETNS_DIR = Path("/run/netns")
#: A network's tag: `or-<pid of its maker>-<4 hex>`, at most 15 characters (IFNAMSIZ - 1).
_TAG = re.compile(r"^(or-(\d+)-[0-9a-f]{4})(?:-.+)?$")
_POD_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_CLONE_NEWNET = 0x40000000
_BRIDGE = "br0"
_PROBE_TIMEOUT = 2.0
_T = TypeVar("_T")


class PodNetworkError(RuntimeError):
    """Building or removing a pod network failed; the message says which step and why."""


def _ip(*args: str) -> str:
    """Run `ip args`; its output, or an error quoting the command and what ip said."""
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if result.returncode != 0:
        raise PodNetworkError(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")
    return result.stdout


def _in_netns(path: Path, make: Callable[[], _T]) -> _T:
    """`make()` run in the network namespace at `path`, e.g. to create a socket there.

    A socket keeps the namespace it was created in, so this process can serve or
    connect from inside a pod. setns moves only the calling thread: a thread of
    our own does it, so no other thread (or event loop) ever runs in the pod.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    outcome: list[Any] = []

    def enter() -> None:
        try:
            with open("/proc/thread-self/ns/net") as home, open(path) as target:
                if libc.setns(target.fileno(), _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {path}")
                try:
                    outcome.append(make())
                finally:
                    libc.setns(home.fileno(), _CLONE_NEWNET)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=enter, name="netns")
    thread.start()
    thread.join()
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]  # type: ignore[no-any-return]


def _pids_in(path: Path) -> list[int]:
    """The processes whose network namespace is the one bound at `path`."""
    try:
        want = os.stat(path)
    except FileNotFoundError:
        return []
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            seen = os.stat(f"/proc/{entry.name}/ns/net")
        except OSError:  # gone, or a zombie: it holds no namespace any more
            continue
        if (seen.st_dev, seen.st_ino) == (want.st_dev, want.st_ino):
            pids.append(int(entry.name))
    return pids


def running(pid: int) -> bool:
    """`pid` runs (a zombie has exited: it holds no namespace and will never clean up)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _kill_all_in(path: Path, timeout: float = 5.0) -> None:
    """SIGKILL every process in the namespace at `path`, and wait until none is left."""
    deadline = time.monotonic() + timeout
    while pids := [p for p in _pids_in(path) if running(p)]:
        if time.monotonic() > deadline:
            raise PodNetworkError(f"processes {pids} in {path.name} survived SIGKILL")
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


def _links() -> list[str]:
    return [link["ifname"] for link in json.loads(_ip("-j", "link", "show") or "[]")]


def _netns_names() -> list[Path]:
    return sorted(NETNS_DIR.iterdir()) if NETNS_DIR.is_dir() else []


def _remove(tag: str) -> list[str]:
    """Remove everything named `tag` or `tag-*`: processes, the root link, the namespaces.

    Every step is tried; the errors come back, so one failure leaves no more behind
    than it must.
    """
    errors = []
    namespaces = [tag] + [
        p.name for p in _netns_names() if p.name.startswith(f"{tag}-") and p.name != tag
    ]
    for name in namespaces[1:] + namespaces[:1]:  # pods first: nothing left in them
        try:
            _kill_all_in(NETNS_DIR / name)
        except PodNetworkError as exc:
            errors.append(str(exc))
    # The root end of the uplink: deleted now, with its route (a deleted namespace
    # takes its interfaces with it only later, asynchronously).
    # A concurrent run may remove the same leftovers: only what still exists is an error.
    if tag in _links():
        try:
            _ip("link", "delete", tag)
        except PodNetworkError as exc:
            if tag in _links():
                errors.append(str(exc))
    for name in namespaces:
        if (NETNS_DIR / name).exists():
            try:
                _ip("netns", "delete", name)
            except PodNetworkError as exc:
                if (NETNS_DIR / name).exists():
                    errors.append(str(exc))
    return errors


def remove_stale_networks() -> list[str]:
    """Remove the pod networks whose making process is gone; the tags removed."""
    tags = {}
    for name in [p.name for p in _netns_names()] + _links():
        if match := _TAG.match(name):
            tags[match[1]] = int(match[2])
    stale = sorted(tag for tag, pid in tags.items() if not running(pid))
    for tag in stale:
        if errors := _remove(tag):
            raise PodNetworkError(f"could not remove the stale pod network {tag}: {errors}")
    return stale


def _free_subnet(rng: random.Random) -> ipaddress.IPv4Network:
    """A /24 in 10/8 that no route or address of this machine overlaps (nor another run's)."""
    taken = []
    for route in json.loads(_ip("-j", "-4", "route", "show", "table", "all") or "[]"):
        with suppress(ValueError):  # "default", and any other name that is not a network
            taken.append(ipaddress.ip_network(route.get("dst", ""), strict=False))
    for link in json.loads(_ip("-j", "-4", "address", "show") or "[]"):
        for address in link.get("addr_info", []):
            taken.append(ipaddress.ip_network(f"{address['local']}/{address['prefixlen']}", False))
    for _ in range(200):
        candidate = ipaddress.IPv4Network(f"10.{rng.randrange(64, 255)}.{rng.randrange(256)}.0/24")
        if not any(candidate.overlaps(net) for net in taken):
            return candidate
    raise PodNetworkError(f"no free /24 among 10.64-254.*.0/24: the machine routes {taken}")


@dataclass(frozen=True)
class Mount:
    """A volume of the pod's as one container mounts it: the node's directory `source`
    (where the kubelet keeps the volume) at `target`, under /run (the container's own)."""

    source: Path
    target: str
    read_only: bool = False


@dataclass
class Pod:
    """A network namespace with `lo` and `eth0` (the pod IP); its default route is the node."""

    name: str
    ip: str
    netns: str
    processes: list[subprocess.Popen[Any]] = field(default_factory=list, repr=False)

    @property
    def netns_path(self) -> Path:
        return NETNS_DIR / self.netns

    @property
    def prefix(self) -> tuple[str, ...]:
        """Put before a command line to run it in this pod (nsenter execs it: same PID, pipes).

        Closing the network kills what runs in the pod: a process that has not yet
        entered it (nsenter still starting) would be missed, one that has said it is up
        cannot be.
        """
        return ("nsenter", f"--net={self.netns_path}", "--")

    def command(self, args: Sequence[str], user: int | None = None) -> list[str]:
        """`args` run in this pod; as UID and GID `user` if given (an agent runs as 1337,
        an app as another), so that rules matching `meta skuid` see what a pod would.

        A process of `user` keeps two capabilities, CAP_DAC_OVERRIDE and
        CAP_DAC_READ_SEARCH: the interpreter and a test's files may live where only
        root may go (~root/.pyenv, pytest's 0700 tmp_path). They concern files only:
        on the network the process is `user` and nothing more (setpriv, like
        `nsenter --setuid/--setgid`, with the two ambient capabilities).
        """
        return [*self.prefix, *_as_user(user), *args]

    def container_command(
        self,
        args: Sequence[str],
        *,
        user: int | None = None,
        mounts: Sequence[Mount] = (),
        hidden: Sequence[Path] = (),
        own_pids: bool = False,
    ) -> list[str]:
        """`args` run as a container of this pod: its network, and a mount namespace of
        its own, as the container runtime makes one: a /run of its own (a tmpfs) with
        `mounts` in it, and each of `hidden` covered by an empty tmpfs (what the node
        holds that no container sees: the kubelet's directory of every pod's volumes).
        `own_pids`: a PID namespace of its own too (a pod's, without
        shareProcessNamespace), whose /proc shows none of the node's processes.

        Without `own_pids` the process keeps its PID (the mounts are made by a shell
        that then execs `args`): a server's Popen is the server. With it, `args` run as
        PID 1 of the new namespace, killed when the command is (for short runs).
        """
        steps = ["set -e", "mount -t tmpfs -o mode=0755,size=1m tmpfs /run"]
        for mount in mounts:
            if not mount.target.startswith("/run/") and not mount.target.startswith("/var/run/"):
                raise ValueError(f"{mount.target}: a container's mounts go under /run here")
            target = shlex.quote(mount.target)
            source = shlex.quote(str(mount.source))
            steps += [f"mkdir -p {target}", f"mount --bind {source} {target}"]
            if mount.read_only:
                steps.append(f"mount -o remount,bind,ro {target}")
        empty = "mount -t tmpfs -o mode=0755,size=1m tmpfs"
        steps += [f"{empty} {shlex.quote(str(path))}" for path in hidden]
        steps.append('exec "$@"')
        pids = ("--pid", "--fork", "--kill-child", "--mount-proc") if own_pids else ()
        unshare = ("unshare", "--mount", "--propagation", "private", *pids, "--")
        shell = ("sh", "-c", "\n".join(steps), "container")
        return [*self.prefix, *unshare, *shell, *_as_user(user), *args]

    def popen(
        self, args: Sequence[str], *, user: int | None = None, **kw: Any
    ) -> subprocess.Popen[Any]:
        """A process in this pod (as UID/GID `user`); killed when the pod network closes."""
        process = subprocess.Popen(self.command(args, user), **kw)
        self.processes.append(process)
        return process

    def run(
        self,
        args: Sequence[str],
        *,
        user: int | None = None,
        timeout: float = 10.0,
        check: bool = True,
        **kw: Any,
    ) -> subprocess.CompletedProcess[str]:
        """A short command in this pod (as UID/GID `user`), its output captured as text."""
        kw = {"capture_output": True, "text": True, **kw}
        return subprocess.run(self.command(args, user), timeout=timeout, check=check, **kw)

    def socket(
        self, family: socket.AddressFamily = socket.AF_INET, kind: int = socket.SOCK_STREAM
    ) -> socket.socket:
        """A socket of this pod's network, usable from this process (and its event loop)."""
        return _in_netns(self.netns_path, lambda: socket.socket(family, kind))

    async def open_connection(
        self, host: str, port: int, timeout: float = 5.0
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect from inside this pod, e.g. to its own 127.0.0.1:15001."""
        sock = self.socket()
        sock.setblocking(False)
        try:
            await asyncio.wait_for(
                asyncio.get_running_loop().sock_connect(sock, (host, port)), timeout
            )
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock)

    async def start_server(
        self,
        client_connected: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any],
        host: str,
        port: int,
    ) -> asyncio.Server:
        """A server of this process listening inside this pod, e.g. an app on 0.0.0.0:8080
        (on "::", IPv4 and IPv6 both)."""
        sock = self.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if host == "::":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((host, port))
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return await asyncio.start_server(client_connected, sock=sock)


def _as_user(user: int | None) -> tuple[str, ...]:
    """What runs a command as UID and GID `user` (Pod.command says which capabilities it
    keeps); nothing for None (root)."""
    if user is None:
        return ()
    if isinstance(user, bool) or not 0 <= user < 2**32 - 1:
        raise ValueError(f"user {user!r}: a UID is 0 to 4294967294")
    caps = "+dac_override,+dac_read_search"
    return (
        "setpriv",
        f"--reuid={user}",
        f"--regid={user}",
        "--clear-groups",
        f"--inh-caps={caps}",
        f"--ambient-caps={caps}",
        "--",
    )


@dataclass
class PodNetwork:
    """The node (this machine, at `node_ip`) and the pods on its bridge."""

    tag: str
    subnet: ipaddress.IPv4Network
    pods: dict[str, Pod] = field(default_factory=dict)

    @property
    def node_ip(self) -> str:
        return str(self.subnet.network_address + 1)

    def add_pod(self, name: str) -> Pod:
        """A new pod `name` (a DNS label) with the next free IP, reachable once this returns."""
        if not _POD_NAME.fullmatch(name) or len(name) > 63:
            raise ValueError(f"pod name {name!r}: use a DNS label (a-z, 0-9, '-'), as Kubernetes")
        if name in self.pods:
            raise ValueError(f"pod {name!r} exists already: give each pod its own name")
        index = len(self.pods) + 2
        if index > 254:
            raise PodNetworkError(f"pod {name!r}: a /24 holds 253 pods")
        pod = Pod(name, str(self.subnet.network_address + index), f"{self.tag}-{name}")
        self.pods[name] = pod  # before it exists: a half-made pod is still cleaned up
        port = f"p{index}"
        _ip("netns", "add", pod.netns)
        _ip(
            "link",
            "add",
            port,
            "netns",
            self.tag,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            pod.netns,
        )
        _ip("-n", self.tag, "link", "set", port, "master", _BRIDGE, "up")
        _ip("-n", pod.netns, "address", "add", f"{pod.ip}/24", "dev", "eth0")
        _ip("-n", pod.netns, "link", "set", "eth0", "up")
        _ip("-n", pod.netns, "link", "set", "lo", "up")
        _ip("-n", pod.netns, "route", "add", "default", "via", self.node_ip)
        self._probe(pod)
        return pod

    def add_ipv6(self, pod: Pod) -> str:
        """Give `pod` an IPv6 address on eth0 too (a ULA on the pods' bridge); the address.

        Only pods reach it (the node has no IPv6 on this network): enough to test
        what an IPv6 connection between pods does.
        """
        index = int(ipaddress.IPv4Address(pod.ip)) - int(self.subnet.network_address)
        address = f"fd00:6f72::{index:x}"
        _ip("-n", pod.netns, "address", "add", f"{address}/64", "dev", "eth0", "nodad")
        return address

    def _probe(self, pod: Pod) -> None:
        """Fail now, saying why, if the pod cannot reach the node (a host INPUT rule, say)."""
        with socket.create_server((self.node_ip, 0)) as server, pod.socket() as client:
            server.settimeout(_PROBE_TIMEOUT)
            client.settimeout(_PROBE_TIMEOUT)
            try:
                client.connect(server.getsockname())
                server.accept()[0].close()
            except OSError as exc:
                raise PodNetworkError(
                    f"pod {pod.name} ({pod.ip}) cannot reach the node at {self.node_ip}: {exc};"
                    f" does a firewall rule on this machine drop input from {self.tag}?"
                ) from exc

    def close(self) -> None:
        """Kill every process in the pods, then remove the pods, the switch and the uplink."""
        started = [process for pod in self.pods.values() for process in pod.processes]
        for process in started:  # by PID too: one may not have entered its pod yet
            if process.poll() is None:
                process.kill()
        errors = _remove(self.tag)
        for process in started:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                errors.append(f"process {process.pid} ({process.args!r}) survived SIGKILL")
        if errors:
            raise PodNetworkError(f"pod network {self.tag} not fully removed: {errors}")


@contextmanager
def pod_network(rng: random.Random | None = None) -> Iterator[PodNetwork]:
    """A node and a bridge for pods, removed on exit however the block ends.

    Leftovers of runs whose process is gone are removed first.
    """
    if os.geteuid() != 0:
        raise PodNetworkError("pod_network makes network namespaces: run the tests as root")
    rng = rng or random.Random()
    remove_stale_networks()
    tag = f"or-{os.getpid()}-{rng.getrandbits(16):04x}"
    network = PodNetwork(tag, _free_subnet(rng))
    try:
        _ip("netns", "add", tag)
        _ip("-n", tag, "link", "add", _BRIDGE, "type", "bridge")
        _ip("-n", tag, "link", "set", _BRIDGE, "up")
        _ip("link", "add", tag, "type", "veth", "peer", "name", "node", "netns", tag)
        _ip("-n", tag, "link", "set", "node", "master", _BRIDGE, "up")
        _ip("address", "add", f"{network.node_ip}/24", "dev", tag)
        _ip("link", "set", tag, "up")
        yield network
    finally:
        network.close()
