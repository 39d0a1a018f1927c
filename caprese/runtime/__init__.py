"""caprese.runtime: run an engine folder from `caprese-export` on ONNX Runtime, the native CPU kernel, PyTorch or
TensorRT.

    from caprese.runtime import Generator
    g = Generator.load("engine_dir", backend="onnxruntime")
    print(g.generate("What is 12 + 7?", chat=True, max_new_tokens=64).text)

Modules: generator (the decode loop, text in / text out), conversation (multi-turn chat reusing the KV cache),
engine_options (EngineOptions, backend="auto"), backend (the interface and the registry) with ort_backend /
native_backend (+ native/: the C decode step) / torch_backend / tensorrt_backend, buffers (the one buffer set the
graph backends bind), decode_policy (which backend call a Sampling makes), selection (GRIFFIN / CATS statistics
over prefill calls), fold (GRIFFIN folding into the bound buffers), stats (the latency report), traffic (bytes
per decode step, from the engine spec). RunOptions (caprese.model.run_options) is what generate() takes. See
README.md.
"""

from caprese.model.run_options import RunOptions
from caprese.runtime.engine_options import EngineOptions
from caprese.runtime.generator import Generator, RuntimeResult, TextStream

__all__ = ["Generator", "RuntimeResult", "TextStream", "RunOptions", "EngineOptions"]
