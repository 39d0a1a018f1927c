"""Efficient FFN methods (GRIFFIN, CATS, static magnitude) wrapped around a dense FFN, plus the Caprese bypass.

Every variant runs the dense FFN while the prompt is processed (phase "prefill") and gathers what it needs
from that pass; it approximates only while decoding (phase "decode"), adding `x·L·R` when it has a bypass.
A prefill at start == 0 restarts the statistics; a prefill at start > 0 (a GRIFFIN reselection pass over
generated tokens, or a later chat turn) adds to them, which is the paper's sqrt(s⊙s + s_G⊙s_G).
"""

from __future__ import annotations

import torch
from torch import nn

from caprese.calibration.bypass import LowRankBypass
from caprese.calibration.recipe import METHODS, NO_METHOD, default_layers, parse_layers
from caprese.model.ffn import DenseFFN, FFNContext


def neuron_count(inter: int, density: float) -> int:
    return max(1, int(inter * density))


def griffin_statistic_sq(z: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_t (z_t / ‖z_t‖)² per neuron: [B, T, F] -> [B, F] (float32). GRIFFIN's s is its square root."""
    zf = z.float()
    zn = zf / zf.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sq = zn.square()
    if valid is not None:
        sq = sq * valid[..., None]
    return sq.sum(dim=1)


def percentile_linear(values: torch.Tensor, q: float) -> torch.Tensor:
    """numpy.percentile(values, 100 q) with linear interpolation, for any size (torch.quantile caps at 2^24)."""
    flat = values.reshape(-1).float().sort().values
    pos = q * (flat.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, flat.numel() - 1)
    return flat[lo] + (flat[hi] - flat[lo]) * (pos - lo)


class EfficientFFN(nn.Module):
    """Base: dense in prefill (observing), `approx(x) (+ x L R)` in decode. Keeps `dense` and its projections."""

    method = "dense"

    def __init__(self, dense: DenseFFN, density: float, bypass: LowRankBypass | None = None):
        super().__init__()
        if not 0 < density <= 1:
            raise ValueError("density must be in (0, 1]")
        self.dense, self.density, self.bypass = dense, density, bypass
        self.act = dense.act

    # the dense projections stay reachable under the names the FFN contract promises
    gate_proj = property(lambda self: self.dense.gate_proj)
    up_proj = property(lambda self: self.dense.up_proj)
    down_proj = property(lambda self: self.dense.down_proj)

    @property
    def k(self) -> int:
        return neuron_count(self.dense.gate_proj.out_features, self.density)

    def forward(self, x: torch.Tensor, ctx: FFNContext | None = None) -> torch.Tensor:
        if ctx is None or ctx.phase != "decode":
            g, u = self.dense.gate_proj(x), self.dense.up_proj(x)
            a = self.act(g)
            z = a * u
            self.observe(a, z, ctx or FFNContext("prefill", 0))
            return self.dense.down_proj(z)
        out = self.approx(x)
        return out + self.bypass(x) if self.bypass is not None else out

    def observe(self, a: torch.Tensor, z: torch.Tensor, ctx: FFNContext) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def weights_changed(self) -> None:
        """The dense projections' weights were swapped (quantized student <-> unquantized teacher): drop anything
        derived from them. Selections stay (they are the prompt's)."""

    def approx(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def _slice_weights(dense: DenseFFN, idx: torch.Tensor):
    """Rows of W_g, W_1 and columns of W_2 for neuron indices idx ([k] or [B, k])."""
    g, u, d = dense.gate_proj, dense.up_proj, dense.down_proj
    wg, wu = g.weight[idx], u.weight[idx]  # [.., k, D]
    wd = d.weight[:, idx] if idx.dim() == 1 else d.weight.t()[idx].transpose(-1, -2)  # [.., D, k]
    bg = g.bias[idx] if g.bias is not None else None
    bu = u.bias[idx] if u.bias is not None else None
    return wg, wu, wd, bg, bu


class _CompactFFN(EfficientFFN):
    """Decode with per-sequence compact slices [k, D] (the selected neurons only)."""

    idx: torch.Tensor | None = None  # [B, k] selected neurons, sorted
    _w: tuple | None = None  # compact slices of idx, gathered on first use (a prefill may re-select many times)
    _pinned: tuple | None = None  # fixed buffers the slices are copied into (pin_weights)

    def set_selection(self, idx: torch.Tensor) -> None:
        self.idx = idx.sort(dim=-1).values
        self._w = None
        if self._pinned is not None:
            for buf, new in zip(self._pinned, _slice_weights(self.dense, self.idx)):
                if buf is not None:
                    buf.copy_(new)
            self._w = self._pinned

    def weights_changed(self) -> None:
        if self._pinned is None:
            self._w = None  # re-gathered from the current weights on the next decode
        elif self.idx is not None:
            self.set_selection(self.idx)  # copies the current weights' slices into the pinned buffers

    def pin_weights(self) -> None:
        """From now on every selection is copied into the same buffers: a captured CUDA graph replays the
        addresses it saw, so the compact slices must change in place, not be re-made. Idempotent."""
        if self._pinned is not None:
            return
        self._pinned = tuple(None if t is None else t.clone() for t in self.compact_weights())
        self._w = self._pinned

    def compact_weights(self) -> tuple:
        """(W_g rows [B,k,D], W_1 rows [B,k,D], W_2 cols [B,D,k], b_g, b_1) of the current selection."""
        if self.idx is None:
            raise RuntimeError(f"{self.method}: decode before any prefill selected neurons")
        if self._w is None:
            self._w = _slice_weights(self.dense, self.idx)
        return self._w

    def approx(self, x: torch.Tensor) -> torch.Tensor:
        wg, wu, wd, bg, bu = self.compact_weights()
        bd = self.dense.down_proj.bias
        if wg.shape[0] == 1:  # batch 1 (or a static selection broadcast): plain GEMMs on compact weights
            gx = torch.nn.functional.linear(x, wg[0], None if bg is None else bg[0])
            ux = torch.nn.functional.linear(x, wu[0], None if bu is None else bu[0])
            return torch.nn.functional.linear(self.act(gx) * ux, wd[0], bd)
        gx = torch.bmm(x, wg.transpose(1, 2)) + (0 if bg is None else bg[:, None])
        ux = torch.bmm(x, wu.transpose(1, 2)) + (0 if bu is None else bu[:, None])
        out = torch.bmm(self.act(gx) * ux, wd.transpose(1, 2))
        return out if bd is None else out + bd


class GriffinFFN(_CompactFFN):
    """GRIFFIN: top-k neurons of the prompt's statistic s = ‖row-normalised Z‖ over tokens, per sequence."""

    method = "griffin"
    stat_sq: torch.Tensor | None = None

    def observe(self, a, z, ctx):
        sq = griffin_statistic_sq(z, ctx.valid)
        self.stat_sq = sq if ctx.start == 0 or self.stat_sq is None else self.stat_sq + sq
        self.set_selection(torch.topk(self.stat_sq, self.k, dim=-1).indices)


class MagnitudeFFN(_CompactFFN):
    """Static baseline: the same k neurons for every prompt, by ‖W_g row‖·‖W_1 row‖."""

    method = "magnitude"

    def __init__(self, dense: DenseFFN, density: float, bypass: LowRankBypass | None = None):
        super().__init__(dense, density, bypass)
        score = dense.gate_proj.weight.float().norm(dim=1) * dense.up_proj.weight.float().norm(dim=1)
        self.set_selection(torch.topk(score, self.k).indices[None])

    def observe(self, a, z, ctx):
        pass


class CatsFFN(EfficientFFN):
    """CATS: zero act(x W_g) where |.| <= τ, τ = the (1 - density) percentile of the prompt's own |act(x W_g)|.

    With `fixed_tau` set (the original, offline CATS) τ comes from calibration data instead of the prompt.
    A dense GEMM with a mask gives no speed-up in PyTorch; the speed needs a sparse GEMV kernel.
    """

    method = "cats"
    tau: torch.Tensor | None = None  # [B]
    fixed_tau: float | None = None
    _tokens: torch.Tensor | None = None  # [B] prompt tokens behind τ, per row

    def observe(self, a, z, ctx):
        if self.fixed_tau is not None:
            return
        q = 1.0 - self.density
        taus, counts = [], []
        for b in range(a.shape[0]):
            vals = a[b].abs() if ctx.valid is None else a[b][ctx.valid[b]].abs()
            taus.append(percentile_linear(vals, q))
            counts.append(vals.shape[0])
        tau, n = torch.stack(taus), torch.tensor(counts, dtype=torch.float32, device=a.device)
        if ctx.start == 0 or self.tau is None:
            self.tau, self._tokens = tau, n
        else:  # a later prefill chunk: token-weighted mean of the chunks' percentiles (an approximation)
            self.tau = (self.tau * self._tokens + tau * n) / (self._tokens + n)
            self._tokens = self._tokens + n

    def threshold(self, batch: int, device) -> torch.Tensor:
        if self.density >= 1:  # keep everything: the prompt's minimum |a| as τ would still drop the smallest
            return torch.full((batch,), float("-inf"), device=device)
        if self.fixed_tau is not None:
            return torch.full((batch,), self.fixed_tau, device=device)
        if self.tau is None:
            raise RuntimeError("cats: decode before any prefill set τ")
        return self.tau

    def approx(self, x):
        a = self.act(self.dense.gate_proj(x))
        tau = self.threshold(x.shape[0], x.device).to(a.dtype)
        a = torch.where(a.abs() > tau[:, None, None], a, torch.zeros((), dtype=a.dtype))
        return self.dense.down_proj(a * self.dense.up_proj(x))


class PlainFFN(EfficientFFN):
    """Method "none": no approximation, FF̂ = the FFN as it is (its quantized weights, in a quantized student),
    + x·L·R while decoding: the paper's quantized-FF̂ case (the bypass learns what quantization loses)."""

    method = NO_METHOD

    def observe(self, a, z, ctx):
        pass

    def approx(self, x):
        d = self.dense  # its projections, not d(x): a hook on the dense module (capture) must not fire again
        return d.down_proj(self.act(d.gate_proj(x)) * d.up_proj(x))


_CLASSES = {"griffin": GriffinFFN, "cats": CatsFFN, "magnitude": MagnitudeFFN, NO_METHOD: PlainFFN}
# recipe.py lists the methods (and their default layers) without importing torch
assert tuple(m for m in _CLASSES if m != NO_METHOD) == METHODS


def make_method_ffn(dense: DenseFFN, method: str, density: float,
                    bypass: LowRankBypass | None = None) -> EfficientFFN:
    """`method`'s FFN around `dense` (ValueError for an unknown method)."""
    if method not in _CLASSES:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(_CLASSES)}")
    return _CLASSES[method](dense, density, bypass)


def apply_method(decoder, method: str, density: float, layers: str | list[int] | None = None,
                 rank: int = 0, seed: int = 0) -> list[int]:
    """Replace the FFN of each selected layer with `method` (and a rank-`rank` bypass if rank > 0), in place.

    layers None: the method's default (recipe.METHOD_LAYERS: GRIFFIN and magnitude the first half, CATS all;
    "none", the plain FFN + bypass of a quantized model, all)."""
    if method not in _CLASSES:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(_CLASSES)}")
    idx = parse_layers(default_layers(method) if layers is None else layers, decoder.spec.num_layers)
    d = decoder.spec.hidden_size
    if rank < 0 or rank >= d:
        raise ValueError(f"rank must be in [0, hidden size {d}); got {rank}")
    for i in idx:
        layer = decoder.layers[i]
        dense = layer.mlp.dense if isinstance(layer.mlp, EfficientFFN) else layer.mlp
        w = dense.gate_proj.weight
        bypass = LowRankBypass(d, rank, w.dtype, w.device, seed=seed + i) if rank else None
        layer.mlp = make_method_ffn(dense, method, density, bypass)
    return idx


def efficient_layers(decoder) -> dict[int, EfficientFFN]:
    return {i: layer.mlp for i, layer in enumerate(decoder.layers) if isinstance(layer.mlp, EfficientFFN)}
