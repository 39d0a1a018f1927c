"""The gated FFN of one layer in graph form, shared by both export targets: dense from constant weights, with
the GRIFFIN statistic (prefill) or the CATS threshold (τ out in prefill, |a| > τ in decode; both roles in the
shared TensorRT graph), BYPASS (dense, + x·L·R in decode only), and GRIFFIN's decode FFN over the per-prompt
folded matrices.

Gate and up are one MatMul over [W_g, W_1] (+ L for CATS / BYPASS layers with a bypass, so decode folds it for free: the
down matrix is then [W_2 ; R]); the names and shapes are the engine spec's (LayerTensors.gate_up / down).
"""

from __future__ import annotations

import torch

from caprese.export import contract as C
from caprese.export.cats_threshold import percentile_threshold, role_switched_tau
from caprese.export.engine_spec import LayerTensors
from caprese.export.graph_builder import GraphBuilder, linear_t
from caprese.export.graph_masks import GraphMasks


def activation(g: GraphBuilder, kind: str, x: str, layer: int, name: str) -> str:
    """act(x) for the model's activation (ModelSpec.activation), nodes in scope mlp."""
    if kind == "silu":
        s = g.op("Sigmoid", [x], "mlp", f"{name}_Sigmoid", layer)
        return g.op("Mul", [x, s], "mlp", f"{name}_Mul", layer)
    if kind in ("gelu_tanh", "gelu"):
        return g.op("Gelu", [x], "mlp", f"{name}_Gelu", layer, approximate="tanh" if kind == "gelu_tanh" else "none")
    raise ValueError(f"activation {kind!r} has no export")


