"""Exported graphs on ONNX Runtime (CPU) against the PyTorch reference decoder with the same method applied.

Tolerance (fp32): logits within atol 1e-4 (+ rtol 1e-4). Both sides compute in float32 with different kernels
(fused MatMul for gate+up, ORT's Attention / RMSNormalization / RotaryEmbedding vs torch SDPA and eager ops),
so they agree to ~1e-5 on these tiny models whose logits are O(1-10); 1e-4 leaves room for summation order
and nothing else. Greedy tokens must be identical for every step.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from caprese.export import contract as C
from export_helpers import (MAX_SEQ, OrtLoop, get_export, one_torch_thread, prompt_ids, reference_decoder,
                                 reference_greedy)

ATOL = RTOL = 1e-4
STEPS = 33  # the prefill token + 32 decode steps


def assert_close(a, b, what):
    a, b = np.asarray(a), np.asarray(b)
    err = np.abs(a - b).max()
    assert np.allclose(a, b, atol=ATOL, rtol=RTOL), f"{what}: max |diff| {err:.3g}"


@pytest.mark.parametrize("kind,method", [
    ("llama", "dense"), ("llama", "griffin"), ("llama", "cats"),
    ("qwen2", "dense"), ("qwen2", "griffin"), ("qwen2", "cats"),
    ("gemma2", "dense"), ("gemma2", "griffin"), ("gemma2", "cats"),
])
def test_prefill_decode_logits_and_greedy_tokens(kind, method, tmp_path_factory, tiny_model_dir):
    engine, src = get_export(tmp_path_factory, tiny_model_dir, kind, method)
    dec = reference_decoder(src)
    prompt = prompt_ids(14, seed=3)
    ref_tokens, ref_logits = reference_greedy(dec, prompt, STEPS)
    loop = OrtLoop(engine)
    tokens, logits = loop.greedy(prompt.numpy(), STEPS)
    for step, (a, b) in enumerate(zip(logits, ref_logits)):
        assert_close(a, b.numpy(), f"{kind}/{method} logits at step {step}")
    assert tokens.tolist() == ref_tokens.tolist()


@pytest.mark.parametrize("kind", ["llama3", "mistral", "qwen3", "gemma2-untied"])
def test_dense_other_architectures(kind, tmp_path_factory, tiny_model_dir):
    """Llama 3 RoPE scaling + MQA, Mistral's sliding window on every layer (the prompt + 24 tokens cross it), Qwen3
    q/k norms, Gemma 2 with its own lm_head: prefill + decode logits and greedy tokens."""
    engine, src = get_export(tmp_path_factory, tiny_model_dir, kind)
    if kind == "gemma2-untied":  # the graph reads the checkpoint's head, not the embedding
        heads = {i.name for i in onnx.load(str(engine / "decode.onnx"), load_external_data=False).graph.initializer}
        assert "lm_head.weight" in heads
    prompt = prompt_ids(10, seed=5)
    ref_tokens, ref_logits = reference_greedy(reference_decoder(src), prompt, 24)
    tokens, logits = OrtLoop(engine).greedy(prompt.numpy(), 24)
    for step, (a, b) in enumerate(zip(logits, ref_logits)):
        assert_close(a, b.numpy(), f"{kind} logits at step {step}")
    assert tokens.tolist() == ref_tokens.tolist()


@pytest.mark.parametrize("kind,method,rho", [
    ("qwen2", "dense", 0), ("qwen2", "griffin", 8), ("qwen2", "cats", 0), ("gemma2-hd16", "dense", 0),
    ("gemma2-hd16", "griffin", 8), ("mistral", "dense", 0), ("llama3", "cats", 0), ("llama", "griffin", 8),
])
def test_onnxruntime_target_matches_reference(kind, method, rho, tmp_path_factory, tiny_model_dir):
    """--target onnxruntime (GroupQueryAttention over the shared past/present buffer, rotary inside, and
    SkipSimplifiedLayerNormalization): the same logits and greedy tokens as the reference decoder, including
    GRIFFIN re-selection (a prefill call at start > 0), Mistral's sliding window (crossed by prompt + steps),
    Gemma 2's soft-cap and its sliding layers. The tiny llama's head_dim 24 is no multiple of 16: it keeps the
    standard attention (and still gets the fused norms). Same fp32 tolerance: different kernels, same math."""
    engine, src = get_export(tmp_path_factory, tiny_model_dir, kind, method, target="onnxruntime")
    m = onnx.load(str(engine / "decode.onnx"), load_external_data=False)
    ops = {n.op_type for n in m.graph.node}
    gqa = kind != "llama"
    assert ("GroupQueryAttention" in ops) == gqa and ("TensorScatter" in ops) != gqa
    assert ("SkipSimplifiedLayerNormalization" in ops) == (not kind.startswith("gemma2"))
    dec = reference_decoder(src)
    prompt = prompt_ids(14, seed=3)
    n = STEPS if kind != "mistral" else 24
    ref_tokens, ref_logits = reference_greedy(dec, prompt, n, rho)
    tokens, logits = OrtLoop(engine).greedy(prompt.numpy(), n, reselect_every=rho)
    for step, (a, b) in enumerate(zip(logits, ref_logits)):
        assert_close(a, b.numpy(), f"{kind}/{method} (onnxruntime target) logits at step {step}")
    assert tokens.tolist() == ref_tokens.tolist()


def test_griffin_selection_and_folding_match_reference(tmp_path_factory, tiny_model_dir):
    """griffin_stat = caprese's statistic; top-k of it = the reference's neurons; the runtime's folded inputs from
    weights.bin = caprese.calibration.bypass.fold of the reference FFN's compact slices (bias included)."""
    from caprese.calibration.bypass import fold
    from caprese.calibration.methods import efficient_layers

    engine, src = get_export(tmp_path_factory, tiny_model_dir, "llama", "griffin")
    dec = reference_decoder(src)
    prompt = prompt_ids(20, seed=7)
    reference_greedy(dec, prompt, 1)  # prefill only: the reference selects its neurons
    loop = OrtLoop(engine)
    out = loop.run(C.PREFILL, prompt.numpy(), 0)
    loop.select(out, prompt.shape[1], restart=True)
    ffns = efficient_layers(dec)
    assert sorted(ffns) == loop.lay.layers_of(C.GRIFFIN) == [0, 1]
    for i, ffn in ffns.items():
        np.testing.assert_allclose(out[C.griffin_stat(i)], ffn.stat_sq.numpy(), rtol=1e-5, atol=1e-6)
        assert torch.equal(loop.idx[i], ffn.idx)
        wg, wu, wd, bg, bu = ffn.compact_weights()
        w_gul, w_dr = fold(wg[0], wu[0], wd[0], ffn.bypass)
        got_gul, got_dr = loop.selection[C.w_gul(i)].numpy()[0], loop.selection[C.w_dr(i)].numpy()[0]
        np.testing.assert_array_equal(got_gul, w_gul.numpy())
        np.testing.assert_array_equal(got_dr, w_dr.numpy())
        b = loop.selection[C.b_gul(i)].numpy()[0]
        np.testing.assert_array_equal(b, torch.cat([bg[0], bu[0], torch.zeros(ffn.bypass.rank)]).numpy())
        assert got_gul.shape == (loop.lay.hidden_size, 2 * loop.lay.k + loop.lay.rank)


