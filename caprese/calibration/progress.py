"""Progress of the calibration stages: tqdm bars on stderr (one line per rank under torchrun) and the callback
events (dicts with "stage": capture | layerwise | e2e) that tests and the Python API observe; raising from a
callback aborts the run, and the work dir keeps what is finished."""

from __future__ import annotations

import sys
from typing import Callable

from caprese.calibration.distributed import world

Callback = Callable[[dict], None]


def bar(total: int, desc: str, enabled: bool, initial: int = 0):
    from tqdm.auto import tqdm

    rank, ws = world()
    return tqdm(total=total, initial=initial, desc=desc if ws == 1 else f"[rank {rank}] {desc}", file=sys.stderr,
                disable=not enabled, leave=True, dynamic_ncols=True, position=rank if ws > 1 else None)
