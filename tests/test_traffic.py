"""Bytes per decode step from the engine spec (caprese.runtime.traffic) equal what the decode graph itself reads:
the independent reference below walks decode.onnx (every weights.bin initializer once; one row of a table read
only by Gather / RotaryEmbedding / GroupQueryAttention's cos-sin inputs) plus the per-prompt decode inputs; the KV
cache at the dtype of the graph's past_* inputs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from caprese.export import contract as C
from caprese.export.manifest import load_manifest
from caprese.runtime.traffic import DecodeTraffic, decode_traffic
from export_helpers import get_export

_ROW_READERS = {("Gather", 0), ("RotaryEmbedding", 1), ("RotaryEmbedding", 2), ("GroupQueryAttention", 7),
                ("GroupQueryAttention", 8)}
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "bool": 1}


def graph_traffic(m) -> DecodeTraffic:
    """The decode graph's own count (what caprese.runtime.traffic computed before the engine spec existed)."""
    table, lay = m.data["weights"], m.layout
    model = onnx.load(str(m.file("decode")), load_external_data=False)
    readers: dict[str, set] = {}
    for node in model.graph.node:
        for j, name in enumerate(node.input):
            readers.setdefault(name, set()).add((node.op_type, j))
    # an initializer's Cast (an fp16 cache's RoPE tables) is folded by ONNX Runtime at load: its readers read it
    casts = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Cast" and n.input[0] in table}
    for out, src in casts.items():
        readers[src] = (readers[src] - {("Cast", 0)}) | readers.get(out, set())
    total = 0
    for init in model.graph.initializer:
        entry = table.get(init.name)
        if entry is None:
            continue
        length = int(entry["length"])
        if entry["shape"] and readers.get(init.name) and readers[init.name] <= _ROW_READERS:
            length //= max(1, int(entry["shape"][0]))
        total += length
    for spec in lay.inputs(C.DECODE):
        if spec.name.startswith(("w_gul.", "w_dr.", "b_gul.", "cats_tau.")):
            total += int(np.prod([1 if isinstance(d, str) else d for d in spec.shape])) * _ITEMSIZE[spec.dtype]
    past = next(i for i in model.graph.input if i.name in dict(lay.in_place_pairs()))  # the cache's own dtype
    kv_item = onnx.helper.tensor_dtype_to_np_dtype(past.type.tensor_type.elem_type).itemsize
    return DecodeTraffic(total, 2 * lay.num_layers * lay.num_kv_heads * lay.head_dim * kv_item)


CASES = [(kind, method, precision, target)
         for kind in ("llama", "qwen2", "gemma2")  # untied + every bias; tied + qkv bias; four norms, tied
         for method in ("dense", "griffin", "cats")
         for precision, target in (("fp32", "tensorrt"), ("fp16", "tensorrt"), ("fp32", "onnxruntime"))]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(c))
def test_spec_traffic_equals_the_decode_graphs(tmp_path_factory, tiny_model_dir, case):
    kind, method, precision, target = case
    engine, _ = get_export(tmp_path_factory, tiny_model_dir, kind, method, 8, "all" if method != "griffin" else [0],
                           precision, target)
    m = load_manifest(engine)
    got, want = decode_traffic(m), graph_traffic(m)
    assert got == want
    if method == "griffin":  # layer 0 reads its folded matrices, layer 1 its dense FFN
        assert m.layout.layer_kinds[:2] == (C.GRIFFIN, C.DENSE)
