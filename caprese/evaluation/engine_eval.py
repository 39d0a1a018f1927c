"""Score an exported engine folder on its runtime: the number a user can trust for what actually ships.

    from caprese.runtime import Generator
    from caprese.evaluation import evaluate_engine, load_task
    res = evaluate_engine(Generator.load("engines/caprese-int4", backend="native"), load_task("arithmetic", 200))

The PyTorch model an engine came from is a different program (other kernels, other rounding, for a quantized
engine other weights until they are dequantized the same way), so its score is a claim about the engine, not a
measurement of it. Replies are greedy, one prompt at a time (the runtime decodes batch 1), each from a fresh
cache; with the same prompts and budget the records have the fields of `evaluate` and compare line by line.
"""

from __future__ import annotations

import sys
import time

from caprese.calibration.problems import EVAL_MAX_NEW_TOKENS
from caprese.errors import CapreseError
from caprese.evaluation.evaluate import EvalResult, result_of, score_reply
from caprese.evaluation.tasks import Task


def engine_extra_parameter_share(spec) -> float:
    """The bypasses' L and R (2·D·r per approximated layer) in % of the base model's parameters, from the engine
    spec (tied head counted once; RoPE tables are not parameters)."""
    m, r = spec.recipe, spec.recipe.rank
    extra = 2 * spec.model.hidden_size * r * len(m.layers) if r else 0
    seen, total = set(), 0
    for path, w in spec.refs():
        if path in ("rope_cos", "rope_sin") or path.endswith(".scale") or w.name in seen:
            continue
        seen.add(w.name)
        total += w.numel
    base = total - extra
    return 100.0 * extra / base if base > 0 else 0.0


def evaluate_engine(generator, task: Task, max_new_tokens: int = EVAL_MAX_NEW_TOKENS, chat: bool = True,
                    progress: bool = True, reselect_every: int = 0, label: str | None = None) -> EvalResult:
    """Greedy replies of `generator` (a caprese.runtime.Generator) to every prompt of `task`, scored."""
    from caprese.runtime.generator import method_label

    if max_new_tokens < 1:
        raise CapreseError(f"max_new_tokens must be at least 1; got {max_new_tokens}")
    if not task.items:
        raise CapreseError(f"task {task.name} has no items")
    label = label or f"{method_label(generator.manifest)} [{generator.backend.name}]"
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(task.items), desc=f"eval {label}", unit="problem", file=sys.stderr, leave=False,
                   bar_format="{desc}: {n_fmt}/{total_fmt} problems |{bar}| [{elapsed}<{remaining}, {rate_fmt}]")
    records = []
    try:
        for prompt, gold in task.items:
            r = generator.generate(prompt, max_new_tokens=max_new_tokens, chat=chat, reselect_every=reselect_every)
            records.append(score_reply(prompt, gold, r.text, r.tokens, r.stop_reason))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return result_of(label, task, records, engine_extra_parameter_share(generator.manifest.spec),
                     time.perf_counter() - t0)
