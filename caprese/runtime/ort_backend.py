"""ONNX Runtime backend: the engine folder's prefill.onnx and decode.onnx driven with IO binding, batch 1.

OrtGraphs runs the graphs it is given over the shared buffer set (caprese.runtime.buffers): OrtBackend runs
both; the native backend runs the prefill graph with it (prefill, selection and folding) and decodes in C.

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
from caprese.runtime.backend import Backend, PrefillOut
from caprese.runtime.buffers import Buffer, Buffers, graph_buffers
from caprese.runtime.fold import FoldInto

_NP = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int8": np.int8}


def import_onnxruntime():
    try:
        import onnxruntime as ort
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CapreseError(f"the onnxruntime backend needs ONNX Runtime ({reason}); pip install onnxruntime "
                           "(or onnxruntime-gpu)") from None
    return ort


class OrtBuf:
    """A buffer the graphs are bound to (buffers.py's interface): a host numpy array shared with its OrtValue on
    CPU, a device OrtValue (written through update_inplace from the host mirror) on CUDA. Its address never
    changes."""

    def __init__(self, ort, spec: Buffer, device: str):
        if spec.dtype == "int4":  # a quantized layout's GRIFFIN rows (contract.w_gu_q / w_d_q)
            self._int4(ort, spec, device)
            return
        self.host = np.zeros(spec.shape, _NP[spec.dtype])
        if spec.fill is not None:
            self.host.fill(spec.fill)
        self.device = device
        if device == "cpu":
            self.value = ort.OrtValue.ortvalue_from_numpy(self.host)
        else:
            self.value = ort.OrtValue.ortvalue_from_shape_and_type(list(spec.shape), self.host.dtype, "cuda", 0)
            self.value.update_inplace(self.host)

    def _int4(self, ort, spec: Buffer, device: str) -> None:
        """numpy has no int4: the OrtValue owns the memory and the host array is a uint8 view of its packed bytes
        [.., D / 2] (two codes per byte, low nibble first: what FoldInto.quantized_rows copies). CPU only."""
        import ctypes

        import onnx

        if device != "cpu":
            raise CapreseError("int4 per-prompt inputs run on ONNX Runtime's CPU provider only; use --device cpu, or "
                               "export with --float-selection")
        self.device = device
        self.value = ort.OrtValue.ortvalue_from_shape_and_type(list(spec.shape), onnx.TensorProto.INT4)
        packed = tuple(spec.shape[:-1]) + (spec.shape[-1] // 2,)
        raw = (ctypes.c_uint8 * int(np.prod(packed))).from_address(self.value.data_ptr())
        self.host = np.ctypeslib.as_array(raw).reshape(packed)
        self.host[...] = 0

    def write(self, arr) -> None:
        if self.device == "cpu":
            np.copyto(self.host, arr, casting="same_kind")
        else:
            self.value.update_inplace(np.ascontiguousarray(arr, self.host.dtype))

    def read(self) -> np.ndarray:
        return self.host if self.device == "cpu" else self.value.numpy()

    def tensor(self) -> torch.Tensor:
        """The host array as a tensor (shared memory): write it, then sync()."""
        return torch.from_numpy(self.host)

    def sync(self) -> None:
        """After writing the host array: copy it to the device (nothing to do on CPU, it is the buffer)."""
        if self.device != "cpu":
            self.value.update_inplace(self.host)

    def data_ptr(self) -> int:
        return self.value.data_ptr()


class OrtGraphs:
    """ONNX Runtime sessions of some of an engine's graphs (prefill, and decode unless `graphs` leaves it out),
    every buffer bound once (module docstring)."""

    def __init__(self, manifest, graphs: tuple = C.GRAPHS, threads: int | None = None,
                 kv_policy: str | int = "fit", device: str | None = None, share_weights: bool = False,
                 spinning: bool | None = None, stop_spinning: bool = False):
        self.manifest, self.layout = manifest, manifest.layout
        ort = self.ort = import_onnxruntime()
        lay = self.layout
        if lay.dtype not in _NP:
            raise CapreseError(f"the onnxruntime backend cannot run {manifest.spec.precision} engines (ONNX "
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
        # stop_spinning: the pool spins within a run but stops as each run returns (ORT's force_spinning_stop),
        # for a runner whose runs are followed by other work on the same CPUs (the native backend's prefill)
        self.stop_spinning = bool(stop_spinning) and self.spinning
        self.sessions = {g: self._session(g) for g in graphs}
        self.fold = FoldInto(manifest)  # into the host arrays (on CPU: the bound buffers themselves)
        specs = {k: b for k, b in graph_buffers(lay, 0).items() if k not in self._kv_keys()}  # KV: reserve()
        self.buffers = Buffers(lay, specs, lambda spec: OrtBuf(ort, spec, device), manifest.spec.max_seq_len,
                               kv_policy)
        B = self.buffers  # the buffers a step writes or reads (never reallocated: only the KV cache and mask are)
        self._token, self._position = B[f"{C.DECODE}.{C.INPUT_IDS}"], B[f"{C.DECODE}.{C.POSITION_IDS}"]
        self._slot, self._logits = B[C.WRITE_INDICES], B[C.LOGITS]
        self._decode_binding = self._prefill_binding = None

    def _kv_keys(self) -> set:
        return {C.ATTENTION_MASK} | {past for past, _ in self.layout.in_place_pairs()}

    def _session(self, graph: str):
        ort = self.ort
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = self.intra_threads
        opts.inter_op_num_threads = 1
        if not self.spinning:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if self.stop_spinning:
            opts.add_session_config_entry("session.force_spinning_stop", "1")
        if self.share_weights:  # no per-session packed copies: both sessions read the mapped weights.bin
            opts.add_session_config_entry("session.disable_prepacking", "1")
        if self.manifest.layout.quantized:
            # DequantizeLinear of a constant weight (the standard graphs; down on target onnxruntime) is kept by
            # ORT's QDQ handling and runs every step (6.2 ms vs 0.26 for a [1536, 576] int4 weight,
            # tools/bench_quantized_matmul.py); without QDQ handling it is constant-folded once at load.
            # MatMulNBits and the per-prompt GRIFFIN rows are not affected.
            opts.add_session_config_entry("session.disable_quant_qdq", "1")
        path = self.manifest.file(graph)
        try:
            return ort.InferenceSession(str(path), opts, providers=self.providers)
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CapreseError(f"ONNX Runtime cannot load {path}: {msg}") from None

    @property
    def capacity(self) -> int:
        return self.buffers.capacity

    def reserve(self, need: int, keep: int = 0) -> bool:
        """buffers.reserve, then bind the new KV buffers; True if it reallocated."""
        if not self.buffers.reserve(need, keep):
            return False
        self._bind()
        return True

    def _bind(self) -> None:
        """Bind every fixed-address buffer: the whole decode graph, and the prefill graph but its token inputs."""
        present = dict(self.layout.in_place_pairs())
        B = self.buffers
        self._prefill_binding = p = self.sessions[C.PREFILL].io_binding()
        d = self._decode_binding = self.sessions[C.DECODE].io_binding() if C.DECODE in self.sessions else None
        for b in (p,) if d is None else (d, p):
            b.bind_ortvalue_input(C.WRITE_INDICES, self._slot.value)
            b.bind_ortvalue_input(C.ATTENTION_MASK, B[C.ATTENTION_MASK].value)
            for past, value in B.kv.items():
                b.bind_ortvalue_input(past, value.value)
                b.bind_ortvalue_output(present[past], value.value)  # the same OrtValue: updated in place
            b.bind_ortvalue_output(C.LOGITS, self._logits.value)
        for name, value in B.stats.items():
            p.bind_ortvalue_output(name, value.value)
        if d is not None:
            d.bind_ortvalue_input(C.INPUT_IDS, self._token.value)
            d.bind_ortvalue_input(C.POSITION_IDS, self._position.value)
            for name, value in B.selection.items():
                d.bind_ortvalue_input(name, value.value)

    # ---- running ----
    def logits(self) -> torch.Tensor:
        return torch.from_numpy(self._logits.read()[0])  # [1, V]; a view of the bound buffer on CPU

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
        self._slot.write(np.array([start], np.int64))
        self.sessions[C.PREFILL].run_with_iobinding(b)
        # a numpy copy, not torch's clone: torch copies 49k floats on its OpenMP pool, whose threads then spin on into
        # the first decode steps (native backend: 0.98x the time per token with torch on 1 thread)
        return PrefillOut(torch.from_numpy(self._logits.read()[0].copy()), *self.buffers.prefill_stats())

    def select(self, griffin: dict[int, torch.Tensor], tau: dict[int, torch.Tensor]) -> None:
        self.buffers.write_selection(self.fold, griffin, tau)

    def decode(self, token: int, slot: int) -> torch.Tensor:
        if slot >= self.capacity:
            raise RuntimeError(f"decode at slot {slot} past the KV cache ({self.capacity}); reserve first")
        tok, pos, at = self._token, self._position, self._slot
        if self.device == "cpu":  # straight into the bound buffers
            tok.host[0, 0] = token
            pos.host[0, 0] = slot
            at.host[0] = slot
        else:
            tok.write(np.array([[token]], np.int64))
            pos.write(np.array([[slot]], np.int64))
            at.write(np.array([slot], np.int64))
        self.sessions[C.DECODE].run_with_iobinding(self._decode_binding)
        return self.logits()

    def describe(self) -> dict:
        return {"providers": self.providers, "threads": self.intra_threads, "kv_policy": self.kv_policy,
                "share_weights": self.share_weights, "spinning": self.spinning,
                "stop_spinning": self.stop_spinning}


class OrtBackend(Backend):
    name = "onnxruntime"

    def __init__(self, manifest, threads: int | None = None, kv_policy: str | int = "fit", device: str | None = None,
                 share_weights: bool = False, spinning: bool | None = None):
        super().__init__(manifest)
        self.graphs = OrtGraphs(manifest, C.GRAPHS, threads, kv_policy, device, share_weights, spinning)
        self.device, self.buffers, self.kv_policy = self.graphs.device, self.graphs.buffers, kv_policy

    def reserve(self, need: int, keep: int = 0) -> None:
        self.graphs.reserve(need, keep)
        self.capacity = self.graphs.capacity

    def prefill(self, ids: list[int], start: int) -> PrefillOut:
        return self.graphs.prefill(ids, start)

    def select(self, griffin: dict[int, torch.Tensor], tau: dict[int, torch.Tensor]) -> None:
        self.graphs.select(griffin, tau)

    def decode(self, token: int, slot: int) -> torch.Tensor:
        return self.graphs.decode(token, slot)

    def describe(self) -> dict:
        return self.graphs.describe()


__all__ = ["OrtBackend", "OrtGraphs", "OrtBuf", "import_onnxruntime"]
