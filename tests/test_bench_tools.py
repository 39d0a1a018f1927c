"""tools/bench_decode.py on a tiny model: the caprese ONNX Runtime rows, one repeat, a few tokens, GenAI skipped.

Structure only (rows present, positive numbers, engines cached and reused); timing is never asserted."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "tools" / "bench_decode.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_decode", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


def test_parse_rows(bench):
    assert bench.parse_rows("all") == list(bench.ROW_NAMES)
    assert bench.parse_rows("ort-dense,genai-dense") == ["genai-dense", "ort-dense"]  # canonical order
    with pytest.raises(ValueError, match="unknown row"):
        bench.parse_rows("ort-dense,nope")


def test_caprese_onnxruntime_rows(bench, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "measure_round_trip_ns", lambda: 60.0)
    model = tiny_model_dir("llama")
    rows = list(bench.ORT_ROWS)
    logs: list[str] = []
    kw = dict(prompt_tokens=8, new_tokens=6, repeats=1, threads=1, rank=8, out_dir=tmp_path / "cache",
              bandwidth_mb=8, settle_s=0.0, log=logs.append)
    res = bench.run_bench(model, rows, **kw)
    json.dumps(res)  # serialisable as printed
    assert [r["row"] for r in res["rows"]] == rows
    assert res["peer"] is None and res["skipped"] == {}
    assert res["measured_bandwidth_gbs"] > 0
    for r in res["rows"]:
        assert r["backend"] == "onnxruntime"
        for k in ("ms_per_token", "tokens_per_s", "bytes_per_step", "gb_per_s", "floor_ms_per_token",
                  "ratio_to_floor"):
            assert r[k] > 0, (r["row"], k)
        assert len(r["ms_per_token_samples"]) == 1
        # one round: its own bandwidth sample is the median, so the per-round ratio is the ratio
        assert r["ratio_to_floor_per_round"] == pytest.approx([r["ratio_to_floor"]], rel=2e-3)
        assert r["ratio_to_peer"] is None
        assert (tmp_path / "cache" / f"{r['row']}-fp32" / "manifest.json").is_file()
    by = {r["row"]: r for r in res["rows"]}
    assert by["ort-dense"]["label"] == "caprese dense"
    assert by["ort-griffin"]["label"] == "GRIFFIN(d=0.5, all layers)"
    assert by["ort-caprese-griffin"]["label"] == "Caprese(GRIFFIN, d=0.5, all layers, r=8)"
    assert by["ort-caprese-cats"]["label"] == "Caprese(CATS, d=0.5, all layers, r=8)"
    assert by["ort-contrib-dense"]["label"] == "caprese dense [ORT ops]"
    assert by["ort-caprese-griffin"]["adapters"].startswith("random-init")
    # the approximated decode steps read fewer bytes than the dense one
    assert by["ort-griffin"]["bytes_per_step"] < by["ort-dense"]["bytes_per_step"]
    assert by["ort-contrib-dense"]["bytes_per_step"] == by["ort-dense"]["bytes_per_step"]
    assert set(res["targets"]) == {"ort-dense", "ort-caprese-griffin", "ort-contrib-dense",
                                   "ort-contrib-caprese-griffin"}
    assert res["targets"]["ort-dense"]["met_peer"] is None  # no peer row
    table = bench.format_table(res)
    assert all(name in table for name in rows)

    # round trips before and after each round (fixed here: the 2-vCPU EPYC VMs move their vCPUs between CCDs
    # within seconds, and a round whose two differ is "moved"; test_floor_ratios_by_placement covers that)
    assert res["core_round_trip_ns_samples"] == [[60.0, 60.0]]
    assert res["placements"] is None  # one placement: no split
    assert "ratio_to_floor_by_placement" not in by["ort-dense"]

    # a second run reuses the cached engines (no export)
    logs.clear()
    again = bench.run_bench(model, ["ort-dense"], **kw)
    assert not any("exporting" in m for m in logs)
    assert again["rows"][0]["row"] == "ort-dense"


def test_floor_ratios_by_placement(bench, tiny_model_dir, tmp_path, monkeypatch):
    """Rounds whose round trips fall into two groups get their floor ratios split by placement; the split matches
    the per-round ratios and the table says it. A round whose round trips before and after it disagree is
    "moved", not counted in either placement."""
    trips = iter([60.0, 62.0, 400.0, 390.0, 65.0, 61.0, 58.0, 380.0])
    monkeypatch.setattr(bench, "measure_round_trip_ns", lambda: next(trips))
    res = bench.run_bench(tiny_model_dir("llama"), ["ort-dense"], prompt_tokens=8, new_tokens=4, repeats=4,
                          threads=1, out_dir=tmp_path / "cache", bandwidth_mb=8, settle_s=0.0, log=lambda m: None)
    assert res["core_round_trip_ns_samples"] == [[60.0, 62.0], [400.0, 390.0], [65.0, 61.0], [58.0, 380.0]]
    assert res["placements"] == ["near", "far", "near", "moved"]
    r = res["rows"][0]
    per = r["ratio_to_floor_per_round"]
    split = r["ratio_to_floor_by_placement"]
    assert split["far"] == {"rounds": 1, "median": per[1]}
    assert split["moved"] == {"rounds": 1, "median": per[3]}
    assert split["near"]["rounds"] == 2
    assert split["near"]["median"] == pytest.approx((per[0] + per[2]) / 2, abs=1e-3)
    assert res["targets"]["ort-dense"]["ratio_to_floor_by_placement"] == split
    table = bench.format_table(res)
    assert "core-to-core round trip before / after each round [[60.0, 62.0], [400.0, 390.0]" in table
    assert f"rounds with the threads far (1): median {per[1]:.3f}x" in table


def test_placements_need_two_groups(bench):
    assert bench.placements([[55.0], [60.0], [340.0], [58.0]]) == ["near", "near", "far", "near"]
    assert bench.placements([[55.0], [60.0], [100.0]]) is None  # within 3x: one placement
    assert bench.placements([[55.0], [None], [340.0]]) is None  # a round not measured
    assert bench.placements([]) is None
    assert bench.placements([[55.0, 58.0], [340.0, 360.0], [60.0, 350.0]]) == ["near", "far", "moved"]
    assert bench.placements([[55.0, None]]) is None


needs_cc = pytest.mark.skipif(
    not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")),
    reason="no C compiler (the native kernel is built with one)")


@pytest.fixture
def screened_by_default(monkeypatch):
    """The native rows' default head is the load-time probe's choice; on these tiny heads it is made "screened"
    so that the rows' bytes differ from the full head's."""
    from caprese.runtime import native_backend
    from caprese.runtime.native.head_choice import HeadChoice

    monkeypatch.setattr(native_backend, "choose",
                        lambda key, full, screened, folder: HeadChoice("screened", 1.0, 2.0, 1, "cached"))


@needs_cc
def test_round_trip_between_two_cpus(bench, monkeypatch):
    """tools/core_round_trip.c: a positive time between two CPUs of this process; None with one CPU, or with a CPU
    the threads cannot be pinned to (the C side's -1)."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU")
    before = os.sched_getaffinity(0)
    ns = bench.measure_round_trip_ns(iters=2000)
    assert ns is not None and 0 < ns < 1e6
    assert os.sched_getaffinity(0) == before  # the calling thread gets its own affinity back
    t0 = time.perf_counter()  # a bound on the time: round trips stretched by other work cannot hold the bench
    assert bench.measure_round_trip_ns(iters=10**15, max_s=0.05) > 0
    assert time.perf_counter() - t0 < 10
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert bench.measure_round_trip_ns(iters=10) is None
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1000})
    assert bench.measure_round_trip_ns(iters=10) is None


