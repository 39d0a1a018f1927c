"""Build the prefill and decode graphs with onnx.helper, straight from a loaded Decoder's weights.

Standard ONNX domain only, opset 24 (see contract.py for the I/O):
- KV cache: `TensorScatter` (axis -2, write_indices) writes the new K/V into the 4-D buffer; `Attention` runs
  over the UPDATED buffer with a boolean [B, 1, T, S] mask (causal + sliding window + left padding, built once
  per graph from write_indices and attention_mask), GQA through the 4-D shapes; no past/present inputs on
  Attention (TensorRT's importer rejects them).
- Attention is written out (Mul(scale) on q, MatMul, Cast to float32, Where(mask), Softmax, Cast, MatMul; the
  query heads of a KV group folded into the query length) for Gemma 2's soft-cap (+ Div, Tanh, Mul) and at
  fp16/bf16: TensorRT's Attention refuses `softcap` and `softmax_precision`, and a float32 Softmax is what keeps
  the softmax in float32 in a strongly typed network. fp32 graphs use the `Attention` op (no attribute needed).
- `RMSNormalization` (stash_type float32) and `RotaryEmbedding` (non-interleaved, position_ids) ops.
- Q, K and V come from one MatMul over [W_q, W_k, W_v], split on the head axis; the decode graph (T = 1) has
  no Transpose at all, since [B, 1, H·hd] and [B, H, 1, hd] are the same bytes.
- The gated FFN runs gate and up as one MatMul with [W_g, W_1] (+ L for CATS bypass layers); GRIFFIN's decode
  FFN takes the per-prompt folded matrices [Ŵ_g, Ŵ_1, L] and [Ŵ_2 ; R] as graph inputs.
- Reductions that pick neurons / thresholds (GRIFFIN statistic, CATS τ) and the logits are float32 at every
  precision; softmax runs in float32 (a Cast around Softmax, or the fp32 Attention op).
- The shared TensorRT graph of a CATS layout (contract.TRT_SHARED) serves prefill and decode: the threshold and
  the bypass are switched by decode_flag as data, and the τ search runs inside an If only in the prefill role.
"""

from __future__ import annotations

import dataclasses
import contextlib

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from caprese.export import contract as C
from caprese.export.attention_graph import explicit_attention
from caprese.export.cats_threshold import CATS_BISECTION_STEPS, percentile_threshold, role_switched_tau
from caprese.export.weights import ONNX_DTYPES, WeightsWriter

__all__ = ["CATS_BISECTION_STEPS", "ExportModel", "GraphBuilder", "build_graphs", "build_shared_graph", "layout_for"]
INT64_MAX = np.iinfo(np.int64).max
GQA_HEAD_MULTIPLE = 16


@dataclasses.dataclass
class ExportModel:
    """What the graph builder needs: the decoder (fp32 weights), the layout, the efficient FFNs by layer."""

    decoder: object  # caprese.model.decoder.Decoder
    layout: C.GraphLayout
    ffns: dict  # layer -> EfficientFFN (GriffinFFN / CatsFFN) for approximated layers
    max_seq_len: int
    cats_quantile: float = 0.5  # 1 - density of CATS layers
    target: str = C.TARGET_TENSORRT  # or C.TARGET_ONNXRUNTIME: the com.microsoft variant (see _Builder.ort)


