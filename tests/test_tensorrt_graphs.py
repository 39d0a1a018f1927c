"""The graphs TensorRT parses (manifest "tensorrt_graphs"): what the importer needs, checked here, and ONNX Runtime
parity of those very files with the PyTorch reference decoder, in both roles.

Importer rules checked on every graph (the new static checker will hold them too; these asserts keep this branch
honest until it lands): no Attention node carries `softmax_precision` (onnx-tensorrt onnxOpCheckers.cpp refuses
it whatever its value) or a non-zero `softcap`; every KV cache input/output and the attention mask have the
static length max_seq_len (TensorScatter -> IKVCacheUpdateLayer: the cache is a network input with a static
sequence length); If branches give outputs of the same rank under different names (onnx-tensorrt If).

Tolerances: fp32 as tests/test_export_parity.py (1e-4: same math, different kernels); fp16 FP16_ATOL there (a few
fp16 roundings of O(5) logits). The shared CATS graph in its decode role runs exactly the ops of decode.onnx (the
role switches are Where(flag, τ, -1) and a 0/1 gate), so the two agree to float rounding on the same runtime.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from caprese.export import contract as C
from caprese.export.manifest import load_manifest
from caprese.export.tensorrt_graphs import static_cache_copy
from test_export_parity import FP16_ATOL, STEPS, assert_close
from export_helpers import MAX_SEQ, OrtLoop, get_export, prompt_ids, reference_decoder, reference_greedy

METHODS = ("dense", "griffin", "cats")


def _graphs(model: onnx.GraphProto):
    yield model
    for node in model.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(a.g)


def _dims(vi):
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


def importer_problems(model: onnx.ModelProto, cache_len: int) -> list[str]:
    """The TensorRT importer rules these graphs rely on that the current static table check does not know."""
    out = []
    for graph in _graphs(model.graph):
        for n in graph.node:
            attrs = {a.name: a for a in n.attribute}
            if n.op_type == "Attention" and "softmax_precision" in attrs:
                out.append(f"{n.name}: Attention with softmax_precision")
            if n.op_type == "Attention" and "softcap" in attrs and attrs["softcap"].f != 0.0:
                out.append(f"{n.name}: Attention with softcap")
            if n.op_type == "If":
                then_o, else_o = attrs["then_branch"].g.output, attrs["else_branch"].g.output
                if [len(_dims(v)) for v in then_o] != [len(_dims(v)) for v in else_o]:
                    out.append(f"{n.name}: If branch outputs of different ranks")
                if {v.name for v in then_o} & {v.name for v in else_o}:
                    out.append(f"{n.name}: If branch outputs share a name")
    for vi in list(model.graph.input) + list(model.graph.output):
        if vi.name.startswith(("past_", "present_")) and _dims(vi)[2] != cache_len:
            out.append(f"{vi.name}: cache length {_dims(vi)[2]}, not the static {cache_len}")
        if vi.name == C.ATTENTION_MASK and _dims(vi)[1] != cache_len:
            out.append(f"{vi.name}: length {_dims(vi)[1]}, not the static {cache_len}")
    return out


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("method", METHODS)
def test_tensorrt_graphs_follow_the_importer_rules(method, precision, tmp_path_factory, tiny_model_dir):
    """One shared graph without GRIFFIN, two with; every file passes the rules above and onnx's checker; the
    copies of the standard graphs differ from them ONLY in the cache length."""
    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "llama", method, precision=precision)
    m = load_manifest(engine)
    record = m.data["tensorrt_graphs"]
    assert record["cache_len"] == m.data["max_seq_len"] == MAX_SEQ
    want = {C.TRT_SHARED: [C.PREFILL, C.DECODE]} if method != "griffin" else {C.PREFILL: [C.PREFILL],
                                                                                C.DECODE: [C.DECODE]}
    assert {e: r["roles"] for e, r in record["engines"].items()} == want
    assert m.data["tensorrt_check"]["files"] == [r["onnx"] for r in record["engines"].values()]
    for name, path in m.tensorrt_graphs.items():
        model = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(str(path))  # by path: its external data resolves beside it
        assert importer_problems(model, MAX_SEQ) == [], path.name
        io = m.layout.tensorrt_io(name, MAX_SEQ)
        assert [v.name for v in model.graph.input] == [t.name for t in io["inputs"]]
        assert [_dims(v) for v in model.graph.input] == [list(t.shape) for t in io["inputs"]]
        if method != "cats":  # a static copy of prefill.onnx / decode.onnx, nothing else changed
            role = C.PREFILL if name == C.TRT_SHARED else name
            standard = onnx.load(str(m.file(role)), load_external_data=False)
            assert static_cache_copy(standard, MAX_SEQ) == model
    for g in C.GRAPHS:  # the ONNX Runtime graphs keep the symbolic length (their runtime sizes the cache)
        model = onnx.load(str(m.file(g)), load_external_data=False)
        assert _dims(model.graph.input[4])[2] == C.CACHE_LEN
        assert all("softmax_precision" not in {a.name for a in n.attribute} for n in model.graph.node)


def test_standard_graphs_keep_attention_op_at_fp32_only(tmp_path_factory, tiny_model_dir):
    """fp32: ONNX Attention (TensorRT's IAttention; ONNX Runtime's fast CPU kernel). fp16/bf16: the attention
    written out with a float32 Softmax, since TensorRT refuses softmax_precision."""
    for precision, attention in (("fp32", True), ("fp16", False), ("bf16", False)):
        engine, _ = get_export(tmp_path_factory, tiny_model_dir, "llama", precision=precision)
        model = onnx.load(str(engine / C.TENSORRT_GRAPH_FILES[C.TRT_SHARED]), load_external_data=False)
        ops = [n.op_type for n in model.graph.node]
        assert ("Attention" in ops) == attention, precision
        if not attention:
            softmax_inputs = {n.input[0] for n in model.graph.node if n.op_type == "Softmax"}
            casts = {n.output[0]: n for n in model.graph.node if n.op_type in ("Cast", "Where")}
            for name in softmax_inputs:  # Softmax <- Where(mask) <- Cast(to float32)
                where = casts[name]
                assert where.op_type == "Where" and casts[where.input[1]].attribute[0].i == onnx.TensorProto.FLOAT


def test_griffin_memory_cost_is_recorded(tmp_path_factory, tiny_model_dir):
    """GRIFFIN's two engines each hold their graph's weights: the duplicated bytes are exactly the tensors both
    graphs read, the per-prompt bytes the decode graph's folded-matrix inputs."""
    from caprese.export.tensorrt_graphs import external_tensors

    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "llama", "griffin")
    m = load_manifest(engine)
    mem = m.data["tensorrt_graphs"]["memory"]
    held = {e: external_tensors(onnx.load(str(p), load_external_data=False)) for e, p in m.tensorrt_graphs.items()}
    size = lambda names: sum(m.data["weights"][n]["length"] for n in names)  # noqa: E731
    assert mem["weights_bytes"] == {e: size(n) for e, n in held.items()}
    assert mem["duplicated_weights_bytes"] == size(held[C.PREFILL] & held[C.DECODE]) > 0
    lay, item = m.layout, 4
    per_layer = lay.hidden_size * (2 * lay.k + lay.rank) + (lay.k + lay.rank) * lay.hidden_size + 2 * lay.k + lay.rank
    assert mem["per_prompt_bytes"] == len(lay.layers_of(C.GRIFFIN)) * per_layer * item
    assert mem["kv_cache_bytes"] == 2 * lay.num_layers * lay.num_kv_heads * MAX_SEQ * lay.head_dim * item
    dense, _ = get_export(tmp_path_factory, tiny_model_dir, "llama")
    assert load_manifest(dense).data["tensorrt_graphs"]["memory"]["duplicated_weights_bytes"] == 0


