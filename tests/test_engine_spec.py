"""The engine spec (caprese.export.engine_spec): every weight's role, name, shape, dtype and storage, decided from
the model spec + recipe + target + precision alone (plain code, no weights), recorded in manifest.json and checked
by load_manifest against the weights table."""

from __future__ import annotations

import json

import pytest
import torch

from caprese.errors import CapreseError
from caprese.export import contract as C
from caprese.export.engine_spec import (MATRIX, MATRIX_T, ROWS, VECTOR, EngineSpec, QuantFormat, Recipe,
                                        WeightRef)
from caprese.export.graph_builder import GraphBuilder
from caprese.export.manifest import MANIFEST, load_manifest
from caprese.model.spec import ModelSpec
from export_helpers import copy_engine, get_export

D, F, V, HQ, HKV, HD = 48, 80, 100, 4, 2, 16


def model(**kw) -> ModelSpec:
    base = dict(model_type="llama", vocab_size=V, hidden_size=D, intermediate_size=F, num_layers=3, num_heads=HQ,
                num_kv_heads=HKV, head_dim=HD, rms_norm_eps=1e-6, rope_theta=1e4, rope_scaling=None,
                max_position_embeddings=64, activation="silu", qkv_bias=False, o_bias=False, mlp_bias=False,
                tie_word_embeddings=False, sliding_windows=(None,) * 3)
    return ModelSpec(**{**base, **kw})


def build(m=None, recipe=Recipe(), target=C.TARGET_TENSORRT, precision="fp32", seq=32) -> EngineSpec:
    return EngineSpec.build(m or model(), recipe, target, precision, seq, seq - 1)


