"""The `--target onnxruntime` graph: the standard graph with ONNX Runtime's com.microsoft contrib ops where they
are faster; same I/O contract, batch 1 (no left padding: attention_mask is not read).

- GroupQueryAttention takes the packed QKV, applies the rotary embedding, writes the new K/V into the past_*
  buffer (bound as present_* too, so in place) and attends, in one kernel; seqlens_k and total_sequence_length
  come from write_indices. Its CPU kernel takes head sizes that are multiples of 16 (every real model's); other
  head sizes keep the standard Attention + TensorScatter path.
- SkipSimplifiedLayerNormalization fuses each residual add with the next RMSNorm (not for Gemma 2's four-norm
  layers). The residual branch not yet added travels explicitly: `fused_layer` takes and returns (x, pending).
- Dense FFN layers run gate and up as two MatMuls (no Split; engine_spec gives them the roles gate / up).
"""

from __future__ import annotations

from onnx import TensorProto

from caprese.export import contract as C
from caprese.export.engine_spec import PACKING_NBITS, LayerTensors, WeightRef
from caprese.export.ffn_graph import activation
from caprese.export.graph_masks import GraphMasks
from caprese.export.standard_graph import StandardGraph

GQA_HEAD_MULTIPLE = 16


class OrtGraph(StandardGraph):
    opsets = (("", C.OPSET), (C.MS_DOMAIN, 1))

    def __init__(self, em, graph: str, weights):
        super().__init__(em, graph, weights)
        if self.shared:
            raise ValueError("the shared TensorRT graph has no onnxruntime variant")
        self.gqa = self.model.head_dim % GQA_HEAD_MULTIPLE == 0
        self._rope16 = None  # an fp16 cache: the rotary tables cast to fp16 once, shared by every layer

    def build_masks(self) -> GraphMasks:
        """GroupQueryAttention: seqlens_k = slots written so far - 1 and total = the longest, no masks."""
        if not self.gqa:
            return super().build_masks()
        g = self.g
        masks = GraphMasks(g, self.prefill)
        end = g.op("Add", [C.WRITE_INDICES, masks.t_len], "mask", "Add_end")  # [B]
        seqlens = g.op("Sub", [end, masks.one], "mask", "Sub_seqlens")
        self.seqlens_k = g.op("Cast", [seqlens], "mask", "Cast_seqlens", to=TensorProto.INT32)
        total = g.op("ReduceMax", [end], "mask", "ReduceMax_total", keepdims=0)
        self.total_len = g.op("Cast", [total], "mask", "Cast_total", to=TensorProto.INT32)
        return masks

    # ---- quantized weights: MatMulNBits ----
    def matmul_nbits(self, x: str, ref: WeightRef, qt, scope: str, opname: str, i: int | None) -> str:
        """x @ Wᵀ for an [out, in] weight stored as MatMulNBits' B (engine_spec.PACKING_NBITS): one fused
        dequantize-and-multiply kernel; accuracy_level 0 (float activations: the reference's numerics) unless the
        recipe asks for 4 (int8 activations, ONNX Runtime GenAI's CPU default: faster, other numerics)."""
        b, s = self.g.nbits_weight(ref, qt)
        n, k = ref.shape
        level = self.spec.recipe.weights.accuracy_level
        return self.g.op("MatMulNBits", [x, b, s], scope, f"MatMulNBits_{opname}", i, domain=C.MS_DOMAIN, K=k, N=n,
                         bits=ref.quant.bits, block_size=ref.quant.block_size,
                         **({"accuracy_level": level} if level else {}))

    def linear(self, x: str, ref: WeightRef, value, scope: str, opname: str, i: int | None, role: str) -> str:
        if ref.quant is not None and ref.quant.packing == PACKING_NBITS:
            return self.matmul_nbits(x, ref, self.qtensor(i, role), scope, opname, i)
        return super().linear(x, ref, value, scope, opname, i, role)

    def head_logits(self, h2: str) -> str:
        ref = self.spec.head
        if ref.quant is not None and ref.quant.packing == PACKING_NBITS:
            return self.matmul_nbits(h2, ref, self.qtensor(None, "head"), "lm_head", "head", None)
        return super().head_logits(h2)

    # ---- residual adds fused into the norms ----
    def body(self, x: str) -> str:
        if self.model.gemma_norms:
            return super().body(x)
        pending = None
        for i, layer in enumerate(self.em.decoder.layers):
            x, pending = self.fused_layer(self.spec.layers[i], layer, x, pending)
        # the last residual add fused into the final norm (all T rows), then the last token
        h, _ = self.skip_norm(x, pending, self.em.decoder.model.norm.weight, self.spec.final_norm, "norm", None)
        return self.last_token(h)

    def fused_layer(self, t: LayerTensors, layer, x: str, pending: str | None) -> tuple[str, str]:
        """(x, pending) -> (x, pending): x + pending is the residual stream; the FFN output is the new pending."""
        i = t.index
        h, x = self.skip_norm(x, pending, layer.input_layernorm.weight, t.input_norm, "input_norm", i)
        y = self.attention(t, layer.self_attn, h)
        h, x = self.skip_norm(x, y, layer.post_attention_layernorm.weight, t.post_attn_norm, "post_attn_norm", i)
        return x, self.mlp(t, layer.mlp, h)

    def skip_norm(self, x: str, pending: str | None, weight, ref: WeightRef, scope: str,
                  i: int | None) -> tuple[str, str]:
        """(RMSNorm(x + pending), x + pending) in one SkipSimplifiedLayerNormalization (pending None: a plain
        RMSNorm of x, and x)."""
        g = self.g
        if pending is None:
            return self.norm(x, weight, ref, scope, i, False), x
        w = g.weight(ref, weight.detach())
        node = C.node_name(scope, "SkipSimplifiedLayerNormalization", i)
        h, _, _, total = g.op("SkipSimplifiedLayerNormalization", [pending, x, w], scope,
                              "SkipSimplifiedLayerNormalization", i, domain=C.MS_DOMAIN,
                              out=[f"{node}/output_0", "", "", f"{node}/output_3"],
                              epsilon=float(self.model.rms_norm_eps))
        return h, total

    # ---- attention ----
    def attention(self, t: LayerTensors, attn, h: str) -> str:
        """Packed QKV into GroupQueryAttention over the shared past/present buffers (present bound to the same
        memory as past: ONNX Runtime then writes the new K/V in place), rotary inside, o_proj after."""
        if not self.gqa:
            return super().attention(t, attn, h)
        g, m, i = self.g, self.model, t.index
        qkv = self.qkv_matmul(t, attn, h)
        attrs = {"num_heads": m.num_heads, "kv_num_heads": m.num_kv_heads, "scale": float(attn.scale),
                 "do_rotary": 1, "rotary_interleaved": 0}
        if attn.window is not None:
            attrs["local_window_size"] = int(attn.window)  # = keys q - w + 1 .. q (parity tests cross w)
        if attn.softcap is not None:
            attrs["softcap"] = float(attn.softcap)
        cos, sin = self.cos, self.sin
        if self.lay.kv_dtype:  # an fp16 cache: GroupQueryAttention in fp16 (its CPU kernel: fp32 arithmetic on fp16
            f16 = TensorProto.FLOAT16  # inputs, q / k rounded after the rotation, the output rounded once)
            qkv = g.op("Cast", [qkv], "attn", "Cast_qkv_fp16", i, to=f16)
            if self._rope16 is None:
                self._rope16 = tuple(g.op("Cast", [r], "rope", f"Cast_{n}_fp16", to=f16)
                                     for r, n in ((cos, "cos"), (sin, "sin")))
            cos, sin = self._rope16
        y = g.op("GroupQueryAttention", [qkv, "", "", C.past_key(i), C.past_value(i), self.seqlens_k, self.total_len,
                                         cos, sin], "attn", "GroupQueryAttention", i, domain=C.MS_DOMAIN,
                 out=[f"{C.node_name('attn', 'GroupQueryAttention', i)}/output_0", C.present_key(i),
                      C.present_value(i)], **attrs)[0]
        if self.lay.kv_dtype:
            y = g.op("Cast", [y], "attn", "Cast_output_fp32", i, to=TensorProto.FLOAT)
        return self.proj(y, attn.o_proj, t.o, t.o_bias, i, "o")

    # ---- FFN ----
    def mlp(self, t: LayerTensors, mlp, x: str) -> str:
        """Dense layers: gate and up as two MatMuls, no Split: measured ~2% faster per decode step than one
        MatMul + Split on ONNX Runtime's CPU provider (SmolLM2-135M, 2 threads). TensorRT prefers the fused one."""
        if t.kind != C.DENSE:
            return super().mlp(t, mlp, x)
        i = t.index
        a = activation(self.g, self.model.activation, self.proj(x, mlp.gate_proj, t.gate, t.gate_bias, i, "gate",
                                                                 scope="mlp"), i, "act")
        up = self.proj(x, mlp.up_proj, t.up, t.up_bias, i, "up", scope="mlp")
        z = self.g.op("Mul", [a, up], "mlp", "Mul_gate_up", i)
        return self.proj(z, mlp.down_proj, t.down, t.down_bias, i, "down", scope="mlp")