@pytest.mark.parametrize("kind,method", [("llama", m) for m in METHODS] + [
    ("gemma2", "dense"), ("qwen3", "dense"), ("mistral", "dense"), ("llama3", "cats")])
def test_tensorrt_files_match_reference_fp32(kind, method, tmp_path_factory, tiny_model_dir):
    """The exact files TensorRT parses, run on ONNX Runtime in both roles (prefill, then 32 decode steps through the
    shared graph, i.e. the prefill graph at T = 1, or GRIFFIN's decode copy): logits and greedy tokens equal the
    reference decoder's. Gemma 2 (soft-cap, sliding layers), Qwen3 (q/k norms), Mistral (window crossed), Llama 3
    (MQA) too."""
    engine, src = get_export(tmp_path_factory, tiny_model_dir, kind, method)
    prompt = prompt_ids(14, seed=3)
    ref_tokens, ref_logits = reference_greedy(reference_decoder(src), prompt, STEPS)
    loop = OrtLoop(engine, tensorrt=True)
    assert loop.role_inputs == (method == "cats")
    tokens, logits = loop.greedy(prompt.numpy(), STEPS)
    for step, (a, b) in enumerate(zip(logits, ref_logits)):
        assert_close(a, b.numpy(), f"{kind}/{method} TensorRT graph logits at step {step}")
    assert tokens.tolist() == ref_tokens.tolist()


