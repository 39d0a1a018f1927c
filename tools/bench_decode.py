#!/usr/bin/env python3
"""Decode speed on one model and one prompt, in one run: ONNX Runtime GenAI dense (the peer) vs caprese's engines.

Rows (--rows, comma-separated; default: all):
  genai-dense          ONNX Runtime GenAI, dense (the peer): its model builder run offline on the local folder
  genai-int4, genai-int8
                       the same builder with `-p int4` / `-p int8` and its defaults (MatMulNBits on every linear
                       layer incl. the LM head; int4: block 32, accuracy_level 4): what a GenAI user runs on a CPU;
                       the peer of caprese rows whose name says int4 / int8
  ort-dense            caprese dense engine (caprese.export) on the onnxruntime backend (Generator)
  ort-griffin          GRIFFIN, density 0.5, all layers, no adapters, onnxruntime
  ort-caprese-griffin  Caprese(GRIFFIN, 0.5, all layers, rank r), onnxruntime
  ort-caprese-cats     Caprese(CATS, 0.5, all layers, rank r), onnxruntime
  ort-contrib-dense, ort-contrib-caprese-griffin
                       the same two engines exported with --target onnxruntime (ONNX Runtime's contrib ops:
                       GroupQueryAttention, SkipSimplifiedLayerNormalization), onnxruntime
  native-dense, native-caprese-griffin, native-caprese-cats
                       the native backend (prefill on ONNX Runtime, each decode step in one call of caprese's C
                       kernel) on the engines of ort-contrib-dense, ort-contrib-caprese-griffin, ort-caprese-cats;
                       its default head: greedy steps screen the LM head with its int8 copy (the fp32 argmax, a
                       quarter of the head's bytes) where a probe at load found that faster on this CPU
  native-dense-full-head, native-caprese-griffin-full-head
                       the same with every logit of the head in fp32 (--full-head): what the screen saves
  ort-contrib-int4-dense, ort-contrib-int4-caprese-griffin, ort-contrib-int8-dense
                       --target onnxruntime engines exported with --weights int4 / int8 (caprese-export's defaults:
                       int4 block 32, int8 one scale per row, fp32 scales in an fp32 graph; the LM head not
                       quantized), on the onnxruntime backend (MatMulNBits, accuracy_level 0)
  native-int4-dense, native-int4-caprese-griffin, native-int8-dense
                       the native backend on those engines (quant_gemv.c's int4 / int8 rows; default head: the
                       screened fp32 head as above); peer: genai-int4 / genai-int8 (issue 15's targets)
  native-int4-qhead-dense, native-int4-qhead-caprese-griffin
                       the same int4 engines exported with --quantize-head (the LM head int4 block 32 too, as
                       GenAI's int4 builder does), read whole by the native kernel (not screened); their engines
                       are those of ort-contrib-int4-qhead-dense / ort-contrib-int4-qhead-caprese-griffin
  ort-contrib-int4-acc4-dense, ort-contrib-int4-acc4-caprese-griffin, ort-contrib-int4-acc4-caprese-cats,
  native-int4-acc4-dense, native-int4-acc4-caprese-griffin, native-int4-acc4-caprese-cats
                       GenAI int4's configuration: --weights int4 --quantize-head --int8-activations (every int4
                       product with activations rounded to int8 per block, MatMulNBits accuracy_level 4), on
                       onnxruntime and on the native backend (native/int8_activations.c)
  native-int4-acc4-caprese-griffin-fp16-bypass, native-int4-acc4-caprese-cats-fp16-bypass
                       the same, exported with --fp16-bypass too (L and R stored fp16: half their bytes)
  ort-contrib-int4-acc4-dense-kv32, ort-contrib-int4-acc4-caprese-griffin-fp16-bypass-kv32,
  native-int4-acc4-dense-kv32, native-int4-acc4-caprese-griffin-fp16-bypass-kv32
                       the same exported with --kv-dtype fp32 (the KV cache in fp32, twice the default fp16's
                       bytes; every --target onnxruntime row above has the default fp16 cache)
  native-int4-acc4-caprese-griffin-int8-down
                       native-int4-acc4-caprese-griffin with the native option int8_down (GRIFFIN's down rows
                       multiplied with int8 coefficients, not 16-bit ones: faster, the largest error)
  With --native-isa avx512,avx2 (the kernel's instruction sets, see caprese/runtime/native/library.py) every
  native row runs once per instruction set; rows of the second and later ones are named ROW@ISA.
  torch-dense          caprese's PyTorch reference decoder (caprese.model.generation.generate)
  transformers         transformers' `generate`, same model and prompt

    python tools/bench_decode.py                  # built-in SmolLM2-135M-Instruct, fp32, CPU, auto threads
    python tools/bench_decode.py MODEL_DIR --prompt-tokens 64 --new-tokens 128 --repeats 5 --json out.json
    python tools/bench_decode.py --rows genai-dense,ort-dense,ort-caprese-griffin

Per row: ms per output token (decode only, median over repeats), tokens/s, bytes one decode step reads,
achieved GB/s, ratio to the peer (GenAI dense ms/token) and ratio to the bandwidth floor (bytes per step / the
read bandwidth this run measures with a streaming reduction, same thread count). Each round also measures the
core-to-core round trip between the first two CPUs (tools/core_round_trip.c), before its rows and after its
bandwidth sample: where the rounds fall into two placements (the 2-vCPU EPYC VMs: both vCPUs on one CCD, ~35
GB/s, or on two, ~50 GB/s and 6x slower synchronisation), the floor ratios are also given per placement
(information only); a round whose two round trips disagree is "moved" (the placement changed during it).

Timing. Every row runs the same random prompt ids (seeded) and generates exactly --new-tokens tokens (EOS
ignored, greedy). Decode only: onnxruntime rows report the Generator's RuntimeStats.ms_per_token (mean of the
decode steps after the first token; prefill and selection excluded); genai-dense times each
`generate_next_token()` after the first (one decode step + greedy pick each) the same way; the two PyTorch rows
take (time for N new tokens - time for 1 new token) / (N - 1). Rows run interleaved over the repeats, each
round rotated by one (A B C, B C A, C A B ...: a disturbance that recurs at the same point of every round, as
seen on these VMs, does not land on the same row every time), with the bandwidth measurement as one more entry
of each round, so drift hits all of them equally. Every
row uses --threads N (ONNX Runtime intra-op threads, GenAI's session options, torch.set_num_threads); the default,
--threads auto, gives each row its runtime's own count (caprese.cpu_threads: one thread per CPU other processes
leave free; the native kernel's working threads follow it as the steps run) and GenAI the policy's count at load,
and takes each bandwidth sample on the count the policy gives at that moment (next to a busy process on 2 vCPUs:
one thread, whose read bandwidth is higher than two time-sliced ones': the stricter floor).
"x ORT" is a native row's ms/token over the ONNX Runtime row on the same engine folder, per round and overall.

Other work on the cores: --background-load N starts N busy processes (CPU-only Python loops) for the warm-up and
the timed rounds and stops them after (each also ends by itself after --load-max-s, or when the bench is gone);
with N >= 1 every native row has the target <= 1.10x ONNX Runtime on the same engine (issue 13).

Bytes per step: onnxruntime rows from the engine (RuntimeStats.bytes_per_step: the decode graph's weights per
the manifest, one row of gathered tables, the folded selection inputs, K/V of the allocated slots; native rows:
less what the kernel did not read, i.e. CATS' skipped rows and, with the screened head, three quarters of the
head's bytes less its scales, bounds and recomputed rows, K/V of the valid prefix only); genai-dense,
torch-dense and transformers use the dense byte count of the model (every weight once, the embedding table only
gathered unless tied, + K/V over the mean context prompt + new/2).

Engines (caprese.export, default max_seq_len) and the GenAI model are cached under --out-dir (default
out/bench/<model>-<fingerprint>/) and reused when their recipe matches. The Caprese rows' adapters are
random-init (L as LowRankBypass draws it, R small random), saved with save_artifact: right shapes and bytes for
timing, not calibrated, so their text is meaningless. The GenAI row needs `pip install onnxruntime-genai onnx-ir`
(or `pip install -e .[bench]`); without it the row is skipped and the reason printed.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import functools
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from caprese import cpu_threads

BENCH_VERSION = 2
PEER = "genai-dense"
GENAI_ROWS = {"genai-dense": "fp32", "genai-int4": "int4", "genai-int8": "int8"}  # row -> builder precision
QUANT_ORT_ROWS = ("ort-contrib-int4-dense", "ort-contrib-int4-caprese-griffin", "ort-contrib-int8-dense",
                  "ort-contrib-int4-qhead-dense", "ort-contrib-int4-qhead-caprese-griffin",
                  "ort-contrib-int4-acc4-dense", "ort-contrib-int4-acc4-caprese-griffin",
                  "ort-contrib-int4-acc4-caprese-cats", "ort-contrib-int4-acc4-caprese-griffin-fp16-bypass",
                  "ort-contrib-int4-acc4-caprese-cats-fp16-bypass", "ort-contrib-int4-acc4-dense-kv32",
                  "ort-contrib-int4-acc4-caprese-griffin-fp16-bypass-kv32")
ROW_NAMES = ("genai-dense", "genai-int4", "genai-int8", "ort-dense", "ort-griffin", "ort-caprese-griffin", "ort-caprese-cats", "ort-contrib-dense",
             "ort-contrib-caprese-griffin", "native-dense", "native-caprese-griffin", "native-caprese-cats",
             "native-dense-full-head", "native-caprese-griffin-full-head", *QUANT_ORT_ROWS, "native-int4-dense",
             "native-int4-caprese-griffin", "native-int8-dense", "native-int4-qhead-dense",
             "native-int4-qhead-caprese-griffin", "native-int4-acc4-dense", "native-int4-acc4-caprese-griffin",
             "native-int4-acc4-caprese-cats", "native-int4-acc4-caprese-griffin-fp16-bypass",
             "native-int4-acc4-caprese-cats-fp16-bypass", "native-int4-acc4-caprese-griffin-int8-down",
             "native-int4-acc4-dense-kv32", "native-int4-acc4-caprese-griffin-fp16-bypass-kv32", "torch-dense",
             "transformers")
ORT_ROWS = ("ort-dense", "ort-griffin", "ort-caprese-griffin", "ort-caprese-cats", "ort-contrib-dense",
            "ort-contrib-caprese-griffin")
# native rows: the native backend (caprese/runtime/native) on the engine folder of the row named here, its head
NATIVE_ROWS = {"native-dense": ("ort-contrib-dense", "auto"),
               "native-caprese-griffin": ("ort-contrib-caprese-griffin", "auto"),
               "native-caprese-cats": ("ort-caprese-cats", "auto"),
               "native-dense-full-head": ("ort-contrib-dense", "full"),
               "native-caprese-griffin-full-head": ("ort-contrib-caprese-griffin", "full"),
               "native-int4-dense": ("ort-contrib-int4-dense", "auto"),
               "native-int4-caprese-griffin": ("ort-contrib-int4-caprese-griffin", "auto"),
               "native-int8-dense": ("ort-contrib-int8-dense", "auto"),
               "native-int4-qhead-dense": ("ort-contrib-int4-qhead-dense", "auto"),
               "native-int4-qhead-caprese-griffin": ("ort-contrib-int4-qhead-caprese-griffin", "auto"),
               "native-int4-acc4-dense": ("ort-contrib-int4-acc4-dense", "auto"),
               "native-int4-acc4-caprese-griffin": ("ort-contrib-int4-acc4-caprese-griffin", "auto"),
               "native-int4-acc4-caprese-cats": ("ort-contrib-int4-acc4-caprese-cats", "auto"),
               "native-int4-acc4-caprese-griffin-fp16-bypass": ("ort-contrib-int4-acc4-caprese-griffin-fp16-bypass",
                                                                "auto"),
               "native-int4-acc4-caprese-cats-fp16-bypass": ("ort-contrib-int4-acc4-caprese-cats-fp16-bypass",
                                                             "auto"),
               "native-int4-acc4-caprese-griffin-int8-down": ("ort-contrib-int4-acc4-caprese-griffin", "auto"),
               "native-int4-acc4-dense-kv32": ("ort-contrib-int4-acc4-dense-kv32", "auto"),
               "native-int4-acc4-caprese-griffin-fp16-bypass-kv32": (
                   "ort-contrib-int4-acc4-caprese-griffin-fp16-bypass-kv32", "auto")}
NATIVE_OPTIONS = {"native-int4-acc4-caprese-griffin-int8-down": {"int8_down": True}}  # more native backend options
# the ONNX Runtime row that runs the same engine folder as each native row (the native rows' "x ORT" ratio)
SAME_ENGINE = {"native-dense": "ort-contrib-dense", "native-caprese-griffin": "ort-contrib-caprese-griffin",
               "native-caprese-cats": "ort-caprese-cats", "native-dense-full-head": "ort-contrib-dense",
               "native-caprese-griffin-full-head": "ort-contrib-caprese-griffin",
               "native-int4-dense": "ort-contrib-int4-dense",
               "native-int4-caprese-griffin": "ort-contrib-int4-caprese-griffin",
               "native-int8-dense": "ort-contrib-int8-dense",
               "native-int4-qhead-dense": "ort-contrib-int4-qhead-dense",
               "native-int4-qhead-caprese-griffin": "ort-contrib-int4-qhead-caprese-griffin",
               "native-int4-acc4-dense": "ort-contrib-int4-acc4-dense",
               "native-int4-acc4-caprese-griffin": "ort-contrib-int4-acc4-caprese-griffin",
               "native-int4-acc4-caprese-cats": "ort-contrib-int4-acc4-caprese-cats",
               "native-int4-acc4-caprese-griffin-fp16-bypass": "ort-contrib-int4-acc4-caprese-griffin-fp16-bypass",
               "native-int4-acc4-caprese-cats-fp16-bypass": "ort-contrib-int4-acc4-caprese-cats-fp16-bypass",
               "native-int4-acc4-caprese-griffin-int8-down": "ort-contrib-int4-acc4-caprese-griffin",
               "native-int4-acc4-dense-kv32": "ort-contrib-int4-acc4-dense-kv32",
               "native-int4-acc4-caprese-griffin-fp16-bypass-kv32":
                   "ort-contrib-int4-acc4-caprese-griffin-fp16-bypass-kv32"}
# issue 13's targets: under --background-load N >= 1, native <= 1.10x ONNX Runtime on the same engine; idle, the
# AVX2 build <= 1.0x it; the native rows' default head no slower than the full head (same ISA)
CONTENDED_MAX = 1.10
AVX2_MAX = 1.0
FULL_HEAD_OF = {"native-dense": "native-dense-full-head", "native-caprese-griffin": "native-caprese-griffin-full-head"}
# issue 5's CPU targets: (row, max ratio to the peer, max ratio to the floor)
TARGETS = (("ort-dense", 0.95, 1.25), ("ort-caprese-griffin", 0.70, 1.25), ("ort-contrib-dense", 0.95, 1.25),
           ("ort-contrib-caprese-griffin", 0.70, 1.25), ("native-dense", 0.95, 1.25),
           ("native-caprese-griffin", 0.70, 1.25), ("native-dense-full-head", 0.95, 1.25),
           ("native-caprese-griffin-full-head", 0.70, 1.25),
           # issue 15: against genai-int4, within 1.3x of their bytes floor
           ("native-int4-dense", 0.90, 1.30), ("native-int4-caprese-griffin", 0.65, 1.30),
           ("native-int4-acc4-dense", 0.90, 1.30), ("native-int4-acc4-caprese-griffin", 0.65, 1.30),
           ("native-int4-acc4-caprese-griffin-fp16-bypass", 0.65, 1.30), ("native-int4-acc4-dense-kv32", 0.90, 1.30),
           ("native-int4-acc4-caprese-griffin-fp16-bypass-kv32", 0.65, 1.30))


# ---------------------------------------------------------------- other CPU-heavy work on the machine
# One busy process: a pure-Python loop (CPU only, no memory traffic), which exits by itself at its deadline or
# as soon as its parent is gone (so a bench killed with SIGKILL leaves nothing running for long).
BUSY_LOOP = """
import os, sys, time
parent, end = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
x = 0
while True:
    for _ in range(200000):
        x += 1
    if time.monotonic() > end or os.getppid() != parent:
        break
