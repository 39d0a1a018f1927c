#!/usr/bin/env python3
"""Batch-1 GEMV over quantized weights: caprese's quant_gemv.c (int8 / int4) vs fp32 vs ONNX Runtime MatMulNBits.

On SmolLM2-135M's shapes (hidden 576, FFN 1536, vocab 49152) it times, interleaved in one run:
  f32          caprese_f32_rows_dot: the plain fp32 row-dot loop (the decode step's head loop), W [out, in]
  q8-row       caprese_q_rows_dot / _axpy, int8, one fp16 scale per row (int8's default format)
  q8-b32       int8, blocks of 32, fp16 scales
  q4-b32       int4, blocks of 32, fp16 scales (int4's default format)
  q4-b32-hot   the same on one copy of the weights (cache-resident): the kernel's compute ceiling
  q4-b32-vnni  int4 with int8 activations (native/int8_activations.c, what --int8-activations engines run on
               native: x rounded per 32 inside each call; down: h * s_w rounded per 32 rows and column block;
               VNNI on AVX-512, vpmaddubsw on AVX2, scalar)
  q4-b32-vnni-hot  the same on one copy of the weights: the int8-activation kernel's compute ceiling
  q4-b32-r16   dot shapes only: the same arithmetic over the r16 layout (groups of 16 rows, int8_activations.c),
               what the AVX-512 and AVX2 decode steps read int4 rows-dot weights from; q4-b32-r16-hot: one copy
  q4-b32-i16   down only: int4 rows-axpy with h * s_w rounded to 16 bits per 32 rows and column block, split
               into two int8 halves over the same unpacked codes (native/int8_activations.c, GRIFFIN's down on
               --int8-activations engines)
  ort-f32      ONNX Runtime MatMul, fp32 initializer
  ort-q{4,8}-acc{0,4}  com.microsoft.MatMulNBits, block 32, B from quantization.matmul_nbits_weight (our bytes
               XOR 0x88 / 0x80), fp32 scales; accuracy_level 0 (default: fp32 activations) and 4 (int8 activations)
`down` runs caprese's rows-axpy on W [F, D] blocked along D (the format's plan, GRIFFIN's down); ONNX Runtime gets
the same matrix in its own orientation, [N = D, K = F] blocked along K. `down_dot` is the dense step's down, a
rows-dot over [D, F] (rows of 1536 columns: the long-row case). Every form cycles over enough copies of its
weights that they stream from memory as in a decode step (ONNX Runtime: one graph of `copies` independent
MatMulNBits nodes, so the per-run overhead is shared), and prints ms per call, GB/s of the matrix's bytes and
the ratio to f32 and to ort-q4-acc4, with the CPU and the kernel's ISA.

    python tools/bench_quant_gemv.py                        # 1 and 2 threads, every shape
    python tools/bench_quant_gemv.py --threads 2 --shapes head,gate_up --repeats 7 --isa avx2
"""

from __future__ import annotations

import argparse
import ctypes
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from caprese.model.quantization import ROW, WeightFormat, matmul_nbits_weight, quantize_rtn  # noqa: E402
from caprese.runtime.native import quant_gemv as qg  # noqa: E402

# name: (rows, cols, kernel) of the caprese layout; dot = W [out, in], axpy = W [F, D]
SHAPES = {"qkv": (960, 576, "dot"), "o": (576, 576, "dot"), "gate_up": (3072, 576, "dot"),
          "down": (1536, 576, "axpy"), "down_dot": (576, 1536, "dot"), "head": (49152, 576, "dot")}
OURS = {"q8-row": WeightFormat(8, ROW), "q8-b32": WeightFormat(8, 32), "q4-b32": WeightFormat(4, 32)}
ORT_ROWS = ("ort-f32", "ort-q4-acc0", "ort-q4-acc4", "ort-q8-acc0", "ort-q8-acc4")
STREAM_BYTES = 96e6  # each form's copies together: 3x the 32 MiB L3 of this VM
MAX_COPIES = 256


def cpu_name() -> str:
    name = platform.processor() or platform.machine()
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = ("AVX-512" + ("+VNNI" if "avx512_vnni" in flags else "") if "avx512f" in flags
           else "AVX2" if "avx2" in flags else "")
    return f"{name}, {os.cpu_count()} CPUs" + (f", {isa}" if isa else "")


