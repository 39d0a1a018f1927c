"""The native backend on int4 / int8 engines against the onnxruntime backend running the same engine folder: the
logits of every decode step and the greedy tokens (39 decode steps), for dense layers (q/k/v/o/gate/up/down as
MatMulNBits [out, in] rows), GRIFFIN (the per-prompt quantized rows w_gu_q / w_d_q that the fold gathers, with
re-selection every 8 steps), CATS (whole quantized up / down rows skipped where the thresholded activation is
zero, the float bypass L / R beside them); int4 and int8, blocks of 32 / 64 and one scale per row, MatMulNBits'
unsigned packing and the int4x2 signed one (target tensorrt), a quantized LM head; llama (q/k/v and MLP biases),
qwen2 and gemma2 (soft-caps, post norms, gelu-tanh); the AVX2 and scalar builds; several threads (the same bits
as one); the screened head of an unquantized head on a quantized engine; --backend auto choosing native; the
bytes a CATS step did not read. A SmolLM2 int4 engine (slow): 32 greedy tokens equal to ONNX Runtime's.

Tolerance (fp32 on both sides, the same codes and scales): ONNX Runtime dequantizes each weight to fp32 (MatMulNBits
at accuracy_level 0 and DequantizeLinear alike) and multiplies in MLAS; the kernel sums code × x per block in fp32
and scales the block sum (quant_gemv.c), in another order. Both are the float64 product with dequantize(W) up to
fp32 rounding, so they differ by accumulation order only: max |Δ| seen 4e-6 to 1.1e-5 on logits of magnitude ~5;
the bound is the float backend's, 5e-5 + 5e-5·|logit| (a wrong code, nibble order, scale or row moves logits by
1e-2 or more). Block 128 needs inputs divisible by 128, which no tiny model (hidden 64 / 96) has: the kernel's
block-128 and fp16-scale paths are tested in tests/test_native_quant_gemv.py (an fp32 engine stores fp32 scales,
export README "quantized weights")."""

from __future__ import annotations

import pytest
import torch

from caprese.errors import CapreseError
from caprese.export import contract as C
from caprese.runtime import Generator
from export_helpers import one_torch_thread, prompt_ids
from quantized_export_helpers import q_export
from test_native_backend import ATOL, NEW, OTHER_ISAS, RTOL, needs_cc, recorded

_GENERATORS: dict = {}

# (kind, method, weights, block, target, quantized head, re-selection period)
CASES = [
    ("qwen2", "dense", "int4", None, "onnxruntime", False, 0),  # MatMulNBits block 32, down [D, F] rows-dot
    ("qwen2", "griffin", "int4", None, "onnxruntime", False, 8),  # quantized per-prompt rows, bypass L / R
    ("qwen2", "cats", "int4", None, "onnxruntime", False, 0),  # skipped up / down rows, bypass L / R
    ("qwen2", "dense", "int8", None, "onnxruntime", False, 0),  # one scale per row, int8 two's complement
    ("qwen2", "dense", "int8", 32, "onnxruntime", False, 0),  # MatMulNBits 8-bit (XOR 0x80)
    ("qwen2", "griffin", "int8", None, "onnxruntime", False, 8),
    ("llama", "cats", "int8", None, "onnxruntime", False, 0),  # MLP biases: gate bias before, up bias after τ
    ("llama", "griffin", "int8", None, "onnxruntime", False, 8),  # b_gul, hidden 96, o inputs 144 (no int4 block)
    ("gemma2", "dense", "int4", None, "onnxruntime", True, 0),  # quantized (tied) head, soft-caps, gelu-tanh
    ("gemma2", "griffin", "int4", None, "onnxruntime", False, 8),
    ("qwen2", "griffin", "int4", None, "tensorrt", False, 8),  # int4x2 signed packing, block 64
    ("qwen2", "cats", "int8", None, "tensorrt", False, 0),
    ("qwen2", "dense", "int4", 64, "onnxruntime", True, 0),  # block 64 (gemma2's o has 96 inputs), quantized head
    ("llama-hd96", "dense", "int4", None, "onnxruntime", False, 0),  # 4 query heads per key tile, head_dim 96
]
IDS = [f"{k}-{m}-{w}-{b or 'default'}-{t}{'-qhead' if h else ''}" for k, m, w, b, t, h, _ in CASES]
# the other builds: a case per distinct code path (rows-dot int4 / int8, GRIFFIN rows, CATS rows, quantized head)
ISA_CASES = [(None, *c) for c in CASES] + [(isa, *c) for isa in OTHER_ISAS for c in CASES
                                           if c[:3] in (("qwen2", "griffin", "int4"), ("llama", "cats", "int8"),
                                                        ("llama-hd96", "dense", "int4"))
                                           or c[3] in (32, 64)]


