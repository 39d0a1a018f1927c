"""TensorRT backend: the engine folder's plans (from `caprese-export --engine`), batch 1.

Written against the documented TensorRT 10.x Python API; TensorRT cannot be installed on our CPU machines, so the
TensorRT calls here are UNTESTED here (tests/test_tensorrt_gpu.py, marked `tensorrt` and `gpu`, runs them on a
GPU runner); what they bind to what is plain code, tested everywhere (caprese.runtime.tensorrt_plan).
- Engines: dense, CATS and BYPASS folders hold ONE engine with two optimization profiles (the weights are on the GPU
  once); the prefill and the decode execution contexts select profile 0 and 1 once, at creation. GRIFFIN folders
  hold two engines. The trt.Runtime that deserialized them lives as long as they do (self.runtime).
- Plans are weight-stripped by default: each engine is refitted from the ONNX file it was built from
  (trt.Refitter + trt.OnnxParserRefitter) after deserializing, as caprese.export.tensorrt_build documents.
- Every buffer is a torch CUDA tensor allocated once, at construction; the KV cache at the engines' STATIC length
  (max_seq_len: the graphs' IKVCacheUpdateLayer needs it), bound to past_* and present_* at the same address.
  Addresses are set once; a prefill call only sets its token inputs' shape to [1, n].
- Decode: execute_async_v3 on one CUDA stream; with cuda_graph=True (default) the step is captured once into a
  CUDA graph and replayed, the token, position and slot written into the bound buffers before each replay. A
  failed capture is logged once (logging, caprese.runtime.tensorrt_backend) and decode runs without a graph;
  the CATS shared engine is expected to fail it (its If makes TensorRT copy the condition to the host,
  NVIDIA/TensorRT#2836). Logits stay on the GPU: the Generator samples there.
"""

from __future__ import annotations

import logging

import torch

from caprese.errors import CapreseError
from caprese.export import contract as C
from caprese.runtime.backend import Backend, PrefillOut
from caprese.runtime.buffers import STATIC, Buffers, TensorBuf
from caprese.runtime.fold import FoldInto
from caprese.runtime.tensorrt_plan import binding_plan

_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64,
          "bool": torch.bool}
log = logging.getLogger(__name__)