def test_dense_standard_roles_names_shapes():
    s = build(precision="fp16")
    t = s.layers[1]
    assert t.kind == C.DENSE and s.dtype == "float16"
    assert t.qkv == WeightRef("model.layers.1.self_attn.qkv_proj.weight.t", (D, (HQ + 2 * HKV) * HD), "float16",
                              MATRIX)
    assert t.o == WeightRef("model.layers.1.self_attn.o_proj.weight.t", (HQ * HD, D), "float16", MATRIX)
    assert t.gate_up.name == "model.layers.1.mlp.gate_up_proj.weight.t" and t.gate_up.shape == (D, 2 * F)
    assert t.down.name == "model.layers.1.mlp.down_proj.weight.t" and t.down.shape == (F, D)
    assert t.input_norm == WeightRef("model.layers.1.input_layernorm.weight", (D,), "float16", VECTOR)
    assert t.gate is t.up is t.fold is t.qkv_bias is t.pre_ffn_norm is t.q_norm is None
    assert list(t.roles()) == ["input_norm", "post_attn_norm", "qkv", "o", "gate_up", "down"]
    assert s.embed == WeightRef("model.embed_tokens.weight", (V, D), "float16", ROWS)
    assert s.head == WeightRef("lm_head.weight", (V, D), "float16", MATRIX_T) and not s.tied_head
    assert s.rope_cos == WeightRef("rope.cos", (32, HD // 2), "float16", ROWS)
    assert s.final_norm.name == "model.norm.weight"
    assert s.layout.layer_kinds == (C.DENSE,) * 3 and s.layout.precision == "fp16"


def test_model_variants_change_roles():
    gemma = build(model(model_type="gemma2", gemma_norms=True, tie_word_embeddings=True))
    t = gemma.layers[0]
    assert t.input_norm.name.endswith("input_layernorm.weight_plus_one")
    assert t.pre_ffn_norm.name == "model.layers.0.pre_feedforward_layernorm.weight_plus_one"
    assert t.post_ffn_norm.name == "model.layers.0.post_feedforward_layernorm.weight_plus_one"
    assert gemma.final_norm.name == "model.norm.weight_plus_one"
    assert gemma.tied_head and gemma.head.storage == MATRIX_T and gemma.embed.storage == ROWS
    qwen3 = build(model(model_type="qwen3", qk_norm=True)).layers[2]
    assert qwen3.q_norm == WeightRef("model.layers.2.self_attn.q_norm.weight", (HD,), "float32", VECTOR)
    assert qwen3.k_norm.shape == (HD,) and not qwen3.input_norm.name.endswith("_plus_one")
    biased = build(model(qkv_bias=True, o_bias=True, mlp_bias=True)).layers[0]
    assert biased.qkv_bias.shape == ((HQ + 2 * HKV) * HD,) and biased.o_bias.shape == (D,)
    assert biased.gate_up_bias.name == "model.layers.0.mlp.gate_up_proj.bias" and biased.gate_up_bias.shape == (2 * F,)
    assert biased.down_bias == WeightRef("model.layers.0.mlp.down_proj.bias", (D,), "float32", VECTOR)


def test_onnxruntime_target_splits_dense_gate_and_up_only():
    s = build(model(mlp_bias=True), Recipe(C.CATS, 0.5, (1,), rank=4), target=C.TARGET_ONNXRUNTIME)
    dense = s.layers[0]
    assert dense.gate_up is None and dense.gate.name == "model.layers.0.mlp.gate_proj.weight.t"
    assert dense.up.shape == (D, F) and dense.gate_bias.name == "model.layers.0.mlp.gate_proj.bias"
    assert dense.up_bias.shape == (F,) and dense.down.shape == (F, D)
    assert s.layers[1].gate_up is not None and s.layers[1].gate is None  # CATS layers stay fused


def test_cats_folds_the_bypass_into_the_constants():
    s = build(model(mlp_bias=True), Recipe(C.CATS, 0.25, (0, 2), rank=6))
    t = s.layers[2]
    assert t.kind == C.CATS and s.layout.rank == 6 and s.layout.k == 0
    assert t.gate_up == WeightRef("model.layers.2.mlp.gate_up_l_proj.weight.t", (D, 2 * F + 6), "float32", MATRIX)
    assert t.gate_up_bias.name == "model.layers.2.mlp.gate_up_l_proj.bias" and t.gate_up_bias.shape == (2 * F + 6,)
    assert t.down == WeightRef("model.layers.2.mlp.down_r_proj.weight.t", (F + 6, D), "float32", MATRIX)
    assert t.fold is None and s.layers[1].gate_up.shape == (D, 2 * F)  # the dense layer keeps the plain FFN
    assert s.recipe.cats_quantile == 0.75
    assert t.decode_reads() == list(t.roles().values())


def test_griffin_layers_name_their_fold_sources():
    s = build(model(mlp_bias=True), Recipe(C.GRIFFIN, 0.5, (0, 1), k=40, rank=8))
    t = s.layers[0]
    assert s.layout.k == 40 and s.layout.rank == 8 and s.layout.layer_kinds == (C.GRIFFIN, C.GRIFFIN, C.DENSE)
    assert t.gate_up.shape == (D, 2 * F) and t.down.shape == (F, D)  # the prefill graph's dense FFN
    f = t.fold
    assert f.gate_up == t.gate_up and f.down == t.down and f.gate_up_bias == t.gate_up_bias
    assert f.L == WeightRef("model.layers.0.mlp.bypass.L", (D, 8), "float32", MATRIX)
    assert f.R == WeightRef("model.layers.0.mlp.bypass.R", (8, D), "float32", MATRIX)
    assert list(f.roles()) == ["gate_up", "down", "gate_up_bias", "L", "R"]
    reads = {w.name for w in t.decode_reads()}  # decode reads the per-prompt w_gul / w_dr instead
    assert t.gate_up.name not in reads and t.down.name not in reads and t.down_bias.name in reads
    no_rank = build(recipe=Recipe(C.GRIFFIN, 0.5, (2,), k=40)).layers[2].fold
    assert no_rank.L is None and no_rank.R is None and no_rank.gate_up_bias is None


def test_refs_name_every_role_once_per_path():
    s = build(model(tie_word_embeddings=True), Recipe(C.GRIFFIN, 0.5, (1,), k=40, rank=8))
    paths = [p for p, _ in s.refs()]
    assert len(paths) == len(set(paths))
    assert "layers.1.fold.L" in paths and "head" in paths and "layers.0.fold.L" not in paths
    assert {w.name for _, w in s.refs() if _ == "head"} == {s.embed.name}


def test_round_trip_and_tampering():
    s = build(model(qkv_bias=True), Recipe(C.CATS, 0.5, (0, 1, 2), rank=4), target=C.TARGET_ONNXRUNTIME,
              precision="fp16")
    d = json.loads(json.dumps(s.to_dict()))
    assert EngineSpec.from_dict(d) == s
    d["tensors"]["layers"][1]["qkv"]["shape"][1] += 1
    with pytest.raises(ValueError, match=r"tensors\.layers\.1\.qkv\.shape"):
        EngineSpec.from_dict(d)
    d = json.loads(json.dumps(s.to_dict()))
    d["layout"]["rank"] = 5
    with pytest.raises(ValueError, match=r"layout\.rank: 5 != 4"):
        EngineSpec.from_dict(d)


@pytest.mark.parametrize("kw, needle", [
    (dict(method="magnitude", layers=(0,)), "no export"),
    (dict(method=C.GRIFFIN, layers=(0,)), "k = 0"),
    (dict(method=C.CATS, layers=()), "need some"),
    (dict(method=C.CATS, layers=(1, 0)), "ascending"),
    (dict(rank=2), "no bypass"),
])
def test_bad_recipes(kw, needle):
    with pytest.raises(ValueError, match=needle):
        Recipe(**kw)


def test_build_refusals():
    with pytest.raises(ValueError, match="not a layer"):
        build(recipe=Recipe(C.CATS, 0.5, (3,)))
    with pytest.raises(ValueError, match="unknown target"):
        build(target="openvino")
    with pytest.raises(ValueError, match="max_prompt_len"):
        EngineSpec.build(model(), Recipe(), C.TARGET_TENSORRT, "fp32", 8, 9)


def test_quantization_slot_round_trips():
    """Issue 15's slot: a quantized weight names its format and its scale tensor; int4 is packed two per byte."""
    scale = WeightRef("w.scale", (3, 64), "float16", MATRIX)
    w = WeightRef("w", (96, 64), "int4", MATRIX, QuantFormat(4, 32, 0, scale, "int4x2_low_first"))
    assert w.nbytes == 96 * 64 // 2 and scale.nbytes == 3 * 64 * 2
    assert WeightRef.from_dict(json.loads(json.dumps(w.to_dict()))) == w
    assert Recipe.from_dict(Recipe().to_dict()).weights is None
    from caprese.export.engine_spec import QuantRecipe  # the quantized roles: tests/test_export_quantized.py
    with pytest.raises(ValueError, match="48 input features .* not a multiple of the block size 32"):
        build(recipe=Recipe(weights=QuantRecipe(4)))


def test_graph_builder_checks_shapes_against_the_spec(tmp_path):
    from caprese.export.weights import WeightsWriter

    ref = build().layers[0].o
    with WeightsWriter(tmp_path) as w:
        g = GraphBuilder(w, "float32")
        with pytest.raises(ValueError, match=r"o_proj.weight.t: the model gives a tensor of shape \[48, 64\], "
                                             r"the engine spec \[64, 48\]"):
            g.weight(ref, torch.zeros(HQ * HD, D).t())
        assert g.weight(ref, torch.zeros(HQ * HD, D)) == ref.name
        assert w.table[ref.name]["shape"] == [HQ * HD, D] and w.table[ref.name]["dtype"] == "float32"


@pytest.mark.parametrize("case", [("llama", "griffin"), ("gemma2", "cats"), ("qwen2", "dense", 8, "all", "fp16",
                                                                               "onnxruntime")],
                         ids=lambda c: "-".join(map(str, c)))
def test_exported_manifest_holds_the_spec(tmp_path_factory, tiny_model_dir, case):
    """Every tensor of weights.bin is a role of the spec, with the spec's shape and dtype, and vice versa."""
    engine, _ = get_export(tmp_path_factory, tiny_model_dir, *case)
    m = load_manifest(engine)
    table = m.data["weights"]
    named = {w.name for _, w in m.spec.refs()}
    assert named == set(table)
    for _, w in m.spec.refs():
        assert m.entry(w)["shape"] == list(w.shape) and m.entry(w)["dtype"] == w.dtype
    assert m.spec.to_dict() == {k: m.data[k] for k in m.spec.to_dict()}


@pytest.fixture
def engine(tmp_path, tmp_path_factory, tiny_model_dir):
    src, _ = get_export(tmp_path_factory, tiny_model_dir, "llama", "griffin")
    return copy_engine(src, tmp_path / "engine")


def _edit(engine, fn):
    data = json.loads((engine / MANIFEST).read_text())
    fn(data)
    (engine / MANIFEST).write_text(json.dumps(data))


@pytest.mark.parametrize("edit, needles", [
    (lambda d: d["tensors"]["layers"][0]["fold"]["L"].update(name="elsewhere"),
     ["tensors.layers.0.fold.L.name", "export again"]),
    (lambda d: d["weights"].pop("model.layers.1.mlp.bypass.R"), ["has no model.layers.1.mlp.bypass.R",
                                                                 "layers.1.fold.R"]),
    (lambda d: d["weights"]["rope.cos"].update(shape=[1, 2]), ["weights entry rope.cos", "rope_cos"]),
    (lambda d: d["weights"].update(stray=dict(d["weights"]["rope.cos"])), ["holds stray"]),
    (lambda d: d["recipe"].update(rank=4), ["export again"]),
    (lambda d: d.pop("tensors"), ["lacks tensors"]),
])
def test_manifest_spec_errors_are_one_line(engine, edit, needles):
    _edit(engine, edit)
    with pytest.raises(CapreseError) as e:
        load_manifest(engine)
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg


def test_first_difference_names_the_place():
    from caprese.export.engine_spec import first_difference

    assert first_difference({"a": [1, {"b": 2}]}, {"a": [1, {"b": 2}]}) is None
    assert first_difference({"a": [1, {"b": 2}]}, {"a": [1, {"b": 3}]}, "x") == "x.a.1.b: 2 != 3"
    assert first_difference({"a": [1]}, {"a": [1, 2]}, "x") == "x.a: 1 entries != 2"
    assert first_difference({"a": 1}, {"a": 1, "c": 0}, "x") == "x.c: missing"
    assert first_difference({"a": {"big": list(range(99))}}, {"a": 5}, "x") == "x.a: a dict != a int"
