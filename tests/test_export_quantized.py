"""Quantized exports (`caprese-export --weights int4|int8`) on ONNX Runtime against the PyTorch quantized reference.

The reference is the decoder whose quantized weights are replaced by dequantize(codes) (weight_quant's RTN, the
codes the export writes), with the same method applied. The graphs dequantize the same codes with the same
scales (DequantizeLinear or MatMulNBits), exactly: code x fp16 scale is exact in float32. What differs is only the
kernels' summation order, as for the float graphs, so the tolerance is theirs: fp32 logits within atol 1e-4 +
rtol 1e-4 (tiny models, logits O(1-10)), and greedy tokens identical for every one of 33 steps.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from caprese.errors import CapreseError
from caprese.export import contract as C
from export_helpers import MAX_SEQ, method_artifact, prompt_ids, reference_greedy
from quantized_export_helpers import QuantLoop, q_export, quantized_reference

ATOL = RTOL = 1e-4
STEPS = 33  # the prefill token + 32 decode steps


def assert_close(a, b, what):
    a, b = np.asarray(a), np.asarray(b)
    err = np.abs(a - b).max()
    assert np.allclose(a, b, atol=ATOL, rtol=RTOL), f"{what}: max |diff| {err:.3g}"


def run_parity(engine, dec, rho=0, tensorrt=False, steps=STEPS, what=""):
    prompt = prompt_ids(14, seed=3)
    ref_tokens, ref_logits = reference_greedy(dec, prompt, steps, rho)
    tokens, logits = QuantLoop(engine, tensorrt=tensorrt).greedy(prompt.numpy(), steps, reselect_every=rho)
    for step, (a, b) in enumerate(zip(logits, ref_logits)):
        assert_close(a, b.numpy(), f"{what} logits at step {step}")
    assert tokens.tolist() == ref_tokens.tolist()
    return tokens


# qwen2: hidden 64, heads x head_dim 64, intermediate 128: every block size TensorRT's int4 takes (64) divides them
@pytest.mark.parametrize("method,weights,rho", [
    ("dense", "int4", 0), ("dense", "int8", 0), ("griffin", "int4", 8), ("griffin", "int8", 8),
    ("cats", "int4", 0), ("cats", "int8", 0),
])
def test_standard_graphs_match_quantized_reference(method, weights, rho, tmp_path_factory, tiny_model_dir):
    """target tensorrt (DequantizeLinear -> MatMul / Gemm transB), int4 block 64 and int8 per row: prefill and
    decode logits and 33 greedy tokens (GRIFFIN re-selecting every 8 steps) against the quantized reference; the
    graphs TensorRT parses pass the static TensorRT check (the export runs it too)."""
    from caprese.export.exporter import check_folder

    engine, src = q_export(tmp_path_factory, tiny_model_dir, "qwen2", method, weights)
    assert all(not v for v in check_folder(engine).values())
    m = onnx.load(str(engine / "decode.onnx"), load_external_data=False)
    dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
    assert dq, "no DequantizeLinear in a quantized graph"
    want = onnx.TensorProto.INT4 if weights == "int4" else onnx.TensorProto.INT8
    assert {i.data_type for i in m.graph.initializer if i.name.endswith(f".{weights}")} == {want}
    run_parity(engine, quantized_reference(src, weights, None), rho, what=f"{method}/{weights}")


@pytest.mark.parametrize("method,weights", [("dense", "int4"), ("griffin", "int4"), ("cats", "int8")])
def test_tensorrt_graph_copies_match_quantized_reference(method, weights, tmp_path_factory, tiny_model_dir):
    """The files TensorRT parses (static cache; GRIFFIN's decode copy takes float w_gul / w_dr folded from the
    dequantized rows) give the same tokens and logits, and pass the static TensorRT check."""
    from caprese.export.exporter import check_folder

    engine, src = q_export(tmp_path_factory, tiny_model_dir, "qwen2", method, weights)
    assert all(not v for v in check_folder(engine).values())
    run_parity(engine, quantized_reference(src, weights, None), 8 if method == "griffin" else 0, tensorrt=True,
               what=f"tensorrt {method}/{weights}")


@pytest.mark.parametrize("method,weights,block,rho", [
    ("dense", "int4", 32, 0), ("dense", "int8", None, 0), ("dense", "int8", 32, 0), ("griffin", "int4", 32, 8),
    ("griffin", "int8", None, 8), ("cats", "int4", 32, 0), ("cats", "int8", None, 0),
])
def test_onnxruntime_target_matches_quantized_reference(method, weights, block, rho, tmp_path_factory,
                                                        tiny_model_dir):
    """--target onnxruntime: MatMulNBits for the [out, in] weights blocked along the inputs (int4 and int8 in
    blocks), DequantizeLinear + MatMul for down (blocked along its outputs) and per-row int8."""
    engine, src = q_export(tmp_path_factory, tiny_model_dir, "qwen2", method, weights, block, "onnxruntime")
    ops = [n.op_type for n in onnx.load(str(engine / "prefill.onnx"), load_external_data=False).graph.node]
    assert ("MatMulNBits" in ops) == (block is not None)
    if method == "dense" and block is not None:  # down blocked along its inputs: every weight is MatMulNBits
        assert "DequantizeLinear" not in ops
    run_parity(engine, quantized_reference(src, weights, block, "onnxruntime"), rho, what=f"ort {method}/{weights}")


def test_quantized_head(tmp_path_factory, tiny_model_dir):
    """--quantize-head: the LM head quantized (tied: its own int4 copy, the embedding stays a float table)."""
    engine, src = q_export(tmp_path_factory, tiny_model_dir, "qwen2", "dense", "int4", 32, "onnxruntime", head=True)
    from caprese.export.manifest import load_manifest

    spec = load_manifest(engine).spec
    assert spec.head.quant is not None and spec.embed.quant is None and spec.head.name != spec.embed.name
    run_parity(engine, quantized_reference(src, "int4", 32, "onnxruntime", head=True), what="quantized head")


# ---- one-line errors ----
def run_export_cli(args, monkeypatch, capsys):
    import cli_helpers
    from caprese.cli.export_command import main as export_main

    return cli_helpers.run_cli(export_main, args, monkeypatch, capsys, prog="caprese-export")


@pytest.mark.parametrize("extra,needles", [
    (["--weights", "int3"], ("int3", "int4 or int8")),
    (["--weights", "int4", "--block-size", "128", "--target", "onnxruntime"],
     ("input features = 64", "multiple of the block size 128", "block size 32 or 64")),
    (["--weights", "int4", "--block-size", "32"], ("TensorRT", "64 or 128", "--target onnxruntime")),
    (["--weights", "int8", "--block-size", "64"], ("TensorRT", "one scale per row", "--block-size row")),
    (["--weights", "int4", "--block-size", "48", "--target", "onnxruntime"], ("block size", "48")),
    (["--block-size", "64"], ("--weights",)),
    (["--weights", "int4", "--fp16-bypass"], ("--fp16-bypass", "no bypass")),
    (["--weights", "int4", "--fp16-bypass", "--precision", "fp16"], ("--fp16-bypass", "fp16 already")),
])
def test_bad_quantization_options_are_one_line_errors(extra, needles, tiny_model_dir, tmp_path, monkeypatch, capsys):
    import cli_helpers

    out = tmp_path / "engine"
    rc, _, err = run_export_cli([str(tiny_model_dir("qwen2")), "-o", str(out), "--max-seq-len", "32"] + extra,
                                monkeypatch, capsys)
    cli_helpers.assert_one_line_error(rc, err, *needles, code=2, log_prefix="[caprese-export]")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".engine-")]


def load_decoder_weight(src, name):
    """A weight of an artifact's base model as its checkpoint stores it."""
    from pathlib import Path

    from safetensors.torch import load_file

    from caprese.calibration.artifact import load_artifact

    return load_file(str(next(Path(load_artifact(src).base_model).glob("*.safetensors"))))[name]


