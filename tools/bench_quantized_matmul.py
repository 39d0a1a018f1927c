"""One decode step's linear layers on ONNX Runtime (CPU), fp32 against the quantized forms caprese can export.

    python tools/bench_quantized_matmul.py [--threads 2] [--repeat 7] [--bits 4] [--block 32]

For each SmolLM2-135M weight shape (x [1, 1, K] @ W, W [N, K]) the graphs are
  fp32         MatMul over the float [K, N] weight (what caprese's fp32 graphs run)
  nbits        com.microsoft.MatMulNBits, accuracy_level 0 (float activations: the reference's numerics)
  nbits-acc4   the same with accuracy_level 4 (int8 activations: GenAI's int4 CPU default; other numerics)
  dq-gemm      DequantizeLinear -> Gemm(transB=1) ([N, K] blocked along K: the standard graph's form)
  dq-matmul    DequantizeLinear -> MatMul ([K, N] blocked along N: the standard graph's down projection)
Rounds are interleaved (every form once per round) and the median per call is printed with its ratio to fp32
in the same run: machines are noisy. Prints the CPU model and its vector extensions.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from caprese.model.quantization import WeightFormat, matmul_nbits_weight, quantize_rtn

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate/up": (1536, 576), "down": (576, 1536), "head": (49152, 576)}


def cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni") if f in flags]
    return f"{model} ({', '.join(isa)})"


def _model(nodes, inits, n: int, k: int, ms: bool) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    ops = [helper.make_opsetid("", 24)] + ([helper.make_opsetid("com.microsoft", 1)] if ms else [])
    return helper.make_model(g, opset_imports=ops, ir_version=11)


def graphs(n: int, k: int, fmt: WeightFormat) -> dict[str, onnx.ModelProto]:
    w = torch.randn(n, k) * 0.05
    qt = quantize_rtn(w, fmt)
    out = {"fp32": _model([helper.make_node("MatMul", ["x", "w"], ["y"])],
                          [numpy_helper.from_array(w.t().contiguous().numpy(), "w")], n, k, False)}
    bs = fmt.block(k)
    b, s = matmul_nbits_weight(qt)
    for name, level in (("nbits", 0), ("nbits-acc4", 4)):
        node = helper.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft", K=k, N=n,
                                bits=fmt.bits, block_size=bs, accuracy_level=level)
        out[name] = _model([node], [numpy_helper.from_array(b.numpy(), "B"),
                                    numpy_helper.from_array(s.float().reshape(-1).numpy(), "S")], n, k, True)
    qdt = TensorProto.INT4 if fmt.bits == 4 else TensorProto.INT8

    def dq_init(q):  # codes as an INT4 / INT8 initializer (raw bytes: ONNX's packing is ours)
        t = helper.make_tensor("W", qdt, list(q.shape), q.packed().numpy().tobytes(), raw=True)
        return [t, numpy_helper.from_array(q.scales.float().numpy(), "S")]

    dq = helper.make_node("DequantizeLinear", ["W", "S"], ["Wf"], axis=1, block_size=bs)
    x2 = helper.make_node("Reshape", ["x", "shape"], ["x2"])
    gemm = helper.make_node("Gemm", ["x2", "Wf"], ["y"], transB=1)
    out["dq-gemm"] = _model([dq, x2, gemm], dq_init(qt) + [numpy_helper.from_array(np.array([-1, k]), "shape")],
                            n, k, False)
    qt_t = quantize_rtn(w.t().contiguous(), WeightFormat(fmt.bits, fmt.block_size if n % max(fmt.block_size, 1) == 0
                                                         else 0, fmt.scale_dtype))
    out["dq-matmul"] = _model([dq, helper.make_node("MatMul", ["x", "Wf"], ["y"])], dq_init(qt_t), n, k, False)
    return out


def main() -> None:
    import onnxruntime as ort

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=7, help="interleaved rounds")
    p.add_argument("--calls", type=int, default=200, help="calls per form per round")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--block", default="32")
    a = p.parse_args()
    fmt = WeightFormat.parse(f"int{a.bits}", a.block)
    print(f"CPU: {cpu_name()}; onnxruntime {ort.__version__}, {a.threads} threads; int{a.bits} block "
          f"{fmt.block_name}; median ms per call over {a.repeat} interleaved rounds of {a.calls}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = a.threads
    opts.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        for shape_name, (n, k) in SHAPES.items():
            sess = {}
            for name, m in graphs(n, k, fmt).items():
                path = Path(tmp) / f"{name}.onnx"
                onnx.save(m, str(path))
                sess[name] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            x = np.random.default_rng(0).standard_normal((1, 1, k)).astype(np.float32)
            times = {name: [] for name in sess}
            for _ in range(a.repeat):
                for name, s in sess.items():
                    s.run(None, {"x": x})
                    t0 = time.perf_counter()
                    for _ in range(a.calls):
                        s.run(None, {"x": x})
                    times[name].append((time.perf_counter() - t0) / a.calls * 1e3)
            med = {name: statistics.median(v) for name, v in times.items()}
            cells = "  ".join(f"{name} {ms:.4f} ({ms / med['fp32']:.2f}x)" for name, ms in med.items())
            print(f"{shape_name:8s} N={n:5d} K={k:4d}  {cells}")


if __name__ == "__main__":
    main()
