"""caprese.runtime on engine folders of the tiny models: ONNX Runtime vs the PyTorch reference backend (identical
greedy tokens), the decode loop against caprese.model.generation.generate, buffers bound once, the report.

Greedy runs use ignore_eos so every run is exactly the number of steps asked for. Timing is reported by the
stats object, never asserted (a shared 2-core machine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from caprese.errors import CapreseError
from caprese.export import contract as C
from caprese.runtime import Generator
from caprese.runtime.buffers import kv_slots
from caprese.runtime.traffic import decode_traffic
from export_helpers import MAX_SEQ, get_export, one_torch_thread, prompt_ids, reference_decoder

NEW = 40  # the first token + 39 decode steps (>= 32), reselection windows at steps 8, 16, 24, 32
_GENERATORS: dict = {}


def generator(engine, backend: str, **options) -> Generator:
    """One Generator per (engine, backend, options) for the session: loading sessions is the slow part."""
    key = (str(engine), backend, tuple(sorted(options.items())))
    if key not in _GENERATORS:
        _GENERATORS[key] = Generator.load(engine, backend=backend, threads=1, **options)
    return _GENERATORS[key]


def ids(n: int = 14, seed: int = 3) -> list[int]:
    return prompt_ids(n, seed=seed)[0].tolist()


@pytest.mark.parametrize("kind,method,rho", [
    ("llama", "dense", 0), ("llama", "griffin", 0), ("llama", "griffin", 8), ("llama", "cats", 0),
    ("qwen2", "dense", 0), ("qwen2", "griffin", 0), ("qwen2", "griffin", 8), ("qwen2", "cats", 0),
])
def test_onnxruntime_and_torch_backends_agree(kind, method, rho, tmp_path_factory, tiny_model_dir):
    engine, _ = get_export(tmp_path_factory, tiny_model_dir, kind, method)
    prompt = ids()
    with one_torch_thread():
        ort = generator(engine, "onnxruntime").generate(prompt, NEW, reselect_every=rho, ignore_eos=True)
        ref = generator(engine, "torch").generate(prompt, NEW, reselect_every=rho, ignore_eos=True)
    assert len(ort.tokens) == NEW
    assert ort.tokens == ref.tokens
    assert ort.stop_reason == ref.stop_reason == "length"


@pytest.mark.parametrize("kind,method,rho", [("llama", "griffin", 8), ("qwen2", "cats", 0), ("gemma2", "dense", 0)])
def test_static_decode_step_equals_the_graphs(kind, method, rho, tmp_path_factory, tiny_model_dir):
    """Decoder.decode_static (slot as a tensor, index_copy_ into the cache, masked attention over the whole
    buffer, selection in pinned buffers: the step CUDA graphs capture) gives ONNX Runtime's greedy tokens."""
    engine, _ = get_export(tmp_path_factory, tiny_model_dir, kind, method)
    prompt = ids()
    with one_torch_thread():
        ort = generator(engine, "onnxruntime").generate(prompt, NEW, reselect_every=rho, ignore_eos=True)
        g = generator(engine, "torch", static=True)
        got = g.generate(prompt, NEW, reselect_every=rho, ignore_eos=True)
    assert g.backend.describe()["static_decode"] is True
    assert got.tokens == ort.tokens
    if method == "griffin":  # re-selections were copied into the buffers pinned at the first one
        f = g.backend.ffns[0]
        assert f._w is f._pinned and torch.equal(f._pinned[0][0], f.dense.gate_proj.weight[f.idx[0]])


@pytest.mark.parametrize("method,rho", [("griffin", 8), ("cats", 0)])
def test_loop_matches_reference_generate(method, rho, tmp_path_factory, tiny_model_dir):
    """The Generator's loop (prefill, selection, decode, reselection) = caprese.model.generation.generate."""
    from caprese.model.generation import generate

    engine, src = get_export(tmp_path_factory, tiny_model_dir, "llama", method)
    prompt = ids(12, seed=13)
    with one_torch_thread():
        ref = generate(reference_decoder(src), prompt, NEW, reselect_every=rho)
        got = generator(engine, "onnxruntime").generate(prompt, NEW, reselect_every=rho, ignore_eos=True)
    assert got.tokens == ref.tokens[0]


