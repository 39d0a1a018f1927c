"""Caprese calibration, the Python API behind `caprese calibrate`: layer-wise then end-to-end distillation of the
low-rank bypass of an efficient FFN method, saved as a calibration artifact.

    from caprese.calibration.calibrate import calibrate
    from caprese.calibration.recipe import CalibrationOptions, CalibrationRecipe
    art = calibrate("models/llama", "out/griffin-r64", CalibrationRecipe(method="griffin", rank=64), samples,
                    CalibrationOptions(precision="bf16"))  # stage "both": layer-wise, then end-to-end
    art.metrics["layerwise"]["layers"]["0"]["after_rel"]  # per-layer residual after / before training
    art.metrics["e2e"]["mse_after"]                        # final-hidden MSE after end-to-end training

The recipe (recipe.py) says what the artifact is; the options how this run computes it. Stages: "layerwise"
(capture + per-layer training, layerwise.py / sequential.py), "e2e" (joint training, e2e.py, from an earlier
layer-wise result: `init` a layer-wise artifact, or the finished layer files of the same work dir), "both".
The work directory (default OUT + ".work") holds the captured activations, the finished layers and the e2e
checkpoint, so a killed run resumes when started again with the same arguments; it is removed after a successful
save unless keep_work. Under torchrun every process calls calibrate() with the same arguments; rank 0 writes
the artifact.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from caprese.atomic_output import check_writable
from caprese.calibration.artifact import Artifact, load_artifact, save_artifact
from caprese.calibration.data import Sample
from caprese.calibration.distributed import barrier, init_distributed, local_device, world
from caprese.calibration.e2e import run_e2e
from caprese.calibration.fingerprint import digest, fingerprint, samples_digest
from caprese.calibration.layerwise import finished_layers, run_layerwise
from caprese.calibration.recipe import CalibrationOptions, CalibrationPlan, CalibrationRecipe, describe_weights
from caprese.calibration.sequential import run_sequential
from caprese.errors import CapreseError
from caprese.model.loading import check_device
from caprese.model.spec import load_spec


def plan_calibration(model_dir: str | Path, recipe: CalibrationRecipe) -> CalibrationPlan:
    """`recipe` resolved against MODEL_DIR's config (and its init artifact, if any); one-line CapreseErrors.
    Cheap (reads config.json and the init artifact): the CLI calls it to fail before any data work."""
    spec = load_spec(model_dir)
    init = load_artifact(recipe.init, model_dir) if recipe.init is not None else None
    plan = recipe.resolve(spec.num_layers, spec.hidden_size, init)
    if plan.recipe.weights is not None:
        from caprese.calibration.quantized_student import check_model_shapes

        check_model_shapes(spec, plan.recipe.weights)
    return plan


def clean_samples(samples, max_positions: int) -> tuple[list, int]:
    """Drop samples without prompt or response tokens; refuse an empty set or one longer than the context."""
    if not samples:
        raise CapreseError("no calibration samples: give --data FILE with prompt/response pairs or --synthetic N")
    bad = next((s for s in samples if not isinstance(s, Sample)), None)
    if bad is not None:
        raise TypeError(f"calibration samples must be caprese.calibration.data.Sample objects (load_samples, "
                        f"synthetic_samples); got a {type(bad).__name__}")
    kept = [s for s in samples if len(s.prompt_ids) and len(s.response_ids)]
    if not kept:
        raise CapreseError("no usable calibration samples: each needs at least one prompt and one response token")
    longest = max(len(s.prompt_ids) + len(s.response_ids) for s in kept)
    if longest > max_positions:
        raise CapreseError(f"a calibration sample has {longest} tokens, more than the model's context "
                           f"({max_positions}); shorten the data (--response-tokens)")
    return kept, len(samples) - len(kept)


def _layer_summary(per_layer: dict[int, dict]) -> dict:
    per = {str(i): m for i, m in sorted(per_layer.items())}
    return {"layers": per,
            "mean_before_rel": sum(m["before_rel"] for m in per.values()) / len(per),
            "mean_after_rel": sum(m["after_rel"] for m in per.values()) / len(per)}


# what calibrate writes in a work dir (and removes after a successful save): a folder holding anything else is not
# one of its work dirs, and is neither adopted nor deleted
_WORK_ENTRIES = ("capture", "e2e", "sequential", "layer_", "quantized-", ".")


def check_work_dir(work: Path, out: Path) -> None:
    """Refuse a work dir that is, holds or sits in OUT (the save or the cleanup would destroy the other), or an
    existing folder with files calibrate did not write (a successful run deletes its work dir)."""
    w, o = work.resolve(), out.resolve()
    if w == o or w in o.parents or o in w.parents:
        raise CapreseError(f"--work-dir {work} and -o {out} overlap (the work dir is removed after the save, and the "
                           "save replaces -o); choose separate folders")
    if work.is_dir():
        foreign = sorted(p.name for p in work.iterdir() if not p.name.startswith(_WORK_ENTRIES))
        if foreign:
            raise CapreseError(f"--work-dir {work} holds files calibrate did not write ({', '.join(foreign[:3])}); "
                               "it would delete them after the save: choose a new or empty folder")
    elif work.exists():
        raise CapreseError(f"--work-dir {work} is a file; choose a folder")


def _lock_work(work: Path):
    """An exclusive lock on WORK/.lock for this run (released when the file object goes): a second calibrate into
    the same work dir appended to the same capture files and saved a wrong artifact with exit code 0."""
    work.mkdir(parents=True, exist_ok=True)
    f = open(work / ".lock", "a")
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no advisory locks (Windows): one run per work dir is the rule
        return f
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise CapreseError(f"another caprese calibrate is using the work dir {work}; wait for it to finish, or choose "
                           "another -o / --work-dir") from None
    return f


def default_work_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".work")


def calibrate(model_dir: str | Path, out: str | Path, recipe: CalibrationRecipe, samples: list,
              options: CalibrationOptions | None = None, *, callback: Callable[[dict], None] | None = None,
              decoder=None) -> Artifact:
    """Calibrate MODEL_DIR's bypass as `recipe` says and save the artifact at OUT; returns the Artifact.

    `samples`: caprese.calibration.data.Sample list (prompt ids, response ids). `options`: how to run
    (CalibrationOptions(): fp32 on cpu, progress on stderr). `callback` gets progress events (dicts with
    "stage": capture | layerwise | e2e); raising from it aborts (the work dir keeps what is finished).
    `decoder`: an already loaded Decoder of MODEL_DIR to use (it is modified in place).
    """
    t_start = time.monotonic()
    opts = options if options is not None else CalibrationOptions()
    model_dir, out = Path(model_dir), Path(out)
    spec = load_spec(model_dir)
    plan = plan_calibration(model_dir, recipe)
    r = plan.recipe
    samples, skipped = clean_samples(samples, spec.max_position_embeddings)
    if out.exists() and not opts.force:
        raise CapreseError(f"{out} already exists; pass --force to overwrite it or choose another -o")
    check_device(opts.device)
    work = Path(opts.work_dir) if opts.work_dir is not None else default_work_dir(out)
    check_writable(out)  # the artifact is written at the end: find out now, not after the training
    check_writable(work, "--work-dir")
    check_work_dir(work, out)

    import torch.distributed as dist

    joined_here = not (dist.is_available() and dist.is_initialized())
    me, ws = init_distributed(opts.device)
    joined_here = joined_here and ws > 1
    device = local_device(opts.device)
    lock = _lock_work(work) if me == 0 else None  # noqa: F841 (held until calibrate returns)
    fp = fingerprint(model_dir)
    key_fields = {"fingerprint": fp, "method": r.method, "density": r.density, "layers": list(plan.layers),
                  "samples": samples_digest(samples), "precision": opts.precision, "device": torch.device(device).type}
    if r.weights is not None:  # absent otherwise, so the work dirs of unquantized runs keep their keys
        key_fields["weights"] = r.weights.to_dict()
    base_key = digest(key_fields)
    lw_key = digest({"base": base_key, "store": r.layerwise.store})
    got = None
    if r.stage == "e2e" and plan.init is None:  # the layer-wise result of an earlier run in this work dir
        got = finished_layers(work, list(plan.layers), lw_key, r.rank, r.layerwise)
        if got is None:
            raise CapreseError("stage e2e starts from layer-wise adapters: pass --init ARTIFACT (from a "
                               f"`--stage layerwise` run), keep the layer-wise work dir ({work}), or use --stage both")
    log = (lambda msg: print(msg, file=sys.stderr)) if opts.progress and me == 0 else (lambda msg: None)
    n_prompt = sum(len(s.prompt_ids) for s in samples)
    n_resp = sum(len(s.response_ids) for s in samples)
    layers_note = " (the method's default)" if plan.layers_default else ""
    log(f"caprese: calibrating {r.method} (density {r.density}, layers {r.layers_spec}{layers_note} = "
        f"{len(plan.layers)} of {spec.num_layers}, rank {r.rank})"
        + (f" over {describe_weights(r.weights)} weights" if r.weights is not None else "")
        + f" on {len(samples)} samples "
        f"({n_prompt} prompt + {n_resp} response tokens), stage {r.stage}"
        + (f", {ws} processes" if ws > 1 else "") + f"; work dir {work}")

    if decoder is None:
        from caprese.model.loading import load_decoder

        decoder = load_decoder(model_dir, opts.precision, device, spec=spec)
    metrics: dict = {}
    timing: dict = {}
    student = None
    if r.weights is not None:
        t_q = time.monotonic()
        qweights = plan.init.quantized_weights() if plan.init is not None else None
        student = _student_weights(decoder, r.weights, samples, work, base_key, qweights, opts.progress and me == 0)
        timing["quantize_s"] = round(time.monotonic() - t_q, 3)
    if r.stage in ("layerwise", "both"):
        runner = run_sequential if r.layerwise.mode == "sequential" else run_layerwise
        lw = runner(decoder, samples, plan, work, lw_key, opts, callback, student=student)
        adapters = lw.adapters
        metrics["layerwise"] = _layer_summary(lw.metrics)
        timing["layerwise"] = lw.timing
    elif plan.init is not None:
        adapters = dict(plan.init.adapters)
        if "layerwise" in plan.init.metrics:
            metrics["layerwise"] = plan.init.metrics["layerwise"]
    else:
        adapters = {i: (L, R) for i, (L, R, _) in got.items()}
        metrics["layerwise"] = _layer_summary({i: m for i, (_, _, m) in got.items()})
    if r.stage in ("e2e", "both"):
        e2 = run_e2e(decoder, samples, plan, adapters, work, base_key, opts, callback, student=student)
        adapters = e2.adapters
        metrics["e2e"] = e2.metrics
        timing["e2e"] = e2.timing
    timing["total_s"] = round(time.monotonic() - t_start, 3)
    metrics["timing"] = timing
    bad = sorted(i for i, (L, R) in adapters.items() if not (torch.isfinite(L).all() and torch.isfinite(R).all()))
    if bad:  # not saved: an artifact of NaNs loads and generates garbage with exit code 0
        raise CapreseError(f"the trained bypass of layer(s) {', '.join(map(str, bad[:5]))} holds non-finite values "
                           f"(a damaged file in the work dir {work}, or a diverged run): delete it and rerun, or "
                           "lower --lr / --e2e-lr")

    art = Artifact(None, str(model_dir.resolve()), fp, r.method, r.density, list(plan.layers), r.rank,
                   _artifact_recipe(plan, opts, samples, skipped, torch.device(device).type, ws), metrics, adapters,
                   qweights=None if student is None else student.qweights)
    if me == 0:
        save_artifact(art, out, opts.force)
        log(f"caprese: wrote {out}")
        if not opts.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    barrier()
    art.path = out
    if joined_here:
        dist.destroy_process_group()
    return art


def _student_weights(decoder, weights, samples, work: Path, key: str, qweights, progress: bool):
    """The quantized student over `decoder` (caprese/calibration/quantized_student.py). The codes come from the
    init artifact (`qweights`), from this work dir (a resumed run), or are computed here (RTN, or GPTQ on the
    calibration samples) and kept in WORK/quantized-KEY.safetensors, so a resumed run trains over the same codes."""
    from caprese.atomic_output import atomic_file
    from caprese.calibration.quantized_file import read_quantized, write_quantized
    from caprese.calibration.quantized_student import prepare_student

    cached = Path(work) / f"quantized-{key[:16]}.safetensors"
    if qweights is None and cached.is_file():
        try:
            qweights = read_quantized(cached, weights)
        except CapreseError:
            qweights = None  # a torn file: quantize again
    fresh = qweights is None
    if fresh and progress:
        print(f"caprese: quantizing the student's weights to {describe_weights(weights)}", file=sys.stderr)
    student = prepare_student(decoder, weights, samples, progress, qweights)
    if fresh and world()[0] == 0:
        Path(work).mkdir(parents=True, exist_ok=True)
        with atomic_file(cached) as tmp:
            write_quantized(tmp, student.qweights, weights)
    return student


def _artifact_recipe(plan: CalibrationPlan, opts: CalibrationOptions, samples, skipped: int, device_type: str,
                     world_size: int) -> dict:
    """caprese.json's "recipe": the resolved recipe, and how this run made the artifact."""
    r = plan.recipe
    d = r.to_dict()
    d["layers_default"] = plan.layers_default
    if r.stage == "e2e" and plan.init is not None:  # the layer-wise stage ran in the init artifact's run
        d["layerwise"] = plan.init.recipe.get("layerwise")
    if r.stage == "layerwise":
        d["e2e"] = None
    d.update({"precision": opts.precision, "device": device_type, "world_size": world_size,
              "samples": len(samples), "samples_skipped": skipped,
              "prompt_tokens": sum(len(s.prompt_ids) for s in samples),
              "response_tokens": sum(len(s.response_ids) for s in samples),
              "samples_digest": samples_digest(samples)})
    if plan.init is not None:  # what the init artifact's layer-wise stage was trained on
        d["init_samples"] = plan.init.recipe.get("samples")
        d["init_samples_digest"] = plan.init.recipe.get("samples_digest")
    return d


__all__ = ["calibrate", "plan_calibration", "default_work_dir", "CalibrationRecipe", "CalibrationOptions"]
