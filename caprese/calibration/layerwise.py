"""Layer-wise distillation of the Caprese bypass (paper §3): per approximated FFN, independently,

    min_{L, R}  mean_x ‖FF(x) − FF̂(x) − x L R‖²

with x the FFN's input in the ORIGINAL (dense) model on response tokens, FF̂ the efficient method whose
selection (GRIFFIN neurons, CATS τ) comes from the sample's PROMPT tokens. Two phases:

Capture: one dense forward per sample (prompt + response, from slot 0, inference mode) with a forward hook on
each target FFN. The hook feeds the prompt part's gate/up activations to a stand-alone method FFN over the same
weights (`observe`: the sample's selection / τ exactly as generation would set it), evaluates FF̂ = `approx()`
on the response part, and appends x and the target residual r = FF(x) − FF̂(x) of the response tokens to the
append-only row files of capture_store.py (`WORK/capture/layer_{i}.x` / `.r` + a manifest synced every few
seconds), one sample at a time, so nothing but one sample is held in memory; a killed capture resumes from the
last synced sample. The forward stops after the deepest layer still to capture.

Train: per layer, L random (LowRankBypass's init, seeded by seed + layer), R = 0, Adam, a batch of
`batch_size` rows = response TOKENS (the paper's "batch 128": the layer-wise loss is a per-token regression with
no sequence structure, so a batch is 128 (x, r) rows drawn from all samples), reshuffled every epoch with a
generator seeded per layer, linear schedule with warm-up. Each finished layer goes to `WORK/layer_{i}.safetensors`
(temp file + rename) with its metrics and a key of everything it depends on; a rerun skips finished layers
(and their capture), so an interrupted run ends with exactly the adapters of an uninterrupted one.

Metrics per layer: `ff_sq` = mean ‖FF(x)‖², `before` = mean ‖r‖² (FF̂ alone), `after` = mean ‖r − xLR‖²,
and `before_rel` / `after_rel` = those divided by `ff_sq`.

The sequential option (LayerwiseConfig.mode = "sequential": the student's inputs, the dense layer output as
target, one layer after another) lives in sequential.py and reuses the capture files and training here.

Scale-out: under torchrun (WORLD_SIZE > 1) the j-th target layer (in sorted order; = layer index for
contiguous layer sets from 0) is captured and trained by rank j % world_size only; all ranks share the work
directory (one node, or a shared file system) and meet at a barrier, after which every rank reads all results.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from caprese.atomic_output import atomic_file
from caprese.calibration import capture_store
from caprese.calibration.bypass import LowRankBypass
from caprese.calibration.capture_store import CaptureLayer, Rows
from caprese.calibration.distributed import all_gather_objects, barrier, world
from caprese.calibration.fingerprint import digest
from caprese.calibration.methods import EfficientFFN, make_method_ffn
from caprese.calibration.progress import Callback, bar
from caprese.calibration.recipe import CalibrationOptions, CalibrationPlan, LayerwiseConfig
from caprese.calibration.schedule import linear_schedule
from caprese.model.ffn import FFNContext


@dataclasses.dataclass
class LayerwiseResult:
    adapters: dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> (L [D, r], R [r, D]) float32 cpu
    metrics: dict[int, dict]
    timing: dict


def owned_layers(layers: list[int], rank: int, world_size: int) -> list[int]:
    """The target layers rank `rank` captures and trains: every world_size-th in sorted order."""
    return [i for j, i in enumerate(sorted(layers)) if j % world_size == rank]


# ---------------------------------------------------------------- capture

class _StopForward(Exception):
    """Raised by the deepest capture hook: the layers above it are not needed."""


def ensure_caches(decoder, samples) -> None:
    """A batch-1 KV cache long enough for the longest sample, allocated outside inference mode."""
    need = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    cache = decoder.layers[0].self_attn.cache
    if (decoder.max_len < need or getattr(decoder, "batch", None) != 1 or cache is None
            or cache.k.is_inference()):
        with torch.inference_mode(False):
            decoder.setup_caches(1, need)


def capture(decoder, samples, layers: list[int], work: Path, key: str, method: str, density: float,
            store: str = "fp32", progress: bool = True, callback: Callback | None = None, student=None
            ) -> dict[int, CaptureLayer]:
    """Capture x and r = FF(x) − FF̂(x) on response tokens for `layers` of the dense `decoder`.

    The decoder runs dense (its FFNs are DenseFFN, or EfficientFFN in their dense prefill phase); FF̂ is a
    stand-alone `method` FFN per layer that observes the prompt's gate/up activations and approximates the
    response, exactly as generation would. With `student` (quantized_student.StudentWeights, in its teacher
    state) FF̂ computes with the layer's quantized FFN weights (selection included), FF(x) and x stay dense.
    """
    folder = work / "capture"
    folder.mkdir(parents=True, exist_ok=True)
    ffns = {}
    for i in layers:
        mlp = decoder.layers[i].mlp
        # a stand-alone method FFN over the decoder's own dense weights (not installed in the decoder)
        ffns[i] = make_method_ffn(mlp.dense if isinstance(mlp, EfficientFFN) else mlp, method, density)
    dim = decoder.spec.hidden_size
    caps = {i: CaptureLayer(folder, i, dim, key, store) for i in layers}
    todo = [i for i in layers if not caps[i].complete]
    if not todo:
        return caps
    ensure_caches(decoder, samples)
    start = min(caps[i].state["samples_done"] for i in todo)
    current = {"j": start, "p": 0}
    deepest = max(todo)

    def hook_for(i: int):
        cap, ffn = caps[i], ffns[i]

        def hook(module, args, output):
            if current["j"] >= cap.state["samples_done"]:
                x, y, p = args[0][0], output[0], current["p"]
                xp = x[None, :p]  # the prompt: sets the selection / τ (its dense output is not needed)
                with student.student_ffn(i) if student is not None else contextlib.nullcontext():
                    ffn.weights_changed()
                    a = ffn.act(ffn.dense.gate_proj(xp))
                    ffn.observe(a, a * ffn.dense.up_proj(xp), FFNContext("prefill", 0))
                    fhat = ffn.approx(x[None, p:])[0]
                    ffn.weights_changed()
                cap.append(x[p:], y[p:], (y[p:].float() - fhat.float()))
                cap.state["samples_done"] = current["j"] + 1
            if i == deepest:
                raise _StopForward

        return hook

    handles = []
    pbar = bar(len(samples), f"capture {len(todo)} layer(s)", progress and world()[0] == 0, initial=start)
    t_sync = time.monotonic()
    try:
        for i in todo:
            caps[i].open()
            handles.append(decoder.layers[i].mlp.register_forward_hook(hook_for(i)))
        device = decoder.model.embed_tokens.weight.device
        for j in range(start, len(samples)):
            s = samples[j]
            current["j"], current["p"] = j, len(s.prompt_ids)
            ids = torch.tensor([s.ids], device=device)
            with torch.inference_mode():
                try:
                    decoder.hidden_states(ids, 0, phase="prefill")
                except _StopForward:
                    pass
            pbar.update(1)
            if time.monotonic() - t_sync >= capture_store.SYNC_S:
                for i in todo:
                    caps[i].sync()
                t_sync = time.monotonic()
            if callback is not None:
                callback({"stage": "capture", "sample": j + 1, "samples": len(samples)})
        for i in todo:
            caps[i].sync(complete=True)
    finally:
        pbar.close()
        for h in handles:
            h.remove()
        for i in todo:
            caps[i].close()
    return caps


# ---------------------------------------------------------------- training

@torch.no_grad()
def residual_metrics(rows: Rows, bypass: LowRankBypass | None) -> tuple[float, float]:
    """(mean ‖r‖², mean ‖r − x L R‖²) over all rows."""
    s_r = s_res = 0.0
    for x, r in rows.chunks():
        s_r += float(r.double().square().sum())
        res = r if bypass is None else r - bypass(x)
        s_res += float(res.double().square().sum())
    n = max(1, rows.n)
    return s_r / n, s_res / n


def train_layer(layer: int, rows: Rows, rank: int, cfg: LayerwiseConfig, ff_sq: float, pbar=None,
                callback: Callback | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    t0 = time.monotonic()
    device = rows.device
    bp = LowRankBypass(rows.d, rank, torch.float32, device, seed=cfg.seed + layer)
    before, _ = residual_metrics(rows, None)
    opt = torch.optim.Adam(bp.parameters(), lr=cfg.lr)
    spe = max(1, math.ceil(rows.n / cfg.batch_size))
    total = cfg.epochs * spe
    sched = linear_schedule(opt, total, cfg.warmup)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + layer)
    step, epoch_loss = 0, float("nan")
    for epoch in range(cfg.epochs):
        perm = torch.randperm(rows.n, generator=gen).numpy()
        run = 0.0
        for s in range(spe):
            idx = np.sort(perm[s * cfg.batch_size:(s + 1) * cfg.batch_size])
            if idx.size == 0:
                continue
            x, r = rows.get(idx)
            loss = (r - bp(x)).square().sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            lv = float(loss.detach())
            run += lv * idx.size
            if pbar is not None:
                pbar.update(1)
                pbar.set_postfix(epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{lv:.4g}", refresh=False)
            if callback is not None:
                callback({"stage": "layerwise", "event": "step", "layer": layer, "epoch": epoch, "step": step,
                          "steps": total, "loss": lv})
        epoch_loss = run / max(1, rows.n)
    _, after = residual_metrics(rows, bp)
    ref = ff_sq if ff_sq > 0 else float("nan")
    metrics = {"rows": rows.n, "ff_sq": ff_sq, "before": before, "after": after,
               "before_rel": before / ref, "after_rel": after / ref,
               "last_epoch_loss": epoch_loss, "steps": step, "train_s": round(time.monotonic() - t0, 3)}
    return bp.L.detach().float().cpu(), bp.R.detach().float().cpu(), metrics


def _layer_file(work: Path, layer: int) -> Path:
    return work / f"layer_{layer}.safetensors"


def save_layer(work: Path, layer: int, L: torch.Tensor, R: torch.Tensor, metrics: dict, key: str) -> None:
    from safetensors.torch import save_file

    with atomic_file(_layer_file(work, layer)) as tmp:
        save_file({"L": L.contiguous(), "R": R.contiguous()}, str(tmp),
                  metadata={"key": key, "metrics": json.dumps(metrics)})


def load_layer(work: Path, layer: int, key: str):
    """(L, R, metrics) of a finished layer trained under `key`, else None."""
    from safetensors import safe_open

    path = _layer_file(work, layer)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key:
                return None
            return f.get_tensor("L"), f.get_tensor("R"), json.loads(meta["metrics"])
    except Exception:  # a torn or foreign file: train the layer again
        return None


def layer_train_key(key: str, rank: int, cfg: LayerwiseConfig) -> str:
    return digest({"capture": key, "rank": rank, "cfg": dataclasses.asdict(cfg)})


def finished_layers(work: Path, layers: list[int], key: str, rank: int, cfg: LayerwiseConfig):
    """All layers' (L, R, metrics) from an earlier layer-wise run of this work dir, or None if any is missing."""
    tk = layer_train_key(key, rank, cfg)
    got = {i: load_layer(Path(work), i, tk) for i in layers}
    return None if any(v is None for v in got.values()) else got


