"""`caprese eval`: accuracy of a model (plain folder, + a method, or a calibration artifact) next to dense."""

from __future__ import annotations

import json
from pathlib import Path

import click

from caprese.calibration.problems import EVAL_MAX_NEW_TOKENS
from caprese.cli.options import BACKEND_CHOICES, INT8_DOWN_OPTION, method_options, weight_options, weights_from_flags
from caprese.errors import CapreseError


def _row(name: str, r) -> list[str]:
    return [name, f"{100 * r.accuracy:.1f}", f"{r.correct}/{r.total}", f"{r.mean_generated_tokens:.1f}",
            f"{r.extra_params_pct:.3f}", f"{r.wall_s:.2f}"]


def format_table(rows: list[list[str]]) -> str:
    header = ["model", "accuracy %", "correct", "mean gen tokens", "extra params %", "wall s"]
    table = [header, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = []
    for n, r in enumerate(table):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


@click.command("eval", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("src", type=click.Path(path_type=str))
@click.option("--task", "task_spec", default="arithmetic", show_default=True, metavar="arithmetic|jsonl:FILE",
              help="arithmetic: the built-in test problems (never used in calibration). jsonl:FILE: one JSON object "
                   "per line, GSM8K {\"question\", \"answer\": \"... #### 42\"} or {\"prompt\", \"answer\"}.")
@click.option("--limit", default=200, show_default=True, type=click.IntRange(min=1),
              help="Evaluate the first N problems.")
@method_options
@weight_options
@click.option("--base-model", default=None, type=click.Path(path_type=str), metavar="DIR",
              help="For an artifact: the base model folder, if it moved since calibration.")
@click.option("--reselect-every", default=0, show_default=True, type=click.IntRange(min=0), metavar="N",
              help="GRIFFIN reselection: every N decode steps re-run the new tokens densely and re-pick neurons "
                   "(0 = off).")
@click.option("-n", "--max-new-tokens", default=EVAL_MAX_NEW_TOKENS, show_default=True, type=click.IntRange(min=1),
              help="Longest reply per problem (EOS stops earlier).")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1),
              help="Prompts generated together (left-padded; does not change greedy answers).")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16", "bf16"]),
              help="Weights and activations dtype.")
@click.option("--device", default="cpu", show_default=True, help="torch device: cpu, cuda, cuda:1 ...")
@click.option("--threads", default=None, type=click.IntRange(min=1),
              help="CPU intra-op threads. Default: one per CPU not busy with other work, re-read every second.")
@click.option("--backend", default=None, type=click.Choice(BACKEND_CHOICES),
              help="For an ENGINE_DIR: the runtime that scores it (default auto: native on a CPU where it runs the "
                   "engine, else onnxruntime; see `caprese run --help`). Not for model folders.")