def test_fold_into_buffers_equals_export_folding(tmp_path_factory, tiny_model_dir):
    """The in-place fold (memory-mapped weights, gathered into the bound buffers) = caprese.export.folding."""
    from caprese.export.folding import Folder

    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "llama", "griffin")
    g = generator(engine, "onnxruntime")
    g.generate(ids(), 2)
    b, stats = g.backend, g.selection.griffin_stats()
    assert sorted(stats) == [0, 1]
    for i, stat in stats.items():
        idx, w_gul, w_dr, b_gul = Folder(g.manifest).fold(i, stat)
        np.testing.assert_array_equal(b.buffers.selection[C.w_gul(i)].read(), w_gul.numpy())
        np.testing.assert_array_equal(b.buffers.selection[C.w_dr(i)].read(), w_dr.numpy())
        np.testing.assert_array_equal(b.buffers.selection[C.b_gul(i)].read(), b_gul.numpy())


def test_chunked_prompt_equals_one_prefill(tmp_path_factory, tiny_model_dir):
    """A prompt longer than max_prompt_len is prefilled in chunks at start > 0 (dense: the same tokens)."""
    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "qwen2", "dense")
    prompt = ids(23, seed=5)
    g = Generator.load(engine, "onnxruntime", threads=1)
    whole = g.generate(prompt, 24, ignore_eos=True).tokens
    g.max_prompt_len = 5
    assert g.generate(prompt, 24, ignore_eos=True).tokens == whole


@pytest.mark.parametrize("method,rho", [("dense", 0), ("griffin", 8), ("cats", 0)])
def test_onnxruntime_target_engine_runs_like_the_standard_one(method, rho, tmp_path_factory, tiny_model_dir):
    """An engine exported with --target onnxruntime (GroupQueryAttention writing the bound KV buffer in place):
    the standard engine's tokens, for a whole prompt, a prompt prefilled in chunks, and a KV cache grown and kept
    across the turns of a conversation."""
    from caprese.runtime.conversation import Conversation

    std, _ = get_export(tmp_path_factory, tiny_model_dir, "qwen2", method)
    fast, _ = get_export(tmp_path_factory, tiny_model_dir, "qwen2", method, target="onnxruntime")
    prompt = ids(23, seed=5)
    a, b = Generator.load(std, "onnxruntime", threads=1), Generator.load(fast, "onnxruntime", threads=1)
    assert b.manifest.data["target"] == "onnxruntime"
    want = a.generate(prompt, 24, reselect_every=rho, ignore_eos=True).tokens
    assert b.generate(prompt, 24, reselect_every=rho, ignore_eos=True).tokens == want
    b.max_prompt_len = 8
    assert b.generate(prompt, 24, reselect_every=rho, ignore_eos=True).tokens == want
    ca, cb = Conversation(a), Conversation(b)
    for turn in ("hello there", "and again, longer this time"):
        assert cb.say(turn, 12).consume().tokens == ca.say(turn, 12).consume().tokens


def test_kv_cache_bound_once_and_updated_in_place(tmp_path_factory, tiny_model_dir):
    """KV buffers (and logits, selection inputs) keep their addresses for a whole generation and across
    generations of the same size; present_* writes into the past_* buffer."""
    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "llama", "griffin")
    g = Generator.load(engine, "onnxruntime", threads=1, kv_policy="max")
    b = g.backend
    bufs = b.buffers
    ptrs = lambda: {n: v.data_ptr()  # noqa: E731
                    for n, v in {**bufs.kv, **bufs.selection, "logits": bufs[C.LOGITS]}.items()}
    seen = []
    stream = g.stream(ids(10), 30, ignore_eos=True)
    for _ in stream.tokens():
        seen.append(ptrs())
    assert stream.result.stop_reason == "length" and len(seen) == 30
    assert all(p == seen[0] for p in seen)
    assert b.buffers.kv[C.past_key(0)].value.shape() == [1, b.layout.num_kv_heads, MAX_SEQ, b.layout.head_dim]
    k = b.buffers.kv[C.past_key(0)].read()
    used = 10 + 30 - 1  # the last token is sampled, never fed
    assert np.abs(k[:, :, :used]).sum(axis=(0, 1, 3)).min() > 0 and not k[:, :, used:].any()
    g.generate(ids(12, seed=1), 20)
    assert ptrs() == seen[0]


