"""The reference decoder: Llama / Mistral / Qwen2 / Qwen3 / Gemma 2 over a static KV cache, in plain PyTorch.

Parameter names match the Hugging Face checkpoints (model.layers.N.self_attn.q_proj.weight, ...) so weights
load without renaming. `forward(tokens, start)` runs T new tokens at cache slots start..start+T-1: prefill is
start = 0, a decode step is T = 1. Left padding (batch > 1) is expressed by `pad`: sequence b's real tokens
start at slot pad[b], so its positions are slot - pad[b].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from caprese.model.ffn import DenseFFN, FFNContext
from caprese.model.kv_cache import StaticKVCache
from caprese.model.rope import apply_rope, rope_table
from caprese.model.spec import ModelSpec


class RMSNorm(nn.Module):
    """Llama: w * norm(x).to(dtype). Gemma: (norm(x) * (1 + w)).to(dtype), all in float32."""

    def __init__(self, dim: int, eps: float, gemma: bool = False):
        super().__init__()
        self.eps, self.gemma = eps, gemma
        self.weight = nn.Parameter(torch.zeros(dim) if gemma else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.gemma:
            return (xf * (1.0 + self.weight.float())).type_as(x)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, window: int | None):
        super().__init__()
        d, hd = spec.hidden_size, spec.head_dim
        self.n_heads, self.n_kv, self.head_dim, self.window = spec.num_heads, spec.num_kv_heads, hd, window
        self.scale = spec.attn_scale if spec.attn_scale is not None else hd**-0.5
        self.softcap = spec.attn_softcap
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv * hd, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv * hd, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=spec.o_bias)
        if spec.qk_norm:
            self.q_norm = RMSNorm(hd, spec.rms_norm_eps)
            self.k_norm = RMSNorm(hd, spec.rms_norm_eps)
        self.cache: StaticKVCache | None = None

    def forward(self, x, cos, sin, start: int, mask: torch.Tensor | None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)
        k = apply_rope(k.transpose(1, 2), cos, sin)
        k, v = self.cache.update(start, k, v)
        y = self._attend(q, k, v, mask, causal_prefill=isinstance(start, int) and start == 0 and mask is None and t > 1)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))

    def _attend(self, q, k, v, mask, causal_prefill: bool) -> torch.Tensor:
        b, h, t, d = q.shape
        g = self.n_heads // self.n_kv
        if self.softcap is not None:  # Gemma 2: scores soft-capped before the mask, softmax in float32
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
            scores = torch.matmul(q, k.transpose(2, 3)) * self.scale
            scores = torch.tanh(scores / self.softcap) * self.softcap
            if mask is None and causal_prefill:
                mask = torch.ones(t, k.shape[2], dtype=torch.bool, device=q.device).tril()
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)
        if t == 1 and mask is None and g > 1:
            # One query per head: fold the GQA group into the query axis, so K/V are never repeated.
            y = F.scaled_dot_product_attention(q.view(b, self.n_kv, g, d), k, v, scale=self.scale)
            return y.view(b, h, 1, d)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal_prefill,
                                              scale=self.scale, enable_gqa=g > 1)


class Block(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int):
        super().__init__()
        eps, gemma = spec.rms_norm_eps, spec.gemma_norms
        self.self_attn = Attention(spec, spec.sliding_windows[layer])
        self.mlp: nn.Module = DenseFFN(spec.hidden_size, spec.intermediate_size, spec.activation, spec.mlp_bias)
        self.input_layernorm = RMSNorm(spec.hidden_size, eps, gemma)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, eps, gemma)
        if gemma:  # post_attention_layernorm normalises the attention output; these wrap the FFN
            self.pre_feedforward_layernorm = RMSNorm(spec.hidden_size, eps, gemma)
            self.post_feedforward_layernorm = RMSNorm(spec.hidden_size, eps, gemma)
        self.gemma = gemma

    def forward(self, x, cos, sin, start, mask, ctx: FFNContext):
        h = self.self_attn(self.input_layernorm(x), cos, sin, start, mask)
        if self.gemma:
            x = x + self.post_attention_layernorm(h)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x), ctx))
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x), ctx)


class Backbone(nn.Module):
    """Holds the HF `model.*` parameters: embed_tokens, layers, norm."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(Block(spec, i) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, spec.gemma_norms)


