"""GRIFFIN, CATS, static magnitude pruning and the Caprese bypass (caprese.calibration) against independent references.

Every expected value here is computed in the test, in float64 numpy, straight from the formulas of the paper
(/work/shared/CAPRESE.md), never by calling the code under test:
  GRIFFIN  s_j^2 = sum_t (z_tj / ||z_t||)^2,  selection = top-k(s),  k = int(D_FF * density);
           reselection selects top-k(sqrt(s^2 + s_G^2)), s from the prompt and s_G from the new tokens.
  CATS     tau = numpy.percentile(|act(x W_g)| over the prompt tokens, 100 (1 - density)); decode zeroes |a| <= tau.
  magnitude selection = top-k(||W_g row|| * ||W_1 row||), whatever the prompt.
  bypass   FF^+(x) = FF^(x) + x L R;  folded: [W^_g, W^_1, L] (D x (2k + r)) and [W^_2 ; R] ((k + r) x D).
Model-level references take the FFN inputs x from a forward pre-hook on the *dense* model's FFNs (a separately
loaded, unmodified decoder) and rebuild Z = act(x W_g + b_g) * (x W_1 + b_1) in float64.

Tolerances (fp32 code against float64 references):
  1e-5 (rtol and atol) on FFN outputs / logits. The values are O(1) and sums run over at most a few hundred
  terms, so fp32 rounding (eps 6e-8) accumulates to ~1e-6; every bug these tests target (a missing
  normalisation, density used in place of 1 - density, a wrong row slice, a dropped bypass) moves the result by
  more than 1e-2. Where a discrete choice (top-k, a threshold) is compared, the test first checks the float64
  reference is well away from a tie, so rounding cannot flip it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from caprese.calibration.bypass import LowRankBypass, fold, folded_ffn
from caprese.calibration.methods import (CatsFFN, EfficientFFN, GriffinFFN, MagnitudeFFN, apply_method,
                                         efficient_layers, griffin_statistic_sq, percentile_linear)
from caprese.calibration.recipe import parse_layers
from caprese.model import load_decoder
from caprese.model.ffn import DenseFFN, FFNContext
from caprese.model.generation import decode_one_token, generate, left_pad

METHODS = ("griffin", "cats", "magnitude")
TOL = dict(rtol=1e-5, atol=1e-5)
PREFILL = FFNContext("prefill", 0)
DECODE = FFNContext("decode", 64)

# --------------------------------------------------------------------------------------------------------------
# float64 references (numpy), written from the paper's formulas


def f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy()


def silu64(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


class Weights:
    """float64 copies of a DenseFFN's weights in math layout (x @ wg etc.), biases as zeros when absent."""

    def __init__(self, dense: DenseFFN):
        def bias(lin):
            return f64(lin.bias) if lin.bias is not None else np.zeros(lin.out_features)

        self.wg, self.bg = f64(dense.gate_proj.weight).T, bias(dense.gate_proj)  # [D, F], [F]
        self.wu, self.bu = f64(dense.up_proj.weight).T, bias(dense.up_proj)
        self.wd, self.bd = f64(dense.down_proj.weight).T, bias(dense.down_proj)  # [F, D], [D]

    def act(self, x):  # act(x W_g + b_g)
        return silu64(x @ self.wg + self.bg)

    def z(self, x):  # Z = act(x W_g + b_g) * (x W_1 + b_1)
        return self.act(x) * (x @ self.wu + self.bu)

    def dense(self, x):
        return self.z(x) @ self.wd + self.bd

    def compact(self, x, idx):
        """The pruned FFN on neurons idx only: act(x W_g[:, idx]) * (x W_1[:, idx]) W_2[idx] (+ biases)."""
        idx = np.asarray(idx)
        a = silu64(x @ self.wg[:, idx] + self.bg[idx])
        return (a * (x @ self.wu[:, idx] + self.bu[idx])) @ self.wd[idx] + self.bd

    def cats(self, x, tau):
        a = self.act(x)
        a = np.where(np.abs(a) > tau, a, 0.0)
        return (a * (x @ self.wu + self.bu)) @ self.wd + self.bd