def engine_of(tmp_path_factory, tiny_model_dir, kind, method, weights, block, target, head):
    return q_export(tmp_path_factory, tiny_model_dir, kind, method, weights, block, target, head)[0]


def generator(engine, backend: str, threads: int = 1, head: str = "full", isa: str | None = None) -> Generator:
    key = (str(engine), backend, threads, head, isa)
    if key not in _GENERATORS:
        options = {"head": head, "isa": isa} if backend == "native" else {}
        _GENERATORS[key] = Generator.load(engine, backend=backend, threads=threads, **options)
    return _GENERATORS[key]


@needs_cc
@pytest.mark.parametrize("isa,kind,method,weights,block,target,head,rho", ISA_CASES,
                         ids=[f"{i or 'default'}-{n}" for i, n in
                              [(c[0], IDS[CASES.index(c[1:])]) for c in ISA_CASES]])
def test_native_quantized_equals_onnxruntime(isa, kind, method, weights, block, target, head, rho,
                                              tmp_path_factory, tiny_model_dir):
    engine = engine_of(tmp_path_factory, tiny_model_dir, kind, method, weights, block, target, head)
    prompt = prompt_ids(14, seed=3)[0].tolist()
    ref, ref_logits = recorded(generator(engine, "onnxruntime"), prompt, rho)
    nat = generator(engine, "native", isa=isa)
    got, got_logits = recorded(nat, prompt, rho)
    if head:  # greedy steps of a quantized head: the kernel's own argmax (no logits back to Python)
        with one_torch_thread():
            assert nat.generate(prompt, NEW, reselect_every=rho, ignore_eos=True).tokens == ref.tokens
    diff = (got_logits - ref_logits).abs().max().item()
    print(f"{kind} {method} {weights} block {block} {target} [{nat.backend.describe()['isa']}]: max |logits native - "
          f"onnxruntime| = {diff:.2e} over {len(got_logits)} steps (|logit| <= {ref_logits.abs().max():.2f})")
    assert len(got_logits) >= 32
    assert got.tokens == ref.tokens
    torch.testing.assert_close(got_logits, ref_logits, atol=ATOL, rtol=RTOL)
    assert got.stats.backend == "native"
    saved = nat.backend.arena.saved_bytes  # fp32 scales held as fp16 (exact): fewer bytes, the same products
    assert saved > 0
    if method != "cats":  # every other weight the spec counts is read: ONNX Runtime's bytes per step less those
        assert got.stats.weight_bytes_per_step == ref.stats.weight_bytes_per_step - saved


@needs_cc
@pytest.mark.parametrize("kind,weights,block,target", [("llama", "int8", None, "onnxruntime"),
                                                       ("qwen3", "int8", None, "tensorrt"),
                                                       ("gemma2", "int4", None, "onnxruntime")])
def test_attention_in_slot_parts(kind, weights, block, target, tmp_path_factory, tiny_model_dir):
    """From 64 slots on, a quantized layer's attention runs as (KV head x part of the slots) chunks whose sums are
    merged by their maxima (decode_step.c: stage_q_attention, reduce_attention); a 50-token prompt and 40 steps
    (slots 50 .. 89) against ONNX Runtime: GQA 3:1 with head_dim 24 (a 16-column tail), MQA 4:1 with q-norm,
    Gemma 2's soft-capped scores and alternating window. Same tolerance as above (a part merged with the wrong
    weight moves logits by ~1e-1); 3 threads give the bits of one (the parts do not depend on the thread count)."""
    engine = engine_of(tmp_path_factory, tiny_model_dir, kind, "dense", weights, block, target, False)
    prompt = prompt_ids(50, seed=7)[0].tolist()
    ref, ref_logits = recorded(generator(engine, "onnxruntime"), prompt, 0)
    got, got_logits = recorded(generator(engine, "native"), prompt, 0)
    diff = (got_logits - ref_logits).abs().max().item()
    print(f"{kind} {weights}, slots 50-89: max |logits native - onnxruntime| = {diff:.2e}")
    assert torch.allclose(got_logits, ref_logits, atol=ATOL, rtol=RTOL), diff
    assert got.tokens == ref.tokens
    three, three_logits = recorded(generator(engine, "native", threads=3), prompt, 0)
    assert torch.equal(three_logits, got_logits)


@needs_cc
@pytest.mark.parametrize("isa,method,weights,block,target", [
    (None, "griffin", "int4", None, "onnxruntime"), (None, "cats", "int8", None, "tensorrt"),
    *[(isa, "griffin", "int4", None, "onnxruntime") for isa in OTHER_ISAS]])
