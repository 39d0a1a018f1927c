"""The TensorRT backend's own logic with a stand-in `tensorrt` module and CPU tensors (no GPU, no TensorRT here):
which engine and profile each role's context uses, that every tensor is bound once with past_* and present_* at
one address, the static cache length, the per-call prefill shapes, and a failed CUDA-graph capture logged once.
The real TensorRT calls run in tests/test_tensorrt_gpu.py (marked tensorrt + gpu)."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import types

import pytest
import torch

from caprese.errors import CapreseError
from caprese.export import contract as C
from export_helpers import MAX_SEQ, copy_engine, get_export


class FakeContext:
    def __init__(self, engine):
        self.engine, self.profile, self.addresses, self.shapes, self.runs = engine, 0, {}, {}, 0
        self.shape_calls = []

    def set_optimization_profile_async(self, index, stream):
        assert 0 <= index < self.engine.num_optimization_profiles
        self.profile = index
        return True

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        self.shape_calls.append((name, tuple(shape)))
        return True

    def execute_async_v3(self, stream):
        self.runs += 1
        return True


class FakeEngine:
    def __init__(self, profiles):
        self.num_optimization_profiles = profiles
        self.contexts = []
        self.device_memory_size_v2 = 0

    def create_execution_context(self):
        self.contexts.append(FakeContext(self))
        return self.contexts[-1]


def fake_tensorrt(profiles_by_plan):
    engines = []

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, blob):
            engines.append(FakeEngine(profiles_by_plan[blob.decode()]))
            return engines[-1]

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    return types.SimpleNamespace(__version__="10.15.0", Runtime=Runtime, Logger=Logger), engines


def fake_gpu(monkeypatch):
    """torch.cuda stand-ins so the backend runs on CPU tensors; CUDA-graph capture fails. Called after the export
    (the exporter's imports read torch.cuda's real classes)."""
    stream = types.SimpleNamespace(cuda_stream=0, synchronize=lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "Stream", lambda: stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: (9, 0))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 0)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", type("FakeGraph", (), {}))

    def no_capture(graph, stream=None):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "graph", no_capture)
    from caprese.runtime import tensorrt_backend

    monkeypatch.setattr(tensorrt_backend.TensorRTBackend, "_alloc", staticmethod(_cpu_alloc))
    monkeypatch.setattr(tensorrt_backend, "FoldInto", lambda manifest, device: None)


def _cpu_alloc(b):
    from caprese.runtime.tensorrt_backend import _TORCH

    t = torch.zeros(b.shape, dtype=_TORCH[b.dtype])
    if b.fill is not None:
        t.fill_(b.fill)
    return t


def with_plans(engine, tmp_path):
    """A copy of `engine` whose manifest lists (fake) plans for its TensorRT graphs."""
    out = copy_engine(engine, tmp_path / "engine")
    m = json.loads((out / "manifest.json").read_text())
    plans = {}
    for name, record in m["tensorrt_graphs"]["engines"].items():
        plans[name] = C.TENSORRT_PLAN_FILES[name]
        (out / plans[name]).write_text(name)
    m["files"]["engines"] = plans
    m["tensorrt"] = {"version": "10.15.0", "compute_capability": "9.0", "weights_stripped": False}
    (out / "manifest.json").write_text(json.dumps(m))
    return out, {name: len(r["roles"]) for name, r in m["tensorrt_graphs"]["engines"].items()}


@pytest.mark.parametrize("method", ["dense", "cats"])
def test_one_engine_two_contexts_on_two_profiles(method, monkeypatch, tmp_path, tmp_path_factory, tiny_model_dir,
                                                 caplog):
    from caprese.runtime import Generator

    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "llama", method)
    fake_gpu(monkeypatch)
    folder, profiles = with_plans(engine, tmp_path)
    trt, engines = fake_tensorrt(profiles)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    g = Generator.load(folder, backend="tensorrt")
    b = g.backend
    assert len(engines) == 1 and b.runtime is not None  # one engine; the runtime kept with it
    pre, dec = b.contexts[C.PREFILL], b.contexts[C.DECODE]
    assert pre.engine is dec.engine is engines[0] and (pre.profile, dec.profile) == (0, 1)
    lay = b.layout
    for ctx in (pre, dec):
        for past, present in lay.in_place_pairs():
            assert ctx.addresses[past] == ctx.addresses[present] == b.buf[past].data_ptr()
        assert b.buf[C.past_key(0)].shape == (1, lay.num_kv_heads, MAX_SEQ, lay.head_dim)
    assert pre.addresses[C.past_key(0)] == dec.addresses[C.past_key(0)]  # one cache, both roles
    if method == "cats":
        assert not b.buf[f"{C.PREFILL}.{C.DECODE_FLAG}"].item() and b.buf[f"{C.DECODE}.{C.DECODE_FLAG}"].item()
    with caplog.at_level(logging.WARNING, logger="caprese.runtime.tensorrt_backend"):
        r = g.generate(list(range(10, 17)), 4, ignore_eos=True)
    assert len(r.tokens) == 4 and (C.INPUT_IDS, (1, 7)) in pre.shape_calls
    assert dec.runs == 3 + 1  # three steps + the capture's warm-up
    warnings = [rec for rec in caplog.records if "CUDA graph" in rec.getMessage()]
    assert len(warnings) == 1 and "not permitted" in b.describe()["cuda_graph_error"]
    assert b.describe()["cuda_graph"] is False


def test_griffin_two_engines_and_static_cache_policy(monkeypatch, tmp_path, tmp_path_factory, tiny_model_dir):
    from caprese.export.manifest import load_manifest
    from caprese.runtime.tensorrt_backend import TensorRTBackend

    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "llama", "griffin")
    fake_gpu(monkeypatch)
    folder, profiles = with_plans(engine, tmp_path)
    trt, engines = fake_tensorrt(profiles)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    b = TensorRTBackend(load_manifest(folder), cuda_graph=False)
    assert len(engines) == 2 and b.contexts[C.PREFILL].engine is not b.contexts[C.DECODE].engine
    assert b.contexts[C.DECODE].addresses[C.w_gul(0)] == b.buf[f"selection.{C.w_gul(0)}"].data_ptr()
    with pytest.raises(CapreseError, match="static KV length"):
        b.reserve(MAX_SEQ + 1)
    with pytest.raises(CapreseError, match="static length"):
        TensorRTBackend(load_manifest(folder), kv_policy="fit")