class Ours:
    """One of caprese's kernels over `copies` copies of a matrix, timed by the C loop (caprese_q_bench)."""

    def __init__(self, op: int, mats: list, nbytes: int, x: torch.Tensor, out_len: int, threads: int, isa: str):
        self.op, self.mats, self.nbytes, self.x, self.threads = op, mats, nbytes, x, threads
        self.lib = qg.load(isa)
        self.array = (qg.QMat * len(mats))(*[m.struct for m in mats])
        self.y = torch.zeros(out_len * threads)

    def run(self, calls: int) -> float:
        f32p = ctypes.POINTER(ctypes.c_float)
        return self.lib.caprese_q_bench(self.op, self.array, len(self.mats),
                                        ctypes.cast(self.x.data_ptr(), f32p), ctypes.cast(self.y.data_ptr(), f32p),
                                        calls, self.threads)


class F32Mat:  # duck-types QMatrix for op 2: codes = the fp32 matrix
    def __init__(self, w: torch.Tensor):
        self.w = w.contiguous()
        self.struct = qg.QMat(self.w.data_ptr(), None, w.shape[0], w.shape[1], w.shape[1], 32, 1)


class Ort:
    """ONNX Runtime: one graph of `copies` independent nodes on x [1, K] (each its own weights)."""

    def __init__(self, row: str, ws: list[torch.Tensor], threads: int):
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper

        n, k = ws[0].shape  # [N, K]: the ORT orientation (out, in)
        nodes, inits, outs = [], [], []
        for i, w in enumerate(ws):
            if row == "ort-f32":
                inits.append(numpy_helper.from_array(w.t().contiguous().numpy(), f"w{i}"))
                nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]))
            else:
                bits, acc = int(row[5]), int(row[-1])
                qt = quantize_rtn(w, WeightFormat(bits, 32))
                b, s = matmul_nbits_weight(qt)
                inits += [numpy_helper.from_array(b.numpy(), f"b{i}"),
                          numpy_helper.from_array(s.float().numpy(), f"s{i}")]
                nodes.append(helper.make_node("MatMulNBits", ["x", f"b{i}", f"s{i}"], [f"y{i}"], domain="com.microsoft",
                                              K=k, N=n, bits=bits, block_size=32, accuracy_level=acc))
            outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, n]))
        graph = helper.make_graph(nodes, row, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])], outs,
                                  inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid("com.microsoft", 1)])
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        self.sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        self.binding = self.sess.io_binding()
        self.binding.bind_cpu_input("x", np.random.default_rng(1).standard_normal((1, k), dtype=np.float32))
        for o in outs:
            self.binding.bind_output(o.name)
        self.copies = len(ws)
        self.nbytes = (n * k * 4 if row == "ort-f32" else n * k * int(row[5]) // 8 + n * (k // 32) * 4)

    def run(self, calls: int) -> float:
        runs = max(1, calls // self.copies)
        t0 = time.perf_counter()
        for _ in range(runs):
            self.sess.run_with_iobinding(self.binding)
        return (time.perf_counter() - t0) * (calls / (runs * self.copies))


def build_forms(shape: str, threads: int, isa: str, rows_wanted: set[str]) -> tuple[dict, int]:
    r, c, kernel = SHAPES[shape]
    copies = max(1, min(MAX_COPIES, math.ceil(STREAM_BYTES / (r * c // 2))))  # by the int4 size
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(r, c, generator=g) * 0.02 for _ in range(copies)]
    x_len, out_len = (c, r) if kernel == "dot" else (r, c)
    x = torch.randn(x_len, generator=g)
    op = 0 if kernel == "dot" else 1
    forms = {}
    if "f32" in rows_wanted:
        if kernel == "dot":
            mats = [F32Mat(w) for w in ws]
            forms["f32"] = Ours(2, mats, r * c * 4, x, out_len, threads, isa)
        else:  # the fp32 down as a row-dot over its [D, F] transpose (what the decode step reads)
            mats = [F32Mat(w.t().contiguous()) for w in ws]
            forms["f32"] = Ours(2, mats, r * c * 4, x, out_len, threads, isa)
    for name, fmt in OURS.items():
        if name in rows_wanted or name + "-hot" in rows_wanted:
            mats = [qg.QMatrix(quantize_rtn(w, fmt)) for w in ws]
            if name in rows_wanted:
                forms[name] = Ours(op, mats, mats[0].nbytes, x, out_len, threads, isa)
            if name + "-hot" in rows_wanted:
                forms[name + "-hot"] = Ours(op, mats[:1], mats[0].nbytes, x, out_len, threads, isa)
            if name == "q4-b32" and "q4-b32-vnni" in rows_wanted:  # down: rows-axpy over int8 coefficients
                forms["q4-b32-vnni"] = Ours(3 if kernel == "dot" else 4, mats, mats[0].nbytes, x, out_len, threads,
                                            isa)
            if name == "q4-b32" and "q4-b32-vnni-hot" in rows_wanted:
                forms["q4-b32-vnni-hot"] = Ours(3 if kernel == "dot" else 4, mats[:1], mats[0].nbytes, x, out_len,
                                                threads, isa)
            for r16 in ("q4-b32-r16", "q4-b32-r16-hot"):  # int8 activations over the 16-row groups (the SIMD steps)
                if name == "q4-b32" and r16 in rows_wanted and kernel == "dot":
                    packed = [qg.pack_r16(m, isa) for m in (mats[:1] if r16.endswith("-hot") else mats)]
                    forms[r16] = Ours(3, packed, mats[0].nbytes, x, out_len, threads, isa)
            if name == "q4-b32" and "q4-b32-i16" in rows_wanted and kernel != "dot":  # int16 coefficients
                forms["q4-b32-i16"] = Ours(5, mats, mats[0].nbytes, x, out_len, threads, isa)
    ort_ws = ws if kernel == "dot" else [w.t().contiguous() for w in ws]  # ORT: [N, K], blocks along K
    for row in ORT_ROWS:
        if row in rows_wanted:
            forms[row] = Ort(row, ort_ws, threads)
    return forms, copies


def measure(forms: dict, repeats: int, target_s: float) -> dict[str, list[float]]:
    calls = {}
    for name, f in forms.items():  # calibrate: calls per sample of ~target_s
        n = max(8, getattr(f, "copies", 0) or len(getattr(f, "mats", [1])))
        f.run(n)
        t = f.run(n)
        calls[name] = max(n, int(n * target_s / max(t, 1e-9)))
    samples: dict[str, list[float]] = {n: [] for n in forms}
    for _ in range(repeats):  # interleaved: drift on a noisy machine hits every form alike
        for name, f in forms.items():
            samples[name].append(f.run(calls[name]) / calls[name] * 1e3)
    return samples


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--threads", default="1,2", help="comma list of thread counts (default 1,2)")
    ap.add_argument("--rows", default=",".join(["f32", "q8-row", "q8-b32", "q4-b32", "q4-b32-hot", "q4-b32-vnni",
                                                "q4-b32-vnni-hot", "q4-b32-r16", "q4-b32-r16-hot", "q4-b32-i16",
                                                *ORT_ROWS]))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sample-ms", type=float, default=60.0, help="time per sample of each form")
    ap.add_argument("--isa", default=None, help="caprese kernel build: avx512 | avx2 | scalar (default: widest)")
    args = ap.parse_args(argv)
    rows_wanted = set(args.rows.split(","))
    lib = qg.load(args.isa)
    import onnxruntime

    print(f"cpu: {cpu_name()}; caprese kernel isa {lib.isa}; onnxruntime {onnxruntime.__version__}; "
          f"median of {args.repeats} interleaved samples; GB/s = the matrix's bytes (codes + scales) / time")
    for shape in args.shapes.split(","):
        r, c, kernel = SHAPES[shape]
        for threads in (int(t) for t in args.threads.split(",")):
            forms, copies = build_forms(shape, threads, args.isa, rows_wanted)
            samples = measure(forms, args.repeats, args.sample_ms / 1e3)
            med = {n: statistics.median(v) for n, v in samples.items()}
            print(f"\n{shape} [{r} x {c}] {kernel}, {threads} thread(s), {copies} copies of the weights")
            print(f"{'row':<14}{'ms/call':>10}{'GB/s':>8}{'x f32':>8}{'x ort-q4-acc4':>15}  samples (ms)")
            for n, ms in med.items():
                gbs = forms[n].nbytes / ms / 1e6
                xf = f"{ms / med['f32']:.3f}" if "f32" in med else "-"
                xo = f"{ms / med['ort-q4-acc4']:.3f}" if "ort-q4-acc4" in med else "-"
                print(f"{n:<14}{ms:>10.4f}{gbs:>8.1f}{xf:>8}{xo:>15}  "
                      + " ".join(f"{s:.4f}" for s in samples[n]))
            del forms
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