def test_fp16_bypass_engines(isa, method, weights, block, target, tmp_path_factory, tiny_model_dir):
    """--fp16-bypass: the kernel reads L and R as fp16 (decode_step.c: GRIFFIN's bypass_rows, CATS' f16_rows_dot
    and gemv_rows_f16, over one [L^T | R] buffer; each build's fp16 conversion) and gives ONNX Runtime's logits
    (which casts them to fp32) within the tolerance above, the same tokens; a step reads half the bypass bytes of
    the fp32-bypass engine."""
    from caprese.export.manifest import load_manifest

    rho = 8 if method == "griffin" else 0
    eng16 = q_export(tmp_path_factory, tiny_model_dir, "qwen2", method, weights, block, target, fp16_bypass=True)[0]
    eng32 = engine_of(tmp_path_factory, tiny_model_dir, "qwen2", method, weights, block, target, False)
    prompt = prompt_ids(14, seed=3)[0].tolist()
    ref, ref_logits = recorded(generator(eng16, "onnxruntime"), prompt, rho)
    got, got_logits = recorded(generator(eng16, "native", isa=isa), prompt, rho)
    diff = (got_logits - ref_logits).abs().max().item()
    print(f"fp16 bypass {method} {weights} [{isa or 'default'}]: max |logits native - onnxruntime| = {diff:.2e}")
    assert torch.allclose(got_logits, ref_logits, atol=ATOL, rtol=RTOL), diff
    assert got.tokens == ref.tokens
    spec = load_manifest(eng16).spec
    lr = sum(w.nbytes for t in spec.layers for w in t.bypass() if w is not None)
    if method != "cats":  # CATS' bytes depend on the rows that pass
        full = recorded(generator(eng32, "native", isa=isa), prompt, rho)[0]
        assert full.stats.weight_bytes_per_step - got.stats.weight_bytes_per_step == lr


# GRIFFIN engines: int4 (fp32 activations), int8 with MLP biases (b_gul), --int8-activations (the quads down on
# AVX-512), --fp16-bypass; a rank of 6 (a bypass chunk ending in a group of under four rows, fp32 and fp16)
FUSED_CASES = [("qwen2", "int4", {}), ("llama", "int8", {}), ("qwen2", "int4", {"int8_activations": True}),
               ("qwen2", "int4", {"fp16_bypass": True}), ("qwen2", "int4", {"rank": 6}),
               ("qwen2", "int4", {"fp16_bypass": True, "rank": 6})]


def one_phase_and_two(nat: Generator, prompt: list[int], rho: int):
    """(result, logits, profile's phases) of a greedy run with a quantized FFN as one phase where the kernel can
    (the default), then of one with gate/up and down as two (caprese_context_set_fused_ffn(0))."""
    be = nat.backend
    be.kernel_profile(reset=True)
    one = (*recorded(nat, prompt, rho), be.kernel_profile(reset=True)["phases_us"])
    be.lib.caprese_context_set_fused_ffn(be._ctx, 0)
    try:
        two = (*recorded(nat, prompt, rho), be.kernel_profile(reset=True)["phases_us"])
    finally:
        be.lib.caprese_context_set_fused_ffn(be._ctx, 1)
    return one, two


@needs_cc
@pytest.mark.parametrize("isa", [None, *OTHER_ISAS])
@pytest.mark.parametrize("kind,weights,extra", FUSED_CASES,
                         ids=[f"{k}-{w}" + "".join(f"-{x}" for x in e) for k, w, e in FUSED_CASES])
def test_griffin_ffn_in_one_phase_equals_two(isa, kind, weights, extra, tmp_path_factory, tiny_model_dir):
    """A GRIFFIN layer's FFN runs as one phase (stage_q_ffn: a chunk of neurons computes its gate / up rows, the
    activation and its down rows; the default) with the down phase's chunk spans, so its logits are the two-phase
    path's (gate/up, the leader's activation, then down) bit for bit, over re-selections every 8 steps, on every
    build; the profile shows which ran."""
    engine = q_export(tmp_path_factory, tiny_model_dir, kind, "griffin", weights, None, "onnxruntime", False,
                      **extra)[0]
    nat = Generator.load(engine, backend="native", threads=2, isa=isa)
    (one, one_logits, fused), (two, two_logits, split) = one_phase_and_two(nat, prompt_ids(14, seed=3)[0].tolist(), 8)
    assert "q_ffn_rows" in fused and "q_gate_up" not in fused and "q_down_rows" not in fused
    assert "q_ffn_rows" not in split and "q_gate_up" in split and "q_down_rows" in split
    assert one.tokens == two.tokens
    assert torch.equal(one_logits, two_logits)