def test_cats_threshold_is_the_prompt_percentile(tmp_path_factory, tiny_model_dir):
    """cats_tau (bisection in the graph) equals caprese's percentile_linear of the prompt's |act(x W_g)|."""
    from caprese.calibration.methods import efficient_layers

    engine, src = get_export(tmp_path_factory, tiny_model_dir, "qwen2", "cats")
    dec = reference_decoder(src)
    prompt = prompt_ids(17, seed=11)
    reference_greedy(dec, prompt, 1)
    out = OrtLoop(engine).run(C.PREFILL, prompt.numpy(), 0)
    for i, ffn in efficient_layers(dec).items():
        # the activations themselves differ by ~1e-7 relative between the two sides
        np.testing.assert_allclose(out[C.cats_tau(i)], ffn.tau.numpy(), rtol=2e-6)


def test_griffin_reselection_greedy_tokens(tmp_path_factory, tiny_model_dir):
    """Reselection every 8 steps through the prefill graph (statistics added, neurons re-picked, weights refolded)
    gives the same 40 greedy tokens as caprese.model.generation.generate(reselect_every=8)."""
    from caprese.model.generation import generate

    engine, src = get_export(tmp_path_factory, tiny_model_dir, "llama", "griffin")
    dec = reference_decoder(src)
    prompt = prompt_ids(12, seed=13)
    with one_torch_thread():
        ref = generate(dec, prompt[0].tolist(), 40, reselect_every=8)
    loop = OrtLoop(engine)
    tokens, _ = loop.greedy(prompt.numpy(), 40, reselect_every=8)
    assert tokens[0].tolist() == ref.tokens[0]
    first = OrtLoop(engine)
    first.greedy(prompt.numpy(), 2)
    assert any(not torch.equal(first.idx[i], loop.idx[i]) for i in loop.idx), "reselection never changed a neuron"


