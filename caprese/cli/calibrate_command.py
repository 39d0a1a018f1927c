"""`caprese calibrate`: distil the Caprese low-rank bypass for GRIFFIN / CATS / magnitude pruning into an artifact.

The command object `calibrate_command` is registered on the `caprese` group by caprese/cli/main.py. It turns its
flags into the CalibrationRecipe and CalibrationOptions the Python API takes (`recipe_from_flags`,
`options_from_flags`: the flag defaults are the dataclasses' defaults), builds the calibration samples and calls
caprese.calibration.calibrate.calibrate().
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from caprese.calibration.recipe import (DEFAULT_DENSITY, DEFAULT_METHOD, DEFAULT_RANK, E2E_LOSSES, E2E_RESPONSES,
                                        LAYERWISE_MODES, PRECISIONS, STAGES, CalibrationOptions, CalibrationRecipe,
                                        E2EConfig, LayerwiseConfig, layers_default_help)
from caprese.cli.options import weight_options, weights_from_flags
from caprese.errors import CapreseError

DEFAULT_SYNTHETIC = 192
_LW, _E2E, _OPTS = LayerwiseConfig(), E2EConfig(), CalibrationOptions()  # the defaults the flags show


@click.command("calibrate", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("model_dir", type=click.Path(path_type=str))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=str),
              help="Artifact folder to create (caprese.json + adapters.safetensors).")
@click.option("--method", default=None, metavar="griffin|cats|magnitude|none",
              help="Efficient FFN method to calibrate for; none (with --weights): the quantized FFN as it is, the "
                   f"bypass recovers what quantization loses.  [default: {DEFAULT_METHOD}, or the --init artifact's]")
@click.option("--density", default=None, type=float,
              help="Fraction of FFN neurons kept (GRIFFIN, magnitude) or activations kept (CATS), in (0, 1].  "
                   f"[default: {DEFAULT_DENSITY}]")
@click.option("--layers", default=None,
              help="Layers to approximate: all, first-half, second-half or a list like 0,2,5-9.  "
                   f"[default: the method's ({layers_default_help()}), or the --init artifact's]")
@click.option("--rank", "rank", default=None, type=int,
              help=f"Bypass rank r (L is D x r, R is r x D), 1 <= r < hidden size.  [default: {DEFAULT_RANK}]")
@weight_options
@click.option("--data", "data", default=None, type=click.Path(path_type=str),
              help="Calibration data: .jsonl (prompt/response, question/answer or text per line) or .txt.")
@click.option("--synthetic", default=None, type=int,
              help=f"Use N built-in problems answered by the dense model itself (cached).  "
                   f"[default when no --data: {DEFAULT_SYNTHETIC}]")
@click.option("--response-tokens", default=64, show_default=True, type=int,
              help="Length cap of each synthetic response (the tokens the loss is taken on).")
@click.option("--stage", default="both", show_default=True, type=click.Choice(list(STAGES)),
              help="layerwise: per-layer regression only; e2e: end-to-end only (needs --init or a kept work "
                   "dir); both: layer-wise, then end-to-end.")
@click.option("--init", "init", default=None, type=click.Path(path_type=str),
              help="With --stage e2e: the layer-wise artifact to start from (method, density, layers, rank "
                   "come from it).")
@click.option("--epochs", default=_LW.epochs, show_default=True, type=int, help="Layer-wise epochs.")
@click.option("--lr", default=_LW.lr, show_default=True, type=float, help="Layer-wise Adam learning rate.")
@click.option("--batch-size", default=_LW.batch_size, show_default=True, type=int,
              help="Layer-wise batch, in response tokens (rows x -> FF(x) - FF^(x)).")
@click.option("--layerwise-mode", default=_LW.mode, show_default=True, type=click.Choice(list(LAYERWISE_MODES)),
              help="parallel: the paper's layer-wise stage (inputs from the original model, target FF(x), "
                   "layers independent, split over torchrun ranks); sequential: layer after layer, inputs from "
                   "the student (layers below approximated with their trained bypass), target the dense "
                   "model's layer output, one process.")
@click.option("--e2e-epochs", default=_E2E.epochs, show_default=True, type=int, help="End-to-end epochs.")
@click.option("--e2e-lr", default=_E2E.lr, show_default=True, type=float,
              help="End-to-end Adam learning rate (paper: 4e-6 .. 2e-4, smaller for larger models).")
@click.option("--e2e-batch-size", default=_E2E.batch_size, show_default=True, type=int,
              help="End-to-end batch, in sequences (gradients accumulated in fp32).")
@click.option("--e2e-loss", default=_E2E.loss, show_default=True, type=click.Choice(list(E2E_LOSSES)),
              help="End-to-end objective on response tokens. mse: the paper's final-hidden-state MSE; kl: "
                   "KL(dense || student) of the next-token distributions (the LM head over both); on int4 RTN + "
                   "bypass it scored 20.4% against mse's 19.7%, within noise (docs/quantization.md).")
@click.option("--e2e-responses", default=_E2E.responses, show_default=True, type=click.Choice(list(E2E_RESPONSES)),
              help="Which replies the end-to-end loss is taken on. dense: the calibration samples as given (with "
                   "--synthetic, the dense model's); student: the student's own greedy replies to the same "
                   "prompts, made once after the layer-wise stage (on-policy distillation; on int4 RTN + bypass "
                   "with --e2e-loss kl: 22.1% against 20.4% at --seed 0, 18.7% against 18.4% at --seed 1, "
                   "docs/quantization.md); on-policy: the student re-answers before every epoch, as it then "
                   "stands (--seed 1: 186 of 1,000 against student's 187, 1.5x the E2E time).")
@click.option("--warmup", default=_LW.warmup, show_default=True, type=float,
              help="Warm-up fraction of the linear schedule (both stages).")
@click.option("--seed", default=_LW.seed, show_default=True, type=int,
              help="Seed for L's init, shuffling and the synthetic problems.")
@click.option("--precision", default=_OPTS.precision, show_default=True, type=click.Choice(list(PRECISIONS)),
              help="Model weights / activations dtype (adapters train in fp32).")
@click.option("--device", default=_OPTS.device, show_default=True, help="torch device: cpu, cuda, cuda:1 ...")
@click.option("--work-dir", default=None, type=click.Path(path_type=str),
              help="Where captured activations and checkpoints go (resume by rerunning).  [default: OUT.work]")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("--keep-work", is_flag=True, help="Keep the work dir after success (default: removed).")
@click.option("--quiet", is_flag=True, help="No progress bars or log lines on stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (artifact path, recipe, metrics).")
def calibrate_command(model_dir, out, data, synthetic, response_tokens, as_json, **flags) -> None:
    """Calibrate the Caprese bypass x·L·R of an efficient FFN method on MODEL_DIR and write an artifact.

    Layer-wise: per approximated layer, fit L, R so that FF^(x) + x·L·R matches the dense FF(x) on the
    response tokens of the calibration data (inputs from the original model; with --layerwise-mode
    sequential, inputs from the calibrated layers below, the dense layer output as target). End-to-end:
    fine-tune all L, R jointly to match the dense model's final hidden states (--e2e-loss kl: its next-token
    distributions), on the samples' responses (--e2e-responses student: on the student's own replies).
    Base weights stay frozen.

    With --weights int4|int8 the student is the block-quantized model (every decoder linear layer, attention
    included: what the int4 / int8 graphs run; FF^ is the quantized FFN, pruned as well unless --method none)
    and the teacher stays the unquantized dense model; the artifact keeps the codes (quantized.safetensors).

    \b
    Examples:
      caprese calibrate MODEL -o out/griffin --method griffin --density 0.5 --rank 64   # first half of the layers
      caprese calibrate MODEL -o out/cats --method cats                                 # all layers
      caprese calibrate MODEL -o out/lw --stage layerwise --data train.jsonl
      caprese calibrate MODEL -o out/e2e --stage e2e --init out/lw --e2e-lr 5e-5
      caprese calibrate MODEL -o out/seq --stage layerwise --layerwise-mode sequential --rank 256
      caprese calibrate MODEL -o out/q4 --weights int4 --method none --rank 64        # int4 + bypass, all layers
      caprese calibrate MODEL -o out/q4kl --weights int4 --method none --layerwise-mode sequential --e2e-loss kl
      caprese calibrate MODEL -o out/q4s --weights int4 --method none --layerwise-mode sequential --e2e-loss kl \\
          --e2e-responses student                                      # E2E on the student's own replies
      caprese calibrate MODEL -o out/q4g --weights int4 --quant gptq --method griffin  # int4 GPTQ + GRIFFIN
      torchrun --nproc_per_node 2 $(which caprese) calibrate MODEL -o out/x   # layers / batches split over ranks

    A killed run resumes from OUT.work when started again with the same arguments. The artifact runs with
    `caprese generate OUT ...`.
    """
    from caprese.calibration.calibrate import default_work_dir, plan_calibration
    from caprese.calibration.distributed import init_distributed

    seed = flags["seed"]
    recipe, options = recipe_from_flags(flags), options_from_flags(flags)
    plan_calibration(model_dir, recipe)  # fail fast, before any data work
    if Path(out).exists() and not options.force:
        raise CapreseError(f"{out} already exists; pass --force to overwrite it or choose another -o")
    if data is not None and synthetic is not None:
        raise CapreseError("give either --data FILE or --synthetic N, not both")
    if synthetic is not None and synthetic < 1:
        raise CapreseError(f"--synthetic must be at least 1; got {synthetic}")
    if response_tokens < 1:
        raise CapreseError(f"--response-tokens must be at least 1; got {response_tokens}")
    if (recipe.layerwise.mode == "sequential" and recipe.stage != "e2e"
            and int(os.environ.get("WORLD_SIZE", "1")) > 1):
        raise CapreseError("--layerwise-mode sequential trains one layer after another in one process; run it "
                           "without torchrun (or use --layerwise-mode parallel)")

    import torch.distributed as dist

    joined_here = not (dist.is_available() and dist.is_initialized())
    me, ws = init_distributed(options.device)
    try:
        art = _run(model_dir, out, recipe, options, data, synthetic, response_tokens, seed, me)
    finally:
        if joined_here and ws > 1 and dist.is_initialized():
            dist.destroy_process_group()
    if me != 0:
        return
    if as_json:
        click.echo(json.dumps({"artifact": str(out), **art.manifest()}))
        return
    if options.progress:
        _summary(art, Path(options.work_dir) if options.work_dir else default_work_dir(out), options.keep_work)
    click.echo(str(out))


def recipe_from_flags(flags: dict) -> CalibrationRecipe:
    """The one place where calibrate's flags become a CalibrationRecipe (the flag defaults are its defaults)."""
    layerwise = LayerwiseConfig(epochs=flags["epochs"], lr=flags["lr"], batch_size=flags["batch_size"],
                                warmup=flags["warmup"], seed=flags["seed"], mode=flags["layerwise_mode"])
    e2e = E2EConfig(epochs=flags["e2e_epochs"], lr=flags["e2e_lr"], batch_size=flags["e2e_batch_size"],
                    warmup=flags["warmup"], seed=flags["seed"], loss=flags["e2e_loss"],
                    responses=flags["e2e_responses"])
    choice = weights_from_flags(flags)
    return CalibrationRecipe(method=flags["method"], density=flags["density"], layers=flags["layers"],
                             rank=flags["rank"], stage=flags["stage"], init=flags["init"], layerwise=layerwise,
                             e2e=e2e, weights=None if choice is None else choice.recipe())