def test_kv_cache_sized_to_the_need_and_grown_keeping_slots(tmp_path_factory, tiny_model_dir):
    """kv_policy "fit" rounds the need up (ORT's Attention pays per allocated slot); a reuse that needs more grows
    the buffers once, keeping the cached slots, and still gives the torch backend's tokens."""
    assert kv_slots(100, 4096, "fit") == 256 and kv_slots(300, 4096, "fit") == 512 and kv_slots(300, 400, "fit") == 400
    assert kv_slots(10, 4096, "max") == 4096 and kv_slots(10, 4096, 32) == 32 and kv_slots(40, 4096, 32) == 40
    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "llama", "dense")
    g = Generator.load(engine, "onnxruntime", threads=1, kv_policy=24)
    first = ids(10)
    r1 = g.generate(first, 8, ignore_eos=True)
    b = g.backend
    assert b.capacity == 24
    before = b.buffers.kv[C.past_value(1)].read()[:, :, :17].copy()
    longer = first + r1.tokens + ids(6, seed=9)  # the cached 17 tokens, then new ones: needs 24 + 20 slots
    r2 = g.stream_ids(longer, 20, reuse=True, ignore_eos=True).consume()
    assert b.capacity == len(longer) + 20 and r2.stats.reused_tokens == 17 and r2.stats.prefill_tokens == 7
    np.testing.assert_array_equal(b.buffers.kv[C.past_value(1)].read()[:, :, :17], before)
    with one_torch_thread():
        ref = generator(engine, "torch").generate(longer, 20, ignore_eos=True)
    assert r2.tokens == ref.tokens


STATS_KEYS = {"prompt_tokens", "tokens_generated", "batch", "ttft_ms", "ms_per_token", "ms_per_token_p50",
              "ms_per_token_p90", "tokens_per_s", "stop_reason", "text", "backend", "backend_requested", "device",
              "reused_tokens", "prefill_tokens", "kv_slots", "bytes_per_step", "gb_per_s", "peak_rss_mb",
              "peak_device_mb"}


def test_stats_same_fields_and_sane(tmp_path_factory, tiny_model_dir):
    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "llama", "griffin")
    dense, _ = get_export(tmp_path_factory, tiny_model_dir, "llama", "dense")
    out = {}
    with one_torch_thread():
        for backend in ("onnxruntime", "torch"):
            r = generator(engine, backend).generate(ids(), 24, ignore_eos=True)
            d = r.to_dict()
            json.dumps(d)
            assert set(d) == STATS_KEYS, set(d) ^ STATS_KEYS
            assert d["backend"] == backend and d["tokens_generated"] == 24 and d["prompt_tokens"] == 14
            assert d["ttft_ms"] > 0 and d["ms_per_token"] > 0 and d["ms_per_token_p50"] <= d["ms_per_token_p90"]
            assert d["tokens_per_s"] == pytest.approx(1000 / d["ms_per_token"], rel=0.01)
            assert d["gb_per_s"] == pytest.approx(d["bytes_per_step"] / d["ms_per_token"] / 1e6, rel=0.01)
            assert d["peak_rss_mb"] > 10 and d["peak_device_mb"] is None and d["kv_slots"] == MAX_SEQ
            assert len(r.stats.step_ms) == 23
            out[backend] = r.stats
    t = generator(engine, "onnxruntime").traffic
    # ONNX Runtime reads the whole buffer, the reference only the valid prefix (steps at slots 14..36 read
    # 15..37 slots, mean 26)
    assert out["onnxruntime"].kv_bytes_per_step == t.kv_bytes_per_slot * MAX_SEQ
    assert out["torch"].kv_bytes_per_step == pytest.approx(t.kv_bytes_per_slot * 26)
    assert out["torch"].weight_bytes_per_step == out["onnxruntime"].weight_bytes_per_step
    assert t.weight_bytes < generator(dense, "onnxruntime").traffic.weight_bytes  # compact FFN: fewer bytes


