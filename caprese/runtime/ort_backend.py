"""ONNX Runtime backend: the engine folder's prefill.onnx and decode.onnx driven with IO binding, batch 1.

- Every buffer a graph reads or writes is allocated by this class and bound by address: the KV cache (one
  [1, H_kv, S, D] OrtValue per layer for K and V, `present_*` bound to the very OrtValue `past_*` reads, so
  TensorScatter updates it in place), the logits, the prefill statistics, and the decode graph's persistent
  selection inputs (w_gul / w_dr / b_gul, cats_tau). The decode binding is made once per KV allocation; a step
  only writes the token id, its position and its slot into buffers that are already bound.
- The KV cache is sized to the need (kv_slots "fit": ONNX Runtime's CPU Attention costs time per allocated
  slot) when a generation starts, and grown (keeping the cached slots) only when a chat turn needs more; it is
  never reallocated between decode steps. kv_policy="max" allocates max_seq_len slots once.
- CUDA: CUDAExecutionProvider when onnxruntime-gpu provides it (device="cuda"); the buffers then live on the
  GPU and host values reach them with OrtValue.update_inplace. Untested here (no GPU).
- Weights: by default each session keeps its own prepacked copy of the MatMul weights (two copies of the model in
  memory). share_weights=True turns prepacking off: ONNX Runtime then memory-maps weights.bin (every tensor is
  page-aligned) and both sessions read the same page-cache pages, so no private copy at all. Measured here
  (ORT 1.32, CPU, a 94 MB fp32 model): private memory 372 -> 186 MB, but decode +22% and prefill +50% per
  call, hence off by default. (Handing both sessions OrtValues over one np.memmap with
  SessionOptions.add_external_initializers does not share: ORT copies them, +145 MB.)
"""

from __future__ import annotations

import numpy as np
import torch

from caprese import cpu_threads
from caprese.errors import CapreseError
from caprese.export import contract as C
from caprese.runtime.backend import Backend, PrefillOut, kv_slots
from caprese.runtime.fold import FoldInto
from caprese.runtime.traffic import SELECTION_INPUTS

_NP = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int8": np.int8}


def import_onnxruntime():
    try:
        import onnxruntime as ort
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CapreseError(f"the onnxruntime backend needs ONNX Runtime ({reason}); pip install onnxruntime "
                           "(or onnxruntime-gpu)") from None
    return ort


class _Buf:
    """A buffer the graphs are bound to: a host numpy array shared with its OrtValue on CPU, a device OrtValue
    (written through update_inplace) on CUDA. Its address never changes."""

    def __init__(self, ort, shape, dtype, device: str):
        self.host = np.zeros(shape, dtype)
        self.device = device
        if device == "cpu":
            self.value = ort.OrtValue.ortvalue_from_numpy(self.host)
        else:
            self.value = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, "cuda", 0)
            self.value.update_inplace(self.host)

    def write(self, arr) -> None:
        if self.device == "cpu":
            np.copyto(self.host, arr, casting="same_kind")
        else:
            self.value.update_inplace(np.ascontiguousarray(arr, self.host.dtype))

    def read(self) -> np.ndarray:
        return self.host if self.device == "cpu" else self.value.numpy()

    def torch_host(self) -> torch.Tensor:
        """The host array as a tensor (shared memory): write it, then sync()."""
        return torch.from_numpy(self.host)

    def sync(self) -> None:
        """After writing the host array: copy it to the device (nothing to do on CPU, it is the buffer)."""
        if self.device != "cpu":
            self.value.update_inplace(self.host)

    def data_ptr(self) -> int:
        return self.value.data_ptr()