def agree_but_near_ties(tokens, logits, ref_tokens, ref_logits, atol):
    """Two greedy runs (tokens; logits of every decode step, step k giving token k + 1) of arithmetics that differ
    by a few roundings: logits within atol while the prompts are the same, and the first token that differs (if any)
    one where the reference's top two logits are within 2 atol."""
    n = next((k for k, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), min(len(tokens), len(ref_tokens)))
    assert n > 0  # the first token comes from the same prefill
    torch.testing.assert_close(logits[:n], ref_logits[:n], atol=atol, rtol=0)
    if n < min(len(tokens), len(ref_tokens)):
        top2 = ref_logits[n - 1].topk(2).values
        print(f"tokens part at {n} of {len(ref_tokens)}: the reference's top two logits {top2.tolist()}")
        assert float(top2[0] - top2[1]) < 2 * atol


@needs_cc
@pytest.mark.parametrize("isa", [None, *OTHER_ISAS])
def test_dense_ffn_in_one_phase(isa, tmp_path_factory, tiny_model_dir):
    """A dense --int8-activations engine whose down is stored [hidden, n_ff] in the r16 layout (the SIMD builds) runs
    each layer's FFN as one phase over chunks of 768 neurons (stage_q_ffn_dense: gate / up rows, z = act(gate) * up
    rounded to int8 in down's blocks, down's columns: a partial sum) instead of gate/up, the leader's activation and
    down, where the pool's threads have a chunk each. z's int8 codes are those of the whole vector (chunks hold whole
    blocks); the down sums are split (768 + 768 + 64 neurons here, with MLP biases): a few fp32 roundings, which flip
    int8 codes where a value sits on a rounding tie and this tiny random model amplifies (test_int8_activation_engines'
    gemma2 case), so: logits within 0.15 of the two phases' while the tokens agree, and a token may differ only at a
    near tie (top two logits within 0.3). Chunk columns given to the wrong neurons move the logits by whole units.
    1 and 3 threads (the helpers taking chunks) give 2 threads' bits; 4 threads (more than the 3 chunks) take the two
    phases. The scalar build keeps down in rows: the two phases, the same bits."""
    engine = q_export(tmp_path_factory, tiny_model_dir, "llama-ff1600", "dense", "int4", None, "onnxruntime", False,
                      int8_activations=True)[0]
    prompt = prompt_ids(14, seed=4)[0].tolist()
    nat = Generator.load(engine, backend="native", threads=2, isa=isa)
    be = nat.backend
    (one, one_logits, fused), (two, two_logits, split) = one_phase_and_two(nat, prompt, 0)
    assert "q_gate_up" in split and "q_down" in split and "q_ffn_dense" not in split
    if not be.lib.caprese_qx_r16_preferred():
        assert fused.keys() == split.keys() and torch.equal(one_logits, two_logits)
        return
    assert "q_ffn_dense" in fused and "q_gate_up" not in fused and "q_down" not in fused
    print(f"dense FFN in one phase [{be.lib.isa}]: max |one - two phases| = "
          f"{(one_logits - two_logits).abs().max().item():.2e}")
    agree_but_near_ties(one.tokens, one_logits, two.tokens, two_logits, atol=0.15)
    if isa is None:  # the caller pauses 0.2 ms in every third chunk it runs, so that the helpers take chunks
        for threads in (1, 3):
            other = Generator.load(engine, backend="native", threads=threads)
            other.backend.lib.caprese_context_debug_stall(other.backend._ctx, 0, 3, 200)
            _, other_logits = recorded(other, prompt, 0)
            assert torch.equal(other_logits, one_logits)
            assert threads == 1 or other.backend.kernel_stats()["helper_chunks"] > 0
        four = Generator.load(engine, backend="native", threads=4)
        four.backend.kernel_profile(reset=True)
        _, four_logits = recorded(four, prompt, 0)
        assert "q_ffn_dense" not in four.backend.kernel_profile()["phases_us"]
        assert torch.equal(four_logits, two_logits)


@needs_cc
@pytest.mark.parametrize("case", [CASES[1], CASES[6]], ids=[IDS[1], IDS[6]])
def test_threads_give_the_same_bits(case, tmp_path_factory, tiny_model_dir):
    """Whole-row chunks (QKV, o, gate/up, head) and rows-axpy parts added in chunk order: 3 threads give the
    logits of one, bit for bit."""
    kind, method, weights, block, target, head, rho = case
    engine = engine_of(tmp_path_factory, tiny_model_dir, kind, method, weights, block, target, head)
    prompt = prompt_ids(14, seed=5)[0].tolist()
    one, one_logits = recorded(generator(engine, "native"), prompt, rho)
    three, three_logits = recorded(generator(engine, "native", threads=3), prompt, rho)
    assert three.tokens == one.tokens
    assert torch.equal(three_logits, one_logits)


