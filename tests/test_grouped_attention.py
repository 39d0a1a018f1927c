"""caprese.model.decoder.grouped_attention (GQA query heads folded into the query length) against float64.

The reference is written out independently: K/V repeated per query head (head h reads KV head h // g, as
transformers' repeat_kv), softmax(q·kᵀ·scale [tanh soft-cap] + mask)·v, the mask built from slots here.
Inputs are rounded to the tested dtype first and the reference runs on those rounded values in float64, so the
difference measures only the kernel's own rounding. Outputs are convex mixes of v ~ N(0, 1) rows (|y| < 4), scores
are ~ +-3. Tolerances, (SDPA path, soft-cap path):
- fp32: 1e-5 both. 24 mantissa bits (6e-8), sums over <= 48 terms of size < 4: < 48 * 4 * 6e-8 = 1.2e-5.
- bf16: 2e-2, 5e-2. SDPA keeps scores and softmax in fp32 and rounds the output (8 bits: 1.6e-2 at |y| ~ 3).
  The soft-cap path, like transformers' eager Gemma 2, holds the scores in bf16 (1.6e-2 at |s| ~ 3: a 1.6 %
  error in each weight) and casts the probabilities to bf16 before ·v, so up to ~3x that.
- fp16: 3e-3, 6e-3. The same roundings with 11 mantissa bits (8x finer).
A wrong head-to-group map, a dropped mask or the wrong scale moves outputs by O(0.1-1), far above any of them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from caprese.model import decoder as decoder_module
from caprese.model.decoder import grouped_attention

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 5e-2), torch.float16: (3e-3, 6e-3)}  # (SDPA, cap)
D, HKV = 32, 2


def slot_mask(start: int, t: int, s: int, window: int | None, pad: torch.Tensor | None) -> torch.Tensor:
    """[B|1, 1, T, S] bool: query at slot start+i sees key slot j <= start+i, within the window, not a pad slot
    (a pad query still sees itself); slots >= start+t (unwritten cache rows) are never seen."""
    qs = torch.arange(start, start + t)[:, None]
    ks = torch.arange(s)[None, :]
    m = ks <= qs
    if window is not None:
        m = m & (ks > qs - window)
    m = m[None, None]
    if pad is not None:
        m = (m & (ks >= pad[:, None, None, None])) | (ks == qs)
    return m


def reference(q, k, v, mask, scale, softcap):
    q, k, v = q.double(), k.double(), v.double()
    b, h, t, d = q.shape
    g = h // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    scores = q @ k.transpose(-1, -2) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    y = torch.softmax(scores, dim=-1) @ v
    return y.transpose(1, 2).reshape(b, t, h * d)


CASES = {  # name: (batch, T, start, S of the cache view, window, left pad)
    "decode": (1, 1, 20, 21, None, None),
    "decode, whole static cache": (1, 1, 20, 48, None, None),  # Decoder.decode_static: unwritten rows masked
    "decode, sliding window 8": (1, 1, 30, 31, 8, None),
    "decode, left padding": (2, 1, 20, 21, None, [0, 5]),
    "prefill, causal from slot 0": (1, 12, 0, 12, None, None),
    "prefill chunk at slot 9": (1, 7, 9, 16, None, None),
    "prefill, sliding window 5": (1, 12, 0, 12, 5, None),
    "prefill, left padding + window 6": (2, 12, 0, 12, 6, [0, 4]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("fold", [None, True], ids=["default", "folded"])  # folded: what CUDA gets for T > 1
@pytest.mark.parametrize("softcap", [None, 7.5], ids=["sdpa", "gemma2-softcap"])
@pytest.mark.parametrize("g", [1, 2, 4])
@pytest.mark.parametrize("case", list(CASES))
def test_grouped_attention_matches_float64(case, g, softcap, fold, dtype):
    b, t, start, s, window, pad = CASES[case]
    pad = None if pad is None else torch.tensor(pad)
    gen = torch.Generator().manual_seed(10 * list(CASES).index(case) + g)
    q = torch.randn(b, HKV * g, t, D, generator=gen).to(dtype)
    k = torch.randn(b, HKV, s, D, generator=gen).to(dtype)
    v = torch.randn(b, HKV, s, D, generator=gen).to(dtype)
    scale = 40**-0.5  # != D**-0.5, as Gemma 2's query_pre_attn_scalar: the scale argument must be honoured
    mask = slot_mask(start, t, s, window, pad)
    causal = start == 0 and t > 1 and window is None and pad is None
    got = grouped_attention(q, k, v, None if causal else mask, causal, scale, softcap, fold)
    ref = reference(q, k, v, mask, scale, softcap)
    assert got.shape == (b, t, HKV * g * D) and got.dtype == dtype
    diff = (got.double() - ref).abs().max().item()
    tol = TOL[dtype][softcap is not None]
    print(f"[attention] {case}, g={g}, {'softcap' if softcap else 'sdpa'}, fold={fold}, {dtype}: max|diff| = {diff:.3g} "
          f"(tol {tol:.0e})")
    assert diff <= tol


def test_query_heads_fold_with_k_v_read_in_place(monkeypatch):
    """No K/V repeat on any path (Gemma 2's soft-cap included): repeat_interleave is never called, and every
    masked SDPA call has equal head counts, no enable_gqa, and stride-1 last dims (what CUDA's memory-efficient
    and cuDNN kernels need; see grouped_attention's docstring). K/V reach SDPA as the caller's tensors.
    Decode folds by default on every device; prefill is forced to fold here as it does on CUDA."""
    calls = []
    real_sdpa = F.scaled_dot_product_attention

    def spy_sdpa(q, k, v, **kw):
        calls.append((q, k, v, kw))
        return real_sdpa(q, k, v, **kw)

    def no_repeat(*a, **kw):
        raise AssertionError("K/V repeated")

    monkeypatch.setattr(decoder_module.F, "scaled_dot_product_attention", spy_sdpa)
    monkeypatch.setattr(torch.Tensor, "repeat_interleave", no_repeat)
    k = torch.randn(1, 2, 48, D)
    v = torch.randn(1, 2, 48, D)
    for t, softcap in [(1, None), (5, None), (1, 30.0), (5, 30.0)]:
        q = torch.randn(1, 8, t, D)
        grouped_attention(q, k, v, slot_mask(20, t, 48, None, None), False, D**-0.5, softcap, None if t == 1 else True)
    assert len(calls) == 2  # the soft-cap path never calls SDPA
    for q, kk, vv, kw in calls:
        assert kk is k and vv is v
        assert q.shape[1] == k.shape[1] and not kw.get("enable_gqa", False)
        assert kw["attn_mask"].stride(-1) == 1 and q.stride(-1) == 1
