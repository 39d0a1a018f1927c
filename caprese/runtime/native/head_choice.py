"""Screened or full LM head: measured once per kernel build, head shape and thread count, cached on this machine.

Why: the screened head reads a quarter of the head's bytes, but whether that is faster depends on the CPU and
the instruction set: on an AVX2-only EPYC a build that widened the int8 rows with the compiler's shuffles read
them slower than the fp32 rows (28.4 vs 25.1 ms per dense SmolLM2 step). So the default head ("auto") times
both on this machine at load, alternating, and keeps the faster; the result is cached under
$CAPRESE_CACHE/native/head_choice.json, keyed on the kernel build (source, flags, compiler, CPU flags), the
head's shape and the thread count, so later loads cost nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

FILE = "head_choice.json"


@dataclasses.dataclass(frozen=True)
class HeadChoice:
    head: str            # "screened" or "full"
    screened_ms: float   # median time of one screened head (greedy) in the probe
    full_ms: float       # median time of one full head
    rows: int            # fp32 rows the probe's screen recomputed
    source: str          # "measured" (now) or "cached"

    def describe(self) -> str:
        return (f"{self.head} (probe on this CPU, {self.source}: screened {self.screened_ms:.2f} ms, full "
                f"{self.full_ms:.2f} ms per step)")


def probe(run_full: Callable[[], None], run_screened: Callable[[], int], repeats: int = 7,
          clock: Callable[[], float] = time.perf_counter) -> tuple[float, float, int]:
    """(screened ms, full ms, rows recomputed): medians of `repeats` alternating runs after one warm-up of each."""
    run_full()
    rows = run_screened()
    full, screened = [], []
    for _ in range(repeats):
        t0 = clock()
        run_full()
        t1 = clock()
        rows = run_screened()
        t2 = clock()
        full.append((t1 - t0) * 1e3)
        screened.append((t2 - t1) * 1e3)
    return statistics.median(screened), statistics.median(full), int(rows)


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def choose(key: str, run_full: Callable[[], None], run_screened: Callable[[], int], folder: Path,
           repeats: int = 7, clock: Callable[[], float] = time.perf_counter) -> HeadChoice:
    """The cached choice for `key`, else a probe (screened only if strictly faster), cached atomically."""
    path = Path(folder) / FILE
    hit = _read(path).get(key)
    if isinstance(hit, dict) and hit.get("head") in ("screened", "full"):
        try:
            return HeadChoice(hit["head"], float(hit["screened_ms"]), float(hit["full_ms"]), int(hit["rows"]),
                              "cached")
        except (KeyError, TypeError, ValueError):
            pass
    s, f, rows = probe(run_full, run_screened, repeats, clock)
    choice = HeadChoice("screened" if s < f else "full", round(s, 4), round(f, 4), rows, "measured")
    data = _read(path)  # again: another process may have added its own keys meanwhile
    data[key] = {k: v for k, v in dataclasses.asdict(choice).items() if k != "source"}
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".head_choice-", suffix=".json", dir=path.parent)
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:  # a read-only cache: the choice still holds for this process
        pass
    finally:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
    return choice
