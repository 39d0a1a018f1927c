#!/usr/bin/env python3
"""One decode step's attention of a layer, on one thread: the native kernel against PyTorch on the same data.

The native step's attention phase is arithmetic more than memory on these CPUs (docs/performance.md, "The
attention's arithmetic"), so it is timed here with its rows cache-resident: what the kernel's arithmetic costs.
Per KV dtype (fp32, fp16: K in the layout the step keeps, 16-slot tiles on AVX-512 builds; fp16-rows: K in rows,
as ONNX Runtime writes it), slot count and kernel build it prints µs per layer, MAC/ns (q·K and p·V, 2 x heads x
slots x head_dim multiply-adds), the ratio to `torch.nn.functional.scaled_dot_product_attention` (one thread,
fp32, grouped query heads, the same q / K / V: an fp16 cache's values widened first) measured in the same run,
and the largest difference of the two outputs (fp32 sums in another order: ~1e-6).

    python tools/bench_attention.py                                  # SmolLM2's layer: 9 heads, 3 KV, head_dim 64
    python tools/bench_attention.py --heads 32 --kv-heads 8 --head-dim 64 --slots 512,4096 --isa avx512,avx2
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_quant_gemv import cpu_name  # noqa: E402

from caprese.errors import CapreseError  # noqa: E402
from caprese.runtime.native import library  # noqa: E402


def load_kernel(isa: str) -> ctypes.CDLL:
    """The decode kernel the backend loads for `isa` (built once per machine and source)."""
    try:
        path = library.built(isa)
    except CapreseError as e:
        raise SystemExit(f"error: {e}") from None
    lib = ctypes.CDLL(str(path))
    lib.caprese_attention_bench.restype = ctypes.c_double
    lib.caprese_attention_bench.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 6 + [ctypes.c_void_p]
    return lib


def case_data(heads: int, kv_heads: int, head_dim: int, slots: int, kv: str, seed: int = 0):
    """(q [heads, hd] fp32, K / V as the kernel reads them, K / V widened to fp32 for the reference)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((heads, head_dim), dtype=np.float32)
    k = rng.standard_normal((kv_heads, slots, head_dim), dtype=np.float32)
    v = rng.standard_normal((kv_heads, slots, head_dim), dtype=np.float32)
    if kv != "fp32":  # the kernel rounds q to fp16 on an fp16 cache (ONNX Runtime's fp16 attention does)
        q = q.astype(np.float16).astype(np.float32)
        k16, v16 = k.astype(np.float16), v.astype(np.float16)
        return q, k16, v16, k16.astype(np.float32), v16.astype(np.float32)
    return q, k, v, k, v


def kv_code(kv: str, isa: str) -> int:
    """caprese_attention_bench's cache argument: 0 fp32, 1 fp16 with K in rows, 2 fp16 with K in 16-slot tiles
    (what the decode step keeps on AVX-512 builds: Model.k_tiles)."""
    return {"fp32": 0, "fp16-rows": 1}.get(kv, 2 if isa == "avx512" else 1)


def time_native(lib, q, k, v, heads, kv_heads, head_dim, slots, kv, samples: int, sample_ms: float,
                isa: str = "avx512"):
    out = np.zeros((heads, head_dim), dtype=np.float32)
    args = (q.ctypes.data, k.ctypes.data, v.ctypes.data, heads, kv_heads, head_dim, slots, kv_code(kv, isa))
    ns = lib.caprese_attention_bench(*args, 3, out.ctypes.data)  # warm: the rows into cache
    if ns < 0:
        raise SystemExit(f"error: the kernel does not take heads {heads}, kv heads {kv_heads}, head_dim {head_dim}")
    reps = max(3, int(sample_ms * 1e6 / max(ns, 1.0)))
    times = [lib.caprese_attention_bench(*args, reps, out.ctypes.data) / 1e3 for _ in range(samples)]
    return min(times), out


def time_torch(q, k32, v32, heads, kv_heads, head_dim, samples: int, sample_ms: float):
    qt = torch.from_numpy(q).view(1, heads, 1, head_dim)
    kt, vt = torch.from_numpy(k32).unsqueeze(0), torch.from_numpy(v32).unsqueeze(0)

    def run():
        return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, enable_gqa=heads != kv_heads)

    out = run()
    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < sample_ms / 1e3:
        run()
        n += 1
    reps = max(3, n)
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        for _ in range(reps):
            run()
        times.append((time.perf_counter() - t0) / reps * 1e6)
    return min(times), out.view(heads, head_dim).numpy()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--slots", default="192,1024", help="comma list of cached slots (prompt + generated tokens)")
    ap.add_argument("--kv", default="fp32,fp16", help="comma list of KV caches: fp32, fp16 (K as the step keeps it: "
                    "16-slot tiles on AVX-512 builds), fp16-rows (K in rows)")
    ap.add_argument("--isa", default=None, help="comma list of kernel builds: avx512, avx2, scalar (default: widest)")
    ap.add_argument("--samples", type=int, default=5, help="timed samples of each form (the fastest is reported)")
    ap.add_argument("--sample-ms", type=float, default=50.0)
    args = ap.parse_args(argv)
    try:
        slots = [int(s) for s in args.slots.split(",")]
        kvs = args.kv.split(",")
    except ValueError:
        ap.error(f"--slots takes a comma list of integers; got {args.slots!r}")
    if any(s < 1 for s in slots) or any(k not in ("fp32", "fp16", "fp16-rows") for k in kvs):
        ap.error("--slots must be >= 1 and --kv a comma list of fp32, fp16, fp16-rows")
    if args.heads < 1 or args.kv_heads < 1 or args.heads % args.kv_heads or args.head_dim < 2 or args.head_dim % 2:
        ap.error("--heads must be a multiple of --kv-heads and --head-dim an even number >= 2")
    isas = (args.isa or library.best_isa()).split(",")
    torch.set_num_threads(1)
    print(f"cpu: {cpu_name()}; one thread; heads {args.heads}, KV heads {args.kv_heads}, head_dim {args.head_dim}; "
          f"fastest of {args.samples} samples; torch {torch.__version__}")
    print(f"{'kv':9} {'slots':>6} {'build':8} {'µs/layer':>9} {'MAC/ns':>7} {'torch µs':>9} {'x torch':>8} "
          f"{'max |diff|':>10}")
    libs = {isa: load_kernel(isa) for isa in isas}
    for kv in kvs:
        for n in slots:
            q, k, v, k32, v32 = case_data(args.heads, args.kv_heads, args.head_dim, n, kv)
            ref_us, ref = time_torch(q, k32, v32, args.heads, args.kv_heads, args.head_dim, args.samples,
                                     args.sample_ms)
            for isa, lib in libs.items():
                us, out = time_native(lib, q, k, v, args.heads, args.kv_heads, args.head_dim, n, kv, args.samples,
                                      args.sample_ms, isa)
                macs = 2 * args.heads * n * args.head_dim
                print(f"{kv:9} {n:>6} {isa:8} {us:>9.2f} {macs / (us * 1e3):>7.1f} {ref_us:>9.2f} "
                      f"{us / ref_us:>8.3f} {float(np.abs(out - ref).max()):>10.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