@INT8_DOWN_OPTION
@click.option("--no-chat", is_flag=True, help="Send prompts as plain text instead of a chat-template user turn.")
@click.option("--no-dense", is_flag=True, help="Skip the dense reference run.")
@click.option("--save", default=None, type=click.Path(path_type=str, dir_okay=False), metavar="FILE",
              help="Also write every problem (prompt, gold, prediction, reply, tokens) as JSON lines to FILE.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@click.option("--quiet", is_flag=True, help="No progress bar on stderr.")
def eval_command(src, task_spec, limit, method, density, layers, weights, block_size, quant, quantize_head,
                 quantize_embed, scale_dtype, base_model, reselect_every, max_new_tokens, batch_size, precision, device,
                 threads, backend, int8_down, no_chat, no_dense, save, as_json, quiet) -> None:
    """Greedy accuracy of SRC on a math task, next to the dense model on the same problems.

    \b
    SRC is a Hugging Face model folder, a calibration artifact (`caprese calibrate` output) or an
    exported engine folder (`caprese-export` output), which is scored on its runtime, as it ships:
      caprese eval runs/griffin-r64                         # Caprese vs its dense base model
      caprese eval MODEL_DIR --method griffin --density 0.5 # plain GRIFFIN baseline vs dense
      caprese eval MODEL_DIR --task jsonl:gsm8k_test.jsonl --limit 100
      caprese eval ENGINE_DIR --backend native              # the engine alone, one prompt at a time
      caprese eval MODEL_DIR --weights int4                 # int4 RTN baseline (no bypass) vs dense

    The dense reference is the artifact's base model, or SRC itself without --method. A plain folder with
    no --method is dense already and runs once. The final answer of a reply is its `#### X`, else its last
    \\boxed{X}, else its last number; answers compare numerically.

    stdout: a table (model, accuracy %, correct/total, mean generated tokens, extra parameters of the
    low-rank bypasses in % of the base model, wall seconds); progress goes to stderr. With --json: one
    object with label, task, accuracy (0..1), correct, total, mean_generated_tokens, extra_params_pct,
    wall_s, and `dense` (the same fields for the dense run, or null with --no-dense).
    """
    from caprese.calibration.artifact import is_artifact
    from caprese.calibration.source import open_source
    from caprese.evaluation.evaluate import evaluate
    from caprese.evaluation.tasks import load_task

    if not Path(src).exists():
        raise CapreseError(f"{src} does not exist; give a Hugging Face model folder or a calibration artifact")
    if save:
        from caprese.atomic_output import check_writable

        check_writable(save, "--save")  # before the evaluation, not after it
    if base_model is not None and not is_artifact(src):
        raise CapreseError("--base-model applies to a calibration artifact only; "
                           f"{src} is a plain model folder (no caprese.json)")
    from caprese.export.manifest import MANIFEST

    if (Path(src) / MANIFEST).is_file():
        return _eval_engine(src, task_spec, limit, (method, density, layers, base_model, weights, block_size, quant),
                            reselect_every, max_new_tokens, threads, backend, int8_down, no_chat, save, as_json,
                            quiet)
    if int8_down:
        raise CapreseError(f"--int8-down applies to an exported engine folder on --backend native; {src} is a model "
                           "folder or artifact")
    if backend is not None:
        raise CapreseError(f"--backend applies to an exported engine folder; {src} is a model folder or artifact "
                           "(scored with the PyTorch decoder: use --device / --precision)")
    choice = weights_from_flags(dict(weights=weights, block_size=block_size, quant=quant, quantize_head=quantize_head,
                                     quantize_embed=quantize_embed, scale_dtype=scale_dtype))
    task = load_task(task_spec, limit)
    kwargs = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, chat=not no_chat, progress=not quiet,
                  threads=threads)
    artifact = is_artifact(src)
    tm = open_source(src, None if method == "dense" and not artifact else method, density, layers, precision,
                     device, base_model, choice, progress=not quiet)
    src_is_dense = not artifact and tm.label == "dense"
    result = evaluate(tm, task, reselect_every=0 if src_is_dense else reselect_every, **kwargs)
    base_dir = tm.model_dir
    del tm
    dense = None
    if src_is_dense:
        dense = result
    elif not no_dense:
        dense_tm = open_source(base_dir, None, precision=precision, device=device)
        dense = evaluate(dense_tm, task, **kwargs)
        del dense_tm

    if save:
        _save_records(save, [result] if dense is None or dense is result else [dense, result])
    if as_json:
        out = {**result.to_dict(), "src": str(src), "max_new_tokens": max_new_tokens, "precision": precision,
               "weights": None if choice is None else choice.recipe().to_dict(),
               "reselect_every": reselect_every, "dense": None if dense is None else dense.to_dict()}
        click.echo(json.dumps(out))
        return
    rows = [] if dense is None or dense is result else [_row("dense", dense)]
    rows.append(_row(result.label, result))
    click.echo(f"task {task.name}: {len(task)} problems, greedy, max {max_new_tokens} new tokens, {precision}")
    click.echo(format_table(rows))


def _save_records(save: str, runs) -> None:
    from caprese.atomic_output import atomic_file

    with atomic_file(save) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for run in runs:
            for i, rec in enumerate(run.records):
                fh.write(json.dumps({"model": run.label, "index": i, **rec.to_dict()}) + "\n")


def _eval_engine(src, task_spec, limit, fixed_at_export, reselect_every, max_new_tokens, threads, backend,
                 int8_down, no_chat, save, as_json, quiet) -> None:
    """An engine folder: its own score on its runtime (no dense run: score the base model or a dense engine)."""
    from caprese.evaluation.engine_eval import evaluate_engine
    from caprese.evaluation.tasks import load_task
    from caprese.runtime import EngineOptions, Generator

    if any(v is not None for v in fixed_at_export):
        raise CapreseError(f"{src} is an exported engine: its method, base model and weights are fixed at "
                           "export; drop --method / --density / --layers / --base-model / --weights")
    task = load_task(task_spec, limit)
    g = Generator.open(src, EngineOptions(backend=backend or ("native" if int8_down else "auto"), threads=threads,
                                          int8_down=int8_down))
    backend = g.backend.name
    result = evaluate_engine(g, task, max_new_tokens, chat=not no_chat, progress=not quiet,
                             reselect_every=reselect_every)
    if save:
        _save_records(save, [result])
    if as_json:
        click.echo(json.dumps({**result.to_dict(), "src": str(src), "backend": backend,
                               "backend_requested": g.backend_requested, "backend_reason": g.backend_reason,
                               "max_new_tokens": max_new_tokens, "precision": g.manifest.spec.precision,
                               "reselect_every": reselect_every, "dense": None}))
        return
    click.echo(f"task {task.name}: {len(task)} problems, greedy, max {max_new_tokens} new tokens, engine "
               f"{g.manifest.spec.precision} on {backend}")
    click.echo(format_table([_row(result.label, result)]))
