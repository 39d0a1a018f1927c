"""TensorRT backend: the engine folder's prefill.plan / decode.plan (from `caprese-export --engine`), batch 1.

Written against the documented TensorRT 10.x Python API; TensorRT cannot be installed on our CPU machines, so
this module is UNTESTED here (its tests are marked `tensorrt` and `gpu` and skip). TensorRT is imported lazily.
- Plans are weight-stripped by default: each engine is refitted from its .onnx (weights.bin) after
  deserializing (trt.Refitter + trt.OnnxParserRefitter), as caprese.export.tensorrt_build documents.
- Every I/O tensor is a torch CUDA tensor allocated here; addresses are bound once per KV allocation with
  IExecutionContext.set_tensor_address, present_* at the same address as past_* (in-place cache update).
  The prefill token inputs are [1, max_prompt_len] buffers: a call binds the same address and only sets the
  input shape to [1, n].
- Decode: execute_async_v3 on one CUDA stream; with cuda_graph=True (default) the step is captured once into a
  CUDA graph (shapes and addresses are fixed) and replayed; the token, its position and its slot are written
  into the bound device buffers before each replay. Logits stay on the GPU: the Generator samples there and
  copies one token id back per step.
"""

from __future__ import annotations

import torch

from caprese.errors import CapreseError
from caprese.export import contract as C
from caprese.runtime.backend import Backend, PrefillOut, kv_slots
from caprese.runtime.fold import FoldInto
from caprese.runtime.traffic import SELECTION_INPUTS

_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64}


