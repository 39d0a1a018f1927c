"""What the static TensorRT check knows before it looks at an op's rules: TensorRT's ONNX operator table
(tensorrt_onnx_ops.tsv beside this module: onnx-tensorrt docs/operators.md for TensorRT 10.15, extended with the
rules tensorrt_op_rules.py checks; its `source` column names each rule's origin), the dtype names TensorRT uses,
and the facts of one graph (dtypes, shapes, constants, producers; from shape inference, never reading weight
bytes) as one node under check sees them (NodeCheck).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import onnx
from onnx import TensorProto, numpy_helper

TABLE_FILE = Path(__file__).with_name("tensorrt_onnx_ops.tsv")
TENSORRT_TABLE_VERSION = "10.15"
DEFAULT_SOURCE = "onnx-tensorrt docs/operators.md"

TYPE_TOKENS = {TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.BFLOAT16: "BF16",
               TensorProto.INT32: "INT32", TensorProto.INT64: "INT64", TensorProto.INT8: "INT8",
               TensorProto.UINT8: "UINT8", TensorProto.BOOL: "BOOL", TensorProto.DOUBLE: "DOUBLE",
               TensorProto.FLOAT8E4M3FN: "FP8", TensorProto.INT4: "INT4"}
if hasattr(TensorProto, "FLOAT4E2M1"):
    TYPE_TOKENS[TensorProto.FLOAT4E2M1] = "FP4"
FLOATS = ("FP32", "FP16", "BF16")
# what TensorRT accepts at all (DOUBLE only in limited places, UINT8 only as network I/O)
GRAPH_IO_TYPES = {"FP32", "FP16", "BF16", "INT32", "INT64", "INT8", "UINT8", "BOOL", "FP8", "FP4", "INT4"}
# importerUtils.cpp convertDtype: the ONNX types the importer maps to a TensorRT type (Cast's `to`, output_dtype)
CONVERTIBLE = {"DOUBLE", "FP32", "INT8", "UINT8", "FP16", "BF16", "BOOL", "INT32", "INT64", "FP8", "INT4", "FP4"}
TOPK_MAX_K = 3840
# ops that only move data: a tensor they produce from a constant is still "rooted at a constant" for TensorRT
_DATA_MOVES = ("Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten")


@dataclasses.dataclass(frozen=True)
class OpRule:
    op: str
    types: frozenset
    restriction: str
    source: str = DEFAULT_SOURCE


@dataclasses.dataclass(frozen=True)
class Violation:
    node: str  # node name ('' for graph-level findings)
    op: str
    message: str

    def __str__(self) -> str:
        return f"{self.node or '<graph>'} ({self.op}): {self.message}"


@functools.lru_cache(maxsize=None)
def load_table(path: str | None = None) -> dict[str, OpRule]:
    """op -> OpRule from the TSV (columns: op, types, restriction[, source]; '#' lines are comments)."""
    rules = {}
    for line in Path(path or TABLE_FILE).read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#") or line.startswith("op\t"):
            continue
        parts = [p.strip() for p in line.split("\t")] + ["", "", ""]
        rules[parts[0]] = OpRule(parts[0], frozenset(t for t in parts[1].split(",") if t), parts[2],
                                 parts[3] or DEFAULT_SOURCE)
    return rules


def type_name(elem_type: int) -> str:
    return TYPE_TOKENS.get(elem_type, TensorProto.DataType.Name(elem_type) if elem_type else "UNKNOWN")


def dims(tensor_type) -> tuple | None:
    """Static dims as ints, symbolic ones as their name (or None when unnamed)."""
    if not tensor_type.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim)


def subgraphs(graph: onnx.GraphProto):
    """The graph, then every graph nested in its nodes' attributes (If branches, Loop bodies), depth first."""
    yield graph
    for node in graph.node:
        for a in node.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else
                        list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []):
                yield from subgraphs(sub)