def test_decode_traffic_counts_the_decode_graph(tmp_path_factory, tiny_model_dir):
    """Dense Llama (untied): every weight once, except the embedding and the RoPE tables: one row each; GRIFFIN:
    the compact [D, 2k+r] and [k+r, D] (+ bias) instead of the dense FFN."""
    from caprese.export.manifest import load_manifest

    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "llama", "dense")
    m = load_manifest(engine)
    table = m.data["weights"]
    rows = {"model.embed_tokens.weight", "rope.cos", "rope.sin"}
    want = sum(e["length"] for n, e in table.items() if n not in rows)
    want += sum(table[n]["length"] // table[n]["shape"][0] for n in rows)
    t = decode_traffic(m)
    lay = m.layout
    assert t.weight_bytes == want
    assert t.kv_bytes_per_slot == 2 * lay.num_layers * lay.num_kv_heads * lay.head_dim * 4
    g, _ = get_export(tmp_path_factory, tiny_model_dir, "llama", "griffin")
    gm = load_manifest(g)
    gl = gm.layout
    ffn = sum(e["length"] for n, e in table.items() if ".mlp." in n)
    compact = gl.num_layers * 4 * (gl.hidden_size * (2 * gl.k + gl.rank) + (gl.k + gl.rank) * gl.hidden_size
                                   + 2 * gl.k + gl.rank)
    down_bias = gl.num_layers * 4 * gl.hidden_size  # b_2 stays a graph constant
    assert decode_traffic(gm).weight_bytes == want - ffn + compact + down_bias
    # --target onnxruntime reads the same weights (GroupQueryAttention: one row of cos / sin, like RotaryEmbedding)
    # and, by default, half the cache's bytes (an fp16 cache)
    std, _ = get_export(tmp_path_factory, tiny_model_dir, "qwen2", "dense")
    fast, _ = get_export(tmp_path_factory, tiny_model_dir, "qwen2", "dense", target="onnxruntime", kv_dtype=None)
    s, f = decode_traffic(load_manifest(std)), decode_traffic(load_manifest(fast))
    assert f.weight_bytes == s.weight_bytes and 2 * f.kv_bytes_per_slot == s.kv_bytes_per_slot


def test_stream_pieces_make_the_text(tmp_path_factory, tiny_model_dir):
    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "qwen2", "cats")
    g = generator(engine, "onnxruntime")
    stream = g.stream("the cat sat on", 16, chat=True)
    text = "".join(stream)
    assert stream.result is not None and stream.result.text == text and text
    assert stream.result.stats.prompt_tokens == len(g.encode("the cat sat on", chat=True))


def test_sampling_is_reproducible_with_a_seed(tmp_path_factory, tiny_model_dir):
    from caprese.model.sampling import Sampling

    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "llama", "dense")
    g = generator(engine, "onnxruntime")
    s = Sampling(temperature=1.5, top_k=50, top_p=0.95, seed=7)
    a = g.generate(ids(), 20, s, ignore_eos=True).tokens
    assert a == g.generate(ids(), 20, s, ignore_eos=True).tokens
    assert a != g.generate(ids(), 20, ignore_eos=True).tokens


def test_stop_ends_a_generation_after_the_current_step(tmp_path_factory, tiny_model_dir):
    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "llama", "dense")
    g = generator(engine, "onnxruntime")
    stream = g.stream(ids(), 30, ignore_eos=True)
    got = []
    for t in stream.tokens():
        got.append(t)
        if len(got) == 3:
            stream.stop()
    assert stream.result.stop_reason == "interrupted" and stream.result.tokens == got and len(got) == 3
    assert len(g.cached) == 14 + 2


