"""Attention written out in standard ONNX ops, for the graphs where the `Attention` op cannot serve TensorRT:
Gemma 2's soft-cap (TensorRT's Attention refuses `softcap`) and fp16/bf16 (it refuses `softmax_precision`, the
only way the op keeps its softmax in float32). Here the Softmax's input is cast to float32, which in a strongly
typed network is the softmax's precision (see the export README, "The fp32 softmax at fp16/bf16").
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto


def explicit_attention(g, layer: int, q: str, k: str, v: str, mask: str, spec, scale: float,
                       cap: float | None) -> str:
    """softmax(q·scale·kᵀ [soft-capped], masked) in float32, times v, through GraphBuilder g (scope attn).

    q [B, Hq, T, hd], k and v [B, Hkv, S, hd]; mask: bool [B, 1, g·T, S] (the [B, 1, T, S] mask tiled once per
    query head of a KV group). The g query heads of a group are folded into the query length ([B, Hq, T, hd] is
    [B, Hkv, g·T, hd], the same bytes), so every MatMul is 4-D and K/V are never repeated; q is scaled before the
    first MatMul, as TensorRT's fused-attention page asks. Returns [B, Hq, T, hd] in the graph's float type."""
    hkv, grp, hd = spec.num_kv_heads, spec.gqa_groups, spec.head_dim

    def op(op_type, inputs, name, **kw):
        return g.op(op_type, inputs, "attn", name, layer, **kw)

    q = op("Mul", [q, g.fconst(scale)], "Mul_scale")
    if grp > 1:
        q = op("Reshape", [q, g.const([0, hkv, -1, hd], "int64")], "Reshape_q_groups")
    # the K transpose feeds the MatMul directly: ONNX Runtime fuses the pair into one FusedMatMul reading K
    # transposed (no per-token copy of the cache), TensorRT folds it into the matrix multiply
    kt = op("Transpose", [k], "Transpose_kT", perm=[0, 1, 3, 2])  # [B, Hkv, hd, S]
    s = op("MatMul", [q, kt], "MatMul_qk")  # [B, Hkv, g·T, S]
    if cap is not None:
        s = op("Div", [s, g.fconst(float(cap))], "softcap_Div")
        s = op("Tanh", [s], "softcap_Tanh")
        s = op("Mul", [s, g.fconst(float(cap))], "softcap_Mul")
    if g.fdt != "float32":
        s = op("Cast", [s], "Cast_scores", to=TensorProto.FLOAT)
    s = op("Where", [mask, s, g.const(-np.inf, "float32")], "Where_mask")
    pr = op("Softmax", [s], "Softmax", axis=-1)
    if g.fdt != "float32":
        pr = op("Cast", [pr], "Cast_probs", to=g.ft)
    y = op("MatMul", [pr, v], "MatMul_pv")  # [B, Hkv, g·T, hd]
    if grp > 1:
        y = op("Reshape", [y, g.const([0, spec.num_heads, -1, hd], "int64")], "Reshape_heads")
    return y
