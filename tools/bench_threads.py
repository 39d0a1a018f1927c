#!/usr/bin/env python3
"""Decode ms/token of the PyTorch reference decoder and the ONNX Runtime backend next to N busy processes:
the default thread policy (caprese/cpu_threads.py) against fixed thread counts, in one run.

    python tools/bench_threads.py                          # SmolLM2-135M-Instruct fp32, loads 0,1,2
    python tools/bench_threads.py --loads 0,2 --repeats 5 --backends torch
    python tools/bench_threads.py --engine out/bench/engine-dense --json out/threads.json

Rows per (background load, backend): `auto` is the default path with no thread count given (what `caprese
generate / eval / run` and the synthetic-data step do now); `fixed-N` pins N threads (for torch, fixed-<all
CPUs> is the old default, torch's own count, and for ONNX Runtime, whose pool spins between ops when the count
is explicit, fixed-<all CPUs> is its old default); `passive-N` is torch with OMP_WAIT_POLICY=PASSIVE; `nospin-N`
is ONNX Runtime with N threads that block instead of spinning (what the policy uses around busy CPUs).
Each measurement is a fresh process (so environment variables take effect) that prefills --prompt-tokens
random ids and decodes --new-tokens greedily, EOS ignored; the number is the mean decode step. Rows run
interleaved, each round rotated by one, so drift hits all of them; the table shows the median over --repeats
and its ratio to the best fixed count at that load.

The background load is N processes spinning in Python, started here, bounded in time (--load-timeout) and
stopped when their level is done or this process exits. The CPU and its vector ISA head the output.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUSY = ("import os, sys, time\nparent, end = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])\nx = 0\n"
        "while time.monotonic() < end and os.getppid() == parent:\n    for _ in range(100000):\n        x += 1\n")


def cpu_name() -> str:
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{model}, {os.cpu_count()} vCPUs, {isa}"


def configs(backend: str, cpus: int) -> list[str]:
    fixed = [f"fixed-{cpus}"] + (["fixed-1"] if cpus > 1 else [])
    extra = f"passive-{cpus}" if backend == "torch" else f"nospin-{cpus}"
    return ["auto", *fixed, extra]


def child(args) -> None:
    """One measurement: print {"ms_per_token", "threads"} as JSON."""
    import torch

    from caprese import cpu_threads

    kind, _, n = args.config.partition("-")
    threads = int(n) if n else None
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 40000, (args.prompt_tokens,), generator=g).tolist()
    if args.child == "torch":
        from caprese.model.generation import generate
        from caprese.model.loading import load_decoder

        if threads:
            cpu_threads.pin(threads)
        dec = load_decoder(args.model, "fp32")
        generate(dec, ids[:8], 4, eos_ids=())  # warm-up
        seen = []  # the count inside the loop (the policy restores the old one afterwards)
        res = generate(dec, ids, args.new_tokens, eos_ids=(), on_token=lambda t: seen.append(torch.get_num_threads()))
        print(json.dumps({"ms_per_token": res.stats.ms_per_token, "threads": seen[-1]}))
        return
    from caprese.runtime.generator import Generator

    gen = Generator.load(args.engine, "onnxruntime", threads=threads, spinning=False if kind == "nospin" else None)
    gen.generate(ids[:8], 4, ignore_eos=True)  # warm-up
    res = gen.generate(ids, args.new_tokens, ignore_eos=True)
    print(json.dumps({"ms_per_token": res.stats.ms_per_token, "threads": gen.backend.describe().get("threads")}))


def measure(args, backend: str, config: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for var in ("OMP_NUM_THREADS", "CAPRESE_THREADS", "OMP_WAIT_POLICY"):
        env.pop(var, None)
    if config.startswith("passive"):
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    cmd = [sys.executable, __file__, args.model, "--child", backend, "--config", config,
           "--engine", str(args.engine), "--prompt-tokens", str(args.prompt_tokens),
           "--new-tokens", str(args.new_tokens)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.load_timeout)
    if out.returncode:
        raise SystemExit(f"{backend} {config} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=None, help="HF model folder (default: the built-in SmolLM2)")
    ap.add_argument("--engine", type=Path, default=None,
                    help="dense fp32 engine of MODEL for the onnxruntime rows (default: exported to "
                         "out/bench/threads-engine once)")
    ap.add_argument("--backends", default="torch,onnxruntime")
    ap.add_argument("--loads", default="0,1,2", help="busy background processes, per level")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--load-timeout", type=float, default=900.0, help="seconds a busy process or a row may run")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--config", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    sys.path.insert(0, str(ROOT))
    if args.model is None:
        from caprese.model.default_model import fetch_default

        args.model = str(fetch_default())
    backends = [b for b in args.backends.split(",") if b]
    if "onnxruntime" in backends and args.engine is None:
        args.engine = ROOT / "out" / "bench" / "threads-engine"
        if not (args.engine / "manifest.json").is_file():
            from caprese.export.exporter import export

            export(args.model, args.engine, max_seq_len=256)
    from caprese import cpu_threads

    cpus = cpu_threads.usable_cpus()
    print(f"# {cpu_name()}; usable CPUs {cpus}; prompt {args.prompt_tokens}, {args.new_tokens} new tokens, "
          f"{args.repeats} repeats, load average at start {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    for load in [int(x) for x in args.loads.split(",")]:
        procs = [subprocess.Popen([sys.executable, "-c", BUSY, str(os.getpid()), str(args.load_timeout)])
                 for _ in range(load)]
        try:
            time.sleep(1.0 if load else 0.0)
            for backend in backends:
                cfgs = configs(backend, cpus)
                got: dict[str, list[dict]] = {c: [] for c in cfgs}
                for r in range(args.repeats):
                    for c in cfgs[r % len(cfgs):] + cfgs[:r % len(cfgs)]:
                        got[c].append(measure(args, backend, c))
                fixed_best = min(statistics.median(x["ms_per_token"] for x in got[c]) for c in cfgs
                                 if c.startswith("fixed"))
                for c in cfgs:
                    ms = [x["ms_per_token"] for x in got[c]]
                    row = {"load": load, "backend": backend, "config": c, "threads": [x["threads"] for x in got[c]],
                           "ms_per_token": statistics.median(ms), "min": min(ms), "max": max(ms),
                           "vs_best_fixed": statistics.median(ms) / fixed_best}
                    rows.append(row)
                    print(f"load {load} | {backend:11s} | {c:9s} | threads {row['threads']} | "
                          f"{row['ms_per_token']:7.1f} ms/token ({row['min']:.1f}-{row['max']:.1f}) | "
                          f"{row['vs_best_fixed']:.2f}x best fixed", flush=True)
        finally:
            for p in procs:
                p.kill()
                p.wait()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"cpu": cpu_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
