#!/usr/bin/env python3
"""Dense decode speed of caprese's reference decoder vs transformers' `generate`, same model and prompt, one run.

Prints ms per output token, achieved GB/s (bytes a decode step must read / time per token) and the ratio
caprese / transformers. Also measures this machine's read bandwidth, so the floor is from the same run.

    python tools/bench_decode.py                 # the built-in default model (SmolLM2-135M-Instruct), fp32, CPU
    python tools/bench_decode.py MODEL_DIR --prompt-tokens 64 --new-tokens 128 --repeats 5 --json out.json

Time per token is (time for N new tokens - time for 1 new token) / (N - 1) for both sides, so prefill and
Python start-up costs cancel the same way; the median over repeats is reported (these machines are noisy).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


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
    timer(model, ids, n)  # warm-up
    samples = []
    for _ in range(repeats):
        one = timer(model, ids, 1)
        full = timer(model, ids, n)
        samples.append((full - one) / (n - 1) * 1000)
    return statistics.median(samples)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model_dir", nargs="?", help="local HF folder (default: the built-in SmolLM2-135M-Instruct)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the result object to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from caprese.errors import CapreseError
    from caprese.model.default_model import fetch_default
    from caprese.model.loading import load_decoder, resolve_dtype

    try:
        model_dir = args.model_dir or str(fetch_default())
        ours = load_decoder(model_dir, args.precision)
    except CapreseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    attn = "eager" if ours.spec.model_type == "gemma2" else None
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=resolve_dtype(args.precision),
                                              attn_implementation=attn).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, ours.spec.vocab_size, (args.prompt_tokens,), generator=gen).tolist()

    bandwidth = measure_bandwidth_gbs()
    ms_ours = per_token_ms(time_ours, ours, ids, args.new_tokens, args.repeats)
    ms_hf = per_token_ms(time_hf, hf, ids, args.new_tokens, args.repeats)
    step_bytes = decode_bytes_per_step(ours, args.prompt_tokens + args.new_tokens / 2)
    floor_ms = step_bytes / (bandwidth * 1e9) * 1000
    result = {
        "model_dir": model_dir, "precision": args.precision, "threads": torch.get_num_threads(),
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "bytes_per_step_mb": round(step_bytes / 1e6, 1), "measured_bandwidth_gbs": round(bandwidth, 2),
        "floor_ms_per_token": round(floor_ms, 2),
        "caprese_ms_per_token": round(ms_ours, 2), "transformers_ms_per_token": round(ms_hf, 2),
        "caprese_gbs": round(step_bytes / ms_ours / 1e6, 2), "transformers_gbs": round(step_bytes / ms_hf / 1e6, 2),
        "ratio_caprese_over_transformers": round(ms_ours / ms_hf, 3),
        "ratio_caprese_over_floor": round(ms_ours / floor_ms, 3),
    }
    print(f"model {model_dir} ({args.precision}, {result['threads']} threads), prompt {args.prompt_tokens} tokens, "
          f"{args.new_tokens} new tokens, median of {args.repeats}")
    print(f"bytes read per decode step {result['bytes_per_step_mb']} MB; measured read bandwidth "
          f"{result['measured_bandwidth_gbs']} GB/s -> floor {result['floor_ms_per_token']} ms/token")
    print(f"{'decoder':<14}{'ms/token':>10}{'GB/s':>8}{'x floor':>9}")
    for name, ms in (("caprese", ms_ours), ("transformers", ms_hf)):
        print(f"{name:<14}{ms:>10.2f}{step_bytes / ms / 1e6:>8.2f}{ms / floor_ms:>9.2f}")
    print(f"ratio caprese / transformers: {result['ratio_caprese_over_transformers']:.3f}")
    print(json.dumps(result))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