"""


class BackgroundLoad:
    """N busy processes started and stopped by the bench itself (--background-load N): what an edge device's
    UI or camera pipeline does to a decode loop. Bounded in time (max_s, each process ends itself), killed on
    exit, error, Ctrl-C and SIGTERM."""

    def __init__(self, n: int, max_s: float = 3600.0):
        if n < 0:
            raise ValueError("--background-load must be >= 0")
        self.n, self.max_s = n, max_s
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> "BackgroundLoad":
        self._old_term = signal.getsignal(signal.SIGTERM)
        if self.n:
            signal.signal(signal.SIGTERM, self._on_term)
            atexit.register(self.stop)
        for _ in range(self.n):
            self.procs.append(subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(os.getpid()), str(self.max_s)],
                                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL))
        if self.n:
            time.sleep(0.5)  # spinning (past Python's start) before anything reads the load: --threads auto does
        return self

    def _on_term(self, signum, frame):
        self.stop()
        raise SystemExit(128 + signum)

    def alive(self) -> int:
        return sum(p.poll() is None for p in self.procs)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - a process that ignores SIGKILL
                pass
        self.procs = []

    def __exit__(self, *exc) -> None:
        self.stop()
        if self.n:
            atexit.unregister(self.stop)
            signal.signal(signal.SIGTERM, self._old_term)


def cpu_name() -> str:
    """The CPU's model name and the widest x86 vector ISA it has (every speed claim names both)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("", platform.processor(), platform.machine()):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None
    return f"{name}, {os.cpu_count()} CPUs" + (f", {isa}" if isa else "")


