#!/usr/bin/env python3
"""The README's accuracy table: calibrate and evaluate every configuration on the built-in default model.

Runs the real CLI (`caprese calibrate`, `caprese eval --json`) so each row is reproducible by hand, and keeps
results in OUT/results.json: a killed run resumes at the first row not yet measured.

    python tools/calibration_table.py                      # everything, into out/table
    python tools/calibration_table.py --only dense,griffin-0.5 --limit 60
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from caprese.calibration.problems import EVAL_MAX_NEW_TOKENS  # noqa: E402  (the one reply budget of caprese eval)

BIN = Path(sys.executable).parent
# name -> (eval flags or artifact to build, calibrate args or None)
ROWS = [
    ("dense", {"method": "dense"}),
    ("griffin-0.5", {"method": "griffin", "density": 0.5, "layers": "first-half"}),
    ("caprese-griffin-0.5-r64-lw", {"calibrate": ["--method", "griffin", "--density", "0.5", "--layers", "first-half",
                                                 "--rank", "64", "--stage", "layerwise"]}),
    ("caprese-griffin-0.5-r64-e2e", {"init": "caprese-griffin-0.5-r64-lw"}),
    ("caprese-griffin-0.5-r256-lw", {"calibrate": ["--method", "griffin", "--density", "0.5", "--layers",
                                                  "first-half", "--rank", "256", "--stage", "layerwise"]}),
    ("caprese-griffin-0.5-r256-e2e", {"init": "caprese-griffin-0.5-r256-lw"}),
    ("caprese-griffin-0.5-r256-seq", {"calibrate": ["--method", "griffin", "--density", "0.5", "--layers",
                                                   "first-half", "--rank", "256", "--stage", "layerwise",
                                                   "--layerwise-mode", "sequential"]}),
    ("caprese-griffin-0.5-r64-seq", {"calibrate": ["--method", "griffin", "--density", "0.5", "--layers",
                                                  "first-half", "--rank", "64", "--stage", "layerwise",
                                                  "--layerwise-mode", "sequential"]}),
    ("griffin-0.75", {"method": "griffin", "density": 0.75, "layers": "first-half"}),
    ("caprese-griffin-0.75-r64-lw", {"calibrate": ["--method", "griffin", "--density", "0.75", "--layers",
                                                  "first-half", "--rank", "64", "--stage", "layerwise"]}),
    ("caprese-griffin-0.75-r64-e2e", {"init": "caprese-griffin-0.75-r64-lw"}),
    ("cats-0.5", {"method": "cats", "density": 0.5, "layers": "all"}),
    ("caprese-cats-0.5-r64-lw", {"calibrate": ["--method", "cats", "--density", "0.5", "--layers", "all",
                                              "--rank", "64", "--stage", "layerwise"]}),
    ("caprese-cats-0.5-r64-e2e", {"init": "caprese-cats-0.5-r64-lw"}),
]


def run(cmd: list[str]) -> str:
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if p.returncode:
        raise SystemExit(f"command failed ({p.returncode}): {' '.join(cmd)}")
    return p.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--out", default="out/table")
    ap.add_argument("--model", default=None, help="model folder (default: caprese fetch-default)")
    ap.add_argument("--limit", type=int, default=200, help="problems of the built-in arithmetic task")
    ap.add_argument("--max-new-tokens", type=int, default=EVAL_MAX_NEW_TOKENS,
                    help="reply budget per problem (default %(default)s, caprese eval's own default)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--synthetic", type=int, default=192)
    ap.add_argument("--response-tokens", type=int, default=40)
    ap.add_argument("--e2e-epochs", type=int, default=3)
    ap.add_argument("--e2e-lr", type=float, default=1e-4)
    ap.add_argument("--only", default=None, help="comma-separated row names")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = args.model or run([str(BIN / "caprese"), "fetch-default"]).strip()
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    only = set(args.only.split(",")) if args.only else None
    eval_common = ["--task", "arithmetic", "--limit", str(args.limit), "--max-new-tokens", str(args.max_new_tokens),
                   "--batch-size", str(args.batch_size), "--no-dense", "--json", "--quiet"]
    for name, row in ROWS:
        if (only and name not in only) or name in results:
            continue
        t0 = time.perf_counter()
        calib_s = None
        if "calibrate" in row or "init" in row:
            art = out / name
            if not art.exists():
                cmd = [str(BIN / "caprese"), "calibrate", model, "-o", str(art), "--quiet"]
                if "calibrate" in row:
                    cmd += row["calibrate"] + ["--synthetic", str(args.synthetic),
                                               "--response-tokens", str(args.response_tokens)]
                else:
                    cmd += ["--stage", "e2e", "--init", str(out / row["init"]), "--synthetic", str(args.synthetic),
                            "--response-tokens", str(args.response_tokens), "--e2e-epochs", str(args.e2e_epochs),
                            "--e2e-lr", str(args.e2e_lr)]
                run(cmd)
            calib_s = round(time.perf_counter() - t0, 1)
            res = json.loads(run([str(BIN / "caprese"), "eval", str(art)] + eval_common))
        else:
            flags = []
            if row["method"] != "dense":
                flags = ["--method", row["method"], "--density", str(row["density"]), "--layers", row["layers"]]
            res = json.loads(run([str(BIN / "caprese"), "eval", model] + flags + eval_common))
        res.pop("records", None)
        res["calibrate_s"] = calib_s
        results[name] = res
        results_path.write_text(json.dumps(results, indent=2))
        print(f"{name}: accuracy {res['accuracy']:.3f}, mean tokens {res['mean_generated_tokens']:.1f}",
              file=sys.stderr, flush=True)
    print(table(results))
    return 0


def table(results: dict) -> str:
    dense = results.get("dense", {}).get("accuracy")
    lines = ["| configuration | accuracy | correct | mean generated tokens | extra params | share of GRIFFIN's/CATS' loss recovered | calibration s |",
             "|---|---|---|---|---|---|---|"]
    for name, _ in ROWS:
        r = results.get(name)
        if r is None:
            continue
        base = None
        if name.startswith("caprese-"):
            parts = name.split("-")
            base = results.get(f"{parts[1]}-{parts[2]}", {}).get("accuracy")
        share = ""
        if base is not None and dense is not None and dense > base:
            share = f"{(r['accuracy'] - base) / (dense - base) * 100:.0f}%"
        lines.append(f"| {name} | {r['accuracy'] * 100:.1f}% | {r['correct']}/{r['total']} | "
                     f"{r['mean_generated_tokens']:.1f} | {r.get('extra_params_pct', 0):.2f}% | {share} | "
                     f"{r['calibrate_s'] if r.get('calibrate_s') is not None else ''} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