def options_from_flags(flags: dict) -> CalibrationOptions:
    """The one place where calibrate's flags become CalibrationOptions."""
    return CalibrationOptions(precision=flags["precision"], device=flags["device"], work_dir=flags["work_dir"],
                              keep_work=flags["keep_work"], force=flags["force"], progress=not flags["quiet"])


def _run(model_dir, out, recipe, options, data, synthetic, response_tokens, seed, me):
    """Build the samples (one writer fills the synthetic cache under torchrun), then calibrate()."""
    from caprese.calibration.calibrate import calibrate
    from caprese.calibration.distributed import barrier

    decoder = None
    if data is not None:
        from caprese.calibration.data import load_samples
        from caprese.model.tokenizer import load_tokenizer

        samples = load_samples(data, load_tokenizer(model_dir))
    else:
        from caprese.calibration.data import synthetic_samples
        from caprese.model.default_model import cache_root
        from caprese.model.text_model import TextModel

        tm = TextModel.load(model_dir, options.precision, options.device)
        n = synthetic if synthetic is not None else DEFAULT_SYNTHETIC
        cache = cache_root() / "synthetic"
        progress = options.progress
        if me == 0:  # one writer fills the cache; the other ranks then read it
            samples = synthetic_samples(tm, n, cache, response_tokens=response_tokens, seed=seed, progress=progress)
        barrier()
        if me != 0:
            samples = synthetic_samples(tm, n, cache, response_tokens=response_tokens, seed=seed, progress=False)
        decoder = tm.decoder

    return calibrate(model_dir, out, recipe, samples, options, decoder=decoder)