def test_backend_errors_are_one_line(tmp_path_factory, tiny_model_dir, tmp_path, monkeypatch):
    from caprese.runtime.backend import open_backend

    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "llama", "griffin")
    m = generator(engine, "onnxruntime").manifest
    for name, needle in (("tensorrt", "TensorRT"), ("nope", "unknown backend")):
        if name == "tensorrt":
            monkeypatch.setitem(sys.modules, "tensorrt", None)
        with pytest.raises(CapreseError, match=needle) as e:
            open_backend(name, m)
        assert "\n" not in str(e.value)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(CapreseError, match="needs ONNX Runtime") as e:
        open_backend("onnxruntime", m)
    assert "\n" not in str(e.value)
    monkeypatch.delitem(sys.modules, "onnxruntime")
    # the torch backend needs the export's source model
    import shutil

    moved = shutil.copytree(engine, tmp_path / "engine")
    data = json.loads((moved / "manifest.json").read_text())
    data["source"]["path"] = str(tmp_path / "gone")
    (moved / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(CapreseError, match="missing") as e:
        Generator.load(moved, backend="torch")
    assert "\n" not in str(e.value)
    with pytest.raises(CapreseError, match="max_seq_len"):
        generator(engine, "onnxruntime").generate(ids(), MAX_SEQ)
    with pytest.raises(CapreseError, match="torch backend has no option kv_policy"):
        Generator.load(engine, backend="torch", kv_policy="max")
    with pytest.raises(CapreseError, match="onnxruntime-gpu"):
        Generator.load(engine, "onnxruntime", device="cuda")


def test_tensorrt_backend_refuses_cleanly_without_gpu_or_plans(tmp_path_factory, tiny_model_dir, monkeypatch):
    """The checks before any TensorRT call, with a stand-in `tensorrt` module: no GPU, then no plans."""
    import types

    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "llama", "dense")
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.15.0"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(CapreseError, match="needs an NVIDIA GPU"):
        Generator.load(engine, backend="tensorrt")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(CapreseError, match="has no TensorRT plans.*--engine") as e:
        Generator.load(engine, backend="tensorrt")
    assert "\n" not in str(e.value)


def test_shared_weights_sessions_give_the_same_tokens(tmp_path_factory, tiny_model_dir):
    """share_weights: no prepacked copies, both sessions read the memory-mapped weights.bin."""
    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "qwen2", "griffin")
    g = Generator.load(engine, "onnxruntime", threads=1, share_weights=True)
    assert g.generate(ids(), 24, reselect_every=8, ignore_eos=True).tokens == \
        generator(engine, "onnxruntime").generate(ids(), 24, reselect_every=8, ignore_eos=True).tokens
    assert g.backend.describe()["share_weights"] is True


def test_latency_parity_onnxruntime_vs_torch_on_cpu(tmp_path_factory, tiny_model_dir, record_property):
    """The CPU twin of the TensorRT latency parity test: same engine folder, same prompt, PyTorch reference vs
    ONNX Runtime. Tokens must be identical; the times are reported (pytest's junit properties, shown in the
    "latency, reported not asserted" section at the end of the run by conftest.py), never asserted: a shared
    2-core machine."""
    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "llama", "griffin")
    prompt = ids()
    with one_torch_thread():
        ort = generator(engine, "onnxruntime").generate(prompt, NEW, ignore_eos=True)
        ref = generator(engine, "torch").generate(prompt, NEW, ignore_eos=True)
    assert ort.tokens == ref.tokens
    for name, r in (("onnxruntime", ort), ("torch", ref)):
        record_property(f"{name}_ms_per_token", round(r.stats.ms_per_token, 3))
        record_property(f"{name}_ttft_ms", round(r.stats.ttft_ms, 3))


def test_latency_report_stays_out_of_the_progress_line():
    """The latency numbers go to a section of the terminal summary, not into pytest's line of dots."""
    root = Path(__file__).resolve().parent.parent
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "tests/test_runtime.py::test_latency_parity_onnxruntime_vs_torch_on_cpu"],
                       cwd=root, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].split() == [".", "[100%]"], p.stdout  # the progress line holds the dot and nothing else
    head = next(i for i, ln in enumerate(lines) if "latency, reported not asserted" in ln)
    body = "\n".join(lines[head:])
    assert "onnxruntime_ms_per_token" in body and "torch_ms_per_token" in body, p.stdout


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_tensorrt_matches_torch_and_is_not_slower(tiny_model_dir, tmp_path):
    """Latency parity: the same engine folder (with plans) on TensorRT and on the PyTorch reference (CUDA):
    identical greedy tokens, and TensorRT's time per token not above PyTorch's."""
    from caprese.export.exporter import export

    engine = export(tiny_model_dir("llama"), tmp_path / "engine", max_seq_len=MAX_SEQ, engine=True).out
    prompt = ids()
    trt = Generator.load(engine, backend="tensorrt").generate(prompt, NEW, ignore_eos=True)
    ref = Generator.load(engine, backend="torch", device="cuda").generate(prompt, NEW, ignore_eos=True)
    assert trt.tokens == ref.tokens
    assert trt.stats.ms_per_token <= ref.stats.ms_per_token


