"""Method "none" (quantized weights + the Caprese bypass x·L·R on every layer, no pruning) through calibrate ->
caprese-export -> runtime: the contract's BYPASS layer kind on both targets.

Reference: open_source(artifact)'s PyTorch model (the artifact's dequantized codes + L, R; the bypass on in decode
only). fp32 on both sides, so the tolerance is the quantized exports': logits within atol 1e-4 + rtol 1e-4 (tiny
models, logits O(1-10)) and greedy tokens identical for 33 steps. The bypass must really be in the decode graph:
the engine's logits differ from the same quantized model without x·L·R (R zeroed).
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch

from distributed_worker import make_samples
from export_helpers import prompt_ids, reference_greedy
from quantized_export_helpers import QuantLoop
from test_native_backend import ATOL as NATIVE_ATOL, RTOL as NATIVE_RTOL, needs_cc, recorded

from caprese.calibration.calibrate import calibrate
from caprese.calibration.recipe import CalibrationOptions, CalibrationRecipe, LayerwiseConfig
from caprese.calibration.weight_quant import QuantRecipe
from caprese.export import contract as C
from caprese.model.quantization import WeightFormat

ATOL = RTOL = 1e-4
STEPS = 33  # the prefill token + 32 decode steps
KIND = "llama3"  # hidden 64, FFN 128: every decoder weight tiles blocks of 32 and 64
LW = LayerwiseConfig(epochs=3, lr=5e-3, batch_size=32, seed=1)


@pytest.fixture(scope="module")
def none_artifact(tiny_model_dir, tmp_path_factory):
    """{block size: artifact}: int4 block 32 (onnxruntime), block 64 (TensorRT's int4 block)."""
    arts = {}
    for block in (32, 64):
        out = tmp_path_factory.mktemp("bypass") / f"a{block}"
        recipe = CalibrationRecipe("none", rank=4, stage="layerwise", layerwise=LW,
                                   weights=QuantRecipe(WeightFormat(4, block)))
        calibrate(tiny_model_dir(KIND), out, recipe, make_samples(4), CalibrationOptions(progress=False))
        arts[block] = out
    return arts


def _without_bypass(dec):
    """The same quantized decoder with x·L·R dropped (R = 0): what an export that lost the bypass would run."""
    from caprese.calibration.methods import efficient_layers

    dec = copy.deepcopy(dec)
    for f in efficient_layers(dec).values():
        with torch.no_grad():
            f.bypass.R.zero_()
    return dec


@pytest.mark.parametrize("target,block,tensorrt", [
    ("onnxruntime", 32, False), ("tensorrt", 64, False), ("tensorrt", 64, True),
])
def test_method_none_export_matches_the_artifacts_model(target, block, tensorrt, none_artifact, tmp_path):
    from caprese.calibration.source import open_source
    from caprese.export.exporter import check_folder, export
    from caprese.export.manifest import load_manifest
    from caprese.runtime.traffic import decode_traffic

    art = none_artifact[block]
    engine = export(art, tmp_path / "engine", max_seq_len=96, target=target, kv_dtype="fp32").out  # fp32 reference
    m = load_manifest(engine)
    assert m.layout.layer_kinds == (C.BYPASS,) * m.layout.num_layers and m.layout.rank == 4
    assert m.spec.recipe.weights is not None and m.spec.recipe.weights.bits == 4
    if target == "tensorrt":
        assert all(not v for v in check_folder(engine).values())
        shared = onnx.load(str(engine / C.TENSORRT_GRAPH_FILES[C.TRT_SHARED]), load_external_data=False)
        assert C.DECODE_FLAG in {i.name for i in shared.graph.input}
    # bytes per step: L and R are read by every decode step
    reads = {w.name for w in m.spec.decode_reads()}
    for t in m.spec.layers:
        assert t.L is not None and t.R is not None and {t.L.name, t.R.name} <= reads
        assert t.L.shape == (m.layout.hidden_size, 4) and t.L.quant is None
    assert decode_traffic(m).weight_bytes >= sum(t.L.nbytes + t.R.nbytes for t in m.spec.layers)

    dec = open_source(art).decoder
    prompt = prompt_ids(14, seed=3)
    ref_tokens, ref_logits = reference_greedy(dec, prompt, STEPS)
    tokens, logits = QuantLoop(engine, tensorrt=tensorrt).greedy(prompt.numpy(), STEPS)
    for step, (a, b) in enumerate(zip(logits, ref_logits)):
        err = np.abs(np.asarray(a) - b.numpy()).max()
        assert np.allclose(a, b.numpy(), atol=ATOL, rtol=RTOL), f"logits at step {step}: max |diff| {err:.3g}"
    assert tokens.tolist() == ref_tokens.tolist()
    # the bypass contributes in decode (not in prefill): the model without it differs from the engine
    _, plain_logits = reference_greedy(_without_bypass(dec), prompt, 2)
    assert np.allclose(logits[0], plain_logits[0].numpy(), atol=ATOL, rtol=RTOL)  # prefill: no bypass
    # step 1 decodes the same token on both (step 0's argmax agrees, checked above against the bypassed model)
    assert np.abs(np.asarray(logits[1]) - plain_logits[1].numpy()).max() > 1e-3


@needs_cc
@pytest.mark.parametrize("target,block", [("onnxruntime", 32), ("tensorrt", 64)])
def test_method_none_runs_on_the_runtime_backends(target, block, none_artifact, tmp_path):
    """Generator: onnxruntime, torch and native give the artifact's greedy tokens, and native's decode logits are
    ONNX Runtime's within the native backend's tolerance (tests/test_native_quantized.py: the same codes, another
    summation order); auto picks native. The artifact's down codes are blocked along D (stored [F, D]) on both
    targets, so the kernel reads them as rows-axpy with R's rows beside them, as for quantized CATS layers."""
    from caprese.calibration.source import open_source
    from caprese.export.exporter import export
    from caprese.export.manifest import load_manifest
    from caprese.runtime import Generator
    from caprese.runtime.native_backend import native_unsupported
    from export_helpers import one_torch_thread

    art = none_artifact[block]
    engine = export(art, tmp_path / "engine", max_seq_len=96, target=target).out
    assert native_unsupported(load_manifest(engine)) is None
    tm = open_source(art)
    ids = tm.encode("What is 12 + 7?", chat=True)
    with one_torch_thread():
        want = tm.generate(ids, max_new_tokens=32, ignore_eos=True).tokens
    gens = {b: Generator.load(engine, backend=b, threads=1) for b in ("onnxruntime", "torch", "native", "auto")}
    for backend, g in gens.items():
        with one_torch_thread():
            r = g.generate(ids, max_new_tokens=32, ignore_eos=True)
        assert r.tokens == want, backend
        if backend == "auto":
            assert r.stats.backend == "native"
    ref, ref_logits = recorded(gens["onnxruntime"], ids, 0)
    got, got_logits = recorded(gens["native"], ids, 0)
    diff = (got_logits - ref_logits).abs().max().item()
    print(f"method none {target}: max |logits native - onnxruntime| = {diff:.2e} over {len(got_logits)} steps")
    assert got.tokens == ref.tokens
    torch.testing.assert_close(got_logits, ref_logits, atol=NATIVE_ATOL, rtol=NATIVE_RTOL)
    # the bypass is in native's decode: dropping R (its rows in the kernel's [L^T | R] copy) changes the logits
    rows = gens["native"].backend.bypass_rows[0]
    rows[:, rows.shape[1] // 2:] = 0
    _, plain_logits = recorded(gens["native"], ids, 0)
    assert (plain_logits - got_logits).abs().max().item() > 1e-3


@pytest.mark.parametrize("target,tensorrt", [("onnxruntime", False), ("tensorrt", False), ("tensorrt", True)])
def test_float_method_none_graphs_match_the_reference(target, tensorrt, tiny_model_dir, tmp_path_factory):
    """Float weights (a stand-in artifact with random L and R): L / R folded into gate_up / down like CATS', the
    bypass switched off in prefill and on in decode; the TensorRT files pass the static check."""
    from caprese.export.exporter import check_folder
    from caprese.runtime.traffic import decode_traffic
    from caprese.export.manifest import load_manifest
    from export_helpers import OrtLoop, get_export, reference_decoder

    engine, src = get_export(tmp_path_factory, tiny_model_dir, KIND, "none", rank=4, target=target)
    m = load_manifest(engine)
    assert m.layout.layer_kinds == (C.BYPASS,) * m.layout.num_layers and not m.layout.quantized
    t = m.spec.layers[0]
    assert t.gate_up.shape == (m.layout.hidden_size, 2 * m.layout.intermediate_size + 4)
    assert t.down.shape == (m.layout.intermediate_size + 4, m.layout.hidden_size)
    assert {w.name for w in m.spec.decode_reads()} >= {t.gate_up.name, t.down.name}
    assert decode_traffic(m).weight_bytes > 0
    if target == "tensorrt":
        assert all(not v for v in check_folder(engine).values())
    dec = reference_decoder(src)
    prompt = prompt_ids(14, seed=3)
    ref_tokens, ref_logits = reference_greedy(dec, prompt, STEPS)
    tokens, logits = OrtLoop(engine, tensorrt=tensorrt).greedy(prompt.numpy(), STEPS)
    for step, (a, b) in enumerate(zip(logits, ref_logits)):
        err = np.abs(np.asarray(a) - b.numpy()).max()
        assert np.allclose(a, b.numpy(), atol=ATOL, rtol=RTOL), f"logits at step {step}: max |diff| {err:.3g}"
    assert tokens.tolist() == ref_tokens.tolist()
    _, plain_logits = reference_greedy(_without_bypass(dec), prompt, 2)
    assert np.abs(np.asarray(logits[1]) - plain_logits[1].numpy()).max() > 1e-3
    if target == "onnxruntime" and not needs_cc.args[0]:  # the native kernel: [W_g, W_1, L] / [W_2 ; R] as GRIFFIN's
        from caprese.runtime import Generator

        ids = prompt[0].tolist()
        ref, ref_logits = recorded(Generator.load(engine, backend="onnxruntime", threads=1), ids, 0)
        got, got_logits = recorded(Generator.load(engine, backend="native", threads=1), ids, 0)
        assert got.stats.backend == "native" and got.tokens == ref.tokens
        torch.testing.assert_close(got_logits, ref_logits, atol=NATIVE_ATOL, rtol=NATIVE_RTOL)


def test_bypass_recipe_and_tensorrt_binding_plan():
    """A BYPASS recipe needs its bypass (rank 0 is the dense model); the shared TensorRT engine binds decode_flag
    as a constant per role (False in prefill, True in decode) and no cats_tau_in."""
    from caprese.export.engine_spec import Recipe, method_kind
    from caprese.runtime.tensorrt_plan import binding_plan

    assert method_kind("none") == C.BYPASS and method_kind("cats") == C.CATS
    with pytest.raises(ValueError, match="rank 0"):
        Recipe(C.BYPASS, 1.0, (0, 1), rank=0)
    lay = C.GraphLayout(2, 64, 128, 2, 16, 300, "fp32", (C.BYPASS, C.BYPASS), rank=4)
    assert lay.shares_engine and lay.role_switched
    names = [t.name for t in lay.tensorrt_io(C.TRT_SHARED, 96)["inputs"]]
    assert C.DECODE_FLAG in names and not any(n.startswith("cats_tau") for n in names)
    assert [t.name for t in lay.inputs(C.DECODE)] == [t.name for t in lay.inputs(C.PREFILL)]
    buffers, roles = binding_plan(lay, 96, 32)
    flags = {r: buffers[b.tensors[C.DECODE_FLAG]].fill for r, b in roles.items()}
    assert flags == {C.PREFILL: False, C.DECODE: True}
