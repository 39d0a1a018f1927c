"""The feed-forward block, kept apart so calibration can swap it for GRIFFIN / CATS / Caprese variants.

Contract for any replacement: `forward(x: [B, T, D], ctx: FFNContext | None) -> [B, T, D]`, and it must keep
the three dense projections reachable as `gate_proj`, `up_proj`, `down_proj` (nn.Linear, HF layout [out, in]).
The context tells a variant which phase it is in: efficient methods run dense (and gather statistics) while
the prompt is processed, and approximate only while decoding.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(frozen=True)
class FFNContext:
    """What the decoder knows about the current forward pass, handed to every FFN."""

    phase: str  # "prefill": dense over prompt tokens (statistics restart when start == 0); "decode": approximate
    start: int  # first cache slot of these tokens (-1: Decoder.decode_static, whose slot is a tensor)
    valid: torch.Tensor | None = None  # [B, T] bool, False at left-padding slots; None when all are real


def activation_fn(name: str):
    if name == "silu":
        return F.silu
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    raise ValueError(f"unknown activation {name!r}")


class DenseFFN(nn.Module):
    """FF(x) = (act(x W_g) * (x W_1)) W_2, the gated MLP of Llama / Qwen2 / Mistral / Gemma 2."""

    def __init__(self, hidden: int, inter: int, activation: str, bias: bool = False):
        super().__init__()
        self.activation = activation
        self.act = activation_fn(activation)
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)

    def forward(self, x: torch.Tensor, ctx: FFNContext | None = None) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
