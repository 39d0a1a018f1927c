"""Layer-wise distillation of the Caprese bypass (paper §3): per approximated FFN, independently,

    min_{L, R}  mean_x ‖FF(x) − FF̂(x) − x L R‖²

with x the FFN's input in the ORIGINAL (dense) model on response tokens, FF̂ the efficient method whose
selection (GRIFFIN neurons, CATS τ) comes from the sample's PROMPT tokens. Two phases:

Capture: one dense forward per sample (prompt + response, from slot 0, inference mode) with a forward hook on
each target FFN. The hook feeds the prompt part's gate/up activations to a stand-alone method FFN over the same
weights (`observe`: the sample's selection / τ exactly as generation would set it), evaluates FF̂ = `approx()`
on the response part, and appends x and the target
residual r = FF(x) − FF̂(x) of the response tokens to raw, append-only row files
`WORK/capture/layer_{i}.x` / `.r` ([rows, D], fp32 or bf16), one sample at a time, so nothing but one sample is
held in memory. `WORK/capture/layer_{i}.json` records rows / samples done (synced every few seconds) and
`complete`; a killed capture resumes from the last synced sample (the row files are truncated back to it).
The forward stops after the deepest layer still to capture.

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

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from caprese.calibration.bypass import LowRankBypass
from caprese.calibration.methods import CatsFFN, EfficientFFN, GriffinFFN, MagnitudeFFN
from caprese.calibration.schedule import linear_schedule
from caprese.model.ffn import DenseFFN, FFNContext

Callback = Callable[[dict], None]
_CAPTURE_SYNC_S = 5.0  # how often the capture manifests are rewritten (a kill loses at most this much capture)
_STORES = {"fp32": (np.float32, 4), "bf16": (np.int16, 2)}
MODES = ("parallel", "sequential")


@dataclasses.dataclass
class LayerwiseConfig:
    epochs: int = 20
    lr: float = 1e-3
    batch_size: int = 128  # rows (response tokens) per Adam step
    warmup: float = 0.02  # fraction of all steps spent warming up
    seed: int = 0
    store: str = "fp32"  # on-disk dtype of the captured x and r: fp32 | bf16
    max_ram_bytes: int = 1 << 30  # a layer's x + r smaller than this is read into memory; else batches from disk
    # "parallel": the paper's (original-model inputs, FF(x) - FF^(x), layers independent);
    # "sequential": the student's inputs against the dense layer output, layer after layer (sequential.py)
    mode: str = "parallel"

    def key_fields(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("max_ram_bytes")
        return d

    def validate(self) -> None:
        from caprese.errors import CapreseError

        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise CapreseError("layer-wise epochs and batch size must be >= 1 and lr > 0")
        if not 0 <= self.warmup < 1:
            raise CapreseError(f"warm-up fraction must be in [0, 1); got {self.warmup}")
        if self.store not in _STORES:
            raise CapreseError(f"capture store must be fp32 or bf16; got {self.store!r}")
        if self.mode not in MODES:
            raise CapreseError(f"layer-wise mode must be one of {', '.join(MODES)}; got {self.mode!r}")


@dataclasses.dataclass
class LayerwiseResult:
    adapters: dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> (L [D, r], R [r, D]) float32 cpu
    metrics: dict[int, dict]
    timing: dict


# ---------------------------------------------------------------- distributed helpers (used by e2e too)

def init_distributed(device: str = "cpu") -> tuple[int, int]:
    """(rank, world). With WORLD_SIZE > 1 in the environment (torchrun), join the process group (gloo on CPU,
    nccl on CUDA) unless already joined. Returns (0, 1) otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_device(device: str) -> str:
    """Under torchrun a bare "cuda" means this process's GPU, cuda:LOCAL_RANK."""
    if str(device) == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return str(device)


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_gather_objects(obj) -> list:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------- small file helpers

def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:32]


def samples_digest(samples) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps([list(s.prompt_ids), list(s.response_ids)]).encode())
    return h.hexdigest()[:32]


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def owned_layers(layers: list[int], rank: int, world_size: int) -> list[int]:
    return [i for j, i in enumerate(sorted(layers)) if j % world_size == rank]


def _bar(total: int, desc: str, enabled: bool, initial: int = 0):
    from tqdm.auto import tqdm

    rank, ws = world()
    return tqdm(total=total, initial=initial, desc=desc if ws == 1 else f"[rank {rank}] {desc}", file=sys.stderr,
                disable=not enabled, leave=True, dynamic_ncols=True, position=rank if ws > 1 else None)


# ---------------------------------------------------------------- capture

class _StopForward(Exception):
    """Raised by the deepest capture hook: the layers above it are not needed."""


def _to_bytes(t: torch.Tensor, store: str) -> bytes:
    t = t.detach().to("cpu")
    if store == "bf16":
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()
    return t.to(torch.float32).contiguous().numpy().tobytes()


