"""What the machine does while a block runs: this process's memory, and the CPU other
processes take (a shared box is noisy)."""

from __future__ import annotations

import os
import resource
import sys
import time


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mib() -> float | None:
    kib = _proc_status_kib("VmRSS")
    return None if kib is None else kib / 1024


def hwm_mib() -> float:
    """Peak RSS so far (monotone unless `reset_hwm` works)."""
    kib = _proc_status_kib("VmHWM")
    if kib is None:  # not Linux: getrusage is KiB on Linux, bytes on macOS
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        kib = maxrss // 1024 if sys.platform == "darwin" else maxrss
    return kib / 1024


def reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


def _machine_busy_s() -> float | None:
    """Busy CPU seconds of the whole machine since boot (all cores), from /proc/stat."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class LoadMeter:
    """Share of the machine's CPU capacity used by anything but this process (incl. steal)."""

    def __enter__(self) -> LoadMeter:
        self.share: float | None = None
        self._busy = _machine_busy_s()
        times = os.times()
        self._own = times.user + times.system
        self._wall = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        busy = _machine_busy_s()
        times = os.times()
        wall = time.perf_counter() - self._wall
        if busy is None or self._busy is None or wall <= 0:
            return
        foreign = (busy - self._busy) - (times.user + times.system - self._own)
        self.share = max(0.0, foreign / (wall * (os.cpu_count() or 1)))
