"""The Caprese low-rank bypass `x·L·R` and its folding into the compact FFN matrices (paper eqs. 9-10).

Folded form: the up projection gains L as r extra columns, the down projection R as r extra rows:
    z+ = [act(x Ŵ_g) ⊙ (x Ŵ_1),  x L]            ([B, k + r])
    out = z+ [Ŵ_2 ; R]
so the bypass adds no sequential matmul. With a fused gate+up GEMM the first matrix is [Ŵ_g, Ŵ_1, L].
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LowRankBypass(nn.Module):
    """L [D, r] random (scaled so x·L keeps x's scale), R [r, D] zero: training starts exactly at FF̂."""

    def __init__(self, hidden: int, rank: int, dtype=torch.float32, device=None, seed: int | None = None):
        super().__init__()
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        self.L = nn.Parameter((torch.randn(hidden, rank, generator=gen) / math.sqrt(hidden)).to(dtype=dtype,
                                                                                                   device=device))
        self.R = nn.Parameter(torch.zeros(rank, hidden, dtype=dtype, device=device))

    @property
    def rank(self) -> int:
        return self.L.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.L) @ self.R


def fold(gate_w: torch.Tensor, up_w: torch.Tensor, down_w: torch.Tensor,
         bypass: LowRankBypass | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact weights in math layout -> (W_gul [D, 2k + r] = [Ŵ_g, Ŵ_1, L], W_dr [k + r, D] = [Ŵ_2 ; R]).

    gate_w, up_w: [k, D] (nn.Linear layout, rows = kept neurons); down_w: [D, k].
    """
    cols = [gate_w.t(), up_w.t()]
    rows = [down_w.t()]
    if bypass is not None:
        cols.append(bypass.L.to(gate_w.dtype))
        rows.append(bypass.R.to(down_w.dtype))
    return torch.cat(cols, dim=1), torch.cat(rows, dim=0)


def folded_ffn(x: torch.Tensor, w_gul: torch.Tensor, w_dr: torch.Tensor, k: int, act) -> torch.Tensor:
    """Evaluate the folded FFN: one GEMM with [Ŵ_g, Ŵ_1, L], one with [Ŵ_2 ; R] (what the exported graph runs)."""
    h = x @ w_gul
    z = torch.cat([act(h[..., :k]) * h[..., k:2 * k], h[..., 2 * k:]], dim=-1)
    return z @ w_dr