class _QuantizedArtifact:
    """What a calibration artifact with quantized weights offers export (export_quantization.artifact_quantization):
    the recipe as `weights`, the codes from `quantized_weights()`."""

    def __init__(self, art, recipe, tensors):
        self._art, self.weights, self._tensors = art, recipe, tensors

    def quantized_weights(self) -> dict:
        return self._tensors

    def __getattr__(self, name):
        return getattr(self._art, name)


def _with_quantized_artifact(monkeypatch, src, fmt):
    """load_artifact returns `src` carrying GPTQ codes (other codes than export's RTN would choose)."""
    import caprese.calibration.artifact as artifact_mod
    from caprese.calibration.weight_quant import QuantRecipe, quantize_decoder
    from caprese.model import load_decoder

    art = artifact_mod.load_artifact(src)
    recipe = QuantRecipe(fmt, "gptq")
    samples = [prompt_ids(24, seed=s)[0].tolist() for s in range(4)]
    tensors = quantize_decoder(load_decoder(art.base_model, "fp32"), recipe, samples)
    real = artifact_mod.load_artifact
    monkeypatch.setattr(artifact_mod, "load_artifact", lambda *a, **k: _QuantizedArtifact(real(*a, **k), recipe,
                                                                                          tensors))
    return recipe, tensors


