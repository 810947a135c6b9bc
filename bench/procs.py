"""Processes the benchmark starts: where they listen, what they cost, how they stop."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
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