@needs_cc
def test_native_rows_run_the_onnxruntime_target_engines(bench, tiny_model_dir, tmp_path, screened_by_default):
    """native-* rows time the native backend on the engine folder of their ort-* row (exported once, shared) and
    give that row's greedy tokens; each names its instruction set and head, and its ratio to ONNX Runtime on the
    same engine."""
    from caprese.runtime.native import library

    model = tiny_model_dir("llama")
    logs: list[str] = []
    res = bench.run_bench(model, ["ort-contrib-dense", "native-dense", "native-caprese-griffin",
                                  "native-dense-full-head"], prompt_tokens=8,
                          new_tokens=6, repeats=1, threads=1, rank=8, out_dir=tmp_path / "cache", bandwidth_mb=8,
                          settle_s=0.0, log=logs.append)
    by = {r["row"]: r for r in res["rows"]}
    isa = library.best_isa()
    assert by["native-dense"]["backend"] == "native"
    assert by["native-dense"]["label"] == f"caprese dense [native {isa}]" and by["native-dense"]["isa"] == isa
    assert by["native-dense"]["engine"] == by["ort-contrib-dense"]["engine"]
    assert by["native-caprese-griffin"]["engine"].endswith("ort-contrib-caprese-griffin-fp32")
    assert sum("exporting" in m for m in logs) == 2  # the two ort-contrib engines, nothing for native
    assert by["native-dense"]["first_tokens"] == by["ort-contrib-dense"]["first_tokens"]
    assert by["native-dense-full-head"]["label"] == f"caprese dense [native {isa}, full head]"
    assert by["native-dense-full-head"]["first_tokens"] == by["native-dense"]["first_tokens"]
    assert by["native-dense-full-head"]["bytes_per_step"] > by["native-dense"]["bytes_per_step"]
    assert by["native-dense"]["head_rows_per_step"] >= 1 and "head_rows_per_step" not in by["native-dense-full-head"]
    assert by["native-dense"]["head"] == "screened" and by["native-dense-full-head"]["head"] == "full"
    assert by["native-dense"]["kernel"]["phases"] > 0
    prof = by["native-dense-full-head"]["profile_us"]  # the full head: one phase, no screening
    assert {"qkv", "attention+o", "gate_up", "down", "head_full"} == set(prof) - {"between", "step", "phases_per_step"}
    x = by["native-dense"]["ms_per_token"] / by["ort-contrib-dense"]["ms_per_token"]
    assert by["native-dense"]["ratio_to_same_engine_ort"] == pytest.approx(x, abs=1e-3)
    assert by["native-caprese-griffin"].get("ratio_to_same_engine_ort") is None  # its ORT row did not run
    assert {"native-dense", "native-caprese-griffin", "native-dense-full-head"} <= set(res["targets"])
    assert res["targets"]["native-dense head"]["ratio_to_full_head"] == pytest.approx(
        by["native-dense"]["ms_per_token"] / by["native-dense-full-head"]["ms_per_token"], abs=1e-3)
    table = bench.format_table(res)
    assert "x ORT" in table and res["background_load"] == 0
    assert "native-dense-full-head: µs per step by phase (median of runs): qkv " in table


