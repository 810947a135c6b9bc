"""What an agent's memory is made of at its peak: run a command with a sampler inside.

    python -c "import bench.peak_probe as m; m.run()" -m outrider agent run --config A.yaml

(bench/peak_rss.py runs agents this way with `--probe`.) A daemon thread reads the
process's RSS every SAMPLE seconds; each time it passes its highest yet by STEP, it
notes what the memory is at that moment (`snapshot`): RSS split into the C heap
(`[heap]` and glibc's other arenas), other anonymous mappings and file pages; glibc's
own account (mallinfo2: bytes in use, free but kept, mmapped); Python's (blocks
allocated, tracemalloc's traced bytes when it runs). With OUTRIDER_PEAK_PROBE_MODE
`objects`, also the live objects the garbage collector tracks, counted by type (the
list it takes costs memory of its own); with `tracemalloc`, tracemalloc runs from the
start (one frame) and the top allocation sites are noted too; with `collect`, after
each snapshot the garbage collector runs, then malloc_trim, and RSS after each is
noted (what of the peak was garbage in reference cycles; this changes what follows).
Snapshots start once the file OUTRIDER_PEAK_PROBE + ".mark" appears (the driver's
word that the agent is idle and the load comes next: that one is the `idle` snapshot,
and the file goes). The last snapshot, the one at the peak, and the idle one go, as
JSON, to the file named by OUTRIDER_PEAK_PROBE, rewritten at each snapshot (SIGKILL
loses nothing).

The sampler's thread has a malloc arena of its own (some hundreds of KiB): compare
RSS with the probe to RSS with the probe, not to a bare agent's.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import gc
import json
import os
import runpy
import sys
import threading
import time
import tracemalloc
from typing import Any

SAMPLE = 0.005
STEP = 128 * 1024
MIN_GAP = 0.2  # seconds between snapshots while RSS climbs
_PAGE = os.sysconf("SC_PAGE_SIZE")


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _mallinfo2() -> dict[str, int]:
    try:
        function = ctypes.CDLL(ctypes.util.find_library("c")).mallinfo2
    except (OSError, AttributeError):
        return {}
    function.restype = _MallInfo2
    info = function()
    return {name: int(getattr(info, name)) for name, _ in _MallInfo2._fields_}


def _rss() -> int:
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * _PAGE


def mappings() -> dict[str, int]:
    """RSS in bytes by kind of mapping: heap (`[heap]`), file, stack, and the other
    anonymous ones by size: `anon 64M` (a thread's malloc arena, reserved 64 MiB and
    touched as used), `anon 8M` (a thread's stack), `anon 1M` and `anon 256K`
    (Python's object allocator's arenas), `anon other` (blocks malloc mapped
    on their own, and the rest)."""
    kinds: dict[str, int] = collections.defaultdict(int)
    kind = "anon other"
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            first = line.split(None, 6)
            if "-" in first[0] and len(first) >= 5 and ":" not in first[0]:
                name = first[5].strip() if len(first) > 5 else ""
                start, end = (int(x, 16) for x in first[0].split("-"))
                size = end - start
                if name == "[heap]":
                    kind = "heap"
                elif name == "[stack]":
                    kind = "stack"
                elif name.startswith("/") or name.startswith("["):
                    kind = "file" if name.startswith("/") else "special"
                elif start % (64 << 20) == 0:
                    kind = "anon 64M"  # glibc aligns a thread arena's heap to its size
                elif size in (8 << 20, (8 << 20) + 4096):
                    kind = "anon 8M"
                elif size == 1 << 20:
                    kind = "anon 1M"
                elif size == 256 << 10:
                    kind = "anon 256K"
                else:
                    kind = "anon other"
            elif first[0] == "Rss:":
                kinds[kind] += int(first[1]) * 1024
    return dict(kinds)


def snapshot(mode: str) -> dict[str, Any]:
    found: dict[str, Any] = {
        "time": time.monotonic(),
        "rss": _rss(),
        "mappings": mappings(),
        "mallinfo2": _mallinfo2(),
        "python_blocks": sys.getallocatedblocks(),
        "gc_counts": gc.get_count(),
        "threads": threading.active_count(),
    }
    if tracemalloc.is_tracing():
        found["traced"] = tracemalloc.get_traced_memory()[0]
    if mode == "objects":
        counts = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
        found["objects"] = counts.most_common(40)
    if mode == "tracemalloc":
        top = tracemalloc.take_snapshot().statistics("lineno")[:25]
        found["top"] = [(str(s.traceback[0]), s.size, s.count) for s in top]
    if mode == "collect":
        # How much of the peak is garbage in reference cycles: collected, then trimmed.
        found["collected"] = gc.collect()
        found["rss_after_collect"] = _rss()
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.malloc_trim(0)
        found["rss_after_trim"] = _rss()
    return found


def _sample(path: str, mode: str) -> None:
    first: dict[str, Any] | None = None
    peak = 0
    last = 0.0
    mark = path + ".mark"
    while True:
        time.sleep(SAMPLE)
        rss = _rss()
        now = time.monotonic()
        if os.path.exists(mark):  # the driver says: idle now, the load comes next
            first = snapshot("basic")
            os.unlink(mark)
            peak, last = first["rss"], 0.0
            continue
        if first is not None and rss >= peak + STEP and now - last >= MIN_GAP:
            peak, last = rss, now
            found = snapshot(mode)
            peak = max(peak, found["rss"])
            record = {"idle": first, "peak": found}
            partial = path + ".part"
            with open(partial, "w") as out:
                json.dump(record, out)
            os.replace(partial, path)


def run() -> None:
    """Run `-m module args...` (what follows in sys.argv) with the sampler."""
    path = os.environ["OUTRIDER_PEAK_PROBE"]
    mode = os.environ.get("OUTRIDER_PEAK_PROBE_MODE", "basic")
    if mode == "tracemalloc":
        tracemalloc.start(1)
    threading.Thread(target=_sample, args=(path, mode), daemon=True).start()
    if sys.argv[1:2] != ["-m"]:
        sys.exit("usage: python -c 'import bench.peak_probe as m; m.run()' -m module args")
    module = sys.argv[2]
    sys.argv = [module, *sys.argv[3:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
