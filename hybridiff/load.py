"""Is this machine quiet enough to measure on?

On a 2-core machine one other busy process made ``compile``'s calibration choose 1-device
plans and ``bench`` report digits-sdxl's hybrid at 0.43x serial, with nothing said. Before they
measure, ``compile`` and ``bench`` look at how busy the cores they may use are, while this
process sleeps (so what is seen is other work), and warn in one line where too few are left.
The figure also goes into the plan (``Estimates.background_busy_cores``) and ``bench.json``.
"""

from __future__ import annotations

import os
import time

#: How long the cores are watched. Long enough to see a busy process, short next to a compile.
WATCH_S = 0.2


def _cpu_times(cores: set[int]) -> tuple[int, int] | None:
    """Total and idle jiffies of ``cores`` so far (Linux's ``/proc/stat``; None elsewhere)."""
    total = idle = 0
    try:
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cores:
                    ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
                    total, idle = total + sum(ticks), idle + ticks[3] + ticks[4]
    except (OSError, ValueError, IndexError):
        return None
    return (total, idle) if total else None


def busy_cores(seconds: float = WATCH_S) -> float | None:
    """How many of the cores this process may use other processes keep busy (None where the
    system does not say)."""
    cores = os.sched_getaffinity(0)
    before = _cpu_times(cores)
    time.sleep(seconds)
    after = _cpu_times(cores)
    if before is None or after is None or after[0] <= before[0]:
        return None
    busy_share = 1 - (after[1] - before[1]) / (after[0] - before[0])
    return round(max(0.0, busy_share) * len(cores), 2)


def load_warning(busy: float | None, needed: int, what: str) -> str | None:
    """The warning line when other work leaves fewer than ``needed`` of the usable cores free."""
    usable = len(os.sched_getaffinity(0))
    if busy is None or busy <= usable - min(needed, usable) + 0.5:
        return None
    return (
        f"warning: other processes keep {busy:.1f} of this machine's {usable} cores busy, and {what} needs {needed}: "
        "its timings will be slow and uneven (a compile may choose fewer devices); measure on a quiet machine"
    )