class _Int4Buf(_Buf):
    """An int4 buffer (a quantized layout's GRIFFIN rows, contract.w_gu_q / w_d_q): the OrtValue owns the memory,
    the host array is a uint8 view of its packed bytes [.., D / 2] (numpy has no int4). CPU only."""

    def __init__(self, ort, shape, device: str):
        if device != "cpu":
            raise CapreseError("int4 per-prompt inputs run on the CPU provider only; use --device cpu")
        import ctypes

        import onnx

        self.device = device
        self.value = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), onnx.TensorProto.INT4)
        packed = tuple(shape[:-1]) + (shape[-1] // 2,)
        raw = (ctypes.c_uint8 * int(np.prod(packed))).from_address(self.value.data_ptr())
        self.host = np.ctypeslib.as_array(raw).reshape(packed)
        self.host[...] = 0


class OrtBackend(Backend):
    name = "onnxruntime"
    graphs = C.GRAPHS  # the sessions this backend opens (the native backend runs its own decode step)

    def __init__(self, manifest, threads: int | None = None, kv_policy: str | int = "fit", device: str | None = None,
                 share_weights: bool = False, spinning: bool | None = None):
        super().__init__(manifest)
        ort = self.ort = import_onnxruntime()
        lay = self.layout
        if lay.dtype not in _NP:
            raise CapreseError(f"the onnxruntime backend cannot run {manifest.data['precision']} engines (ONNX "
                               "Runtime has no bfloat16 CPU kernels); export with --precision fp32 or fp16")
        available = ort.get_available_providers()
        if device is None:
            device = "cuda" if "CUDAExecutionProvider" in available else "cpu"
        if device == "cuda" and "CUDAExecutionProvider" not in available:
            raise CapreseError("device cuda needs onnxruntime-gpu (CUDAExecutionProvider is not available here)")
        if device not in ("cpu", "cuda"):
            raise CapreseError(f"unknown onnxruntime device {device!r}; use cpu or cuda")
        self.device = device
        self.providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else \
            ["CPUExecutionProvider"]
        self.threads, self.kv_policy, self.share_weights = threads, kv_policy, share_weights
        # CPU: one thread per free CPU unless told (caprese.cpu_threads); ORT's own default is every core. Its
        # pool spins between ops (ORT's default, ~20% faster when idle: docs/performance.md) when the count is
        # explicit or every usable CPU was free; a pool sized around busy CPUs blocks instead, since spinning
        # workers next to other work cost 1.5-4.4x (tools/bench_threads.py). spinning=True/False forces it.
        self.intra_threads = cpu_threads.resolve(threads) if device == "cpu" else int(threads or 0)
        if spinning is None:
            spinning = bool(threads) or device != "cpu" or self.intra_threads >= cpu_threads.usable_cpus()
        self.spinning = bool(spinning)
        self.sessions = {g: self._session(g) for g in self.graphs}
        self.dtype = _NP[lay.dtype]
        self.fold = FoldInto(manifest)  # into the host arrays (on CPU: the bound buffers themselves)
        buf = self._buf
        self.logits = buf((1, 1, lay.vocab_size), np.float32)
        self.stats = {C.griffin_stat(i): buf((1, lay.intermediate_size), np.float32) for i in lay.layers_of(C.GRIFFIN)}
        self.stats.update({C.cats_tau(i): buf((1,), np.float32) for i in lay.layers_of(C.CATS)})
        # decode inputs, filled by select() in place
        self.selection: dict[str, _Buf] = {}
        for spec in lay.inputs(C.DECODE):
            if spec.name.startswith(SELECTION_INPUTS):
                shape = tuple(1 if isinstance(d, str) else d for d in spec.shape)
                self.selection[spec.name] = _Int4Buf(ort, shape, self.device) if spec.dtype == "int4" else \
                    buf(shape, _NP[spec.dtype])
        self.token, self.position, self.slot = buf((1, 1), np.int64), buf((1, 1), np.int64), buf((1,), np.int64)
        self.kv: dict[str, _Buf] = {}
        self.mask: _Buf | None = None
        self._decode_binding = self._prefill_binding = None

    # ---- setup ----
    def _buf(self, shape, dtype) -> _Buf:
        return _Buf(self.ort, shape, dtype, self.device)

    def _session(self, graph: str):
        ort = self.ort
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = self.intra_threads
        opts.inter_op_num_threads = 1
        if not self.spinning:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if self.manifest.layout.quantized:
            # DequantizeLinear of a constant weight (the standard graphs; down on target onnxruntime) is kept by
            # ORT's QDQ handling and runs every step (6.2 ms vs 0.26 for a [1536, 576] int4 weight,
            # tools/bench_quantized_matmul.py); without QDQ handling it is constant-folded once at load.
            # MatMulNBits and the per-prompt GRIFFIN rows are not affected.
            opts.add_session_config_entry("session.disable_quant_qdq", "1")
        if self.share_weights:  # no per-session packed copies: both sessions read the mapped weights.bin
            opts.add_session_config_entry("session.disable_prepacking", "1")
        path = self.manifest.file(graph)
        try:
            return ort.InferenceSession(str(path), opts, providers=self.providers)
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CapreseError(f"ONNX Runtime cannot load {path}: {msg}") from None

    def reserve(self, need: int, keep: int = 0) -> None:
        cap = kv_slots(need, self.manifest.data["max_seq_len"], self.kv_policy)
        if self.capacity >= need and (keep > 0 or cap == self.capacity):
            return
        lay = self.layout
        shape = (1, lay.num_kv_heads, cap, lay.head_dim)
        old, self.kv = self.kv, {}
        for past, _ in lay.in_place_pairs():
            b = self._buf(shape, self.dtype)
            if keep and past in old:
                n = min(keep, cap, self.capacity)
                b.write(np.concatenate([old[past].read()[:, :, :n], b.host[:, :, n:]], axis=2))
            self.kv[past] = b
        self.mask = self._buf((1, cap), np.int64)
        self.mask.write(np.ones((1, cap), np.int64))  # batch 1: every slot is (or will be) a real token
        self.capacity = cap
        self._bind()

    def _bind(self) -> None:
        """Bind every fixed-address buffer: the whole decode graph, and the prefill graph but its token inputs."""
        present = dict(self.layout.in_place_pairs())
        self._prefill_binding = p = self.sessions[C.PREFILL].io_binding()
        d = self._decode_binding = self.sessions[C.DECODE].io_binding() if C.DECODE in self.sessions else None
        for b in (p,) if d is None else (d, p):
            b.bind_ortvalue_input(C.WRITE_INDICES, self.slot.value)
            b.bind_ortvalue_input(C.ATTENTION_MASK, self.mask.value)
            for past, value in self.kv.items():
                b.bind_ortvalue_input(past, value.value)
                b.bind_ortvalue_output(present[past], value.value)  # the same OrtValue: updated in place
            b.bind_ortvalue_output(C.LOGITS, self.logits.value)
        for name, value in self.stats.items():
            p.bind_ortvalue_output(name, value.value)
        if d is not None:
            d.bind_ortvalue_input(C.INPUT_IDS, self.token.value)
            d.bind_ortvalue_input(C.POSITION_IDS, self.position.value)
            for name, value in self.selection.items():
                d.bind_ortvalue_input(name, value.value)

    # ---- running ----
    def _logits(self) -> torch.Tensor:
        return torch.from_numpy(self.logits.read()[0])  # [1, V]; a view of the bound buffer on CPU

    def prefill(self, ids: list[int], start: int) -> PrefillOut:
        n = len(ids)
        if start + n > self.capacity:
            raise RuntimeError(f"prefill to slot {start + n} past the KV cache ({self.capacity}); reserve first")
        ids_np = np.asarray([ids], np.int64)
        pos_np = np.arange(start, start + n, dtype=np.int64)[None]
        if self.device == "cpu":
            ids_v, pos_v = self.ort.OrtValue.ortvalue_from_numpy(ids_np), self.ort.OrtValue.ortvalue_from_numpy(pos_np)
        else:
            ids_v = self.ort.OrtValue.ortvalue_from_numpy(ids_np, "cuda", 0)
            pos_v = self.ort.OrtValue.ortvalue_from_numpy(pos_np, "cuda", 0)
        b = self._prefill_binding
        b.bind_ortvalue_input(C.INPUT_IDS, ids_v)
        b.bind_ortvalue_input(C.POSITION_IDS, pos_v)
        self.slot.write(np.array([start], np.int64))
        self.sessions[C.PREFILL].run_with_iobinding(b)
        lay = self.layout
        griffin = {i: torch.from_numpy(self.stats[C.griffin_stat(i)].read().copy()) for i in lay.layers_of(C.GRIFFIN)}
        tau = {i: torch.from_numpy(self.stats[C.cats_tau(i)].read().copy()) for i in lay.layers_of(C.CATS)}
        return PrefillOut(self._logits().clone(), griffin, tau)

    def select(self, griffin: dict[int, torch.Tensor], tau: dict[int, torch.Tensor]) -> None:
        for i, stat in griffin.items():
            if C.w_gu_q(i) in self.selection:  # quantized rows (contract.py), gathered whole from weights.bin
                names = [n for n in (C.w_gu_q(i), C.w_gu_s(i), C.w_d_q(i), C.w_d_s(i), C.b_gul(i))
                         if n in self.selection]
                self.fold.quantized_rows(i, stat, {n: self.selection[n].torch_host() for n in names})
                for n in names:
                    self.selection[n].sync()
                continue
            bufs = [self.selection[C.w_gul(i)], self.selection[C.w_dr(i)]]
            if C.b_gul(i) in self.selection:
                bufs.append(self.selection[C.b_gul(i)])
            self.fold(i, stat, *(b.torch_host() for b in bufs))
            for b in bufs:
                b.sync()
        for i, t in tau.items():
            self.selection[C.cats_tau(i)].write(t.numpy().astype(np.float32))

    def decode(self, token: int, slot: int) -> torch.Tensor:
        if slot >= self.capacity:
            raise RuntimeError(f"decode at slot {slot} past the KV cache ({self.capacity}); reserve first")
        if self.device == "cpu":  # straight into the bound buffers
            self.token.host[0, 0] = token
            self.position.host[0, 0] = slot
            self.slot.host[0] = slot
        else:
            self.token.write(np.array([[token]], np.int64))
            self.position.write(np.array([[slot]], np.int64))
            self.slot.write(np.array([slot], np.int64))
        self.sessions[C.DECODE].run_with_iobinding(self._decode_binding)
        return self._logits()

    def describe(self) -> dict:
        return {"providers": self.providers, "threads": self.intra_threads, "kv_policy": self.kv_policy,
                "share_weights": self.share_weights, "spinning": self.spinning}
