"""Caprese calibration, the Python API behind `caprese calibrate`: layer-wise then end-to-end distillation of the
low-rank bypass of an efficient FFN method, saved as a calibration artifact.

    from caprese.calibration.calibrate import calibrate
    art = calibrate("models/llama", "out/griffin-r64", method="griffin", density=0.5, layers="first-half", rank=64,
                    samples=samples)                      # stage="both": layer-wise, then end-to-end
    art.metrics["layerwise"]["layers"]["0"]["after_rel"]  # per-layer residual after / before training
    art.metrics["e2e"]["mse_after"]                        # final-hidden MSE after end-to-end training

Stages: "layerwise" (capture + per-layer training, see layerwise.py), "e2e" (joint training from an earlier
layer-wise result: `init=` a layer-wise artifact, or the finished layer files of the same work dir), "both".
The work directory (default OUT + ".work") holds the captured activations, the finished layers and the e2e
checkpoint, so a killed run resumes when started again with the same arguments; it is removed after a successful
save unless keep_work=True. Under torchrun every process calls calibrate() with the same arguments; rank 0 writes
the artifact.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from caprese.calibration.artifact import Artifact, fingerprint, load_artifact, save_artifact
from caprese.calibration.e2e import E2EConfig, run_e2e
from caprese.calibration.layerwise import (LayerwiseConfig, barrier, digest, finished_layers, init_distributed,
                                           local_device, run_layerwise, samples_digest)
from caprese.calibration.methods import METHODS, parse_layers
from caprese.calibration.sequential import run_sequential
from caprese.errors import CapreseError
from caprese.model.spec import ModelSpec, load_spec

STAGES = ("layerwise", "e2e", "both")
DEFAULTS = {"method": "griffin", "density": 0.5, "layers": "first-half", "rank": 64}


@dataclasses.dataclass(frozen=True)
class Setup:
    method: str
    density: float
    layers: list[int]
    rank: int
    layers_arg: str
    init: Artifact | None


def resolve_setup(spec: ModelSpec, method=None, density=None, layers=None, rank=None, stage: str = "both",
                  init: str | Path | None = None, model_dir: str | Path | None = None) -> Setup:
    """Check the method arguments (one-line CapreseErrors); with `init` they default to the init artifact's."""
    if stage not in STAGES:
        raise CapreseError(f"unknown stage {stage!r}; choose from {', '.join(STAGES)}")
    art = None
    if init is not None:
        if stage != "e2e":
            raise CapreseError("--init (a layer-wise artifact to start from) only goes with --stage e2e")
        art = load_artifact(init, model_dir)
        if not art.rank or not art.adapters:
            raise CapreseError(f"{init} has no bypass adapters (rank 0); calibrate it with --stage layerwise first")
        for name, given, have in (("method", method, art.method), ("density", density, art.density),
                                  ("rank", rank, art.rank)):
            if given is not None and given != have:
                raise CapreseError(f"--{name} {given} differs from the init artifact's {have}; drop --{name}")
        method, density, rank = art.method, art.density, art.rank
        if layers is not None and parse_layers_or_fail(layers, spec.num_layers) != list(art.layers):
            raise CapreseError(f"--layers {layers} differs from the init artifact's layers {art.layers}; drop --layers")
        layers = art.layers
    method = DEFAULTS["method"] if method is None else method
    density = DEFAULTS["density"] if density is None else density
    layers = DEFAULTS["layers"] if layers is None else layers
    rank = DEFAULTS["rank"] if rank is None else rank
    if method not in METHODS:
        raise CapreseError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise CapreseError(f"density must be in (0, 1]; got {density}")
    d = spec.hidden_size
    if not isinstance(rank, int) or rank < 1 or rank >= d:
        raise CapreseError(f"rank must be at least 1 and below the hidden size ({d}); got {rank}")
    layer_list = parse_layers_or_fail(layers, spec.num_layers)
    layers_arg = layers if isinstance(layers, str) else ",".join(map(str, layers))
    if art is not None and isinstance(art.recipe.get("layers"), str):
        layers_arg = art.recipe["layers"]
    if init is not None and any(i not in art.adapters for i in layer_list):
        raise CapreseError(f"{init} lacks adapters for some of its layers; recalibrate it")
    return Setup(method, float(density), layer_list, rank, layers_arg, art)


def parse_layers_or_fail(layers, num_layers: int) -> list[int]:
    try:
        return parse_layers(layers, num_layers)
    except ValueError as e:
        raise CapreseError(str(e)) from None


def clean_samples(samples, max_positions: int) -> tuple[list, int]:
    """Drop samples without prompt or response tokens; refuse an empty set or one longer than the context."""
    if not samples:
        raise CapreseError("no calibration samples: give --data FILE with prompt/response pairs or --synthetic N")
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


def default_work_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".work")


