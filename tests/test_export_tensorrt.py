"""TensorRT engines. The build tests are marked `tensorrt` and skip where `import tensorrt` fails (our CPU
machines); the profile arithmetic and the missing-TensorRT message are checked everywhere."""

from __future__ import annotations

import sys

import pytest

from caprese.errors import CapreseError
from caprese.export import contract as C
from caprese.export.manifest import load_manifest
from caprese.export.tensorrt_build import TensorRTUnavailable, check_profile, import_tensorrt, profile_shapes

LAYOUT = C.GraphLayout(2, 64, 128, 2, 16, 384, "fp16", (C.GRIFFIN, C.CATS), k=64, rank=8)


def test_profiles_cover_every_input_and_are_ordered():
    for graph in C.GRAPHS:
        shapes = profile_shapes(LAYOUT, graph, max_batch=4, max_prompt_len=512, max_seq_len=2048)
        assert list(shapes) == [t.name for t in LAYOUT.inputs(graph)]
        for name, (lo, opt, hi) in shapes.items():
            assert all(1 <= a <= b <= c for a, b, c in zip(lo, opt, hi)), name
    pre = profile_shapes(LAYOUT, C.PREFILL, 4, 512, 2048)
    assert pre[C.INPUT_IDS] == ((1, 1), (1, 128), (4, 512))
    assert pre[C.past_key(1)] == ((1, 2, 1, 16), (1, 2, 2048, 16), (4, 2, 2048, 16))
    dec = profile_shapes(LAYOUT, C.DECODE, 1, 512, 2048)
    assert dec[C.INPUT_IDS] == ((1, 1), (1, 1), (1, 1)) and dec[C.w_gul(0)][2] == (1, 64, 2 * 64 + 8)


def test_bad_profiles_are_one_line_errors():
    with pytest.raises(CapreseError, match="min <= opt <= max"):
        check_profile("input_ids", (1, 8), (1, 4), (1, 16))
    with pytest.raises(CapreseError, match="different ranks"):
        check_profile("x", (1,), (1, 2), (1, 2))
    with pytest.raises(CapreseError, match="min <= opt <= max"):  # max_prompt_len > max_seq_len is refused too
        profile_shapes(LAYOUT, C.PREFILL, 1, max_prompt_len=64, max_seq_len=32)
    with pytest.raises(CapreseError, match="min <= opt <= max"):
        check_profile("x", (0, 1), (1, 1), (1, 1))


def test_missing_tensorrt_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(TensorRTUnavailable) as e:
        import_tensorrt()
    assert "TensorRT is not available" in str(e.value) and "--engine" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_build_engines_for_tiny_llama(tiny_model_dir, tmp_path):
    """Strongly typed, weight-stripped plans for both graphs, timing cache written and reused, manifest facts."""
    from caprese.export.exporter import export

    cache = tmp_path / "timing.cache"
    out = export(tiny_model_dir("llama"), tmp_path / "engine", max_seq_len=64, engine=True, timing_cache=cache).out
    m = load_manifest(out)
    assert set(m.engines) == set(C.GRAPHS) and all(p.stat().st_size > 0 for p in m.engines.values())
    trt = m.data["tensorrt"]
    assert trt["version"] and trt["compute_capability"] and trt["strongly_typed"] and trt["weights_stripped"]
    assert cache.is_file() and cache.stat().st_size > 0
    export(tiny_model_dir("llama"), tmp_path / "engine2", max_seq_len=64, engine=True, timing_cache=cache)


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_griffin_graphs_parse_in_tensorrt(tmp_path_factory, tiny_model_dir):
    """The parser (not only the static table check) accepts the GRIFFIN prefill and decode graphs."""
    from test_export_support import get_export

    trt = import_tensorrt()
    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "llama", "griffin")
    logger = trt.Logger(trt.Logger.WARNING)
    for graph in C.GRAPHS:
        builder = trt.Builder(logger)
        flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        network = builder.create_network(0 if flag is None else 1 << int(flag))
        parser = trt.OnnxParser(network, logger)
        ok = parser.parse_from_file(str(engine / C.GRAPH_FILES[graph]))
        assert ok, [str(parser.get_error(i)) for i in range(parser.num_errors)]