@needs_cc
def test_native_rows_per_instruction_set(bench, tiny_model_dir, tmp_path, screened_by_default):
    """--native-isa A,B: every native row once per instruction set (the second named ROW@B), same tokens; an
    AVX2 row gets the "AVX2 at least matches ONNX Runtime" target."""
    from caprese.runtime.native import library

    if not library.X86:
        pytest.skip("the x86-64 builds")
    isas = [library.best_isa(), "scalar"] + (["avx2"] if library.best_isa() == "avx512" else [])
    res = bench.run_bench(tiny_model_dir("llama"), ["ort-contrib-dense", "native-dense"], prompt_tokens=8,
                          new_tokens=4, repeats=1, threads=1, out_dir=tmp_path / "cache", bandwidth_mb=8,
                          settle_s=0.0, log=lambda m: None, native_isas=isas)
    by = {r["row"]: r for r in res["rows"]}
    assert [r["row"] for r in res["rows"]] == ["ort-contrib-dense", "native-dense"] + [
        f"native-dense@{i}" for i in isas[1:]]
    for i in isas[1:]:
        row = by[f"native-dense@{i}"]
        assert row["isa"] == i and f"[native {i}]" in row["label"]
        assert row["first_tokens"] == by["native-dense"]["first_tokens"]
        assert row["ratio_to_same_engine_ort"] is not None
    if "avx2" in isas:
        assert res["targets"]["native-dense@avx2 (avx2)"]["max"] == 1.0


