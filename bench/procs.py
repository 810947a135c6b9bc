"""Processes the benchmark starts: where they listen, what they cost, how they stop."""

from __future__ import annotations

import compileall
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

# Debian packages the harness needs, by the command each provides.
PACKAGES = {
    "wrk": "wrk",
    "h2load": "nghttp2-client",
    "nghttpd": "nghttp2-server",  # the gRPC scenarios' backend (bench/grpc_calls.py)
    "nginx": "nginx-light",
    "haproxy": "haproxy",
    "taskset": "util-linux",
}
NGINX_STREAM = Path("/usr/lib/nginx/modules/ngx_stream_module.so")  # libnginx-mod-stream


def missing_packages() -> list[str]:
    wanted = [pkg for cmd, pkg in PACKAGES.items() if shutil.which(cmd) is None]
    if not NGINX_STREAM.exists():
        wanted.append("libnginx-mod-stream")
    return wanted


def ensure_packages() -> None:
    """Install what is missing from Debian's packages (bounded), or say what to install."""
    wanted = missing_packages()
    if not wanted:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        sys.exit(f"bench needs these Debian packages: {' '.join(wanted)}")
    print(f"installing {' '.join(wanted)} (apt-get, at most 300 s)", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *wanted]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    if done.returncode != 0 or missing_packages():
        sys.exit(f"apt-get could not install {' '.join(wanted)}:\n{done.stdout}{done.stderr}")


#: The checkout, and its packages that the processes measured here import.
ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("agent", "identity", "ca", "control", "injector", "outrider")


def bytecode() -> None:
    """Compile the checkout's modules to bytecode, as the images' `pip install` does. Where
    none is written on import (PYTHONDONTWRITEBYTECODE, a fresh clone), every process
    would compile each module it imports when it starts, and an idle agent's RSS would be
    partly its compiler's (a few hundred KiB, more for the modules a config loads)."""
    for package in SOURCES:
        compileall.compile_dir(ROOT / package, quiet=1)


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process and all its threads, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _status_mib(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return 0.0


def rss_mib(pid: int) -> float:
    return _status_mib(pid, "VmRSS:")


def peak_rss_mib(pid: int) -> float:
    """The high-water mark of RSS over the process's life (VmHWM)."""
    return _status_mib(pid, "VmHWM:")


def machine_busy_seconds() -> float:
    """CPU seconds spent not idle, summed over every CPU, from /proc/stat."""
    ticks = [int(t) for t in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def wait_for_port(
    port: int, process: subprocess.Popen[bytes], what: str, timeout: float = 10
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} not listening on {port} after {timeout}s")


@contextmanager
def started(command: list[str], port: int, what: str, log: Path) -> Iterator[int]:
    """Run `command` until the block exits, once it listens on `port`; yields its pid."""
    with log.open("ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        try:
            wait_for_port(port, process, what)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}:\n{log.read_text(errors='replace')[-2000:]}") from None
        yield process.pid
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# Where a CPU quota can be set: cgroup v2's unified tree (cpu.max), or v1's cpu controller.
_CGROUP_V2 = Path("/sys/fs/cgroup")
_CGROUP_V1_CPU = Path("/sys/fs/cgroup/cpu")
CFS_PERIOD_US = 100_000


def _cpu_cgroup_root() -> Path | None:
    controllers = _CGROUP_V2 / "cgroup.controllers"
    if controllers.exists() and "cpu" in controllers.read_text().split():
        return _CGROUP_V2
    if (_CGROUP_V1_CPU / "cpu.cfs_quota_us").exists():
        return _CGROUP_V1_CPU
    return None


def cpu_quota_unavailable() -> str | None:
    """Why `cpu_capped` cannot work here, or None when it can."""
    if os.geteuid() != 0:
        return "a CPU quota needs root (a cgroup of our own)"
    if _cpu_cgroup_root() is None:
        return "no cgroup CPU controller (cgroup v2 cpu.max or v1 cpu.cfs_quota_us)"
    return None


@contextmanager
def cpu_capped(name: str, pids: Iterable[int], cores: float) -> Iterator[None]:
    """`pids` (whole processes, every thread, and children they start later) share a
    CPU quota of `cores` CPUs, a cgroup's CFS bandwidth limit, until the block exits.

    What it is for: on a small machine, a proxy of N workers can be given N x `cores`
    of CPU while the load generator and the backend always have CPU left, which is
    what "N workers on N free cores" asks and 2 CPUs cannot give otherwise.
    """
    root = _cpu_cgroup_root()
    if root is None or os.geteuid() != 0:
        raise RuntimeError(cpu_quota_unavailable())
    group = root / f"outrider-bench-{name}-{os.getpid()}"
    group.mkdir()
    try:
        quota = round(cores * CFS_PERIOD_US)
        if root == _CGROUP_V2:
            subtree = root / "cgroup.subtree_control"
            if "cpu" not in subtree.read_text().split():
                subtree.write_text("+cpu")
            (group / "cpu.max").write_text(f"{quota} {CFS_PERIOD_US}")
        else:
            (group / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
            (group / "cpu.cfs_quota_us").write_text(str(quota))
        for pid in pids:
            (group / "cgroup.procs").write_text(str(pid))
        yield
    finally:
        for pid in (group / "cgroup.procs").read_text().split():
            with suppress(OSError):  # exited meanwhile
                (root / "cgroup.procs").write_text(pid)
        group.rmdir()