@pytest.mark.gpu
def test_torch_backend_on_cuda_matches_onnxruntime(tmp_path_factory, tiny_model_dir):
    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "llama", "griffin")
    prompt = ids()
    ref = Generator.load(engine, backend="torch", device="cuda").generate(prompt, NEW, reselect_every=8,
                                                                        ignore_eos=True)
    assert ref.stats.peak_device_mb > 0
    assert generator(engine, "onnxruntime").generate(prompt, NEW, reselect_every=8, ignore_eos=True).tokens == \
        ref.tokens


@pytest.mark.gpu
@pytest.mark.parametrize("method,rho", [("dense", 0), ("griffin", 8), ("cats", 0)])
def test_cuda_graph_decode_equals_eager(method, rho, tmp_path_factory, tiny_model_dir):
    """The captured decode step replays the eager one: same tokens, across re-selections and a KV growth."""
    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "llama", method)
    prompt = ids()
    eager = Generator.load(engine, backend="torch", device="cuda", cuda_graph=False, static=False)
    graphed = Generator.load(engine, backend="torch", device="cuda")
    assert graphed.backend.describe()["cuda_graph"] is True
    a = eager.generate(prompt, NEW, reselect_every=rho, ignore_eos=True)
    b = graphed.generate(prompt, NEW, reselect_every=rho, ignore_eos=True)
    assert a.tokens == b.tokens
    assert graphed.generate(ids(9, seed=5), NEW, ignore_eos=True).tokens == \
        eager.generate(ids(9, seed=5), NEW, ignore_eos=True).tokens


def test_threads_default_leaves_torch_alone(tmp_path_factory, tiny_model_dir):
    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "llama", "dense")
    n = torch.get_num_threads()
    Generator.load(engine, backend="torch")
    assert torch.get_num_threads() == n


def test_auto_backend_picks_the_fastest_available(tmp_path_factory, tiny_model_dir, monkeypatch):
    """--backend auto: native for an fp32 engine on the CPU, onnxruntime where native cannot run it (fp16, or no
    kernel), torch on CUDA without plans or TensorRT, tensorrt with both; the Generator and its report say so."""
    import types

    from caprese.errors import CapreseError
    from caprese.export.manifest import load_manifest
    from caprese.runtime.engine_options import EngineOptions, choose_backend
    from caprese.runtime.native import library

    fp32, _ = get_export(tmp_path_factory, tiny_model_dir, "llama", "dense")
    fp16, _ = get_export(tmp_path_factory, tiny_model_dir, "llama", "dense", precision="fp16")
    m32, m16 = load_manifest(fp32), load_manifest(fp16)
    assert choose_backend(m32, "cpu")[0] == "native"
    name, why = choose_backend(m16, "cpu")
    assert name == "onnxruntime" and "fp32" in why
    assert choose_backend(m32, "cuda") == ("torch", "no TensorRT plans in the engine folder")
    with_plans = types.SimpleNamespace(engines={"shared": fp32 / "x.plan"})
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None if name == "tensorrt" else object())
    assert choose_backend(with_plans, "cuda") == ("torch", "TensorRT is not installed")
    monkeypatch.setattr("importlib.util.find_spec", lambda name: object())
    assert choose_backend(with_plans, "cuda")[0] == "tensorrt"

    def no_kernel(isa=None):
        raise CapreseError("found no C compiler")

    monkeypatch.setattr(library, "load", no_kernel)
    name, why = choose_backend(m32, "cpu")
    assert name == "onnxruntime" and "no C compiler" in why
    monkeypatch.undo()
    g = Generator.open(fp32, EngineOptions(threads=1))
    assert g.backend.name == "native" and g.backend_requested == "auto"
    r = g.generate(ids(), 4, ignore_eos=True)
    assert r.report().endswith("| backend: native (auto) (length)") and r.to_dict()["backend_requested"] == "auto"
    with pytest.raises(CapreseError, match="applies to --backend native"):
        Generator.open(fp16, EngineOptions(head="full"))