@needs_cc
def test_auto_threads_leave_every_row_its_policy(bench, tiny_model_dir, tmp_path, monkeypatch):
    """threads=0 ("auto"): no row gets a count, so the native row's working threads follow caprese.cpu_threads
    (here 1 free CPU of 2), and each bandwidth sample runs on the policy's count; the result says so."""
    from caprese import cpu_threads

    monkeypatch.setattr(cpu_threads, "_pinned", None)  # the conftest pins 1
    for var in ("CAPRESE_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(cpu_threads, "usable_cpus", lambda: 2)
    monkeypatch.setattr(cpu_threads, "default_threads", lambda: 1)
    res = bench.run_bench(tiny_model_dir("llama"), ["native-dense"], prompt_tokens=8, new_tokens=4, repeats=2,
                          threads=0, out_dir=tmp_path / "cache", bandwidth_mb=8, settle_s=0.0, log=lambda m: None)
    row = res["rows"][0]
    assert res["threads"] == "auto" and res["bandwidth_sample_threads"] == [1, 1]
    assert row["threads_after_runs"] == [1, 1, 1]  # warm-up and two rounds, on 1 of a pool of 2


def test_threads_flag_takes_a_count_or_auto(bench):
    import argparse

    assert bench.threads_arg("auto") == 0 and bench.threads_arg("3") == 3
    for bad in ("0", "-1", "x", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.threads_arg(bad)


def test_background_load_starts_and_stops_its_processes(bench):
    """N busy processes run inside the block and are gone after it, also when the block raises; each ends by
    itself at its time bound; a negative N is refused."""
    import time

    with bench.BackgroundLoad(2, max_s=60) as load:
        pids = [p.pid for p in load.procs]
        assert load.alive() == 2 and len(set(pids)) == 2
    assert load.procs == [] and not any(_running(p) for p in pids)
    with pytest.raises(RuntimeError, match="boom"):
        with bench.BackgroundLoad(1, max_s=60) as load:
            pid = load.procs[0].pid
            raise RuntimeError("boom")
    assert not _running(pid)
    with bench.BackgroundLoad(1, max_s=0.3) as load:
        t0 = time.monotonic()
        while load.alive() and time.monotonic() - t0 < 30:
            time.sleep(0.05)
        assert load.alive() == 0  # ended by itself at its deadline
    with pytest.raises(ValueError, match="background-load"):
        bench.BackgroundLoad(-1)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] not in ("Z", "X")
    except OSError:
        return False


@needs_cc
def test_contended_bench_has_the_same_engine_targets(bench, tiny_model_dir, tmp_path, screened_by_default,
                                                     monkeypatch):
    """--background-load 1: the rounds run next to a busy process, the result says so, and every native row with
    its ONNX Runtime row gets the <= 1.10x target; no busy process is left afterwards."""
    started: list[int] = []

    class Recorded(bench.BackgroundLoad):
        def __enter__(self):
            out = super().__enter__()
            started.extend(p.pid for p in self.procs)
            return out

    monkeypatch.setattr(bench, "BackgroundLoad", Recorded)
    res = bench.run_bench(tiny_model_dir("llama"), ["ort-contrib-dense", "native-dense"], prompt_tokens=8,
                          new_tokens=4, repeats=1, threads=1, out_dir=tmp_path / "cache", bandwidth_mb=8,
                          settle_s=0.0, log=lambda m: None, background_load=1)
    assert res["background_load"] == 1 and "1 busy process started by the bench" in bench.format_table(res)
    t = res["targets"]["native-dense (contended)"]
    assert t["max"] == 1.10 and t["met"] == (t["ratio_to_same_engine_ort"] <= 1.10)
    assert len(started) == 1 and not _running(started[0])
    assert res["core_round_trip_ns_samples"] == [[None, None]]  # not measured next to the busy processes


def test_genai_row_skips_with_a_reason(bench, tiny_model_dir, tmp_path, monkeypatch):
    """Without onnxruntime-genai (simulated), the peer row is skipped with the reason, the rest still runs."""
    monkeypatch.setattr(bench, "genai_unavailable", lambda: "onnxruntime-genai is not importable (simulated)")
    res = bench.run_bench(tiny_model_dir("llama"), ["genai-dense", "ort-dense"], prompt_tokens=8, new_tokens=4,
                          repeats=1, threads=1, out_dir=tmp_path / "cache", bandwidth_mb=8, settle_s=0.0,
                          log=lambda m: None)
    assert "simulated" in res["skipped"]["genai-dense"]
    assert [r["row"] for r in res["rows"]] == ["ort-dense"]
    assert "skipped" in bench.format_table(res)


def test_gpu_bench_smoke_on_cpu():
    """tools/bench_gpu.py's pieces on the tiny shape, on CPU (no CUDA graph): both rows timed, and the byte count
    equal to one written out from the shape (attention, FFN or its GRIFFIN slice + bypass, norms, the token's
    embedding row, the tied LM head, K/V of every allocated slot)."""
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH.parent / "bench_gpu.py")
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    dec = gpu.random_decoder("tiny", "fp32", "cpu")
    s = gpu.SHAPES["tiny"]
    d, f, n, hq, hkv, hd, v = (s[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                              "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size"))
    attn = 2 * d * hq * hd + 2 * d * hkv * hd
    slots = 80
    kv = 2 * n * hkv * hd * slots
    assert gpu.bytes_per_step(dec, slots) == 4 * (n * (attn + 3 * d * f + 2 * d) + d + d + v * d + kv)
    res = gpu.run(dec, ["dense", "caprese-griffin"], prompt_tokens=6, new_tokens=3, repeats=1, density=0.5, rank=8,
                  cuda_graph=False, bandwidth_mb=8, log=lambda m: None)
    k = f // 2
    by = {r["row"]: r for r in res["rows"]}
    slots = 6 + 3 + 1
    assert by["caprese-griffin"]["bytes_per_step"] == 4 * (n * (attn + 3 * d * k + 2 * d * 8 + 2 * d) + 2 * d + v * d
                                                           + 2 * n * hkv * hd * slots)
    assert all(r["ms_per_token"] > 0 for r in res["rows"])
    assert set(res["targets"]) == {"dense_bandwidth_share", "caprese_time_vs_bytes"}
    json.dumps(res)


