#!/usr/bin/env python3
"""A/B of two builds of the quantized GEMV kernel (native/quant_gemv.c + int8_activations.c): this tree's against a
git revision's, alternated in one process, on the same weights.

Kernel changes move a GEMV by 5-50 %, while this machine's memory bandwidth drifts by as much from minute to
minute: two separate bench runs cannot tell them apart. Here every round times both builds back to back (in
alternating order) on the same copies of the weights, and the verdict is the median of the per-round ratios.
Each form cycles over copies of its matrix totalling ~96 MB, so the weights stream from memory as in a decode step.

    python tools/ab_quant_gemv.py --baseline HEAD~1                          # int4 x int8 rows-dot, SmolLM2's shapes
    python tools/ab_quant_gemv.py --baseline 15ad52d --shapes 576x1536,288x3072 --op dot-f32 --bits 8

Prints, per shape and thread count: GB/s of the matrix's bytes (codes + scales) for each build, and the median of
the per-round ratios new / baseline (above 1: this tree is faster), with the CPU, ISA and core round trip per round.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_decode import measure_round_trip_ns  # noqa: E402
from bench_quant_gemv import cpu_name  # noqa: E402

from caprese.errors import CapreseError  # noqa: E402
from caprese.model.quantization import WeightFormat, quantize_rtn  # noqa: E402
from caprese.runtime.native import library  # noqa: E402
from caprese.runtime.native import quant_gemv as qg  # noqa: E402

KERNEL_FILES = ("quant_gemv.c", "int8_activations.c")
NATIVE = ROOT / "caprese" / "runtime" / "native"
# caprese_q_bench's ops: rows-dot with fp32 activations, rows-dot with int8 activations (int4 only)
OPS = {"dot-f32": 0, "dot-i8": 3}
STREAM_BYTES = 96e6


def build(src_dir: Path, isa: str, out: Path) -> ctypes.CDLL:
    """src_dir's quant_gemv.c built as the native library builds it (its flags for `isa`), loaded."""
    try:
        library.build(out, isa, source=src_dir / "quant_gemv.c")
    except CapreseError as e:
        raise SystemExit(f"error: {e}") from None
    lib = ctypes.CDLL(str(out))
    lib.caprese_q_bench.restype = ctypes.c_double
    lib.caprese_q_bench.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                    ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
    return lib


def baseline_sources(rev: str, dst: Path) -> None:
    for name in KERNEL_FILES:
        proc = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:caprese/runtime/native/{name}"],
                              capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"error: git show {rev}:caprese/runtime/native/{name} failed "
                             f"({proc.stderr.strip()[:200]}); give a revision of this repository")
        (dst / name).write_text(proc.stdout)


def parse_shape(s: str) -> tuple[int, int]:
    try:
        r, c = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise SystemExit(f"error: shape {s!r} is not ROWSxCOLS (e.g. 576x1536)") from None
    if r < 1 or c < 32 or c % 32:
        raise SystemExit(f"error: shape {s!r}: rows >= 1 and columns a multiple of 32")
    return r, c


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", required=True, help="git revision whose kernel files are the baseline")
    ap.add_argument("--shapes", default="960x576,576x576,3072x576,576x1536",
                    help="comma list of ROWSxCOLS row-dot shapes (default: SmolLM2-135M's qkv, o, gate/up, down)")
    ap.add_argument("--threads", default="1,2", help="comma list of thread counts")
    ap.add_argument("--op", choices=sorted(OPS), default="dot-i8",
                    help="dot-i8: int4 weights x int8 activations (--int8-activations engines); dot-f32: fp32 x")
    ap.add_argument("--bits", type=int, choices=(4, 8), default=4)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--isa", default=None, help="avx512 | avx2 | scalar (default: widest)")
    ap.add_argument("--hot", action="store_true",
                    help="one copy of each matrix, read from the caches: the kernels' compute ceilings")
    a = ap.parse_args(argv)
    if a.op == "dot-i8" and a.bits != 4:
        raise SystemExit("error: --op dot-i8 is int4 only; use --bits 4 or --op dot-f32")
    try:
        isa = library.resolve_isa(a.isa)
    except CapreseError as e:
        raise SystemExit(f"error: {e}") from None
    shapes = [parse_shape(s) for s in a.shapes.split(",")]
    try:
        threads = [int(t) for t in a.threads.split(",")]
    except ValueError:
        raise SystemExit(f"error: --threads {a.threads!r} is not a comma list of counts (e.g. 1,2)") from None
    if a.rounds < 1 or min(threads) < 1:
        raise SystemExit("error: --rounds and every --threads count must be at least 1")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "base").mkdir()
        baseline_sources(a.baseline, tmp / "base")
        libs = {"new": build(NATIVE, isa, tmp / "new.so"), "base": build(tmp / "base", isa, tmp / "base.so")}
        fmt = WeightFormat(a.bits, 32)
        data = []
        for r, c in shapes:
            copies = 1 if a.hot else max(1, min(256, math.ceil(STREAM_BYTES / (r * c * a.bits // 8))))
            g = torch.Generator().manual_seed(0)
            mats = [qg.QMatrix(quantize_rtn(torch.randn(r, c, generator=g) * 0.02, fmt)) for _ in range(copies)]
            arr = (qg.QMat * copies)(*[m.struct for m in mats])
            data.append(((r, c), mats, arr, torch.randn(c, generator=g), torch.zeros(16 * r)))
        print(f"cpu: {cpu_name()}; kernel isa {isa}; op {a.op}, int{a.bits} block 32 fp16 scales; new = this tree, "
              f"base = {a.baseline}; {a.rounds} rounds, the two builds alternated within each"
              + ("; --hot: weights cache-resident" if a.hot else ""))
        gbs: dict[tuple, list[float]] = {}
        for rnd in range(a.rounds):
            rt = measure_round_trip_ns()
            line = [f"round {rnd}: round trip {rt:.0f} ns" if rt else f"round {rnd}:"]
            for (r, c), mats, arr, x, y in data:
                copies = len(mats)
                reps = copies * max(1, 2000 // copies)
                for t in threads:
                    order = ("new", "base") if rnd % 2 == 0 else ("base", "new")
                    for name in order:
                        lib = libs[name]
                        args = (OPS[a.op], ctypes.addressof(arr), copies, x.data_ptr(), y.data_ptr())
                        lib.caprese_q_bench(*args, copies, t)  # warm: this build's code, the copies' first pass
                        sec = lib.caprese_q_bench(*args, reps, t)
                        gbs.setdefault((r, c, t, name), []).append(mats[0].nbytes * reps / sec / 1e9)
                    line.append(f"{r}x{c}/{t}t {gbs[(r, c, t, 'new')][-1] / gbs[(r, c, t, 'base')][-1]:.2f}")
            print("  ".join(line), flush=True)
        print(f"{'shape':>10} {'threads':>7} {'base GB/s':>10} {'new GB/s':>9} {'new / base':>10}")
        for (r, c), *_ in data:
            for t in threads:
                base, new = gbs[(r, c, t, "base")], gbs[(r, c, t, "new")]
                ratio = statistics.median(n / b for n, b in zip(new, base))
                print(f"{f'{r}x{c}':>10} {t:>7} {statistics.median(base):>10.1f} {statistics.median(new):>9.1f} "
                      f"{ratio:>10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