# ---------------------------------------------------------------- measurements shared by all rows
def measure_bandwidth_gbs(mbytes: int = 512, repeats: int = 7) -> float:
    """Read bandwidth of a streaming reduction over a buffer much larger than the caches (median GB/s)."""
    x = torch.ones(mbytes * 2**20 // 4, dtype=torch.float32)
    x.sum()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return x.numel() * 4 / statistics.median(times) / 1e9


ROUND_TRIP_C = Path(__file__).with_name("core_round_trip.c")


def measure_round_trip_ns(iters: int = 200_000, max_s: float = 0.25) -> float | None:
    """Core-to-core round trip (ns) between this process's first two CPUs (tools/core_round_trip.c), median of 3
    runs of `iters` round trips (or `max_s` seconds); None with fewer than two CPUs, no C compiler, or a CPU that
    cannot be pinned. On the 2-vCPU EPYC VMs it tells which placement a round ran in: both vCPUs on one CCD (~55-120
    ns, ~35 GB/s) or on two (~350 ns, ~50 GB/s)."""
    cpus = sorted(os.sched_getaffinity(0))
    f = _round_trip_function() if len(cpus) >= 2 else None
    if f is None:
        return None
    ns = [f(cpus[0], cpus[1], iters, max_s) for _ in range(3)]
    return None if min(ns) < 0 else statistics.median(ns)


@functools.cache
def _round_trip_function():
    """tools/core_round_trip.c's function, built at first use (once per machine) and loaded once per process; None
    without a working C compiler."""
    import ctypes

    from caprese.errors import CapreseError
    from caprese.runtime.native import library

    try:
        f = ctypes.CDLL(str(library.built(source=ROUND_TRIP_C))).caprese_core_round_trip_ns
    except (CapreseError, OSError):
        return None
    f.restype, f.argtypes = ctypes.c_double, [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_double]
    return f


def placements(round_trips: list[list[float | None]]) -> list[str] | None:
    """Each round's placement from its round trips (taken before and after it), "near" or "far", where all the
    round trips fall into two groups (the largest at least 3x the smallest; split at their geometric mean); None
    where they do not (one placement, or not measured). "moved" where a round's fall into both groups (the
    placement changed during the round, which a single sample would label at random)."""
    flat = [t for ts in round_trips for t in ts]
    if not flat or any(t is None for t in flat) or max(flat) < 3 * min(flat):
        return None
    cut = math.sqrt(min(flat) * max(flat))
    labels = [{"near" if t < cut else "far" for t in ts} for ts in round_trips]
    return [ls.pop() if len(ls) == 1 else "moved" for ls in labels]


def decode_bytes_per_step(model, context_len: float) -> float:
    """Bytes one decode step reads: every weight once (the embedding table is only gathered) + the KV cache."""
    spec = model.spec
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if id(p) in seen or (name == "model.embed_tokens.weight" and not spec.tie_word_embeddings):
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    elem = model.model.embed_tokens.weight.element_size()
    kv = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * context_len * elem
    return total + kv


def time_ours(model, ids, new_tokens: int) -> float:
    from caprese.model.generation import generate

    t0 = time.perf_counter()
    generate(model, ids, new_tokens, eos_ids=())
    return time.perf_counter() - t0


def time_hf(hf, ids, new_tokens: int) -> float:
    x = torch.tensor([ids])
    t0 = time.perf_counter()
    with torch.inference_mode():
        hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                    do_sample=False, pad_token_id=0)
    return time.perf_counter() - t0


