"""Static TensorRT check: every node of an ONNX graph against TensorRT's ONNX operator table.

The facts live in the project's own copy of the table (tensorrt_onnx_ops.tsv beside this module, copied from
onnx-tensorrt's docs/operators.md for TensorRT 10.15). What is checked, per node:
- the op is in the table and in the default ONNX domain (other domains, e.g. com.microsoft, need plugins);
- the dtype of its primary tensors (those sharing the type constraint of the first input, e.g. T for most ops,
  T1 for Attention's Q/K/Y) is one the table lists for the op; Cast's target type too;
- the table's restrictions that a graph can show without running it: Attention (4-D Q/K/V/mask, no
  past/present/nonpad inputs or outputs, no softcap / qk_matmul_output_mode), TensorScatter (4-D cache and
  update, axis -2), Reduce*/Squeeze/Unsqueeze/CumSum/OneHot (axes/axis/depth constant), TopK (sorted = 1,
  constant K < 3840), RotaryEmbedding (int64 position_ids), ScatterND (no reduction), Constant (no sparse or
  string values), LayerNormalization (only Y), DequantizeLinear/QuantizeLinear zero points.
It cannot see what only a build shows (e.g. unsupported shape combinations, tactic availability).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

TABLE_FILE = Path(__file__).with_name("tensorrt_onnx_ops.tsv")
TENSORRT_TABLE_VERSION = "10.15"

TYPE_TOKENS = {TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.BFLOAT16: "BF16",
               TensorProto.INT32: "INT32", TensorProto.INT64: "INT64", TensorProto.INT8: "INT8",
               TensorProto.UINT8: "UINT8", TensorProto.BOOL: "BOOL", TensorProto.DOUBLE: "DOUBLE",
               TensorProto.FLOAT8E4M3FN: "FP8", TensorProto.INT4: "INT4"}
if hasattr(TensorProto, "FLOAT4E2M1"):
    TYPE_TOKENS[TensorProto.FLOAT4E2M1] = "FP4"
# what TensorRT accepts at all (DOUBLE only in limited places, UINT8 only as network I/O)
GRAPH_IO_TYPES = {"FP32", "FP16", "BF16", "INT32", "INT64", "INT8", "UINT8", "BOOL", "FP8", "FP4", "INT4"}
TOPK_MAX_K = 3840
_REDUCE_OPS = ("ReduceL2", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceSum", "ReduceSumSquare")


@dataclasses.dataclass(frozen=True)
class OpRule:
    op: str
    types: frozenset
    restriction: str


@dataclasses.dataclass(frozen=True)
class Violation:
    node: str  # node name ('' for graph-level findings)
    op: str
    message: str

    def __str__(self) -> str:
        return f"{self.node or '<graph>'} ({self.op}): {self.message}"


@functools.lru_cache(maxsize=None)
def load_table(path: str | None = None) -> dict[str, OpRule]:
    rules = {}
    for line in Path(path or TABLE_FILE).read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#") or line.startswith("op\t"):
            continue
        parts = line.split("\t")
        op, types = parts[0].strip(), parts[1].strip() if len(parts) > 1 else ""
        rules[op] = OpRule(op, frozenset(t for t in types.split(",") if t), parts[2].strip() if len(parts) > 2 else "")
    return rules


def _type_name(elem_type: int) -> str:
    return TYPE_TOKENS.get(elem_type, TensorProto.DataType.Name(elem_type) if elem_type else "UNKNOWN")


class _GraphFacts:
    """Dtypes, ranks and constant values of a graph's tensors (from shape inference, without weight bytes)."""

    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
            vis = list(inferred.graph.value_info)
        except Exception:  # a graph shape inference cannot read still gets the op/domain checks
            vis = []
        self.types: dict[str, int] = {}
        self.ranks: dict[str, int] = {}
        for vi in list(g.input) + list(g.output) + vis:
            tt = vi.type.tensor_type
            if tt.elem_type:
                self.types[vi.name] = tt.elem_type
            if tt.HasField("shape"):
                self.ranks[vi.name] = len(tt.shape.dim)
        self.constants: dict[str, onnx.TensorProto] = {}
        for init in g.initializer:
            self.types[init.name] = init.data_type
            self.ranks[init.name] = len(init.dims)
            self.constants[init.name] = init
        for node in g.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for a in node.attribute:
                    if a.name == "value" and a.t is not None:
                        self.constants[node.output[0]] = a.t
                        self.types[node.output[0]] = a.t.data_type
                        self.ranks[node.output[0]] = len(a.t.dims)

    def const_value(self, name: str):
        t = self.constants.get(name)
        if t is None or t.data_location == TensorProto.EXTERNAL:
            return None
        return numpy_helper.to_array(t)


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _primary_tensors(node: onnx.NodeProto) -> list[str]:
    """The node's tensors bound to the type constraint of its first input (what the table's types describe)."""
    try:
        schema = onnx.defs.get_schema(node.op_type, 10_000, node.domain or "")
    except Exception:
        return [t for t in node.input[:1] if t]
    formal_in, formal_out = list(schema.inputs), list(schema.outputs)
    if not formal_in:
        return [t for t in node.output if t]
    # the table's types describe the data tensors: Where's first input is its boolean condition
    primary = formal_in[1 if node.op_type == "Where" else 0].type_str

    def pick(names, formals):
        out = []
        for j, name in enumerate(names):
            if not name:
                continue
            f = formals[min(j, len(formals) - 1)] if formals else None
            if f is not None and f.type_str == primary:
                out.append(name)
        return out

    return pick(node.input, formal_in) + pick(node.output, formal_out)


