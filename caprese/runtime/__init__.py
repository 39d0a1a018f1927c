"""caprese.runtime: run an engine folder from `caprese-export` on ONNX Runtime, the native CPU kernel, PyTorch or
TensorRT.

    from caprese.runtime import Generator
    g = Generator.load("engine_dir", backend="onnxruntime")
    print(g.generate("What is 12 + 7?", chat=True, max_new_tokens=64).text)

Modules: generator (the decode loop, text in / text out), conversation (multi-turn chat reusing the KV cache),
backend (the interface and the registry) with ort_backend / native_backend (+ native/: the C decode step) /
torch_backend / tensorrt_backend, selection
(GRIFFIN / CATS statistics over prefill calls), fold (GRIFFIN folding into the bound buffers), stats (the
latency report), traffic (bytes per decode step). See README.md.
"""

from caprese.model.run_options import RunOptions
from caprese.runtime.engine_options import EngineOptions
from caprese.runtime.generator import Generator, RuntimeResult, TextStream

__all__ = ["Generator", "RuntimeResult", "TextStream", "RunOptions", "EngineOptions"]
