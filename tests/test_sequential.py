"""Sequential layer-wise distillation (caprese/calibration/sequential.py) on tiny random models.

The reference is computed from scratch with whole-model forwards, not with the stored-state machinery under test:
a dense decoder gives each layer's output t on the response tokens; a student decoder with the artifact's
bypasses on the layers below, prompt prefilled densely and the response run as one decode chunk, gives the
FFN input x and the residual stream mid entering the FFN branch. The target rows are
branch_target(t, mid) − FF̂(x); the recorded per-layer metrics must match them.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from distributed_worker import make_samples

from caprese.calibration.artifact import load_artifact
from caprese.calibration.calibrate import calibrate
from caprese.calibration.methods import efficient_layers
from caprese.calibration.recipe import CalibrationOptions, CalibrationRecipe, LayerwiseConfig
from caprese.calibration.sequential import branch_target
from caprese.errors import CapreseError
from caprese.model.loading import load_decoder

CFG = dict(epochs=6, lr=5e-3, batch_size=32, seed=1)
QUIET = CalibrationOptions(progress=False)


def reference_errors(model_dir, art, samples):
    """Per target layer (mean ‖target − FF̂‖², mean ‖target − FF̂ − xLR‖², mean ‖FF(x)‖²) from whole forwards."""
    dense = load_decoder(model_dir)
    student = load_decoder(model_dir)
    art.apply(student)
    ffns = efficient_layers(student)
    sums = {i: [0.0, 0.0, 0.0] for i in art.layers}
    rows = 0
    for s in samples:
        p, n = len(s.prompt_ids), len(s.ids)
        dense.setup_caches(1, n)
        student.setup_caches(1, n)
        outs, xs, mids = {}, {}, {}
        hooks = [dense.layers[i].register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o[0, p:].clone()))
                 for i in art.layers]
        for i in art.layers:
            blk = student.layers[i]
            norm = blk.pre_feedforward_layernorm if blk.gemma else blk.post_attention_layernorm
            hooks.append(blk.mlp.register_forward_pre_hook(lambda m, a, i=i: xs.__setitem__(i, a[0][0].clone())))
            hooks.append(norm.register_forward_pre_hook(lambda m, a, i=i: mids.__setitem__(i, a[0][0].clone())))
        try:
            with torch.no_grad():
                dense.hidden_states(torch.tensor([s.ids]), 0, phase="prefill")
                student.hidden_states(torch.tensor([s.prompt_ids]), 0, phase="prefill")
                xs.clear()
                mids.clear()
                student.hidden_states(torch.tensor([s.response_ids]), p, phase="decode")
                for i in art.layers:
                    f, x = ffns[i], xs[i]
                    y = f.dense(x[None])[0]
                    r = branch_target(student.layers[i], mids[i], outs[i], y) - f.approx(x[None])[0]
                    sums[i][0] += float(r.double().square().sum())
                    sums[i][1] += float((r - f.bypass(x)).double().square().sum())
                    sums[i][2] += float(y.double().square().sum())
        finally:
            for h in hooks:
                h.remove()
        rows += len(s.response_ids)
    return {i: tuple(v / rows for v in vals) for i, vals in sums.items()}


@pytest.mark.parametrize("kind", ["gemma2", "llama"])
def test_branch_target_recovers_the_dense_ffn_output_in_float64(tiny_model_dir, kind):
    """Independent of the capture machinery: run the DENSE model in float64 and read, with forward hooks, each
    block's residual stream entering the FFN branch (mid), its FFN output y and its output t. The FFN output that
    makes the block output t is y itself, so branch_target(mid, t, y) must give y back: for Gemma 2 that is the
    post-FFN norm (1 + w, per-token RMS) inverted exactly. branch_target works in float32, hence rtol 1e-5 (its
    rounding is ~1e-7 relative; a wrong inverse, e.g. w for 1 + w or a missing RMS, is off by O(1))."""
    dense = load_decoder(tiny_model_dir(kind), torch.float64)
    ids = torch.tensor([make_samples(1, seed=9)[0].ids])
    got: dict[tuple[str, int], torch.Tensor] = {}
    hooks = []
    for i, blk in enumerate(dense.layers):
        norm = blk.pre_feedforward_layernorm if blk.gemma else blk.post_attention_layernorm
        hooks += [norm.register_forward_pre_hook(lambda m, a, i=i: got.__setitem__(("mid", i), a[0][0].clone())),
                  blk.mlp.register_forward_hook(lambda m, a, o, i=i: got.__setitem__(("y", i), o[0].clone())),
                  blk.register_forward_hook(lambda m, a, o, i=i: got.__setitem__(("t", i), o[0].clone()))]
    try:
        with torch.no_grad():
            dense.setup_caches(1, ids.shape[1])
            dense.hidden_states(ids, 0, phase="prefill")
    finally:
        for h in hooks:
            h.remove()
    for i, blk in enumerate(dense.layers):
        mid, y, t = got["mid", i], got["y", i], got["t", i]
        assert mid.dtype == torch.float64 and y.abs().max() > 0.1
        target = branch_target(blk, mid, t, y)
        err = ((target - y).abs().max() / y.abs().max()).item()
        print(f"{kind} layer {i}: max |branch_target - y| / max |y| = {err:.2e}")
        torch.testing.assert_close(target, y, rtol=1e-5, atol=1e-5 * y.abs().max().item())
        if blk.gemma:  # the post-FFN norm really moves the branch: t - mid is not y
            assert ((t - mid) - y).abs().max() > 0.1 * y.abs().max()


@pytest.mark.parametrize("kind, method, layers", [("llama", "griffin", "all"), ("gemma2", "cats", "all"),
                                                  ("qwen2", "griffin", "1")])
def test_sequential_metrics_match_whole_model_forwards(tiny_model_dir, tmp_path, kind, method, layers,
                                                       monkeypatch):
    # tolerance: stored states are float32 copies of float32 activations (exact); the one-block-at-a-time
    # pass and the whole forward differ only in reduction order, so relative agreement to 1e-4
    import caprese.calibration.sequential as seq

    model = tiny_model_dir(kind)
    samples = make_samples(10, seed=4)
    dense_passes = []  # per propagation: did it run the dense (teacher) pass itself?
    open_write = seq._States.open_write
    monkeypatch.setattr(seq._States, "open_write", lambda st, teacher=True: (dense_passes.append(teacher),
                                                                             open_write(st, teacher))[1])
    art = calibrate(model, tmp_path / "seq", CalibrationRecipe(method, 0.5, layers, 8, stage="layerwise",
                                                              layerwise=LayerwiseConfig(**CFG, mode="sequential")),
                    samples, QUIET)
    # a trained layer's capture already wrote the next teacher rows; a layer below the first target did not
    assert dense_passes == [i not in art.layers for i in range(max(art.layers))]  # propagations 0 .. last - 1
    assert not (tmp_path / "seq.work").exists()
    assert art.recipe["layerwise"]["mode"] == "sequential"
    ref = reference_errors(model, load_artifact(tmp_path / "seq"), samples)
    recorded = art.metrics["layerwise"]["layers"]
    for i, (before, after, ff) in ref.items():
        m = recorded[str(i)]
        print(f"layer {i}: before {before:.5g} (recorded {m['before']:.5g}), after {after:.5g} "
              f"(recorded {m['after']:.5g})")
        assert m["before"] == pytest.approx(before, rel=1e-4) and m["after"] == pytest.approx(after, rel=1e-4)
        assert m["ff_sq"] == pytest.approx(ff, rel=1e-4)
        assert after < before


def test_sequential_first_layer_equals_the_parallel_stage(tiny_model_dir, tmp_path):
    # Nothing below layer 0 is approximated, so its sequential target t − mid is FF(x) up to float32 rounding
    # of (mid + FF(x)) − mid, and its rows equal the parallel stage's: same metrics, nearly the same adapters.
    model = tiny_model_dir("llama")
    samples = make_samples(10, seed=5)
    recipe = CalibrationRecipe("griffin", 0.5, "all", 8, stage="layerwise")
    seq = calibrate(model, tmp_path / "seq",
                    dataclasses.replace(recipe, layerwise=LayerwiseConfig(**CFG, mode="sequential")), samples, QUIET)
    par = calibrate(model, tmp_path / "par", dataclasses.replace(recipe, layerwise=LayerwiseConfig(**CFG)), samples,
                    QUIET)
    a, b = seq.metrics["layerwise"]["layers"]["0"], par.metrics["layerwise"]["layers"]["0"]
    assert a["before"] == pytest.approx(b["before"], rel=1e-5) and a["ff_sq"] == pytest.approx(b["ff_sq"], rel=1e-6)
    assert torch.allclose(seq.adapters[0][1], par.adapters[0][1], atol=1e-4)
    # deeper layers see the approximated layers below: different inputs, different rows
    assert seq.metrics["layerwise"]["layers"]["1"]["before"] != pytest.approx(
        par.metrics["layerwise"]["layers"]["1"]["before"], rel=1e-3)


def test_sequential_resumes_after_kills_with_identical_adapters(tiny_model_dir, tmp_path):
    model = tiny_model_dir("gemma2")
    samples = make_samples(8, seed=6)
    kw = dict(recipe=CalibrationRecipe("griffin", 0.5, "all", 8, stage="layerwise",
                                       layerwise=LayerwiseConfig(epochs=3, batch_size=16, seed=2, mode="sequential")),
              samples=samples, options=QUIET)
    ref = calibrate(model, tmp_path / "ref", **kw)
    events = []

    def killer(when):
        def cb(ev):
            events.append(ev)
            if when(ev):
                raise KeyboardInterrupt("simulated kill")
        return cb

    import caprese.calibration.capture_store as store
    import caprese.calibration.sequential as seq

    def mid_capture(mp):
        """Kill while capturing layer 1: samples 1-2 synced, 3-4 written (rows and next teacher rows) but not."""
        def when(e):
            if e["stage"] == "capture" and e.get("layer") == 1 and e["sample"] == 2:
                mp.setattr(store, "SYNC_S", 1e9)
            return e["stage"] == "capture" and e.get("layer") == 1 and e["sample"] == 4
        return when

    with pytest.raises(KeyboardInterrupt), pytest.MonkeyPatch.context() as mp:
        mp.setattr(store, "SYNC_S", 0.0)
        calibrate(model, tmp_path / "out", **kw, callback=killer(mid_capture(mp)))
    work = tmp_path / "out.work"
    assert (work / "layer_0.safetensors").is_file() and (work / "sequential" / "states_1.json").is_file()
    dense_passes = []
    with pytest.raises(KeyboardInterrupt), pytest.MonkeyPatch.context() as mp:  # killed while training layer 2
        open_write = seq._States.open_write
        mp.setattr(seq._States, "open_write", lambda st, teacher=True: (dense_passes.append(teacher),
                                                                        open_write(st, teacher))[1])
        calibrate(model, tmp_path / "out", **kw,
                  callback=killer(lambda e: e["stage"] == "layerwise" and e["layer"] == 2 and e.get("step") == 1))
    assert dense_passes == [False]  # the resumed capture of layer 1 left complete teacher rows for boundary 2
    events.clear()
    art = calibrate(model, tmp_path / "out", **kw, callback=events.append)
    assert sorted({e["layer"] for e in events if e["stage"] == "layerwise"}) == [2]  # layers 0, 1 reused
    assert all(torch.equal(art.adapters[i][0], ref.adapters[i][0]) and torch.equal(art.adapters[i][1],
                                                                                   ref.adapters[i][1])
               for i in ref.adapters)


def test_sequential_mode_refuses_torchrun_and_unknown_modes(tiny_model_dir, tmp_path, monkeypatch):
    import caprese.calibration.sequential as seq

    with pytest.raises(CapreseError, match="layer-wise mode"):
        LayerwiseConfig(mode="greedy")
    monkeypatch.setattr(seq, "world", lambda: (0, 2))
    with pytest.raises(CapreseError, match="without torchrun"):
        calibrate(tiny_model_dir("llama"), tmp_path / "x",
                  CalibrationRecipe("griffin", 0.5, "all", 8, stage="layerwise",
                                    layerwise=LayerwiseConfig(epochs=1, mode="sequential")), make_samples(4), QUIET)
