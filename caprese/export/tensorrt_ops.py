"""Static TensorRT check: every node of an ONNX graph against the rules TensorRT's ONNX importer applies.

TensorRT cannot run here, so what it will refuse is read from its own sources (TensorRT 10.15 / 10.16):
- the operator table (tensorrt_facts.load_table: tensorrt_onnx_ops.tsv beside this module, onnx-tensorrt
  docs/operators.md extended with the per-op rules; its `source` column names where each rule comes from): op
  present, default domain, the dtypes of the op's data tensors, the graph's input/output dtypes;
- one small function per op (tensorrt_op_rules.py) for what a graph can break statically, each citing its source.
Not checked: what only a build shows (tactics, shapes known at run time, values of weights stored outside the .onnx).
Public API: check_model, format_violations, Violation, load_table, TENSORRT_TABLE_VERSION.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from caprese.export.tensorrt_facts import (GRAPH_IO_TYPES, TABLE_FILE, TENSORRT_TABLE_VERSION, GraphFacts,
                                           NodeCheck, OpRule, Violation, load_table, subgraphs, type_name)
from caprese.export.tensorrt_op_rules import RULES

__all__ = ["TABLE_FILE", "TENSORRT_TABLE_VERSION", "OpRule", "Violation", "check_model", "format_violations",
           "load_table"]


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
        return [name for j, name in enumerate(names)
                if name and formals and formals[min(j, len(formals) - 1)].type_str == primary]

    return pick(node.input, formal_in) + pick(node.output, formal_out)


def check_model(model: onnx.ModelProto | str | Path) -> list[Violation]:
    """All TensorRT violations of a graph (a ModelProto or a path; weights are never read)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    table, facts = load_table(), GraphFacts(model)
    out: list[Violation] = []
    for vi in list(model.graph.input) + list(model.graph.output):  # operators.md: the data types TensorRT takes
        name = type_name(vi.type.tensor_type.elem_type)
        if name not in GRAPH_IO_TYPES:
            out.append(Violation("", "graph", f"graph input/output {vi.name!r} has dtype {name}, which TensorRT "
                                              "does not accept"))
    for node in (n for sg in subgraphs(model.graph) for n in sg.node):
        n = NodeCheck(node, facts, out)
        if node.domain not in ("", "ai.onnx"):  # onnxOpCheckers.cpp FallbackPluginImporter: needs a plugin
            n.bad(f"domain {node.domain!r} is not the standard ONNX domain; TensorRT parses it only through a plugin")
            continue
        rule = table.get(node.op_type)
        if rule is None:
            n.bad("op is not in TensorRT's ONNX operator table (operators.md)")
            continue
        for t in _primary_tensors(node):
            tn = n.dtype(t)
            if tn and tn not in rule.types:
                n.bad(f"tensor {t!r} has dtype {tn}; TensorRT's {node.op_type} takes {', '.join(sorted(rule.types))}")
        if node.op_type in RULES:
            RULES[node.op_type](n)
    return out


def format_violations(violations: list[Violation], limit: int | None = None) -> str:
    shown = violations if limit is None else violations[:limit]
    text = "; ".join(str(x) for x in shown)
    if limit is not None and len(violations) > limit:
        text += f"; and {len(violations) - limit} more"
    return text