class GraphFacts:
    """Dtypes, shapes and constants of a graph's tensors (from shape inference, without reading weight bytes)."""

    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph
            vis = [vi for sg in subgraphs(inferred) for vi in sg.value_info]
        except Exception:  # a graph shape inference cannot read still gets the op/domain/attribute checks
            vis = []
        self.inputs = {vi.name: dims(vi.type.tensor_type) for vi in g.input}
        self.outputs = {vi.name: dims(vi.type.tensor_type) for vi in g.output}
        self.types: dict[str, int] = {}
        self.shapes: dict[str, tuple | None] = {}
        for vi in vis + list(g.output) + list(g.input):  # declared graph I/O wins over inferred
            tt = vi.type.tensor_type
            if tt.elem_type:
                self.types[vi.name] = tt.elem_type
            if tt.HasField("shape"):
                self.shapes[vi.name] = dims(tt)
        self.constants: dict[str, onnx.TensorProto] = {}
        nodes = [n for sg in subgraphs(g) for n in sg.node]  # If branches included: TensorRT imports them too
        self.producer: dict[str, onnx.NodeProto] = {o: n for n in nodes for o in n.output if o}
        consts = [(t.name, t) for sg in subgraphs(g) for t in sg.initializer] + [
            (n.output[0], a.t) for n in nodes if n.op_type == "Constant" and n.domain in ("", "ai.onnx")
            for a in n.attribute if a.name == "value"]
        for name, t in consts:
            self.constants[name] = t
            self.types[name] = t.data_type
            self.shapes[name] = tuple(t.dims)

    def rank(self, name: str | None) -> int | None:
        s = self.shapes.get(name) if name else None
        return None if s is None else len(s)

    def const_value(self, name: str | None):
        t = self.constants.get(name) if name else None
        if t is None or t.data_location == TensorProto.EXTERNAL:
            return None
        return numpy_helper.to_array(t)

    def rooted_at_constant(self, name: str | None) -> bool:
        """An initializer, a Constant, or a data move of one (what TensorRT's importer sees as weights)."""
        while name and name not in self.constants:
            node = self.producer.get(name)
            if node is None or node.op_type not in _DATA_MOVES:
                return False
            name = node.input[0] if node.input else None
        return bool(name)


class NodeCheck:
    """One node under check: its attributes and tensors, and the violations found so far."""

    def __init__(self, node: onnx.NodeProto, facts: GraphFacts, out: list[Violation]):
        self.node, self.f, self._out = node, facts, out

    def bad(self, msg: str) -> None:
        n = self.node
        self._out.append(Violation(n.name, n.op_type if not n.domain else f"{n.domain}::{n.op_type}", msg))

    def inp(self, i: int) -> str | None:
        return self.node.input[i] if len(self.node.input) > i and self.node.input[i] else None

    def has(self, name: str) -> bool:
        return any(a.name == name for a in self.node.attribute)

    def attr(self, name: str, default=None):
        for a in self.node.attribute:
            if a.name == name:
                v = onnx.helper.get_attribute_value(a)
                return v.decode() if isinstance(v, bytes) else v
        return default

    def dtype(self, name: str | None) -> str | None:
        return type_name(self.f.types[name]) if name in self.f.types else None

    def rank(self, name: str | None) -> int | None:
        return self.f.rank(name)

    def shape(self, name: str | None) -> tuple | None:
        return self.f.shapes.get(name) if name else None

    def want_rank(self, i: int, what: str, *ranks: int) -> None:
        r = self.rank(self.inp(i))
        if r is not None and r not in ranks:
            self.bad(f"{what} must be {' or '.join(f'{k}-D' for k in ranks)}, got {r}-D")

    def want_constant(self, i: int, what: str, why: str) -> None:
        if self.inp(i) and not self.f.rooted_at_constant(self.inp(i)):
            self.bad(f"{what} must be an initializer / Constant, got the computed tensor {self.inp(i)!r} ({why})")