class GraphBuilder:
    """Nodes with contract names, inline constants, and external initializers from the shared WeightsWriter."""

    def __init__(self, weights: WeightsWriter, float_dtype: str):
        self.weights = weights
        self.fdt = float_dtype
        self.ft = ONNX_DTYPES[float_dtype]
        self.nodes: list[onnx.NodeProto] = []
        self.node_names: set[str] = set()
        self.initializers: dict[str, onnx.TensorProto] = {}
        self._consts: dict[tuple, str] = {}

    def op(self, op_type: str, inputs: list[str], scope: str, name: str, layer: int | None = None,
           out: str | list[str] | None = None, n_out: int = 1, **attrs) -> str | list[str]:
        node = C.node_name(scope, name, layer)
        if node in self.node_names:
            raise ValueError(f"duplicate node name {node}")
        self.node_names.add(node)
        if out is None:
            outs = [f"{node}/output_{j}" for j in range(n_out)]
        else:
            outs = [out] if isinstance(out, str) else list(out)
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=node, **attrs))
        return outs[0] if len(outs) == 1 else outs

    @contextlib.contextmanager
    def subgraph(self):
        """Nodes added inside the block go to the list it yields (an If branch), not to the graph; names stay
        unique across both, constants and weights stay initializers of the graph (outer-scope references)."""
        outer, self.nodes = self.nodes, []
        try:
            yield self.nodes
        finally:
            self.nodes = outer

    def const(self, value, dtype: str) -> str:
        """A small inline initializer (shapes, axes, scalars), deduplicated by value."""
        arr = np.asarray(value, dtype={"float32": np.float32, "int64": np.int64, "float16": np.float16,
                                       "bool": np.bool_}.get(dtype, np.float32))
        key = (dtype, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = f"const.{dtype}.{len(self._consts)}"
            if dtype == "bfloat16":
                t = helper.make_tensor(name, TensorProto.BFLOAT16, arr.shape,
                                       torch.tensor(arr, dtype=torch.float32).to(torch.bfloat16).view(torch.int16)
                                       .numpy().astype(np.uint16).tobytes(), raw=True)
            else:
                t = helper.make_tensor(name, ONNX_DTYPES[dtype], arr.shape, arr.tobytes(), raw=True)
            self.initializers[name] = t
            self._consts[key] = name
        return self._consts[key]

    def fconst(self, value) -> str:
        return self.const(value, self.fdt)

    def weight(self, name: str, t: torch.Tensor, dtype: str | None = None) -> str:
        self.weights.add(name, t, dtype or self.fdt)
        if name not in self.initializers:
            self.initializers[name] = self.weights.initializer(name)
        return name


def _value_info(spec: C.TensorSpec) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(spec.name, ONNX_DTYPES[spec.dtype], list(spec.shape))


class _Builder:
    """One graph (prefill, decode, or the shared TensorRT graph C.TRT_SHARED) of one model."""

    def __init__(self, em: ExportModel, graph: str, weights: WeightsWriter):
        self.em, self.graph, self.lay = em, graph, em.layout
        self.spec = em.decoder.spec
        self.g = GraphBuilder(weights, self.lay.dtype)
        # the shared graph is the prefill graph (any T) with CATS layers switched by decode_flag
        self.shared = graph == C.TRT_SHARED
        self.prefill = graph in (C.PREFILL, C.TRT_SHARED)
        self._group_masks: dict = {}
        # --target onnxruntime: GroupQueryAttention (rotary, cache write in the shared past/present buffer and
        # attention in one kernel) and SkipSimplifiedLayerNormalization (residual add + RMSNorm) from ONNX
        # Runtime's com.microsoft domain. Same I/O contract; batch 1 / no left padding (attention_mask unused).
        self.ort = em.target == C.TARGET_ONNXRUNTIME
        # ONNX Runtime's CPU GroupQueryAttention takes head sizes that are multiples of 16 (every real model's);
        # other head sizes keep the standard Attention + TensorScatter path inside the ort variant.
        self.gqa = self.ort and self.spec.head_dim % GQA_HEAD_MULTIPLE == 0
        self.pending: str | None = None  # ort: the residual branch not yet added to x (SkipSimplified... adds it)

    # ---- small helpers ----
    def linear_t(self, w: torch.Tensor) -> torch.Tensor:
        """nn.Linear weight [out, in] -> math layout [in, out]."""
        return w.detach().t()

    def norm(self, x: str, weight: torch.Tensor, scope: str, layer: int | None, gemma: bool, wname: str,
             name: str = "RMSNormalization") -> str:
        scale = (1.0 + weight.detach().float()) if gemma else weight.detach()
        w = self.g.weight(wname + ("_plus_one" if gemma else ""), scale)
        return self.g.op("RMSNormalization", [x, w], scope, name, layer, epsilon=float(self.spec.rms_norm_eps),
                         axis=-1, stash_type=1)

    def to_float32(self, x: str, scope: str, name: str, layer: int | None = None) -> str:
        if self.lay.dtype == "float32":
            return x
        return self.g.op("Cast", [x], scope, name, layer, to=TensorProto.FLOAT)

    def act(self, x: str, layer: int, name: str) -> str:
        kind = self.spec.activation
        if kind == "silu":
            s = self.g.op("Sigmoid", [x], "mlp", f"{name}_Sigmoid", layer)
            return self.g.op("Mul", [x, s], "mlp", f"{name}_Mul", layer)
        if kind in ("gelu_tanh", "gelu"):
            return self.g.op("Gelu", [x], "mlp", f"{name}_Gelu", layer,
                             approximate="tanh" if kind == "gelu_tanh" else "none")
        raise ValueError(f"activation {kind!r} has no export")

    # ---- graph ----
    def build(self) -> onnx.ModelProto:
        g, spec, dec = self.g, self.spec, self.em.decoder
        if self.shared:
            io = self.lay.tensorrt_io(C.TRT_SHARED, cache_len=None)
            inputs, outputs = io["inputs"], io["outputs"]
        else:
            inputs, outputs = self.lay.inputs(self.graph), self.lay.outputs(self.graph)

        x = g.op("Gather", [g.weight("model.embed_tokens.weight", dec.model.embed_tokens.weight), C.INPUT_IDS],
                 "embed", "Gather", axis=0)
        if spec.gemma_norms:
            x = g.op("Mul", [x, g.fconst(spec.hidden_size ** 0.5)], "embed", "Mul")
        self._rope_tables()
        self._masks()
        for i, layer in enumerate(dec.layers):
            x = self._layer(i, layer, x)
        last_token = (lambda t: t) if not self.prefill else (  # decode: T = 1 already
            lambda t: g.op("Slice", [t, g.const([-1], "int64"), g.const([INT64_MAX], "int64"),
                                     g.const([1], "int64")], "norm", "Slice"))
        if self.pending is not None:  # ort: the last residual add fused into the final norm (all T rows)
            h = last_token(self._skip_norm(x, dec.model.norm.weight, "norm", None, "model.norm.weight")[0])
        else:
            h = self.norm(last_token(x), dec.model.norm.weight, "norm", None, spec.gemma_norms, "model.norm.weight")
        h2 = g.op("Reshape", [h, g.const([-1, spec.hidden_size], "int64")], "lm_head", "Reshape")
        w = g.weight("lm_head.weight" if not spec.tie_word_embeddings else "model.embed_tokens.weight",
                     dec.lm_head.weight)
        logits = g.op("Gemm", [h2, w], "lm_head", "Gemm", transB=1)
        logits = self.to_float32(logits, "lm_head", "Cast")
        if spec.final_softcap is not None:
            cap = g.const(float(spec.final_softcap), "float32")
            logits = g.op("Div", [logits, cap], "lm_head", "softcap_Div")
            logits = g.op("Tanh", [logits], "lm_head", "softcap_Tanh")
            logits = g.op("Mul", [logits, cap], "lm_head", "softcap_Mul")
        g.op("Reshape", [logits, g.const([-1, 1, spec.vocab_size], "int64")], "lm_head", "Reshape_out",
             out=C.LOGITS)

        graph = helper.make_graph(g.nodes, f"caprese_{self.graph}", [_value_info(t) for t in inputs],
                                  [_value_info(t) for t in outputs], list(g.initializers.values()))
        opsets = [helper.make_opsetid("", C.OPSET)] + ([helper.make_opsetid(C.MS_DOMAIN, 1)] if self.ort else [])
        model = helper.make_model(graph, opset_imports=opsets, producer_name="caprese", ir_version=C.IR_VERSION)
        model.doc_string = f"caprese {self.graph} graph, contract format {C.FORMAT_VERSION}"
        return model

    def _rope_tables(self) -> None:
        from caprese.model.rope import rope_table

        spec = self.spec
        cos, sin = rope_table(spec.head_dim, spec.rope_theta, spec.rope_scaling, self.em.max_seq_len)
        half = spec.head_dim // 2
        self.cos = self.g.weight("rope.cos", cos[:, :half])
        self.sin = self.g.weight("rope.sin", sin[:, :half])

    def _masks(self) -> None:
        """Boolean [B, 1, T, S] masks per distinct sliding window (+ the valid-token indicator for statistics);
        with GroupQueryAttention only its seqlens_k / total_sequence_length."""
        g = self.g
        zero, one = g.const(0, "int64"), g.const(1, "int64")
        if self.prefill:
            shape_ids = g.op("Shape", [C.INPUT_IDS], "mask", "Shape_ids")
            t_len = g.op("Gather", [shape_ids, g.const(1, "int64")], "mask", "Gather_seq_len", axis=0)
        else:
            t_len = one  # the decode graph's input_ids are [B, 1] by contract
        self.t_len, self._slots, self._valid = t_len, None, None
        if self.gqa:  # GroupQueryAttention: seqlens_k = slots written so far - 1, total = the longest
            end = g.op("Add", [C.WRITE_INDICES, t_len], "mask", "Add_end")  # [B]
            seqlens = g.op("Sub", [end, one], "mask", "Sub_seqlens")
            self.seqlens_k = g.op("Cast", [seqlens], "mask", "Cast_seqlens", to=TensorProto.INT32)
            total = g.op("ReduceMax", [end], "mask", "ReduceMax_total", keepdims=0)
            self.total_len = g.op("Cast", [total], "mask", "Cast_total", to=TensorProto.INT32)
            return
        shape_kv = g.op("Shape", [C.past_key(0)], "mask", "Shape_cache")
        s_len = g.op("Gather", [shape_kv, g.const(2, "int64")], "mask", "Gather_cache_len", axis=0)
        keys = g.op("Range", [zero, s_len, one], "mask", "Range_keys")  # [S]
        q3 = g.op("Unsqueeze", [self.slots(), g.const([2], "int64")], "mask", "Unsqueeze_slots")  # [B, T, 1]
        causal = g.op("LessOrEqual", [keys, q3], "mask", "LessOrEqual_causal")  # [B, T, S]
        am = g.op("Cast", [C.ATTENTION_MASK], "mask", "Cast_attention_mask", to=TensorProto.BOOL)
        am3 = g.op("Unsqueeze", [am, g.const([1], "int64")], "mask", "Unsqueeze_attention_mask")  # [B, 1, S]
        diag = g.op("Equal", [keys, q3], "mask", "Equal_self")  # a padding query still sees itself
        self.masks = {}
        for w in sorted(set(self.spec.sliding_windows), key=lambda v: -1 if v is None else v):
            tag = "full" if w is None else f"window{w}"
            m = causal
            if w is not None:
                lo = g.op("Sub", [q3, g.const(int(w), "int64")], "mask", f"Sub_{tag}")
                inside = g.op("Greater", [keys, lo], "mask", f"Greater_{tag}")
                m = g.op("And", [m, inside], "mask", f"And_{tag}")
            m = g.op("And", [m, am3], "mask", f"And_pad_{tag}")
            m = g.op("Or", [m, diag], "mask", f"Or_self_{tag}")
            self.masks[w] = g.op("Unsqueeze", [m, g.const([1], "int64")], "mask", f"Unsqueeze_{tag}")

    def slots(self) -> str:
        """[B, T] int64: the cache slot of each new token (built on first use)."""
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

    def _skip_norm(self, x: str, weight: torch.Tensor, scope: str, i: int | None, wname: str) -> tuple[str, str]:
        """ort: (RMSNorm(x + pending), x + pending) in one SkipSimplifiedLayerNormalization; pending consumed."""
        g = self.g
        if self.pending is None:
            return self.norm(x, weight, scope, i, False, wname), x
        w = g.weight(wname, weight.detach())
        node = C.node_name(scope, "SkipSimplifiedLayerNormalization", i)
        h, _, _, total = g.op("SkipSimplifiedLayerNormalization", [self.pending, x, w], scope,
                              "SkipSimplifiedLayerNormalization", i, domain=C.MS_DOMAIN,
                              out=[f"{node}/output_0", "", "", f"{node}/output_3"],
                              epsilon=float(self.spec.rms_norm_eps))
        self.pending = None
        return h, total

    def _layer(self, i: int, layer, x: str) -> str:
        g, spec = self.g, self.spec
        p = f"model.layers.{i}."
        if self.ort and not spec.gemma_norms:
            h, x = self._skip_norm(x, layer.input_layernorm.weight, "input_norm", i, p + "input_layernorm.weight")
            self.pending = self._attention(i, layer.self_attn, h)
            h, x = self._skip_norm(x, layer.post_attention_layernorm.weight, "post_attn_norm", i,
                                   p + "post_attention_layernorm.weight")
            self.pending = self._mlp(i, layer.mlp, h)
            return x
        h = self.norm(x, layer.input_layernorm.weight, "input_norm", i, spec.gemma_norms, p + "input_layernorm.weight")
        y = self._attention(i, layer.self_attn, h)
        if spec.gemma_norms:
            y = self.norm(y, layer.post_attention_layernorm.weight, "post_attn_norm", i, True,
                          p + "post_attention_layernorm.weight")
            x = g.op("Add", [x, y], "residual", "Add_attn", i)
            h = self.norm(x, layer.pre_feedforward_layernorm.weight, "pre_ffn_norm", i, True,
                          p + "pre_feedforward_layernorm.weight")
            f = self._mlp(i, layer.mlp, h)
            f = self.norm(f, layer.post_feedforward_layernorm.weight, "post_ffn_norm", i, True,
                          p + "post_feedforward_layernorm.weight")
            return g.op("Add", [x, f], "residual", "Add_mlp", i)
        x = g.op("Add", [x, y], "residual", "Add_attn", i)
        h = self.norm(x, layer.post_attention_layernorm.weight, "post_attn_norm", i, False,
                      p + "post_attention_layernorm.weight")
        return g.op("Add", [x, self._mlp(i, layer.mlp, h)], "residual", "Add_mlp", i)

    def _proj(self, x: str, lin, i: int, wname: str, opname: str, scope: str = "attn") -> str:
        g = self.g
        y = g.op("MatMul", [x, g.weight(wname + ".weight.t", self.linear_t(lin.weight))], scope, f"MatMul_{opname}", i)
        if lin.bias is not None:
            y = g.op("Add", [y, g.weight(wname + ".bias", lin.bias)], scope, f"Add_{opname}_bias", i)
        return y

    def _attention(self, i: int, attn, h: str) -> str:
        if self.gqa:
            return self._gqa_attention(i, attn, h)
        g, spec = self.g, self.spec
        p = f"model.layers.{i}.self_attn."
        hq, hd = spec.num_heads, spec.head_dim
        heads = dict(zip("qkv", self._qkv(i, attn, h)))
        if spec.qk_norm:
            for name, norm in (("q", attn.q_norm), ("k", attn.k_norm)):
                heads[name] = self.norm(heads[name], norm.weight, "attn", i, False, p + f"{name}_norm.weight",
                                        f"RMSNormalization_{name}")
        for name in "qk":
            heads[name] = g.op("RotaryEmbedding", [heads[name], self.cos, self.sin, C.POSITION_IDS], "attn",
                               f"RotaryEmbedding_{name}", i, interleaved=0)
        k_all = g.op("TensorScatter", [C.past_key(i), heads["k"], C.WRITE_INDICES], "attn", "TensorScatter_k", i,
                     out=C.present_key(i), axis=-2, mode="linear")
        v_all = g.op("TensorScatter", [C.past_value(i), heads["v"], C.WRITE_INDICES], "attn", "TensorScatter_v", i,
                     out=C.present_value(i), axis=-2, mode="linear")
        scale = float(attn.scale)
        if attn.softcap is None and self.lay.dtype == "float32":
            y = g.op("Attention", [heads["q"], k_all, v_all, self.masks[attn.window]], "attn", "Attention", i,
                     scale=scale)
        else:
            y = explicit_attention(g, i, heads["q"], k_all, v_all, self._group_mask(attn.window), spec, scale,
                                   attn.softcap)
        if self.prefill:
            y = g.op("Transpose", [y], "attn", "Transpose_out", i, perm=[0, 2, 1, 3])
        # decode (T = 1): [B, H, 1, hd] and [B, 1, H, hd] are the same bytes, so a Reshape is the transpose
        y = g.op("Reshape", [y, g.const([0, -1, hq * hd] if self.prefill else [0, 1, hq * hd], "int64")], "attn",
                 "Reshape_out", i)
        return self._proj(y, attn.o_proj, i, p + "o_proj", "o")

    def _gqa_attention(self, i: int, attn, h: str) -> str:
        """ort: packed QKV into GroupQueryAttention over the shared past/present buffers (present bound to the
        same memory as past: ONNX Runtime then writes the new K/V in place), rotary inside, o_proj after."""
        g, spec = self.g, self.spec
        p = f"model.layers.{i}.self_attn."
        qkv = self._qkv_matmul(i, attn, h)
        attrs = {"num_heads": spec.num_heads, "kv_num_heads": spec.num_kv_heads, "scale": float(attn.scale),
                 "do_rotary": 1, "rotary_interleaved": 0}
        if attn.window is not None:
            attrs["local_window_size"] = int(attn.window)  # = keys q - w + 1 .. q (parity tests cross w)
        if attn.softcap is not None:
            attrs["softcap"] = float(attn.softcap)
        y = g.op("GroupQueryAttention", [qkv, "", "", C.past_key(i), C.past_value(i), self.seqlens_k, self.total_len,
                                         self.cos, self.sin], "attn", "GroupQueryAttention", i, domain=C.MS_DOMAIN,
                 out=[f"{C.node_name('attn', 'GroupQueryAttention', i)}/output_0", C.present_key(i),
                      C.present_value(i)], **attrs)[0]
        return self._proj(y, attn.o_proj, i, p + "o_proj", "o")

    def _qkv_matmul(self, i: int, attn, h: str) -> str:
        """[B, T, (Hq + 2 Hkv)·hd] = h @ [W_q, W_k, W_v] (+ biases): one read of h, one kernel."""
        g = self.g
        p = f"model.layers.{i}.self_attn."
        lins = (attn.q_proj, attn.k_proj, attn.v_proj)
        w = torch.cat([self.linear_t(lin.weight) for lin in lins], 1)
        y = g.op("MatMul", [h, g.weight(p + "qkv_proj.weight.t", w)], "attn", "MatMul_qkv", i)
        if any(lin.bias is not None for lin in lins):
            b = torch.cat([lin.bias.detach() if lin.bias is not None else torch.zeros(lin.out_features)
                           for lin in lins])
            y = g.op("Add", [y, g.weight(p + "qkv_proj.bias", b)], "attn", "Add_qkv_bias", i)
        return y

    def _qkv(self, i: int, attn, h: str) -> list[str]:
        """q [B, Hq, T, hd], k and v [B, Hkv, T, hd] from ONE MatMul over [W_q, W_k, W_v] (one read of the input,
        one kernel), split along the head axis. Decode (T = 1) needs no Transpose: [B, 1, H·hd] is [B, H, 1, hd]."""
        g, spec = self.g, self.spec
        hq, hkv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
        y = self._qkv_matmul(i, attn, h)
        if self.prefill:
            y = g.op("Reshape", [y, g.const([0, 0, hq + 2 * hkv, hd], "int64")], "attn", "Reshape_qkv", i)
            y = g.op("Transpose", [y], "attn", "Transpose_qkv", i, perm=[0, 2, 1, 3])  # [B, H', T, hd]
        else:
            y = g.op("Reshape", [y, g.const([0, hq + 2 * hkv, 1, hd], "int64")], "attn", "Reshape_qkv", i)
        return g.op("Split", [y, g.const([hq, hkv, hkv], "int64")], "attn", "Split_qkv", i, n_out=3, axis=1)

    def _group_mask(self, window) -> str:
        """The [B, 1, T, S] mask of `window` tiled to [B, 1, g·T, S] for queries folded per KV group."""
        grp = self.spec.gqa_groups
        if grp == 1:
            return self.masks[window]
        if window not in self._group_masks:
            tag = "full" if window is None else f"window{window}"
            self._group_masks[window] = self.g.op("Tile", [self.masks[window], self.g.const([1, 1, grp, 1], "int64")],
                                                  "mask", f"Tile_groups_{tag}")
        return self._group_masks[window]

    # ---- FFN ----
    def _mlp(self, i: int, mlp, x: str) -> str:
        kind = self.lay.layer_kinds[i]
        ffn = self.em.ffns.get(i)
        dense = mlp.dense if ffn is not None else mlp
        if kind == C.GRIFFIN and not self.prefill:
            return self._griffin_decode(i, dense, x)
        if kind == C.DENSE and self.ort:
            return self._gated_unfused(i, dense, x)
        return self._gated(i, dense, x, kind, ffn)

    def _gated_unfused(self, i: int, dense, x: str) -> str:
        """ort, dense layers: gate and up as two MatMuls, no Split: measured ~2% faster per decode step than one
        MatMul + Split on ONNX Runtime's CPU provider (SmolLM2-135M, 2 threads). TensorRT prefers the fused one."""
        g = self.g
        p = f"model.layers.{i}.mlp."

        def proj(lin, name):
            return self._proj(x, lin, i, p + name, name.removesuffix("_proj"), scope="mlp")

        z = g.op("Mul", [self.act(proj(dense.gate_proj, "gate_proj"), i, "act"), proj(dense.up_proj, "up_proj")],
                 "mlp", "Mul_gate_up", i)
        return self._proj(z, dense.down_proj, i, p + "down_proj", "down", scope="mlp")

    def _gated(self, i: int, dense, x: str, kind: str, ffn) -> str:
        """The dense gated FFN from constant weights (+ GRIFFIN statistic / CATS τ in prefill, CATS threshold in
        decode). CATS layers with a bypass store [W_g, W_1, L] and [W_2 ; R] so decode folds it for free."""
        g = self.g
        F = dense.gate_proj.out_features
        names = C.fold_tensors(i, 0, dense.gate_proj.bias is not None)
        bypass = ffn.bypass if (kind == C.CATS and ffn is not None) else None
        r = bypass.rank if bypass is not None else 0
        cols = [self.linear_t(dense.gate_proj.weight), self.linear_t(dense.up_proj.weight)]
        rows = [self.linear_t(dense.down_proj.weight)]
        if r:
            cols.append(bypass.L.detach())
            rows.append(bypass.R.detach())
        w_up_name = names["gate_up"] if not r else f"model.layers.{i}.mlp.gate_up_l_proj.weight.t"
        w_down_name = names["down"] if not r else f"model.layers.{i}.mlp.down_r_proj.weight.t"
        h = g.op("MatMul", [x, g.weight(w_up_name, torch.cat(cols, 1))], "mlp", "MatMul_gate_up", i)
        if dense.gate_proj.bias is not None:
            b = [dense.gate_proj.bias.detach(), dense.up_proj.bias.detach()] + ([torch.zeros(r)] if r else [])
            bname = names["gate_up_bias"] if not r else f"model.layers.{i}.mlp.gate_up_l_proj.bias"
            h = g.op("Add", [h, g.weight(bname, torch.cat(b))], "mlp", "Add_gate_up_bias", i)
        parts = g.op("Split", [h, g.const([F, F] + ([r] if r else []), "int64")], "mlp", "Split", i, n_out=3 if r else 2,
                     axis=-1)
        gate, up = parts[0], parts[1]
        a = self.act(gate, i, "act")
        low = parts[2] if r else None
        if kind == C.CATS:
            a, low = self._cats(i, a, ffn, low)
        z = g.op("Mul", [a, up], "mlp", "Mul_gate_up", i)
        if kind == C.GRIFFIN and self.prefill:
            self._griffin_statistic(i, z)
        if r:
            z = g.op("Concat", [z, low], "mlp", "Concat_bypass", i, axis=-1)
        y = g.op("MatMul", [z, g.weight(w_down_name, torch.cat(rows, 0))], "mlp", "MatMul_down", i)
        if dense.down_proj.bias is not None:
            y = g.op("Add", [y, g.weight(f"model.layers.{i}.mlp.down_proj.bias", dense.down_proj.bias)], "mlp",
                     "Add_down_bias", i)
        return y

    def _griffin_decode(self, i: int, dense, x: str) -> str:
        g, k, r = self.g, self.lay.k, self.lay.rank
        h = g.op("MatMul", [x, C.w_gul(i)], "mlp", "MatMul_gate_up_l", i)  # [B, 1, D] @ [B, D, 2k + r]
        if self.lay.mlp_bias:
            b = g.op("Unsqueeze", [C.b_gul(i), g.const([1], "int64")], "mlp", "Unsqueeze_bias", i)
            h = g.op("Add", [h, b], "mlp", "Add_gate_up_bias", i)
        parts = g.op("Split", [h, g.const([k, k] + ([r] if r else []), "int64")], "mlp", "Split", i,
                     n_out=3 if r else 2, axis=-1)
        z = g.op("Mul", [self.act(parts[0], i, "act"), parts[1]], "mlp", "Mul_gate_up", i)
        if r:
            z = g.op("Concat", [z, parts[2]], "mlp", "Concat_bypass", i, axis=-1)  # [act(x Ŵ_g)·x Ŵ_1, x L]
        y = g.op("MatMul", [z, C.w_dr(i)], "mlp", "MatMul_down_r", i)  # @ [Ŵ_2 ; R]
        if dense.down_proj.bias is not None:
            y = g.op("Add", [y, g.weight(f"model.layers.{i}.mlp.down_proj.bias", dense.down_proj.bias)], "mlp",
                     "Add_down_bias", i)
        return y

    def _griffin_statistic(self, i: int, z: str) -> None:
        """griffin_stat.i = Σ_t valid_t · (z_t / max(‖z_t‖, 1e-12))², float32 (caprese griffin_statistic_sq)."""
        g = self.g
        vf, _, _ = self.valid()
        zf = self.to_float32(z, "mlp", "Cast_stat", i)
        ss = g.op("ReduceSumSquare", [zf, g.const([-1], "int64")], "mlp", "ReduceSumSquare_stat", i, keepdims=1)
        n = g.op("Sqrt", [ss], "mlp", "Sqrt_stat", i)
        n = g.op("Max", [n, g.const(1e-12, "float32")], "mlp", "Max_stat", i)
        zn = g.op("Div", [zf, n], "mlp", "Div_stat", i)
        sq = g.op("Mul", [zn, zn], "mlp", "Mul_stat_sq", i)
        sq = g.op("Mul", [sq, vf], "mlp", "Mul_stat_valid", i)
        g.op("ReduceSum", [sq, g.const([1], "int64")], "mlp", "ReduceSum_stat", i, out=C.griffin_stat(i), keepdims=0)

    def _cats(self, i: int, a: str, ffn, low: str | None) -> tuple[str, str | None]:
        """CATS: (activation, bypass columns) as the FFN uses them. Prefill: dense, bypass off, cats_tau.i out.
        Decode: |a| > cats_tau.i kept, bypass on. Shared graph: both, chosen by decode_flag as data (τ = -1 keeps
        every activation, a 0/1 gate switches the bypass), and the τ search inside an If so decode skips it."""
        g = self.g
        axes = g.const([1, 2], "int64")
        if self.prefill and not self.shared:
            absa = self.to_float32(g.op("Abs", [a], "mlp", "tau_Abs", i), "mlp", "tau_Cast", i)
            _, vb, nvalid = self.valid()
            percentile_threshold(g, i, absa, vb, nvalid, self.lay.intermediate_size, ffn.density, out=C.cats_tau(i))
            off = None if low is None else g.op("Mul", [low, g.fconst(0.0)], "mlp", "Mul_bypass_off", i)
            return a, off
        absa = self.to_float32(g.op("Abs", [a], "mlp", "Abs", i), "mlp", "Cast_abs", i)
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
        _, vb, nvalid = self.valid()  # built in the graph, before the If's branches read it
        role_switched_tau(g, i, absa, vb, nvalid, self.lay.intermediate_size, ffn.density)
        return kept, low


def build_graphs(em: ExportModel, weights: WeightsWriter) -> dict[str, onnx.ModelProto]:
    """{"prefill": ModelProto, "decode": ModelProto}, both pointing at the tensors written to `weights`."""
    return {graph: _Builder(em, graph, weights).build() for graph in C.GRAPHS}


def build_shared_graph(em: ExportModel, weights: WeightsWriter) -> onnx.ModelProto:
    """The graph one TensorRT engine runs in both roles (layouts without GRIFFIN layers; symbolic cache length,
    see contract.GraphLayout.tensorrt_io). With no CATS layer it is the prefill graph itself."""
    if not em.layout.shares_engine:
        raise ValueError("GRIFFIN layouts have no shared graph (their decode graph takes per-prompt weights)")
    return _Builder(em, C.TRT_SHARED if em.layout.layers_of(C.CATS) else C.PREFILL, weights).build()


def layout_for(decoder, precision: str, ffns: dict) -> C.GraphLayout:
    """The GraphLayout of a decoder with efficient FFNs `ffns` (layer -> GriffinFFN / CatsFFN)."""
    spec = decoder.spec
    kinds, ks, ranks = [], set(), set()
    for i in range(spec.num_layers):
        f = ffns.get(i)
        if f is None:
            kinds.append(C.DENSE)
            continue
        if f.method not in (C.GRIFFIN, C.CATS):
            raise ValueError(f"method {f.method!r} has no export")
        kinds.append(f.method)
        if f.method == C.GRIFFIN:
            ks.add(f.k)
        ranks.add(f.bypass.rank if f.bypass is not None else 0)
    if len(ks) > 1 or len(ranks) > 1:
        raise ValueError("every approximated layer must share one density and one bypass rank")
    return C.GraphLayout(spec.num_layers, spec.hidden_size, spec.intermediate_size, spec.num_kv_heads, spec.head_dim,
                         spec.vocab_size, precision, tuple(kinds), k=ks.pop() if ks else 0,
                         rank=ranks.pop() if ranks else 0, mlp_bias=spec.mlp_bias)