def _summary(art, work: Path, keep_work: bool) -> None:
    err = sys.stderr
    lw = art.metrics.get("layerwise")
    if lw:
        print("caprese: layer-wise residual ‖FF(x) − FF^(x) − xLR‖² / ‖FF(x)‖² on response tokens:", file=err)
        for i, m in lw["layers"].items():
            print(f"  layer {i:>3}: {m['before_rel']:.4f} -> {m['after_rel']:.4f}", file=err)
    e2 = art.metrics.get("e2e")
    if e2:
        if e2.get("responses") == "student":
            print(f"caprese: end-to-end on the student's own replies: {e2['tokens']} response tokens (the samples' "
                  f"own: {e2['given_tokens']})", file=err)
        elif e2.get("responses") == "on-policy":
            print(f"caprese: end-to-end on the student's replies of each epoch: "
                  f"{', '.join(map(str, e2['reply_tokens']))} response tokens (the samples' own: "
                  f"{e2['given_tokens']}; the errors below: before on the first epoch's replies, after on the "
                  f"last's)", file=err)
        print(f"caprese: end-to-end final-hidden MSE: FF^ alone {e2['mse_approx']:.5g}, layer-wise "
              f"{e2['mse_before']:.5g}, end-to-end {e2['mse_after']:.5g}", file=err)
        if "kl_after" in e2:
            print(f"caprese: end-to-end KL (nats/token, the objective): FF^ alone {e2['kl_approx']:.5g}, layer-wise "
                  f"{e2['kl_before']:.5g}, end-to-end {e2['kl_after']:.5g}", file=err)
    if keep_work:
        print(f"caprese: work dir kept at {work}", file=err)