@needs_cc
def test_screened_float_head_on_a_quantized_engine(tmp_path_factory, tiny_model_dir):
    """The decoder quantized, the head not: greedy steps screen the fp32 head as on float engines (same tokens as
    ONNX Runtime, fewer head bytes counted); a quantized head is read whole even when screening is asked."""
    engine = engine_of(tmp_path_factory, tiny_model_dir, *CASES[0][:6])
    prompt = prompt_ids(14, seed=6)[0].tolist()
    with one_torch_thread():
        ref = generator(engine, "onnxruntime").generate(prompt, NEW, ignore_eos=True)
        g = generator(engine, "native", head="screened")
        got = g.generate(prompt, NEW, ignore_eos=True)
    assert got.tokens == ref.tokens
    assert g.backend.head == "screened" and g.backend.head_steps > 0
    assert got.stats.weight_bytes_per_step < ref.stats.weight_bytes_per_step
    qhead = engine_of(tmp_path_factory, tiny_model_dir, *CASES[8][:6])
    with one_torch_thread():
        ref = generator(qhead, "onnxruntime").generate(prompt, NEW, ignore_eos=True)
        g = generator(qhead, "native", head="screened")
        got = g.generate(prompt, NEW, ignore_eos=True)
    assert got.tokens == ref.tokens
    assert g.backend.head == "full" and g.backend.describe()["head"] == "full (quantized, read whole)"
    assert got.stats.weight_bytes_per_step == ref.stats.weight_bytes_per_step - g.backend.arena.saved_bytes


@needs_cc
def test_auto_chooses_native_for_quantized_engines(tmp_path_factory, tiny_model_dir):
    from caprese.export.manifest import load_manifest
    from caprese.runtime.engine_options import choose_backend
    from caprese.runtime.native_backend import native_unsupported

    engine = engine_of(tmp_path_factory, tiny_model_dir, *CASES[2][:6])
    assert native_unsupported(load_manifest(engine)) is None
    assert choose_backend(load_manifest(engine), "cpu")[0] == "native"


@needs_cc
@pytest.mark.parametrize("weights", ["int4", "int8"])
def test_cats_quantized_rows_below_the_threshold_are_not_read(weights, tmp_path_factory, tiny_model_dir):
    """CATS: the quantized up and down rows (codes + scales) of exactly the neurons the reference decoder zeroes
    (a hook on its down_proj inputs at the same step) are skipped, and the report counts only what was read."""
    engine = engine_of(tmp_path_factory, tiny_model_dir, "qwen2", "cats", weights, None, "onnxruntime", False)
    prompt = prompt_ids(14, seed=3)[0].tolist()
    ref_g = generator(engine, "torch")
    zeros: dict[int, int] = {}
    hooks = [f.dense.down_proj.register_forward_hook(
        lambda mod, inp, out, i=i: zeros.__setitem__(i, int((inp[0] == 0).sum())) if inp[0].shape[1] == 1 else None)
        for i, f in ref_g.backend.ffns.items()]
    try:
        with one_torch_thread():
            ref = ref_g.generate(prompt, 12, ignore_eos=True)
            got = generator(engine, "native").generate(prompt, 12, ignore_eos=True)
    finally:
        for h in hooks:
            h.remove()
    assert got.tokens == ref.tokens
    spec = generator(engine, "native").manifest.spec
    t = spec.layers[0]

    nat = generator(engine, "native").backend

    def row_bytes(ref):  # one row's codes + its scales (held as fp16 where exact)
        return ref.nbytes // ref.shape[0] + nat.arena[ref.quant.scale].nbytes // ref.shape[0]

    per_neuron = row_bytes(t.gate_up) + row_bytes(t.down)  # an up row of [W_g; W_1] and a down row of [F, D]
    assert all(spec.layers[i].kind == C.CATS for i in zeros) and sum(zeros.values()) > 0
    assert nat.skipped_bytes() - nat.arena.saved_bytes == sum(zeros.values()) * per_neuron
    assert got.stats.weight_bytes_per_step < generator(engine, "onnxruntime").traffic.weight_bytes