def calibrate(model_dir: str | Path, out: str | Path, method: str | None = None, density: float | None = None,
              layers: str | list[int] | None = None, rank: int | None = None, samples: list | None = None,
              stage: str = "both", work_dir: str | Path | None = None,
              layerwise_cfg: LayerwiseConfig | None = None, e2e_cfg: E2EConfig | None = None,
              precision: str = "fp32", device: str = "cpu", force: bool = False, progress: bool = True, *,
              init: str | Path | None = None, keep_work: bool = False,
              callback: Callable[[dict], None] | None = None, decoder=None) -> Artifact:
    """Calibrate MODEL_DIR's bypass for `method` and save the artifact at OUT; returns the Artifact.

    method / density / layers / rank default to griffin / 0.5 / "first-half" / 64 (with `init`: the init
    artifact's). `samples`: caprese.calibration.data.Sample list (prompt ids, response ids). `callback` gets
    progress events (dicts with "stage": capture | layerwise | e2e); raising from it aborts (the work dir keeps
    what is finished). `decoder`: an already loaded Decoder of MODEL_DIR to use (it is modified in place).
    """
    t_start = time.monotonic()
    model_dir = Path(model_dir)
    out = Path(out)
    spec = load_spec(model_dir)
    setup = resolve_setup(spec, method, density, layers, rank, stage, init, model_dir)
    lw_cfg = layerwise_cfg or LayerwiseConfig()
    e2_cfg = e2e_cfg or E2EConfig()
    lw_cfg.validate()
    e2_cfg.validate()
    samples, skipped = clean_samples(samples, spec.max_position_embeddings)
    if out.exists() and not force:
        raise CapreseError(f"{out} already exists; pass --force to overwrite it or choose another -o")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise CapreseError(f"device {device!r} was asked for but torch sees no CUDA GPU; use cpu")
    work = Path(work_dir) if work_dir is not None else default_work_dir(out)

    import torch.distributed as dist

    joined_here = not (dist.is_available() and dist.is_initialized())
    me, ws = init_distributed(device)
    joined_here = joined_here and ws > 1
    device = local_device(device)
    fp = fingerprint(model_dir)
    base_key = digest({"fingerprint": fp, "method": setup.method, "density": setup.density, "layers": setup.layers,
                       "samples": samples_digest(samples), "precision": precision,
                       "device": torch.device(device).type})
    lw_key = digest({"base": base_key, "store": lw_cfg.store})
    got = None
    if stage == "e2e" and setup.init is None:  # the layer-wise result of an earlier run in this work dir
        got = finished_layers(work, setup.layers, lw_key, setup.rank, lw_cfg)
        if got is None:
            raise CapreseError("stage e2e starts from layer-wise adapters: pass --init ARTIFACT (from a "
                               f"`--stage layerwise` run), keep the layer-wise work dir ({work}), or use --stage both")
    log = (lambda msg: print(msg, file=sys.stderr)) if progress and me == 0 else (lambda msg: None)
    n_prompt = sum(len(s.prompt_ids) for s in samples)
    n_resp = sum(len(s.response_ids) for s in samples)
    log(f"caprese: calibrating {setup.method} (density {setup.density}, layers {setup.layers_arg} = "
        f"{len(setup.layers)} of {spec.num_layers}, rank {setup.rank}) on {len(samples)} samples "
        f"({n_prompt} prompt + {n_resp} response tokens), stage {stage}"
        + (f", {ws} processes" if ws > 1 else "") + f"; work dir {work}")

    if decoder is None:
        from caprese.model.loading import load_decoder

        decoder = load_decoder(model_dir, precision, device, spec=spec)
    metrics: dict = {}
    timing: dict = {}
    if stage in ("layerwise", "both"):
        runner = run_sequential if lw_cfg.mode == "sequential" else run_layerwise
        lw = runner(decoder, samples, setup.method, setup.density, setup.layers, setup.rank, work, lw_cfg, lw_key,
                    progress, callback)
        adapters = lw.adapters
        metrics["layerwise"] = _layer_summary(lw.metrics)
        timing["layerwise"] = lw.timing
    elif setup.init is not None:
        adapters = dict(setup.init.adapters)
        if "layerwise" in setup.init.metrics:
            metrics["layerwise"] = setup.init.metrics["layerwise"]
    else:
        adapters = {i: (L, R) for i, (L, R, _) in got.items()}
        metrics["layerwise"] = _layer_summary({i: m for i, (_, _, m) in got.items()})
    if stage in ("e2e", "both"):
        e2 = run_e2e(decoder, samples, setup.method, setup.density, setup.layers, setup.rank, adapters, work,
                     e2_cfg, base_key, progress, callback)
        adapters = e2.adapters
        metrics["e2e"] = e2.metrics
        timing["e2e"] = e2.timing
    timing["total_s"] = round(time.monotonic() - t_start, 3)
    metrics["timing"] = timing

    recipe = {
        "stage": stage, "method": setup.method, "density": setup.density, "layers": setup.layers_arg,
        "rank": setup.rank, "precision": precision, "device": torch.device(device).type, "world_size": ws,
        "samples": len(samples), "samples_skipped": skipped, "prompt_tokens": n_prompt, "response_tokens": n_resp,
        "samples_digest": samples_digest(samples),
        "layerwise": (dataclasses.asdict(lw_cfg) if stage != "e2e" or setup.init is None
                      else setup.init.recipe.get("layerwise")),
        "e2e": dataclasses.asdict(e2_cfg) if stage != "layerwise" else None,
        "init": str(Path(init).resolve()) if init is not None else None,
    }
    if setup.init is not None:  # what the init artifact's layer-wise stage was trained on
        recipe["init_samples"] = setup.init.recipe.get("samples")
        recipe["init_samples_digest"] = setup.init.recipe.get("samples_digest")
    recipe["layerwise"] = ({k: v for k, v in recipe["layerwise"].items() if k != "max_ram_bytes"}
                           if recipe["layerwise"] else None)
    if recipe["e2e"]:
        recipe["e2e"].pop("teacher_cache_bytes", None)
    art = Artifact(None, str(model_dir.resolve()), fp, setup.method, setup.density, setup.layers, setup.rank,
                   recipe, metrics, adapters)
    if me == 0:
        save_artifact(art, out, force)
        log(f"caprese: wrote {out}")
        if not keep_work:
            shutil.rmtree(work, ignore_errors=True)
    barrier()
    art.path = out
    if joined_here:
        dist.destroy_process_group()
    return art


__all__ = ["calibrate", "LayerwiseConfig", "E2EConfig", "STAGES", "DEFAULTS", "resolve_setup", "default_work_dir"]
