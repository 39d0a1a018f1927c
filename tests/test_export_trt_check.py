"""The static TensorRT check: passes on every exported standard graph, names the node of every violation."""

from __future__ import annotations

import pytest
from onnx import TensorProto, helper

from caprese.export import contract as C
from caprese.export.tensorrt_ops import check_model, load_table
from test_export_support import get_export


def _model(nodes, inputs, outputs, inits=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 24), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=11)


def _vi(name, dtype, shape):
    return helper.make_tensor_value_info(name, dtype, shape)


F = TensorProto.FLOAT


@pytest.mark.parametrize("kind,method", [("llama", "dense"), ("llama", "griffin"), ("llama", "cats"),
                                         ("qwen2", "cats"), ("gemma2", "dense"), ("gemma2", "griffin"),
                                         ("gemma2", "cats"), ("mistral", "dense"), ("qwen3", "dense"),
                                         ("llama3", "dense")])
def test_exported_graphs_pass(kind, method, tmp_path_factory, tiny_model_dir):
    engine, _ = get_export(tmp_path_factory, tiny_model_dir, kind, method)
    for graph in C.GRAPHS:
        assert check_model(engine / C.GRAPH_FILES[graph]) == []


def test_microsoft_op_is_rejected_with_its_node_name():
    node = helper.make_node("GroupQueryAttention", ["q", "k", "v"], ["y"], name="/model/layers.0/attn/GQA",
                            domain="com.microsoft", num_heads=2, kv_num_heads=1)
    m = _model([node], [_vi(n, F, [1, 1, 8]) for n in "qkv"], [_vi("y", F, None)])
    v = check_model(m)
    assert len(v) == 1 and v[0].node == "/model/layers.0/attn/GQA" and "com.microsoft" in v[0].message


def test_tensorscatter_on_a_3d_cache_is_rejected():
    node = helper.make_node("TensorScatter", ["past", "upd", "wi"], ["present"], name="/model/layers.1/attn/TS", axis=-2)
    m = _model([node], [_vi("past", F, [1, 16, 8]), _vi("upd", F, [1, 1, 8]), _vi("wi", TensorProto.INT64, [1])],
               [_vi("present", F, [1, 16, 8])])
    v = check_model(m)
    assert {x.node for x in v} == {"/model/layers.1/attn/TS"}
    assert any("past_cache must be 4-D" in x.message for x in v) and any("update must be 4-D" in x.message for x in v)
    node4 = helper.make_node("TensorScatter", ["past", "upd"], ["present"], name="ts", axis=2)
    m4 = _model([node4], [_vi("past", F, [1, 2, 16, 8]), _vi("upd", F, [1, 2, 1, 8])], [_vi("present", F, None)])
    assert [x.message for x in check_model(m4)] == ["axis must be -2, got 2"]


def test_attention_restrictions():
    ins = [_vi("q", F, [1, 2, 1, 8]), _vi("k", F, [1, 1, 16, 8]), _vi("v", F, [1, 1, 16, 8]),
           _vi("pk", F, [1, 1, 15, 8]), _vi("pv", F, [1, 1, 15, 8])]
    node = helper.make_node("Attention", ["q", "k", "v", "", "pk", "pv"], ["y", "prk", "prv"], name="att", softcap=5.0)
    msgs = " | ".join(x.message for x in check_model(_model([node], ins, [_vi("y", F, None)])))
    for needle in ("past_key", "past_value", "present_key", "present_value", "softcap"):
        assert needle in msgs
    ok = helper.make_node("Attention", ["q", "k", "v"], ["y"], name="att")
    assert check_model(_model([ok], ins[:3], [_vi("y", F, None)])) == []


def test_other_violations_are_listed_per_node():
    axes = helper.make_node("Shape", ["x"], ["axes_dyn"], name="shape", start=0, end=1)
    red = helper.make_node("ReduceSum", ["x", "axes_dyn"], ["r"], name="reduce_dynamic_axes")
    dbl = helper.make_node("Cast", ["x"], ["d"], name="cast_double", to=TensorProto.DOUBLE)
    uniq = helper.make_node("Unique", ["x"], ["u"], name="unique")
    k = helper.make_tensor("k", TensorProto.INT64, [1], [5000])
    topk = helper.make_node("TopK", ["x", "k"], ["tv", "ti"], name="topk_big", axis=-1)
    m = _model([axes, red, dbl, uniq, topk], [_vi("x", F, [2, 8000])],
               [_vi("r", F, None), _vi("d", TensorProto.DOUBLE, None), _vi("u", F, None), _vi("tv", F, None)], [k])
    by_node = {x.node: x.message for x in check_model(m)}
    assert "axes" in by_node["reduce_dynamic_axes"]
    assert "DOUBLE" in by_node["cast_double"]
    assert "not in TensorRT's ONNX operator table" in by_node["unique"]
    assert "3840" in by_node["topk_big"]
    assert "DOUBLE" in by_node[""]  # graph-level: the output 'd' itself has a dtype TensorRT does not take


def test_table_is_the_project_copy():
    table = load_table()
    assert "TensorScatter" in table and "axis must be -2" in table["TensorScatter"].restriction
    assert "GroupQueryAttention" not in table and "FP32" in table["Attention"].types
