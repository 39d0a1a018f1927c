"""What a graph derives once from its position inputs and every layer reads: the new tokens' count, cache slots
and validity (not left padding), and the boolean [B, 1, T, S] attention masks, one per distinct sliding window
(causal from the slots, the window, left padding from attention_mask, every query sees itself), tiled per KV
group for the written-out attention. Slots and validity are built on first use, where first needed.
"""

from __future__ import annotations

from onnx import TensorProto

from caprese.export import contract as C
from caprese.export.graph_builder import GraphBuilder


class GraphMasks:
    def __init__(self, g: GraphBuilder, prefill: bool):
        self.g = g
        self.zero, self.one = g.const(0, "int64"), g.const(1, "int64")
        if prefill:
            shape_ids = g.op("Shape", [C.INPUT_IDS], "mask", "Shape_ids")
            self.t_len = g.op("Gather", [shape_ids, g.const(1, "int64")], "mask", "Gather_seq_len", axis=0)
        else:
            self.t_len = self.one  # the decode graph's input_ids are [B, 1] by contract
        self._slots: str | None = None
        self._valid: tuple[str, str, str] | None = None
        self.by_window: dict = {}  # sliding window (None: full attention) -> bool [B, 1, T, S]
        self._grouped: dict = {}

    def build_attention_masks(self, windows) -> None:
        """The [B, 1, T, S] mask of every distinct window in `windows` (S: the cache buffer's length)."""
        g, zero, one = self.g, self.zero, self.one
        shape_kv = g.op("Shape", [C.past_key(0)], "mask", "Shape_cache")
        s_len = g.op("Gather", [shape_kv, g.const(2, "int64")], "mask", "Gather_cache_len", axis=0)
        keys = g.op("Range", [zero, s_len, one], "mask", "Range_keys")  # [S]
        q3 = g.op("Unsqueeze", [self.slots(), g.const([2], "int64")], "mask", "Unsqueeze_slots")  # [B, T, 1]
        causal = g.op("LessOrEqual", [keys, q3], "mask", "LessOrEqual_causal")  # [B, T, S]
        am = g.op("Cast", [C.ATTENTION_MASK], "mask", "Cast_attention_mask", to=TensorProto.BOOL)
        am3 = g.op("Unsqueeze", [am, g.const([1], "int64")], "mask", "Unsqueeze_attention_mask")  # [B, 1, S]
        diag = g.op("Equal", [keys, q3], "mask", "Equal_self")  # a padding query still sees itself
        for w in sorted(set(windows), key=lambda v: -1 if v is None else v):
            tag = "full" if w is None else f"window{w}"
            m = causal
            if w is not None:
                lo = g.op("Sub", [q3, g.const(int(w), "int64")], "mask", f"Sub_{tag}")
                inside = g.op("Greater", [keys, lo], "mask", f"Greater_{tag}")
                m = g.op("And", [m, inside], "mask", f"And_{tag}")
            m = g.op("And", [m, am3], "mask", f"And_pad_{tag}")
            m = g.op("Or", [m, diag], "mask", f"Or_self_{tag}")
            self.by_window[w] = g.op("Unsqueeze", [m, g.const([1], "int64")], "mask", f"Unsqueeze_{tag}")

    def grouped(self, window, groups: int) -> str:
        """The mask of `window` tiled to [B, 1, groups·T, S] for queries folded per KV group."""
        if groups == 1:
            return self.by_window[window]
        if window not in self._grouped:
            tag = "full" if window is None else f"window{window}"
            self._grouped[window] = self.g.op("Tile", [self.by_window[window],
                                                      self.g.const([1, 1, groups, 1], "int64")],
                                              "mask", f"Tile_groups_{tag}")
        return self._grouped[window]

    def slots(self) -> str:
        """[B, T] int64: the cache slot of each new token."""
        if self._slots is None:
            g = self.g
            steps = g.op("Range", [g.const(0, "int64"), self.t_len, g.const(1, "int64")], "mask", "Range_steps")
            wi = g.op("Unsqueeze", [C.WRITE_INDICES, g.const([1], "int64")], "mask", "Unsqueeze_write")  # [B, 1]
            self._slots = g.op("Add", [wi, steps], "mask", "Add_slots")
        return self._slots

    def valid(self) -> tuple[str, str, str]:
        """(float [B, T, 1], bool [B, T, 1], count int64 [B]): which new tokens are real (not left padding)."""
        if self._valid is None:
            g = self.g
            v = g.op("GatherElements", [C.ATTENTION_MASK, self.slots()], "mask", "GatherElements_valid", axis=1)
            v3 = g.op("Unsqueeze", [v, g.const([2], "int64")], "mask", "Unsqueeze_valid")
            self._valid = (g.op("Cast", [v3], "mask", "Cast_valid_float", to=TensorProto.FLOAT),
                           g.op("Cast", [v3], "mask", "Cast_valid_bool", to=TensorProto.BOOL),
                           g.op("ReduceSum", [v, g.const([1], "int64")], "mask", "ReduceSum_valid", keepdims=0))
        return self._valid
