"""Bytes one decode step reads, from the engine spec: the denominator of "achieved GB/s".

Quantized engines count what is stored: int4 codes at half a byte, int8 at one, plus every scale (the codes'
WeightRef and their scales' are both in EngineSpec.decode_reads); GRIFFIN's per-prompt rows likewise.

Weights: every weights.bin tensor a decode step reads on the engine's target (EngineSpec.decode_reads: GRIFFIN
layers read their per-prompt matrices, not their dense FFN), each counted once, a table read only one row per
token (engine_spec.ROWS: the embedding, RoPE's cos/sin) costing one row, unless another role reads it whole (the
tied embedding is the LM head); plus the decode graph's per-prompt inputs (GRIFFIN's folded w_gul / w_dr /
b_gul, CATS's τ) at batch 1. The graphs' small inline constants are ignored. KV cache: K and V of every layer
per cache slot a step attends to.
"""

from __future__ import annotations

import dataclasses
import math

from caprese.export import contract as C
from caprese.export.engine_spec import DTYPE_BITS, ROWS, EngineSpec
from caprese.runtime.buffers import concrete, selection_name


@dataclasses.dataclass(frozen=True)
class DecodeTraffic:
    weight_bytes: int  # per decode step, batch 1
    kv_bytes_per_slot: int  # K + V of all layers for one cache slot

    def kv_bytes(self, slots: float) -> float:
        return self.kv_bytes_per_slot * slots


def spec_traffic(spec: EngineSpec) -> DecodeTraffic:
    """The bytes of one batch-1 decode step of an engine with this spec."""
    refs, whole = {}, set()  # name -> WeightRef; the names some role reads whole (not one row per token)
    for ref in spec.decode_reads():
        refs[ref.name] = ref
        if ref.storage != ROWS:
            whole.add(ref.name)
    total = sum(ref.nbytes if name in whole else ref.row_bytes for name, ref in refs.items())
    lay = spec.layout
    for t in lay.inputs(C.DECODE):  # the per-prompt inputs; the cache is counted per slot below
        if selection_name(t.name):
            total += math.prod(concrete(t.shape)) * DTYPE_BITS[t.dtype] // 8
    per_slot = 2 * lay.num_layers * lay.num_kv_heads * lay.head_dim * DTYPE_BITS[lay.cache_dtype] // 8
    return DecodeTraffic(total, per_slot)


def decode_traffic(manifest) -> DecodeTraffic:
    """spec_traffic of an engine folder's manifest (caprese.export.manifest.Manifest)."""
    return spec_traffic(manifest.spec)
