"""How many CPU threads torch should use: the cores that other programs leave idle, measured, unless told.

On a 2-core machine with one core kept busy by another program, two torch threads wait for each other at every op
(the busy core runs each op's second half late): decoding at R = 2 measured 1.55x its R = 1 time with two threads
against 1.10x when idle. One thread on the idle core keeps R = 2 about as cheap as R = 1.
"""

from __future__ import annotations

import os
import sys
import time

import torch


def idle_cores(window: float = 1.0) -> int:
    """CPU cores that other programs leave idle, measured over `window` seconds from /proc/stat (the load
    average lags by a minute); the load average where /proc/stat does not exist. At least 1."""
    cores = os.cpu_count() or 1
    try:
        first = _cpu_times()
        time.sleep(window)
        second = _cpu_times()
        busy = 1.0 - (second[1] - first[1]) / max(second[0] - first[0], 1)
    except OSError:
        busy = os.getloadavg()[0] / cores
    return max(1, min(cores, round(cores * (1.0 - busy))))


def _cpu_times() -> tuple[int, int]:
    """(total, idle + iowait) jiffies of all CPUs, from the first line of /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return sum(fields), fields[3] + fields[4]


def set_threads(requested: int | None, command: str, most: int | None = None) -> int:
    """Set torch's intra-op threads to `requested`, or (None) to the idle cores (at most `most`), and say which
    on standard error. Returns the number."""
    if requested is not None:
        threads, why = requested, "--threads"
    else:
        idle = idle_cores()
        threads = idle if most is None else min(idle, most)
        why = f"{idle} of {os.cpu_count()} cores idle{'' if most is None else f', at most {most}'}; --threads overrides"
    torch.set_num_threads(threads)
    print(f"parloop {command}: {threads} CPU thread{'s' if threads > 1 else ''} ({why})", file=sys.stderr)
    return threads