def test_batch_with_left_padding_griffin(tmp_path_factory, tiny_model_dir):
    """Two prompts of different lengths, left-padded: per-row GRIFFIN selection ([B, D, 2k + r] inputs), padding
    masked out of attention and of the statistic. Tokens equal to the reference's batched generate."""
    from caprese.model.generation import generate, left_pad

    engine, src = get_export(tmp_path_factory, tiny_model_dir, "llama", "griffin")
    dec = reference_decoder(src)
    prompts = [prompt_ids(9, seed=17)[0].tolist(), prompt_ids(15, seed=19)[0].tolist()]
    with one_torch_thread():
        ref = generate(dec, prompts, 32, eos_ids=(0,))
    tokens, pad = left_pad(prompts, 0)
    loop = OrtLoop(engine, batch=2)
    loop.set_padding(pad.numpy())
    got, _ = loop.greedy(tokens.numpy(), 32)
    for row, ref_row in zip(got.tolist(), ref.tokens):
        cut = row.index(0) if 0 in row else len(row)  # reference stops a row at its EOS (id 0 here)
        assert row[:cut] == ref_row


def test_kv_cache_is_updated_in_place(tmp_path_factory, tiny_model_dir):
    """present_* is bound to the past_* OrtValue: after a step the very same buffer (same data pointer, nothing
    reallocated) holds the new K/V at write_indices, and the slots before keep the earlier tokens."""
    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "llama")
    loop = OrtLoop(engine)
    ptrs = {n: v.data_ptr() for n, v in loop.kv.items()}
    prompt = prompt_ids(6, seed=23).numpy()
    loop.run(C.PREFILL, prompt, 0)
    k0 = loop.kv[C.past_key(0)].numpy().copy()
    assert np.abs(k0[:, :, :6]).sum() > 0 and not k0[:, :, 6:].any()
    loop.run(C.DECODE, prompt[:, -1:], 6)
    k1 = loop.kv[C.past_key(0)].numpy()
    assert {n: v.data_ptr() for n, v in loop.kv.items()} == ptrs
    np.testing.assert_array_equal(k1[:, :, :6], k0[:, :, :6])
    assert np.abs(k1[:, :, 6]).sum() > 0 and not k1[:, :, 7:].any()
    assert loop.kv[C.past_key(0)].shape() == [1, loop.lay.num_kv_heads, MAX_SEQ, loop.lay.head_dim]


