"""CATS' threshold τ computed inside a graph: the prompt's (1 - density) linear percentile of |act(x W_g)|.

numpy's linear percentile at q is x_lo + (x_hi - x_lo) · frac, with x_lo, x_hi the order statistics ⌊q (N - 1)⌋
and the next one. x_lo is found by bisection on the value (the smallest τ with #{|a| <= τ} > order), run until
the bracket is one float apart, then snapped to the largest value <= the bracket's top; x_hi is x_lo when it is
tied, else the smallest value above it. TopK cannot do this under TensorRT (K < 3840) and ONNX has no sort.
The bisection is ~8 small ops per step: the shared TensorRT graph runs it only in its prefill role (inside an If).
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
from onnx import TensorProto, helper

from caprese.export import contract as C

# The bracket [-1, max|a|] shrinks 2^-48 times, to one float32 ulp of any threshold above ~1e-6 · max|a|, so τ
# equals caprese's percentile_linear to float precision.
CATS_BISECTION_STEPS = 48


def percentile_threshold(g, layer: int, absa: str, valid: str, nvalid: str, features: int, density: float,
                         out: str | None = None) -> str:
    """Nodes (through GraphBuilder g, scope mlp of `layer`) computing τ [B] float32 from |a| [B, T, F] float32,
    the valid-token mask [B, T, 1] bool and the valid-token count [B] int64; the output is named `out` if given."""
    q = Fraction(1.0 - density).limit_denominator(1 << 20)
    i64 = lambda v: g.const(v, "int64")  # noqa: E731
    f32 = lambda v: g.const(v, "float32")  # noqa: E731
    axes_bt = i64([1, 2])

    def op(op_type, inputs, name, **kw):
        return g.op(op_type, inputs, "mlp", f"tau_{name}", layer, **kw)

    vals = op("Where", [valid, absa, f32(np.inf)], "Where_valid")  # padding tokens: +inf, never counted
    hi = op("ReduceMax", [op("Where", [valid, absa, f32(0.0)], "Where_max"), axes_bt], "ReduceMax", keepdims=0)
    n = op("Mul", [nvalid, i64(int(features))], "Mul_count")  # N per row [B]
    pos = op("Mul", [op("Sub", [n, i64(1)], "Sub_n"), i64(q.numerator)], "Mul_q")  # q (N - 1) · den
    order = op("Div", [pos, i64(q.denominator)], "Div_q")  # ⌊q (N - 1)⌋
    frac = op("Div", [op("Cast", [op("Mod", [pos, i64(q.denominator)], "Mod_q")], "Cast_frac", to=TensorProto.FLOAT),
                      f32(float(q.denominator))], "Div_frac")
    need = op("Add", [order, i64(1)], "Add_need")  # [B]

    def count_le(x, name):
        le = op("LessOrEqual", [vals, op("Unsqueeze", [x, axes_bt], f"{name}_Unsqueeze")], f"{name}_LessOrEqual")
        return op("ReduceSum", [op("Cast", [le], f"{name}_Cast", to=TensorProto.INT64), axes_bt],
                  f"{name}_ReduceSum", keepdims=0)

    lo, half = f32(-1.0), f32(0.5)
    for s in range(CATS_BISECTION_STEPS):
        mid = op("Mul", [op("Add", [lo, hi], f"{s}_Add"), half], f"{s}_Mul")
        ok = op("GreaterOrEqual", [count_le(mid, str(s)), need], f"{s}_GreaterOrEqual")
        hi = op("Where", [ok, mid, hi], f"{s}_Where_hi")
        lo = op("Where", [ok, lo, mid], f"{s}_Where_lo")
    hi3 = op("Unsqueeze", [hi, axes_bt], "Unsqueeze_hi")
    below = op("Where", [op("LessOrEqual", [vals, hi3], "LessOrEqual_hi"), vals, f32(-np.inf)], "Where_below")
    x_lo = op("ReduceMax", [below, axes_bt], "ReduceMax_lo", keepdims=0)
    x_lo3 = op("Unsqueeze", [x_lo, axes_bt], "Unsqueeze_lo")
    above = op("Where", [op("Greater", [vals, x_lo3], "Greater_lo"), vals, f32(np.inf)], "Where_above")
    nxt = op("ReduceMin", [above, axes_bt], "ReduceMin_next", keepdims=0)
    tied = op("Greater", [count_le(x_lo, "tie"), need], "Greater_tied")
    x_hi = op("Where", [tied, x_lo, nxt], "Where_next")
    step = op("Mul", [op("Sub", [x_hi, x_lo], "Sub_gap"), frac], "Mul_frac")
    return g.op("Add", [x_lo, step], "mlp", "tau_Add_out", layer, out=out)


def role_switched_tau(g, layer: int, absa: str, valid: str, nvalid: str, features: int, density: float) -> str:
    """The shared graph's cats_tau.{layer} = If(decode_flag, then: cats_tau_in.{layer}, else: the τ search over
    absa), so only the prefill role runs the search. Branch outputs have the same rank and different names
    (onnx-tensorrt's If rules); the branches read outer values (absa, the valid-token mask, constants) by name."""
    spec = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [C.BATCH])  # noqa: E731
    with g.subgraph() as then_nodes:
        t_out = g.op("Identity", [C.cats_tau_in(layer)], "mlp", "tau_then_Identity", layer)
    with g.subgraph() as else_nodes:
        e_out = percentile_threshold(g, layer, absa, valid, nvalid, features, density)
    then_g = helper.make_graph(then_nodes, f"layer{layer}_decode_tau", [], [spec(t_out)])
    else_g = helper.make_graph(else_nodes, f"layer{layer}_prefill_tau", [], [spec(e_out)])
    return g.op("If", [C.DECODE_FLAG], "mlp", "If_role_tau", layer, out=C.cats_tau(layer), then_branch=then_g,
                else_branch=else_g)