class FfnGraph:
    """The FFN nodes of one graph; `prefill` graphs (and the `shared` one) take any T, decode graphs T = 1."""

    def __init__(self, graph, masks: GraphMasks, layout: C.GraphLayout, act: str, prefill: bool, shared: bool):
        """graph: the StandardGraph these nodes belong to (its GraphBuilder, `linear`, the export model)."""
        self.sg, self.g, self.masks, self.lay, self.act = graph, graph.g, masks, layout, act
        self.prefill, self.shared = prefill, shared

    def _bypass_matmul(self, x: str, ref, value, i: int, name: str) -> str:
        w = self.g.weight(ref, value.detach())
        if ref.dtype != self.g.fdt:  # --fp16-bypass: L / R stored fp16 in an fp32 graph
            w = self.g.op("Cast", [w], "mlp", f"Cast_{name}", i, to=self.g.ft)
        return self.g.op("MatMul", [x, w], "mlp", f"MatMul_{name}", i)

    def quantized(self, t: LayerTensors, dense, ffn, x: str) -> str:
        """The fused FFN of a quantized layer: act(x Ŵ_g)·(x Ŵ_1) @ Ŵ_2 from the quantized gate_up / down, the
        bypass x L, R (CATS, BYPASS) in floats apart (GRIFFIN prefill: dense, no bypass, as in floats)."""
        g, sg, i, kind = self.g, self.sg, t.index, t.kind
        F = dense.gate_proj.out_features
        h = sg.linear(x, t.gate_up, None, "mlp", "gate_up", i, "gate_up")
        if t.gate_up_bias is not None:
            b = torch.cat([dense.gate_proj.bias.detach(), dense.up_proj.bias.detach()])
            h = g.op("Add", [h, g.weight(t.gate_up_bias, b)], "mlp", "Add_gate_up_bias", i)
        gate, up = g.op("Split", [h, g.const([F, F], "int64")], "mlp", "Split", i, n_out=2, axis=-1)
        a = activation(g, self.act, gate, i, "act")
        low = self._bypass_matmul(x, t.L, ffn.bypass.L, i, "bypass_L") if t.L is not None else None
        z, low = self._gate(i, kind, a, up, ffn, low)
        y = sg.linear(z, t.down, None, "mlp", "down", i, "down")
        if low is not None:
            y = g.op("Add", [y, self._bypass_matmul(low, t.R, ffn.bypass.R, i, "bypass_R")], "mlp", "Add_bypass", i)
        return self.down_bias(t, dense, y)

    def _dq_selection(self, codes: str, scales: str, i: int, name: str) -> str:
        """DequantizeLinear of a per-prompt [B, rows, D] code input, blocks along D (a row: one block of D)."""
        g = self.g
        block = self.lay.weight_block or self.lay.hidden_size
        w = g.op("DequantizeLinear", [codes, scales], "mlp", f"DequantizeLinear_{name}", i, axis=2, block_size=block)
        if self.lay.scale_dtype != g.fdt:
            w = g.op("Cast", [w], "mlp", f"Cast_{name}", i, to=g.ft)
        return w

    def fused(self, t: LayerTensors, dense, ffn, x: str) -> str:
        """The dense gated FFN from constant weights (+ GRIFFIN statistic / CATS τ in prefill, CATS threshold in
        decode). `dense`: the layer's DenseFFN; `ffn`: its EfficientFFN (None for dense layers)."""
        if t.gate_up.quant is not None:
            return self.quantized(t, dense, ffn, x)
        g, i, kind = self.g, t.index, t.kind
        F = dense.gate_proj.out_features
        bypass = ffn.bypass if (kind in (C.CATS, C.BYPASS) and ffn is not None) else None
        r = bypass.rank if bypass is not None else 0
        cols = [linear_t(dense.gate_proj.weight), linear_t(dense.up_proj.weight)]
        rows = [linear_t(dense.down_proj.weight)]
        if r:
            cols.append(bypass.L.detach())
            rows.append(bypass.R.detach())
        h = g.op("MatMul", [x, g.weight(t.gate_up, torch.cat(cols, 1))], "mlp", "MatMul_gate_up", i)
        if t.gate_up_bias is not None:
            b = [dense.gate_proj.bias.detach(), dense.up_proj.bias.detach()] + ([torch.zeros(r)] if r else [])
            h = g.op("Add", [h, g.weight(t.gate_up_bias, torch.cat(b))], "mlp", "Add_gate_up_bias", i)
        parts = g.op("Split", [h, g.const([F, F] + ([r] if r else []), "int64")], "mlp", "Split", i,
                     n_out=3 if r else 2, axis=-1)
        gate, up = parts[0], parts[1]
        a = activation(g, self.act, gate, i, "act")
        low = parts[2] if r else None
        z, low = self._gate(i, kind, a, up, ffn, low)
        if r:
            z = g.op("Concat", [z, low], "mlp", "Concat_bypass", i, axis=-1)
        y = g.op("MatMul", [z, g.weight(t.down, torch.cat(rows, 0))], "mlp", "MatMul_down", i)
        return self.down_bias(t, dense, y)

    def _gate(self, i: int, kind: str, a: str, up: str, ffn, low: str | None) -> tuple[str, str | None]:
        """act(gate) * up with what the layer kind does between them (CATS threshold, the bypass's role switch,
        GRIFFIN's prefill statistic), the same for float and quantized weights -> (z, the bypass's x·L or None)."""
        if kind == C.CATS:
            a, low = self._cats(i, a, ffn, low)
        elif kind == C.BYPASS:
            low = self._bypass_role(i, low)
        z = self.g.op("Mul", [a, up], "mlp", "Mul_gate_up", i)
        if kind == C.GRIFFIN and self.prefill:
            self._griffin_statistic(i, z)
        return z, low

    def down_bias(self, t: LayerTensors, dense, y: str) -> str:
        if t.down_bias is None:
            return y
        return self.g.op("Add", [y, self.g.weight(t.down_bias, dense.down_proj.bias)], "mlp", "Add_down_bias",
                         t.index)

    def griffin_decode(self, t: LayerTensors, dense, x: str) -> str:
        """act(x Ŵ_g)·(x Ŵ_1) and x L from the per-prompt w_gul.i in one MatMul, then @ w_dr.i = [Ŵ_2 ; R]."""
        g, i, k, r = self.g, t.index, self.lay.k, self.lay.rank
        if self.lay.quantized and not self.sg.em.float_selection:
            return self._griffin_decode_quantized(t, dense, x)
        h = g.op("MatMul", [x, C.w_gul(i)], "mlp", "MatMul_gate_up_l", i)  # [B, 1, D] @ [B, D, 2k + r]
        if self.lay.mlp_bias:
            b = g.op("Unsqueeze", [C.b_gul(i), g.const([1], "int64")], "mlp", "Unsqueeze_bias", i)
            h = g.op("Add", [h, b], "mlp", "Add_gate_up_bias", i)
        parts = g.op("Split", [h, g.const([k, k] + ([r] if r else []), "int64")], "mlp", "Split", i,
                     n_out=3 if r else 2, axis=-1)
        z = g.op("Mul", [activation(g, self.act, parts[0], i, "act"), parts[1]], "mlp", "Mul_gate_up", i)
        if r:
            z = g.op("Concat", [z, parts[2]], "mlp", "Concat_bypass", i, axis=-1)  # [act(x Ŵ_g)·x Ŵ_1, x L]
        y = g.op("MatMul", [z, C.w_dr(i)], "mlp", "MatMul_down_r", i)  # @ [Ŵ_2 ; R]
        return self.down_bias(t, dense, y)

    def _griffin_decode_quantized(self, t: LayerTensors, dense, x: str) -> str:
        """GRIFFIN decode over the per-prompt QUANTIZED rows (contract: w_gu_q / w_gu_s, w_d_q / w_d_s): the kept
        neurons' gate and up rows [B, 2k, D] and down rows [B, k, D] dequantized in the graph, L and R float
        constants: act(x Ŵ_gᵀ)·(x Ŵ_1ᵀ) @ Ŵ_2 + (x L) R."""
        g, i, k, r = self.g, t.index, self.lay.k, self.lay.rank
        gu = self._dq_selection(C.w_gu_q(i), C.w_gu_s(i), i, "gate_up")  # [B, 2k, D]
        gu = g.op("Transpose", [gu], "mlp", "Transpose_gate_up", i, perm=[0, 2, 1])
        h = g.op("MatMul", [x, gu], "mlp", "MatMul_gate_up", i)  # [B, 1, 2k]
        bypass = self.sg.em.ffns[i].bypass if r else None
        if r:
            low = self._bypass_matmul(x, t.fold.L, bypass.L, i, "bypass_L")
            h = g.op("Concat", [h, low], "mlp", "Concat_bypass_L", i, axis=-1)
        if self.lay.mlp_bias:
            b = g.op("Unsqueeze", [C.b_gul(i), g.const([1], "int64")], "mlp", "Unsqueeze_bias", i)
            h = g.op("Add", [h, b], "mlp", "Add_gate_up_bias", i)
        parts = g.op("Split", [h, g.const([k, k] + ([r] if r else []), "int64")], "mlp", "Split", i,
                     n_out=3 if r else 2, axis=-1)
        z = g.op("Mul", [activation(g, self.act, parts[0], i, "act"), parts[1]], "mlp", "Mul_gate_up", i)
        down = self._dq_selection(C.w_d_q(i), C.w_d_s(i), i, "down")  # [B, k, D]
        y = g.op("MatMul", [z, down], "mlp", "MatMul_down", i)
        if r:
            y = g.op("Add", [y, self._bypass_matmul(parts[2], t.fold.R, bypass.R, i, "bypass_R")], "mlp",
                     "Add_bypass", i)
        return self.down_bias(t, dense, y)

    def _griffin_statistic(self, i: int, z: str) -> None:
        """griffin_stat.i = Σ_t valid_t · (z_t / max(‖z_t‖, 1e-12))², float32 (caprese griffin_statistic_sq)."""
        g = self.g
        vf, _, _ = self.masks.valid()
        zf = g.to_float32(z, "mlp", "Cast_stat", i)
        ss = g.op("ReduceSumSquare", [zf, g.const([-1], "int64")], "mlp", "ReduceSumSquare_stat", i, keepdims=1)
        n = g.op("Sqrt", [ss], "mlp", "Sqrt_stat", i)
        n = g.op("Max", [n, g.const(1e-12, "float32")], "mlp", "Max_stat", i)
        zn = g.op("Div", [zf, n], "mlp", "Div_stat", i)
        sq = g.op("Mul", [zn, zn], "mlp", "Mul_stat_sq", i)
        sq = g.op("Mul", [sq, vf], "mlp", "Mul_stat_valid", i)
        g.op("ReduceSum", [sq, g.const([1], "int64")], "mlp", "ReduceSum_stat", i, out=C.griffin_stat(i), keepdims=0)

    def _bypass_role(self, i: int, low: str | None) -> str | None:
        """A BYPASS layer's x L as the FFN uses it: off in prefill (x0, so L is read either way), on in decode,
        switched by decode_flag as data in the shared graph."""
        g = self.g
        if low is None or not self.prefill:
            return low
        if not self.shared:
            return g.op("Mul", [low, g.fconst(0.0)], "mlp", "Mul_bypass_off", i)
        gate = g.op("Cast", [C.DECODE_FLAG], "mlp", "Cast_role_bypass", i, to=g.ft)
        return g.op("Mul", [low, gate], "mlp", "Mul_role_bypass", i)

    def _cats(self, i: int, a: str, ffn, low: str | None) -> tuple[str, str | None]:
        """CATS: (activation, bypass columns) as the FFN uses them. Prefill: dense, bypass off, cats_tau.i out.
        Decode: |a| > cats_tau.i kept, bypass on. Shared graph: both, chosen by decode_flag as data (τ = -1 keeps
        every activation, a 0/1 gate switches the bypass), and the τ search inside an If so decode skips it."""
        g = self.g
        axes = g.const([1, 2], "int64")
        if self.prefill and not self.shared:
            absa = g.to_float32(g.op("Abs", [a], "mlp", "tau_Abs", i), "mlp", "tau_Cast", i)
            _, vb, nvalid = self.masks.valid()
            percentile_threshold(g, i, absa, vb, nvalid, self.lay.intermediate_size, ffn.density, out=C.cats_tau(i))
            off = None if low is None else g.op("Mul", [low, g.fconst(0.0)], "mlp", "Mul_bypass_off", i)
            return a, off
        absa = g.to_float32(g.op("Abs", [a], "mlp", "Abs", i), "mlp", "Cast_abs", i)
        tau = C.cats_tau(i)
        if self.shared:
            tau = g.op("Where", [C.DECODE_FLAG, C.cats_tau_in(i), g.const(-1.0, "float32")], "mlp", "Where_role_tau", i)
        tau3 = g.op("Unsqueeze", [tau, axes], "mlp", "Unsqueeze_tau", i)
        keep = g.op("Greater", [absa, tau3], "mlp", "Greater_tau", i)
        kept = g.op("Where", [keep, a, g.fconst(0.0)], "mlp", "Where_threshold", i)
        if not self.shared:
            return kept, low
        if low is not None:
            gate = g.op("Cast", [C.DECODE_FLAG], "mlp", "Cast_role_bypass", i, to=g.ft)
            low = g.op("Mul", [low, gate], "mlp", "Mul_role_bypass", i)
        _, vb, nvalid = self.masks.valid()  # built in the graph, before the If's branches read it
        role_switched_tau(g, i, absa, vb, nvalid, self.lay.intermediate_size, ffn.density)
        return kept, low