# fp16: both sides keep fp16 weights, activations and KV cache with fp32 norms/softmax, but round at different
# points (torch rounds every op's output to fp16; ONNX Runtime's CPU provider runs several fp16 ops through inserted
# fp32 casts). One fp16 ulp of a logit of magnitude ~4-6 is 2^-8..2^-7 = 0.004..0.008; a few such roundings through
# 2-3 layers measured <= 0.026, so 0.05 (~6-12 ulps).
FP16_ATOL = 0.05


@pytest.mark.parametrize("kind,method", [("llama", "dense"), ("llama", "griffin"), ("gemma2", "dense")])
def test_fp16_graphs_match_fp16_reference(kind, method, tmp_path_factory, tiny_model_dir):
    engine, src = get_export(tmp_path_factory, tiny_model_dir, kind, method, precision="fp16")
    dec = reference_decoder(src, "fp16")
    prompt = prompt_ids(14, seed=3)
    ref_tokens, ref_logits = reference_greedy(dec, prompt, STEPS)
    tokens, logits = OrtLoop(engine).greedy(prompt.numpy(), STEPS)
    assert logits[0].dtype == np.float32  # logits are fp32 at every precision
    for step, (a, b) in enumerate(zip(logits, ref_logits)):
        err = np.abs(a - b.float().numpy()).max()
        assert err <= FP16_ATOL, f"{kind}/{method} fp16 logits at step {step}: max |diff| {err:.3g}"
    assert tokens.tolist() == ref_tokens.tolist()


def test_fp16_cats_prefill_and_threshold(tmp_path_factory, tiny_model_dir):
    """fp16 CATS: prefill logits and τ only. A hard threshold keeps or drops activations lying within one fp16
    rounding of τ differently on the two sides, so decode logits and long greedy runs are not comparable (measured:
    tokens agree for 30 of 33 steps on this model, then diverge)."""
    from caprese.calibration.methods import efficient_layers

    engine, src = get_export(tmp_path_factory, tiny_model_dir, "llama", "cats", precision="fp16")
    dec = reference_decoder(src, "fp16")
    prompt = prompt_ids(14, seed=3)
    _, ref_logits = reference_greedy(dec, prompt, 1)
    out = OrtLoop(engine).run(C.PREFILL, prompt.numpy(), 0)
    assert np.abs(out[C.LOGITS][:, -1] - ref_logits[0].float().numpy()).max() <= FP16_ATOL
    for i, ffn in efficient_layers(dec).items():  # τ of fp16 activations: a few fp16 ulps (2^-11 relative)
        np.testing.assert_allclose(out[C.cats_tau(i)], ffn.tau.float().numpy(), rtol=4e-3)


def test_bf16_graphs_are_typed_for_tensorrt(tmp_path_factory, tiny_model_dir):
    """bf16 has no ONNX Runtime CPU kernels (MatMul, Mul...), so bf16 graphs are checked statically: onnx's checker
    (at export), the TensorRT table, bf16 weights/cache, fp32 logits and selection outputs."""
    import onnx

    from caprese.export.manifest import load_manifest
    from caprese.export.tensorrt_ops import check_model

    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "gemma2", "griffin", precision="bf16")
    m = load_manifest(engine)
    assert m.data["dtypes"] == {"weights": "bfloat16", "kv_cache": "bfloat16", "logits": "float32",
                                "selection": "float32"}
    assert {e["dtype"] for e in m.data["weights"].values()} == {"bfloat16"}
    for path in m.tensorrt_graphs.values():  # what TensorRT parses: the same graphs with a static cache length
        assert check_model(path) == []
    for graph in C.GRAPHS:
        model = onnx.load(str(m.file(graph)), load_external_data=False)
        types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)}
        assert types[C.past_key(0)] == types[C.present_value(2)] == onnx.TensorProto.BFLOAT16
        assert types[C.LOGITS] == onnx.TensorProto.FLOAT
        if graph == C.PREFILL:
            assert types[C.griffin_stat(0)] == onnx.TensorProto.FLOAT
        else:
            assert types[C.w_gul(0)] == onnx.TensorProto.BFLOAT16