class TensorRTBackend(Backend):
    name = "tensorrt"
    device = logits_device = "cuda"

    def __init__(self, manifest, threads: int | None = None, kv_policy: str | int = "max", cuda_graph: bool = True,
                 device: str | None = None):
        from caprese.export.tensorrt_build import import_tensorrt

        super().__init__(manifest)
        if manifest.spec.target != C.TARGET_TENSORRT:
            raise CapreseError(f"{manifest.folder} holds ONNX Runtime-only graphs (--target onnxruntime); export "
                               "again without --target for TensorRT, or use --backend onnxruntime")
        trt = self.trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise CapreseError("the tensorrt backend needs an NVIDIA GPU visible to torch (torch.cuda.is_available() "
                               "is False)")
        record = manifest.data.get("tensorrt_graphs")
        plans = manifest.engines
        if not record or not plans or set(plans) != set(record["engines"]):
            raise CapreseError(f"{manifest.folder} has no TensorRT plans for its TensorRT graphs; export it with "
                               "--engine on a machine with TensorRT, or use --backend onnxruntime")
        self.cache_len = int(record["cache_len"])
        if kv_policy not in ("max", self.cache_len):
            raise CapreseError(f"the tensorrt backend's KV cache has the engines' static length {self.cache_len} "
                               f"(kv_policy 'max'); got {kv_policy!r}")
        info = manifest.data.get("tensorrt") or {}
        if str(info.get("version")) != str(trt.__version__):
            raise CapreseError(f"the plans in {manifest.folder} were built with TensorRT {info.get('version')}, this "
                               f"is {trt.__version__}; export again with --engine here")
        cc = "%d.%d" % torch.cuda.get_device_capability()
        if info.get("compute_capability") and info["compute_capability"] != cc:
            raise CapreseError(f"the plans were built for GPU compute capability {info['compute_capability']}, this "
                               f"GPU is {cc}; export again with --engine here")
        self.kv_policy, self.use_graph = "max", cuda_graph
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)  # kept: engines must not outlive the runtime that made them
        self.engines = {}
        for name, plan in plans.items():
            engine = self.runtime.deserialize_cuda_engine(plan.read_bytes())
            if engine is None:
                raise CapreseError(f"TensorRT could not deserialize {plan.name}; export again with --engine")
            if info.get("weights_stripped"):
                self._refit(engine, manifest.tensorrt_graphs[name])
            self.engines[name] = engine
        self.stream = torch.cuda.Stream()
        specs, self.roles = binding_plan(self.layout, self.cache_len, manifest.spec.max_prompt_len)
        self.buffers = Buffers(self.layout, specs, lambda b: TensorBuf(self._alloc(b)), manifest.spec.max_seq_len,
                               STATIC)
        self.buf = {k: b.tensor() for k, b in self.buffers.bufs.items()}  # the bound tensors by key
        self.contexts = {role: self._context(b) for role, b in self.roles.items()}
        self.fold = FoldInto(manifest, "cuda")  # gathers on the GPU, straight into the bound buffers
        self.capacity = self.cache_len
        self.graph, self.graph_error = None, None

    # ---- setup ----
    def _refit(self, engine, onnx_path) -> None:
        trt = self.trt
        refitter = trt.Refitter(engine, self.logger)
        parser = trt.OnnxParserRefitter(refitter, self.logger)
        if not parser.refit_from_file(str(onnx_path)) or not refitter.refit_cuda_engine():
            raise CapreseError(f"TensorRT could not refit the weight-stripped plan from {onnx_path.name}; export again")

    @staticmethod
    def _alloc(b) -> torch.Tensor:
        t = torch.zeros(b.shape, dtype=_TORCH[b.dtype], device="cuda")
        if b.fill is not None:
            t.fill_(b.fill)
        return t

    def _context(self, binding):
        """An execution context of the role's engine on the role's profile, every tensor bound once."""
        ctx = self.engines[binding.engine].create_execution_context()
        if ctx is None:
            raise CapreseError(f"TensorRT could not create an execution context for the {binding.role} role "
                               "(out of GPU memory?)")
        if self.engines[binding.engine].num_optimization_profiles > 1:
            if not ctx.set_optimization_profile_async(binding.profile, self.stream.cuda_stream):
                raise CapreseError(f"TensorRT refused optimization profile {binding.profile} for the {binding.role} "
                                   "role; export again with --engine")
            self.stream.synchronize()
        for name, key in binding.tensors.items():
            ctx.set_tensor_address(name, self.buf[key].data_ptr())
        for name, shape in binding.input_shapes.items():
            ctx.set_input_shape(name, shape)
        return ctx

    def reserve(self, need: int, keep: int = 0) -> None:
        """The cache is allocated once, at the engines' static length; only check that `need` fits."""
        self.buffers.reserve(need, keep)

    # ---- running ----
    def _execute(self, role: str) -> None:
        if not self.contexts[role].execute_async_v3(self.stream.cuda_stream):
            raise CapreseError(f"TensorRT failed to run the {role} role")

    def prefill(self, ids: list[int], start: int) -> PrefillOut:
        n = len(ids)
        b = self.roles[C.PREFILL]
        ctx = self.contexts[C.PREFILL]
        ids_buf, pos_buf = self.buf[b.tensors[C.INPUT_IDS]], self.buf[b.tensors[C.POSITION_IDS]]
        if not 1 <= n <= ids_buf.shape[1] or start + n > self.cache_len:
            raise RuntimeError(f"prefill of {n} tokens at slot {start} does not fit the engine "
                               f"({ids_buf.shape[1]} prompt tokens, {self.cache_len} slots)")
        with torch.cuda.stream(self.stream):
            ids_buf[0, :n].copy_(torch.tensor(ids, dtype=torch.int64))
            pos_buf[0, :n].copy_(torch.arange(start, start + n, dtype=torch.int64))
            self.buf[C.WRITE_INDICES].fill_(start)
            for name in b.per_call:
                ctx.set_input_shape(name, (1, n))
            self._execute(C.PREFILL)
        self.stream.synchronize()
        return PrefillOut(self.buf[C.LOGITS][0].clone(), *self.buffers.prefill_stats())

    def select(self, griffin: dict[int, torch.Tensor], tau: dict[int, torch.Tensor]) -> None:
        with torch.cuda.stream(self.stream):
            self.buffers.write_selection(self.fold, griffin, tau)
        self.stream.synchronize()

    def decode(self, token: int, slot: int) -> torch.Tensor:
        if slot >= self.cache_len:
            raise RuntimeError(f"decode at slot {slot} past the static KV length {self.cache_len}")
        t = self.roles[C.DECODE].tensors
        with torch.cuda.stream(self.stream):
            self.buf[t[C.INPUT_IDS]].fill_(token)
            self.buf[t[C.POSITION_IDS]].fill_(slot)
            self.buf[C.WRITE_INDICES].fill_(slot)
            if self.use_graph and self.graph is None and self.graph_error is None:
                self._capture()
            if self.graph is not None:
                self.graph.replay()
            else:
                self._execute(C.DECODE)
        self.stream.synchronize()
        return self.buf[C.LOGITS][0]

    def _capture(self) -> None:
        """Capture one decode step into a CUDA graph (after a warm-up run, as TensorRT asks). A failure is logged
        once and decode runs without a graph from then on (describe() reports why)."""
        self._execute(C.DECODE)  # warm-up: TensorRT allocates lazily on the first run
        self.stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self.stream):
                ok = self.contexts[C.DECODE].execute_async_v3(self.stream.cuda_stream)
            if not ok:
                raise RuntimeError("execute_async_v3 returned False under stream capture")
        except Exception as e:  # noqa: BLE001 - any capture failure falls back to plain execution, loudly
            self.graph_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log.warning("TensorRT decode step could not be captured as a CUDA graph (%s); running it without one",
                        self.graph_error)
            return
        self.graph = graph

    def peak_device_mb(self) -> float | None:
        """torch's peak (buffers, KV cache) + each context's activation memory + the engines' weights."""
        ctx_mem = sum(int(getattr(e, "device_memory_size_v2", getattr(e, "device_memory_size", 0)) or 0)
                      for e in (self.engines[b.engine] for b in self.roles.values()))
        weights = sum(((self.manifest.data.get("tensorrt_graphs") or {}).get("memory") or {})
                      .get("weights_bytes", {}).values())
        return (torch.cuda.max_memory_allocated() + ctx_mem + weights) / 2**20

    def describe(self) -> dict:
        return {"tensorrt": str(self.trt.__version__), "engines": sorted(self.engines),
                "cuda_graph": self.graph is not None, "cuda_graph_error": self.graph_error,
                "kv_slots": self.cache_len}
