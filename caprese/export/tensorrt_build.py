"""Build TensorRT engines (serialized plans) from the exported graphs. Thin: TensorRT is imported lazily.

Written against the documented TensorRT 10.x / 11 Python API (it cannot be installed on our CPU machines; the
tests that run it are marked `tensorrt` and skip there):
- a strongly typed network (NetworkDefinitionCreationFlag.STRONGLY_TYPED; TensorRT 11 has no other kind), so
  every tensor keeps the dtype the graph gives it (fp32 reductions and logits stay fp32);
- one optimization profile per graph: prefill over (batch, seq, cache_len), decode over (batch, cache_len),
  each checked min <= opt <= max before TensorRT sees it;
- a timing cache read before and written after each build (reused across graphs and exports);
- weight-stripped plans (BuilderFlag.STRIP_PLAN + REFIT_IDENTICAL) by default, so weights stay stored once, in
  weights.bin: a runtime refits each engine from its .onnx file (trt.OnnxParserRefitter) after deserializing.
"""

from __future__ import annotations

from pathlib import Path

from caprese.errors import CapreseError
from caprese.export import contract as C

INSTALL_HINT = ("install TensorRT >= 10.15 on a machine with an NVIDIA GPU (pip install 'caprese[gpu]') "
                "and export again with --engine")


class TensorRTUnavailable(CapreseError):
    """`import tensorrt` failed: engines cannot be built here."""


def import_tensorrt():
    try:
        import tensorrt as trt  # noqa: PLC0415 - lazy on purpose
    except Exception as e:  # ImportError, or a broken CUDA install raising at import
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TensorRTUnavailable(f"TensorRT is not available here ({reason}); {INSTALL_HINT}") from None
    return trt


def check_profile(name: str, lo: tuple, opt: tuple, hi: tuple) -> None:
    """min <= opt <= max per dimension, all positive, same rank: else a one-line CapreseError."""
    if not (len(lo) == len(opt) == len(hi)):
        raise CapreseError(f"optimization profile for {name}: min/opt/max have different ranks ({lo}, {opt}, {hi})")
    for a, b, c in zip(lo, opt, hi):
        if not (1 <= a <= b <= c):
            raise CapreseError(f"optimization profile for {name}: need 1 <= min <= opt <= max in every dimension, "
                               f"got min {tuple(lo)}, opt {tuple(opt)}, max {tuple(hi)}")


def profile_shapes(layout: C.GraphLayout, graph: str, max_batch: int, max_prompt_len: int, max_seq_len: int,
                   opt_batch: int = 1, opt_prompt_len: int | None = None) -> dict[str, tuple[tuple, tuple, tuple]]:
    """{input name: (min, opt, max)} for every graph input, from the contract's symbolic dims."""
    if not 1 <= max_prompt_len <= max_seq_len:
        raise CapreseError(f"TensorRT profiles: need 1 <= max_prompt_len ({max_prompt_len}) <= max_seq_len "
                           f"({max_seq_len}), i.e. min <= opt <= max for the cache length")
    opt_prompt_len = opt_prompt_len or max(1, min(max_prompt_len, 128))
    ranges = {C.BATCH: (1, opt_batch, max_batch), C.SEQ: (1, opt_prompt_len, max_prompt_len),
              C.CACHE_LEN: (1, max_seq_len, max_seq_len)}
    out = {}
    for t in layout.inputs(graph):
        dims = [ranges[d] if isinstance(d, str) else (d, d, d) for d in t.shape]
        shapes = tuple(tuple(d[j] for d in dims) for j in range(3))
        check_profile(t.name, *shapes)
        out[t.name] = shapes
    return out


def compute_capability() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return f"{major}.{minor}"
    except Exception:
        pass
    return None


def build_engine(onnx_path: Path, plan_path: Path, shapes: dict, timing_cache: Path | None = None,
                 strip_weights: bool = True, workspace_bytes: int | None = None, log=None) -> dict:
    """Parse onnx_path (its external weights beside it), build one serialized plan, write it to plan_path."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if flag is None else 1 << int(flag))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)).splitlines()[0] for i in range(parser.num_errors))
        raise CapreseError(f"TensorRT could not parse {onnx_path.name}: {errors or 'no reason given'}")
    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if strip_weights:
        config.set_flag(trt.BuilderFlag.STRIP_PLAN)
        config.set_flag(trt.BuilderFlag.REFIT_IDENTICAL)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        check_profile(name, lo, opt, hi)
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    blob = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    cache = config.create_timing_cache(blob)
    config.set_timing_cache(cache, ignore_mismatch=False)
    if log:
        log(f"building TensorRT engine for {onnx_path.name} ...")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise CapreseError(f"TensorRT failed to build an engine for {onnx_path.name} (see the TensorRT log above)")
    plan_path.write_bytes(bytes(plan))
    if timing_cache is not None:
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {"plan": plan_path.name, "profile": {k: [list(s) for s in v] for k, v in shapes.items()}}


def build_engines(folder: Path, layout: C.GraphLayout, max_batch: int, max_prompt_len: int, max_seq_len: int,
                  timing_cache: Path | None = None, strip_weights: bool = True, log=None) -> dict:
    """Plans for both graphs in `folder`; returns the manifest's "tensorrt" record and the plan file names."""
    trt = import_tensorrt()
    local_cache = folder / "timing.cache"
    if timing_cache is not None and timing_cache.is_file() and timing_cache.resolve() != local_cache.resolve():
        local_cache.write_bytes(timing_cache.read_bytes())
    plans, profiles = {}, {}
    for graph in C.GRAPHS:
        shapes = profile_shapes(layout, graph, max_batch, max_prompt_len, max_seq_len)
        info = build_engine(folder / C.GRAPH_FILES[graph], folder / f"{graph}.plan", shapes, local_cache,
                            strip_weights, log=log)
        plans[graph] = info["plan"]
        profiles[graph] = info["profile"]
    if timing_cache is not None and local_cache.is_file():
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        timing_cache.write_bytes(local_cache.read_bytes())
    return {"version": str(trt.__version__), "compute_capability": compute_capability(), "profiles": profiles,
            "strongly_typed": True, "weights_stripped": bool(strip_weights), "plans": plans,
            "timing_cache": local_cache.name if local_cache.is_file() else None}