def per_token_ms(timer, model, ids, n: int, repeats: int) -> float:
    """(N tokens - 1 token) / (N - 1), median over repeats (one row alone; the bench interleaves via Row)."""
    timer(model, ids, n)  # warm-up
    samples = []
    for _ in range(repeats):
        one = timer(model, ids, 1)
        full = timer(model, ids, n)
        samples.append((full - one) / (n - 1) * 1000)
    return statistics.median(samples)


# ---------------------------------------------------------------- cached engines / GenAI model
def model_tag(model_dir: str | Path) -> str:
    from caprese.calibration.artifact import fingerprint

    return f"{Path(model_dir).name}-{fingerprint(model_dir)[:10]}"


def _read_key(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "bench_key.json").read_text())
    except (OSError, ValueError):
        return None


def _write_key(folder: Path, key: dict) -> None:
    (folder / "bench_key.json").write_text(json.dumps(key, indent=2, sort_keys=True))


@dataclasses.dataclass(frozen=True)
class Recipe:
    method: str | None  # None: dense
    density: float = 1.0
    layers: str = "all"
    rank: int = 0
    target: str = "tensorrt"  # caprese-export --target
    weights: str | None = None  # caprese-export --weights (int4 | int8), None: fp32
    quantize_head: bool = False  # caprese-export --quantize-head
    int8_activations: bool = False  # caprese-export --int8-activations (MatMulNBits accuracy_level 4)
    fp16_bypass: bool = False  # caprese-export --fp16-bypass
    kv_dtype: str | None = None  # caprese-export --kv-dtype (None: its default, fp16 on --target onnxruntime fp32)


def row_recipe(name: str, density: float, rank: int) -> Recipe:
    return {"ort-dense": Recipe(None),
            "ort-griffin": Recipe("griffin", density, "all", 0),
            "ort-caprese-griffin": Recipe("griffin", density, "all", rank),
            "ort-caprese-cats": Recipe("cats", density, "all", rank),
            "ort-contrib-dense": Recipe(None, target="onnxruntime"),
            "ort-contrib-caprese-griffin": Recipe("griffin", density, "all", rank, "onnxruntime"),
            "ort-contrib-int4-dense": Recipe(None, target="onnxruntime", weights="int4"),
            "ort-contrib-int4-caprese-griffin": Recipe("griffin", density, "all", rank, "onnxruntime", "int4"),
            "ort-contrib-int8-dense": Recipe(None, target="onnxruntime", weights="int8"),
            "ort-contrib-int4-qhead-dense": Recipe(None, target="onnxruntime", weights="int4", quantize_head=True),
            "ort-contrib-int4-qhead-caprese-griffin": Recipe("griffin", density, "all", rank, "onnxruntime", "int4",
                                                            True),
            "ort-contrib-int4-acc4-dense": Recipe(None, target="onnxruntime", weights="int4", quantize_head=True,
                                                  int8_activations=True),
            "ort-contrib-int4-acc4-caprese-griffin": Recipe("griffin", density, "all", rank, "onnxruntime", "int4",
                                                           True, True),
            "ort-contrib-int4-acc4-caprese-cats": Recipe("cats", density, "all", rank, "onnxruntime", "int4", True,
                                                        True),
            "ort-contrib-int4-acc4-caprese-griffin-fp16-bypass": Recipe("griffin", density, "all", rank, "onnxruntime",
                                                                       "int4", True, True, True),
            "ort-contrib-int4-acc4-caprese-cats-fp16-bypass": Recipe("cats", density, "all", rank, "onnxruntime",
                                                                    "int4", True, True, True),
            "ort-contrib-int4-acc4-dense-kv32": Recipe(None, target="onnxruntime", weights="int4", quantize_head=True,
                                                       int8_activations=True, kv_dtype="fp32"),
            "ort-contrib-int4-acc4-caprese-griffin-fp16-bypass-kv32": Recipe(
                "griffin", density, "all", rank, "onnxruntime", "int4", True, True, True, kv_dtype="fp32")}[name]


def random_artifact(model_dir: str | Path, out: Path, r: Recipe, seed: int = 0) -> Path:
    """A calibration artifact with random-init adapters (no training): the method on r.layers, L as
    LowRankBypass draws it, R small random (exact zeros would make the bypass a no-op in value, not in bytes)."""
    from caprese.calibration.artifact import Artifact, collect_adapters, fingerprint, save_artifact
    from caprese.calibration.methods import apply_method, efficient_layers
    from caprese.model.loading import load_decoder

    dec = load_decoder(model_dir, "fp32")
    idx = apply_method(dec, r.method, r.density, r.layers, rank=r.rank, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for f in efficient_layers(dec).values():
            if f.bypass is not None:
                f.bypass.R.copy_(torch.randn(f.bypass.R.shape, generator=g) * 1e-3)
    adapters = "random-init (L: LowRankBypass init, R: N(0, 1e-3^2); not calibrated)" if r.rank else "none"
    art = Artifact(None, str(Path(model_dir).resolve()), fingerprint(model_dir), r.method, r.density, idx, r.rank,
                   recipe={"bench": True, "layers": r.layers, "adapters": adapters}, adapters=collect_adapters(dec))
    return save_artifact(art, out, force=True)


def exporter_digest() -> str:
    """A hash of caprese/export's sources: an engine cached by an older graph builder is exported again."""
    import caprese.export

    h = hashlib.sha256()
    for f in sorted(Path(caprese.export.__file__).parent.glob("*.py")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def prepare_engine(model_dir: str | Path, root: Path, name: str, r: Recipe, precision: str,
                   log: Callable[[str], None] = print) -> tuple[Path, str]:
    """(engine folder, adapters note) for row `name`, exported once and reused while its recipe matches."""
    from caprese.calibration.artifact import fingerprint
    from caprese.export.exporter import export
    from caprese.export.manifest import load_manifest

    engine = root / f"{name}-{precision}"
    adapters = ("random-init (not calibrated)" if r.rank else "none") if r.method else "n/a"
    key = {"bench": BENCH_VERSION, "exporter": exporter_digest(), "model": str(Path(model_dir).resolve()),
           "fingerprint": fingerprint(model_dir),
           "recipe": dataclasses.asdict(r), "precision": precision, "adapters": adapters}
    if _read_key(engine) == key:
        try:
            load_manifest(engine)
            return engine, adapters
        except Exception:  # damaged: export again
            pass
    root.mkdir(parents=True, exist_ok=True)
    if r.method is None:
        src = Path(model_dir)
    else:
        log(f"bench: building the {name} artifact (adapters: {adapters})")
        src = random_artifact(model_dir, root / f"{name}-artifact", r)
    log(f"bench: exporting {name} ({precision}) -> {engine}")
    export(src, engine, precision=precision, force=True, target=r.target, weights=r.weights,
           quantize_head=r.quantize_head, int8_activations=r.int8_activations, fp16_bypass=r.fp16_bypass,
           kv_dtype=r.kv_dtype)
    _write_key(engine, key)
    return engine, adapters


def genai_unavailable() -> str | None:
    """Why the GenAI row cannot run here (None when it can)."""
    try:
        import onnxruntime_genai  # noqa: F401
    except Exception as e:
        return (f"onnxruntime-genai is not importable ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                "pip install onnxruntime-genai onnx-ir")
    try:
        import onnx_ir  # noqa: F401  (the model builder needs it)
    except Exception:
        return "the onnxruntime-genai model builder needs onnx-ir: pip install onnx-ir"
    return None


def prepare_genai(model_dir: str | Path, root: Path, precision: str, log: Callable[[str], None] = print) -> Path:
    """The GenAI model of model_dir (builder -i LOCAL_FOLDER, offline), built once; RuntimeError with the
    builder's last lines when it fails."""
    import onnxruntime_genai as og

    from caprese.calibration.artifact import fingerprint

    out = root / f"genai-{precision}-cpu"
    key = {"bench": BENCH_VERSION, "model": str(Path(model_dir).resolve()),
           "fingerprint": fingerprint(model_dir),
           "precision": precision, "ep": "cpu", "onnxruntime_genai": og.__version__}
    if _read_key(out) == key and (out / "genai_config.json").is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".genai-", dir=root))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(Path(model_dir).resolve()),
           "-o", str(tmp / "model"), "-p", precision, "-e", "cpu", "-c", str(tmp / "cache")]
    log(f"bench: building the GenAI model: {' '.join(cmd[1:])}")
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if p.returncode != 0 or not (tmp / "model" / "genai_config.json").is_file():
            tail = " | ".join((p.stderr or p.stdout).strip().splitlines()[-3:])
            raise RuntimeError(f"the onnxruntime-genai model builder failed (exit {p.returncode}): {tail}")
        if out.exists():
            shutil.rmtree(out)
        (tmp / "model").rename(out)
        _write_key(out, key)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---------------------------------------------------------------- rows
