"""How many intra-op threads a CPU decode loop should use: the CPUs that are free now, not all of them.

Why: every op of a decode step ends in a barrier, so a thread that the kernel deschedules for another busy
process stalls the whole step. Measured (tools/bench_threads.py, SmolLM2-135M fp32, AMD EPYC Zen 4 2 vCPUs, next
to 0-2 busy processes on an already shared machine): the torch reference decoder with its own 2 threads took
3.4-6.7x the ms/token of 1 thread; ONNX Runtime's spinning pool 1.5-4.4x. One thread per free CPU (and, for ONNX
Runtime, a pool that blocks instead of spinning when it is sized around busy CPUs) stays within the noise of the
best fixed count.

    threads = explicit count (--threads, pin(), CAPRESE_THREADS, OMP_NUM_THREADS)
              else round(usable CPUs - CPU time other processes used lately), at least 1

Usable CPUs: this process's affinity (os.sched_getaffinity) capped by a cgroup CPU quota. The others' CPU time
comes from /proc/stat over those CPUs minus our own process time, between two calls (or a 0.1 s sample when the
last reading is too old), so a long loop that asks once per batch follows the load as it changes.
"""

from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path

SAMPLE_S = 0.1  # fresh sample when there is no recent reading: ~10 jiffies per CPU at USER_HZ 100
MAX_AGE_S = 30.0  # a reading older than this describes another moment: sample afresh
MIN_SPAN_S = 0.05  # a reading younger than this is too short to measure: reuse the last answer

_clock, _sleep = time.monotonic, time.sleep  # module-level, so a test can fake them without touching `time`
_pinned: int | None = None
_lock = threading.Lock()
_last: tuple[float, float, float, float] | None = None  # (wall, busy jiffies, total jiffies, own CPU s)
_last_answer: int | None = None


def pin(threads: int | None) -> int | None:
    """Fix the thread count for every later default_threads() in this process (None: back to the policy);
    returns the previous pin, to restore it."""
    global _pinned
    if threads is not None and int(threads) < 1:
        raise ValueError("threads must be >= 1")
    before, _pinned = _pinned, None if threads is None else int(threads)
    return before


def _env_threads() -> int | None:
    for var in ("CAPRESE_THREADS", "OMP_NUM_THREADS"):
        v = os.environ.get(var, "").strip()
        if v.isdigit() and int(v) > 0:
            return int(v)
    return None


def pinned() -> int | None:
    """The explicit count in force (pin(), then CAPRESE_THREADS, then OMP_NUM_THREADS), or None."""
    return _pinned if _pinned is not None else _env_threads()


def _affinity() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return list(range(os.cpu_count() or 1))


def _quota() -> float | None:
    """CPUs the cgroup may use (cgroup v2 cpu.max, or v1 cfs quota / period); None when unlimited or unknown."""
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
    except (OSError, ValueError, IndexError):
        pass
    try:
        q = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        p = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return q / p if q > 0 and p > 0 else None
    except (OSError, ValueError):
        return None


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity, capped by a cgroup quota."""
    n = len(_affinity()) or 1
    q = _quota()
    return max(1, min(n, math.ceil(q))) if q else n


def _jiffies(cpus: list[int]) -> tuple[float, float] | None:
    """(busy, total) jiffies summed over `cpus` from /proc/stat; None where it cannot be read."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    want = {f"cpu{c}" for c in cpus}
    busy = total = 0.0
    for line in lines:
        name, _, rest = line.partition(" ")
        if name in want:
            v = [float(x) for x in rest.split()]
            idle = v[3] + (v[4] if len(v) > 4 else 0.0)  # idle + iowait
            t = sum(v[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
            busy, total = busy + t - idle, total + t
    return (busy, total) if total > 0 else None


def _reading() -> tuple[float, float, float, float] | None:
    j = _jiffies(_affinity())
    return None if j is None else (_clock(), j[0], j[1], time.process_time())


def others_busy(sample_s: float = SAMPLE_S) -> float | None:
    """CPUs' worth of time that other processes used on our CPUs since the last call (or over a fresh sample);
    None where /proc/stat is unavailable."""
    global _last
    with _lock:
        now = _reading()
        if now is None:
            return None
        prev = _last
        if prev is None or now[0] - prev[0] > MAX_AGE_S or now[0] - prev[0] < MIN_SPAN_S:
            prev = now
            _sleep(sample_s)
            now = _reading()
            if now is None:
                return None
        _last = now
    d_busy, d_total, d_own = now[1] - prev[1], now[2] - prev[2], now[3] - prev[3]
    wall = now[0] - prev[0]
    if d_total <= 0 or wall <= 0:
        return 0.0
    cpus = len(_affinity()) or 1
    busy = cpus * d_busy / d_total  # CPU-equivalents in use on our CPUs, ours included
    return max(0.0, busy - d_own / wall)


def default_threads() -> int:
    """The thread count for the next decode loop: pinned() if set, else one per free usable CPU (at least 1)."""
    global _last_answer
    p = pinned()
    if p is not None:
        return p
    n = usable_cpus()
    with _lock:
        fresh = _last is not None and MIN_SPAN_S > _clock() - _last[0]
        if fresh and _last_answer is not None:
            return _last_answer
    busy = others_busy()
    answer = n if busy is None else max(1, min(n, math.floor(n - busy + 0.5)))
    _last_answer = answer
    return answer


def resolve(threads: int | None) -> int:
    """An explicit count (a --threads flag) wins; None asks default_threads()."""
    return int(threads) if threads else default_threads()


class FollowLoad:
    """A decode loop's thread count: the explicit one (a count given, else pinned()), or default_threads(),
    re-read by tick() once per step every RETUNE_S (no sleep: the reading is the difference since the previous
    one), so a load that arrives in the middle of a long reply costs at most RETUNE_S at the wrong count.
    apply(n) puts a count in force (at most `most`, the pool's size, where there is one)."""

    RETUNE_S = 1.0

    def __init__(self, threads: int | None, apply, most: int | None = None):
        self.explicit = int(threads) if threads else pinned()
        self.threads = 0
        self._apply, self._most = apply, most
        self._next = 0.0

    def start(self):
        self._set(self.explicit or default_threads())
        return self

    def _set(self, n: int) -> None:
        n = min(n, self._most) if self._most else n
        self._apply(n)
        self.threads = n
        self._next = time.monotonic() + self.RETUNE_S

    def tick(self) -> None:
        if self.explicit is None and time.monotonic() >= self._next:
            self._set(default_threads())


class TorchThreads(FollowLoad):
    """A torch decode loop's intra-op threads (FollowLoad): resolve(threads) on entry, the old count restored on
    exit."""

    def __init__(self, threads: int | None = None):
        super().__init__(threads, self._torch_set)
        self._before = 0

    @staticmethod
    def _torch_set(n: int) -> None:
        import torch

        if n != torch.get_num_threads():
            torch.set_num_threads(n)

    def __enter__(self) -> "TorchThreads":
        import torch

        self._before = torch.get_num_threads()
        return self.start()

    def __exit__(self, *exc) -> None:
        import torch

        if torch.get_num_threads() != self._before:
            torch.set_num_threads(self._before)


def describe() -> dict:
    """For --json / bench reports: the policy's inputs and answer."""
    return {"usable_cpus": usable_cpus(), "pinned": pinned(), "threads": default_threads()}
