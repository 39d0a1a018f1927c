"""caprese.model's reference decoder against transformers' own implementation of the same checkpoint.

The reference is always Hugging Face: AutoModelForCausalLM loaded from the same tiny random folder (default
attention implementation, except Gemma 2 which needs `eager` for its soft-capped scores). Each parity test prints
its max |diff| (run with -s to see them).

Tolerances, per precision, on logits whose magnitude is ~5 (see tiny_models.INIT_STD):
  fp32: atol 1e-4. Both sides do the same math, so the only differences are summation order inside matmul/SDPA
        kernels (~1e-6 relative, a few 1e-6 absolute here). Any real bug (mask, RoPE, bias, norm, soft-cap, GQA
        indexing) moves logits by >1e-2, two orders of magnitude above the tolerance.
  fp16 / bf16, against HF run in the same dtype on the CPU:
    prefill: exact. Both sides run the same torch ops on the same shapes in the same order, so every logit is
        bit for bit equal (measured: 0 for every tiny model). Any change of where a value is rounded shows:
        casting on the wrong side of the RMSNorm weight multiply moves prefill logits by 8e-3..1.7e-1 (bf16) and
        8e-3..1.6e-2 (fp16).
    decode: two ulps of the logit scale (|logit| < 8): bf16 2 * 2^-5 = 0.0625, fp16 2 * 2^-8 = 0.0078. Our step
        attends over the static cache's slots (the unused ones masked) where HF attends over exactly its filled
        (or sliding-window) length: the same sums blocked differently, so some logits round one way or the
        other. Measured max |diff| over 40 steps: bf16 0.039 (mistral), 0.031 (qwen2), 0 elsewhere; fp16 0.0059
        (mistral), 0.0056 (qwen3), 0.0039 (qwen2), 0.0020 (llama3), 0 elsewhere.
  Free-running greedy in low precision can legitimately fork at a near-tie, so there the logits are compared step
  by step under teacher forcing of HF's tokens, and argmaxes only where HF's top-2 gap is clearly larger than the
  decode tolerance.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import pytest
import torch

from caprese.model import Decoder, load_decoder, load_spec
from caprese.model.generation import decode_one_token, generate
from caprese.model.sampling import Sampling, sample
from tiny_models import CONFIGS, KINDS, SLIDING_KINDS, corpus_text, hf_attn_implementation

ATOL = {torch.float32: 1e-4, torch.float16: 2 * 2.0**-8, torch.bfloat16: 2 * 2.0**-5}  # decode; see above
PREFILL_ATOL = {torch.float32: 1e-4, torch.float16: 0.0, torch.bfloat16: 0.0}  # low precision: bit for bit
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
N_STEPS = 40  # decode steps checked per test (>= 32)
PROMPT_LEN = 20  # > the sliding window (8) and > llama3's original context (16): both cut in during prefill


@functools.lru_cache(maxsize=None)
def _prompt_ids() -> tuple[int, ...]:
    """Token ids of the tokenizer-encoded corpus; prompts are slices of it (BOS first)."""
    from tiny_models import build_tokenizer

    return tuple(build_tokenizer()(corpus_text())["input_ids"])


def prompt(n: int, offset: int = 0) -> list[int]:
    ids = _prompt_ids()
    return list(ids[offset:offset + n])


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    """hf_model(kind, dtype) -> transformers model in eval mode, loaded once per module."""
    from transformers import AutoModelForCausalLM

    cache = {}

    def get(kind: str, dtype: torch.dtype = torch.float32):
        if (kind, dtype) not in cache:
            m = AutoModelForCausalLM.from_pretrained(tiny_model_dir(kind), dtype=dtype,
                                                     attn_implementation=hf_attn_implementation(kind))
            m.eval().requires_grad_(False)
            m.generation_config.eos_token_id = None  # never stop early: parity is checked on every step
            cache[kind, dtype] = m
        return cache[kind, dtype]

    return get


def ours(folder, dtype=torch.float32, spec=None) -> Decoder:
    return load_decoder(folder, dtype, spec=spec)


@torch.no_grad()
def hf_stepwise_logits(hf, ids: list[int], prompt_len: int) -> torch.Tensor:
    """HF logits [len(ids), V] (float32): one prefill of ids[:prompt_len], then one cached step per later token."""
    out = hf(input_ids=torch.tensor([ids[:prompt_len]]), use_cache=True)
    rows, past = [out.logits[0].float()], out.past_key_values
    for i in range(prompt_len, len(ids)):
        out = hf(input_ids=torch.tensor([[ids[i]]]), past_key_values=past, use_cache=True)
        rows.append(out.logits[0].float())
        past = out.past_key_values
    return torch.cat(rows)


@torch.no_grad()
def hf_full_logits(hf, ids: list[int]) -> torch.Tensor:
    return hf(input_ids=torch.tensor([ids])).logits[0].float()


@torch.no_grad()
def our_stepwise_logits(model: Decoder, ids: list[int], prompt_len: int) -> torch.Tensor:
    """Our logits [len(ids), V]: model(prompt, 0) then decode_one_token(ids[i], slot i) for each later token."""
    model.setup_caches(1, len(ids))
    rows = [model(torch.tensor([ids[:prompt_len]]), 0)[0].float()]
    for i in range(prompt_len, len(ids)):
        rows.append(decode_one_token(model, torch.tensor([[ids[i]]]), i).float())
    return torch.cat(rows)


@torch.no_grad()
def hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0)
    new = out[0, len(ids):].tolist()
    assert len(new) == n, "HF stopped early: eos must be disabled for a parity run"
    return new


def report(what: str, diff: float, tol: float) -> None:
    print(f"[parity] {what}: max|diff| = {diff:.3e} (tol {tol:.1e})")


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


# --------------------------------------------------------------------------------------------------------------
# fp32: prefill + every decode step, and free-running greedy, for every architecture.


def test_prefill_and_decode_logits_fp32(model_kind_dir, hf_model):
    kind, folder = model_kind_dir
    hf = hf_model(kind)
    ids = prompt(PROMPT_LEN)
    ids = ids + hf_greedy(hf, ids, N_STEPS)  # decode along HF's own greedy path
    ref = hf_stepwise_logits(hf, ids, PROMPT_LEN)
    got = our_stepwise_logits(ours(folder), ids, PROMPT_LEN)
    d_prefill = max_diff(got[:PROMPT_LEN], ref[:PROMPT_LEN])
    d_decode = max_diff(got[PROMPT_LEN:], ref[PROMPT_LEN:])
    report(f"{kind} fp32 prefill ({PROMPT_LEN} tokens)", d_prefill, ATOL[torch.float32])
    report(f"{kind} fp32 decode ({N_STEPS} steps)", d_decode, ATOL[torch.float32])
    assert d_prefill <= ATOL[torch.float32]
    assert d_decode <= ATOL[torch.float32]
    # HF's cached path agrees with its own one-shot forward: the reference itself is consistent.
    assert max_diff(ref, hf_full_logits(hf, ids)) <= ATOL[torch.float32]


def test_greedy_generate_matches_hf_fp32(model_kind_dir, hf_model):
    kind, folder = model_kind_dir
    ids = prompt(PROMPT_LEN, offset=5)
    want = hf_greedy(hf_model(kind), ids, N_STEPS)
    streamed: list[int] = []
    res = generate(ours(folder), ids, N_STEPS, Sampling(), eos_ids=(), on_token=streamed.append)
    n_same = next((i for i, (a, b) in enumerate(zip(res.tokens[0], want)) if a != b), len(want))
    print(f"[parity] {kind} fp32 greedy: {n_same}/{N_STEPS} tokens identical")
    assert res.tokens[0] == want
    assert streamed == want
    assert res.stop_reason == ["length"] and res.stats.tokens_generated == N_STEPS


def _first_fresh(tokens: list[int], start: int) -> int:
    """Index >= start of a token that does not occur earlier in `tokens` (so stopping on it is unambiguous)."""
    return next(i for i in range(start, len(tokens)) if tokens[i] not in tokens[:i])


def test_stops_on_eos_like_hf(hf_model, tiny_model_dir):
    """With a stop id that the greedy path hits, both stop at the same step; ours drops the stop token."""
    kind = "mistral"
    hf, folder = hf_model(kind), tiny_model_dir(kind)
    ids = prompt(PROMPT_LEN, offset=2)
    free = hf_greedy(hf, ids, N_STEPS)
    stop_at = _first_fresh(free, 6)
    eos = free[stop_at]
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=N_STEPS, eos_token_id=[eos, 999],
                          pad_token_id=0)
    hf_new = out[0, len(ids):].tolist()
    assert hf_new[-1] == eos and len(hf_new) == stop_at + 1
    streamed: list[int] = []
    res = generate(ours(folder), ids, N_STEPS, Sampling(), eos_ids=(eos, 999), on_token=streamed.append)
    assert res.tokens == [hf_new[:-1]] and streamed == hf_new[:-1]
    assert res.stop_reason == ["eos"] and res.stats.tokens_generated == stop_at + 1


def test_batch_stops_on_eos_like_hf(hf_model, tiny_model_dir):
    """Batch: each row stops at its own EOS (HF pads finished rows, ours cuts them); the rest runs to length."""
    kind = "qwen3"
    hf, folder = hf_model(kind), tiny_model_dir(kind)
    prompts = [prompt(14, 60), prompt(9, 90)]
    free = [hf_greedy(hf, p, N_STEPS) for p in prompts]
    eos = free[0][_first_fresh(free[0], 4)]
    left = [[0] * (14 - len(p)) + p for p in prompts]
    mask = torch.tensor([[0] * (14 - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(torch.tensor(left), attention_mask=mask, do_sample=False, max_new_tokens=N_STEPS,
                          eos_token_id=eos, pad_token_id=0)[:, 14:].tolist()
    want, reasons = [], []
    for row in out:
        cut = row.index(eos) if eos in row else None
        want.append(row if cut is None else row[:cut])
        reasons.append("length" if cut is None else "eos")
    res = generate(ours(folder), prompts, N_STEPS, Sampling(), eos_ids=(eos,))
    print(f"[parity] {kind} batch eos={eos}: HF rows {[len(w) for w in want]} {reasons}, ours "
          f"{[len(t) for t in res.tokens]} {res.stop_reason}")
    assert res.tokens == want and res.stop_reason == reasons
    assert reasons[0] == "eos"


def test_reused_model_and_cache_match_fresh_runs(hf_model, tiny_model_dir):
    """generate() reuses a big-enough KV cache: stale slots from a longer earlier run must never leak in."""
    kind = "gemma2"
    hf, folder = hf_model(kind), tiny_model_dir(kind)
    model = ours(folder)
    long_ids, short_ids = prompt(50, 400), prompt(9, 500)
    assert generate(model, long_ids, N_STEPS, Sampling(), eos_ids=()).tokens[0] == hf_greedy(hf, long_ids, N_STEPS)
    max_len = model.max_len
    assert generate(model, short_ids, 33, Sampling(), eos_ids=()).tokens[0] == hf_greedy(hf, short_ids, 33)
    assert model.max_len == max_len  # the cache really was reused, not reallocated
    batch = [short_ids, long_ids[:20]]
    got = generate(model, batch, 32, Sampling(), eos_ids=()).tokens
    assert got == [generate(ours(folder), p, 32, Sampling(), eos_ids=()).tokens[0] for p in batch]


# --------------------------------------------------------------------------------------------------------------
# fp16 / bf16: logits per step against HF in the same dtype, teacher-forced along HF's tokens.


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_logits_teacher_forced(model_kind_dir, hf_model, dtype):
    kind, folder = model_kind_dir
    hf = hf_model(kind, dtype)
    ids = prompt(PROMPT_LEN, offset=11)
    ids = ids + hf_greedy(hf, ids, N_STEPS)
    ref = hf_stepwise_logits(hf, ids, PROMPT_LEN)
    model = ours(folder, dtype)
    assert model.lm_head.weight.dtype == dtype
    got = our_stepwise_logits(model, ids, PROMPT_LEN)
    tol, tol_prefill = ATOL[dtype], PREFILL_ATOL[dtype]
    d_prefill, d_decode = max_diff(got[:PROMPT_LEN], ref[:PROMPT_LEN]), max_diff(got[PROMPT_LEN:], ref[PROMPT_LEN:])
    report(f"{kind} {DTYPE_NAMES[dtype]} prefill", d_prefill, tol_prefill)
    report(f"{kind} {DTYPE_NAMES[dtype]} decode ({N_STEPS} steps)", d_decode, tol)
    assert d_prefill <= tol_prefill, f"{kind} {DTYPE_NAMES[dtype]} prefill is not bit for bit HF's: {d_prefill:.3e}"
    assert d_decode <= tol, f"{kind} {DTYPE_NAMES[dtype]} decode max |diff| {d_decode:.3e} > {tol:.3e}"
    # Argmax agreement wherever HF's choice is not within 2*tol of a tie.
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * tol
    assert clear.sum() >= len(ids) // 4, "too few clear-cut positions for the argmax check to mean anything"
    assert torch.equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])


# --------------------------------------------------------------------------------------------------------------
# Batch with left padding.


def test_batch_left_padding_matches_hf_fp32(model_kind_dir, hf_model):
    kind, folder = model_kind_dir
    hf = hf_model(kind)
    prompts = [prompt(21, 0), prompt(12, 40), prompt(5, 80), prompt(17, 120)]
    longest = max(map(len, prompts))
    pad_id = 0
    input_ids = torch.tensor([[pad_id] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(input_ids, attention_mask=mask, do_sample=False, max_new_tokens=N_STEPS,
                          eos_token_id=None, pad_token_id=pad_id)
    want = out[:, longest:].tolist()
    model = ours(folder)
    res = generate(model, prompts, N_STEPS, Sampling(), eos_ids=())
    for b, (got_b, want_b) in enumerate(zip(res.tokens, want)):
        n_same = next((i for i, (x, y) in enumerate(zip(got_b, want_b)) if x != y), len(want_b))
        print(f"[parity] {kind} fp32 batch row {b} (prompt {len(prompts[b])}, pad {longest - len(prompts[b])}): "
              f"{n_same}/{N_STEPS} greedy tokens identical")
    assert res.tokens == want
    # Padding must not change any sequence: each row equals its own unpadded batch-1 run.
    for p, got_b in zip(prompts, res.tokens):
        assert generate(ours(folder), p, N_STEPS, Sampling(), eos_ids=()).tokens[0] == got_b


def test_batch_left_padding_logits_fp32(hf_model, tiny_model_dir):
    """Logits (not just argmaxes) of a left-padded batch prefill + decode steps vs HF with attention_mask."""
    kind = "gemma2"  # the hardest case: soft-capped eager attention, alternating sliding window, padding
    folder = tiny_model_dir(kind)
    hf = hf_model(kind)
    prompts = [prompt(19, 3), prompt(6, 50)]
    longest, steps = 19, 12
    pads = torch.tensor([longest - len(p) for p in prompts])
    toks = torch.tensor([[0] * int(n) + p for n, p in zip(pads, prompts)])
    cont = torch.tensor([prompt(steps, 200), prompt(steps, 300)])  # teacher-forced continuation per row
    full = torch.cat([toks, cont], 1)
    mask = (torch.arange(full.shape[1])[None] >= pads[:, None]).long()
    with torch.no_grad():
        ref = hf(input_ids=full, attention_mask=mask).logits.float()
        model = ours(folder)
        model.setup_caches(2, full.shape[1])
        rows = [model(toks, 0, pads).float()]
        for i in range(steps):
            rows.append(model(cont[:, i:i + 1], longest + i, pads).float())
        got = torch.cat(rows, 1)
    real = mask.bool()  # pad positions' logits are meaningless on both sides
    d = max_diff(got[real], ref[real])
    report(f"{kind} fp32 left-padded batch logits", d, ATOL[torch.float32])
    assert d <= ATOL[torch.float32]


# --------------------------------------------------------------------------------------------------------------
# Long prompts: past the sliding window (mistral, qwen2, gemma2) and past llama3's original context.


@pytest.mark.parametrize("kind", [*SLIDING_KINDS, "llama3"])
def test_long_prompt_past_window_and_original_context(kind, tiny_model_dir, hf_model):
    folder = tiny_model_dir(kind)
    hf = hf_model(kind)
    cfg = CONFIGS[kind][1]
    limit = cfg.get("sliding_window") or cfg["rope_parameters"]["original_max_position_embeddings"]
    plen = 12 * limit  # prefill spans many windows / many original contexts; decoding runs further still
    assert plen + N_STEPS > 4 * limit
    ids = prompt(plen, offset=7)
    ids = ids + hf_greedy(hf, ids, N_STEPS)
    ref = hf_stepwise_logits(hf, ids, plen)
    got = our_stepwise_logits(ours(folder), ids, plen)
    d = max_diff(got, ref)
    report(f"{kind} fp32 long prompt ({plen} + {N_STEPS} tokens, limit {limit})", d, ATOL[torch.float32])
    assert d <= ATOL[torch.float32]

    # The feature really matters at these lengths: without it the logits are far off.
    spec = load_spec(folder)
    if kind == "llama3":
        broken = dataclasses.replace(spec, rope_scaling=None)
    else:
        broken = dataclasses.replace(spec, sliding_windows=(None,) * spec.num_layers)
    d_broken = max_diff(our_stepwise_logits(ours(folder, spec=broken), ids, plen), ref)
    print(f"[parity] {kind}: without the window / scaling max|diff| = {d_broken:.3e}")
    assert d_broken > 100 * ATOL[torch.float32]


def test_gemma2_untied_head_follows_the_config_like_hf(hf_model, tiny_model_dir, tmp_path):
    """Gemma2Config ties by default, but an untied checkpoint keeps its own lm_head.weight: transformers uses it,
    so must we (the spec used to force tying for Gemma 2 and the loader then dropped the head)."""
    import json
    import shutil

    kind = "gemma2-untied"
    folder, hf = tiny_model_dir(kind), hf_model(kind)
    assert not hf.config.tie_word_embeddings
    assert not torch.equal(hf.lm_head.weight, hf.model.embed_tokens.weight)  # the case really has two matrices
    assert not load_spec(folder).tie_word_embeddings
    model = ours(folder)
    assert torch.equal(model.lm_head.weight, hf.lm_head.weight)
    ids = prompt(PROMPT_LEN, offset=17)
    ids = ids + hf_greedy(hf, ids, N_STEPS)
    d = max_diff(our_stepwise_logits(model, ids, PROMPT_LEN), hf_stepwise_logits(hf, ids, PROMPT_LEN))
    report(f"{kind} fp32 prefill + decode", d, ATOL[torch.float32])
    assert d <= ATOL[torch.float32]
    # A Gemma 2 config.json without the key is tied, as transformers' default says (the tiny gemma2 is such a one).
    tied = tmp_path / "gemma2-no-key"
    shutil.copytree(tiny_model_dir("gemma2"), tied)
    cfg = json.loads((tied / "config.json").read_text())
    cfg.pop("tie_word_embeddings", None)
    (tied / "config.json").write_text(json.dumps(cfg))
    assert load_spec(tied).tie_word_embeddings
    tied_model = ours(tied)
    assert tied_model.lm_head.weight is tied_model.model.embed_tokens.weight


def test_reference_forward_future_warning_is_filtered_by_message_only(hf_model, request):
    """pyproject's filterwarnings drops transformers' `past_key_values` FutureWarning (22 of them per run were
    noise), and only that one: another FutureWarning still shows. The ini filters are applied here explicitly,
    so a -W on the command line does not change what this checks."""
    import builtins
    import warnings

    hf = hf_model("llama")
    ids = torch.tensor([prompt(6)])
    with torch.no_grad():
        past = hf(input_ids=ids[:, :5], use_cache=True).past_key_values
        with warnings.catch_warnings(record=True) as raw:  # unfiltered: the warning really is emitted
            warnings.simplefilter("always")
            hf(input_ids=ids[:, 5:], past_key_values=past, use_cache=True)
        assert any(issubclass(w.category, FutureWarning) and "past_key_values" in str(w.message) for w in raw)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            for line in request.config.getini("filterwarnings"):  # "action:message:category" as pytest reads it
                action, message, category = (line.split(":") + ["", ""])[:3]
                category = getattr(builtins, category.split(".")[-1] or "Warning")
                warnings.filterwarnings(action, message=message, category=category)
            hf(input_ids=ids[:, 5:], past_key_values=past, use_cache=True)
            warnings.warn("some other future change", FutureWarning)
    assert [str(w.message) for w in seen] == ["some other future change"]


def test_spec_reads_tricky_config_fields(tiny_model_dir):
    """The configs do exercise what they claim (guards against the factory silently losing a field)."""
    s = {k: load_spec(tiny_model_dir(k)) for k in KINDS}
    assert s["llama"].head_dim == 24 and s["llama"].hidden_size // s["llama"].num_heads == 16
    assert s["llama"].qkv_bias and s["llama"].o_bias and s["llama"].mlp_bias and not s["llama"].tie_word_embeddings
    assert s["llama3"].rope_scaling["rope_type"] == "llama3" and s["llama3"].gqa_groups == 4
    assert s["llama3"].rope_scaling["original_max_position_embeddings"] == 16 and s["llama3"].tie_word_embeddings
    assert s["mistral"].sliding_windows == (8, 8) and s["mistral"].gqa_groups == 1
    assert s["qwen2"].qkv_bias and not s["qwen2"].o_bias and s["qwen2"].rope_scaling["rope_type"] == "linear"
    assert s["qwen2"].sliding_windows == (None, 8)
    assert s["qwen3"].qk_norm and s["qwen3"].head_dim == 24
    g = s["gemma2"]
    assert g.sliding_windows == (8, None, 8) and g.attn_softcap == 5.0 and g.final_softcap == 8.0
    assert math.isclose(g.attn_scale, 40 ** -0.5) and g.head_dim == 24 and g.tie_word_embeddings
    assert all(sp.eos_token_ids == (2, 4) for sp in s.values())


# --------------------------------------------------------------------------------------------------------------
# Chunked prefill: a T>1 chunk at start>0 (causal mask with an offset, and the sliding window inside a chunk).


@pytest.mark.parametrize("splits", [(11,), (3, 9, 10, 25)], ids=["two-chunks", "five-chunks"])
def test_chunked_continuation_equals_one_shot(model_kind_dir, hf_model, splits):
    kind, folder = model_kind_dir
    ids = prompt(30, offset=13)
    tokens = torch.tensor([ids])
    extra = 8
    with torch.no_grad():
        one = ours(folder)
        one.setup_caches(1, len(ids))
        want = one(tokens, 0).float()
        model = ours(folder)
        model.setup_caches(1, len(ids) + extra)
        bounds = [0, *splits, len(ids)]
        got = torch.cat([model(tokens[:, a:b], a).float() for a, b in zip(bounds, bounds[1:])], 1)
        d = max_diff(got, want)
        d_hf = max_diff(got[0], hf_full_logits(hf_model(kind), ids))
        report(f"{kind} fp32 chunks at {list(splits)} vs one-shot prefill", d, ATOL[torch.float32])
        report(f"{kind} fp32 chunks at {list(splits)} vs HF", d_hf, ATOL[torch.float32])
        assert d <= ATOL[torch.float32] and d_hf <= ATOL[torch.float32]
        # Decoding on top of a chunked prefill's cache continues exactly as HF's greedy does.
        tok, cont = got[:, -1].argmax(-1), []
        for i in range(extra):
            cont.append(int(tok))
            tok = decode_one_token(model, tok[:, None], len(ids) + i).argmax(-1)
    assert cont == hf_greedy(hf_model(kind), ids, extra)


# --------------------------------------------------------------------------------------------------------------
# Sampling: seeded reproducibility, top_k=1 == greedy, and the exact top-k / top-p support against float64.


def test_seeded_sampling_is_reproducible(tiny_model_dir):
    folder = tiny_model_dir("llama")
    ids = prompt(PROMPT_LEN)
    cfg = Sampling(temperature=1.3, top_k=40, top_p=0.95, seed=1234)
    a = generate(ours(folder), ids, N_STEPS, cfg, eos_ids=()).tokens[0]
    b = generate(ours(folder), ids, N_STEPS, cfg, eos_ids=()).tokens[0]
    c = generate(ours(folder), ids, N_STEPS, dataclasses.replace(cfg, seed=4321), eos_ids=()).tokens[0]
    greedy = generate(ours(folder), ids, N_STEPS, Sampling(), eos_ids=()).tokens[0]
    print(f"[sampling] seed 1234 vs 4321 differ at {sum(x != y for x, y in zip(a, c))}/{N_STEPS} steps")
    assert len(a) == N_STEPS and a == b
    assert a != c  # the seed is actually used (two 40-token samples at temperature 1.3 never coincide here)
    assert a != greedy  # and it really samples


def test_top_k_1_equals_greedy(tiny_model_dir, hf_model):
    folder = tiny_model_dir("qwen3")
    ids = prompt(PROMPT_LEN, offset=30)
    want = hf_greedy(hf_model("qwen3"), ids, N_STEPS)  # independent greedy reference
    for temperature in (0.3, 1.0, 2.5):
        got = generate(ours(folder), ids, N_STEPS, Sampling(temperature=temperature, top_k=1, seed=7),
                       eos_ids=()).tokens[0]
        assert got == want, temperature
    # top_p small enough that only the top token's mass is needed is greedy as well.
    got = generate(ours(folder), ids, N_STEPS, Sampling(temperature=1.0, top_p=1e-6, seed=7), eos_ids=()).tokens[0]
    assert got == want


# Handcrafted distribution: sorted probabilities .30 .25 .20 .10 .08 .05 .02, so the cumulative masses are
# .30 .55 .75 .85 .93 .98 1.00; each top_p below sits well away from those steps, so float rounding cannot move
# the cut.
_PROBS = np.array([0.05, 0.30, 0.02, 0.25, 0.20, 0.08, 0.10])


def reference_filtered_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """transformers' order in float64: temperature, then top-k, then keep the smallest descending prefix whose
    probability mass reaches top_p; renormalised."""
    z = logits.astype(np.float64) / temperature
    keep = np.ones_like(z, dtype=bool)
    if top_k:
        keep &= z >= np.sort(z)[::-1][top_k - 1]
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        n_keep = int(np.searchsorted(cum, top_p) + 1)  # first index whose cumulative mass >= top_p
        kept = np.zeros_like(keep)
        kept[order[:n_keep]] = True
        p = np.where(kept, p, 0.0)
        p /= p.sum()
    return p


@pytest.mark.parametrize("temperature,top_k,top_p,n_kept", [
    (1.0, 0, 0.29, 1), (1.0, 0, 0.5, 2), (1.0, 0, 0.7, 3), (1.0, 0, 0.8, 4), (1.0, 0, 0.9, 5), (1.0, 0, 0.99, 7),
    (1.0, 0, 1.0, 7), (1.0, 3, 1.0, 3), (1.0, 2, 0.9, 2),
    (1.0, 4, 0.6, 2), (1.0, 4, 0.7, 3),  # top-p sees top-k's renormalised mass: .35 .65 .88 1.0
    (0.5, 0, 0.8, 3),  # temperature sharpens before top-p: .30^2 : .25^2 : .20^2 ... => mass .42 .72 .91 ...
    (2.0, 0, 0.8, 5),  # and flattens: sqrt-probabilities => cumulative .22 .43 .61 .74 .85 ...
])
def test_sample_support_and_frequencies_match_float64_reference(temperature, top_k, top_p, n_kept):
    logits64 = np.log(_PROBS)
    want = reference_filtered_probs(logits64, temperature, top_k, top_p)
    assert int((want > 0).sum()) == n_kept  # the case is what its comment claims
    n = 40_000
    logits = torch.tensor(logits64, dtype=torch.float32).repeat(n, 1)
    cfg = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=0)
    toks = sample(logits, cfg, cfg.generator("cpu"))
    assert toks.shape == (n,)
    freq = np.bincount(toks.numpy(), minlength=len(_PROBS)) / n
    # Support: exactly the kept tokens, each of them drawn (the rarest kept one has mass >= 2.2% here).
    assert set(np.flatnonzero(freq)) == set(np.flatnonzero(want))
    # Frequencies: within 5 binomial standard deviations of the reference probabilities.
    sd = np.sqrt(want * (1 - want) / n)
    print(f"[sampling] T={temperature} k={top_k} p={top_p}: max|freq - p| = {np.abs(freq - want).max():.4f}")
    assert np.all(np.abs(freq - want) <= 5 * sd + 1e-9)
    # Same seed, same draws.
    again = sample(logits, cfg, cfg.generator("cpu"))
    assert torch.equal(toks, again)


# (temperature, top_k, top_p) of the one-row samplers' frequency tests (here and the native kernel's)
ONE_ROW_CASES = [(1.0, 0, 0.5), (1.0, 0, 0.9), (1.0, 0, 1.0), (1.0, 2, 0.9), (1.0, 4, 0.7), (0.5, 0, 0.8), (2.0, 0, 0.8)]


@pytest.mark.parametrize("temperature,top_k,top_p", ONE_ROW_CASES)
def test_one_row_sampling_matches_float64_reference(temperature, top_k, top_p):
    """A single row (the decode loop's case) takes its own path: a partition for top-k, top-p over the tokens above
    a fraction of the largest probability. Its draws, one per call, follow the same float64 reference."""
    want = reference_filtered_probs(np.log(_PROBS), temperature, top_k, top_p)
    cfg = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=0)
    gen = cfg.generator("cpu")
    row = torch.tensor(np.log(_PROBS), dtype=torch.float32)[None]
    n = 8_000
    toks = np.array([int(sample(row, cfg, gen)[0]) for _ in range(n)])
    freq = np.bincount(toks, minlength=len(_PROBS)) / n
    assert set(np.flatnonzero(freq)) == set(np.flatnonzero(want))
    assert np.all(np.abs(freq - want) <= 5 * np.sqrt(want * (1 - want) / n) + 1e-9)


def top_p_widening_case():
    """Half the mass on one token (id 7), the other half over 100,000 tokens each far below the first candidate
    threshold (a 1e-4 fraction of the largest probability): top-p 0.75 must widen its search and keep the top token
    plus about half of the others, the largest ones (their values spread so that fp32 orders them as float64 does;
    the cut itself may differ by a token or two of fp32 rounding in the cumulative mass). Returns the float64
    logits, the reference probabilities, the kept ids and the three ids just past the cut."""
    logits = np.log(0.5 / 100_000) + np.linspace(-0.35, 0.35, 100_001)
    logits[7] = np.log(0.5)
    want = reference_filtered_probs(logits, 1.0, 0, 0.75)
    kept = set(np.flatnonzero(want))
    order = np.argsort(-want - (want == 0) * np.exp(logits), kind="stable")  # kept, then the rest by probability
    return logits, want, kept, set(order[len(kept):len(kept) + 3].tolist())


def test_one_row_top_p_reaches_past_the_first_candidates():
    """top_p_widening_case on the one-row path."""
    logits, want, kept, near_cut = top_p_widening_case()
    cfg = Sampling(temperature=1.0, top_p=0.75, seed=1)
    gen = cfg.generator("cpu")
    row = torch.tensor(logits, dtype=torch.float32)[None]
    n = 600  # each draw sorts ~100,000 candidates (~3 ms): the flat case's cost, as the batched path's sort
    toks = np.array([int(sample(row, cfg, gen)[0]) for _ in range(n)])
    assert 40_000 < len(kept) < 60_000 and set(toks.tolist()) <= kept | near_cut
    share = float(np.mean(toks == 7))
    assert abs(share - want[7]) < 5 * np.sqrt(want[7] * (1 - want[7]) / n)


def test_one_row_without_a_finite_logit_is_refused():
    row = torch.full((1, 5), float("-inf"))
    with pytest.raises(ValueError, match="no finite logit"):
        sample(row, Sampling(temperature=1.0, top_p=0.9, seed=0))


def test_sample_greedy_and_rows_independent():
    """Greedy is argmax per row; a batch of different rows keeps each row's own top-p support."""
    logits = torch.tensor([[0.0, 3.0, 1.0, -2.0], [5.0, 0.0, 4.9, 0.0]])
    assert sample(logits, Sampling()).tolist() == [1, 0]
    n = 4000
    batch = logits.repeat(n, 1)
    cfg = Sampling(temperature=1.0, top_p=0.6, seed=3)
    toks = sample(batch, cfg, cfg.generator("cpu")).view(n, 2)
    for row in range(2):
        want = reference_filtered_probs(logits[row].double().numpy(), 1.0, 0, 0.6)
        assert set(toks[:, row].unique().tolist()) == set(np.flatnonzero(want).tolist())
