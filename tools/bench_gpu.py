#!/usr/bin/env python3
"""GPU decode speed of the PyTorch backend's step (Decoder.decode_static under a CUDA graph) against the HBM
bandwidth measured in the same run: issue 5's GPU targets.

    python tools/bench_gpu.py                          # random Llama-3.2-1B-shaped model, bf16, cuda
    python tools/bench_gpu.py MODEL_DIR --precision bf16 --json out.json
    python tools/bench_gpu.py --shape tiny --device cpu --precision fp32 --rank 8   # smoke run (no CUDA graph)

Rows: dense, and Caprese(GRIFFIN, --density, all layers, rank --rank) on the same weights (random adapters:
right shapes and bytes, not calibrated). Each repeat prefills a random --prompt-tokens prompt (eager), then
times --new-tokens greedy decode steps (argmax on the device, no host sync inside the loop) with CUDA events;
ms/token is the median over --repeats.

Bytes per step: every weight the step reads once (the embedding: one row; a tied LM head: the whole table;
GRIFFIN layers: the k selected rows of W_g, W_1 and columns of W_2, plus L and R), plus K and V of every
allocated cache slot (the static step attends over the whole buffer, masked). HBM bandwidth: a read-only
reduction over a --bandwidth-mb buffer, median of 10. Targets (issue 5): dense >= 60% of the measured
bandwidth; Caprese/dense time ratio within 5% of the bytes ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

# a shape, not weights: the layers of Llama 3.2 1B (no download; weights are random)
SHAPES = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                     max_position_embeddings=8192, rope_parameters={"rope_type": "default", "rope_theta": 5e5}),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=512, tie_word_embeddings=True,
                 max_position_embeddings=512, rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
}
TARGET_BANDWIDTH_SHARE = 0.60
TARGET_RATIO_GAP = 0.05


def random_decoder(shape: str, precision: str, device: str, seed: int = 0):
    """A Decoder of `shape` with N(0, 0.02) weights (norms 1), built on the device directly."""
    from transformers import LlamaConfig
    from transformers.utils import logging as hf_logging

    from caprese.model.decoder import Decoder
    from caprese.model.loading import resolve_dtype
    from caprese.model.spec import load_spec

    hf_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as d:
        LlamaConfig(**SHAPES[shape]).save_pretrained(d)
        spec = load_spec(d)
    with torch.device("meta"):
        dec = Decoder(spec)
    dec = dec.to_empty(device=device).to(resolve_dtype(precision))
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in dec.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=torch.float32) * 0.02)
    if spec.tie_word_embeddings:
        dec.lm_head.weight = dec.model.embed_tokens.weight
    return dec.eval().requires_grad_(False)


def load(model_dir: str, precision: str, device: str):
    from caprese.model.loading import load_decoder

    return load_decoder(model_dir, precision, device)


def bytes_per_step(dec, kv_slots: int) -> int:
    """What one decode step reads (see the module docstring)."""
    from caprese.calibration.methods import efficient_layers

    spec = dec.spec
    item = dec.model.embed_tokens.weight.element_size()
    seen, total = set(), 0
    for p in dec.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    emb = dec.model.embed_tokens.weight
    total -= emb.numel() * item - spec.hidden_size * item  # the token's row only ...
    if spec.tie_word_embeddings:
        total += emb.numel() * item  # ... but a tied LM head reads the whole table
    for f in efficient_layers(dec).values():
        dense = [f.dense.gate_proj, f.dense.up_proj, f.dense.down_proj]
        total -= sum(m.weight.numel() * item for m in dense)
        total += 3 * f.k * spec.hidden_size * item
        # the bypass' L and R were counted with the parameters above
    total += 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * item * kv_slots
    return int(total)


def measure_bandwidth_gbs(device: str, mbytes: int, repeats: int = 10) -> float:
    x = torch.ones(mbytes * 2**20 // 4, dtype=torch.float32, device=device)
    times = []
    for _ in range(repeats + 1):
        t = _timer(device)
        x.sum()
        times.append(t())
    return x.numel() * 4 / statistics.median(times[1:]) / 1e9


def _timer(device: str):
    """start now; the returned function gives the seconds since, synchronised with the device."""
    if device.startswith("cuda"):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()

        def stop():
            b.record()
            b.synchronize()
            return a.elapsed_time(b) / 1000

        return stop
    t0 = time.perf_counter()
    return lambda: time.perf_counter() - t0


@torch.inference_mode()
def time_decode(dec, prompt_tokens: int, new_tokens: int, cuda_graph: bool, seed: int = 0) -> float:
    """Seconds per decode step: prefill a random prompt, then new_tokens greedy static steps."""
    from caprese.calibration.methods import efficient_layers
    from caprese.runtime.cuda_graph import CapturedStep

    device = dec.model.embed_tokens.weight.device
    cap = prompt_tokens + new_tokens + 1
    if dec.max_len != cap:
        dec.setup_caches(1, cap)
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, dec.spec.vocab_size, (1, prompt_tokens), generator=g).to(device)
    logits = dec(prompt, 0, None, last_only=True, phase="prefill")  # GRIFFIN layers select here
    for f in efficient_layers(dec).values():
        if hasattr(f, "pin_weights"):  # GRIFFIN: selection in fixed buffers (a no-op once pinned)
            f.pin_weights()
    token = logits[:, -1].argmax(-1, keepdim=True)
    slot = torch.tensor([prompt_tokens], device=device)
    step = CapturedStep(dec.decode_static, token, slot) if cuda_graph else None
    t = _timer(str(device))
    for _ in range(new_tokens):
        out = step.replay() if step else dec.decode_static(token, slot)
        token.copy_(out[:, -1].argmax(-1, keepdim=True))
        slot.add_(1)
    return t() / new_tokens


def run(dec, rows: list[str], prompt_tokens: int, new_tokens: int, repeats: int, density: float, rank: int,
        cuda_graph: bool, bandwidth_mb: int, log=print) -> dict:
    from caprese.calibration.methods import apply_method, efficient_layers

    device = str(dec.model.embed_tokens.weight.device)
    out_rows = []
    for name in rows:
        if name == "caprese-griffin":
            apply_method(dec, "griffin", density, "all", rank=rank, seed=1)
            with torch.no_grad():
                for f in efficient_layers(dec).values():
                    f.bypass.R.normal_(0.0, 1e-3)
        time_decode(dec, prompt_tokens, min(new_tokens, 8), cuda_graph)  # warm-up
        samples = [time_decode(dec, prompt_tokens, new_tokens, cuda_graph, seed=r) for r in range(repeats)]
        s = statistics.median(samples)
        b = bytes_per_step(dec, dec.max_len)
        out_rows.append({"row": name, "ms_per_token": round(s * 1e3, 4),
                         "ms_per_token_samples": [round(x * 1e3, 4) for x in samples],
                         "bytes_per_step": b, "gb_per_s": round(b / s / 1e9, 2)})
        log(f"bench_gpu: {name}: {s * 1e3:.3f} ms/token")
    gbs = measure_bandwidth_gbs(device, bandwidth_mb)
    res = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
           "precision": str(dec.model.embed_tokens.weight.dtype).replace("torch.", ""),
           "cuda_graph": cuda_graph, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repeats": repeats,
           "density": density, "rank": rank, "measured_bandwidth_gbs": round(gbs, 1),
           "date": time.strftime("%Y-%m-%d"), "rows": out_rows, "targets": {}}
    by = {r["row"]: r for r in out_rows}
    for r in out_rows:
        r["bandwidth_share"] = round(r["gb_per_s"] / gbs, 3)
    if "dense" in by:
        res["targets"]["dense_bandwidth_share"] = {"value": by["dense"]["bandwidth_share"],
                                                   "min": TARGET_BANDWIDTH_SHARE,
                                                   "met": by["dense"]["bandwidth_share"] >= TARGET_BANDWIDTH_SHARE}
    if "dense" in by and "caprese-griffin" in by:
        t = by["caprese-griffin"]["ms_per_token"] / by["dense"]["ms_per_token"]
        b = by["caprese-griffin"]["bytes_per_step"] / by["dense"]["bytes_per_step"]
        res["targets"]["caprese_time_vs_bytes"] = {"time_ratio": round(t, 3), "bytes_ratio": round(b, 3),
                                                   "gap": round(t / b - 1, 3), "max_gap": TARGET_RATIO_GAP,
                                                   "met": abs(t / b - 1) <= TARGET_RATIO_GAP}
    return res


def format_table(res: dict) -> str:
    lines = [f"{res['device']}, {res['precision']}, CUDA graph {res['cuda_graph']}, prompt {res['prompt_tokens']}, "
             f"{res['new_tokens']} new tokens, median of {res['repeats']}; read bandwidth "
             f"{res['measured_bandwidth_gbs']} GB/s ({res['date']})",
             f"{'row':<18}{'ms/token':>10}{'MB/step':>10}{'GB/s':>9}{'x bandwidth':>13}"]
    for r in res["rows"]:
        lines.append(f"{r['row']:<18}{r['ms_per_token']:>10.3f}{r['bytes_per_step'] / 1e6:>10.1f}"
                     f"{r['gb_per_s']:>9.1f}{r['bandwidth_share']:>13.3f}")
    for name, t in res["targets"].items():
        lines.append(f"target {name}: {json.dumps(t)}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:6]))
    ap.add_argument("model_dir", nargs="?", help="local HF folder (default: a random --shape model)")
    ap.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES))
    ap.add_argument("--precision", default="bf16", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--rows", default="dense,caprese-griffin")
    ap.add_argument("--no-cuda-graph", action="store_true")
    ap.add_argument("--bandwidth-mb", type=int, default=2048)
    ap.add_argument("--json", dest="json_out", default=None)
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA GPU visible to torch; run on a GPU machine (or --device cpu --shape tiny for a smoke "
              "run)", file=sys.stderr)
        return 2
    rows = [r for r in ("dense", "caprese-griffin") if r in args.rows.split(",")]
    dec = load(args.model_dir, args.precision, args.device) if args.model_dir else \
        random_decoder(args.shape, args.precision, args.device)
    hidden = dec.spec.hidden_size
    if "caprese-griffin" in rows and not 0 < args.rank < hidden:
        print(f"error: --rank must be between 1 and the hidden size - 1 ({hidden - 1}); got {args.rank}",
              file=sys.stderr)
        return 2
    res = run(dec, rows, args.prompt_tokens, args.new_tokens, args.repeats, args.density, args.rank,
              args.device.startswith("cuda") and not args.no_cuda_graph, args.bandwidth_mb,
              log=lambda m: print(m, file=sys.stderr, flush=True))
    res["model"] = args.model_dir or f"random {args.shape}"
    print(format_table(res))
    print(json.dumps(res))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
