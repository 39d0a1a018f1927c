"""TensorRT engines: the optimization-profile arithmetic and the missing-TensorRT message, everywhere; the build
itself is marked `tensorrt` and skips where `import tensorrt` fails (our CPU machines)."""

from __future__ import annotations

import sys

import pytest

from caprese.errors import CapreseError
from caprese.export import contract as C
from caprese.export.manifest import load_manifest
from caprese.export.tensorrt_build import (TensorRTUnavailable, check_profile, engine_profiles, import_tensorrt,
                                           role_profile)

CATS = C.GraphLayout(2, 64, 128, 2, 16, 384, "fp16", (C.CATS, C.DENSE), rank=8)
GRIFFIN = C.GraphLayout(2, 64, 128, 2, 16, 384, "fp16", (C.GRIFFIN, C.CATS), k=64, rank=8)
S = 2048


def _ordered(profile):
    return all(1 <= a <= b <= c for lo, opt, hi in profile.values() for a, b, c in zip(lo, opt, hi))


def test_shared_engine_has_a_prefill_and_a_decode_profile():
    """Dense / CATS: one engine, profile 0 = prefill (seq 1..max_prompt_len), profile 1 = decode (seq 1); the cache
    is static at max_seq_len in both, so only batch and seq vary; decode_flag (a scalar) needs no profile."""
    prefill, decode = engine_profiles(CATS, C.TRT_SHARED, S, max_batch=4, max_prompt_len=512)
    dynamic = [t.name for t in CATS.tensorrt_io(C.TRT_SHARED, S)["inputs"] if t.shape]
    assert list(prefill) == list(decode) == dynamic and C.DECODE_FLAG not in prefill
    assert _ordered(prefill) and _ordered(decode)
    assert prefill[C.INPUT_IDS] == ((1, 1), (1, 128), (4, 512))
    assert decode[C.INPUT_IDS] == decode[C.POSITION_IDS] == ((1, 1), (1, 1), (4, 1))
    for p in (prefill, decode):
        assert p[C.past_key(1)] == ((1, 2, S, 16), (1, 2, S, 16), (4, 2, S, 16))  # static length, every profile
        assert p[C.ATTENTION_MASK] == ((1, S), (1, S), (4, S))
        assert p[C.cats_tau_in(0)] == ((1,), (1,), (4,))
    short = engine_profiles(CATS, C.TRT_SHARED, 64, max_batch=1, max_prompt_len=40)[0]
    assert short[C.INPUT_IDS] == ((1, 1), (1, 40), (1, 40))  # opt never exceeds max


def test_griffin_has_two_engines_of_one_profile():
    assert GRIFFIN.tensorrt_engines() == {C.PREFILL: (C.PREFILL,), C.DECODE: (C.DECODE,)}
    [pre] = engine_profiles(GRIFFIN, C.PREFILL, S, 1, 512)
    [dec] = engine_profiles(GRIFFIN, C.DECODE, S, 2, 512)
    assert pre[C.INPUT_IDS][2] == (1, 512) and dec[C.INPUT_IDS] == ((1, 1), (1, 1), (2, 1))
    assert dec[C.w_gul(0)] == ((1, 64, 2 * 64 + 8), (1, 64, 2 * 64 + 8), (2, 64, 2 * 64 + 8))
    assert dec[C.past_value(0)][2] == (2, 2, S, 16) and C.cats_tau(1) in dec


def test_bad_profiles_are_one_line_errors():
    with pytest.raises(CapreseError, match="min <= opt <= max"):
        check_profile("input_ids", (1, 8), (1, 4), (1, 16))
    with pytest.raises(CapreseError, match="different ranks"):
        check_profile("x", (1,), (1, 2), (1, 2))
    with pytest.raises(CapreseError, match="min <= opt <= max"):
        check_profile("x", (0, 1), (1, 1), (1, 1))
    with pytest.raises(CapreseError, match="max_prompt_len"):  # a prompt must leave room in the static cache
        engine_profiles(CATS, C.TRT_SHARED, 32, 1, max_prompt_len=32)
    with pytest.raises(CapreseError, match="symbolic cache length"):  # the ONNX Runtime graphs are not TensorRT's
        role_profile(CATS.inputs(C.PREFILL), C.PREFILL, 1, 16)
    with pytest.raises(CapreseError, match="max batch"):
        engine_profiles(CATS, C.TRT_SHARED, S, 0, 16)


def test_missing_tensorrt_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(TensorRTUnavailable) as e:
        import_tensorrt()
    assert "TensorRT is not available" in str(e.value) and "--engine" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.parametrize("method", ["dense", "cats", "griffin"])
def test_build_engines_for_tiny_llama(method, tiny_model_dir, tmp_path):
    """Strongly typed, weight-stripped plans: ONE engine with two profiles for dense and CATS, two engines for
    GRIFFIN; the timing cache written and reused; the manifest records version, GPU and profiles."""
    from caprese.export.exporter import export
    from export_helpers import method_artifact

    src = tiny_model_dir("llama") if method == "dense" else method_artifact(tiny_model_dir("llama"),
                                                                               tmp_path / "art", method)
    cache = tmp_path / "timing.cache"
    out = export(src, tmp_path / "engine", max_seq_len=64, engine=True, timing_cache=cache).out
    m = load_manifest(out)
    engines = m.layout.tensorrt_engines()
    assert set(m.engines) == set(engines) and all(p.stat().st_size > 0 for p in m.engines.values())
    trt = m.data["tensorrt"]
    assert trt["version"] and trt["compute_capability"] and trt["strongly_typed"] and trt["weights_stripped"]
    assert {e: len(p) for e, p in trt["profiles"].items()} == {e: len(r) for e, r in engines.items()}
    assert cache.is_file() and cache.stat().st_size > 0
    export(src, tmp_path / "engine2", max_seq_len=64, engine=True, timing_cache=cache)