def test_gemv_inputs_forms_compute_the_same_chain():
    """tools/bench_gemv_inputs.py times three forms of one product chain: each must compute it (float64
    reference; fp32 over 4 products of width <= 24 stays within 1e-5 relative)."""
    spec = importlib.util.spec_from_file_location("bench_gemv_inputs", BENCH.parent / "bench_gemv_inputs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rng = np.random.default_rng(1)
    weights = [rng.standard_normal(s, dtype=np.float32) for s in [(8, 24), (24, 8), (8, 24), (24, 8)]]
    ref = np.ones((1, 8))
    for w in weights:
        ref = ref @ w.astype(np.float64)
    for form in mod.FORMS:
        sess, binding = mod.build(form, weights, 8, threads=1)
        sess.run_with_iobinding(binding)
        got = binding.copy_outputs_to_cpu()[0]
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max(), err_msg=form)
    res = mod.measure(8, 24, 2, threads=1, repeats=1, runs=1)
    assert set(res["rows"]) == set(mod.FORMS) and res["rows"]["init"]["x_init"] == 1.0


@pytest.mark.skipif(not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")) or not shutil.which("git")
                    or not (BENCH.parents[1] / ".git").exists(), reason="needs a C compiler and a git checkout")
def test_quant_gemv_ab_runs_both_builds(capsys):
    """tools/ab_quant_gemv.py builds this tree's kernel and a revision's, times both on one small shape and prints
    the ratio; a revision git does not know is a one-line error."""
    spec = importlib.util.spec_from_file_location("ab_quant_gemv", BENCH.parent / "ab_quant_gemv.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--baseline", "HEAD", "--shapes", "24x256", "--threads", "1", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    row = next(ln.split() for ln in out.splitlines() if ln.split()[:2] == ["24x256", "1"])
    assert float(row[2]) > 0 and float(row[3]) > 0 and float(row[4]) > 0, out
    with pytest.raises(SystemExit, match="error: git show no-such-revision"):
        mod.main(["--baseline", "no-such-revision", "--shapes", "24x256", "--rounds", "1"])
    with pytest.raises(SystemExit, match="not ROWSxCOLS"):
        mod.main(["--baseline", "HEAD", "--shapes", "24by256"])
    with pytest.raises(SystemExit, match="error: unknown native instruction set 'bogus'"):
        mod.main(["--baseline", "HEAD", "--isa", "bogus"])


def test_gpu_checks_script_runs_on_cpu(tmp_path):
    """tools/gpu_checks.sh (what a session lent a GPU runs in one go) on this CPU: the gpu/tensorrt tests skip,
    the GPU bench runs its smoke shape, and both logs and the bench JSON land in $OUT."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "TEST_TIMEOUT": "120",
           "BENCH_ARGS": "--shape tiny --device cpu --precision fp32 --rank 8 --repeats 1 --new-tokens 3 "
                         "--prompt-tokens 6 --bandwidth-mb 8"}
    proc = subprocess.run(["bash", str(BENCH.parent / "gpu_checks.sh")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "tests exit 0, bench exit 0" in proc.stdout
    assert {p.name for p in tmp_path.iterdir()} == {"env.txt", "pytest.log", "bench_gpu.log", "bench_gpu.json"}
    assert [r["row"] for r in json.loads((tmp_path / "bench_gpu.json").read_text())["rows"]] == \
        ["dense", "caprese-griffin"]


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 1, 96), (4, 2, 16), (6, 2, 24)])
def test_attention_bench_matches_torch(heads, kv_heads, head_dim, capsys):
    """tools/bench_attention.py times the native attention of one step against PyTorch's on the same q / K / V and
    prints the largest difference of the outputs: within 2e-5 (fp32 sums in another order; |out| < 4) on every
    build, every cache (fp32; fp16 with K in rows, and as the step keeps it: 16-slot tiles on AVX-512 builds), 40
    slots (two 16-row key tiles and 8 rows past them) and 300 (a second 256-slot block, starting mid-tile). GQA 3:1
    at head_dim 64 and 4:1 at 96 reach the fp16 cache's multi-head key tiles (3, 2 + 2) and the 64-column value
    pass; head_dim 24 the scalar tails."""
    from caprese.runtime.native import library

    spec = importlib.util.spec_from_file_location("bench_attention", BENCH.parent / "bench_attention.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    isas = ",".join(i for i in ("avx512", "avx2", "scalar") if i == "scalar" or library.best_isa() in (i, "avx512"))
    assert mod.main(["--heads", str(heads), "--kv-heads", str(kv_heads), "--head-dim", str(head_dim),
                     "--slots", "40,300", "--kv", "fp32,fp16,fp16-rows", "--isa", isas, "--samples", "1",
                     "--sample-ms", "1"]) == 0
    rows = [ln.split() for ln in capsys.readouterr().out.splitlines()
            if ln.split()[:1] in (["fp32"], ["fp16"], ["fp16-rows"])]
    assert len(rows) == 3 * 2 * len(isas.split(","))
    for kv, slots, isa, us, macs, torch_us, ratio, diff in rows:
        assert float(us) > 0 and float(torch_us) > 0 and float(diff) < 2e-5, (kv, slots, isa, diff)
    with pytest.raises(SystemExit):
        mod.main(["--heads", "9", "--kv-heads", "2"])
