"""Shared by the export and runtime tests (no tests here; a non-test name, so pytest does not collect it):
cached exports of the tiny models and a minimal ONNX Runtime loop.

The loop is what a runtime does with an engine folder, in ~80 lines: IO binding with every present_* bound to the
SAME OrtValue as its past_* (the KV cache is allocated once, at MAX_SEQ slots, and updated in place), prefill ->
GRIFFIN selection (torch.topk of griffin_stat, folded with the weights.bin tensors) or the CATS τ -> decode steps,
and optional GRIFFIN reselection through the prefill graph (as caprese.model.generation.decode_n_tokens does).
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import numpy as np
import torch

from caprese.export import contract as C

MAX_SEQ = 96
DENSITY = 0.5
_CACHE: dict = {}


def method_artifact(folder: Path, out: Path, method: str, rank: int = 8, layers="all", seed: int = 1) -> Path:
    """A calibration artifact for `folder`: `method` on `layers` with a rank-`rank` bypass whose L and R are both
    random (R is zero at init, which would hide a wrongly folded R)."""
    from caprese.calibration.artifact import Artifact, collect_adapters, fingerprint, save_artifact
    from caprese.calibration.methods import apply_method, efficient_layers
    from caprese.model import load_decoder

    dec = load_decoder(folder)
    idx = apply_method(dec, method, DENSITY, layers, rank=rank, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for f in efficient_layers(dec).values():
            if f.bypass is not None:
                f.bypass.R.copy_(torch.randn(f.bypass.R.shape, generator=g) * 0.05)
    art = Artifact(None, str(folder), fingerprint(folder), method, DENSITY, idx, rank,
                   adapters=collect_adapters(dec))
    return save_artifact(art, out, force=True)


def reference_kv_dtype(kv_dtype: str | None, precision: str) -> str | None:
    """The kv_dtype the cached test exports pass: "fp32" pins an fp32 engine's cache to fp32 (not --target
    onnxruntime's default fp16), since those engines are held to fp32 references at fp32 tolerances
    (tests/test_kv_dtype.py covers the fp16 cache); other precisions take their own (None)."""
    return kv_dtype if precision == "fp32" else None


def get_export(tmp_path_factory, tiny_model_dir, kind: str, method: str = "dense", rank: int = 8,
               layers="all", precision: str = "fp32", target: str = "tensorrt",
               kv_dtype: str | None = "fp32") -> tuple[Path, Path]:
    """(engine folder, source folder) exported once per session for (kind, method, rank, layers, precision,
    target, kv_dtype); kv_dtype as reference_kv_dtype."""
    from caprese.export.exporter import export

    kv_dtype = reference_kv_dtype(kv_dtype, precision)
    key = (kind, method, rank, str(layers), precision) + ((target,) if target != "tensorrt" else ()) + (kv_dtype,)
    if key not in _CACHE:
        root = tmp_path_factory.mktemp(f"export_{kind}_{method}_{precision}_{target}")
        art_key = (kind, method, rank, str(layers), "fp32")
        if method == "dense":
            src = tiny_model_dir(kind)
        elif art_key in _CACHE:  # the same artifact, exported at another precision
            src = _CACHE[art_key][1]
        else:
            src = method_artifact(tiny_model_dir(kind), root / "artifact", method, rank, layers)
        out = export(src, root / "engine", precision=precision, max_seq_len=MAX_SEQ, max_prompt_len=MAX_SEQ - 1,
                     target=target, kv_dtype=kv_dtype).out
        _CACHE[key] = (out, src)
    return _CACHE[key]


def copy_engine(engine: Path, dst: Path) -> Path:
    shutil.copytree(engine, dst)
    return dst


def reference_decoder(src: Path, precision: str = "fp32"):
    """The PyTorch decoder the engine must match: the base model with the artifact's method and adapters."""
    from caprese.calibration.artifact import is_artifact, load_artifact
    from caprese.model import load_decoder

    if is_artifact(src):
        art = load_artifact(src)
        dec = load_decoder(art.base_model, precision)
        art.apply(dec)
    else:
        dec = load_decoder(src, precision)
    dec.requires_grad_(False)
    return dec


