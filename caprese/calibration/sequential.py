"""Sequential layer-wise distillation, the option beside the paper's parallel layer-wise stage (layerwise.py):

    layer i's bypass sees the STUDENT's input x (layers below already approximated, with their trained bypass)
    and is fitted so the layer outputs the DENSE model's state t_i:   min ‖t_i − mid − FF̂(x) − x L R‖²

where mid is the student's residual stream entering the FFN branch. The paper's layer-wise targets (original
inputs, FF(x) − FF̂(x)) cannot see the error the approximated layers below feed in; only its end-to-end stage
corrects that. Here each bypass also absorbs what reaches its layer, at layer-wise cost, but layers must train
one after another (no torchrun split). Gemma 2 normalises the FFN branch (post_feedforward_layernorm), so its
target is that norm inverted at the scale of the dense FFN's output.

The model runs one block at a time over stored residual-stream states (Decoder.blocks): WORK/sequential/
states_{b}.t holds the dense model's states entering layer b for every token of every sample, states_{b}.s the
student's for the response tokens (the prompt is prefilled densely, so its states are the dense model's).
Per layer, per sample: the dense pass over prompt + response (teacher), the prompt alone (GRIFFIN selection /
CATS τ, prompt K/V), then the response as one decode chunk (student) -- once to capture (x, target) rows
(the teacher's output rows are written as the next boundary's teacher states on the way), and again with the
trained bypass to write the next student states. Resumable per layer: the trained layers are the same files
as the parallel stage's, and a boundary's states are kept until the next boundary is complete.

Quantized student (`student`, quantized_student.StudentWeights): the teacher passes run with the original
weights, the student's with the quantized ones (attention too), so the student's prompt states differ from the
teacher's: states_{b}.s then holds the student's states of EVERY token, and the student prefills its own prompt.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import numpy as np
import torch

from caprese.atomic_output import write_json_atomic
from caprese.calibration import capture_store
from caprese.calibration.capture_store import CaptureLayer, read_json_or_none, to_bytes
from caprese.calibration.distributed import world
from caprese.calibration.fingerprint import digest
from caprese.calibration.layerwise import LayerwiseResult, ensure_caches, layer_train_key, load_layer, train_captured
from caprese.calibration.methods import EfficientFFN, apply_method, efficient_layers
from caprese.calibration.progress import Callback, bar
from caprese.calibration.recipe import CalibrationOptions, CalibrationPlan
from caprese.errors import CapreseError


class _Stop(Exception):
    """Raised at the FFN's input: the capture has what it needs from this block."""