def train_captured(cap: CaptureLayer, device, plan: CalibrationPlan, work: Path, train_key: str, desc: str,
                   options: CalibrationOptions, callback: Callback | None = None,
                   extra: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Train one captured layer, save its result (metrics + `extra`) under train_key, drop its activations."""
    i, cfg = cap.layer, plan.recipe.layerwise
    rows = Rows(cap, device, options.max_ram_bytes)
    pbar = bar(cfg.epochs * max(1, math.ceil(rows.n / cfg.batch_size)), desc, options.progress)
    try:
        ff_sq = cap.state["sum_y2"] / max(1, cap.state["rows"])
        L, R, m = train_layer(i, rows, plan.rank, cfg, ff_sq, pbar, callback)
    finally:
        pbar.close()
    del rows
    m.update(extra or {})
    save_layer(work, i, L, R, m, train_key)
    cap.remove()  # the layer is done: its activations are not needed again
    if options.progress:
        print(f"caprese: layer {i}: residual {m['before_rel']:.4f} -> {m['after_rel']:.4f} of ‖FF(x)‖² "
              f"({m['rows']} tokens, {m['train_s']:.1f} s)", file=sys.stderr)
    if callback is not None:
        callback({"stage": "layerwise", "event": "layer_done", "layer": i, "metrics": m})
    return L, R, m


def run_layerwise(decoder, samples, plan: CalibrationPlan, work: Path, key: str, options: CalibrationOptions,
                  callback: Callback | None = None, student=None) -> LayerwiseResult:
    """Capture + train every layer of `plan` this rank owns, then (after a barrier) read all layers' results.

    `key` must identify everything the capture depends on (base model, method, density, layers, samples,
    precision, capture store, quantized weights); the per-layer training key adds rank and the layer-wise config.
    `student`: the quantized student's weights (quantized_student.StudentWeights) or None.
    """
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    me, ws = world()
    layers = sorted(plan.layers)
    cfg = plan.recipe.layerwise
    train_key = layer_train_key(key, plan.rank, cfg)
    mine = owned_layers(layers, me, ws)
    todo = [i for i in mine if load_layer(work, i, train_key) is None]
    timing = {"capture_s": 0.0, "train_s": 0.0, "layers_trained": len(todo), "layers_reused": len(mine) - len(todo)}
    if todo:
        t0 = time.monotonic()
        caps = capture(decoder, samples, todo, work, key, plan.method, plan.density, cfg.store, options.progress,
                       callback, student)
        timing["capture_s"] = round(time.monotonic() - t0, 3)
        device = decoder.model.embed_tokens.weight.device
        t1 = time.monotonic()
        for n, i in enumerate(todo):
            train_captured(caps[i], device, plan, work, train_key, f"layer {i} ({n + 1}/{len(todo)})", options,
                           callback)
        timing["train_s"] = round(time.monotonic() - t1, 3)
    barrier()
    adapters, metrics = {}, {}
    for i in layers:
        got = load_layer(work, i, train_key)
        if got is None:
            raise RuntimeError(f"layer {i} has no finished layer-wise result in {work} after the barrier")
        adapters[i] = (got[0], got[1])
        metrics[i] = got[2]
    timings = all_gather_objects(timing)
    if ws > 1:
        timing = {"capture_s": max(t["capture_s"] for t in timings), "train_s": max(t["train_s"] for t in timings),
                  "layers_trained": sum(t["layers_trained"] for t in timings),
                  "layers_reused": sum(t["layers_reused"] for t in timings), "per_rank": timings}
    return LayerwiseResult(adapters, metrics, timing)