class OrtLoop:
    """Drive an engine folder's two graphs on ONNX Runtime (CPU) for one batch, KV cache bound in place.

    tensorrt=True drives the files TensorRT parses instead (manifest "tensorrt_graphs", static cache length): the
    shared graph in both roles (decode_flag, cats_tau_in.{i}) or GRIFFIN's two copies."""

    def __init__(self, engine: Path, batch: int = 1, cache_len: int = MAX_SEQ, threads: int = 1,
                 tensorrt: bool = False):
        import onnxruntime as ort

        from caprese.export.folding import Folder
        from caprese.export.manifest import load_manifest

        self.ort = ort
        self.m = load_manifest(engine)
        self.lay = self.m.layout
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        files = {g: self.m.file(g) for g in C.GRAPHS}
        if tensorrt:  # role -> the file of the engine serving it
            record = self.m.data["tensorrt_graphs"]
            files = {role: engine / r["onnx"] for r in record["engines"].values() for role in r["roles"]}
            cache_len = record["cache_len"]
        sessions = {p: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]) for p in set(files.values())}
        self.sessions = {g: sessions[p] for g, p in files.items()}
        self.role_inputs = C.DECODE_FLAG in {i.name for i in self.sessions[C.PREFILL].get_inputs()}
        np_dt = {"float32": np.float32, "float16": np.float16}[self.lay.cache_dtype]  # --kv-dtype
        shape = (batch, self.lay.num_kv_heads, cache_len, self.lay.head_dim)
        self.kv = {name: ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np_dt))
                   for pair in self.lay.in_place_pairs() for name in pair[:1]}
        self.present = dict(self.lay.in_place_pairs())
        self.batch, self.cache_len = batch, cache_len
        self.pad = np.zeros(batch, np.int64)
        self.mask = ort.OrtValue.ortvalue_from_numpy(np.ones((batch, cache_len), np.int64))
        self.folder = Folder(self.m)
        self.selection: dict[str, object] = {}  # decode-graph selection inputs (OrtValues)
        self.stat_sq: dict[int, torch.Tensor] = {}
        self.tau: dict[int, tuple[np.ndarray, int]] = {}
        self.idx: dict[int, torch.Tensor] = {}

    def set_padding(self, pad: np.ndarray) -> None:
        self.pad = np.asarray(pad, np.int64)
        m = (np.arange(self.cache_len)[None, :] >= self.pad[:, None]).astype(np.int64)
        self.mask = self.ort.OrtValue.ortvalue_from_numpy(m)

    def run(self, graph: str, ids: np.ndarray, start: int) -> dict[str, np.ndarray]:
        """Tokens ids [B, T] at cache slots start..start+T-1 through `graph`; the non-cache outputs by name."""
        sess = self.sessions[graph]
        b = sess.io_binding()
        t = ids.shape[1]
        slots = np.arange(start, start + t, dtype=np.int64)[None, :]
        b.bind_cpu_input(C.INPUT_IDS, np.ascontiguousarray(ids, dtype=np.int64))
        b.bind_cpu_input(C.POSITION_IDS, np.maximum(slots - self.pad[:, None], 0))
        b.bind_cpu_input(C.WRITE_INDICES, np.full(self.batch, start, np.int64))
        b.bind_ortvalue_input(C.ATTENTION_MASK, self.mask)
        names = [o.name for o in sess.get_outputs() if o.name not in self.present.values()]
        for n in names:  # bound first: get_outputs() follows binding order
            b.bind_output(n)
        for past, value in self.kv.items():  # present_* written into the very buffer past_* reads
            b.bind_ortvalue_input(past, value)
            b.bind_ortvalue_output(self.present[past], value)
        if self.role_inputs:  # the shared graph: the role, and the decode τ under its input name
            b.bind_cpu_input(C.DECODE_FLAG, np.array(graph == C.DECODE))
            for i in self.lay.layers_of(C.CATS):
                tau = self.selection.get(C.cats_tau(i))
                if graph == C.PREFILL or tau is None:  # prefill must ignore it: garbage on purpose
                    b.bind_cpu_input(C.cats_tau_in(i), np.full(self.batch, np.inf, np.float32))
                else:
                    b.bind_ortvalue_input(C.cats_tau_in(i), tau)
        elif graph == C.DECODE:
            for n, v in self.selection.items():
                b.bind_ortvalue_input(n, v)
        sess.run_with_iobinding(b)
        return {n: v.numpy() for n, v in zip(names, b.get_outputs())}

    def select(self, out: dict[str, np.ndarray], tokens: int, restart: bool) -> None:
        """GRIFFIN: accumulate the statistic, top-k, fold; CATS: τ (token-weighted mean over prefill calls)."""
        ov = self.ort.OrtValue.ortvalue_from_numpy
        for i in self.lay.layers_of(C.GRIFFIN):
            s = torch.from_numpy(out[C.griffin_stat(i)])
            self.stat_sq[i] = s if restart or i not in self.stat_sq else self.stat_sq[i] + s
            idx, w_gul, w_dr, b_gul = self.folder.fold(i, self.stat_sq[i])
            self.idx[i] = idx
            self.selection[C.w_gul(i)] = ov(w_gul.numpy())
            self.selection[C.w_dr(i)] = ov(w_dr.numpy())
            if b_gul is not None:
                self.selection[C.b_gul(i)] = ov(b_gul.numpy())
        for i in self.lay.layers_of(C.CATS):
            tau = out[C.cats_tau(i)]
            if not restart and i in self.tau:
                old, n = self.tau[i]
                tau, tokens = ((old * n + tau * tokens) / (n + tokens)).astype(np.float32), n + tokens
            self.tau[i] = (tau, tokens)
            self.selection[C.cats_tau(i)] = ov(np.ascontiguousarray(tau, np.float32))

    def greedy(self, prompt: np.ndarray, n_new: int, reselect_every: int = 0):
        """(tokens [B, n_new], logits per step [n_new x [B, V]]) like caprese.model.generation.generate."""
        t = prompt.shape[1]
        out = self.run(C.PREFILL, prompt, 0)
        self.select(out, t, restart=True)
        logits = [out[C.LOGITS][:, -1]]
        token = logits[-1].argmax(-1)
        tokens, fed = [token], []
        for i in range(n_new - 1):
            fed.append(token)
            if reselect_every and len(fed) % reselect_every == 0:
                window = np.stack(fed[-reselect_every:], axis=1)
                out = self.run(C.PREFILL, window, t + i - reselect_every + 1)
                self.select(out, reselect_every, restart=False)
            else:
                out = self.run(C.DECODE, token[:, None], t + i)
            logits.append(out[C.LOGITS][:, -1])
            token = logits[-1].argmax(-1)
            tokens.append(token)
        return np.stack(tokens, axis=1), logits


