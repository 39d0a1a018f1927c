"""Bytes one decode step reads, from an engine folder: the denominator of "achieved GB/s".

Weights: every weights.bin tensor the decode graph uses (sizes from the manifest's "weights" table), except
that a table only gathered from (the embedding for the input token, RoPE's cos/sin for one position) costs one
row; plus the decode graph's per-prompt inputs (GRIFFIN's folded w_gul / w_dr / b_gul, CATS's τ). The graph's
small inline constants are ignored. KV cache: K and V of every layer over the slots a step attends to.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from caprese.export import contract as C

# the decode graph's per-prompt inputs: name prefixes of contract.w_gul / w_dr / b_gul / cats_tau
SELECTION_INPUTS = tuple(f(0)[:-1] for f in (C.w_gul, C.w_dr, C.b_gul, C.cats_tau))

# (op type, input index) that read one row of a table per token, not the table
_ROW_READERS = {("Gather", 0), ("RotaryEmbedding", 1), ("RotaryEmbedding", 2), ("GroupQueryAttention", 7),
                ("GroupQueryAttention", 8)}
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "bool": 1}


@dataclasses.dataclass(frozen=True)
class DecodeTraffic:
    weight_bytes: int  # per decode step, batch 1
    kv_bytes_per_slot: int  # K + V of all layers for one cache slot

    def kv_bytes(self, slots: float) -> float:
        return self.kv_bytes_per_slot * slots


def decode_traffic(manifest) -> DecodeTraffic:
    import onnx

    layout: C.GraphLayout = manifest.layout
    table = manifest.data["weights"]
    model = onnx.load(str(manifest.file("decode")), load_external_data=False)
    readers: dict[str, set] = {}
    for node in model.graph.node:
        for j, name in enumerate(node.input):
            readers.setdefault(name, set()).add((node.op_type, j))
    total = 0
    for init in model.graph.initializer:
        entry = table.get(init.name)
        if entry is None:
            continue
        length = int(entry["length"])
        shape = entry["shape"]
        if shape and readers.get(init.name) and readers[init.name] <= _ROW_READERS:
            length //= max(1, int(shape[0]))
        total += length
    item = _ITEMSIZE[layout.dtype]
    for spec in layout.inputs(C.DECODE):  # the selection inputs (batch 1); the cache is counted per slot below
        if spec.name.startswith(SELECTION_INPUTS):
            dims = [1 if isinstance(d, str) else d for d in spec.shape]
            total += int(np.prod(dims)) * _ITEMSIZE[spec.dtype]
    per_slot = 2 * layout.num_layers * layout.num_kv_heads * layout.head_dim * item
    return DecodeTraffic(total, per_slot)
