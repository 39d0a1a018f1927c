"""The standard-domain graph of one model (target tensorrt, and the reference every target is tested against).

Standard ONNX domain only, opset 24 (contract.py has the I/O):
- KV cache: `TensorScatter` (axis -2, write_indices) writes the new K/V into the 4-D buffer; `Attention` runs
  over the UPDATED buffer with a boolean [B, 1, T, S] mask (graph_masks), GQA through the 4-D shapes; no
  past/present inputs on Attention (TensorRT's importer rejects them).
- Attention is written out (attention_graph) for Gemma 2's soft-cap and at fp16/bf16: TensorRT's Attention
  refuses `softcap` and `softmax_precision`, and a float32 Softmax is what keeps the softmax in float32 in a
  strongly typed network. fp32 graphs use the `Attention` op.
- `RMSNormalization` (stash_type float32) and `RotaryEmbedding` (non-interleaved, position_ids) ops.
- Q, K and V come from one MatMul over [W_q, W_k, W_v], split on the head axis; the decode graph (T = 1) has no
  Transpose at all, since [B, 1, H·hd] and [B, H, 1, hd] are the same bytes.
- The FFN is ffn_graph's (gate and up in one MatMul; GRIFFIN's decode FFN over the per-prompt folded matrices).
- Reductions that pick neurons / thresholds (GRIFFIN statistic, CATS τ) and the logits are float32 at every
  precision.
- The shared TensorRT graph of a CATS layout (contract.TRT_SHARED) serves prefill and decode: the threshold and
  the bypass are switched by decode_flag as data, and the τ search runs inside an If only in the prefill role.
Every weight's name and shape is the engine spec's (engine_spec.py); this module never builds a weight name.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import torch
from onnx import helper

from caprese.export import contract as C
from caprese.export.attention_graph import explicit_attention
from caprese.export.engine_spec import MATRIX, EngineSpec, LayerTensors, WeightRef
from caprese.export.ffn_graph import FfnGraph
from caprese.export.graph_builder import GraphBuilder, linear_t, value_info
from caprese.export.graph_masks import GraphMasks
from caprese.export.weights import WeightsWriter

INT64_MAX = np.iinfo(np.int64).max


@dataclasses.dataclass
class ExportModel:
    """What a graph builder needs: the decoder (fp32 weights), its engine spec, the efficient FFNs by layer."""

    decoder: object  # caprese.model.decoder.Decoder
    spec: EngineSpec
    ffns: dict  # layer -> EfficientFFN (GriffinFFN / CatsFFN) for approximated layers
    quant: object = None  # quantized_weights.QuantizedWeights when spec.recipe.weights is set
    float_selection: bool = False  # a quantized GRIFFIN layout's decode graph with float w_gul / w_dr (TensorRT)

    @property
    def layout(self) -> C.GraphLayout:
        return self.spec.layout

    @property
    def max_seq_len(self) -> int:
        return self.spec.max_seq_len

    @property
    def target(self) -> str:
        return self.spec.target


class StandardGraph:
    """One graph (prefill, decode, or the shared TensorRT graph C.TRT_SHARED) of one model."""

    opsets = (("", C.OPSET),)  # (domain, version) imports

    def __init__(self, em: ExportModel, graph: str, weights: WeightsWriter):
        self.em, self.graph, self.lay, self.spec = em, graph, em.layout, em.spec
        self.model = em.decoder.spec
        self.g = GraphBuilder(weights, self.lay.dtype)
        # the shared graph is the prefill graph (any T) with CATS / BYPASS layers switched by decode_flag
        self.shared = graph == C.TRT_SHARED
        self.prefill = graph in (C.PREFILL, C.TRT_SHARED)
        self._rows_shapes: dict[int, str] = {}

    # ---- linear layers, float or quantized ----
    def qtensor(self, layer: int | None, role: str):
        """The QuantizedTensor of a quantized role (engine-spec role name; "head" for the LM head)."""
        return self.em.quant.role(layer, role)

    def dequantized(self, ref: WeightRef, qt, scope: str, opname: str, i: int | None) -> str:
        """DequantizeLinear of a quantized weight (blocks along axis 1 of the stored tensor; one scale per row:
        per-axis 0) in the graph's float dtype: [R, C] as stored."""
        g = self.g
        codes, scale = g.qweight(ref, qt)
        attrs = {"axis": 0} if ref.quant.block_size == 0 else {"axis": 1, "block_size": ref.quant.block_size}
        w = g.op("DequantizeLinear", [codes, scale], scope, f"DequantizeLinear_{opname}", i, **attrs)
        if ref.quant.scale.dtype != g.fdt:  # a scale dtype the graph's cannot hold exactly (fp32 scales at fp16)
            w = g.op("Cast", [w], scope, f"Cast_{opname}_weight", i, to=g.ft)
        return w

    def rows_shape(self, n: int) -> str:
        """[B, T, n] as a shape tensor (B, T from input_ids): the 3-D shape of a Gemm's 2-D output."""
        if n not in self._rows_shapes:
            g = self.g
            if not self._rows_shapes:
                self._bt = g.op("Shape", [C.INPUT_IDS], "embed", "Shape_rows")
            self._rows_shapes[n] = g.op("Concat", [self._bt, g.const([n], "int64")], "embed", f"Concat_rows_{n}",
                                        axis=0)
        return self._rows_shapes[n]

    def linear(self, x: str, ref: WeightRef, value, scope: str, opname: str, i: int | None, role: str) -> str:
        """x [B, T, in] @ W: floats (value: the [in, out] tensor, engine_spec.MATRIX) or quantized (the spec's
        `role` codes): DequantizeLinear -> MatMul for [in, out] storage, -> Gemm(transB=1) over [B·T, in] rows for
        [out, in] storage (TensorRT's importGemm turns transB into IMatrixMultiplyLayer's kTRANSPOSE: no
        Transpose layer, no copy of the weight)."""
        g = self.g
        if ref.quant is None:
            return g.op("MatMul", [x, g.weight(ref, value)], scope, f"MatMul_{opname}", i)
        w = self.dequantized(ref, self.qtensor(i, role), scope, opname, i)
        if ref.storage == MATRIX:
            return g.op("MatMul", [x, w], scope, f"MatMul_{opname}", i)
        n, k = ref.shape
        x2 = g.op("Reshape", [x, g.const([-1, k], "int64")], scope, f"Reshape_{opname}_in", i)
        y = g.op("Gemm", [x2, w], scope, f"Gemm_{opname}", i, transB=1)
        return g.op("Reshape", [y, self.rows_shape(n)], scope, f"Reshape_{opname}_out", i)

    # ---- pieces ----
    def norm(self, x: str, weight: torch.Tensor, ref: WeightRef, scope: str, layer: int | None, plus_one: bool,
             name: str = "RMSNormalization") -> str:
        """RMSNorm; `plus_one`: Gemma's multiplier 1 + w, computed in float32 before the cast to the weights'."""
        scale = (1.0 + weight.detach().float()) if plus_one else weight.detach()
        return self.g.op("RMSNormalization", [x, self.g.weight(ref, scale)], scope, name, layer,
                         epsilon=float(self.model.rms_norm_eps), axis=-1, stash_type=1)

    def proj(self, x: str, lin, w: WeightRef, b: WeightRef | None, i: int, opname: str, scope: str = "attn") -> str:
        """x @ W (+ b) of an nn.Linear, stored as the spec's `w` (MATRIX) and `b`."""
        g = self.g
        y = self.linear(x, w, None if w.quant is not None else linear_t(lin.weight), scope, opname, i, opname)
        if b is not None:
            y = g.op("Add", [y, g.weight(b, lin.bias)], scope, f"Add_{opname}_bias", i)
        return y

    def last_token(self, x: str) -> str:
        """The last new token's row (prefill; decode has T = 1 already)."""
        if not self.prefill:
            return x
        g = self.g
        return g.op("Slice", [x, g.const([-1], "int64"), g.const([INT64_MAX], "int64"), g.const([1], "int64")],
                    "norm", "Slice")

    # ---- graph ----
    def build(self) -> onnx.ModelProto:
        g, m, dec = self.g, self.model, self.em.decoder
        if self.shared:
            io = self.lay.tensorrt_io(C.TRT_SHARED, cache_len=None)
            inputs, outputs = io["inputs"], io["outputs"]
        else:
            inputs = self.lay.inputs(self.graph, quantized_selection=not self.em.float_selection)
            outputs = self.lay.outputs(self.graph)
        x = g.op("Gather", [g.weight(self.spec.embed, dec.model.embed_tokens.weight), C.INPUT_IDS], "embed",
                 "Gather", axis=0)
        if m.gemma_norms:
            x = g.op("Mul", [x, g.fconst(m.hidden_size ** 0.5)], "embed", "Mul")
        self.rope_tables()
        self.masks = self.build_masks()
        self.ffn = FfnGraph(self, self.masks, self.lay, m.activation, self.prefill, self.shared)
        self.head(self.body(x))
        graph = helper.make_graph(g.nodes, f"caprese_{self.graph}", [value_info(t) for t in inputs],
                                  [value_info(t) for t in outputs], list(g.initializers.values()))
        opsets = [helper.make_opsetid(domain, version) for domain, version in self.opsets]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="caprese", ir_version=C.IR_VERSION)
        model.doc_string = f"caprese {self.graph} graph, contract format {C.FORMAT_VERSION}"
        return model

    def rope_tables(self) -> None:
        from caprese.model.rope import rope_table

        m = self.model
        cos, sin = rope_table(m.head_dim, m.rope_theta, m.rope_scaling, self.em.max_seq_len)
        half = m.head_dim // 2
        self.cos = self.g.weight(self.spec.rope_cos, cos[:, :half])
        self.sin = self.g.weight(self.spec.rope_sin, sin[:, :half])

    def build_masks(self) -> GraphMasks:
        masks = GraphMasks(self.g, self.prefill)
        masks.build_attention_masks(self.model.sliding_windows)
        return masks

    def body(self, x: str) -> str:
        """The decoder layers over the embedded tokens, then the final norm of the last token."""
        for i, layer in enumerate(self.em.decoder.layers):
            x = self.layer(self.spec.layers[i], layer, x)
        h = self.last_token(x)
        return self.norm(h, self.em.decoder.model.norm.weight, self.spec.final_norm, "norm", None,
                         self.model.gemma_norms)

    def head(self, h: str) -> str:
        g, m = self.g, self.model
        h2 = g.op("Reshape", [h, g.const([-1, m.hidden_size], "int64")], "lm_head", "Reshape")
        logits = self.head_logits(h2)
        logits = g.to_float32(logits, "lm_head", "Cast")
        if m.final_softcap is not None:
            cap = g.const(float(m.final_softcap), "float32")
            logits = g.op("Div", [logits, cap], "lm_head", "softcap_Div")
            logits = g.op("Tanh", [logits], "lm_head", "softcap_Tanh")
            logits = g.op("Mul", [logits, cap], "lm_head", "softcap_Mul")
        return g.op("Reshape", [logits, g.const([-1, 1, m.vocab_size], "int64")], "lm_head", "Reshape_out",
                    out=C.LOGITS)

    def head_logits(self, h2: str) -> str:
        """logits [N, V] = h2 [N, D] @ Wᵀ, W [V, D] (the embedding table when tied; quantized: dequantized)."""
        g, ref = self.g, self.spec.head
        if ref.quant is None:
            w = g.weight(ref, self.em.decoder.lm_head.weight)
        else:
            w = self.dequantized(ref, self.qtensor(None, "head"), "lm_head", "head", None)
        return g.op("Gemm", [h2, w], "lm_head", "Gemm", transB=1)

    def layer(self, t: LayerTensors, layer, x: str) -> str:
        g, gemma, i = self.g, self.model.gemma_norms, t.index
        h = self.norm(x, layer.input_layernorm.weight, t.input_norm, "input_norm", i, gemma)
        y = self.attention(t, layer.self_attn, h)
        if gemma:  # four norms: the attention output and the FFN's input and output are normalised
            y = self.norm(y, layer.post_attention_layernorm.weight, t.post_attn_norm, "post_attn_norm", i, True)
            x = g.op("Add", [x, y], "residual", "Add_attn", i)
            h = self.norm(x, layer.pre_feedforward_layernorm.weight, t.pre_ffn_norm, "pre_ffn_norm", i, True)
            f = self.mlp(t, layer.mlp, h)
            f = self.norm(f, layer.post_feedforward_layernorm.weight, t.post_ffn_norm, "post_ffn_norm", i, True)
            return g.op("Add", [x, f], "residual", "Add_mlp", i)
        x = g.op("Add", [x, y], "residual", "Add_attn", i)
        h = self.norm(x, layer.post_attention_layernorm.weight, t.post_attn_norm, "post_attn_norm", i, False)
        return g.op("Add", [x, self.mlp(t, layer.mlp, h)], "residual", "Add_mlp", i)

    # ---- attention ----
    def attention(self, t: LayerTensors, attn, h: str) -> str:
        g, m, i = self.g, self.model, t.index
        hq, hd = m.num_heads, m.head_dim
        heads = dict(zip("qkv", self.qkv_heads(t, attn, h)))
        if m.qk_norm:
            for name, norm, ref in (("q", attn.q_norm, t.q_norm), ("k", attn.k_norm, t.k_norm)):
                heads[name] = self.norm(heads[name], norm.weight, ref, "attn", i, False, f"RMSNormalization_{name}")
        for name in "qk":
            heads[name] = g.op("RotaryEmbedding", [heads[name], self.cos, self.sin, C.POSITION_IDS], "attn",
                               f"RotaryEmbedding_{name}", i, interleaved=0)
        k_all = g.op("TensorScatter", [C.past_key(i), heads["k"], C.WRITE_INDICES], "attn", "TensorScatter_k", i,
                     out=C.present_key(i), axis=-2, mode="linear")
        v_all = g.op("TensorScatter", [C.past_value(i), heads["v"], C.WRITE_INDICES], "attn", "TensorScatter_v", i,
                     out=C.present_value(i), axis=-2, mode="linear")
        scale = float(attn.scale)
        if attn.softcap is None and self.lay.dtype == "float32":
            y = g.op("Attention", [heads["q"], k_all, v_all, self.masks.by_window[attn.window]], "attn", "Attention",
                     i, scale=scale)
        else:
            y = explicit_attention(g, i, heads["q"], k_all, v_all, self.masks.grouped(attn.window, m.gqa_groups), m,
                                   scale, attn.softcap)
        if self.prefill:
            y = g.op("Transpose", [y], "attn", "Transpose_out", i, perm=[0, 2, 1, 3])
        # decode (T = 1): [B, H, 1, hd] and [B, 1, H, hd] are the same bytes, so a Reshape is the transpose
        y = g.op("Reshape", [y, g.const([0, -1, hq * hd] if self.prefill else [0, 1, hq * hd], "int64")], "attn",
                 "Reshape_out", i)
        return self.proj(y, attn.o_proj, t.o, t.o_bias, i, "o")

    def qkv_matmul(self, t: LayerTensors, attn, h: str) -> str:
        """[B, T, (Hq + 2 Hkv)·hd] = h @ [W_q, W_k, W_v] (+ biases): one read of h, one kernel."""
        g, i = self.g, t.index
        lins = (attn.q_proj, attn.k_proj, attn.v_proj)
        w = None if t.qkv.quant is not None else torch.cat([linear_t(lin.weight) for lin in lins], 1)
        y = self.linear(h, t.qkv, w, "attn", "qkv", i, "qkv")
        if t.qkv_bias is not None:
            b = torch.cat([lin.bias.detach() if lin.bias is not None else torch.zeros(lin.out_features)
                           for lin in lins])
            y = g.op("Add", [y, g.weight(t.qkv_bias, b)], "attn", "Add_qkv_bias", i)
        return y

    def qkv_heads(self, t: LayerTensors, attn, h: str) -> list[str]:
        """q [B, Hq, T, hd], k and v [B, Hkv, T, hd] from ONE MatMul over [W_q, W_k, W_v] (one read of the input,
        one kernel), split along the head axis. Decode (T = 1) needs no Transpose: [B, 1, H·hd] is [B, H, 1, hd]."""
        g, m, i = self.g, self.model, t.index
        hq, hkv, hd = m.num_heads, m.num_kv_heads, m.head_dim
        y = self.qkv_matmul(t, attn, h)
        if self.prefill:
            y = g.op("Reshape", [y, g.const([0, 0, hq + 2 * hkv, hd], "int64")], "attn", "Reshape_qkv", i)
            y = g.op("Transpose", [y], "attn", "Transpose_qkv", i, perm=[0, 2, 1, 3])  # [B, H', T, hd]
        else:
            y = g.op("Reshape", [y, g.const([0, hq + 2 * hkv, 1, hd], "int64")], "attn", "Reshape_qkv", i)
        return g.op("Split", [y, g.const([hq, hkv, hkv], "int64")], "attn", "Split_qkv", i, n_out=3, axis=1)

    # ---- FFN ----
    def mlp(self, t: LayerTensors, mlp, x: str) -> str:
        ffn = self.em.ffns.get(t.index)
        dense = mlp.dense if ffn is not None else mlp
        if t.kind == C.GRIFFIN and not self.prefill:
            return self.ffn.griffin_decode(t, dense, x)
        return self.ffn.fused(t, dense, ffn, x)
