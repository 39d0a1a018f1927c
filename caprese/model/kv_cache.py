"""Static KV cache: one [B, H_kv, max_len, D] buffer pair per layer, allocated once, written in place."""

from __future__ import annotations

import torch
from torch import nn


class StaticKVCache(nn.Module):
    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (batch, kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, start: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v ([B, H_kv, T, D]) at slots start..start+T-1; return views of the valid prefix.

        A tensor `start` ([T] slots, the static decode step) writes with index_copy_ and returns the whole
        buffers (the caller masks): no Python int, so the step keeps fixed shapes for CUDA graphs."""
        if isinstance(start, torch.Tensor):
            self.k.index_copy_(2, start, k)
            self.v.index_copy_(2, start, v)
            return self.k, self.v
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]
