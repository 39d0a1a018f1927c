#!/usr/bin/env python3
"""Per-token decode time of an exported decode graph on ONNX Runtime (CPU) vs how full the KV buffer is.

The KV cache is one [1, H_kv, S_max, D] buffer per layer and tensor, allocated once; TensorScatter writes the new
token at write_indices and Attention reads the whole buffer under a mask. Two bindings are timed:
  in-place  present_* bound to the same OrtValue as past_* (what caprese runtimes do): no copy of the cache
  copy      present_* bound to separate buffers: TensorScatter must copy the whole past cache every token
If the graph never copies the cache per token, the in-place time is flat in the filled length (the only
length-dependent term is attention, and ONNX Runtime's Attention reads the whole buffer anyway), and the copy
column shows what a per-token copy would cost. A second table varies the buffer size S_max at a fixed filled length:
that is the attention term (ORT's CPU Attention time follows the buffer, not the valid length).

    python tools/bench_kv_cache.py                      # the built-in SmolLM2-135M (caprese fetch-default)
    python tools/bench_kv_cache.py MODEL_DIR --max-seq-len 2048 --lengths 64,512,1024,2000 --steps 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def decode_times(sess, lay, buffers, presents, length: int, steps: int, ort) -> list[float]:
    """ms per decode step, writing at slots length .. length + steps - 1 (each step is a real next token)."""
    from caprese.export import contract as C

    s_max = buffers[C.past_key(0)].shape()[2]
    mask = ort.OrtValue.ortvalue_from_numpy(np.ones((1, s_max), np.int64))
    times = []
    for j in range(steps + 2):  # 2 warm-up steps
        slot = min(length + j, s_max - 1)
        b = sess.io_binding()
        b.bind_cpu_input(C.INPUT_IDS, np.array([[17 + j]], np.int64))
        b.bind_cpu_input(C.POSITION_IDS, np.array([[slot]], np.int64))
        b.bind_cpu_input(C.WRITE_INDICES, np.array([slot], np.int64))
        b.bind_ortvalue_input(C.ATTENTION_MASK, mask)
        b.bind_output(C.LOGITS)
        for past, present in lay.in_place_pairs():
            b.bind_ortvalue_input(past, buffers[past])
            b.bind_ortvalue_output(present, presents[present])
        t0 = time.perf_counter()
        sess.run_with_iobinding(b)
        dt = (time.perf_counter() - t0) * 1000
        if j >= 2:
            times.append(dt)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", nargs="?", help="HF folder (default: the built-in SmolLM2-135M-Instruct)")
    ap.add_argument("--max-seq-len", type=int, default=2048, help="KV buffer slots S_max (default 2048)")
    ap.add_argument("--lengths", default="16,256,512,1024,1536,2000", help="filled lengths to time")
    ap.add_argument("--buffers", default="256,512,1024,2048", help="buffer sizes for the attention-term table")
    ap.add_argument("--steps", type=int, default=8, help="timed decode steps per point and round")
    ap.add_argument("--rounds", type=int, default=4, help="interleaved rounds over all points (median of all steps)")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (1: steadiest on a shared box)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    import onnxruntime as ort

    from caprese.export import contract as C
    from caprese.export.exporter import export
    from caprese.export.manifest import load_manifest

    model_dir = args.model_dir
    if model_dir is None:
        from caprese.model.default_model import fetch_default

        model_dir = str(fetch_default())
    lengths = [int(x) for x in args.lengths.split(",")]
    buffer_sizes = [int(x) for x in args.buffers.split(",") if int(x) <= args.max_seq_len]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        out = export(model_dir, Path(tmp) / "engine", max_seq_len=args.max_seq_len).out
        export_s = time.perf_counter() - t0
        m = load_manifest(out)
        lay = m.layout
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(m.file(C.DECODE)), opts, providers=["CPUExecutionProvider"])

        def alloc(s_max: int, names) -> dict:
            rng = np.random.default_rng(0)
            shape = (1, lay.num_kv_heads, s_max, lay.head_dim)
            return {n: ort.OrtValue.ortvalue_from_numpy((0.1 * rng.standard_normal(shape)).astype(np.float32))
                    for n in names}

        pasts = [p for p, _ in lay.in_place_pairs()]
        kv_bytes = 2 * lay.num_layers * lay.num_kv_heads * args.max_seq_len * lay.head_dim * 4
        inplace = alloc(args.max_seq_len, pasts)
        same = {present: inplace[past] for past, present in lay.in_place_pairs()}
        separate_src = alloc(args.max_seq_len, pasts)
        separate_dst = alloc(args.max_seq_len, [pr for _, pr in lay.in_place_pairs()])
        small = {s_max: alloc(s_max, pasts) for s_max in buffer_sizes}
        ptr_before = inplace[pasts[0]].data_ptr()
        lengths = [n for n in lengths if n < args.max_seq_len]
        samples: dict = {}
        # Rounds interleave every point so that load changes on a shared machine spread over all of them.
        for _ in range(args.rounds):
            for length in lengths:
                samples.setdefault(("in_place", length), []).extend(
                    decode_times(sess, lay, inplace, same, length, args.steps, ort))
                samples.setdefault(("copy", length), []).extend(
                    decode_times(sess, lay, separate_src, separate_dst, length, args.steps, ort))
            for s_max, bufs in small.items():
                same_s = {present: bufs[past] for past, present in lay.in_place_pairs()}
                samples.setdefault(("buffer", s_max), []).extend(
                    decode_times(sess, lay, bufs, same_s, min(16, s_max - args.steps - 1), args.steps, ort))
        assert inplace[pasts[0]].data_ptr() == ptr_before  # the bound buffer was never replaced
        med = {k: statistics.median(v) for k, v in samples.items()}
        rows = [{"filled": n, "in_place_ms": round(med[("in_place", n)], 3), "copy_ms": round(med[("copy", n)], 3)}
                for n in lengths]
        attn_rows = [{"buffer": b, "in_place_ms": round(med[("buffer", b)], 3)} for b in buffer_sizes]

    spec = m.spec
    print(f"model {model_dir} ({spec.model_type}, {spec.num_layers} layers, {spec.num_kv_heads} KV heads x "
          f"{spec.head_dim}), fp32, ONNX Runtime {ort.__version__} CPU, {args.threads} threads, export {export_s:.1f} s")
    print(f"KV buffer S_max = {args.max_seq_len} slots = {kv_bytes / 2**20:.1f} MiB (all layers, K+V); "
          f"median of {args.rounds} x {args.steps} decode steps per point, rounds interleaved")
    print()
    print("filled length | in-place ms/token | copy ms/token | copy - in-place")
    print("------------- | ----------------- | ------------- | ---------------")
    for r in rows:
        print(f"{r['filled']:>13} | {r['in_place_ms']:>17.2f} | {r['copy_ms']:>13.2f} | "
              f"{r['copy_ms'] - r['in_place_ms']:>+15.2f}")
    ip = [r["in_place_ms"] for r in rows]
    if ip:
        print(f"in-place spread over filled lengths: {min(ip):.2f} .. {max(ip):.2f} ms "
              f"({(max(ip) - min(ip)) / statistics.median(ip) * 100:.0f}% of the median)")
    print()
    print("buffer S_max (filled 16) | in-place ms/token   <- the attention term: ORT's Attention reads the whole buffer")
    print("------------------------ | -----------------")
    for r in attn_rows:
        print(f"{r['buffer']:>24} | {r['in_place_ms']:>17.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": str(model_dir), "max_seq_len": args.max_seq_len,
                                               "threads": args.threads, "kv_bytes": kv_bytes, "by_filled": rows,
                                               "by_buffer": attn_rows}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