class _States:
    """One boundary's residual-stream rows: teacher (all tokens) and student (response tokens; every token with a
    quantized student), fp32 files."""

    def __init__(self, folder: Path, boundary: int, samples, dim: int, key: str, full_student: bool = False):
        self.dim, self.key = dim, key
        self.t_path, self.s_path = folder / f"states_{boundary}.t", folder / f"states_{boundary}.s"
        self.meta = folder / f"states_{boundary}.json"
        self.t_meta = folder / f"states_{boundary}.t.json"  # the teacher rows alone, written by a capture
        lens_t = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
        lens_s = lens_t if full_student else [len(s.response_ids) for s in samples]
        self.off_t, self.off_s = np.cumsum([0] + lens_t), np.cumsum([0] + lens_s)
        self._t = self._s = None

    @property
    def complete(self) -> bool:
        st = read_json_or_none(self.meta)
        rows_ok = all(p.is_file() and p.stat().st_size == int(off[-1]) * self.dim * 4
                      for p, off in ((self.t_path, self.off_t), (self.s_path, self.off_s)))
        return bool(st and st.get("key") == self.key and st.get("complete")) and rows_ok

    @property
    def teacher_ready(self) -> bool:
        st = read_json_or_none(self.t_meta)
        return bool(st and st.get("key") == self.key and st.get("complete")) and self.t_path.is_file() and \
            self.t_path.stat().st_size == int(self.off_t[-1]) * self.dim * 4

    def open_teacher(self, first: int):
        """The teacher file for appending rows from sample `first` on (rows after it dropped); None when the
        rows before `first` are not there (then the propagation writes them all itself)."""
        self.t_meta.unlink(missing_ok=True)
        self.meta.unlink(missing_ok=True)
        size = int(self.off_t[first]) * self.dim * 4
        if first and (not self.t_path.is_file() or self.t_path.stat().st_size < size):
            return None
        with open(self.t_path, "ab"):
            pass
        os.truncate(self.t_path, size)
        return open(self.t_path, "ab")

    def finish_teacher(self) -> None:
        write_json_atomic(self.t_meta, {"key": self.key, "complete": True})

    def open_write(self, teacher: bool = True):
        """(teacher file or None when the teacher rows are kept, student file), both from the start."""
        self.meta.unlink(missing_ok=True)
        return (open(self.t_path, "wb") if teacher else None), open(self.s_path, "wb")

    def finish(self) -> None:
        write_json_atomic(self.meta, {"key": self.key, "complete": True})

    def read(self, j: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self._t is None:
            self._t = np.memmap(self.t_path, dtype=np.float32, mode="r").reshape(-1, self.dim)
            self._s = np.memmap(self.s_path, dtype=np.float32, mode="r").reshape(-1, self.dim)
        t = np.array(self._t[self.off_t[j]:self.off_t[j + 1]])
        s = np.array(self._s[self.off_s[j]:self.off_s[j + 1]])
        return (torch.from_numpy(t)[None].to(device=device, dtype=dtype),
                torch.from_numpy(s)[None].to(device=device, dtype=dtype))

    def remove(self) -> None:
        self._t = self._s = None
        for p in (self.t_path, self.s_path, self.meta, self.t_meta):
            p.unlink(missing_ok=True)


def branch_target(block, mid: torch.Tensor, t: torch.Tensor, y_dense: torch.Tensor) -> torch.Tensor:
    """What the FFN module must output for `block` to output t from the residual stream mid.

    Llama-style blocks add the FFN output itself: t − mid. Gemma 2 adds post_feedforward_layernorm(FFN output),
    which fixes every token's scale: its inverse direction, at the RMS of the dense FFN output y_dense."""
    if not block.gemma:
        return (t.float() - mid.float()).to(y_dense.dtype)
    w = block.post_feedforward_layernorm.weight.float()
    u = (t.float() - mid.float()) / (1.0 + w)
    rms = lambda a: a.square().mean(-1, keepdim=True).clamp_min(1e-12).sqrt()  # noqa: E731
    return (u * (rms(y_dense.float()) / rms(u))).to(y_dense.dtype)


def _mid_norm(block):
    """The norm whose input is the residual stream entering the FFN branch."""
    return block.pre_feedforward_layernorm if block.gemma else block.post_attention_layernorm


def run_sequential(decoder, samples, plan: CalibrationPlan, work: Path, key: str, options: CalibrationOptions,
                   callback: Callback | None = None, student=None) -> LayerwiseResult:
    """Train every layer's (L, R) in order, each on the student's inputs against the dense layer output.

    Same contract as layerwise.run_layerwise (key, result); the decoder's target layers get the plan's method
    FFNs with the trained bypasses installed (so it leaves as the calibrated student)."""
    if world()[1] > 1:
        raise CapreseError("sequential layer-wise training runs in one process (each layer's inputs come from the "
                           "layers trained before it); run it without torchrun, or use --layerwise-mode parallel")
    work = Path(work)
    folder = work / "sequential"
    folder.mkdir(parents=True, exist_ok=True)
    layers, cfg, progress = sorted(plan.layers), plan.recipe.layerwise, options.progress
    train_key = layer_train_key(key, plan.rank, cfg)
    dim = decoder.spec.hidden_size
    w = decoder.model.embed_tokens.weight
    device, dtype = w.device, w.dtype
    apply_method(decoder, plan.method, plan.density, layers, rank=plan.rank, seed=cfg.seed)
    ffns = {i: f for i, f in efficient_layers(decoder).items() if i in layers}
    ensure_caches(decoder, samples)

    full = student is not None

    def boundary(b: int) -> _States:
        return _States(folder, b, samples, dim, digest({"train": train_key, "boundary": b}), full)

    def install(i: int, L: torch.Tensor, R: torch.Tensor) -> None:
        with torch.no_grad():
            ffns[i].bypass.L.copy_(L.to(ffns[i].bypass.L.dtype))
            ffns[i].bypass.R.copy_(R.to(ffns[i].bypass.R.dtype))

    # resume: the deepest complete boundary whose layers below are all trained
    finished = {i: load_layer(work, i, train_key) for i in layers}
    start = 0
    for b in range(layers[-1], 0, -1):
        if all(finished[i] is not None for i in layers if i < b) and boundary(b).complete:
            start = b
            break
    adapters, metrics = {}, {}
    for i in layers:
        if i < start:
            adapters[i], metrics[i] = finished[i][:2], finished[i][2]
            install(i, *finished[i][:2])
    timing = {"capture_s": 0.0, "train_s": 0.0, "propagate_s": 0.0,
              "layers_trained": sum(1 for i in layers if i >= start and finished[i] is None),
              "layers_reused": sum(1 for i in layers if finished[i] is not None)}

    def source(b: int):
        if b == 0:
            def embedded(j):
                s = samples[j]
                ids = torch.tensor([s.ids], device=device)
                with torch.inference_mode():
                    t = decoder.embed(ids)
                    if full:
                        with student.student():
                            return t, decoder.embed(ids)
                return t, t[:, len(s.prompt_ids):]
            return embedded
        st = boundary(b)
        return lambda j: st.read(j, device, dtype)

    for i in range(start, layers[-1] + 1):
        src = source(i)
        block = decoder.layers[i]
        if i in ffns:
            if finished[i] is None:
                t0 = time.monotonic()
                nxt = boundary(i + 1) if i < layers[-1] else None
                cap = _capture(decoder, block, ffns[i], i, samples, src, folder, train_key, cfg.store, progress,
                               callback, nxt, student)
                timing["capture_s"] += time.monotonic() - t0
                t1 = time.monotonic()
                desc = f"layer {i} ({layers.index(i) + 1}/{len(layers)}, sequential)"
                finished[i] = train_captured(cap, device, plan, work, train_key, desc, options, callback,
                                             extra={"mode": "sequential"})
                timing["train_s"] += time.monotonic() - t1
            adapters[i], metrics[i] = finished[i][:2], finished[i][2]
            install(i, *finished[i][:2])
        if i == layers[-1]:
            break
        t2 = time.monotonic()
        _propagate(decoder, block, i, samples, src, boundary(i + 1), i in ffns, progress, student)
        timing["propagate_s"] += time.monotonic() - t2
        if i > 0:
            boundary(i).remove()
    for b in range(1, layers[-1] + 1):
        boundary(b).remove()
    timing = {k: round(v, 3) if isinstance(v, float) else v for k, v in timing.items()}
    return LayerwiseResult(adapters, metrics, timing)


def _student(student):
    """The quantized student's weights in place (a no-op context without quantization)."""
    return student.student() if student is not None else contextlib.nullcontext()


def _capture(decoder, block, ffn: EfficientFFN, i: int, samples, src, folder: Path, train_key: str, store: str,
             progress: bool, callback: Callback | None, nxt: _States | None = None, student=None) -> CaptureLayer:
    """(x, target − FF̂(x)) rows of layer i on the response tokens, the student's inputs, the dense outputs;
    the dense outputs of every token also become the teacher rows of boundary i + 1 (`nxt`), so the
    propagation after training does not run the dense pass again."""
    cap = CaptureLayer(folder, i, decoder.spec.hidden_size, digest({"train": train_key, "capture": i}), store)
    if cap.complete:
        return cap
    got: dict = {}
    on = {"student": False}

    def at_ffn(module, args):
        if on["student"]:
            got["x"] = args[0][0]
            raise _Stop

    def at_mid(module, args):
        if on["student"]:
            got["mid"] = args[0][0]

    handles = [block.mlp.register_forward_pre_hook(at_ffn), _mid_norm(block).register_forward_pre_hook(at_mid)]
    first = cap.state["samples_done"]
    pbar = bar(len(samples), f"capture layer {i} (sequential)", progress, initial=first)
    cap.open()
    ft = nxt.open_teacher(first) if nxt is not None else None
    t_sync = time.monotonic()
    try:
        for j in range(first, len(samples)):
            s = samples[j]
            p = len(s.prompt_ids)
            h_t, h_s = src(j)
            with torch.inference_mode():
                t_all = decoder.blocks(h_t, 0, i, i + 1, phase="prefill")[0]  # the dense layer output
                t = t_all[p:]
                with _student(student):
                    # selection / τ (and the prompt's K/V) from the prompt: the student's own when quantized
                    decoder.blocks(h_s[:, :p] if student is not None else h_t[:, :p], 0, i, i + 1, phase="prefill")
                    on["student"] = True
                    try:
                        decoder.blocks(h_s[:, p:] if student is not None else h_s, p, i, i + 1, phase="decode")
                    except _Stop:
                        pass
                    finally:
                        on["student"] = False
                    x, mid = got.pop("x"), got.pop("mid")
                    fhat = ffn.approx(x[None])[0]
                y = ffn.dense(x[None])[0]  # FF(x) with the teacher's (unquantized) weights
                target = branch_target(block, mid, t, y)
                cap.append(x, y, target.float() - fhat.float())
            if ft is not None:
                ft.write(to_bytes(t_all, "fp32"))
            cap.state["samples_done"] = j + 1
            pbar.update(1)
            if time.monotonic() - t_sync >= capture_store.SYNC_S:
                if ft is not None:  # the teacher rows of the samples the manifest counts are in the file
                    ft.flush()
                cap.sync()
                t_sync = time.monotonic()
            if callback is not None:
                callback({"stage": "capture", "layer": i, "sample": j + 1, "samples": len(samples)})
        if ft is not None:
            ft.flush()
            os.fsync(ft.fileno())
            nxt.finish_teacher()
        cap.sync(complete=True)
    finally:
        pbar.close()
        cap.close()
        if ft is not None:
            ft.close()
        for h in handles:
            h.remove()
    return cap


def _propagate(decoder, block, i: int, samples, src, dst: _States, efficient: bool, progress: bool,
               student=None) -> None:
    """States entering layer i+1: the dense pass for the teacher (unless the capture wrote its rows), the
    prompt (prompt K/V, selection) then the response chunk for the student (with `student`: the student's own
    prompt states, and its rows of every token are written)."""
    teacher = not dst.teacher_ready
    ft, fs = dst.open_write(teacher)
    files = [f for f in (ft, fs) if f is not None]
    pbar = bar(len(samples), f"layer {i} -> {i + 1} states", progress)
    try:
        for j, s in enumerate(samples):
            p = len(s.prompt_ids)
            h_t, h_s = src(j)
            with torch.inference_mode():
                if teacher:
                    ft.write(to_bytes(decoder.blocks(h_t, 0, i, i + 1, phase="prefill")[0], "fp32"))
                if student is not None:
                    with student.student():
                        fs.write(to_bytes(decoder.blocks(h_s[:, :p], 0, i, i + 1, phase="prefill")[0], "fp32"))
                        out = decoder.blocks(h_s[:, p:], p, i, i + 1, phase="decode")
                else:
                    if efficient or not teacher:  # the dense pass above also wrote the prompt's K/V
                        decoder.blocks(h_t[:, :p], 0, i, i + 1, phase="prefill")
                    out = decoder.blocks(h_s, p, i, i + 1, phase="decode")
            fs.write(to_bytes(out[0], "fp32"))
            pbar.update(1)
        for f in files:
            f.flush()
            os.fsync(f.fileno())
    finally:
        pbar.close()
        for f in files:
            f.close()
    dst.finish()