def stat_sq_ref(z: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """sum over tokens of (z_t / ||z_t||)^2: [B, T, F] -> [B, F]."""
    zn = z / np.linalg.norm(z, axis=-1, keepdims=True)
    sq = zn**2
    if valid is not None:
        sq = sq * valid[..., None]
    return sq.sum(axis=1)


def topk_ref(score: np.ndarray, k: int) -> list[int]:
    """Sorted indices of the k largest entries of a 1-D score, after checking the k-th is not a near-tie."""
    order = np.argsort(-score, kind="stable")
    if k < score.size:
        gap = score[order[k - 1]] - score[order[k]]
        assert gap > 1e-5 * abs(score[order[0]]), f"top-{k} boundary is a near-tie ({gap:.2e}): reference ill-posed"
    return sorted(order[:k].tolist())


def magnitude_score(w: Weights) -> np.ndarray:
    return np.linalg.norm(w.wg, axis=0) * np.linalg.norm(w.wu, axis=0)


def random_ffn(d: int = 24, f: int = 40, bias: bool = True, seed: int = 0, activation: str = "silu") -> DenseFFN:
    g = torch.Generator().manual_seed(seed)
    ffn = DenseFFN(d, f, activation, bias)
    with torch.no_grad():
        for p in ffn.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return ffn.requires_grad_(False)


def randn(*shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------------------
# tiny llama (hidden 96, D_FF 160, 2 layers, MLP biases) and a dense-model capture of every FFN input


@pytest.fixture(scope="module")
def llama_dir(tiny_model_dir):
    return tiny_model_dir("llama")


def prompt_ids(n: int, seed: int) -> list[int]:
    return torch.randint(5, 320, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def dense_ffn_inputs(folder, tokens: torch.Tensor, pad: torch.Tensor | None = None):
    """Run a fresh dense decoder over tokens [B, T] from slot 0; return (per-layer FFN inputs as float64 [B, T, D],
    per-layer float64 weights) captured with forward pre-hooks on its DenseFFN modules."""
    dense = load_decoder(folder)
    dense.setup_caches(tokens.shape[0], tokens.shape[1])
    xs, hooks = {}, []
    for i, layer in enumerate(dense.layers):
        assert type(layer.mlp) is DenseFFN
        hooks.append(layer.mlp.register_forward_pre_hook(lambda m, args, i=i: xs.__setitem__(i, f64(args[0]))))
    dense(tokens, 0, pad)
    for h in hooks:
        h.remove()
    return [xs[i] for i in range(len(dense.layers))], [Weights(layer.mlp) for layer in dense.layers]


# --------------------------------------------------------------------------------------------------------------
# GRIFFIN statistic


def test_griffin_statistic_matches_float64():
    # rows of very different norms: forgetting the per-token normalisation changes the result by orders of magnitude
    z = randn(3, 7, 50, seed=1) * (10.0 ** randn(3, 7, 1, seed=2))
    got = griffin_statistic_sq(z)
    assert got.shape == (3, 50) and got.dtype == torch.float32
    want = stat_sq_ref(f64(z))
    np.testing.assert_allclose(f64(got), want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(want.sum(-1), 7.0)  # each token contributes a unit vector's squares
    assert not np.allclose((f64(z) ** 2).sum(1), want, rtol=1e-2)  # the unnormalised sum is far off


def test_griffin_statistic_ignores_left_padding():
    z = randn(2, 6, 30, seed=3)
    z[0, :2] *= 1e3  # padding slots hold garbage; they must not count
    z[1, :1] = 0.0  # an all-zero row (a pad slot can be exactly zero) must not give NaN
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[0, :2] = False
    valid[1, :1] = False
    got = griffin_statistic_sq(z, valid)
    want = stat_sq_ref(f64(z[:, 2:]))  # row 0 over its 4 real tokens
    np.testing.assert_allclose(f64(got[0]), want[0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(f64(got[1]), stat_sq_ref(f64(z[1:, 1:]))[0], rtol=1e-5, atol=1e-7)
    assert torch.isfinite(got).all()
    assert not torch.allclose(griffin_statistic_sq(z[:1]), got[:1], rtol=1e-2)  # unmasked would differ


def test_griffin_selection_in_decoder_is_topk_of_prompt_statistic(llama_dir):
    ids = torch.tensor([prompt_ids(14, seed=10)])
    model = load_decoder(llama_dir)
    apply_method(model, "griffin", 0.5, "all")
    model.setup_caches(1, 32)
    model(ids, 0, phase="prefill")
    xs, ws = dense_ffn_inputs(llama_dir, ids)
    k = int(160 * 0.5)
    for i, ffn in efficient_layers(model).items():
        assert ffn.idx.shape == (1, k)
        s = np.sqrt(stat_sq_ref(ws[i].z(xs[i]))[0])
        assert ffn.idx[0].tolist() == topk_ref(s, k), f"layer {i}"
        # the unnormalised statistic would pick a different set: this check can fail
        assert topk_ref(np.sqrt((ws[i].z(xs[i])[0] ** 2).sum(0)), k) != topk_ref(s, k)


def test_griffin_selection_with_left_padding_in_decoder(llama_dir):
    prompts = [prompt_ids(13, seed=11), prompt_ids(6, seed=12)]
    tokens, pad = left_pad(prompts, 0)
    model = load_decoder(llama_dir)
    apply_method(model, "griffin", 0.5, "all")
    model.setup_caches(2, 32)
    model(tokens, 0, pad, phase="prefill")
    xs, ws = dense_ffn_inputs(llama_dir, tokens, pad)
    valid = (np.arange(tokens.shape[1])[None] >= pad.numpy()[:, None]).astype(np.float64)
    for i, ffn in efficient_layers(model).items():
        s = np.sqrt(stat_sq_ref(ws[i].z(xs[i]), valid))
        for b in range(2):
            assert ffn.idx[b].tolist() == topk_ref(s[b], 80), f"layer {i} row {b}"
        assert ffn.idx[0].tolist() != ffn.idx[1].tolist()


# --------------------------------------------------------------------------------------------------------------
# GRIFFIN decode: the compact FFN of the selected neurons, per sequence


def test_griffin_decode_is_compact_ffn_per_row():
    dense = random_ffn(seed=20)
    w = Weights(dense)
    x = randn(2, 7, 24, seed=21)
    x[0, :3] *= 20.0  # left padding of row 0: huge garbage that would dominate the statistic if counted
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[0, :3] = False
    m = GriffinFFN(dense, 0.4)
    k = int(40 * 0.4)
    prefill_out = m(x, FFNContext("prefill", 0, valid))
    # prefill is the dense FFN (the pad slots hold values ~500, so compare them at relative precision)
    np.testing.assert_allclose(f64(prefill_out), w.dense(f64(x)), rtol=1e-5, atol=1e-5 * 500)

    s = np.sqrt(stat_sq_ref(w.z(f64(x)), f64(valid)))
    idx = [topk_ref(s[b], k) for b in range(2)]
    assert m.idx.tolist() == idx and idx[0] != idx[1]

    xd = randn(2, 1, 24, seed=22)
    got = m(xd, DECODE)
    want = np.stack([w.compact(f64(xd[b]), idx[b]) for b in range(2)])
    np.testing.assert_allclose(f64(got), want, **TOL)
    assert not np.allclose(want, w.dense(f64(xd)), atol=1e-2)  # pruning matters here
    # the other row's selection would give a different answer: rows really use their own neurons
    assert not np.allclose(want[0], w.compact(f64(xd[0]), idx[1]), atol=1e-2)

    # batch of 2 == each row alone (batch 1 takes the plain-GEMM path)
    for b in range(2):
        one = GriffinFFN(dense, 0.4)
        one(x[b:b + 1, valid[b]], PREFILL)
        assert one.idx[0].tolist() == idx[b]
        torch.testing.assert_close(one(xd[b:b + 1], DECODE), got[b:b + 1], rtol=1e-6, atol=1e-6)


def test_decode_before_prefill_is_an_error():
    with pytest.raises(RuntimeError, match="before any prefill"):
        GriffinFFN(random_ffn(), 0.5)(randn(1, 1, 24, seed=0), DECODE)
    with pytest.raises(RuntimeError, match="before any prefill"):
        CatsFFN(random_ffn(), 0.5)(randn(1, 1, 24, seed=0), DECODE)


# --------------------------------------------------------------------------------------------------------------
# GRIFFIN reselection: sqrt(s^2 + s_G^2)


def test_reselection_statistic_combines_prompt_and_new_tokens(llama_dir):
    p, n = 12, 9
    ids = torch.tensor([prompt_ids(p + n, seed=30)])
    model = load_decoder(llama_dir)
    apply_method(model, "griffin", 0.5, "all")
    model.setup_caches(1, 32)
    model(ids[:, :p], 0, phase="prefill")
    first = {i: f.idx.clone() for i, f in efficient_layers(model).items()}
    model(ids[:, p:], p, phase="prefill")  # a reselection pass: prefill phase at start > 0

    xs, ws = dense_ffn_inputs(llama_dir, ids)  # one dense pass over prompt + new tokens
    changed = 0
    for i, ffn in efficient_layers(model).items():
        z = ws[i].z(xs[i])
        s_sq, sg_sq = stat_sq_ref(z[:, :p])[0], stat_sq_ref(z[:, p:])[0]
        want = topk_ref(np.sqrt(s_sq + sg_sq), 80)
        assert ffn.idx[0].tolist() == want, f"layer {i}"
        assert first[i][0].tolist() == topk_ref(np.sqrt(s_sq), 80)
        # a restart (s_G alone) or adding norms (s + s_G) picks other neurons: the check can fail
        assert want != topk_ref(np.sqrt(sg_sq), 80)
        assert want != topk_ref(np.sqrt(s_sq) + np.sqrt(sg_sq), 80)
        changed += want != first[i][0].tolist()
    assert changed > 0

    # a later prefill from slot 0 restarts the statistic
    model(ids[:, p:], 0, phase="prefill")
    xs2, _ = dense_ffn_inputs(llama_dir, ids[:, p:])
    for i, ffn in efficient_layers(model).items():
        assert ffn.idx[0].tolist() == topk_ref(np.sqrt(stat_sq_ref(ws[i].z(xs2[i]))[0]), 80)


def test_generate_reselect_density1_equals_dense(llama_dir):
    ids = prompt_ids(10, seed=31)
    ref = generate(load_decoder(llama_dir), ids, 24).tokens[0]
    model = load_decoder(llama_dir)
    apply_method(model, "griffin", 1.0, "all")
    assert generate(model, ids, 24, reselect_every=5).tokens[0] == ref
    assert generate(model, ids, 24, reselect_every=1).tokens[0] == ref
    # batch with left padding too
    batch = [ids, prompt_ids(6, seed=32)]
    want = generate(load_decoder(llama_dir), batch, 16, eos_ids=(2,)).tokens
    assert generate(model, batch, 16, eos_ids=(2,), reselect_every=3).tokens == want


def test_generate_reselect_changes_griffin_output(llama_dir):
    """At density 0.5 re-selecting every 4 steps changes the greedy continuation (tiny llama, 30 tokens)."""
    ids = prompt_ids(10, seed=31)
    model = load_decoder(llama_dir)
    apply_method(model, "griffin", 0.5, "all")
    plain = generate(model, ids, 30).tokens[0]
    resel = generate(model, ids, 30, reselect_every=4).tokens[0]
    assert plain[:4] == resel[:4]  # identical until the first reselection pass
    assert plain != resel


def test_reselection_pass_rewrites_kv_with_dense_values(llama_dir):
    ids, rho = prompt_ids(10, seed=33), 4
    t = len(ids)

    def run(reselect_every):
        model = load_decoder(llama_dir)
        apply_method(model, "griffin", 0.5, "all")
        # rho + 1 new tokens: decode steps 0..rho-1, the last of which is the reselection pass over slots t..t+rho-1
        out = generate(model, ids, rho + 1, reselect_every=reselect_every).tokens[0]
        return model, out

    model, out = run(rho)
    approx, out_plain = run(0)
    assert out[:rho] == out_plain[:rho]  # the fed tokens are the same in both runs

    dense = load_decoder(llama_dir)
    dense.setup_caches(1, t + rho)
    dense(torch.tensor([ids + out[:rho]]), 0)
    window = slice(t, t + rho)
    for got, want in zip(model.layers, dense.layers):  # every layer, prompt and window slots
        for name in ("k", "v"):
            g, w = getattr(got.self_attn.cache, name), getattr(want.self_attn.cache, name)
            torch.testing.assert_close(g[:, :, :t + rho], w[:, :, :t + rho], **TOL)
    # without reselection the same slots hold the pruned model's values (layer 1 sees layer 0's pruned FFN)
    d = (approx.layers[-1].self_attn.cache.k[:, :, window] - dense.layers[-1].self_attn.cache.k[:, :, window])
    assert d.abs().max() > 1e-2

    # and the selection is now top-k of sqrt(s^2 + s_G^2), s_G over the re-run window
    xs, ws = dense_ffn_inputs(llama_dir, torch.tensor([ids + out[:rho]]))
    for i, ffn in efficient_layers(model).items():
        z = ws[i].z(xs[i])
        assert ffn.idx[0].tolist() == topk_ref(np.sqrt(stat_sq_ref(z[:, :t]) + stat_sq_ref(z[:, t:]))[0], 80)


# --------------------------------------------------------------------------------------------------------------
# CATS


@pytest.mark.parametrize("q", [0.0, 0.1, 0.3, 0.5, 0.7, 0.999, 1.0])
@pytest.mark.parametrize("n", [1, 2, 3, 7, 100, 1001])
def test_percentile_linear_matches_numpy(n, q):
    v = randn(n, seed=n) * 3.0
    want = np.percentile(f64(v), 100 * q)
    np.testing.assert_allclose(f64(percentile_linear(v, q)), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(f64(percentile_linear(v.reshape(1, -1, 1), q)), want, rtol=1e-6, atol=1e-6)


def test_cats_tau_is_prompt_percentile_with_padding():
    dense = random_ffn(seed=40)
    w = Weights(dense)
    x = randn(2, 9, 24, seed=41)
    x[1, :4] *= 10.0  # row 1 is left-padded by 4
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, :4] = False
    m = CatsFFN(dense, 0.3)
    m(x, FFNContext("prefill", 0, valid))
    a = np.abs(w.act(f64(x)))
    want = [np.percentile(a[0], 70.0), np.percentile(a[1, 4:], 70.0)]  # 100 (1 - density)
    np.testing.assert_allclose(f64(m.tau), want, rtol=1e-5)
    assert not np.allclose(want, [np.percentile(a[0], 30.0), np.percentile(a[1, 4:], 30.0)], rtol=1e-2)
    assert not np.isclose(want[1], np.percentile(a[1], 70.0), rtol=1e-3)  # padding must not count


def test_cats_tau_in_decoder(llama_dir):
    ids = torch.tensor([prompt_ids(15, seed=42)])
    model = load_decoder(llama_dir)
    apply_method(model, "cats", 0.3, "all")
    model.setup_caches(1, 32)
    model(ids, 0, phase="prefill")
    xs, ws = dense_ffn_inputs(llama_dir, ids)
    for i, ffn in efficient_layers(model).items():
        a = np.abs(ws[i].act(xs[i]))
        np.testing.assert_allclose(f64(ffn.tau), [np.percentile(a, 70.0)], rtol=1e-5, err_msg=f"layer {i}")
        assert not math.isclose(np.percentile(a, 70.0), np.percentile(a, 30.0), rel_tol=1e-2)


def test_cats_decode_zeroes_entries_at_or_below_tau():
    dense = random_ffn(seed=43)
    w = Weights(dense)
    x = randn(2, 8, 24, seed=44)
    m = CatsFFN(dense, 0.3)
    m(x, PREFILL)
    a = np.abs(w.act(f64(x)))
    tau = np.array([np.percentile(a[b], 70.0) for b in range(2)])
    xd = randn(2, 3, 24, seed=45)
    ad = np.abs(w.act(f64(xd)))
    assert np.abs(ad - tau[:, None, None]).min() > 1e-4  # no decode entry is a near-tie with tau
    got = m(xd, DECODE)
    want = np.stack([w.cats(f64(xd[b]), tau[b]) for b in range(2)])
    np.testing.assert_allclose(f64(got), want, **TOL)
    assert not np.allclose(want, w.dense(f64(xd)), atol=1e-2)


def _identity_ffn(gate_bias: list[float]) -> DenseFFN:
    """FFN whose output is exactly the (thresholded) gate activation: W_g = 0, b_g given; u = 1; W_2 = I."""
    n = len(gate_bias)
    ffn = DenseFFN(n, n, "silu", bias=True).requires_grad_(False)
    ffn.gate_proj.weight.zero_()
    ffn.gate_proj.bias.copy_(torch.tensor(gate_bias))
    ffn.up_proj.weight.zero_()
    ffn.up_proj.bias.fill_(1.0)
    ffn.down_proj.weight.copy_(torch.eye(n))
    ffn.down_proj.bias.zero_()
    return ffn


def test_cats_entry_equal_to_tau_is_zeroed():
    """9 distinct activations, density 0.5: tau is exactly the median activation, which |a| <= tau must drop."""
    bias = [0.1 * (i + 1) for i in range(9)]
    m = CatsFFN(_identity_ffn(bias), 0.5)
    m(randn(1, 1, 9, seed=46), PREFILL)
    a = silu64(np.array(bias))
    assert math.isclose(float(m.tau[0]), a[4], rel_tol=1e-6)
    got = f64(m(randn(1, 1, 9, seed=47), DECODE))[0, 0]
    np.testing.assert_allclose(got, np.where(np.arange(9) > 4, a, 0.0), rtol=1e-6, atol=1e-7)
    assert (got == 0).sum() == 5


def test_cats_density1_keeps_every_activation():
    bias = [0.1 * (i + 1) for i in range(9)]
    m = CatsFFN(_identity_ffn(bias), 1.0)
    m(randn(1, 1, 9, seed=46), PREFILL)
    got = f64(m(randn(1, 1, 9, seed=47), DECODE))[0, 0]
    np.testing.assert_allclose(got, silu64(np.array(bias)), rtol=1e-6, atol=1e-7)


def test_cats_fixed_tau_ignores_the_prompt():
    dense = random_ffn(seed=48)
    w = Weights(dense)
    m = CatsFFN(dense, 0.3)
    m.fixed_tau = 0.25
    xd = randn(2, 1, 24, seed=49)
    assert np.abs(np.abs(w.act(f64(xd))) - 0.25).min() > 1e-4
    before = m(xd, DECODE)  # no prefill needed
    m(randn(2, 5, 24, seed=50), PREFILL)
    after_a = m(xd, DECODE)
    m(randn(2, 5, 24, seed=51, scale=5.0), FFNContext("prefill", 5))
    after_b = m(xd, DECODE)
    assert m.tau is None
    assert torch.equal(before, after_a) and torch.equal(before, after_b)
    np.testing.assert_allclose(f64(before), w.cats(f64(xd), 0.25), **TOL)
    # a prompt-derived tau would differ from 0.25 here
    free = CatsFFN(dense, 0.3)
    free(randn(2, 5, 24, seed=50), PREFILL)
    assert not torch.allclose(free(xd, DECODE), before, atol=1e-3)


# --------------------------------------------------------------------------------------------------------------
# static magnitude pruning


def test_magnitude_selection_is_static_topk_of_weight_norms():
    dense = random_ffn(seed=60)
    w = Weights(dense)
    m = MagnitudeFFN(dense, 0.33)
    want = topk_ref(magnitude_score(w), 13)  # k = int(40 * 0.33) = int(13.2)
    assert m.idx.tolist() == [want]
    assert want != topk_ref(np.linalg.norm(w.wg, axis=0), 13)  # the product matters, not just ||W_g||
    m(randn(1, 6, 24, seed=61), PREFILL)
    assert m.idx.tolist() == [want]
    m(randn(2, 4, 24, seed=62, scale=10.0), PREFILL)
    assert m.idx.tolist() == [want]
    xd = randn(2, 1, 24, seed=63)
    np.testing.assert_allclose(f64(m(xd, DECODE)), w.compact(f64(xd), want), **TOL)


def test_magnitude_selection_in_decoder(llama_dir):
    model = load_decoder(llama_dir)
    apply_method(model, "magnitude", 0.5, "all")
    for i, ffn in efficient_layers(model).items():
        assert ffn.idx[0].tolist() == topk_ref(magnitude_score(Weights(ffn.dense)), 80)


# --------------------------------------------------------------------------------------------------------------
# density 1.0 == dense; prefill is always dense


@torch.no_grad()
def stepwise_logits(model, ids: list[int], prompt_len: int) -> torch.Tensor:
    """Prefill ids[:prompt_len] (all positions' logits), then teacher-forced decode steps over the rest."""
    model.setup_caches(1, len(ids))
    rows = [model(torch.tensor([ids[:prompt_len]]), 0, phase="prefill")[0]]
    for i in range(prompt_len, len(ids)):
        rows.append(decode_one_token(model, torch.tensor([[ids[i]]]), i))
    return torch.cat(rows)


@pytest.mark.parametrize("method", [
    "griffin", "cats", "magnitude"])
def test_density1_equals_dense_logits(llama_dir, method):
    ids = prompt_ids(30, seed=70)
    ref = stepwise_logits(load_decoder(llama_dir), ids, 10)
    model = load_decoder(llama_dir)
    apply_method(model, method, 1.0, "all")
    got = stepwise_logits(model, ids, 10)
    torch.testing.assert_close(got, ref, **TOL)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("rank", [0, 8])
def test_prefill_is_exactly_dense(llama_dir, method, rank):
    ids = torch.tensor([prompt_ids(20, seed=71)])
    dense = load_decoder(llama_dir)
    model = load_decoder(llama_dir)
    apply_method(model, method, 0.5, "all", rank=rank)
    for ffn in efficient_layers(model).values():
        if ffn.bypass is not None:
            ffn.bypass.R.data.normal_(generator=torch.Generator().manual_seed(0))
    for m in (dense, model):
        m.setup_caches(1, 24)
    # prefill from slot 0 and a later prefill chunk (start > 0): both bit-identical to the dense model
    assert torch.equal(model(ids[:, :12], 0, phase="prefill"), dense(ids[:, :12], 0))
    assert torch.equal(model(ids[:, 12:], 12, phase="prefill"), dense(ids[:, 12:], 12, phase="prefill"))
    # while decoding, the method does change the logits (density 0.5)
    tok = ids[:, -1:]
    assert not torch.allclose(decode_one_token(model, tok, 20), decode_one_token(dense, tok, 20), atol=1e-3)


# --------------------------------------------------------------------------------------------------------------
# the Caprese bypass x L R and folding


def _reference_approx(method: str, m: EfficientFFN, w: Weights, prompt: torch.Tensor, xd: np.ndarray):
    """FF^(xd) for a method after `prompt` [1, T, D] was prefilled, from the float64 formulas."""
    if method == "griffin":
        return w.compact(xd, topk_ref(np.sqrt(stat_sq_ref(w.z(f64(prompt)))[0]), m.k))
    if method == "magnitude":
        return w.compact(xd, topk_ref(magnitude_score(w), m.k))
    return w.cats(xd, np.percentile(np.abs(w.act(f64(prompt))), 100 * (1 - m.density)))


@pytest.mark.parametrize("method", METHODS)
def test_bypass_starts_at_ffhat_then_adds_xLR(method):
    cls = {"griffin": GriffinFFN, "cats": CatsFFN, "magnitude": MagnitudeFFN}[method]
    dense = random_ffn(seed=80)
    w = Weights(dense)
    prompt, xd = randn(1, 6, 24, seed=81), randn(1, 2, 24, seed=82)
    bypass = LowRankBypass(24, 5, seed=3)
    assert bypass.L.shape == (24, 5) and torch.equal(bypass.R, torch.zeros(5, 24))
    plain, plus = cls(dense, 0.5), cls(dense, 0.5, bypass)
    plain(prompt, PREFILL)
    plus(prompt, PREFILL)
    ffhat = plain(xd, DECODE)
    assert torch.equal(plus(xd, DECODE), ffhat)  # R = 0: exactly FF^

    with torch.no_grad():
        bypass.R.normal_(generator=torch.Generator().manual_seed(4))
    want = _reference_approx(method, plain, w, prompt, f64(xd[0])) + f64(xd[0]) @ f64(bypass.L) @ f64(bypass.R)
    np.testing.assert_allclose(f64(plus(xd, DECODE))[0], want, **TOL)
    np.testing.assert_allclose(f64(ffhat)[0], _reference_approx(method, plain, w, prompt, f64(xd[0])), **TOL)
    assert np.abs(f64(xd[0]) @ f64(bypass.L) @ f64(bypass.R)).max() > 1e-2  # the bypass term is not negligible


def test_apply_method_bypass_rank_starts_at_ffhat(llama_dir):
    ids = prompt_ids(16, seed=83)
    plain = load_decoder(llama_dir)
    apply_method(plain, "griffin", 0.5, "all")
    plus = load_decoder(llama_dir)
    apply_method(plus, "griffin", 0.5, "all", rank=8)
    for ffn in efficient_layers(plus).values():
        assert ffn.bypass.L.shape == (96, 8) and not ffn.bypass.R.any()
    assert torch.equal(stepwise_logits(plus, ids, 8), stepwise_logits(plain, ids, 8))


@pytest.mark.parametrize("rank", [0, 6])
def test_fold_matches_unfolded_ffhat_plus_xLR(rank):
    """folded_ffn(x, *fold(...)) == act(x Ŵ_g) ⊙ (x Ŵ_1) Ŵ_2 + x L R.

    Tolerance rtol 1e-5 / atol 1e-5: fp32 values of size ~1 summed over D = 24 and k + r <= 22 terms carry ~1e-6
    rounding; putting L through the gate, dropping R or mis-slicing [Ŵ_g, Ŵ_1, L] moves the output by > 1e-1.
    """
    d, k = 24, 16
    gate_w, up_w, down_w = randn(k, d, seed=90) * 0.3, randn(k, d, seed=91) * 0.3, randn(d, k, seed=92) * 0.3
    bypass = None
    if rank:
        bypass = LowRankBypass(d, rank, seed=5)
        with torch.no_grad():
            bypass.R.normal_(generator=torch.Generator().manual_seed(6))
    w_gul, w_dr = fold(gate_w, up_w, down_w, bypass)
    assert w_gul.shape == (d, 2 * k + rank) and w_dr.shape == (k + rank, d)
    x = randn(3, 5, d, seed=93)
    got = folded_ffn(x, w_gul, w_dr, k, F.silu)
    x64 = f64(x)
    want = (silu64(x64 @ f64(gate_w).T) * (x64 @ f64(up_w).T)) @ f64(down_w).T
    if bypass is not None:
        lr = x64 @ f64(bypass.L) @ f64(bypass.R)
        assert np.abs(lr).max() > 1e-1
        want = want + lr
    np.testing.assert_allclose(f64(got), want, **TOL)


def test_fold_of_griffin_selection_matches_module_decode():
    """Folding the selected compact weights of a (bias-free) GRIFFIN FFN reproduces its own decode output."""
    dense = random_ffn(bias=False, seed=94)
    bypass = LowRankBypass(24, 4, seed=7)
    with torch.no_grad():
        bypass.R.normal_(generator=torch.Generator().manual_seed(8))
    m = GriffinFFN(dense, 0.5, bypass)
    m(randn(1, 6, 24, seed=95), PREFILL)
    idx = m.idx[0]
    w_gul, w_dr = fold(dense.gate_proj.weight[idx], dense.up_proj.weight[idx], dense.down_proj.weight[:, idx], bypass)
    xd = randn(1, 1, 24, seed=96)
    torch.testing.assert_close(folded_ffn(xd, w_gul, w_dr, m.k, F.silu), m(xd, DECODE), **TOL)


# --------------------------------------------------------------------------------------------------------------
# parse_layers and apply_method arguments


@pytest.mark.parametrize("layers, n, want", [
    ("all", 4, [0, 1, 2, 3]),
    ("first-half", 4, [0, 1]),
    ("first-half", 5, [0, 1]),
    ("second-half", 4, [2, 3]),
    ("second-half", 5, [2, 3, 4]),
    ("0,2,5-9", 10, [0, 2, 5, 6, 7, 8, 9]),
    ("3, 1 ,1", 4, [1, 3]),
    ("2-2", 3, [2]),
    ([3, 0, 3], 4, [0, 3]),
])
def test_parse_layers(layers, n, want):
    assert parse_layers(layers, n) == want


@pytest.mark.parametrize("layers, n", [
    ("10", 10), ("0,2,5-10", 10), ([0, 4], 4), ([-1], 4),  # out of range
    ("abc", 4), ("1.5", 4), ("1-", 4), ("0-1-2", 4), ("-1", 4), ("", 4), ("3-1", 4),  # garbage or empty
    ("first-half", 1),  # selects nothing
])
def test_parse_layers_errors(layers, n):
    with pytest.raises(ValueError, match="layer"):
        parse_layers(layers, n)


@pytest.mark.parametrize("layers, n, needle", [
    ("5-2", 8, "layer range '5-2' runs backwards; write it low-high .e.g. 2-5."),
    ("", 4, "name no layer"), ("first-half", 1, "name no layer"),
    ("10", 10, r"layer indices \[10\] are outside 0..9"),
])
def test_parse_layers_error_says_what_is_wrong(layers, n, needle):
    """Not 'layer indices [] are outside' for a backwards range or an empty selection."""
    with pytest.raises(ValueError, match=needle):
        parse_layers(layers, n)


def test_apply_method_replaces_selected_layers(llama_dir):
    model = load_decoder(llama_dir)
    assert apply_method(model, "griffin", 0.5) == [0]  # GRIFFIN's default: the first half of 2 layers
    assert isinstance(model.layers[0].mlp, GriffinFFN) and type(model.layers[1].mlp) is DenseFFN
    dense0 = model.layers[0].mlp.dense
    assert apply_method(model, "cats", 0.5) == [0, 1]  # CATS's default: all layers (the paper's Caprese(CATS))
    assert isinstance(model.layers[0].mlp, CatsFFN) and isinstance(model.layers[1].mlp, CatsFFN)
    assert model.layers[0].mlp.dense is dense0
    assert apply_method(model, "griffin", 0.33, "0") == [0]  # re-applying wraps the original dense FFN
    assert isinstance(model.layers[0].mlp, GriffinFFN) and model.layers[0].mlp.dense is dense0
    assert model.layers[0].mlp.k == 52  # int(160 * 0.33) = int(52.8)
    assert model.layers[0].mlp.gate_proj is dense0.gate_proj  # the FFN contract: projections stay reachable


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="griffin", density=0.5, rank=96), "rank"),  # rank >= D
    (dict(method="griffin", density=0.5, rank=200), "rank"),
    (dict(method="griffin", density=0.5, rank=-1), "rank"),
    (dict(method="griffin", density=0.0), "density"),
    (dict(method="cats", density=1.5), "density"),
    (dict(method="magnitude", density=-0.5), "density"),
    (dict(method="magnitude", density=float("nan")), "density"),
    (dict(method="sparsegpt", density=0.5), "unknown method"),
    (dict(method="griffin", density=0.5, layers="7"), "layer"),
])
def test_apply_method_errors(llama_dir, kwargs, match):
    model = load_decoder(llama_dir)
    with pytest.raises(ValueError, match=match):
        apply_method(model, **{"layers": "all", **kwargs})
    assert all(type(layer.mlp) is DenseFFN for layer in model.layers)  # nothing half-applied


def test_apply_method_largest_rank_ok(llama_dir):
    model = load_decoder(llama_dir)
    apply_method(model, "magnitude", 0.5, "all", rank=95)
    assert all(f.bypass.rank == 95 for f in efficient_layers(model).values())


@pytest.mark.parametrize("density", ["0.5", 0.0, 1.5, True])
def test_open_source_refuses_a_bad_density_by_name(llama_dir, density):
    """The API's own check (the CLI's click types never pass a string): one CapreseError, not a TypeError from a
    comparison deep in a method's constructor."""
    from caprese.calibration.source import open_source
    from caprese.errors import CapreseError

    with pytest.raises(CapreseError, match=r"density must be in \(0, 1\] \(a number\); got"):
        open_source(llama_dir, method="griffin", density=density)