@dataclasses.dataclass
class Sample:
    ms: float
    bytes_per_step: float
    tokens: list[int] | None = None


class Row:
    name = ""
    label = ""
    backend = ""

    def __init__(self):
        self.notes: dict = {}

    def run(self, ids: list[int], n: int) -> Sample:  # pragma: no cover - abstract
        raise NotImplementedError


def engine_label(manifest, backend: str = "onnxruntime", head: str = "auto", isa: str | None = None) -> str:
    """caprese dense / GRIFFIN(d=0.5, all layers) / Caprese(GRIFFIN, d=0.5, all layers, r=64), from the manifest;
    " [ORT ops]" for an engine exported with --target onnxruntime run by ONNX Runtime, " [native]" on the native
    backend (which runs its own decode step whatever the target), " [native, full head]" with head="full";
    " [native avx2]" etc. when the row names its instruction set."""
    r = manifest.spec.recipe
    tag = " [ORT ops]" if manifest.spec.target == "onnxruntime" else ""
    if backend == "native":
        tag = " [native" + (f" {isa}" if isa else "") + (", full head]" if head == "full" else "]")
    if manifest.layout.quantized:  # the weights' width first: "caprese dense int4 [native]"
        tag = f" int{manifest.layout.weight_bits}" + (" +head" if manifest.spec.head.quant else "") + tag
    if r.method == "dense":
        return "caprese dense" + tag
    layers = list(r.layers)
    where = "all layers" if layers == list(range(manifest.layout.num_layers)) else \
        "layers " + ",".join(map(str, layers))
    if r.rank:
        return f"Caprese({r.method.upper()}, d={r.density}, {where}, r={r.rank}){tag}"
    return f"{r.method.upper()}(d={r.density}, {where}){tag}"


class EngineRow(Row):
    def __init__(self, name: str, engine: Path, threads: int | None, adapters: str, backend: str = "onnxruntime",
                 **options):
        from caprese.runtime import Generator

        self.name, self.engine, self.backend = name, engine, backend
        self.g = Generator.load(engine, backend=backend, threads=threads, **options)
        self.notes = {"engine": str(engine), "adapters": adapters,
                      "bytes_source": "engine manifest (RuntimeStats.bytes_per_step)"}
        isa = None
        if backend == "native":  # what ran: the instruction set, the head the probe chose, the thread pool
            d = self.g.backend.describe()
            self.notes.update({k: d[k] for k in ("isa", "head", "head_choice", "threads", "activations") if k in d})
            isa = d["isa"]
        self.profiles: list[dict] = []
        self.label = engine_label(self.g.manifest, backend, options.get("head", "auto"), isa)
        if options.get("int8_down"):
            self.label = self.label.replace("[native", "[native int8 down")

    def run(self, ids, n):
        r = self.g.generate(ids, n, ignore_eos=True)
        if r.stats.tokens_generated != n:
            raise RuntimeError(f"{self.name}: generated {r.stats.tokens_generated} tokens, asked for {n}")
        self.notes["kv_slots"] = r.stats.kv_slots
        b = self.g.backend
        if getattr(b, "head_steps", 0):  # native, screened head: fp32 head rows recomputed per step, all runs
            self.notes["head_rows_per_step"] = round(b.head_rows_total / b.head_steps, 2)
        if hasattr(b, "kernel_stats"):  # native: chunks run again because their thread was descheduled, etc.
            self.notes["kernel"] = b.kernel_stats()
            self.profiles.append(b.kernel_profile(reset=True))  # this run's steps: µs per step by phase kind
            self.notes["profile_us"] = median_profile(self.profiles)
            self.notes.setdefault("threads_after_runs", []).append(b.describe()["threads"])  # the load policy's
        return Sample(r.stats.ms_per_token, r.stats.bytes_per_step, r.tokens)


def median_profile(profiles: list[dict]) -> dict:
    """µs per step by phase kind, the between-phase (serial) time and the whole step: each the median over the runs
    (the warm-up included), so one run preempted by the VM's neighbours does not set it."""
    keys = list(profiles[-1]["phases_us"])
    out = {k: _r(statistics.median(p["phases_us"].get(k, 0.0) for p in profiles), 1) for k in keys}
    for k, key in (("between", "between_phases_us"), ("step", "step_us")):
        out[k] = _r(statistics.median(p[key] for p in profiles), 1)
    out["phases_per_step"] = profiles[-1]["phases_per_step"]
    return out


def peer_of(row: str) -> str:
    """The GenAI row a caprese row is compared with: the one of the same weight width."""
    base = row.split("@")[0]
    return "genai-int4" if "int4" in base else "genai-int8" if "int8" in base else PEER


