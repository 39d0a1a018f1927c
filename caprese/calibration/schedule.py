"""The learning-rate schedule both distillation stages use: linear warm-up, then linear decay (paper: 2% warm-up).

Step s (0-based, the optimiser step about to be taken) gets lr · factor(s):
    s <  W:  (s + 1) / W                      (ramps up; the first step already moves, at lr / W)
    s >= W:  (total - s) / (total - W)        (1 at the end of warm-up, 1 / (total - W) on the last step)
with W = warmup_steps(total, frac) = ceil(frac · total) (0 when frac == 0). No step runs at lr 0.
"""

from __future__ import annotations

import math

import torch


def warmup_steps(total: int, frac: float) -> int:
    if not 0 <= frac < 1:
        raise ValueError(f"warm-up fraction must be in [0, 1); got {frac}")
    return min(total - 1, math.ceil(frac * total)) if frac > 0 and total > 1 else 0


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Multiplier of the base lr at optimiser step `step` of `total` (warm-up of `warmup` steps)."""
    if total <= 0:
        return 1.0
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def linear_schedule(optimizer: torch.optim.Optimizer, total: int, warmup_frac: float = 0.02
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR applying lr_factor; call `.step()` after each `optimizer.step()`. Its state_dict resumes it."""
    w = warmup_steps(total, warmup_frac)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, w))
