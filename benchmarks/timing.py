"""Wall-clock timing of whole commands, shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import subprocess
import time


def median_wall(cmd: list[str], n: int) -> float:
    """Median wall time in seconds of ``n`` fresh runs of ``cmd`` (output discarded)."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
