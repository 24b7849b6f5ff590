"""Resident-memory readings the memory benchmarks share (Linux /proc; CPU runs).

`rss_mb()` is the resident set size now, `reset_hwm()` resets the kernel's high-water mark (so a
higher peak from start-up cannot mask the one measured), `peak_mb()` is the high-water mark since.
"""

from __future__ import annotations

import os
import sys


def rss_mb() -> float | None:
    """Current resident set size in MB, or None where /proc is missing."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except OSError:
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mb() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux
