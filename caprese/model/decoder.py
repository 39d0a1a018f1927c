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
        causal = isinstance(start, int) and start == 0 and mask is None and t > 1
        return self.o_proj(grouped_attention(q, k, v, mask, causal, self.scale, self.softcap))


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
                      scale: float, softcap: float | None = None, fold: bool | None = None) -> torch.Tensor:
    """softmax(q·kᵀ·scale [soft-capped] + mask)·v for GQA, with K/V never repeated: [B, T, Hq·D].

    q [B, Hq, T, D]; k, v [B, Hkv, S, D] (cache views, read in place); mask bool [B|1, 1, T, S] (True = attend) or
    None, with `causal` = plain causal attention from slot 0 (T = S). Query head h uses KV head h // g (g = Hq/Hkv,
    as transformers' repeat_kv). Each group's g query heads are folded into the query length: q becomes
    [B, Hkv, g·T, D] (row j·T + t = head j of the group, token t), so K/V and Q have equal head counts and no
    `enable_gqa` is needed; a mask broadcasts over the folded rows ([B|1, 1, 1, S] as it is for T = 1).

    Why, from torch 2.13's CUDA SDPA dispatch (aten/.../cuda/sdp_utils.cpp, sdp_utils_cpp.h, the SDPA docstring):
    - flash: no attn_mask at all; GQA (enable_gqa) yes; fp16/bf16 only; head_dim <= 256; is_causal needs T = S.
    - memory-efficient: any bool/float mask (broadcastable to [B, H, L, S], last dim stride 1 on GPU; torch pads
      it to 16 columns itself); no GQA: Hq == Hkv required (its docstring: GQA "works only for Flash_attention
      and math"); fp32/fp16/bf16; head_dim a multiple of 8 (16-bit) or 4 (fp32 on sm80+); q/k/v last dim stride 1.
    - cuDNN: masks yes; fp16/bf16 only, sm80+; head_dim a multiple of 8 and <= 128 (256 on sm90 with a recent
      cuDNN); key length S != 1.
    - `scale` (keyword only) is honoured by every backend; math is the fallback for everything else.
    So "mask + enable_gqa" (every masked or static decode step) could only run on math, which repeats K/V and
    materializes [B, Hq, T, S] scores. Folded, the same call meets efficient/cuDNN. Unmasked causal prefill
    keeps enable_gqa + is_causal, which flash (and torch's CPU flash kernel) run natively without a mask.
    Gemma 2's soft-cap (tanh before the mask) is no SDPA option: explicit matmuls on the same folded layout,
    softmax in float32 as transformers' eager path.
    `fold` (SDPA path): None folds decode (T = 1) everywhere and masked prefill off the CPU. torch's CPU flash
    kernel takes mask + enable_gqa natively, and there a folded T > 1 call (mask copied g times) measured up to
    ~10 % slower at T = 512; a folded T = 1 call is as fast (fp32) or faster (bf16: 6x with a mask).
    """
    b, h, t, d = q.shape
    hkv = k.shape[1]
    g = h // hkv
    if fold is None:
        fold = t == 1 or q.device.type != "cpu"
    if softcap is None and (g == 1 or causal or not fold):
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, attn_mask=mask, scale=scale, enable_gqa=g > 1)
        return y.transpose(1, 2).reshape(b, t, h * d)
    qf = q.reshape(b, hkv, g * t, d)  # a view for T = 1; for T > 1 at most one copy of q (never of K/V)
    if causal:
        mask = torch.ones(t, k.shape[2], dtype=torch.bool, device=q.device).tril()[None, None]
    if softcap is None:
        if mask is not None and t > 1:  # [B|1, 1, T, S] -> [B|1, 1, g·T, S] in the folded row order
            mask = mask.unsqueeze(2).expand(-1, -1, g, -1, -1).reshape(mask.shape[0], 1, g * t, mask.shape[-1])
        y = F.scaled_dot_product_attention(qf, k, v, attn_mask=mask, scale=scale)
    else:
        scores = torch.matmul(qf, k.transpose(2, 3)) * scale  # [B, Hkv, g·T, S]: one bmm per KV head
        scores = torch.tanh(scores / softcap) * softcap
        if mask is not None:
            scores = scores.view(b, hkv, g, t, -1).masked_fill(~mask.unsqueeze(2), float("-inf")).view_as(scores)
        y = torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)
    return y.view(b, hkv, g, t, d).permute(0, 3, 1, 2, 4).reshape(b, t, h * d)


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