class TensorRTBackend(Backend):
    name = "tensorrt"
    device = logits_device = "cuda"

    def __init__(self, manifest, threads: int | None = None, kv_policy: str | int = "max", cuda_graph: bool = True,
                 device: str | None = None):
        from caprese.export.tensorrt_build import import_tensorrt

        super().__init__(manifest)
        if manifest.data.get("target", C.TARGET_TENSORRT) != C.TARGET_TENSORRT:
            raise CapreseError(f"{manifest.folder} holds ONNX Runtime-only graphs (--target onnxruntime); export "
                               "again without --target for TensorRT, or use --backend onnxruntime")
        trt = self.trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise CapreseError("the tensorrt backend needs an NVIDIA GPU visible to torch (torch.cuda.is_available() "
                               "is False)")
        plans = manifest.engines
        if set(plans) != set(C.GRAPHS):
            raise CapreseError(f"{manifest.folder} has no TensorRT plans; export it with --engine on a machine with "
                               "TensorRT, or use --backend onnxruntime")
        info = manifest.data.get("tensorrt") or {}
        if str(info.get("version")) != str(trt.__version__):
            raise CapreseError(f"the plans in {manifest.folder} were built with TensorRT {info.get('version')}, this "
                               f"is {trt.__version__}; export again with --engine here")
        cc = "%d.%d" % torch.cuda.get_device_capability()
        if info.get("compute_capability") and info["compute_capability"] != cc:
            raise CapreseError(f"the plans were built for GPU compute capability {info['compute_capability']}, this "
                               f"GPU is {cc}; export again with --engine here")
        self.kv_policy, self.use_graph = kv_policy, cuda_graph
        self.logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self.logger)
        self.engines, self.contexts = {}, {}
        for g in C.GRAPHS:
            engine = runtime.deserialize_cuda_engine(plans[g].read_bytes())
            if engine is None:
                raise CapreseError(f"TensorRT could not deserialize {plans[g].name}; export again with --engine")
            if info.get("weights_stripped"):
                self._refit(engine, manifest.file(g))
            self.engines[g] = engine
            self.contexts[g] = engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        lay, dev = self.layout, "cuda"
        self.dtype = _TORCH[lay.dtype]
        self.fold = FoldInto(manifest, "cuda")  # gathers on the GPU, straight into the bound buffers
        z = lambda shape, dt: torch.zeros(shape, dtype=dt, device=dev)  # noqa: E731
        self.logits = z((1, 1, lay.vocab_size), torch.float32)
        self.stats = {C.griffin_stat(i): z((1, lay.intermediate_size), torch.float32) for i in lay.layers_of(C.GRIFFIN)}
        self.stats.update({C.cats_tau(i): z((1,), torch.float32) for i in lay.layers_of(C.CATS)})
        self.selection = {s.name: z(tuple(1 if isinstance(d, str) else d for d in s.shape), _TORCH[s.dtype])
                          for s in lay.inputs(C.DECODE) if s.name.startswith(SELECTION_INPUTS)}
        p = int(manifest.data["max_prompt_len"])
        self.prefill_ids, self.prefill_pos = z((1, p), torch.int64), z((1, p), torch.int64)
        self.token, self.position, self.slot = z((1, 1), torch.int64), z((1, 1), torch.int64), z((1,), torch.int64)
        self.kv: dict[str, torch.Tensor] = {}
        self.mask = None
        self.graph = None

    def _refit(self, engine, onnx_path) -> None:
        trt = self.trt
        refitter = trt.Refitter(engine, self.logger)
        parser = trt.OnnxParserRefitter(refitter, self.logger)
        if not parser.refit_from_file(str(onnx_path)) or not refitter.refit_cuda_engine():
            raise CapreseError(f"TensorRT could not refit the weight-stripped plan from {onnx_path.name}; export again")

    def reserve(self, need: int, keep: int = 0) -> None:
        cap = kv_slots(need, self.manifest.data["max_seq_len"], self.kv_policy)
        if self.capacity >= need and (keep > 0 or cap == self.capacity):
            return
        torch.cuda.synchronize()
        lay = self.layout
        old, self.kv = self.kv, {}
        for past, _ in lay.in_place_pairs():
            t = torch.zeros((1, lay.num_kv_heads, cap, lay.head_dim), dtype=self.dtype, device="cuda")
            if keep and past in old:
                n = min(keep, cap, self.capacity)
                t[:, :, :n] = old[past][:, :, :n]
            self.kv[past] = t
        self.mask = torch.ones((1, cap), dtype=torch.int64, device="cuda")
        self.capacity = cap
        self._bind()

    def _bind(self) -> None:
        present = dict(self.layout.in_place_pairs())
        for g, ctx in self.contexts.items():
            tensors = {C.WRITE_INDICES: self.slot, C.ATTENTION_MASK: self.mask, C.LOGITS: self.logits}
            for past, t in self.kv.items():
                tensors[past] = tensors[present[past]] = t  # the same address: TensorScatter writes in place
            if g == C.DECODE:
                tensors.update({C.INPUT_IDS: self.token, C.POSITION_IDS: self.position, **self.selection})
            else:
                tensors.update({C.INPUT_IDS: self.prefill_ids, C.POSITION_IDS: self.prefill_pos, **self.stats})
            for name, t in tensors.items():
                ctx.set_tensor_address(name, t.data_ptr())
            for spec in self.layout.inputs(g):
                if spec.name not in (C.INPUT_IDS, C.POSITION_IDS) or g == C.DECODE:
                    ctx.set_input_shape(spec.name, tuple(tensors[spec.name].shape))
        self.graph = None  # addresses changed: capture again

    def _execute(self, graph: str) -> None:
        if not self.contexts[graph].execute_async_v3(self.stream.cuda_stream):
            raise CapreseError(f"TensorRT failed to run the {graph} engine")

    def prefill(self, ids: list[int], start: int) -> PrefillOut:
        n = len(ids)
        ctx = self.contexts[C.PREFILL]
        with torch.cuda.stream(self.stream):
            self.prefill_ids[0, :n].copy_(torch.tensor(ids, dtype=torch.int64), non_blocking=False)
            self.prefill_pos[0, :n].copy_(torch.arange(start, start + n, dtype=torch.int64))
            self.slot.fill_(start)
            ctx.set_input_shape(C.INPUT_IDS, (1, n))
            ctx.set_input_shape(C.POSITION_IDS, (1, n))
            self._execute(C.PREFILL)
        self.stream.synchronize()
        lay = self.layout
        griffin = {i: self.stats[C.griffin_stat(i)].cpu().clone() for i in lay.layers_of(C.GRIFFIN)}
        tau = {i: self.stats[C.cats_tau(i)].cpu().clone() for i in lay.layers_of(C.CATS)}
        return PrefillOut(self.logits[0].clone(), griffin, tau)

    def select(self, griffin: dict[int, torch.Tensor], tau: dict[int, torch.Tensor]) -> None:
        with torch.cuda.stream(self.stream):
            for i, stat in griffin.items():
                self.fold(i, stat, self.selection[C.w_gul(i)], self.selection[C.w_dr(i)],
                          self.selection.get(C.b_gul(i)))
            for i, t in tau.items():
                self.selection[C.cats_tau(i)].copy_(t)
        self.stream.synchronize()

    def decode(self, token: int, slot: int) -> torch.Tensor:
        with torch.cuda.stream(self.stream):
            self.token.fill_(token)
            self.position.fill_(slot)
            self.slot.fill_(slot)
            if self.use_graph and self.graph is None:
                self._capture()
            if self.graph is not None:
                self.graph.replay()
            else:
                self._execute(C.DECODE)
        self.stream.synchronize()
        return self.logits[0]

    def _capture(self) -> None:
        """Capture one decode step into a CUDA graph (after a warm-up run, as TensorRT asks); on failure, run
        without graphs."""
        try:
            self._execute(C.DECODE)  # warm-up: TensorRT allocates lazily on the first run
            self.stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream):
                self._execute(C.DECODE)
            self.graph = graph
        except Exception:
            self.use_graph, self.graph = False, None

    def peak_device_mb(self) -> float | None:
        extra = sum(int(getattr(e, "device_memory_size_v2", getattr(e, "device_memory_size", 0)) or 0)
                    for e in self.engines.values())
        return (torch.cuda.max_memory_allocated() + extra) / 2**20

    def describe(self) -> dict:
        return {"tensorrt": str(self.trt.__version__), "cuda_graph": self.graph is not None,
                "kv_policy": self.kv_policy}