def matmul_nbits_bytes(folder: Path) -> tuple[int, int]:
    """(bytes the GenAI model's MatMulNBits nodes read: B + scales + zero points, bytes the same K x N matrices
    take in fp32), from its graph (initializer shapes only; the external data is not loaded)."""
    import onnx

    m = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    init = {t.name: t for t in m.graph.initializer}
    quant = fp32 = 0
    for n in m.graph.node:
        if n.op_type != "MatMulNBits":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        fp32 += 4 * int(attrs["K"]) * int(attrs["N"])
        for name in list(n.input)[1:4]:
            if name in init:
                t = init[name]
                quant += math.prod(t.dims) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return quant, fp32


class GenAIRow(Row):
    backend = "onnxruntime-genai"

    def __init__(self, folder: Path, threads: int, dense_bytes: float, name: str = PEER):
        import onnxruntime_genai as og

        self.og, self.name = og, name
        width = GENAI_ROWS[name]
        self.label = "ONNX Runtime GenAI dense (peer)" if width == "fp32" else f"ONNX Runtime GenAI {width}"
        cfg = og.Config(str(folder))
        cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": int(threads), "inter_op_num_threads": 1}}}}))
        self.model = og.Model(cfg)
        self.notes = {"model": str(folder), "onnxruntime_genai": og.__version__,
                      "bytes_source": "dense byte count of the model (not read from GenAI)"}
        self.dense_bytes = dense_bytes
        if width != "fp32":  # the dense count with every MatMulNBits matrix at its stored size instead of fp32
            quant, fp32 = matmul_nbits_bytes(folder)
            self.dense_bytes = dense_bytes - fp32 + quant
            self.notes["bytes_source"] = ("dense byte count of the model with the MatMulNBits matrices at their "
                                          "stored size (B + scales + zero points, from its graph)")

    def run(self, ids, n):
        og = self.og
        params = og.GeneratorParams(self.model)
        total = len(ids) + n
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        gen = og.Generator(self.model, params)
        gen.append_tokens(ids)  # prefill (logits of the prompt)
        steps, tokens = [], []
        for i in range(n):
            t0 = time.perf_counter()
            gen.generate_next_token()  # 1st call: picks from the prefill logits; later: one decode step + pick
            dt = time.perf_counter() - t0
            tokens.append(int(gen.get_next_tokens()[0]))
            if i:
                steps.append(dt * 1000)
        return Sample(statistics.fmean(steps), self.dense_bytes, tokens)


class TorchRow(Row):
    """(time for n new tokens - time for 1) / (n - 1) on a PyTorch model (caprese reference or transformers)."""

    def __init__(self, name: str, label: str, timer, model, dense_bytes: float):
        self.name, self.label, self.backend = name, label, "torch"
        self.timer, self.model, self.dense_bytes = timer, model, dense_bytes
        self.notes = {"bytes_source": "dense byte count of the model"}

    def run(self, ids, n):
        one = self.timer(self.model, ids, 1)
        full = self.timer(self.model, ids, n)
        return Sample((full - one) / (n - 1) * 1000, self.dense_bytes)


# ---------------------------------------------------------------- the bench
def parse_rows(text: str | None) -> list[str]:
    if not text or text == "all":
        return list(ROW_NAMES)
    rows = [r.strip() for r in text.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROW_NAMES]
    if bad:
        raise ValueError(f"unknown row(s) {', '.join(bad)}; choose from {', '.join(ROW_NAMES)}")
    return [r for r in ROW_NAMES if r in rows]


def prompt_ids(vocab_size: int, n: int, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab_size, (n,), generator=gen).tolist()


def _r(x, n=3):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(x, n)