def test_run_options_are_generate_arguments_on_both_stacks(tmp_path_factory, tiny_model_dir):
    """TextModel.generate and Generator.generate take RunOptions' fields in RunOptions' order; run(prompt,
    options) is generate with them; both results report through GenerationStats.report."""
    import dataclasses
    import inspect

    from caprese.model import TextModel
    from caprese.model.run_options import RunOptions

    fields = [f.name for f in dataclasses.fields(RunOptions)]
    for generate in (TextModel.generate, Generator.generate):
        assert list(inspect.signature(generate).parameters)[2:] == fields + ["on_text"]
    engine, src = get_export(tmp_path_factory, tiny_model_dir, "llama", "dense")
    opts = RunOptions(max_new_tokens=6, ignore_eos=True)
    g = generator(engine, "onnxruntime")
    assert g.run(ids(), opts).tokens == g.generate(ids(), 6, ignore_eos=True).tokens
    tm = TextModel.load(src)
    with one_torch_thread():
        ref = tm.run(ids(), opts)
    assert ref.tokens == g.run(ids(), opts).tokens
    assert ref.report().endswith("| backend: torch (reference) (length)") and "ms/token" in ref.report()


def test_bad_api_input_is_one_capreseerror_on_every_stack(tmp_path_factory, tiny_model_dir):
    """Token ids outside the vocabulary, max_new_tokens < 1, an unknown device and bad sampling values are refused
    by name on the reference decoder and on every CPU backend. ONNX Runtime's Gather wraps a negative id (it read
    the embedding's last row), so nothing but this check stops it there."""
    from caprese.model import Sampling, TextModel
    from caprese.model.loading import load_decoder
    import os
    import shutil

    engine, src = get_export(tmp_path_factory, tiny_model_dir, "llama", "dense")
    tm = TextModel.load(src)
    vocab = tm.decoder.spec.vocab_size
    has_cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")  # the native kernel is built
    backends = ["onnxruntime", "torch"] + (["native"] if has_cc else [])
    runs = [tm.generate] + [generator(engine, b).generate for b in backends]
    for generate in runs:
        for bad, needle in (([-1], r"token id -1 is outside the vocabulary \(0\.\.\d+\)"),
                            ([1, vocab], f"token id {vocab} is outside"), ([1.5], "must be integers"),
                            ([True], "must be integers"), ([], "zero tokens")):
            with pytest.raises(CapreseError, match=needle) as e:
                generate(bad, 2)
            assert "\n" not in str(e.value)
        with pytest.raises(CapreseError, match="max_new_tokens must be >= 1; got 0"):
            generate(ids(), 0)
        with pytest.raises(CapreseError, match="leaves no room .* shorten it"):  # fewer new tokens cannot help
            generate(ids(300), 1)
        for text in ("", "  \n"):  # BOS alone would be a one-token prompt: a reply to nothing
            with pytest.raises(CapreseError, match="the prompt is empty"):
                generate(text, 2)
        with pytest.raises(TypeError, match="sampling must be a caprese.model.Sampling.*got dict"):
            generate(ids(), 2, {"temperature": 0.7})
    assert tm.generate(np.array(ids(), dtype=np.int64).tolist(), 1).tokens  # numpy-born ints are fine
    for device in ("tpu", "cuda:x"):
        with pytest.raises(CapreseError, match="unknown device"):
            TextModel.load(src, device=device)
        with pytest.raises(CapreseError, match="unknown device"):
            load_decoder(src, device=device)
    for field, value in (("temperature", -1.0), ("temperature", 1e-46), ("top_k", -2), ("top_p", 2.0), ("top_p", 0.0),
                         ("seed", 2**64),
                         ("seed", 1.5)):
        with pytest.raises(CapreseError, match=f"sampling {field} must be .*; got {value}"):
            Sampling(**{field: value})
    from caprese.calibration.calibrate import calibrate
    from caprese.calibration.data import synthetic_samples
    from caprese.calibration.recipe import CalibrationRecipe
    from caprese.evaluation import evaluate

    with pytest.raises(TypeError, match="task must be a Task"):
        evaluate(tm, "arithmetic")
    with pytest.raises(TypeError, match="must be caprese.calibration.data.Sample objects.*got a tuple"):
        calibrate(src, tmp_path_factory.mktemp("cal") / "out", CalibrationRecipe(), [([1, 2], [3, 4])])
    for arg, value in (("n", -1), ("response_tokens", 0), ("batch_size", 0)):
        kwargs = {"n": 1, "response_tokens": 4, "batch_size": 1, arg: value}
        n = kwargs.pop("n")
        with pytest.raises(CapreseError, match=f"synthetic_samples: {arg} must be an integer >= .*; got {value}"):
            synthetic_samples(tm, n, tmp_path_factory.mktemp("syn"), **kwargs)
