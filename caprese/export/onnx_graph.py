"""The prefill and decode graphs of an ExportModel, built by its target's builder over shared pieces:

  engine_spec.py      every weight's name, shape, dtype and storage (decided before any graph)
  graph_builder.py    GraphBuilder: contract node names, inline constants, weights by WeightRef
  graph_masks.py      token count, slots, validity, the attention masks
  attention_graph.py  the written-out attention (fp16/bf16, soft-cap)
  ffn_graph.py        the gated FFN: dense, GRIFFIN (statistic, folded decode), CATS (τ, threshold)
  cats_threshold.py   CATS' τ search in graph ops
  standard_graph.py   StandardGraph: the standard-domain graphs (target tensorrt, the reference)
  ort_graph.py        OrtGraph(StandardGraph): target onnxruntime's com.microsoft contrib ops
"""

from __future__ import annotations

import onnx

from caprese.export import contract as C
from caprese.export.ort_graph import OrtGraph
from caprese.export.standard_graph import ExportModel, StandardGraph
from caprese.export.weights import WeightsWriter

__all__ = ["BUILDERS", "ExportModel", "build_graphs", "build_shared_graph"]
BUILDERS = {C.TARGET_TENSORRT: StandardGraph, C.TARGET_ONNXRUNTIME: OrtGraph}


def build_graphs(em: ExportModel, weights: WeightsWriter) -> dict[str, onnx.ModelProto]:
    """{"prefill": ModelProto, "decode": ModelProto}, both pointing at the tensors written to `weights`."""
    builder = BUILDERS[em.target]
    return {graph: builder(em, graph, weights).build() for graph in C.GRAPHS}


def build_shared_graph(em: ExportModel, weights: WeightsWriter) -> onnx.ModelProto:
    """The graph one TensorRT engine runs in both roles (layouts without GRIFFIN layers; symbolic cache length,
    see contract.GraphLayout.tensorrt_io). With no CATS / BYPASS layer it is the prefill graph itself."""
    if not em.layout.shares_engine:
        raise ValueError("GRIFFIN layouts have no shared graph (their decode graph takes per-prompt weights)")
    return StandardGraph(em, C.TRT_SHARED if em.layout.role_switched else C.PREFILL, weights).build()
