"""`caprese calibrate`: distil the Caprese low-rank bypass for GRIFFIN / CATS / magnitude pruning into an artifact.

The command object `calibrate_command` is registered on the `caprese` group by caprese/cli/main.py. It parses
options, builds the calibration samples and calls caprese.calibration.calibrate.calibrate().
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from caprese.errors import CapreseError

DEFAULT_SYNTHETIC = 192


@click.command("calibrate", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("model_dir", type=click.Path(path_type=str))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=str),
              help="Artifact folder to create (caprese.json + adapters.safetensors).")
@click.option("--method", default=None, metavar="griffin|cats|magnitude",
              help="Efficient FFN method to calibrate for.  [default: griffin, or the --init artifact's]")
@click.option("--density", default=None, type=float,
              help="Fraction of FFN neurons kept (GRIFFIN, magnitude) or activations kept (CATS), in (0, 1].  "
                   "[default: 0.5]")
@click.option("--layers", default=None,
              help="Layers to approximate: all, first-half, second-half or a list like 0,2,5-9.  "
                   "[default: first-half]")
@click.option("--rank", "rank", default=None, type=int,
              help="Bypass rank r (L is D x r, R is r x D), 1 <= r < hidden size.  [default: 64]")
@click.option("--data", "data", default=None, type=click.Path(path_type=str),
              help="Calibration data: .jsonl (prompt/response, question/answer or text per line) or .txt.")
@click.option("--synthetic", default=None, type=int,
              help=f"Use N built-in problems answered by the dense model itself (cached).  "
                   f"[default when no --data: {DEFAULT_SYNTHETIC}]")
@click.option("--response-tokens", default=64, show_default=True, type=int,
              help="Length cap of each synthetic response (the tokens the loss is taken on).")
@click.option("--stage", default="both", show_default=True, type=click.Choice(["layerwise", "e2e", "both"]),
              help="layerwise: per-layer regression only; e2e: end-to-end only (needs --init or a kept work "
                   "dir); both: layer-wise, then end-to-end.")
@click.option("--init", "init", default=None, type=click.Path(path_type=str),
              help="With --stage e2e: the layer-wise artifact to start from (method, density, layers, rank "
                   "come from it).")
@click.option("--epochs", default=20, show_default=True, type=int, help="Layer-wise epochs.")
@click.option("--lr", default=1e-3, show_default=True, type=float, help="Layer-wise Adam learning rate.")
@click.option("--batch-size", default=128, show_default=True, type=int,
              help="Layer-wise batch, in response tokens (rows x -> FF(x) - FF^(x)).")
@click.option("--layerwise-mode", default="parallel", show_default=True,
              type=click.Choice(["parallel", "sequential"]),
              help="parallel: the paper's layer-wise stage (inputs from the original model, target FF(x), "
                   "layers independent, split over torchrun ranks); sequential: layer after layer, inputs from "
                   "the student (layers below approximated with their trained bypass), target the dense "
                   "model's layer output, one process.")
@click.option("--e2e-epochs", default=3, show_default=True, type=int, help="End-to-end epochs.")
@click.option("--e2e-lr", default=1e-4, show_default=True, type=float,
              help="End-to-end Adam learning rate (paper: 4e-6 .. 2e-4, smaller for larger models).")
@click.option("--e2e-batch-size", default=16, show_default=True, type=int,
              help="End-to-end batch, in sequences (gradients accumulated).")
@click.option("--warmup", default=0.02, show_default=True, type=float,
              help="Warm-up fraction of the linear schedule (both stages).")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Seed for L's init, shuffling and the synthetic problems.")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16", "bf16"]),
              help="Model weights / activations dtype (adapters train in fp32).")
@click.option("--device", default="cpu", show_default=True, help="torch device: cpu, cuda, cuda:1 ...")
@click.option("--work-dir", default=None, type=click.Path(path_type=str),
              help="Where captured activations and checkpoints go (resume by rerunning).  [default: OUT.work]")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("--keep-work", is_flag=True, help="Keep the work dir after success (default: removed).")
@click.option("--quiet", is_flag=True, help="No progress bars or log lines on stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (artifact path, recipe, metrics).")
def calibrate_command(model_dir, out, method, density, layers, rank, data, synthetic, response_tokens, stage, init,
                      epochs, lr, batch_size, layerwise_mode, e2e_epochs, e2e_lr, e2e_batch_size, warmup, seed, precision, device,
                      work_dir, force, keep_work, quiet, as_json) -> None:
    """Calibrate the Caprese bypass x·L·R of an efficient FFN method on MODEL_DIR and write an artifact.

    Layer-wise: per approximated layer, fit L, R so that FF^(x) + x·L·R matches the dense FF(x) on the
    response tokens of the calibration data (inputs from the original model; with --layerwise-mode
    sequential, inputs from the calibrated layers below, the dense layer output as target). End-to-end:
    fine-tune all L, R jointly to match the dense model's final hidden states. Base weights stay frozen.

    \b
    Examples:
      caprese calibrate MODEL -o out/griffin --method griffin --density 0.5 --rank 64
      caprese calibrate MODEL -o out/lw --stage layerwise --data train.jsonl
      caprese calibrate MODEL -o out/e2e --stage e2e --init out/lw --e2e-lr 5e-5
      caprese calibrate MODEL -o out/seq --stage layerwise --layerwise-mode sequential --rank 256
      torchrun --nproc_per_node 2 $(which caprese) calibrate MODEL -o out/x   # layers / batches split over ranks

    A killed run resumes from OUT.work when started again with the same arguments. The artifact runs with
    `caprese generate OUT ...`.
    """
    from caprese.calibration.calibrate import default_work_dir, resolve_setup
    from caprese.calibration.e2e import E2EConfig
    from caprese.calibration.layerwise import LayerwiseConfig, init_distributed
    from caprese.model.spec import load_spec

    progress = not quiet
    spec = load_spec(model_dir)
    resolve_setup(spec, method, density, layers, rank, stage, init, model_dir)  # fail fast, before any data work
    if Path(out).exists() and not force:
        raise CapreseError(f"{out} already exists; pass --force to overwrite it or choose another -o")
    if data is not None and synthetic is not None:
        raise CapreseError("give either --data FILE or --synthetic N, not both")
    if synthetic is not None and synthetic < 1:
        raise CapreseError(f"--synthetic must be at least 1; got {synthetic}")
    if response_tokens < 1:
        raise CapreseError(f"--response-tokens must be at least 1; got {response_tokens}")
    if layerwise_mode == "sequential" and stage != "e2e" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CapreseError("--layerwise-mode sequential trains one layer after another in one process; run it "
                           "without torchrun (or use --layerwise-mode parallel)")
    lw_cfg = LayerwiseConfig(epochs=epochs, lr=lr, batch_size=batch_size, warmup=warmup, seed=seed,
                             mode=layerwise_mode)
    e2_cfg = E2EConfig(epochs=e2e_epochs, lr=e2e_lr, batch_size=e2e_batch_size, warmup=warmup, seed=seed)
    lw_cfg.validate()
    e2_cfg.validate()

    import torch.distributed as dist

    joined_here = not (dist.is_available() and dist.is_initialized())
    me, ws = init_distributed(device)
    try:
        art = _run(model_dir, out, method, density, layers, rank, data, synthetic, response_tokens, stage, init,
                   lw_cfg, e2_cfg, seed, precision, device, work_dir, force, keep_work, progress, me)
    finally:
        if joined_here and ws > 1 and dist.is_initialized():
            dist.destroy_process_group()
    if me != 0:
        return
    if as_json:
        click.echo(json.dumps({"artifact": str(out), **art.manifest()}))
        return
    if progress:
        _summary(art, Path(work_dir) if work_dir else default_work_dir(out), keep_work)
    click.echo(str(out))


def _run(model_dir, out, method, density, layers, rank, data, synthetic, response_tokens, stage, init, lw_cfg, e2_cfg,
         seed, precision, device, work_dir, force, keep_work, progress, me):
    from caprese.calibration.calibrate import calibrate
    from caprese.calibration.layerwise import barrier

    decoder = None
    if data is not None:
        from caprese.calibration.data import load_samples
        from caprese.model.tokenizer import load_tokenizer

        samples = load_samples(data, load_tokenizer(model_dir))
    else:
        from caprese.calibration.data import synthetic_samples
        from caprese.model.default_model import cache_root
        from caprese.model.text_model import TextModel

        tm = TextModel.load(model_dir, precision, device)
        n = synthetic if synthetic is not None else DEFAULT_SYNTHETIC
        cache = cache_root() / "synthetic"
        if me == 0:  # one writer fills the cache; the other ranks then read it
            samples = synthetic_samples(tm, n, cache, response_tokens=response_tokens, seed=seed, progress=progress)
        barrier()
        if me != 0:
            samples = synthetic_samples(tm, n, cache, response_tokens=response_tokens, seed=seed, progress=False)
        decoder = tm.decoder

    return calibrate(model_dir, out, method, density, layers, rank, samples, stage=stage, work_dir=work_dir,
                     layerwise_cfg=lw_cfg, e2e_cfg=e2_cfg, precision=precision, device=device, force=force,
                     progress=progress, init=init, keep_work=keep_work, decoder=decoder)


def _summary(art, work: Path, keep_work: bool) -> None:
    err = sys.stderr
    lw = art.metrics.get("layerwise")
    if lw:
        print("caprese: layer-wise residual ‖FF(x) − FF^(x) − xLR‖² / ‖FF(x)‖² on response tokens:", file=err)
        for i, m in lw["layers"].items():
            print(f"  layer {i:>3}: {m['before_rel']:.4f} -> {m['after_rel']:.4f}", file=err)
    e2 = art.metrics.get("e2e")
    if e2:
        print(f"caprese: end-to-end final-hidden MSE: FF^ alone {e2['mse_approx']:.5g}, layer-wise "
              f"{e2['mse_before']:.5g}, end-to-end {e2['mse_after']:.5g}", file=err)
    if keep_work:
        print(f"caprese: work dir kept at {work}", file=err)
