#!/usr/bin/env python3
"""Accuracy of low-bit weights on the built-in model: dense fp32 vs int4/int8 RTN vs GPTQ (no bypass).

For every row: a fresh fp32 SmolLM2 (or --model), its decoder linear weights quantized in place
(caprese.calibration.weight_quant.quantize_decoder: the exact values the int4 / int8 graphs compute), then
  - the built-in arithmetic task (greedy, chat template): correct / N with its binomial standard error
    sqrt(p (1 - p) / N), mean generated tokens;
  - teacher-forced agreement with the dense model on held-out dense replies (synthetic samples not used for
    calibration): mean KL(dense ‖ quantized) of the next-token distributions and the share of positions whose
    greedy token is unchanged. Thousands of tokens, so far less noisy than N problems.
GPTQ calibrates on the first --samples synthetic samples (the dense model's own replies to training problems,
"Please reason step by step.", as `caprese calibrate --synthetic` uses); the held-out ones come after them.
Results go to OUT/results.json row by row, so a killed run resumes at the first row not yet measured.

    python tools/quant_accuracy.py --limit 100     # dense, int4 RTN, GPTQ without / with act-order (block 32)
    python tools/quant_accuracy.py --rows int4-gptq-ao,int8-rtn --limit 60
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROWS = {  # name -> (bits, method, act_order) or None for dense; "-ao": GPTQ with act-order (its default)
    "dense": None,
    "int8-rtn": (8, "rtn", False),
    "int8-gptq": (8, "gptq", False),
    "int8-gptq-ao": (8, "gptq", True),
    "int4-rtn": (4, "rtn", False),
    "int4-gptq": (4, "gptq", False),
    "int4-gptq-ao": (4, "gptq", True),
}
DEFAULT_ROWS = "dense,int4-rtn,int4-gptq,int4-gptq-ao"


def agreement(dense_logits: list, decoder, samples) -> dict:
    """Mean KL(dense ‖ model) and greedy agreement over every response position of `samples`."""
    import torch

    kl_sum, same, n = 0.0, 0, 0
    for s, ref in zip(samples, dense_logits):
        ids = torch.tensor([s.ids])
        with torch.no_grad():
            logits = decoder(ids, 0)[0, len(s.prompt_ids) - 1:-1].double()
        lp, lq = torch.log_softmax(ref, -1), torch.log_softmax(logits, -1)
        kl_sum += float((lp.exp() * (lp - lq)).sum())
        same += int((ref.argmax(-1) == logits.argmax(-1)).sum())
        n += ref.shape[0]
    return {"kl": kl_sum / n, "greedy_agree": same / n, "positions": n}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--out", default="out/quant_accuracy")
    ap.add_argument("--model", default=None, help="model folder (default: caprese fetch-default)")
    ap.add_argument("--rows", default=DEFAULT_ROWS, help=f"comma-separated, from {', '.join(ROWS)}")
    ap.add_argument("--limit", type=int, default=60, help="problems of the built-in arithmetic task")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--scale-dtype", default="fp16", choices=["fp16", "fp32"])
    ap.add_argument("--head", action="store_true", help="quantize the LM head too")
    ap.add_argument("--samples", type=int, default=64, help="GPTQ calibration samples")
    ap.add_argument("--heldout", type=int, default=32, help="held-out samples for the KL / agreement columns")
    ap.add_argument("--response-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steady on a busy shared machine)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)

    from caprese.calibration.data import synthetic_samples
    from caprese.calibration.gptq import GPTQConfig
    from caprese.calibration.weight_quant import DECODER_ROLES, QuantRecipe, quantize_decoder
    from caprese.evaluation.evaluate import evaluate
    from caprese.evaluation.tasks import arithmetic_task
    from caprese.model.default_model import fetch_default
    from caprese.model.quantization import WeightFormat
    from caprese.model.text_model import TextModel

    names = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in names if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown row(s) {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model) if args.model else fetch_default()
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    settings = {"limit": args.limit, "max_new_tokens": args.max_new_tokens, "block_size": args.block_size,
                "scale_dtype": args.scale_dtype, "head": args.head, "samples": args.samples,
                "heldout": args.heldout, "response_tokens": args.response_tokens, "model": str(model_dir)}
    if results.get("settings", settings) != settings:
        raise SystemExit(f"{results_path} was measured with other settings; use another --out")
    results["settings"] = settings
    print(f"torch threads {torch.get_num_threads()}", file=sys.stderr)

    t0 = time.perf_counter()
    base = TextModel.load(model_dir)
    samples = synthetic_samples(base, args.samples + args.heldout, out / "synthetic", args.response_tokens)
    cal, held = samples[:args.samples], samples[args.samples:]
    print(f"synthetic samples: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    base.decoder.setup_caches(1, max(len(s.ids) for s in held))
    with torch.no_grad():
        dense_logits = [base.decoder(torch.tensor([s.ids]), 0)[0, len(s.prompt_ids) - 1:-1].double()
                        for s in held]
    task = arithmetic_task(args.limit)

    for name in names:
        if name in results:
            continue
        tm = base if name == "dense" else TextModel.load(model_dir)
        row, t_q = ROWS[name], 0.0
        if row is not None:
            bits, method, act_order = row
            roles = DECODER_ROLES + (("lm_head",) if args.head else ())
            recipe = QuantRecipe(WeightFormat(bits, args.block_size, args.scale_dtype), method, roles,
                                 GPTQConfig(act_order=act_order))
            t = time.perf_counter()
            quantize_decoder(tm.decoder, recipe, cal if method == "gptq" else None, progress=True)
            t_q = time.perf_counter() - t
            tm.label = name
        tm.decoder.setup_caches(1, max(len(s.ids) for s in held))
        agree = agreement(dense_logits, tm.decoder, held)
        res = evaluate(tm, task, args.max_new_tokens, args.batch_size, progress=True)
        p = res.accuracy
        results[name] = {"correct": res.correct, "total": res.total, "accuracy": p,
                         "stderr": math.sqrt(p * (1 - p) / res.total), "mean_generated_tokens":
                         res.mean_generated_tokens, "eval_s": round(res.wall_s, 1), "quantize_s": round(t_q, 1),
                         **agree}
        results_path.write_text(json.dumps(results, indent=2))
        r = results[name]
        print(f"{name}: {r['correct']}/{r['total']} = {p:.3f} ± {r['stderr']:.3f}, KL {r['kl']:.4f}, "
              f"greedy agreement {r['greedy_agree']:.3f}, quantize {t_q:.0f} s, eval {res.wall_s:.0f} s",
              file=sys.stderr, flush=True)
    print(table(results, names))
    return 0


def table(results: dict, names: list[str]) -> str:
    lines = ["| weights | correct | accuracy ± s.e. | mean generated tokens | KL(dense‖q) held-out | "
             "greedy agreement | quantize s | eval s |", "|---|---|---|---|---|---|---|---|"]
    for name in names:
        r = results.get(name)
        if r is None:
            continue
        lines.append(f"| {name} | {r['correct']}/{r['total']} | {100 * r['accuracy']:.1f}% ± "
                     f"{100 * r['stderr']:.1f} | {r['mean_generated_tokens']:.1f} | {r['kl']:.4f} | "
                     f"{100 * r['greedy_agree']:.1f}% | {r['quantize_s']} | {r['eval_s']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