def test_shared_cats_graph_reselection_matches_reference(tmp_path_factory, tiny_model_dir):
    """The shared CATS graph's prefill role at a slot > 0 (re-selection, a new τ from the last 8 tokens) and its
    decode role with that τ: the same 40 greedy tokens as the reference with reselect_every=8."""
    engine, src = get_export(tmp_path_factory, tiny_model_dir, "qwen2", "cats")
    prompt = prompt_ids(12, seed=13)
    ref_tokens, _ = reference_greedy(reference_decoder(src), prompt, 40, reselect_every=8)
    tokens, _ = OrtLoop(engine, tensorrt=True).greedy(prompt.numpy(), 40, reselect_every=8)
    assert tokens.tolist() == ref_tokens.tolist()


@pytest.mark.parametrize("method", ["dense", "griffin"])
def test_tensorrt_files_match_reference_fp16(method, tmp_path_factory, tiny_model_dir):
    engine, src = get_export(tmp_path_factory, tiny_model_dir, "llama", method, precision="fp16")
    prompt = prompt_ids(14, seed=3)
    ref_tokens, ref_logits = reference_greedy(reference_decoder(src, "fp16"), prompt, STEPS)
    tokens, logits = OrtLoop(engine, tensorrt=True).greedy(prompt.numpy(), STEPS)
    for step, (a, b) in enumerate(zip(logits, ref_logits)):
        err = np.abs(a - b.float().numpy()).max()
        assert err <= FP16_ATOL, f"{method} fp16 TensorRT graph logits at step {step}: max |diff| {err:.3g}"
    assert tokens.tolist() == ref_tokens.tolist()


def test_shared_cats_graph_fp16_both_roles(tmp_path_factory, tiny_model_dir):
    """fp16 CATS: the prefill role against the reference (logits, τ; decode is not comparable step by step, see
    test_fp16_cats_prefill_and_threshold), and the decode role against decode.onnx on the same runtime over 33
    steps: the same ops, so float rounding apart the same logits."""
    from caprese.calibration.methods import efficient_layers

    engine, src = get_export(tmp_path_factory, tiny_model_dir, "llama", "cats", precision="fp16")
    dec = reference_decoder(src, "fp16")
    prompt = prompt_ids(14, seed=3)
    _, ref_logits = reference_greedy(dec, prompt, 1)
    shared = OrtLoop(engine, tensorrt=True)
    out = shared.run(C.PREFILL, prompt.numpy(), 0)
    assert np.abs(out[C.LOGITS][:, -1] - ref_logits[0].float().numpy()).max() <= FP16_ATOL
    for i, ffn in efficient_layers(dec).items():
        np.testing.assert_allclose(out[C.cats_tau(i)], ffn.tau.float().numpy(), rtol=4e-3)
    shared_tokens, shared_logits = OrtLoop(engine, tensorrt=True).greedy(prompt.numpy(), STEPS)
    tokens, logits = OrtLoop(engine).greedy(prompt.numpy(), STEPS)
    for step, (a, b) in enumerate(zip(shared_logits, logits)):
        err = np.abs(a - b).max()
        assert err <= 1e-3, f"shared fp16 CATS decode role vs decode.onnx at step {step}: max |diff| {err:.3g}"
    assert shared_tokens.tolist() == tokens.tolist()


def test_importer_rules_catch_what_they_claim(tmp_path_factory, tiny_model_dir):
    """The asserts above can fail: softmax_precision on an Attention node and a symbolic cache are reported."""
    from onnx import helper

    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "llama")
    m = load_manifest(engine)
    model = onnx.load(str(m.tensorrt_graphs[C.TRT_SHARED]), load_external_data=False)
    node = next(n for n in model.graph.node if n.op_type == "Attention")
    node.attribute.append(helper.make_attribute("softmax_precision", onnx.TensorProto.FLOAT))
    assert importer_problems(model, MAX_SEQ) == [f"{node.name}: Attention with softmax_precision"]
    standard = onnx.load(str(m.file(C.DECODE)), load_external_data=False)
    problems = importer_problems(standard, MAX_SEQ)
    assert f"past_key.0: cache length {C.CACHE_LEN}, not the static {MAX_SEQ}" in problems
    assert f"{C.ATTENTION_MASK}: length {C.CACHE_LEN}, not the static {MAX_SEQ}" in problems