def test_artifact_codes_are_exported_and_bit_width_is_checked(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """An artifact carrying its quantization is exported with ITS codes and recipe (method recorded); --weights at
    another bit width, or another --block-size, is a one-line error."""
    import cli_helpers
    from caprese.export.exporter import export
    from caprese.export.manifest import load_manifest
    from caprese.export.weights import read_weight
    from caprese.model.quantization import WeightFormat

    src = method_artifact(tiny_model_dir("qwen2"), tmp_path / "artifact", "cats")
    recipe, tensors = _with_quantized_artifact(monkeypatch, src, WeightFormat(4, 32))
    engine = export(src, tmp_path / "engine", max_seq_len=32, target="onnxruntime").out
    m = load_manifest(engine)
    assert m.data["recipe"]["weights"]["method"] == "gptq" and m.data["recipe"]["weights"]["bits"] == 4
    ref = m.spec.layers[1].down  # [F, D] blocked along D: the artifact's bytes, as they are
    qt = tensors["model.layers.1.mlp.down_proj.weight"]
    assert torch.equal(read_weight(m.file("weights"), m.entry(ref)), qt.packed())
    from caprese.model.quantization import quantize_rtn  # GPTQ's codes, not what RTN at export would have written
    rtn = quantize_rtn(load_decoder_weight(src, "model.layers.1.mlp.down_proj.weight").t().contiguous(), qt.fmt)
    assert not torch.equal(rtn.codes, qt.codes)
    for extra, needles in ((["--weights", "int8"], ("calibrated with int4", "without --weights")),
                           (["--weights", "int4", "--block-size", "64"], ("blocks of 32", "--block-size")),
                           ([], ("TensorRT", "64 or 128"))):  # its own block 32 does not fit TensorRT
        args = [str(src), "-o", str(tmp_path / "e2"), "--max-seq-len", "32"] + extra
        rc, _, err = run_export_cli(args, monkeypatch, capsys)
        cli_helpers.assert_one_line_error(rc, err, *needles, code=2, log_prefix="[caprese-export]")
    with pytest.raises(CapreseError, match="LM head"):
        export(src, tmp_path / "e3", max_seq_len=32, target="onnxruntime", quantize_head=True)


# ---- runtime: the onnxruntime backend on quantized engines, bytes per step ----
@pytest.mark.parametrize("weights,block,target", [("int4", 32, "onnxruntime"), ("int8", None, "tensorrt")])
def test_onnxruntime_backend_runs_quantized_griffin(weights, block, target, tmp_path_factory, tiny_model_dir):
    """The runtime's onnxruntime backend (int4 / int8 per-prompt buffers filled by FoldInto.quantized_rows) gives
    the quantized reference's greedy tokens; its bytes per step count codes at 4 / 8 bits plus the scales."""
    from caprese.export.engine_spec import DTYPE_BITS
    from caprese.export.manifest import load_manifest
    from caprese.runtime.ort_backend import OrtBackend
    from caprese.runtime.traffic import decode_traffic

    engine, src = q_export(tmp_path_factory, tiny_model_dir, "qwen2", "griffin", weights, block, target)
    m = load_manifest(engine)
    be = OrtBackend(m, threads=1)
    prompt = prompt_ids(12, seed=4)
    ref_tokens, _ = reference_greedy(quantized_reference(src, weights, block, target), prompt, 16)
    be.reserve(MAX_SEQ)
    out = be.prefill(prompt[0].tolist(), 0)
    be.select(out.griffin, out.tau)
    token, tokens = int(out.logits[0].argmax()), []
    for step in range(16):
        tokens.append(token)
        token = int(be.decode(token, 12 + step)[0].argmax())
    assert tokens == ref_tokens[0].tolist()
    lay, spec = m.layout, m.spec
    rows = sum(int(np.prod(s.shape[1:])) * DTYPE_BITS[s.dtype] // 8 for s in lay.inputs(C.DECODE)
               if s.name.startswith(("w_gu_", "w_d_")))  # batch 1
    sel = be.buffers.selection
    assert rows == sum(sel[n].host.nbytes for n in sel if n.startswith(("w_gu_", "w_d_")))
    qkv = spec.layers[0].qkv
    assert qkv.nbytes == qkv.numel * int(weights[3:]) // 8 and qkv.quant.scale in spec.decode_reads()
    assert decode_traffic(m).weight_bytes > rows > 0


# ---- the engine spec's quantized roles ----
def test_engine_spec_quantized_roles():
    """Every decoder linear weight quantized, [out, in] blocked along the inputs (qkv, o, gate_up) and down [F, D]
    blocked along D; scales beside them; L / R of CATS apart in floats; GRIFFIN's decode inputs quantized rows in
    ONNX Runtime's graph and float w_gul / w_dr in TensorRT's; the manifest record round-trips; bytes per step count
    int4 codes at half a byte plus fp16 scales."""
    import json

    from caprese.export.engine_spec import MATRIX, MATRIX_T, VECTOR, EngineSpec, QuantRecipe, Recipe
    from caprese.model.spec import ModelSpec
    from caprese.runtime.traffic import spec_traffic

    m = ModelSpec(model_type="llama", vocab_size=100, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=1e4, rope_scaling=None,
                  max_position_embeddings=64, activation="silu", qkv_bias=False, o_bias=False, mlp_bias=False,
                  tie_word_embeddings=True, sliding_windows=(None, None))
    q4 = QuantRecipe(4, 64)
    float_spec = EngineSpec.build(m, Recipe(C.CATS, 0.5, (0, 1), rank=8), C.TARGET_TENSORRT, "fp32", 32, 31)
    spec = EngineSpec.build(m, Recipe(C.CATS, 0.5, (0, 1), rank=8, weights=q4), C.TARGET_TENSORRT, "fp32", 32, 31)
    t = spec.layers[0]
    assert (t.qkv.name, t.qkv.shape, t.qkv.dtype, t.qkv.storage) == (
        "model.layers.0.self_attn.qkv_proj.weight.int4", (128, 64), "int4", MATRIX_T)
    assert t.qkv.quant.scale.shape == (128, 1) and t.qkv.quant.scale.dtype == "float32"  # fp16 values, exact
    assert (t.gate_up.shape, t.down.shape, t.down.storage) == ((256, 64), (128, 64), MATRIX)
    assert t.L.shape == (64, 8) and t.L.quant is None and t.R.shape == (8, 64)
    assert spec.head.quant is None and spec.tied_head
    assert EngineSpec.from_dict(json.loads(json.dumps(spec.to_dict()))).to_dict() == spec.to_dict()
    assert "weight_bits" not in float_spec.layout.to_dict()  # float manifests record what they always did
    # int4 codes + one fp32 scale per 64: (4 + 32/64) bits per weight against 32
    lin = 128 * 64 + 64 * 64 + 256 * 64 + 128 * 64
    assert spec_traffic(float_spec).weight_bytes - spec_traffic(spec).weight_bytes == \
        2 * (lin * 4 - lin // 2 - lin // 64 * 4)
    row = EngineSpec.build(m, Recipe(weights=QuantRecipe(8, 0, head=True)), C.TARGET_ONNXRUNTIME, "fp16", 32, 31)
    assert row.layers[0].gate.quant.scale.storage == VECTOR and row.layers[0].gate.quant.scale.shape == (128,)
    assert row.head.name == "lm_head.weight.int8" and row.embed.quant is None
    g = EngineSpec.build(m, Recipe(C.GRIFFIN, 0.5, (1,), k=32, rank=8, weights=QuantRecipe(4, 32)),
                         C.TARGET_ONNXRUNTIME, "fp32", 32, 31)
    assert g.layers[0].gate.quant.packing == "matmulnbits" and g.layers[1].fold.gate_up.quant.packing == "matmulnbits"
    names = {s.name: (s.dtype, s.shape) for s in g.layout.inputs(C.DECODE)}
    assert names["w_gu_q.1"] == ("int4", (C.BATCH, 64, 64)) and names["w_d_s.1"] == ("float32", (C.BATCH, 32, 2))
    trt = {s.name for s in g.layout.tensorrt_io(C.DECODE, 32)["inputs"]}
    assert "w_gul.1" in trt and "w_gu_q.1" not in trt
    with pytest.raises(ValueError, match="GRIFFIN gathers whole rows"):
        EngineSpec.build(m, Recipe(C.GRIFFIN, 0.5, (1,), k=32, weights=QuantRecipe(4, 32, down_axis="in")),
                         C.TARGET_ONNXRUNTIME, "fp32", 32, 31)


# ---- fp16 / bf16 graphs ----
FP16_ATOL = 0.05  # tests/test_export_parity.py's fp16 tolerance: a few fp16 roundings of logits of magnitude ~4-6


@pytest.mark.parametrize("method,weights,target", [("dense", "int4", "tensorrt"), ("griffin", "int8", "tensorrt"),
                                                   ("dense", "int4", "onnxruntime")])
def test_fp16_quantized_graphs(method, weights, target, tmp_path_factory, tiny_model_dir):
    """fp16 graphs: the DequantizeLinear output is the fp16 scale's dtype (TensorRT's strongly typed rule), the
    graph computes in fp16; logits within the fp16 tolerance of the fp16 quantized reference, the same tokens."""
    from caprese.export.exporter import check_folder

    block = 32 if target == "onnxruntime" else None
    engine, src = q_export(tmp_path_factory, tiny_model_dir, "qwen2", method, weights, block, target,
                           precision="fp16")
    if target == "tensorrt":
        assert all(not v for v in check_folder(engine).values())
    dec = quantized_reference(src, weights, block, target).half()
    prompt = prompt_ids(14, seed=3)
    ref_tokens, ref_logits = reference_greedy(dec, prompt, 12, 0)
    tokens, logits = QuantLoop(engine).greedy(prompt.numpy(), 12)
    for step, (a, b) in enumerate(zip(logits, ref_logits)):
        err = np.abs(a - b.float().numpy()).max()
        assert err <= FP16_ATOL, f"fp16 {method}/{weights} logits at step {step}: max |diff| {err:.3g}"
    assert tokens.tolist() == ref_tokens.tolist()


def test_bf16_quantized_graph_is_typed_for_tensorrt(tmp_path_factory, tiny_model_dir):
    """bf16 (no ONNX Runtime CPU kernels): fp16 scales are not exact in bf16, so they stay fp16 and a Cast follows
    the DequantizeLinear; the static check passes."""
    from caprese.export.exporter import check_folder

    engine, _ = q_export(tmp_path_factory, tiny_model_dir, "qwen2", "cats", "int4", precision="bf16")
    assert all(not v for v in check_folder(engine).values())
    m = onnx.load(str(engine / "prefill.onnx"), load_external_data=False)
    dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
    casts = {n.input[0] for n in m.graph.node if n.op_type == "Cast"}
    assert dq and all(n.output[0] in casts for n in dq)


@pytest.mark.parametrize("weights,block,target", [("int4", None, "tensorrt"), ("int4", 32, "onnxruntime"),
                                                  ("int8", None, "tensorrt")])
def test_runtime_fold_matches_export_folding(weights, block, target, tmp_path_factory, tiny_model_dir):
    """The runtime's FoldInto (into bound buffers) and the export's Folder agree on a quantized GRIFFIN layer: the
    quantized rows (ONNX Runtime's decode graph) byte for byte, and the float w_gul / w_dr of the TensorRT decode
    copy (dequantized rows, [Ŵ_g, Ŵ_1, L] and [Ŵ_2 ; R]); MatMulNBits-packed sources are flipped back."""
    from caprese.export.folding import Folder
    from caprese.export.manifest import load_manifest
    from caprese.runtime.fold import FoldInto

    engine, _ = q_export(tmp_path_factory, tiny_model_dir, "qwen2", "griffin", weights, block, target)
    m = load_manifest(engine)
    lay = m.layout
    stat = torch.rand(1, lay.intermediate_size)
    fold, folder = FoldInto(m), Folder(m)
    for i in lay.layers_of(C.GRIFFIN):
        idx, want = folder.fold_quantized(i, stat)
        bufs = {s.name: torch.zeros([1] + [d for d in s.shape[1:-1]] + [s.shape[-1] // (2 if s.dtype == "int4" else 1)],
                                    dtype={"int4": torch.uint8, "int8": torch.int8, "float32": torch.float32}[s.dtype])
                for s in lay.inputs(C.DECODE) if s.name.endswith(f".{i}") and s.name.startswith(("w_gu_", "w_d_"))}
        got_idx = fold.quantized_rows(i, stat, bufs)
        assert torch.equal(got_idx, idx[0])
        for name, t in want.items():
            assert torch.equal(bufs[name], t.to(bufs[name].dtype)), name
        k, r, d = lay.k, lay.rank, lay.hidden_size
        w_gul, w_dr = torch.zeros(1, d, 2 * k + r), torch.zeros(1, k + r, d)
        fold(i, stat, w_gul, w_dr)
        _, ref_gul, ref_dr, _ = folder.fold(i, stat)
        assert torch.equal(w_gul, ref_gul) and torch.equal(w_dr, ref_dr)
        # the dequantized rows are the dequantized codes: gate row j of the fold = dequantize(codes)[idx[j]]
        gu = folder.float_tensors(i)["gate_up"]  # [D, 2F]
        assert torch.equal(w_gul[0, :, 0], gu[:, int(idx[0, 0])])


@pytest.mark.parametrize("method,weights,block,target,head,rho", [
    ("griffin", "int4", 32, "onnxruntime", False, 8), ("cats", "int8", None, "tensorrt", False, 0),
    ("dense", "int4", 32, "onnxruntime", True, 0),
])
def test_torch_and_onnxruntime_backends_agree_on_quantized_engines(method, weights, block, target, head, rho,
                                                                   tmp_path_factory, tiny_model_dir):
    """The torch backend of a quantized engine reads its weights.bin codes (quantized_weights.load_engine_weights)
    and gives the onnxruntime backend's greedy tokens, 40 of them (GRIFFIN re-selecting every 8)."""
    from caprese.runtime import Generator
    from export_helpers import one_torch_thread

    engine, _ = q_export(tmp_path_factory, tiny_model_dir, "qwen2", method, weights, block, target, head=head)
    prompt = prompt_ids(14, seed=3)[0].tolist()
    with one_torch_thread():
        ort_run = Generator.load(engine, "onnxruntime", threads=1).generate(prompt, 40, reselect_every=rho,
                                                                             ignore_eos=True)
        ref = Generator.load(engine, "torch", threads=1).generate(prompt, 40, reselect_every=rho, ignore_eos=True)
    assert len(ort_run.tokens) == 40 and ort_run.tokens == ref.tokens


def test_int8_activations_option(tmp_path_factory, tiny_model_dir, tmp_path):
    """--int8-activations: every MatMulNBits at accuracy_level 4 (ONNX Runtime GenAI's CPU default), recorded in
    the recipe; other numerics than the reference (int8-quantized activations), so only bounded: the first
    logits within 5% of the logits' range of the float-activation engine's. Refused off target onnxruntime."""
    from caprese.export.exporter import export
    from caprese.export.manifest import load_manifest

    engine, src = q_export(tmp_path_factory, tiny_model_dir, "qwen2", "dense", "int4", 32, "onnxruntime")
    fast = export(src, tmp_path / "fast", max_seq_len=MAX_SEQ, max_prompt_len=MAX_SEQ - 1, target="onnxruntime",
                  weights="int4", block_size=32, int8_activations=True).out
    assert load_manifest(fast).data["recipe"]["weights"]["accuracy_level"] == 4
    nodes = [n for n in onnx.load(str(fast / "decode.onnx"), load_external_data=False).graph.node
             if n.op_type == "MatMulNBits"]
    assert nodes and all(any(a.name == "accuracy_level" and a.i == 4 for a in n.attribute) for n in nodes)
    prompt = prompt_ids(14, seed=3).numpy()
    a = QuantLoop(engine).greedy(prompt, 2)[1][0]
    b = QuantLoop(fast).greedy(prompt, 2)[1][0]
    err = np.abs(a - b).max()
    assert 0 < err < 0.05 * (a.max() - a.min()), f"int8 activations moved the logits by {err:.3g}"
    with pytest.raises(CapreseError, match="--target onnxruntime"):
        export(src, tmp_path / "bad", max_seq_len=32, weights="int4", int8_activations=True)


@pytest.mark.parametrize("weights,block,target", [("int4", 32, "onnxruntime"), ("int8", None, "tensorrt")])
def test_float_selection_option(weights, block, target, tmp_path_factory, tiny_model_dir):
    """--float-selection: GRIFFIN's decode graph takes float w_gul / w_dr folded from the dequantized rows (faster
    on ONNX Runtime's CPU provider); same logits and tokens as the quantized reference, and the onnxruntime and
    torch backends agree."""
    from caprese.runtime import Generator
    from export_helpers import one_torch_thread

    engine, src = q_export(tmp_path_factory, tiny_model_dir, "qwen2", "griffin", weights, block, target,
                           float_selection=True)
    m = onnx.load(str(engine / "decode.onnx"), load_external_data=False)
    names = {i.name for i in m.graph.input}
    assert "w_gul.0" in names and "w_gu_q.0" not in names
    run_parity(engine, quantized_reference(src, weights, block, target), 8, what=f"float selection {weights}")
    prompt = prompt_ids(14, seed=3)[0].tolist()
    with one_torch_thread():
        a = Generator.load(engine, "onnxruntime", threads=1).generate(prompt, 24, reselect_every=8, ignore_eos=True)
        b = Generator.load(engine, "torch", threads=1).generate(prompt, 24, reselect_every=8, ignore_eos=True)
    assert a.tokens == b.tokens


@pytest.mark.parametrize("method,weights,block,target", [("griffin", "int4", 32, "onnxruntime"),
                                                        ("cats", "int8", None, "tensorrt"),
                                                        ("none", "int4", 32, "onnxruntime")])
def test_fp16_bypass_option(method, weights, block, target, tmp_path_factory, tiny_model_dir):
    """--fp16-bypass: L and R stored fp16 in the fp32 engine (half their bytes in weights.bin), cast to fp32 where
    read; logits and tokens of the quantized reference whose bypass is rounded to fp16 (the same values, so the
    float tolerance holds), the static TensorRT check passes, and the native, onnxruntime and torch backends give
    the same tokens."""
    from caprese.calibration.methods import efficient_layers
    from caprese.export.exporter import check_folder
    from caprese.export.manifest import load_manifest
    from caprese.runtime import Generator
    from export_helpers import one_torch_thread

    engine, src = q_export(tmp_path_factory, tiny_model_dir, "qwen2", method, weights, block, target,
                           fp16_bypass=True)
    spec = load_manifest(engine).spec
    refs = [w for t in spec.layers for w in t.bypass() if w is not None]
    assert refs and {w.dtype for w in refs} == {"float16"} and spec.recipe.weights.fp16_bypass
    m = onnx.load(str(engine / "decode.onnx"), load_external_data=False)
    assert any(n.op_type == "Cast" and "bypass_L" in n.name for n in m.graph.node)
    if target == "tensorrt":
        assert all(not v for v in check_folder(engine).values())
    dec = quantized_reference(src, weights, block, target)
    for f in efficient_layers(dec).values():
        f.bypass.L.data, f.bypass.R.data = f.bypass.L.data.half().float(), f.bypass.R.data.half().float()
    rho = 8 if method == "griffin" else 0
    run_parity(engine, dec, rho, what=f"fp16 bypass {method}/{weights}")
    prompt = prompt_ids(14, seed=3)[0].tolist()
    with one_torch_thread():
        runs = [Generator.load(engine, b, threads=1).generate(prompt, 24, reselect_every=rho, ignore_eos=True)
                for b in ("onnxruntime", "native", "torch")]
    assert runs[0].tokens == runs[1].tokens == runs[2].tokens


def test_help_lists_quantization_options(monkeypatch, capsys):
    rc, out, _ = run_export_cli(["--help"], monkeypatch, capsys)
    assert rc == 0
    for opt in ("--weights", "--block-size", "--quantize-head", "--int8-activations", "--float-selection",
                "--fp16-bypass"):
        assert opt in out, opt
