"""How many worker processes `workers: auto` means: the CPUs this process may use.

Two limits apply in a container: the CPUs the scheduler lets the process run on
(its affinity mask: a cpuset, `taskset`) and the CPU time its cgroup may spend
(cgroup v2 `cpu.max`, which a Kubernetes CPU limit becomes: "200000 100000" is
two CPUs' worth, "max 100000" no limit). More workers than either allows would
only take turns on the same CPUs, each paying its own memory.
"""

from __future__ import annotations


def cpu_quota(cpu_max: str | None) -> int | None:
    """The whole CPUs a cgroup v2 `cpu.max` line allows (rounded down, at least 1: with
    1.5 CPUs a second worker would only share the first's CPU time, and add its memory;
    the injector counts the same); None when it sets no limit ("max ...") or cannot be
    read as one."""
    if not cpu_max:
        return None
    parts = cpu_max.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return max(1, quota // period)


def usable_cpus(affinity: int, cpu_max: str | None) -> int:
    """`workers: auto`: the CPUs in the affinity mask, or fewer if the cgroup's quota says."""
    quota = cpu_quota(cpu_max)
    return max(1, min(affinity, quota) if quota is not None else affinity)
