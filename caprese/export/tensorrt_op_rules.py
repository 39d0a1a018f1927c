"""The per-op rules of the static TensorRT check: one small function per op for what a graph can break
statically, each citing its source: onnx-tensorrt's static op checkers (onnxOpCheckers.cpp), its importers
(onnxOpImporters.cpp, AttentionHelpers.cpp, importerUtils.cpp) and TensorRT's layer contracts (NvInfer.h; the
operator pages under docs.nvidia.com/deeplearning/tensorrt/latest/_static/operators/). RULES maps an op type to
its function; tensorrt_ops.check_model runs them after the table's op / domain / dtype checks.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from caprese.export.tensorrt_facts import CONVERTIBLE, FLOATS, TOPK_MAX_K, NodeCheck, load_table, type_name

REDUCE_OPS = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
              "ReduceProd", "ReduceSum", "ReduceSumSquare")
RULES: dict[str, Callable[[NodeCheck], None]] = {}
INT4_BLOCKS = (64, 128)  # TensorRT's Quantization Schemes page: the INT4 block sizes it supports


def rule(*ops: str):
    def register(fn):
        for op in ops:
            RULES[op] = fn
        return fn
    return register


@rule("Attention")
def _attention(n: NodeCheck) -> None:
    # onnxOpCheckers.cpp checkAttention: softmax_precision is refused whatever its value; softcap must be 0
    if n.has("softmax_precision"):
        n.bad("attribute softmax_precision is refused whatever its value (onnx-tensorrt onnxOpCheckers.cpp "
              "checkAttention): drop it and keep the fp32 softmax another way")
    if n.attr("softcap", 0.0):
        n.bad("softcap must be 0 (onnxOpCheckers.cpp checkAttention): write the soft-cap out around an explicit QKᵀ")
    if n.attr("qk_matmul_output_mode", 0):  # operators.md
        n.bad("qk_matmul_output_mode is not supported (operators.md)")
    # onnxOpImporters.cpp importAttention: exactly one output (even an empty-named extra output is refused)
    if len(n.node.output) != 1:
        n.bad(f"has {len(n.node.output)} outputs; TensorRT's importer takes exactly one (Y): no present_key, "
              "present_value or qk_matmul_output, not even as empty names (onnxOpImporters.cpp importAttention)")
    for i, what in ((4, "past_key"), (5, "past_value"), (6, "nonpad_kv_seqlen")):  # importAttention; operators.md
        if n.inp(i):
            n.bad(f"input {what} is not supported (importAttention / operators.md): feed the updated cache and a mask")
    # importAttention: Q, K, V of one rank; AttentionHelpers.cpp reshapeQKVTensor: 3-D needs q_num_heads/kv_num_heads
    ranks = [n.rank(n.inp(i)) for i in range(3)]
    if None not in ranks and len(set(ranks)) > 1:
        n.bad(f"Q, K and V must have the same rank, got {ranks} (importAttention)")
    n.want_rank(0, "Q", 3, 4)
    if ranks[0] == 3 and not (n.attr("q_num_heads") and n.attr("kv_num_heads")):
        n.bad("3-D Q/K/V need the q_num_heads and kv_num_heads attributes (AttentionHelpers.cpp reshapeQKVTensor)")
    q, v, mask = n.dtype(n.inp(0)), n.dtype(n.inp(2)), n.inp(3)
    if q and v and q != v:  # TensorRT Attention operator page: query, key, value all of type T1
        n.bad(f"V has dtype {v} but Q has {q}; TensorRT's attention takes one dtype for Q, K and V (Attention op page)")
    if mask:
        n.want_rank(3, "attn_mask", 1, 2, 3, 4)  # AttentionHelpers.cpp convertToMaskTensor: rank <= 4
        m = n.dtype(mask)
        if m and q and m not in ("BOOL", q):  # Attention operator page: T2 is bool or the same type as T1
            n.bad(f"attn_mask has dtype {m}; TensorRT takes a BOOL mask or one of Q's dtype {q} (Attention op page)")
        if n.attr("is_causal", 0):  # NvInfer.h IAttention::setCausal: "Cannot be used together with setMask()"
            n.bad("is_causal=1 together with attn_mask is refused (IAttention::setCausal cannot be combined with a "
                  "mask): put the causal part into the mask")
    if n.attr("TRT_normalization_op", "softmax") not in ("softmax", "none"):  # AttentionHelpers parseNormalizationOp
        n.bad(f"TRT_normalization_op must be 'softmax' or 'none', got {n.attr('TRT_normalization_op')!r}")


@rule("TensorScatter")
def _tensor_scatter(n: NodeCheck) -> None:
    cache, out = n.inp(0), n.node.output[0] if n.node.output else None
    # onnxOpImporters.cpp importTensorScatter: 4-D past_cache and update, axis -2 (a positive axis minus the rank),
    # mode 'linear'; it becomes an IKVCacheUpdateLayer
    n.want_rank(0, "past_cache", 4)
    n.want_rank(1, "update", 4)
    axis, rank = n.attr("axis", -2), n.rank(cache) or 4
    if (axis - rank if axis >= 0 else axis) != -2:
        n.bad(f"axis must be -2 (the sequence axis of the 4-D cache), got {axis} (importTensorScatter)")
    if n.attr("mode", "linear") != "linear":
        n.bad(f"mode must be 'linear', got {n.attr('mode')!r} (importTensorScatter)")
    d = n.dtype(cache)
    if d and d not in FLOATS:  # NvInfer.h addKVCacheUpdate, KVCacheUpdate op page: T is float32/float16/bfloat16
        n.bad(f"past_cache has dtype {d}; IKVCacheUpdateLayer takes FP32, FP16 or BF16 (addKVCacheUpdate)")
    # KVCacheUpdate operator page: the cache "must be a network input and have a static sequence length dimension";
    # the output "must be a network output and shares the same device memory address with the cache input"
    if cache and cache not in n.f.inputs:
        n.bad(f"past_cache {cache!r} must be a graph input (KVCacheUpdate op page: the cache is a network input "
              "updated in place)")
    elif cache and n.f.inputs[cache] is not None and len(n.f.inputs[cache]) == 4:
        seq = n.f.inputs[cache][2]
        if not isinstance(seq, int) or seq <= 0:
            n.bad(f"past_cache {cache!r} has the {'symbolic' if seq else 'unknown'} sequence length "
                  f"{seq or '?'}; KVCacheUpdate needs a static one (KVCacheUpdate op page): export the graph "
                  "TensorRT parses with the cache length fixed at max_seq_len")
    if out and out not in n.f.outputs:
        n.bad(f"output {out!r} must be a graph output bound to the cache's memory (KVCacheUpdate op page)")


@rule("RotaryEmbedding")
def _rotary(n: NodeCheck) -> None:
    pos = n.inp(3)
    if pos and n.dtype(pos) not in (None, "INT64"):  # operators.md; RotaryEmbedding op page (M: int64)
        n.bad(f"position_ids must be INT64, got {n.dtype(pos)} (operators.md)")
    # onnxOpImporters.cpp importRotaryEmbedding: 3-D input needs num_heads; NvInfer.h addRotaryEmbedding: the layer
    # takes [batch, heads, seq, head_dim]
    n.want_rank(0, "input", 3, 4)
    if n.rank(n.inp(0)) == 3 and not n.has("num_heads"):
        n.bad("a 3-D input needs the num_heads attribute (importRotaryEmbedding)")
    # NvInfer.h addRotaryEmbedding: with position_ids, cos/sin are [max_position + 1, dim / 2] and position_ids
    # [batch, seq]; without them, cos/sin are [batch, seq, dim / 2]
    for i, what in ((1, "cos_cache"), (2, "sin_cache")):
        n.want_rank(i, what, 2 if pos else 3)
    if pos:
        n.want_rank(3, "position_ids", 2)
    dim = n.attr("rotary_embedding_dim", 0)
    if dim < 0 or dim % 2:  # NvInfer.h IRotaryEmbeddingLayer::setRotaryEmbeddingDim: non-negative and even
        n.bad(f"rotary_embedding_dim must be non-negative and even, got {dim} (IRotaryEmbeddingLayer)")


@rule("DequantizeLinear")
def _dequantize(n: NodeCheck) -> None:
    x, scale, zp = n.inp(0), n.inp(1), n.inp(2)
    xt, st = n.dtype(x), n.dtype(scale)
    if st and st not in FLOATS:  # NvInfer.h addDequantize: scale is FLOAT, HALF or BF16
        n.bad(f"x_scale has dtype {st}; TensorRT takes FP32, FP16 or BF16 scales (addDequantize)")
    n.want_constant(1, "x_scale", "Dequantize op page: the scale must be a build-time constant")
    sv = n.f.const_value(scale)
    if sv is not None and np.any(np.asarray(sv, dtype=np.float64) <= 0):  # QuantDequantLinearHelper
        n.bad("x_scale coefficients must all be positive (onnxOpImporters.cpp QuantDequantLinearHelper)")
    if zp:  # NvInfer.h IDequantizeLayer: zeroPt is a build-time constant containing only zeros, scale's size
        n.want_constant(2, "x_zero_point", "IDequantizeLayer: a build-time constant of zeros")
        zv = n.f.const_value(zp)
        if zv is not None and np.any(np.asarray(zv).astype(np.float64) != 0):
            n.bad("x_zero_point must be all zeros: TensorRT quantization is symmetric (operators.md, IDequantizeLayer)")
        zs, ss = n.shape(zp), n.shape(scale)
        if zs is not None and ss is not None and all(isinstance(k, int) for k in zs + ss) and \
                int(np.prod(zs)) != int(np.prod(ss)):
            n.bad(f"x_zero_point {list(zs)} and x_scale {list(ss)} must have the same size (QuantDequantLinearHelper)")
        if n.has("output_dtype"):  # QuantDequantLinearHelper compares output_dtype with the zero point's dtype
            n.bad("output_dtype together with x_zero_point is refused (QuantDequantLinearHelper compares output_dtype "
                  "with the zero point's dtype): drop the all-zero zero point or output_dtype")
    od = n.attr("output_dtype", 0)
    if od:
        o = type_name(od)
        if o not in FLOATS:  # QuantDequantLinearHelper: output_dtype of a DequantizeLinear is FLOAT, HALF or BF16
            n.bad(f"output_dtype {o} is refused; TensorRT dequantizes to FP32, FP16 or BF16")
        elif st in ("FP16", "BF16") and o != st:  # NvInfer.h addDequantize (strongly typed networks)
            n.bad(f"output_dtype {o} differs from the {st} scale; a strongly typed network needs them equal "
                  "(addDequantize)")
    if xt == "INT4":  # "Working with Quantized Types": INT4 is weight-only quantization
        n.want_constant(0, "an INT4 input", "TensorRT supports INT4 for weight-only quantization")
    xs, ss = n.shape(x), n.shape(scale)
    static = xs is not None and ss is not None and all(isinstance(k, int) for k in xs + ss)
    if xt in ("INT4", "FP4") and xs is not None and all(isinstance(k, int) for k in xs) and int(np.prod(xs)) % 2:
        n.bad(f"4-bit input {list(xs)} needs an even number of elements (QuantDequantLinearHelper)")
    if xt == "INT4" and xs and isinstance(xs[-1], int) and xs[-1] % 2:
        # onnxOpImporters.cpp QuantDequantLinearHelper: "Quantization to INT4 is not supported for tensors with an
        # odd last dimension" (two elements per byte along the last axis)
        n.bad(f"INT4 input {list(xs)} has an odd last dimension (QuantDequantLinearHelper: INT4 packing)")
    if xt == "INT4" and static and (len(ss) <= 1 or int(np.prod(ss)) == 1):
        # TensorRT, Quantization Schemes: "INT4 quantization requires per-block scales" (docs.nvidia.com/deeplearning/
        # tensorrt/latest/inference-library/quantized-types-schemes.html)
        n.bad(f"INT4 needs per-block scales (one per block of 64 or 128), got scale {list(ss)} for {list(xs)} "
              "(TensorRT Quantization Schemes)")
        return
    if ss is None or (static and int(np.prod(ss)) == 1):
        return  # per-tensor
    axis = n.attr("axis", 1)
    if len(ss) == 1:  # per-axis
        n.want_constant(0, "a per-channel input", "IDequantizeLayer: per-channel dequantization only of weights")
        if static and len(xs) > (axis % len(xs)) and xs[axis % len(xs)] != ss[0]:
            n.bad(f"{ss[0]} scales for axis {axis} of {list(xs)} (QuantDequantLinearHelper: one scale per channel)")
        return
    if xs is not None and len(ss) != len(xs):
        n.bad(f"x_scale rank {len(ss)} is neither 0, 1 nor the input's rank {len(xs)} (QuantDequantLinearHelper)")
        return
    # block quantization: IDequantizeLayer (NvInfer.h 10.16): scale rank <= 2, input types FP4, FP8 and INT4 only,
    # blocking on the last or second-to-last dimension; QuantDequantLinearHelper: exactly one blocked dimension, an
    # integer block (TensorRT infers the block from the shapes and never reads block_size)
    if len(ss) > 2:
        n.bad(f"block quantization needs a 2-D input and scale, got {len(ss)}-D (IDequantizeLayer: scale rank <= 2)")
    if xt and xt not in ("INT4", "FP8", "FP4"):
        n.bad(f"block quantization of {xt} is not supported; TensorRT blocks FP4, FP8 and INT4 only (IDequantizeLayer)")
    if not static:
        return
    blocked = [i for i, (a, b) in enumerate(zip(xs, ss)) if a != b]
    if len(blocked) != 1:
        n.bad(f"exactly one blocked dimension is allowed, got input {list(xs)} and scale {list(ss)} "
              "(QuantDequantLinearHelper)")
        return
    b = blocked[0]
    if b < len(xs) - 2:
        n.bad(f"the blocked dimension {b} must be the last or second-to-last one (IDequantizeLayer)")
    if ss[b] == 0 or xs[b] % ss[b]:
        n.bad(f"dimension {b} of {list(xs)} is not a whole number of {ss[b]} blocks (QuantDequantLinearHelper)")
    elif n.attr("block_size", 0) and n.attr("block_size") != xs[b] // ss[b]:
        n.bad(f"block_size {n.attr('block_size')} disagrees with the shapes ({xs[b]} / {ss[b]}): TensorRT infers the "
              "block from the shapes (QuantDequantLinearHelper)")
    elif xt == "INT4" and xs[b] // ss[b] not in INT4_BLOCKS:
        # TensorRT, Quantization Schemes: "The supported block sizes are {64, 128}" (INT4)
        n.bad(f"INT4 blocks of {xs[b] // ss[b]}: TensorRT takes INT4 in blocks of 64 or 128 only (Quantization "
              "Schemes)")


@rule("QuantizeLinear")
def _quantize(n: NodeCheck) -> None:
    zv = n.f.const_value(n.inp(2))  # operators.md: y_zero_point must be 0
    if zv is not None and np.any(np.asarray(zv).astype(np.float64) != 0):
        n.bad("y_zero_point must be 0 (operators.md)")


@rule("Gemm")
def _gemm(n: NodeCheck) -> None:
    n.want_rank(0, "A", 2)  # onnxOpImporters.cpp importGemm: "GEMM must have 2D inputs"
    n.want_rank(1, "B", 2)
    a = n.dtype(n.inp(0))
    # importGemm scales by alpha / beta with an FP32 constant; NvInfer.h addElementWise pairs only same types (or
    # FP32 with FP16 in weakly typed networks), so alpha / beta other than 1 only work on FP32 inputs
    if a and a != "FP32" and (n.attr("alpha", 1.0) != 1.0 or (n.inp(2) and n.attr("beta", 1.0) != 1.0)):
        n.bad(f"alpha/beta other than 1 with {a} inputs: importGemm multiplies by an FP32 constant, which a strongly "
              "typed network refuses; fold them into the weights")


@rule("Cast")
def _cast(n: NodeCheck) -> None:
    to, table = type_name(n.attr("to", 0)), load_table()["Cast"].types
    if to not in CONVERTIBLE:  # onnxOpCheckers.cpp checkCast -> importerUtils.cpp convertDtype
        n.bad(f"to={to} is not a TensorRT type (onnxOpCheckers.cpp checkCast)")
    elif to not in table:
        n.bad(f"to={to}: TensorRT's Cast takes {', '.join(sorted(table))} (operators.md)")


@rule("Range")
def _range(n: NodeCheck) -> None:
    ts = {n.dtype(n.inp(i)) for i in range(3)} - {None}
    if len(ts) > 1:  # onnxOpImporters.cpp importRange
        n.bad(f"start, limit and delta must share one dtype, got {sorted(ts)} (importRange)")
    if ts - {"INT32", "INT64", "FP32"}:  # importRange: "only supports int32, int64, and float input types"
        n.bad(f"dtype {sorted(ts)[0]}: TensorRT's Range takes INT32, INT64 or FP32 only (importRange)")


@rule("Mod")
def _mod(n: NodeCheck) -> None:
    d = n.dtype(n.inp(0))
    if not n.attr("fmod", 0) and d and d not in ("INT32", "INT64"):  # onnxOpImporters.cpp importMod
        n.bad(f"fmod=0 needs integer inputs, got {d} (importMod): set fmod=1 for floating point")


@rule("Gelu")
def _gelu(n: NodeCheck) -> None:
    if n.attr("approximate", "none") not in ("none", "tanh"):  # onnxOpImporters.cpp importGelu
        n.bad(f"approximate must be 'none' or 'tanh', got {n.attr('approximate')!r} (importGelu)")
    if n.dtype(n.inp(0)) == "INT32":  # importerUtils.cpp activationHelper refuses INT32, BOOL, UINT8
        n.bad("INT32 input is refused by the activation importer (importerUtils.cpp activationHelper)")


@rule("Split")
def _split(n: NodeCheck) -> None:
    if n.inp(1) and n.has("num_outputs"):  # onnxOpImporters.cpp importSplit (opset >= 18)
        n.bad("give either the split input or num_outputs, not both (importSplit)")
    sv = n.f.const_value(n.inp(1))
    if sv is not None and np.asarray(sv).size != len(n.node.output):  # importSplit
        n.bad(f"{np.asarray(sv).size} split lengths for {len(n.node.output)} outputs (importSplit)")


@rule("Slice")
def _slice(n: NodeCheck) -> None:
    if not 3 <= len(n.node.input) <= 5:  # onnxOpCheckers.cpp checkSlice
        n.bad(f"Slice needs 3 to 5 inputs, got {len(n.node.input)} (onnxOpCheckers.cpp checkSlice)")


@rule("If")
def _if(n: NodeCheck) -> None:
    then_g, else_g = n.attr("then_branch"), n.attr("else_branch")  # onnxOpCheckers.cpp checkIf
    if then_g is not None and else_g is not None and len(then_g.output) != len(else_g.output):
        n.bad(f"then/else branches have {len(then_g.output)} and {len(else_g.output)} outputs; they must have the same"
              " number (onnxOpCheckers.cpp checkIf)")


@rule("Constant")
def _constant(n: NodeCheck) -> None:
    for a in n.node.attribute:  # onnxOpCheckers.cpp checkConstant
        if a.name in ("sparse_value", "value_string", "value_strings"):
            n.bad(f"attribute {a.name} is not supported (onnxOpCheckers.cpp checkConstant)")


@rule("ConstantOfShape")
def _constant_of_shape(n: NodeCheck) -> None:
    v = n.attr("value")  # onnxOpCheckers.cpp checkConstantOfShape: no UINT8 value
    if v is not None and type_name(v.data_type) == "UINT8":
        n.bad("a UINT8 value is refused (onnxOpCheckers.cpp checkConstantOfShape)")


# inputs that must be build-time constants: op -> (input index, name, source)
_CONSTANT_INPUTS = {**{op: (1, "axes", "importerUtils.cpp reduceTensor: 'Axis input must be an initializer'")
                       for op in REDUCE_OPS},
                    **{op: (1, "axes", "operators.md: axes must be resolvable to a constant")
                       for op in ("Squeeze", "Unsqueeze")},
                    "CumSum": (1, "axis", "operators.md: a build-time constant"),
                    "OneHot": (1, "depth", "operators.md: a build-time constant")}


@rule(*_CONSTANT_INPUTS)
def _constant_input(n: NodeCheck) -> None:
    n.want_constant(*_CONSTANT_INPUTS[n.node.op_type])


@rule("TopK")
def _topk(n: NodeCheck) -> None:
    if n.attr("sorted", 1) != 1:  # operators.md
        n.bad("sorted must be 1 (operators.md)")
    k = n.f.const_value(n.inp(1))
    if k is None:
        n.bad(f"K must be a constant below {TOPK_MAX_K} (it is computed at run time) (operators.md)")
    elif int(np.asarray(k).reshape(-1)[0]) >= TOPK_MAX_K:
        n.bad(f"K = {int(np.asarray(k).reshape(-1)[0])} must be less than {TOPK_MAX_K} (operators.md)")


@rule("ScatterND")
def _scatter_nd(n: NodeCheck) -> None:
    if n.attr("reduction", "none") != "none":  # operators.md; onnxOpImporters.cpp importScatterND
        n.bad("reduction other than none is not supported (importScatterND)")


@rule("LayerNormalization")
def _layer_norm(n: NodeCheck) -> None:
    if any(n.node.output[1:]):  # onnxOpCheckers.cpp checkLayerNormalization
        n.bad("only the first output Y is supported (onnxOpCheckers.cpp checkLayerNormalization)")