class Decoder(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.model = Backbone(spec)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.max_len = 0

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    def setup_caches(self, batch: int, max_len: int) -> None:
        """Allocate every layer's KV buffers once, at max_len slots, with the weights' dtype and device."""
        w = self.model.embed_tokens.weight
        for layer in self.layers:
            layer.self_attn.cache = StaticKVCache(batch, self.spec.num_kv_heads, max_len, self.spec.head_dim,
                                                  w.dtype, w.device)
        cos, sin = rope_table(self.spec.head_dim, self.spec.rope_theta, self.spec.rope_scaling, max_len)
        self.rope_cos, self.rope_sin = cos.to(w.device), sin.to(w.device)
        self.slots = torch.arange(max_len, device=w.device)
        self.max_len, self.batch = max_len, batch

    def hidden_states(self, tokens: torch.Tensor, start: int, pad: torch.Tensor | None = None,
                      phase: str | None = None) -> torch.Tensor:
        """Final-normed hidden states [B, T, D] for tokens [B, T] written at slots start.. of the cache.

        phase: "prefill" or "decode" for the FFNs (default: prefill when T > 1, else decode).
        """
        return self.model.norm(self.blocks(self.embed(tokens), start, 0, len(self.layers), pad, phase))

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The residual stream entering layer 0 for tokens [B, T]."""
        x = self.model.embed_tokens(tokens)
        if self.spec.gemma_norms:
            x = x * torch.tensor(self.spec.hidden_size**0.5, dtype=x.dtype)
        return x

    def blocks(self, x: torch.Tensor, start: int, lo: int, hi: int, pad: torch.Tensor | None = None,
               phase: str | None = None) -> torch.Tensor:
        """Layers lo..hi-1 on the residual stream x [B, T, D] of the tokens at slots start.. (their K/V written
        there). Layer-by-layer calibration runs one block at a time over stored states with it."""
        b, t = x.shape[:2]
        end = start + t
        if end > self.max_len:
            raise ValueError(f"sequence of {end} tokens exceeds the KV cache ({self.max_len}); call setup_caches")
        slots = torch.arange(start, end, device=x.device)
        pos = slots[None] if pad is None else (slots[None] - pad[:, None]).clamp(min=0)
        cos = self.rope_cos[pos].to(x.dtype)[:, None]
        sin = self.rope_sin[pos].to(x.dtype)[:, None]
        masks = {w: self._mask(start, end, w, pad) for w in set(self.spec.sliding_windows)}
        valid = None if pad is None else slots[None] >= pad[:, None]
        ctx = FFNContext(phase or ("prefill" if t > 1 else "decode"), start, valid)
        for layer in self.layers[lo:hi]:
            x = layer(x, cos, sin, start, masks[layer.self_attn.window], ctx)
        return x

    def decode_static(self, tokens: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """Logits [B, 1, V] of one decode step at cache slot `slot` (a [1] long tensor), attending over the whole
        cache through a mask. No Python int reaches a kernel, so shapes and addresses stay fixed from step to
        step: the step a CUDA graph captures (or torch.compile compiles) once per cache size. No left padding."""
        x = self.model.embed_tokens(tokens)
        if self.spec.gemma_norms:
            x = x * torch.tensor(self.spec.hidden_size**0.5, dtype=x.dtype)
        pos = slot[None]  # [1, 1]
        cos = self.rope_cos[pos].to(x.dtype)[:, None]
        sin = self.rope_sin[pos].to(x.dtype)[:, None]
        masks = {}
        for w in set(self.spec.sliding_windows):
            m = self.slots <= slot
            if w is not None:
                m = m & (self.slots > slot - w)
            masks[w] = m[None, None, None]  # [1, 1, 1, S]
        ctx = FFNContext("decode", -1)
        for layer in self.layers:
            x = layer(x, cos, sin, slot, masks[layer.self_attn.window], ctx)
        return self.logits(self.model.norm(x))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.lm_head(hidden)
        if self.spec.final_softcap is not None:
            out = torch.tanh(out / self.spec.final_softcap) * self.spec.final_softcap
        return out

    def forward(self, tokens: torch.Tensor, start: int, pad: torch.Tensor | None = None,
                last_only: bool = False, phase: str | None = None) -> torch.Tensor:
        h = self.hidden_states(tokens, start, pad, phase)
        return self.logits(h[:, -1:] if last_only else h)

    def _mask(self, start: int, end: int, window: int | None, pad: torch.Tensor | None):
        """Boolean [B or 1, 1, T, end] mask (True = attend), or None when plain causal attention is exact."""
        span_limited = window is not None and end > window
        if pad is None and not span_limited and (end - start == 1 or start == 0):
            return None  # one query over the whole valid prefix, or causal prefill from slot 0
        dev = self.rope_cos.device
        q = torch.arange(start, end, device=dev)[:, None]
        k = torch.arange(end, device=dev)[None, :]
        mask = k <= q
        if window is not None:
            mask = mask & (k > q - window)
        mask = mask[None, None]
        if pad is not None:  # hide pad slots; a pad query still sees itself so its softmax stays finite
            mask = (mask & (k >= pad[:, None, None, None])) | (k == q)
        return mask
