#!/usr/bin/env python3
"""What per-prompt weights cost on ONNX Runtime's CPU GEMV: constants (pre-packed) vs graph inputs.

GRIFFIN's folded gate/up and down matrices change per prompt, so the decode graph takes them as inputs, which
ONNX Runtime cannot pre-pack. This times a chain of batch-1 products in three forms, interleaved, in one run:
  init   MatMul, weights as initializers (the baseline: what a dense graph gets)
  input  MatMul, weights as graph inputs (what the decode graph does today)
  gemmT  Gemm transB=1, transposed weights as graph inputs (the candidate layout)
and prints ms per chain, GB/s and the ratio to the baseline.

    python tools/bench_gemv_inputs.py                          # SmolLM2-135M's FFN shapes, 30 layers
    python tools/bench_gemv_inputs.py --hidden 2048 --ffn 4096 --layers 16
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

FORMS = ("init", "input", "gemmT")


def build(form: str, weights: list[np.ndarray], hidden: int, threads: int):
    """A session and its IO binding for x [1, hidden] through every weight in turn."""
    nodes, inits, feeds = [], [], {}
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, hidden])]
    cur = "x"
    for i, w in enumerate(weights):
        name, out = f"w{i}", f"y{i}"
        w = np.ascontiguousarray(w.T) if form == "gemmT" else w
        if form == "init":
            inits.append(numpy_helper.from_array(w, name))
        else:
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(w.shape)))
            feeds[name] = w
        if form == "gemmT":
            nodes.append(helper.make_node("Gemm", [cur, name], [out], transB=1))
        else:
            nodes.append(helper.make_node("MatMul", [cur, name], [out]))
        cur = out
    graph = helper.make_graph(nodes, form, inputs, [helper.make_tensor_value_info(cur, TensorProto.FLOAT, None)],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    binding = sess.io_binding()
    binding.bind_cpu_input("x", np.ones((1, hidden), np.float32))
    for name, w in feeds.items():
        binding.bind_cpu_input(name, w)
    binding.bind_output(cur)
    return sess, binding


def measure(hidden: int, ffn: int, layers: int, threads: int, repeats: int, runs: int) -> dict:
    rng = np.random.default_rng(0)
    weights = []
    for _ in range(layers):
        weights += [rng.standard_normal((hidden, ffn), dtype=np.float32) * 0.02,
                    rng.standard_normal((ffn, hidden), dtype=np.float32) * 0.02]
    sessions = {f: build(f, weights, hidden, threads) for f in FORMS}
    samples: dict[str, list[float]] = {f: [] for f in FORMS}
    for _ in range(repeats):  # interleaved: drift on a noisy machine hits every form alike
        for form, (sess, binding) in sessions.items():
            for _ in range(3):
                sess.run_with_iobinding(binding)
            t0 = time.perf_counter()
            for _ in range(runs):
                sess.run_with_iobinding(binding)
            samples[form].append((time.perf_counter() - t0) / runs * 1e3)
    mb = sum(w.nbytes for w in weights) / 1e6
    base = statistics.median(samples["init"])
    return {"mb": mb, "rows": {f: {"ms": statistics.median(v), "gb_per_s": mb / statistics.median(v),
                                   "x_init": statistics.median(v) / base, "samples": v}
                               for f, v in samples.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--ffn", type=int, default=1536, help="width of each product's other side")
    ap.add_argument("--layers", type=int, default=30, help="pairs of products ([H, F] then [F, H]) in the chain")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--runs", type=int, default=40, help="chains timed per repeat")
    args = ap.parse_args()
    res = measure(args.hidden, args.ffn, args.layers, args.threads, args.repeats, args.runs)
    print(f"{2 * args.layers} chained batch-1 products, {res['mb']:.0f} MB of weights, {args.threads} threads, "
          f"median of {args.repeats} x {args.runs} runs")
    for form, r in res["rows"].items():
        print(f"{form:6s} {r['ms']:7.2f} ms  {r['gb_per_s']:6.1f} GB/s  {r['x_init']:.3f}x init")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