@contextlib.contextmanager
def one_torch_thread():
    """Tiny models on a shared 2-core box: torch's intra-op threads only add contention (seconds per test)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def reference_greedy(dec, prompt: torch.Tensor, n_new: int, reselect_every: int = 0):
    """(tokens [B, n_new], logits per step) of the PyTorch decoder, same loop shape as OrtLoop.greedy (every
    reselect_every-th step runs the last tokens through a prefill pass, as caprese.model.generation does)."""
    from caprese.model.generation import decode_one_token, prefill

    dec.setup_caches(prompt.shape[0], MAX_SEQ)
    t = prompt.shape[1]
    with torch.inference_mode(), one_torch_thread():
        logits = [prefill(dec, prompt)]
        token = logits[-1].argmax(-1)
        tokens, fed = [token], []
        for i in range(n_new - 1):
            fed.append(token)
            if reselect_every and len(fed) % reselect_every == 0:
                window = torch.stack(fed[-reselect_every:], dim=1)
                logits.append(dec(window, t + i - reselect_every + 1, None, last_only=True, phase="prefill")[:, -1])
            else:
                logits.append(decode_one_token(dec, token[:, None], t + i))
            token = logits[-1].argmax(-1)
            tokens.append(token)
    return torch.stack(tokens, dim=1), logits


def prompt_ids(n: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 320, (batch, n), generator=g)