class _CaptureLayer:
    def __init__(self, folder: Path, layer: int, dim: int, key: str, store: str):
        self.layer, self.dim, self.key, self.store = layer, dim, key, store
        self.meta_path = folder / f"layer_{layer}.json"
        self.x_path, self.r_path = folder / f"layer_{layer}.x", folder / f"layer_{layer}.r"
        self.row_bytes = dim * _STORES[store][1]
        st = _read_json(self.meta_path)
        ok = st is not None and st.get("key") == key and all(
            p.is_file() and p.stat().st_size >= st["rows"] * self.row_bytes for p in (self.x_path, self.r_path))
        self.state = st if ok else {"key": key, "layer": layer, "dim": dim, "store": store, "rows": 0,
                                    "samples_done": 0, "sum_y2": 0.0, "sum_r2": 0.0, "complete": False}
        self.fx = self.fr = None

    @property
    def complete(self) -> bool:
        return bool(self.state["complete"])

    def open(self) -> None:
        size = self.state["rows"] * self.row_bytes
        for p in (self.x_path, self.r_path):
            with open(p, "ab"):
                pass
            os.truncate(p, size)  # drop rows written after the last synced manifest
        self.fx, self.fr = open(self.x_path, "ab"), open(self.r_path, "ab")

    def append(self, x: torch.Tensor, y: torch.Tensor, r: torch.Tensor) -> None:
        self.fx.write(_to_bytes(x, self.store))
        self.fr.write(_to_bytes(r, self.store))
        self.state["rows"] += x.shape[0]
        self.state["sum_y2"] += float(y.double().square().sum())
        self.state["sum_r2"] += float(r.double().square().sum())

    def sync(self, complete: bool = False) -> None:
        if self.fx is not None:
            self.fx.flush()
            self.fr.flush()
        if complete:
            self.state["complete"] = True
        write_json_atomic(self.meta_path, self.state)

    def close(self) -> None:
        for f in (self.fx, self.fr):
            if f is not None:
                f.close()
        self.fx = self.fr = None

    def remove(self) -> None:
        for p in (self.x_path, self.r_path, self.meta_path):
            p.unlink(missing_ok=True)


def ensure_caches(decoder, samples) -> None:
    """A batch-1 KV cache long enough for the longest sample, allocated outside inference mode."""
    need = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    cache = decoder.layers[0].self_attn.cache
    if (decoder.max_len < need or getattr(decoder, "batch", None) != 1 or cache is None
            or cache.k.is_inference()):
        with torch.inference_mode(False):
            decoder.setup_caches(1, need)


def _method_ffn(dense: DenseFFN, method: str, density: float) -> EfficientFFN:
    """A stand-alone `method` FFN over the decoder's own dense weights (not installed in the decoder)."""
    classes = {c.method: c for c in (GriffinFFN, CatsFFN, MagnitudeFFN)}
    if method not in classes:
        raise ValueError(f"unknown method {method!r}")
    return classes[method](dense, density)


def capture(decoder, samples, layers: list[int], work: Path, key: str, method: str, density: float,
            store: str = "fp32", progress: bool = True, callback: Callback | None = None
            ) -> dict[int, _CaptureLayer]:
    """Capture x and r = FF(x) − FF̂(x) on response tokens for `layers` of the dense `decoder`.

    The decoder runs dense (its FFNs are DenseFFN, or EfficientFFN in their dense prefill phase); FF̂ is a
    stand-alone `method` FFN per layer that observes the prompt's gate/up activations and approximates the
    response, exactly as generation would.
    """
    folder = work / "capture"
    folder.mkdir(parents=True, exist_ok=True)
    ffns = {}
    for i in layers:
        mlp = decoder.layers[i].mlp
        ffns[i] = _method_ffn(mlp.dense if isinstance(mlp, EfficientFFN) else mlp, method, density)
    dim = decoder.spec.hidden_size
    caps = {i: _CaptureLayer(folder, i, dim, key, store) for i in layers}
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
                a = ffn.act(ffn.dense.gate_proj(xp))
                ffn.observe(a, a * ffn.dense.up_proj(xp), FFNContext("prefill", 0))
                fhat = ffn.approx(x[None, p:])[0]
                cap.append(x[p:], y[p:], (y[p:].float() - fhat.float()))
                cap.state["samples_done"] = current["j"] + 1
            if i == deepest:
                raise _StopForward

        return hook

    handles = []
    bar = _bar(len(samples), f"capture {len(todo)} layer(s)", progress and world()[0] == 0, initial=start)
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
            bar.update(1)
            if time.monotonic() - t_sync >= _CAPTURE_SYNC_S:
                for i in todo:
                    caps[i].sync()
                t_sync = time.monotonic()
            if callback is not None:
                callback({"stage": "capture", "sample": j + 1, "samples": len(samples)})
        for i in todo:
            caps[i].sync(complete=True)
    finally:
        bar.close()
        for h in handles:
            h.remove()
        for i in todo:
            caps[i].close()
    return caps


# ---------------------------------------------------------------- training