@pytest.mark.slow
@needs_cc
@pytest.mark.parametrize("kv,tol", [("fp32", 1e-3), (None, 5e-2)])
def test_smollm2_int4_native_equals_onnxruntime(kv, tol, tmp_path):
    """SmolLM2-135M exported with --weights int4 --target onnxruntime (GenAI's layout: MatMulNBits block 32):
    32 greedy decode tokens of the native backend equal ONNX Runtime's. Logits (magnitude ~25): with an fp32 cache
    within 1e-3 (fp32 accumulation order only); with the default fp16 cache within 5e-2 (measured 1.7e-2: a K / V
    element or attention output one fp16 ulp apart where the two sums straddle a rounding tie, 2^-11 relative,
    carried through 30 layers; tests/test_kv_dtype.py bounds the rows themselves)."""
    from caprese.export.exporter import export
    from caprese.export.manifest import load_manifest
    from caprese.model.default_model import fetch_default

    engine = export(fetch_default(), tmp_path / "engine", max_seq_len=96, target="onnxruntime",
                    weights="int4", kv_dtype=kv).out
    assert load_manifest(engine).layout.cache_dtype == ("float32" if kv else "float16")
    prompt = prompt_ids(24, seed=29)[0].tolist()
    ort = Generator.load(engine, backend="onnxruntime", threads=2)
    nat = Generator.load(engine, backend="native", threads=2, head="full")
    ref, ref_logits = recorded(ort, prompt, 0)
    got, got_logits = recorded(nat, prompt, 0)
    diff = (got_logits - ref_logits).abs().max().item()
    print(f"SmolLM2 int4: max |logits native - onnxruntime| = {diff:.3g} over {len(got_logits)} steps")
    assert len(got.tokens) >= 33 and got.tokens == ref.tokens
    assert diff < tol


@needs_cc
def test_float_selection_griffin_runs_the_float_ffn(tmp_path_factory, tiny_model_dir):
    """--float-selection: GRIFFIN's per-prompt matrices are float w_gul / w_dr (folded from the dequantized rows):
    the kernel runs them on its float path next to quantized attention matrices; ONNX Runtime's tokens and logits."""
    engine = q_export(tmp_path_factory, tiny_model_dir, "qwen2", "griffin", "int4", None, "onnxruntime",
                      float_selection=True)[0]
    prompt = prompt_ids(14, seed=3)[0].tolist()
    ref, ref_logits = recorded(generator(engine, "onnxruntime"), prompt, 8)
    got, got_logits = recorded(generator(engine, "native"), prompt, 8)
    assert got.tokens == ref.tokens
    torch.testing.assert_close(got_logits, ref_logits, atol=ATOL, rtol=RTOL)


# (kind, method, quantized head, logits atol) of the int8-activation engines: every path that multiplies int4 rows
I8_CASES = [("qwen2", "dense", False, 2e-3), ("qwen2", "cats", False, 2e-3), ("qwen2", "griffin", False, 0.15),
            ("gemma2", "dense", True, 0.15)]


@needs_cc
@pytest.mark.parametrize("isa", [None, *OTHER_ISAS])
@pytest.mark.parametrize("kind,method,head,atol", I8_CASES,
                         ids=[f"{k}-{m}{'-qhead' if h else ''}" for k, m, h, _ in I8_CASES])
def test_int8_activation_engines(isa, kind, method, head, atol, tmp_path_factory, tiny_model_dir):
    """An engine exported with --int8-activations (MatMulNBits accuracy_level 4): the native kernel multiplies
    every int4 product with int8 activations (native/int8_activations.c, checked against float64 in
    tests/test_native_quant_gemv.py), and follows ONNX Runtime on the same engine: identical greedy tokens, and
    logits within `atol`. ONNX Runtime rounds activations by the same rule (per block of 32, absmax / 127, half to
    even): on qwen2 dense / CATS the logits agree to ~5e-6 (atol 2e-3). Two cases differ by design or by chance,
    hence 0.15 there: GRIFFIN's per-prompt rows are graph inputs, which MatMulNBits cannot pre-pack, so ONNX
    Runtime multiplies them as DequantizeLinear -> MatMul with fp32 activations while the kernel keeps int8 for
    their gate/up (8e-2 on this tiny model; the down stays fp32 unless int8_down, below); on
    gemma2 (soft-caps; the AVX-512 build) attention outputs that differ from ONNX Runtime's by one fp32 ulp flip a
    few int8 codes of the o projection's input, and this tiny random model amplifies that to ~5e-2. Either way the
    int8 arithmetic must really run: with fp32 activations (int8_act switched off) the kernel moves further."""
    engine = q_export(tmp_path_factory, tiny_model_dir, kind, method, "int4", None, "onnxruntime", head,
                      int8_activations=True)[0]
    prompt = prompt_ids(14, seed=3)[0].tolist()
    rho = 8 if method == "griffin" else 0
    ref, ref_logits = recorded(generator(engine, "onnxruntime"), prompt, rho)
    nat = generator(engine, "native", isa=isa)
    assert nat.backend.describe()["activations"] == "int8 (int4 weights; GRIFFIN's down int16)"
    # the SIMD builds read QKV, o, the head, gate / up (not CATS' up) in their r16 layout (groups of 16 rows)
    r16 = nat.backend.describe()["r16_matrices"]
    assert r16 >= 2 * nat.backend.layout.num_layers if nat.backend.lib.caprese_qx_r16_preferred() else r16 == 0
    got, got_logits = recorded(nat, prompt, rho)
    diff = (got_logits - ref_logits).abs().max().item()
    nat.backend._model.int8_act = 0
    try:
        _, f32_logits = recorded(nat, prompt, rho)
    finally:
        nat.backend._model.int8_act = 1
    moved = (f32_logits - got_logits).abs().max().item()
    print(f"int8 activations {kind} {method} [{nat.backend.describe()['isa']}]: max |native - onnxruntime acc4| = "
          f"{diff:.2e}; fp32 activations move the kernel's logits by {moved:.2e} (|logit| <= "
          f"{ref_logits.abs().max():.2f})")
    assert got.tokens == ref.tokens
    torch.testing.assert_close(got_logits, ref_logits, atol=atol, rtol=0)
    assert moved > 10 * ATOL
    if isa is None and method != "dense":  # x rounded once per product, before the chunks: 3 threads, same bits
        _, three = recorded(generator(engine, "native", threads=3), prompt, rho)
        assert torch.equal(three, got_logits)


