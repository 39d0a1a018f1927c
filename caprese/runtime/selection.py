"""What the approximated layers know about the sequence in the KV cache: one record per prefill call.

Each prefill call (a prompt chunk, a later chat turn, a GRIFFIN reselection window) returns, per layer,
griffin_stat.{i} (Σ over its tokens) or cats_tau.{i} (the percentile of its tokens). The decode inputs come
from all records since slot 0, combined in call order exactly as caprese.calibration.methods does:
GRIFFIN adds the statistics, CATS takes the token-weighted mean of the thresholds. Keeping the records (not
just the running value) lets a chat turn drop what no longer describes the cache (the reselection windows of
the previous reply, which the next turn prefills again) without running the conversation again.
"""

from __future__ import annotations

import dataclasses

import torch

PROMPT, RESELECT = "prompt", "reselect"


@dataclasses.dataclass
class Chunk:
    start: int
    end: int  # slots start..end-1
    kind: str  # PROMPT (the sequence's own tokens, prefilled once) | RESELECT (a window of decoded tokens)
    griffin: dict[int, torch.Tensor]  # layer -> Σ_t (z_t/‖z_t‖)² [1, F] float32
    tau: dict[int, torch.Tensor]  # layer -> τ [1] float32


class SelectionState:
    def __init__(self):
        self.chunks: list[Chunk] = []

    def reset(self) -> None:
        self.chunks = []

    def add(self, chunk: Chunk) -> None:
        self.chunks.append(chunk)

    def keep_prompt_chunks(self, limit: int) -> int:
        """Keep the PROMPT chunks that end at or before slot `limit` (they stay valid); return where they end."""
        kept, end = [], 0
        for c in self.chunks:
            if c.kind == PROMPT and c.end <= limit and c.start == end:
                kept.append(c)
                end = c.end
            else:
                break
        self.chunks = kept
        return end

    def griffin_stats(self) -> dict[int, torch.Tensor]:
        out: dict[int, torch.Tensor] = {}
        for c in self.chunks:
            for i, s in c.griffin.items():
                out[i] = s if i not in out else out[i] + s
        return out

    def cats_taus(self) -> dict[int, torch.Tensor]:
        out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for c in self.chunks:
            n = torch.tensor([float(c.end - c.start)])
            for i, tau in c.tau.items():
                if i not in out:
                    out[i] = (tau, n)
                else:
                    old, m = out[i]
                    out[i] = ((old * m + tau * n) / (m + n), m + n)
        return {i: v[0].to(torch.float32) for i, v in out.items()}