class _Rows:
    """A layer's captured (x, r) rows: in memory when small enough, else read batch by batch from the files."""

    def __init__(self, cap: _CaptureLayer, device, max_ram_bytes: int):
        n, d = cap.state["rows"], cap.dim
        dt = _STORES[cap.store][0]
        self.n, self.d, self.store, self.device = n, d, cap.store, torch.device(device)
        self.x = np.memmap(cap.x_path, dtype=dt, mode="r", shape=(n, d)) if n else np.zeros((0, d), dt)
        self.r = np.memmap(cap.r_path, dtype=dt, mode="r", shape=(n, d)) if n else np.zeros((0, d), dt)
        self.ram = 2 * n * d * 4 <= max_ram_bytes
        if self.ram:
            self.x, self.r = self._tensor(self.x), self._tensor(self.r)

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.array(a))  # a private, writable copy (never a view of the memory map)
        if self.store == "bf16":
            t = t.view(torch.bfloat16)
        return t.to(device=self.device, dtype=torch.float32)

    def get(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows idx (sorted ascending: the same order whichever way the rows are held)."""
        if self.ram:
            t = torch.from_numpy(idx)
            if self.device.type != "cpu":
                t = t.to(self.device)
            return self.x.index_select(0, t), self.r.index_select(0, t)
        return self._tensor(self.x[idx]), self._tensor(self.r[idx])

    def chunks(self, size: int = 8192):
        for a in range(0, self.n, size):
            yield self.get(np.arange(a, min(a + size, self.n)))


@torch.no_grad()
def residual_metrics(rows: _Rows, bypass: LowRankBypass | None) -> tuple[float, float]:
    """(mean ‖r‖², mean ‖r − x L R‖²) over all rows."""
    s_r = s_res = 0.0
    for x, r in rows.chunks():
        s_r += float(r.double().square().sum())
        res = r if bypass is None else r - bypass(x)
        s_res += float(res.double().square().sum())
    n = max(1, rows.n)
    return s_r / n, s_res / n


def train_layer(layer: int, rows: _Rows, rank: int, cfg: LayerwiseConfig, ff_sq: float, bar=None,
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
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{lv:.4g}", refresh=False)
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

    path = _layer_file(work, layer)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({"L": L.contiguous(), "R": R.contiguous()}, str(tmp),
              metadata={"key": key, "metrics": json.dumps(metrics)})
    os.replace(tmp, path)


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
    return digest({"capture": key, "rank": rank, "cfg": cfg.key_fields()})


def finished_layers(work: Path, layers: list[int], key: str, rank: int, cfg: LayerwiseConfig):
    """All layers' (L, R, metrics) from an earlier layer-wise run of this work dir, or None if any is missing."""
    tk = layer_train_key(key, rank, cfg)
    got = {i: load_layer(Path(work), i, tk) for i in layers}
    return None if any(v is None for v in got.values()) else got


def train_captured(cap: _CaptureLayer, device, rank: int, cfg: LayerwiseConfig, work: Path, train_key: str,
                   desc: str, progress: bool = True, callback: Callback | None = None,
                   extra: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Train one captured layer, save its result (metrics + `extra`) under train_key, drop its activations."""
    i = cap.layer
    rows = _Rows(cap, device, cfg.max_ram_bytes)
    bar = _bar(cfg.epochs * max(1, math.ceil(rows.n / cfg.batch_size)), desc, progress)
    try:
        ff_sq = cap.state["sum_y2"] / max(1, cap.state["rows"])
        L, R, m = train_layer(i, rows, rank, cfg, ff_sq, bar, callback)
    finally:
        bar.close()
    del rows
    m.update(extra or {})
    save_layer(work, i, L, R, m, train_key)
    cap.remove()  # the layer is done: its activations are not needed again
    if progress:
        print(f"caprese: layer {i}: residual {m['before_rel']:.4f} -> {m['after_rel']:.4f} of ‖FF(x)‖² "
              f"({m['rows']} tokens, {m['train_s']:.1f} s)", file=sys.stderr)
    if callback is not None:
        callback({"stage": "layerwise", "event": "layer_done", "layer": i, "metrics": m})
    return L, R, m


def run_layerwise(decoder, samples, method: str, density: float, layers: list[int], rank: int, work: Path,
                  cfg: LayerwiseConfig, key: str, progress: bool = True, callback: Callback | None = None
                  ) -> LayerwiseResult:
    """Capture + train every layer this rank owns, then (after a barrier) read all layers' results.

    `key` must identify everything the capture depends on (base model, method, density, layers, samples,
    precision); the per-layer training key adds rank and `cfg`.
    """
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    me, ws = world()
    layers = sorted(layers)
    train_key = layer_train_key(key, rank, cfg)
    mine = owned_layers(layers, me, ws)
    todo = [i for i in mine if load_layer(work, i, train_key) is None]
    timing = {"capture_s": 0.0, "train_s": 0.0, "layers_trained": len(todo), "layers_reused": len(mine) - len(todo)}
    if todo:
        t0 = time.monotonic()
        caps = capture(decoder, samples, todo, work, key, method, density, cfg.store, progress, callback)
        timing["capture_s"] = round(time.monotonic() - t0, 3)
        device = decoder.model.embed_tokens.weight.device
        t1 = time.monotonic()
        for n, i in enumerate(todo):
            train_captured(caps[i], device, rank, cfg, work, train_key, f"layer {i} ({n + 1}/{len(todo)})",
                           progress, callback)
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