@needs_cc
def test_r16_beside_rows_layout_matrices(tmp_path, monkeypatch):
    """A model whose fused QKV has 120 rows (head_dim 12, 8 query heads, 1 KV head: not a multiple of 16) on an
    --int8-activations engine: QKV keeps its rows while o, gate, up and down go to the r16 layout, and QKV's chunks,
    in whole groups of 16 rows, end inside a group. The native step still follows ONNX Runtime acc4 (identical
    greedy tokens, logits within 2e-3 as the qwen2 dense case above)."""
    import tiny_models
    from caprese.export.exporter import export

    kind = "llama_qkv120"
    monkeypatch.setitem(tiny_models.CONFIGS, kind, ("llama", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=1,
        head_dim=12, tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})))
    src = tiny_models.make_tiny_model(kind, tmp_path / "model")
    engine = export(src, tmp_path / "engine", max_seq_len=64, max_prompt_len=63, target="onnxruntime",
                    weights="int4", int8_activations=True).out
    prompt = prompt_ids(14, seed=5)[0].tolist()
    ref, ref_logits = recorded(generator(engine, "onnxruntime"), prompt, 0)
    nat = generator(engine, "native")
    L0 = nat.backend._layers[0]
    if nat.backend.lib.caprese_qx_r16_preferred():
        assert (L0.q_qkv.rows, L0.q_qkv.layout, L0.q_o.layout, L0.q_gate.layout, L0.q_down.layout) == (120, 0, 1, 1, 1)
    got, got_logits = recorded(nat, prompt, 0)
    print(f"QKV of 120 rows: max |native - onnxruntime acc4| = {(got_logits - ref_logits).abs().max().item():.2e}")
    assert got.tokens == ref.tokens
    torch.testing.assert_close(got_logits, ref_logits, atol=2e-3, rtol=0)


@needs_cc
@pytest.mark.parametrize("isa", [None, *OTHER_ISAS])
@pytest.mark.parametrize("int8_down", (False, True))
def test_griffin_down_quads_equal_the_fold_layout(int8_down, isa, tmp_path_factory, tiny_model_dir):
    """The AVX-512 and AVX2 builds read GRIFFIN's down rows on --int8-activations engines from a copy repacked at
    every selection (int8_activations.c, the quads layout): the same sums as the fold's layout, so the logits are
    the same bits with the copy switched off, over re-selections every 8 steps (a selection the copy missed would
    differ)."""
    engine = q_export(tmp_path_factory, tiny_model_dir, "qwen2", "griffin", "int4", None, "onnxruntime", False,
                      int8_activations=True)[0]
    nat = Generator.load(engine, backend="native", threads=2, int8_down=int8_down, isa=isa)
    if not nat.backend.lib.caprese_qa_quads():
        pytest.skip(f"no quads layout on the {nat.backend.lib.isa} build")
    layers = [nat.backend._layers[i] for i, _ in nat.backend._quads]
    assert layers and all(L.down_quads for L in layers)
    prompt = prompt_ids(14, seed=3)[0].tolist()
    got, got_logits = recorded(nat, prompt, 8)
    saved = [L.down_quads for L in layers]
    try:
        for L in layers:
            L.down_quads = None
        plain, plain_logits = recorded(nat, prompt, 8)
    finally:
        for L, q in zip(layers, saved):
            L.down_quads = q
    assert got.tokens == plain.tokens
    assert torch.equal(got_logits, plain_logits)


