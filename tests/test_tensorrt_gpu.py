"""TensorRT on a GPU, in the order tools/gpu_checks.sh runs them (the first failure is the cheapest to find):
parse -> build -> cache rows -> greedy tokens vs torch -> time at slot 10 vs S-10. Marked `tensorrt` and `gpu`:
they skip where `import tensorrt` fails or no CUDA GPU is visible (our CPU machines; the lent GPU has no TensorRT).

Every test works on the files TensorRT parses (manifest "tensorrt_graphs", static cache length) and the engines
`caprese-export --engine` builds from them: one engine with two profiles for dense / CATS, two for GRIFFIN.
"""

from __future__ import annotations

import time

import pytest
import torch

from caprese.export.manifest import load_manifest
from export_helpers import get_export, method_artifact, prompt_ids

pytestmark = [pytest.mark.tensorrt, pytest.mark.gpu]
SEQ = 64  # --max-seq-len of every engine built here
_BUILT: dict = {}


def built(tmp_path_factory, tiny_model_dir, kind: str, method: str = "dense", precision: str = "fp32"):
    """An engine folder with plans, built once per session for (kind, method, precision)."""
    from caprese.export.exporter import export

    key = (kind, method, precision)
    if key not in _BUILT:
        root = tmp_path_factory.mktemp(f"trt_{kind}_{method}_{precision}")
        src = tiny_model_dir(kind) if method == "dense" else method_artifact(tiny_model_dir(kind), root / "art", method)
        _BUILT[key] = export(src, root / "engine", precision=precision, max_seq_len=SEQ, engine=True).out
    return _BUILT[key]


# ---- 2. parse ----
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("method", ["dense", "griffin", "cats"])
def test_parse_tensorrt_graphs(method, precision, tmp_path_factory, tiny_model_dir, capsys):
    """TensorRT's ONNX parser accepts every file it is meant to parse (prefill and decode roles), strongly typed;
    every parser error is printed (with -s) before the assert."""
    from caprese.export.tensorrt_build import import_tensorrt

    trt = import_tensorrt()
    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "llama", method, precision=precision)
    logger = trt.Logger(trt.Logger.WARNING)
    errors = {}
    for name, path in load_manifest(engine).tensorrt_graphs.items():
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(path)):
            errors[path.name] = [str(parser.get_error(i)) for i in range(parser.num_errors)]
    with capsys.disabled():
        for name, errs in errors.items():
            for e in errs:
                print(f"[parse {method}/{precision}] {name}: {e}")
    assert errors == {}


# ---- 3. build ----
@pytest.mark.parametrize("kind,method", [("llama", "dense"), ("llama", "griffin"), ("llama", "cats"),
                                         ("qwen2", "dense"), ("gemma2", "dense"), ("qwen3", "dense")])
def test_build_engines(kind, method, tmp_path_factory, tiny_model_dir):
    """--max-seq-len 64: tiny Llama (GQA 3:1, head_dim 24) in each method, then Qwen2 (GQA, sliding window),
    Gemma 2 (soft-cap) and Qwen3 (q/k norms). One engine with two profiles unless GRIFFIN."""
    m = load_manifest(built(tmp_path_factory, tiny_model_dir, kind, method))
    engines = m.layout.tensorrt_engines()
    assert set(m.engines) == set(engines)
    assert {e: len(p) for e, p in m.data["tensorrt"]["profiles"].items()} == {e: len(r) for e, r in engines.items()}


# ---- 4. only the written cache rows change ----
@pytest.mark.parametrize("method", ["dense", "cats", "griffin"])
def test_only_written_cache_rows_change(method, tmp_path_factory, tiny_model_dir):
    from caprese.runtime import Generator

    g = Generator.load(built(tmp_path_factory, tiny_model_dir, "llama", method), backend="tensorrt", cuda_graph=False)
    b = g.backend
    b.reserve(SEQ)
    for t in b.buf.values():
        if t.dtype.is_floating_point:
            t.zero_()
    out = b.prefill(list(range(10, 16)), 0)
    b.select(out.griffin, out.tau)
    before = {k: b.buf[k].clone() for k, _ in b.layout.in_place_pairs()}
    assert all(t[:, :, :6].abs().sum() > 0 and not t[:, :, 6:].any() for t in before.values())
    b.decode(16, 6)
    for k, t in before.items():
        after = b.buf[k]
        assert torch.equal(after[:, :, :6], t[:, :, :6]), k
        assert after[:, :, 6].abs().sum() > 0 and not after[:, :, 7:].any(), k
    b.prefill([20, 21, 22], 7)  # a chunk at slot 7..9: rows 0..6 untouched
    for k, t in before.items():
        assert torch.equal(b.buf[k][:, :, :6], t[:, :, :6]) and not b.buf[k][:, :, 10:].any(), k


# ---- 5. greedy tokens equal torch's, CUDA graph on and off ----
@pytest.mark.parametrize("cuda_graph", [True, False])
@pytest.mark.parametrize("method", ["dense", "cats", "griffin"])
def test_greedy_tokens_match_torch(method, cuda_graph, tmp_path_factory, tiny_model_dir, capsys):
    from caprese.runtime import Generator

    engine = built(tmp_path_factory, tiny_model_dir, "llama", method)
    prompt = prompt_ids(14, seed=3)[0].tolist()
    trt = Generator.load(engine, backend="tensorrt", cuda_graph=cuda_graph)
    got = trt.generate(prompt, 33, ignore_eos=True)
    ref = Generator.load(engine, backend="torch", device="cuda").generate(prompt, 33, ignore_eos=True)
    with capsys.disabled():
        print(f"[greedy {method} cuda_graph={cuda_graph}] {trt.backend.describe()}")
    assert got.tokens == ref.tokens


# ---- 6. time per step at slot 10 vs slot S - 10 ----
def test_time_at_slot_10_vs_end(tmp_path_factory, tiny_model_dir, capsys):
    """The static cache makes every step attend over S slots: the time at slot 10 and at S - 10 is printed (a
    measurement, not asserted: machines are noisy); both steps must run and give finite logits."""
    from caprese.runtime import Generator

    b = Generator.load(built(tmp_path_factory, tiny_model_dir, "llama"), backend="tensorrt").backend
    b.reserve(SEQ)
    b.prefill(list(range(10, 20)), 0)
    times = {}
    for slot in (10, SEQ - 10):
        logits = b.decode(5, slot)  # warm-up (and CUDA-graph capture)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(50):
            logits = b.decode(5, slot)
        torch.cuda.synchronize()
        times[slot] = (time.perf_counter() - t0) / 50 * 1e3
        assert torch.isfinite(logits).all()
    with capsys.disabled():
        print(f"[slot timing, S={SEQ}] slot 10: {times[10]:.3f} ms, slot {SEQ - 10}: {times[SEQ - 10]:.3f} ms, "
              f"ratio {times[SEQ - 10] / times[10]:.2f} ({torch.cuda.get_device_name(0)})")
