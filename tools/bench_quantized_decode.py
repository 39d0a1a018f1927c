"""Decode speed of quantized SmolLM2 engines on the onnxruntime backend, against fp32, interleaved in one run.

    python tools/bench_quantized_decode.py [--rounds 3] [--new 64] [--threads 2] [--out DIR]

Exports SmolLM2-135M (dense) with --target onnxruntime at fp32, int4 (block 32: MatMulNBits for every decoder
weight, the LM head fp32) and int4 with the LM head quantized too (GenAI's int4 layout), then generates --new
tokens (EOS ignored) from one prompt per round, each engine once per round, and prints the mean ms/token of every
round, the bytes per step and the ratio to fp32 in the same round. Names the CPU.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench_quantized_matmul import cpu_name

ENGINES = {"fp32": {}, "int4": {"weights": "int4", "block_size": 32},
           "int4+head": {"weights": "int4", "block_size": 32, "quantize_head": True}}


def main() -> None:
    from caprese.export.exporter import export
    from caprese.model.default_model import fetch_default
    from caprese.runtime.generator import Generator

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="keep the engine folders here (default: a temporary folder)")
    a = p.parse_args()
    root = Path(a.out or tempfile.mkdtemp(prefix="caprese-qbench-"))
    src = fetch_default()
    gens = {}
    for name, opts in ENGINES.items():
        folder = root / name
        if not (folder / "manifest.json").is_file():
            export(src, folder, max_seq_len=256, target="onnxruntime", force=True, **opts)
        gens[name] = Generator.load(folder, "onnxruntime", threads=a.threads)
    prompt = "Explain in two sentences why the sky is blue, then add 17 and 25."
    print(f"CPU: {cpu_name()}; SmolLM2-135M dense, --target onnxruntime, {a.threads} threads, {a.new} new tokens")
    for r in range(a.rounds):
        res = {n: g.generate(prompt, a.new, chat=True, ignore_eos=True).stats for n, g in gens.items()}
        base = res["fp32"].ms_per_token
        print(f"round {r}: " + "  ".join(f"{n} {s.ms_per_token:.2f} ms/token ({s.ms_per_token / base:.2f}x, "
                                         f"{s.bytes_per_step / 1e6:.1f} MB/step)" for n, s in res.items()))


if __name__ == "__main__":
    main()