@needs_cc
@pytest.mark.parametrize("isa", [None, *OTHER_ISAS])
def test_int8_down_option(isa, tmp_path_factory, tiny_model_dir):
    """native int8_down=True on an --int8-activations GRIFFIN engine: its down (the kept rows, a rows-axpy) takes
    int8 activations too (caprese_q_rows_axpy_qa, checked against float64 in tests/test_native_quant_gemv.py).
    ONNX Runtime multiplies those rows in fp32, so the logits move further from it (1.2e-1 on this tiny model,
    against 8e-2 without the option: atol 0.15) with the same greedy tokens; the option really changes the
    arithmetic (the logits move from the default's by more than 10x the float tolerance); 3 threads give the bits
    of one; the report says so; on an engine without int8 activations it is a one-line error."""
    engine = q_export(tmp_path_factory, tiny_model_dir, "qwen2", "griffin", "int4", None, "onnxruntime", False,
                      int8_activations=True)[0]
    prompt = prompt_ids(14, seed=3)[0].tolist()
    ref, ref_logits = recorded(generator(engine, "onnxruntime"), prompt, 8)
    key = (str(engine), "native-int8-down", isa)
    if key not in _GENERATORS:
        _GENERATORS[key] = Generator.load(engine, backend="native", threads=1, isa=isa, int8_down=True)
    nat = _GENERATORS[key]
    assert nat.backend.describe()["activations"] == "int8 (int4 weights, GRIFFIN's down too)"
    got, got_logits = recorded(nat, prompt, 8)
    _, default_logits = recorded(generator(engine, "native", isa=isa), prompt, 8)
    diff = (got_logits - ref_logits).abs().max().item()
    moved = (got_logits - default_logits).abs().max().item()
    print(f"int8 down [{nat.backend.describe()['isa']}]: max |native - onnxruntime| = {diff:.2e}; against the "
          f"default (fp32 down) {moved:.2e}")
    assert got.tokens == ref.tokens
    torch.testing.assert_close(got_logits, ref_logits, atol=0.15, rtol=0)
    assert moved > 10 * ATOL
    if isa is None:
        three = Generator.load(engine, backend="native", threads=3, int8_down=True)
        assert torch.equal(recorded(three, prompt, 8)[1], got_logits)
        plain = engine_of(tmp_path_factory, tiny_model_dir, "qwen2", "griffin", "int4", None, "onnxruntime", False)
        with pytest.raises(CapreseError, match="--int8-down takes an engine exported with --int8-activations"):
            Generator.load(plain, backend="native", int8_down=True)


@needs_cc
def test_cli_int8_down(tmp_path_factory, tiny_model_dir, monkeypatch, capsys):
    """--int8-down on `run` / `eval ENGINE_DIR` reaches the native backend (its report says so; eval picks native
    for it); on ONNX Runtime, or on a model folder, a one-line error."""
    import json

    from caprese.cli.main import main as caprese_main
    from cli_helpers import assert_one_line_error, run_cli

    engine = q_export(tmp_path_factory, tiny_model_dir, "qwen2", "griffin", "int4", None, "onnxruntime", False,
                      int8_activations=True)[0]
    run = ["run", str(engine), "-p", "the cat sat", "-n", "4", "--json"]
    rc, out, err = run_cli(caprese_main, [*run, "--backend", "native", "--int8-down"], monkeypatch, capsys)
    assert rc == 0, err
    assert json.loads(out)["activations"] == "int8 (int4 weights, GRIFFIN's down too)"
    rc, out, err = run_cli(caprese_main, [*run, "--backend", "native"], monkeypatch, capsys)
    assert json.loads(out)["activations"] == "int8 (int4 weights; GRIFFIN's down int16)"
    rc, out, err = run_cli(caprese_main, [*run, "--backend", "onnxruntime", "--int8-down"], monkeypatch, capsys)
    assert_one_line_error(rc, err, "--int8-down applies to --backend native")
    rc, out, err = run_cli(caprese_main, ["eval", str(engine), "--limit", "2", "-n", "4", "--json", "--quiet",
                                          "--no-chat", "--int8-down"], monkeypatch, capsys)
    assert rc == 0, err
    assert json.loads(out)["backend"] == "native"
    rc, out, err = run_cli(caprese_main, ["eval", str(tiny_model_dir("qwen2")), "--limit", "2", "--int8-down"],
                           monkeypatch, capsys)
    assert_one_line_error(rc, err, "--int8-down applies to an exported engine folder")
