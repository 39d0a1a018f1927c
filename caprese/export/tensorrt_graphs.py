"""The graphs TensorRT parses: copies of the standard graphs with a STATIC KV-cache length, their manifest record
(key "tensorrt_graphs", read by the static check, the engine builder and the TensorRT runtime), and what they
cost in GPU memory.

Why copies: TensorScatter is imported as IKVCacheUpdateLayer, whose cache "must be a network input and have a
static sequence length dimension" (TensorRT operator docs, KVCacheUpdate), while ONNX Runtime's CPU Attention
costs time per allocated slot, so the ONNX Runtime graphs keep `cache_len` symbolic and their runtime sizes the
cache to the need. A copy differs from its standard graph ONLY in that dimension (inputs past_*, attention_mask,
outputs present_*), so the ONNX Runtime parity tests run on the very files TensorRT gets. Layouts without GRIFFIN
get ONE graph for one engine with two optimization profiles (the prefill graph; with CATS layers the shared graph
of onnx_graph.build_shared_graph), GRIFFIN layouts two (their decode graph takes per-prompt weights).
"""

from __future__ import annotations

import copy
import dataclasses

import onnx

from caprese.export import contract as C
from caprese.export.onnx_graph import ExportModel, build_shared_graph
from caprese.export.standard_graph import StandardGraph

MANIFEST_KEY = "tensorrt_graphs"
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "bool": 1}


def static_cache_copy(model: onnx.ModelProto, cache_len: int) -> onnx.ModelProto:
    """`model` with every graph input / output dimension named cache_len set to `cache_len`; nothing else."""
    out = copy.deepcopy(model)
    for vi in list(out.graph.input) + list(out.graph.output):
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param == C.CACHE_LEN:
                d.ClearField("dim_param")
                d.dim_value = int(cache_len)
    return out


def tensorrt_models(em: ExportModel, graphs: dict[str, onnx.ModelProto], weights) -> dict[str, onnx.ModelProto]:
    """{engine name: static-cache graph} for the layout's engines (contract.GraphLayout.tensorrt_engines)."""
    lay = em.layout
    if lay.shares_engine:
        shared = build_shared_graph(em, weights) if lay.role_switched else graphs[C.PREFILL]
        models = {C.TRT_SHARED: shared}
    elif lay.quantized:  # TensorRT dequantizes INT4 only from constants: per-prompt matrices in floats
        fem = dataclasses.replace(em, float_selection=True)
        models = {C.PREFILL: graphs[C.PREFILL], C.DECODE: StandardGraph(fem, C.DECODE, weights).build()}
    else:
        models = {C.PREFILL: graphs[C.PREFILL], C.DECODE: graphs[C.DECODE]}
    return {name: static_cache_copy(m, em.max_seq_len) for name, m in models.items()}


def external_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of the weights.bin tensors a graph reads (its external-data initializers)."""
    return {t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}


def _nbytes(spec: C.TensorSpec, batch: int) -> int:
    n = _ITEMSIZE[spec.dtype]
    for d in spec.shape:
        n *= batch if d == C.BATCH else int(d)
    return n


def memory_record(models: dict[str, onnx.ModelProto], weights_table: dict, layout: C.GraphLayout, max_batch: int,
                  cache_len: int) -> dict:
    """GPU memory the engines need besides activations, in bytes: the weights each engine holds, the bytes held
    by more than one engine (GRIFFIN's two engines both hold attention, embeddings, LM head and dense layers),
    the per-prompt decode inputs (GRIFFIN's folded matrices, CATS' τ) and the KV cache (one copy, bound to both
    roles) at max_batch and the static cache length."""
    held = {name: external_tensors(m) for name, m in models.items()}
    size = lambda names: sum(int(weights_table[n]["length"]) for n in names)  # noqa: E731
    counts: dict[str, int] = {}
    for names in held.values():
        for n in names:
            counts[n] = counts.get(n, 0) + 1
    per_prompt = [s for s in layout.inputs(C.DECODE, quantized_selection=False)
                  if C.layer_of(s.name, *C.SELECTION_INPUTS) is not None]
    kv = sum(_nbytes(s, max_batch) for s in C.static_cache(layout.inputs(C.DECODE), cache_len)
             if C.layer_of(s.name, C.past_key, C.past_value) is not None)
    return {"weights_bytes": {name: size(names) for name, names in held.items()},
            "duplicated_weights_bytes": sum(int(weights_table[n]["length"]) * (c - 1) for n, c in counts.items()),
            "per_prompt_bytes": sum(_nbytes(s, max_batch) for s in per_prompt),
            "kv_cache_bytes": kv, "max_batch": max_batch}


def manifest_record(models: dict[str, onnx.ModelProto], weights_table: dict, layout: C.GraphLayout,
                    max_batch: int, cache_len: int) -> dict:
    """The manifest's "tensorrt_graphs": {"cache_len", "engines": {name: {"onnx", "roles", "io"}}, "memory"}.
    "roles" lists the roles an engine serves in optimization-profile order."""
    engines = {}
    for name, roles in layout.tensorrt_engines().items():
        io = layout.tensorrt_io(name, cache_len)
        engines[name] = {"onnx": C.TENSORRT_GRAPH_FILES[name], "roles": list(roles),
                         "io": {k: [t.to_dict() for t in v] for k, v in io.items()}}
    return {"cache_len": int(cache_len), "engines": engines,
            "memory": memory_record(models, weights_table, layout, max_batch, cache_len)}