def run_bench(model_dir: str | Path, rows: list[str], prompt_tokens: int = 64, new_tokens: int = 128,
              repeats: int = 5, threads: int = 0, precision: str = "fp32", density: float = 0.5, rank: int = 64,
              out_dir: str | Path | None = None, bandwidth_mb: int = 512, settle_s: float = 0.2,
              log: Callable[[str], None] = print, background_load: int = 0, load_max_s: float = 3600.0,
              native_isas: list[str] | None = None) -> dict:
    """Prepare the rows, time them interleaved, return the result object (see the module docstring)."""
    from caprese.model.loading import load_decoder, resolve_dtype
    from caprese.model.spec import load_spec

    if new_tokens < 2:
        raise ValueError("new_tokens must be >= 2 (decode steps are timed after the first token)")
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    if threads:  # 0: "auto", every row on its backend's own policy (caprese.cpu_threads), the samples too
        torch.set_num_threads(threads)
    model_dir = str(model_dir)
    spec = load_spec(model_dir)
    root = Path(out_dir) if out_dir else Path("out/bench") / model_tag(model_dir)
    ids = prompt_ids(spec.vocab_size, prompt_tokens)
    skipped: dict[str, str] = {}

    dense_decoder = None
    dense_bytes = None
    if any(r in rows for r in (*GENAI_ROWS, "torch-dense", "transformers")):
        dense_decoder = load_decoder(model_dir, precision)
        dense_bytes = decode_bytes_per_step(dense_decoder, prompt_tokens + new_tokens / 2)

    # the busy processes run from before the rows load: a load-time thread count sees them, as a user's would
    with BackgroundLoad(background_load, load_max_s) as load:
        built: list[Row] = []
        for name in rows:
            if name in GENAI_ROWS:
                why = genai_unavailable()
                if why is None and precision != "fp32":
                    why = f"the GenAI rows are built for CPU with fp32 activations here (asked {precision})"
                if why is None:
                    try:
                        folder = prepare_genai(model_dir, root, GENAI_ROWS[name], log)
                        built.append(GenAIRow(folder, threads or cpu_threads.default_threads(), dense_bytes, name))
                    except Exception as e:
                        why = str(e).splitlines()[0] if str(e) else type(e).__name__
                if why is not None:
                    skipped[name] = why
                    log(f"bench: skipping {name}: {why}")
            elif name in ORT_ROWS or name in QUANT_ORT_ROWS:
                engine, adapters = prepare_engine(model_dir, root, name, row_recipe(name, density, rank), precision,
                                                  log)
                built.append(EngineRow(name, engine, threads or None, adapters))
            elif name in NATIVE_ROWS:
                src, head = NATIVE_ROWS[name]
                engine, adapters = prepare_engine(model_dir, root, src, row_recipe(src, density, rank), precision,
                                                  log)
                for k, isa in enumerate(native_isas or [None]):
                    built.append(EngineRow(name if k == 0 else f"{name}@{isa}", engine, threads or None, adapters,
                                           backend="native", head=head, isa=isa, **NATIVE_OPTIONS.get(name, {})))
            elif name == "torch-dense":
                built.append(TorchRow(name, "caprese PyTorch reference decoder, dense", time_ours, dense_decoder,
                                      dense_bytes))
            elif name == "transformers":
                from transformers import AutoModelForCausalLM

                attn = "eager" if spec.model_type == "gemma2" else None
                hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=resolve_dtype(precision),
                                                          attn_implementation=attn).eval()
                built.append(TorchRow(name, "transformers generate, dense", time_hf, hf, dense_bytes))

        log(f"bench: {len(built)} rows, warm-up then {repeats} interleaved rounds"
            + (f", {background_load} busy processes running" if background_load else ""))
        samples: dict[str, list[Sample]] = {r.name: [] for r in built}
        bandwidth: list[float] = []
        sample_threads: list[int] = []  # auto: the threads of each bandwidth sample
        round_trips: list[list[float | None]] = []  # each round's core-to-core round trips, before it and after it
        for rnd in range(repeats + 1):  # round 0 is the warm-up
            k = (rnd - 1) % len(built) if rnd and built else 0  # rotated: each row takes every place in turn
            # not next to the busy processes: they take the pinned threads' CPUs (time slices, not placement)
            before = measure_round_trip_ns() if rnd and not background_load else None
            for row in built[k:] + built[:k]:
                s = row.run(ids, new_tokens)
                if rnd:
                    samples[row.name].append(s)
                elif s.tokens is not None:
                    row.notes["first_tokens"] = s.tokens[:16]
                time.sleep(settle_s)  # let the previous runtime's spinning threads go idle
            if rnd:
                if not threads:  # auto: the sample on as many threads as the policy gives a row now
                    sample_threads.append(cpu_threads.default_threads())
                    torch.set_num_threads(sample_threads[-1])
                bandwidth.append(measure_bandwidth_gbs(bandwidth_mb))
                round_trips.append([before, None if background_load else measure_round_trip_ns()])
                time.sleep(settle_s)
            if load.alive() != background_load:
                raise RuntimeError(f"{background_load - load.alive()} of the {background_load} busy processes "
                                   "ended early (raise load_max_s)")
            log(f"bench: round {rnd}/{repeats} done" + (" (warm-up)" if rnd == 0 else ""))
    gbs = statistics.median(bandwidth)
    placed = placements(round_trips)

    results = []
    for row in built:
        ms_all = [s.ms for s in samples[row.name]]
        ms = statistics.median(ms_all)
        b = samples[row.name][-1].bytes_per_step
        floor = b / (gbs * 1e9) * 1000
        # also each round against the bandwidth sampled in that round: these VMs flip between read-bandwidth
        # regimes from one minute to the next, and the median row time and median bandwidth may come from
        # different ones (information only: the targets stay on the medians)
        per_round = [x / (b / (g * 1e9) * 1000) for x, g in zip(ms_all, bandwidth)]
        results.append({"row": row.name, "label": row.label, "backend": row.backend,
                        "ms_per_token": _r(ms), "ms_per_token_samples": [_r(x) for x in ms_all],
                        "tokens_per_s": _r(1000 / ms, 2), "bytes_per_step": int(round(b)),
                        "gb_per_s": _r(b / ms / 1e6), "floor_ms_per_token": _r(floor),
                        "ratio_to_floor": _r(ms / floor), "ratio_to_floor_per_round": [_r(x) for x in per_round],
                        "ratio_to_peer": None, **row.notes})
        if placed:  # the per-round ratios by the threads' placement in that round (information only)
            results[-1]["ratio_to_floor_by_placement"] = {
                where: {"rounds": len(xs), "median": _r(statistics.median(xs))}
                for where in ("near", "far", "moved")
                if (xs := [x for x, p in zip(per_round, placed) if p == where])}
    by = {r["row"]: r for r in results}
    for r in results:  # native rows: the ratio to ONNX Runtime on the same engine, per round and overall
        ref = by.get(SAME_ENGINE.get(r["row"].split("@")[0], ""))
        if ref:
            per_round = [a / b for a, b in zip(r["ms_per_token_samples"], ref["ms_per_token_samples"])]
            r["ratio_to_same_engine_ort"] = _r(r["ms_per_token"] / ref["ms_per_token"])
            r["ratio_to_same_engine_ort_per_round"] = [_r(x) for x in per_round]
    for r in results:
        peer = by.get(peer_of(r["row"]))
        if peer is not None:
            r["ratio_to_peer"] = _r(r["ms_per_token"] / peer["ms_per_token"])
            r["peer"] = peer["row"]
    if PEER in by:
        peer_first = by[PEER].get("first_tokens")
        if peer_first and "ort-dense" in by and by["ort-dense"].get("first_tokens"):
            a, b = peer_first, by["ort-dense"]["first_tokens"]
            by[PEER]["first_tokens_agree_with_ort_dense"] = next(
                (i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    targets = {}
    for name, peer_max, floor_max in TARGETS:
        if name in by:
            r = by[name]
            targets[name] = {"ratio_to_peer": r["ratio_to_peer"], "peer_max": peer_max,
                             "ratio_to_floor": r["ratio_to_floor"], "floor_max": floor_max,
                             "ratio_to_floor_per_round": r["ratio_to_floor_per_round"],
                             "ratio_to_floor_by_placement": r.get("ratio_to_floor_by_placement"),
                             "met_peer": None if r["ratio_to_peer"] is None else r["ratio_to_peer"] <= peer_max,
                             "met_floor": r["ratio_to_floor"] <= floor_max}
    for r in results:
        x = r.get("ratio_to_same_engine_ort")
        if x is None:
            continue
        if background_load:
            targets[f"{r['row']} (contended)"] = {"ratio_to_same_engine_ort": x, "max": CONTENDED_MAX,
                                                  "met": x <= CONTENDED_MAX}
        elif r.get("isa") == "avx2":
            targets[f"{r['row']} (avx2)"] = {"ratio_to_same_engine_ort": x, "max": AVX2_MAX, "met": x <= AVX2_MAX}
    for r in results:  # the default head (the probe's choice) is no slower than the full head, same ISA
        base, _, isa = r["row"].partition("@")
        full = by.get(FULL_HEAD_OF.get(base, "") + (f"@{isa}" if isa else ""))
        if full:
            x = _r(r["ms_per_token"] / full["ms_per_token"])
            targets[f"{r['row']} head"] = {"ratio_to_full_head": x, "head": r.get("head"), "max": 1.0,
                                           "met": x <= 1.0}
    out = {"model_dir": model_dir, "precision": precision, "device": "cpu", "cpu": cpu_name(),
           "background_load": background_load, "threads": threads or "auto",
           "bandwidth_sample_threads": sample_threads or None,
           "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repeats": repeats,
           "density": density, "rank": rank, "cache_dir": str(root),
           "measured_bandwidth_gbs": _r(gbs, 2), "bandwidth_samples_gbs": [_r(x, 2) for x in bandwidth],
           "core_round_trip_ns_samples": [[None if t is None else _r(t, 1) for t in ts] for ts in round_trips],
           "placements": placed,
           "peer": PEER if PEER in by else None, "rows": results, "skipped": skipped, "targets": targets}
    if "torch-dense" in by and "transformers" in by:
        out["ratio_caprese_over_transformers"] = _r(by["torch-dense"]["ms_per_token"]
                                                    / by["transformers"]["ms_per_token"])
    return out


def format_table(res: dict) -> str:
    load = res.get("background_load", 0)
    lines = [f"model {res['model_dir']} ({res['precision']}, {res.get('cpu', 'cpu')}, {res['threads']} threads), "
             f"prompt {res['prompt_tokens']} tokens, {res['new_tokens']} new tokens, median of {res['repeats']} "
             f"interleaved repeats, {load or 'no'} busy process{'es' if load != 1 else ''} started by the bench; "
             f"read bandwidth {res['measured_bandwidth_gbs']} GB/s (median of {res['bandwidth_samples_gbs']})"
             + (f"; core-to-core round trip before / after each round {res['core_round_trip_ns_samples']} ns"
                if any(t is not None for ts in res.get("core_round_trip_ns_samples", []) for t in ts) else "")]
    w = max([29] + [len(r["row"]) + 2 for r in res["rows"]] + [len(n) + 2 for n in res["skipped"]])
    head = (f"{'row':<{w}}{'what':<64}{'ms/token':>9}{'tok/s':>8}{'MB/step':>9}{'GB/s':>7}{'x peer':>8}"
            f"{'x ORT':>7}{'floor ms':>9}{'x floor':>8}")
    lines += [head, "-" * len(head)]
    for r in res["rows"]:
        peer = "-" if r["ratio_to_peer"] is None else f"{r['ratio_to_peer']:.3f}"
        same = "-" if r.get("ratio_to_same_engine_ort") is None else f"{r['ratio_to_same_engine_ort']:.3f}"
        lines.append(f"{r['row']:<{w}}{r['label'][:63]:<64}{r['ms_per_token']:>9.2f}{r['tokens_per_s']:>8.1f}"
                     f"{r['bytes_per_step'] / 1e6:>9.1f}{r['gb_per_s']:>7.2f}{peer:>8}{same:>7}"
                     f"{r['floor_ms_per_token']:>9.2f}{r['ratio_to_floor']:>8.3f}")
    lines.append("x ORT: a native row's ms/token over ONNX Runtime's on the same engine folder (per round: "
                 + "; ".join(f"{r['row']} {r['ratio_to_same_engine_ort_per_round']}" for r in res["rows"]
                             if r.get("ratio_to_same_engine_ort_per_round")) + ")")
    for name, why in res["skipped"].items():
        lines.append(f"{name:<{w}}skipped: {why}")
    adapters = {r["row"]: r["adapters"] for r in res["rows"] if r.get("adapters") not in (None, "n/a", "none")}
    if adapters:
        lines.append("adapters: " + "; ".join(f"{k}: {v}" for k, v in adapters.items()))
    native = [r for r in res["rows"] if r.get("isa")]
    if native:
        lines.append("native rows: " + "; ".join(
            f"{r['row']}: {r['isa']}, {r['threads']} threads, head {r.get('head_choice') or r['head']}"
            + (f", {r['kernel']['rerun_chunks']} chunks run again" if r.get("kernel") else "") for r in native))
    for r in native:
        if r.get("profile_us"):
            lines.append(f"{r['row']}: µs per step by phase (median of runs): "
                         + ", ".join(f"{k} {v}" for k, v in r["profile_us"].items()))
    screened = {r["row"]: r["head_rows_per_step"] for r in res["rows"] if "head_rows_per_step" in r}
    if screened:
        lines.append("screened head, fp32 rows recomputed per step: " +
                     "; ".join(f"{k}: {v}" for k, v in screened.items()))
    for name, t in res["targets"].items():
        if "ratio_to_full_head" in t:  # the native default head against the full head
            lines.append(f"target {name}: the default head ({t['head']}) {t['ratio_to_full_head']:.3f}x the full "
                         f"head's ms/token (target <= {t['max']}: {'met' if t['met'] else 'NOT met'})")
            continue
        if "met_peer" not in t:  # native against ONNX Runtime on the same engine (contended, or the AVX2 build)
            lines.append(f"target {name}: {t['ratio_to_same_engine_ort']:.3f}x ONNX Runtime on the same engine "
                         f"(target <= {t['max']}: {'met' if t['met'] else 'NOT met'})")
            continue
        peer = ("n/a (no peer)" if t["met_peer"] is None else
                f"{t['ratio_to_peer']:.3f}x peer (target <= {t['peer_max']}: {'met' if t['met_peer'] else 'NOT met'})")
        lines.append(f"target {name}: {peer}; {t['ratio_to_floor']:.3f}x floor (target <= {t['floor_max']}: "
                     f"{'met' if t['met_floor'] else 'NOT met'}; each round against its own bandwidth sample: "
                     f"{t['ratio_to_floor_per_round']}"
                     + "".join(f"; rounds with the threads {w} ({v['rounds']}): median {v['median']:.3f}x"
                               for w, v in (t.get("ratio_to_floor_by_placement") or {}).items()) + ")")
    if "ratio_caprese_over_transformers" in res:
        lines.append(f"ratio caprese torch reference / transformers: {res['ratio_caprese_over_transformers']:.3f}")
    return "\n".join(lines)


def threads_arg(v: str) -> int:
    """--threads: a count >= 1, or 'auto' (0 to run_bench)."""
    if v == "auto":
        return 0
    if not v.isdigit() or int(v) < 1:
        raise argparse.ArgumentTypeError(f"takes a thread count >= 1 or 'auto' (got {v!r})")
    return int(v)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:10]))
    ap.add_argument("model_dir", nargs="?", help="local HF folder (default: the built-in SmolLM2-135M-Instruct)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "fp16"])
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", default="auto", type=threads_arg,
                    help="threads for every row, or 'auto' (the default: what a user gets): every row on its "
                         "runtime's own policy, one thread per CPU other processes leave free (the native rows "
                         "re-read it as they run, GenAI takes the count at load), and each bandwidth sample on the "
                         "count the policy gives then")
    ap.add_argument("--rows", default="all", help=f"comma-separated subset of: {', '.join(ROW_NAMES)}")
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--rank", type=int, default=64, help="rank of the Caprese rows' (random-init) adapters")
    ap.add_argument("--out-dir", default=None, help="engine / GenAI model cache (default out/bench/<model>)")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the result object to this file")
    ap.add_argument("--background-load", type=int, default=0, metavar="N",
                    help="start N busy processes (CPU-only loops) for the timed rounds and stop them at the end "
                         "(each ends by itself after --load-max-s or when the bench is gone); default 0")
    ap.add_argument("--load-max-s", type=float, default=3600.0, help="time bound of each busy process (s)")
    ap.add_argument("--native-isa", default=None, metavar="LIST",
                    help="instruction sets of the native rows, comma-separated (avx512, avx2, scalar; default: "
                         "$CAPRESE_NATIVE_ISA or the CPU's widest); each native row runs once per ISA")
    args = ap.parse_args()

    from caprese.errors import CapreseError
    from caprese.model.default_model import fetch_default

    try:
        rows = parse_rows(args.rows)
        model_dir = args.model_dir or str(fetch_default())
        res = run_bench(model_dir, rows, args.prompt_tokens, args.new_tokens, args.repeats, args.threads,
                        args.precision, args.density, args.rank, args.out_dir,
                        log=lambda m: print(m, file=sys.stderr, flush=True), background_load=args.background_load,
                        load_max_s=args.load_max_s,
                        native_isas=[x.strip() for x in args.native_isa.split(",")] if args.native_isa else None)
    except (CapreseError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(res))
    print(json.dumps(res))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