def check_model(model: onnx.ModelProto | str | Path) -> list[Violation]:
    """All TensorRT violations of a graph (a ModelProto or a path; weights are never read)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    table = load_table()
    facts = _GraphFacts(model)
    out: list[Violation] = []
    g = model.graph
    for vi in list(g.input) + list(g.output):
        name = _type_name(vi.type.tensor_type.elem_type)
        if name not in GRAPH_IO_TYPES:
            out.append(Violation("", "graph", f"graph input/output {vi.name!r} has dtype {name}, which TensorRT "
                                              "does not accept"))
    for node in g.node:
        out += _check_node(node, table, facts)
    return out


def _check_node(node: onnx.NodeProto, table: dict[str, OpRule], facts: _GraphFacts) -> list[Violation]:
    name, op = node.name, node.op_type
    v = []

    def bad(msg: str) -> None:
        v.append(Violation(name, op if not node.domain else f"{node.domain}::{op}", msg))

    if node.domain not in ("", "ai.onnx"):
        bad(f"domain {node.domain!r} is not the standard ONNX domain; TensorRT parses it only through a plugin")
        return v
    rule = table.get(op)
    if rule is None:
        bad("op is not in TensorRT's ONNX operator table")
        return v
    checked = _primary_tensors(node) + (list(node.output[:1]) if op == "Cast" else [])
    for t in checked:
        if t in facts.types:
            tn = _type_name(facts.types[t])
            if tn not in rule.types:
                bad(f"tensor {t!r} has dtype {tn}; TensorRT's {op} takes {', '.join(sorted(rule.types))}")

    def rank(i: int, what: str, want: int) -> None:
        if len(node.input) > i and node.input[i] and facts.ranks.get(node.input[i], want) != want:
            bad(f"{what} must be {want}-D, got {facts.ranks[node.input[i]]}-D")

    def constant_input(i: int, what: str) -> None:
        if len(node.input) > i and node.input[i] and node.input[i] not in facts.constants:
            bad(f"{what} must be an initializer / constant (got the computed tensor {node.input[i]!r})")

    if op == "Attention":
        for i, what in ((0, "Q"), (1, "K"), (2, "V"), (3, "attn_mask")):
            rank(i, what, 4)
        for i, what in ((4, "past_key"), (5, "past_value"), (6, "nonpad_kv_seqlen")):
            if len(node.input) > i and node.input[i]:
                bad(f"input {what} is not supported: feed the updated cache and a mask instead")
        for j, what in ((1, "present_key"), (2, "present_value"), (3, "qk_matmul_output")):
            if len(node.output) > j and node.output[j]:
                bad(f"output {what} is not supported")
        if _attr(node, "softcap", 0.0):
            bad("softcap is not supported: write the soft-cap out (Div, Tanh, Mul) around an explicit QKᵀ")
        if _attr(node, "qk_matmul_output_mode", 0):
            bad("qk_matmul_output_mode is not supported")
        if _attr(node, "q_num_heads") is not None or _attr(node, "kv_num_heads") is not None:
            bad("q_num_heads/kv_num_heads are taken from dim 1 of 4-D Q and K/V; use 4-D inputs")
    elif op == "TensorScatter":
        rank(0, "past_cache", 4)
        rank(1, "update", 4)
        if _attr(node, "axis", -2) != -2:
            bad(f"axis must be -2, got {_attr(node, 'axis')}")
        if _attr(node, "mode", b"linear") not in ("linear", b"linear"):
            bad("only mode 'linear' is listed")
    elif op in _REDUCE_OPS:
        constant_input(1, "axes")
    elif op in ("Squeeze", "Unsqueeze"):
        constant_input(1, "axes")
    elif op == "CumSum":
        constant_input(1, "axis")
    elif op == "OneHot":
        constant_input(1, "depth")
    elif op == "TopK":
        if _attr(node, "sorted", 1) != 1:
            bad("sorted must be 1")
        k = facts.const_value(node.input[1]) if len(node.input) > 1 else None
        if k is None:
            bad(f"K must be a constant below {TOPK_MAX_K} (it is computed at run time)")
        elif int(np.asarray(k).reshape(-1)[0]) >= TOPK_MAX_K:
            bad(f"K = {int(np.asarray(k).reshape(-1)[0])} must be less than {TOPK_MAX_K}")
    elif op == "RotaryEmbedding":
        if len(node.input) > 3 and node.input[3] and facts.types.get(node.input[3], TensorProto.INT64) != \
                TensorProto.INT64:
            bad("position_ids must be INT64")
    elif op == "ScatterND":
        if _attr(node, "reduction", "none") not in ("none", b"none"):
            bad("reduction other than none is not supported")
    elif op == "Constant":
        for a in node.attribute:
            if a.name in ("sparse_value", "value_string", "value_strings"):
                bad(f"attribute {a.name} is not supported")
    elif op == "LayerNormalization":
        if any(node.output[1:]):
            bad("only the first output Y is supported")
    elif op in ("DequantizeLinear", "QuantizeLinear"):
        zp = facts.const_value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if zp is not None and np.any(np.asarray(zp) != 0):
            bad("zero point must be 0")
    return v


def format_violations(violations: list[Violation], limit: int | None = None) -> str:
    shown = violations if limit is None else violations[:limit]
    text = "; ".join(str(x) for x in shown)
    if limit is not None and len(violations) > limit:
        text += f"; and {len(violations) - limit} more"
    return text
