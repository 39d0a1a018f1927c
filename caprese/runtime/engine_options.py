"""How to open an engine folder (EngineOptions: the backend and its knobs, what `caprese run` / `chat` /
`generate ENGINE_DIR` build from their flags), and what backend="auto" picks.

auto: on the CPU, native where the engine is one it runs (fp32 precision, a supported activation, float or
int4 / int8 weights in a layout its kernels read: native_backend.native_unsupported) and its C kernel builds or is
built here, else onnxruntime; on CUDA (device "cuda", or no device and torch sees a GPU), tensorrt where the
folder has plans and TensorRT imports, else torch. The Generator records the choice
(`backend_requested`, `backend_reason`) and the report says "backend: native (auto)".
"""

from __future__ import annotations

import dataclasses
import importlib.util

from caprese.errors import CapreseError

AUTO = "auto"


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    backend: str = AUTO  # auto | onnxruntime | native | torch | tensorrt
    threads: int | None = None  # intra-op threads (onnxruntime / native / torch)
    device: str | None = None  # cpu | cuda (onnxruntime / torch; also steers auto); None: cuda where usable
    cuda_graph: bool | None = None  # torch on cuda: capture the decode step (default on)
    head: str | None = None  # native: auto | screened | full (None: the backend's default, auto)
    extra: dict = dataclasses.field(default_factory=dict)  # other backend options (kv_policy, share_weights, ...)
    int8_down: bool = False  # native, an --int8-activations engine: GRIFFIN's down with int8 coefficients

    def backend_options(self, name: str) -> dict:
        """The keyword options of backend `name` these options set (open_backend's **options)."""
        out = dict(self.extra)
        if self.device is not None and name != "tensorrt":
            out["device"] = self.device
        if self.cuda_graph is not None and name == "torch":
            out["cuda_graph"] = self.cuda_graph
        if self.head is not None:
            if name != "native":
                raise CapreseError(f"--full-head applies to --backend native; {name} runs this engine and "
                                   "computes every logit")
            out["head"] = self.head
        if self.int8_down:
            if name != "native":
                raise CapreseError(f"--int8-down applies to --backend native; {name} runs this engine's GRIFFIN down "
                                   "in fp32")
            out["int8_down"] = True
        return out


def choose_backend(manifest, device: str | None = None) -> tuple[str, str]:
    """(backend name, why) for backend="auto" on this machine (module docstring)."""
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not manifest.engines:
            return "torch", "no TensorRT plans in the engine folder"
        if importlib.util.find_spec("tensorrt") is None:
            return "torch", "TensorRT is not installed"
        return "tensorrt", "TensorRT plans on a CUDA device"
    from caprese.runtime.native_backend import native_unsupported

    why = native_unsupported(manifest)
    if why:
        return "onnxruntime", why
    try:
        from caprese.runtime.native import library

        library.load()
    except CapreseError as e:
        return "onnxruntime", f"the native kernel is not available ({e})"
    return "native", "fp32 engine on the CPU"
