"""The static TensorRT check: every rule refuses a small graph that breaks it (naming the node) and accepts one that
satisfies it; the exported graphs TensorRT parses pass at fp32, fp16 and bf16."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from caprese.export import contract as C
from caprese.export.manifest import load_manifest
from caprese.export.tensorrt_ops import check_model, format_violations, load_table
from export_helpers import get_export

F, H, BF, I32, I64, B = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.INT32,
                         TensorProto.INT64, TensorProto.BOOL)
I8, U8, I4 = TensorProto.INT8, TensorProto.UINT8, TensorProto.INT4
NODE = "/model/layers.0/op"
SHARED = Path("/work/shared/reference/tensorrt-onnx-ops.tsv")  # absent on CI clones


def _model(nodes, inputs, outputs, inits=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 24), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=11)


def _vi(name, dtype, shape):
    return helper.make_tensor_value_info(name, dtype, shape)


def _init(name, dtype, shape, values=None):
    n = int(np.prod(shape)) if shape else 1
    return helper.make_tensor(name, dtype, shape, list(values) if values is not None else [1] * n)


def one(op, inputs, specs, outputs=(("y", F, None),), inits=(), **attrs):
    """A graph of one node named NODE: `specs` are graph inputs name -> (dtype, shape); outputs are graph outputs."""
    node = helper.make_node(op, list(inputs), [o[0] for o in outputs], name=NODE, **attrs)
    return _model([node], [_vi(k, *v) for k, v in specs.items()], [_vi(*o) for o in outputs], inits)


# ---- builders: the defaults satisfy every rule; each case overrides one thing to break one rule ----

def attention(q=(F, [1, 2, 4, 8]), k=(F, [1, 1, 16, 8]), v=(F, [1, 1, 16, 8]), mask=(B, [1, 1, 4, 16]), extra=(),
              outputs=(("y", F, None),), **attrs):
    specs = {"q": q, "k": k, "v": v, **({"mask": mask} if mask else {}), **{n: s for n, s in extra if n}}
    inputs = ["q", "k", "v", "mask" if mask else ""] + [n for n, _ in extra]
    return one("Attention", inputs, specs, outputs, **attrs)


def scatter(past=(F, [1, 2, 16, 8]), upd=(F, [1, 2, 1, 8]), cache_from_input=True, output_is_graph_output=True,
            **attrs):
    specs = {"past" if cache_from_input else "src": past, "upd": upd, "wi": (I64, [1])}
    nodes = [] if cache_from_input else [helper.make_node("Identity", ["src"], ["past"], name="copy")]
    nodes.append(helper.make_node("TensorScatter", ["past", "upd", "wi"], ["present"], name=NODE, **attrs))
    out = "present"
    if not output_is_graph_output:
        nodes.append(helper.make_node("Identity", ["present"], ["y"], name="after"))
        out = "y"
    return _model(nodes, [_vi(k, *v) for k, v in specs.items()], [_vi(out, past[0], past[1])])


def rotary(x=(F, [1, 2, 4, 8]), cos=(F, [16, 4]), pos=(I64, [1, 4]), **attrs):
    specs = {"x": x, "cos": cos, "sin": cos, **({"pos": pos} if pos else {})}
    return one("RotaryEmbedding", ["x", "cos", "sin"] + (["pos"] if pos else []), specs, (("y", x[0], None),),
               **attrs)


def dq(x=(I4, [128, 16]), scale=(H, [2, 16]), x_const=True, scale_const=True, scale_values=None, zp=None,
       zp_const=True, out=H, **attrs):
    """DequantizeLinear of a block-quantized weight (int4, fp16 scales, blocks of 64 along axis 0) by default."""
    specs, inits = {}, []
    parts = [("x", x, x_const, None), ("scale", scale, scale_const, scale_values)] + ([("zp", zp, zp_const, None)]
                                                                                    if zp else [])
    for name, (dtype, shape), const, values in parts:
        if const:
            vals = values if values is not None else ([0] if name == "zp" else [1]) * int(np.prod(shape or [1]))
            inits.append(_init(name, dtype, shape, vals))
        else:
            specs[name] = (dtype, shape)
    attrs = {"axis": 0, "block_size": 64, **attrs} if len(scale[1]) == len(x[1]) and np.prod(scale[1]) > 1 else attrs
    return one("DequantizeLinear", ["x", "scale"] + (["zp"] if zp else []), specs, (("y", out, x[1]),), inits,
               **attrs)


def gemm(a=(F, [2, 8]), dtype=F, **attrs):
    return one("Gemm", ["a", "b"], {"a": (dtype, a[1])}, (("y", dtype, None),), [_init("b", dtype, [8, 4])], **attrs)


def range_(dtype=I64, limit_dtype=None):
    return one("Range", ["s", "l", "d"], {"s": (dtype, []), "l": (limit_dtype or dtype, []), "d": (dtype, [])},
               (("y", dtype, None),))


def computed_axes(op, computed=True, data=(F, [2, 3]), out=F):
    """`op` whose second input is computed by a Shape node or, with computed=False, a constant."""
    if not computed:
        return one(op, ["x", "c"], {"x": data}, (("y", out, None),), [_init("c", I64, [1], [1])])
    shape = helper.make_node("Shape", ["x"], ["c"], name="shape", start=1)
    node = helper.make_node(op, ["x", "c"], ["y"], name=NODE)
    return _model([shape, node], [_vi("x", *data)], [_vi("y", out, None)])


def branches(else_outputs=1):
    def sub(n):
        outs = [f"o{j}" for j in range(n)]
        return helper.make_graph([helper.make_node("Constant", [], [o], value=_init(o, F, [1])) for o in outs], "b",
                                 [], [_vi(o, F, [1]) for o in outs])
    return one("If", ["c"], {"c": (B, [])}, (("y", F, None),), then_branch=sub(1), else_branch=sub(else_outputs))


def dq_with_zero_point(value):
    m = dq(zp=(I4, [2, 16]))
    zp = next(t for t in m.graph.initializer if t.name == "zp")
    zp.CopyFrom(_init("zp", I4, [2, 16], [value] * 32))
    return m


def onehot(const_depth):
    specs = {"i": (I64, [3]), "vals": (F, [2])} if const_depth else {"i": (I64, [3]), "d": (I64, []),
                                                                     "vals": (F, [2])}
    return one("OneHot", ["i", "d", "vals"], specs, inits=[_init("d", I64, [], [4])] if const_depth else [])


def topk(k, **attrs):
    return one("TopK", ["x", "k"], {"x": (F, [2, 6000])}, (("v", F, None), ("i", I64, None)),
               [_init("k", I64, [1], [k])], **attrs)


def scatter_nd(**attrs):
    return one("ScatterND", ["x", "i", "u"], {"x": (F, [4]), "i": (I64, [1, 1]), "u": (F, [1])}, **attrs)


def layer_norm(outs):
    return one("LayerNormalization", ["x", "s"], {"x": (F, [2, 4]), "s": (F, [4])},
               tuple((o, F, None) for o in outs))


def quantize(zero):
    return one("QuantizeLinear", ["x", "s", "z"], {"x": (F, [4])}, (("y", I8, None),),
               [_init("s", F, [], [0.5]), _init("z", I8, [], [zero])])


# (rule id, breaking graph, satisfying graph, text the violation message must contain)
CASES = [
    ("attention softmax_precision", lambda: attention(softmax_precision=TensorProto.FLOAT), attention,
     "softmax_precision is refused whatever its value"),
    ("attention softcap", lambda: attention(softcap=30.0), attention, "softcap must be 0"),
    ("attention qk_matmul_output_mode", lambda: attention(qk_matmul_output_mode=1), attention,
     "qk_matmul_output_mode"),
    ("attention one output", lambda: attention(outputs=(("y", F, None), ("", F, None))), attention,
     "takes exactly one"),
    ("attention past_key", lambda: attention(extra=(("pk", (F, [1, 1, 15, 8])),)), attention, "input past_key"),
    ("attention nonpad_kv_seqlen", lambda: attention(extra=(("", None), ("", None), ("nl", (I64, [1])))), attention,
     "input nonpad_kv_seqlen"),
    ("attention same rank", lambda: attention(k=(F, [1, 16, 8])), attention, "same rank"),
    ("attention 3-D needs heads", lambda: attention(q=(F, [1, 4, 16]), k=(F, [1, 16, 8]), v=(F, [1, 16, 8])),
     lambda: attention(q=(F, [1, 4, 16]), k=(F, [1, 16, 8]), v=(F, [1, 16, 8]), q_num_heads=2, kv_num_heads=1),
     "q_num_heads and kv_num_heads"),
    ("attention rank", lambda: attention(q=(F, [1, 1, 2, 4, 8]), k=(F, [1, 1, 1, 16, 8]), v=(F, [1, 1, 1, 16, 8])),
     attention, "Q must be 3-D or 4-D"),
    ("attention V dtype", lambda: attention(v=(H, [1, 1, 16, 8])), attention, "V has dtype FP16"),
    ("attention mask dtype", lambda: attention(mask=(H, [1, 1, 4, 16])),
     lambda: attention(mask=(F, [1, 1, 4, 16])), "attn_mask has dtype FP16"),
    ("attention mask rank", lambda: attention(mask=(B, [1, 1, 1, 4, 16])), lambda: attention(mask=(B, [4, 16])),
     "attn_mask must be"),
    ("attention causal with mask", lambda: attention(is_causal=1), lambda: attention(mask=None, is_causal=1),
     "is_causal=1 together with attn_mask"),
    ("attention TRT_normalization_op", lambda: attention(TRT_normalization_op="relu"),
     lambda: attention(TRT_normalization_op="softmax", TRT_decomposable=1), "TRT_normalization_op"),
    ("tensorscatter cache 4-D", lambda: scatter(past=(F, [1, 16, 8]), upd=(F, [1, 1, 8])), scatter,
     "past_cache must be 4-D"),
    ("tensorscatter update 4-D", lambda: scatter(upd=(F, [1, 1, 16])), scatter, "update must be 4-D"),
    ("tensorscatter axis", lambda: scatter(axis=1), lambda: scatter(axis=2), "axis must be -2"),
    ("tensorscatter mode", lambda: scatter(mode="circular"), lambda: scatter(mode="linear"), "mode must be 'linear'"),
    ("tensorscatter float cache", lambda: scatter(past=(I32, [1, 2, 16, 8]), upd=(I32, [1, 2, 1, 8])),
     lambda: scatter(past=(BF, [1, 2, 16, 8]), upd=(BF, [1, 2, 1, 8])), "IKVCacheUpdateLayer takes FP32"),
    ("tensorscatter cache is a graph input", lambda: scatter(cache_from_input=False), scatter,
     "must be a graph input"),
    ("tensorscatter static sequence length", lambda: scatter(past=(F, [1, 2, "cache_len", 8])),
     lambda: scatter(past=(F, ["batch", 2, 16, 8]), upd=(F, ["batch", 2, "seq", 8])), "symbolic sequence length"),
    ("tensorscatter output is a graph output", lambda: scatter(output_is_graph_output=False), scatter,
     "must be a graph output"),
    ("rotary position_ids int64", lambda: rotary(pos=(I32, [1, 4])), rotary, "position_ids must be INT64"),
    ("rotary 3-D needs num_heads", lambda: rotary(x=(F, [1, 4, 16])), lambda: rotary(x=(F, [1, 4, 16]), num_heads=2),
     "needs the num_heads attribute"),
    ("rotary input rank", lambda: rotary(x=(F, [1, 1, 2, 4, 8])), rotary, "input must be 3-D or 4-D"),
    ("rotary cache rank", lambda: rotary(cos=(F, [1, 4, 4])), lambda: rotary(cos=(F, [1, 4, 4]), pos=None),
     "cos_cache must be 2-D"),
    ("rotary position_ids rank", lambda: rotary(pos=(I64, [4])), rotary, "position_ids must be 2-D"),
    ("rotary embedding dim", lambda: rotary(rotary_embedding_dim=3), lambda: rotary(cos=(F, [16, 2]),
                                                                                   rotary_embedding_dim=4),
     "rotary_embedding_dim must be non-negative and even"),
    ("dq input dtype", lambda: dq(x=(U8, [64, 16]), scale=(F, []), out=F), lambda: dq(x=(I8, [64, 16]), scale=(F, []),
                                                                              out=F), "has dtype UINT8"),
    ("dq scale dtype", lambda: dq(scale=(TensorProto.DOUBLE, [2, 16])), dq, "x_scale has dtype DOUBLE"),
    ("dq scale constant", lambda: dq(scale_const=False), dq, "x_scale must be an initializer"),
    ("dq scale positive", lambda: dq(scale_values=[1.0] * 31 + [-1.0]), dq, "must all be positive"),
    ("dq zero point zero", lambda: dq_with_zero_point(1), lambda: dq_with_zero_point(0),
     "x_zero_point must be all zeros"),
    ("dq zero point constant", lambda: dq(zp=(I4, [2, 16]), zp_const=False), lambda: dq(zp=(I4, [2, 16])),
     "x_zero_point must be an initializer"),
    ("dq zero point size", lambda: dq(zp=(I4, [1, 16])), lambda: dq(zp=(I4, [2, 16])), "must have the same size"),
    ("dq zero point with output_dtype", lambda: dq(zp=(I4, [2, 16]), output_dtype=H),
     lambda: dq(output_dtype=H), "output_dtype together with x_zero_point"),
    ("dq output_dtype float", lambda: dq(output_dtype=I8, out=I8), dq, "output_dtype INT8 is refused"),
    ("dq output_dtype equals scale", lambda: dq(output_dtype=F, out=F),
     lambda: dq(scale=(F, [2, 16]), output_dtype=F, out=F), "differs from the FP16 scale"),
    ("dq int4 is weight-only", lambda: dq(x_const=False), dq, "an INT4 input must be an initializer"),
    ("dq 4-bit even size", lambda: dq(x=(I4, [3, 5]), scale=(H, [])), lambda: dq(x=(I4, [128, 2]), scale=(H, [2, 2])),
     "even number of elements"),
    ("dq int4 even last dimension", lambda: dq(x=(I4, [128, 3]), scale=(H, [2, 3])), dq, "odd last dimension"),
    ("dq int4 block sizes", lambda: dq(x=(I4, [64, 16]), block_size=32), dq, "blocks of 64 or 128"),
    ("dq int4 per-block scales", lambda: dq(scale=(H, [])), dq, "INT4 needs per-block scales"),
    ("dq per-channel of weights", lambda: dq(x=(I8, [4, 16]), scale=(F, [16]), x_const=False, axis=1, out=F),
     lambda: dq(x=(I8, [4, 16]), scale=(F, [16]), axis=1, out=F), "per-channel input must be an initializer"),
    ("dq per-channel count", lambda: dq(x=(I8, [4, 16]), scale=(F, [8]), axis=1, out=F),
     lambda: dq(x=(I8, [4, 16]), scale=(F, [16]), axis=1, out=F), "8 scales for axis 1"),
    ("dq scale rank", lambda: dq(x=(I4, [2, 64, 16]), scale=(H, [2, 16])), dq, "neither 0, 1 nor"),
    ("dq block 2-D", lambda: dq(x=(I4, [2, 64, 16]), scale=(H, [2, 2, 16]), axis=1), dq, "needs a 2-D input"),
    ("dq block types", lambda: dq(x=(I8, [64, 16])), dq, "block quantization of INT8"),
    ("dq one blocked dimension", lambda: dq(scale=(H, [2, 8])), dq, "exactly one blocked dimension"),
    ("dq blocked dimension position", lambda: dq(x=(I4, [64, 2, 16]), scale=(H, [2, 2, 16])),
     lambda: dq(x=(I4, [16, 128]), scale=(H, [16, 2]), axis=1),
     "must be the last or second-to-last"),
    ("dq whole blocks", lambda: dq(scale=(H, [3, 16]), block_size=22), dq, "not a whole number"),
    ("dq block_size agrees", lambda: dq(block_size=16), dq, "block_size 16 disagrees"),
    ("gemm 2-D", lambda: gemm(a=(F, [1, 2, 8])), gemm, "A must be 2-D"),
    ("gemm alpha", lambda: gemm(dtype=H, alpha=0.5), lambda: gemm(alpha=0.5), "alpha/beta other than 1"),
    ("cast target", lambda: one("Cast", ["x"], {"x": (F, [2])}, (("y", TensorProto.UINT16, None),),
                                to=TensorProto.UINT16), lambda: one("Cast", ["x"], {"x": (F, [2])}, (("y", BF, None),),
                                                                    to=BF), "is not a TensorRT type"),
    ("cast table", lambda: one("Cast", ["x"], {"x": (F, [2])}, (("y", I8, None),), to=I8),
     lambda: one("Cast", ["x"], {"x": (F, [2])}, (("y", B, None),), to=B), "TensorRT's Cast takes"),
    ("range dtype", lambda: range_(H), lambda: range_(F), "Range takes INT32, INT64 or FP32"),
    ("range one dtype", lambda: range_(I32, I64), lambda: range_(I32), "share one dtype"),
    ("mod fmod", lambda: one("Mod", ["a", "b"], {"a": (F, [2]), "b": (F, [2])}),
     lambda: one("Mod", ["a", "b"], {"a": (F, [2]), "b": (F, [2])}, fmod=1), "fmod=0 needs integer inputs"),
    ("gelu approximate", lambda: one("Gelu", ["x"], {"x": (F, [2])}, approximate="fast"),
     lambda: one("Gelu", ["x"], {"x": (F, [2])}, approximate="tanh"), "approximate must be"),
    ("gelu int32", lambda: one("Gelu", ["x"], {"x": (I32, [2])}, (("y", I32, None),)),
     lambda: one("Gelu", ["x"], {"x": (BF, [2])}, (("y", BF, None),)), "activationHelper"),
    ("split num_outputs and split", lambda: one("Split", ["x", "s"], {"x": (F, [4])}, (("a", F, None), ("b", F, None)),
                                                [_init("s", I64, [2], [2, 2])], num_outputs=2),
     lambda: one("Split", ["x"], {"x": (F, [4])}, (("a", F, None), ("b", F, None)), num_outputs=2), "not both"),
    ("split lengths", lambda: one("Split", ["x", "s"], {"x": (F, [4])}, (("a", F, None), ("b", F, None)),
                                  [_init("s", I64, [3], [1, 1, 2])]),
     lambda: one("Split", ["x", "s"], {"x": (F, [4])}, (("a", F, None), ("b", F, None)),
                 [_init("s", I64, [2], [1, 3])]), "3 split lengths for 2 outputs"),
    ("slice inputs", lambda: one("Slice", ["x", "s"], {"x": (F, [4]), "s": (I64, [1])}),
     lambda: one("Slice", ["x", "s", "e"], {"x": (F, [4]), "s": (I64, [1]), "e": (I64, [1])}), "3 to 5 inputs"),
    ("if branches", lambda: branches(2), branches, "same number"),
    ("constant sparse", lambda: one("Constant", [], {}, sparse_value=helper.make_sparse_tensor(
        _init("v", F, [1], [1.0]), _init("i", I64, [1], [0]), [4])),
     lambda: one("Constant", [], {}, value=_init("v", F, [4])), "sparse_value"),
    ("constantofshape uint8", lambda: one("ConstantOfShape", ["s"], {"s": (I64, [1])}, (("y", U8, None),),
                                          value=_init("v", U8, [1], [1])),
     lambda: one("ConstantOfShape", ["s"], {"s": (I64, [1])}, (("y", I32, None),), value=_init("v", I32, [1], [1])),
     "UINT8 value"),
    ("reduce axes constant", lambda: computed_axes("ReduceSum"), lambda: computed_axes("ReduceSum", computed=False),
     "axes must be an initializer"),
    ("unsqueeze axes constant", lambda: computed_axes("Unsqueeze"), lambda: computed_axes("Unsqueeze", computed=False),
     "axes must be an initializer"),
    ("cumsum axis constant", lambda: computed_axes("CumSum"), lambda: computed_axes("CumSum", computed=False),
     "axis must be an initializer"),
    ("onehot depth constant", lambda: onehot(False), lambda: onehot(True), "depth must be an initializer"),
    ("topk sorted", lambda: topk(5, sorted=0), lambda: topk(5), "sorted must be 1"),
    ("topk K limit", lambda: topk(5000), lambda: topk(3839), "must be less than 3840"),
    ("scatternd reduction", lambda: scatter_nd(reduction="add"), scatter_nd, "reduction other than none"),
    ("layernorm outputs", lambda: layer_norm(("y", "mean")), lambda: layer_norm(("y",)), "only the first output"),
    ("quantize zero point", lambda: quantize(1), lambda: quantize(0), "y_zero_point must be 0"),
    ("table dtype", lambda: one("MatMul", ["a", "b"], {"a": (I32, [2, 2]), "b": (I32, [2, 2])}, (("y", I32, None),)),
     lambda: one("MatMul", ["a", "b"], {"a": (BF, [2, 2]), "b": (BF, [2, 2])}, (("y", BF, None),)),
     "TensorRT's MatMul takes"),
    ("table op", lambda: one("Unique", ["x"], {"x": (F, [4])}), lambda: one("Abs", ["x"], {"x": (F, [4])}),
     "not in TensorRT's ONNX operator table"),
    ("standard domain", lambda: _model([helper.make_node("FastGelu", ["x"], ["y"], name=NODE,
                                                         domain="com.microsoft")], [_vi("x", F, [2])],
                                       [_vi("y", F, [2])]), lambda: one("Gelu", ["x"], {"x": (F, [2])}),
     "through a plugin"),
]


@pytest.mark.parametrize("rule,bad,good,needle", CASES, ids=[c[0] for c in CASES])
def test_rule_refuses_a_graph_that_breaks_it(rule, bad, good, needle):
    found = check_model(bad())
    hits = [v for v in found if needle in v.message]
    assert hits, f"{rule}: expected a violation containing {needle!r}, got: {format_violations(found)}"
    assert all(v.node == NODE for v in hits), f"{rule}: the violation must name the node: {hits}"
    refused = check_model(good())
    assert refused == [], f"{rule}: the satisfying graph was refused: {format_violations(refused)}"


def test_every_rule_function_has_a_case():
    from caprese.export.tensorrt_op_rules import RULES

    prefix = {"RotaryEmbedding": "rotary", "DequantizeLinear": "dq ", "QuantizeLinear": "quantize",
              "LayerNormalization": "layernorm", "Squeeze": "unsqueeze"}
    for op in RULES:
        p = "reduce" if op.startswith("Reduce") else prefix.get(op, op.lower() + " ")
        assert any(c[0].startswith(p) for c in CASES), f"no test case for the {op} rules"


def test_graph_io_dtype_is_checked():
    m = one("Cast", ["x"], {"x": (F, [2])}, (("y", TensorProto.DOUBLE, None),), to=TensorProto.DOUBLE)
    v = check_model(m)
    assert any(x.node == "" and "'y' has dtype DOUBLE" in x.message for x in v)


def test_table_is_the_project_copy_with_sources():
    table = load_table()
    shared = load_table(str(SHARED)) if SHARED.is_file() else {}
    for op, rule in shared.items():  # up to date with the shared reference: every op, its types, its restriction
        assert op in table and table[op].types == rule.types and rule.restriction in table[op].restriction, op
    assert "softmax_precision" in table["Attention"].restriction
    assert "onnxOpCheckers.cpp" in table["Attention"].source
    assert "static" in table["TensorScatter"].restriction.lower() and "KVCacheUpdate" in table["TensorScatter"].source
    assert "GroupQueryAttention" not in table and "FP32" in table["Attention"].types
    assert table["Abs"].source == "onnx-tensorrt docs/operators.md"  # the default for a row without its own source


def _tensorrt_graphs(engine):
    """The graph files TensorRT parses, as the manifest names them (its tensorrt_graphs record)."""
    paths = list(load_manifest(engine).tensorrt_graphs.values())
    assert paths, f"{engine} names no graph for TensorRT"
    return paths


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("method", ["dense", "griffin", "cats"])
def test_exported_graphs_pass(method, precision, tmp_path_factory, tiny_model_dir):
    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "llama", method, precision=precision)
    for path in _tensorrt_graphs(engine):
        assert check_model(path) == [], f"{path.name}: {format_violations(check_model(path), 10)}"


@pytest.mark.parametrize("kind,method", [("qwen2", "cats"), ("gemma2", "dense"), ("gemma2", "griffin"),
                                         ("gemma2", "cats"), ("mistral", "dense"), ("qwen3", "dense"),
                                         ("llama3", "dense")])
def test_exported_graphs_of_other_architectures_pass(kind, method, tmp_path_factory, tiny_model_dir):
    engine, _ = get_export(tmp_path_factory, tiny_model_dir, kind, method)
    for path in _tensorrt_graphs(engine):
        assert check_model(path) == [], f"{path.name}: {format_violations(check_model(path), 10)}"


def test_nodes_inside_if_branches_are_checked():
    """TensorRT imports If branches as subgraphs: a refused node inside one is a violation of the whole graph."""
    bad = helper.make_node("Attention", ["q", "k", "v"], ["y"], name="/inner/Attention", softmax_precision=1)
    then_g = helper.make_graph([bad], "then", [], [_vi("y", F, [1, 2, 1, 8])])
    else_g = helper.make_graph([helper.make_node("Identity", ["q"], ["z"], name="/inner/Identity")], "else", [],
                               [_vi("z", F, [1, 2, 1, 8])])
    node = helper.make_node("If", ["c"], ["out"], name="/outer/If", then_branch=then_g, else_branch=else_g)
    ins = [_vi("c", TensorProto.BOOL, []), _vi("q", F, [1, 2, 1, 8]), _vi("k", F, [1, 2, 4, 8]),
           _vi("v", F, [1, 2, 4, 8])]
    v = check_model(_model([node], ins, [_vi("out", F, [1, 2, 1, 8])]))
    assert [x.node for x in v] == ["/inner/Attention"] and "softmax_precision" in v[0].message
