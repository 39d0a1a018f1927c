"""Build TensorRT engines (serialized plans) from the graphs TensorRT parses. Thin: TensorRT is imported lazily.

The graphs are the manifest's "tensorrt_graphs" (export.tensorrt_graphs: static KV-cache length, one shared graph
unless GRIFFIN). Written against the documented TensorRT 10.x / 11 Python API (it cannot be installed on our CPU
machines; the tests that run it are marked `tensorrt` and skip there):
- a strongly typed network (NetworkDefinitionCreationFlag.STRONGLY_TYPED; TensorRT 11 has no other kind), so
  every tensor keeps the dtype the graph gives it (fp32 softmax, reductions and logits stay fp32);
- one optimization profile per role an engine serves, in the record's role order: the shared engine of dense
  and CATS layouts gets two (prefill: seq 1..max_prompt_len; decode: seq 1), so the weights are on the GPU once,
  as TensorRT Edge-LLM does (IBuilderConfig.add_optimization_profile per profile; a runtime selects one per
  execution context with IExecutionContext.set_optimization_profile_async). Shapes come from plain code
  (`engine_profiles`, unit-tested without TensorRT), each checked min <= opt <= max;
- a timing cache read before and written after each build (reused across engines and exports);
- weight-stripped plans (BuilderFlag.STRIP_PLAN + REFIT_IDENTICAL) by default, so weights stay stored once, in
  weights.bin: a runtime refits each engine from its .onnx file (trt.OnnxParserRefitter) after deserializing.
"""

from __future__ import annotations

from pathlib import Path

from caprese.errors import CapreseError
from caprese.export import contract as C

INSTALL_HINT = ("install TensorRT >= 10.15 on a machine with an NVIDIA GPU (pip install 'caprese[gpu]') "
                "and export again with --engine")
DEFAULT_OPT_PROMPT = 128  # the prefill profile's opt length: a typical chat prompt chunk


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


def role_profile(inputs: list[C.TensorSpec], role: str, max_batch: int, max_prompt_len: int, opt_batch: int = 1,
                 opt_prompt_len: int | None = None) -> dict[str, tuple[tuple, tuple, tuple]]:
    """{input: (min, opt, max)} of one role's profile for every input with a dynamic dimension (batch, seq);
    static inputs (the KV cache's length, decode_flag) need none. A symbolic cache length is refused: TensorRT's
    KV-cache update needs it static."""
    if role not in C.GRAPHS:
        raise ValueError(f"unknown role {role!r}")
    if not 1 <= max_batch:
        raise CapreseError(f"TensorRT profiles: max batch must be >= 1; got {max_batch}")
    if not 1 <= max_prompt_len:
        raise CapreseError(f"TensorRT profiles: max_prompt_len must be >= 1; got {max_prompt_len}")
    opt_prompt_len = opt_prompt_len or min(max_prompt_len, DEFAULT_OPT_PROMPT)
    seq = (1, opt_prompt_len, max_prompt_len) if role == C.PREFILL else (1, 1, 1)
    ranges = {C.BATCH: (1, min(opt_batch, max_batch), max_batch), C.SEQ: seq}
    out = {}
    for t in inputs:
        if C.CACHE_LEN in t.shape:
            raise CapreseError(f"TensorRT profiles: {t.name} has a symbolic cache length; TensorRT parses the "
                               "static-cache copies (manifest 'tensorrt_graphs'), export again")
        if not any(isinstance(d, str) for d in t.shape):
            continue
        dims = [ranges[d] if isinstance(d, str) else (d, d, d) for d in t.shape]
        shapes = tuple(tuple(d[j] for d in dims) for j in range(3))
        check_profile(f"{t.name} ({role})", *shapes)
        out[t.name] = shapes
    return out


def engine_profiles(layout: C.GraphLayout, engine: str, cache_len: int, max_batch: int, max_prompt_len: int,
                    opt_batch: int = 1, opt_prompt_len: int | None = None) -> list[dict]:
    """One profile per role the engine serves, in profile-index order (contract.TENSORRT_ENGINES)."""
    if not 1 <= max_prompt_len < cache_len:
        raise CapreseError(f"TensorRT profiles: need 1 <= max_prompt_len ({max_prompt_len}) < the static cache "
                           f"length ({cache_len})")
    inputs = layout.tensorrt_io(engine, cache_len)["inputs"]
    return [role_profile(inputs, role, max_batch, max_prompt_len, opt_batch, opt_prompt_len)
            for role in C.TENSORRT_ENGINES[engine]]


def compute_capability() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return f"{major}.{minor}"
    except Exception:
        pass
    return None


def parse_network(trt, onnx_path: Path, logger):
    """(builder, network, parser) for onnx_path, strongly typed; every parser error in one CapreseError."""
    builder = trt.Builder(logger)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if flag is None else 1 << int(flag))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)).splitlines()[0] for i in range(parser.num_errors))
        raise CapreseError(f"TensorRT could not parse {onnx_path.name}: {errors or 'no reason given'}")
    return builder, network, parser


def build_engine(onnx_path: Path, plan_path: Path, profiles: list[dict], timing_cache: Path | None = None,
                 strip_weights: bool = True, workspace_bytes: int | None = None, log=None) -> dict:
    """Parse onnx_path (its external weights beside it), build one serialized plan with one optimization profile
    per entry of `profiles` (index = position), write it to plan_path."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder, network, _parser = parse_network(trt, onnx_path, logger)
    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if strip_weights:
        config.set_flag(trt.BuilderFlag.STRIP_PLAN)
        config.set_flag(trt.BuilderFlag.REFIT_IDENTICAL)
    for shapes in profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            check_profile(name, lo, opt, hi)
            profile.set_shape(name, lo, opt, hi)
        if config.add_optimization_profile(profile) < 0:
            raise CapreseError(f"TensorRT refused an optimization profile of {onnx_path.name}: {shapes}")
    blob = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    cache = config.create_timing_cache(blob)
    config.set_timing_cache(cache, ignore_mismatch=False)
    if log:
        log(f"building TensorRT engine for {onnx_path.name} ({len(profiles)} profile(s)) ...")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise CapreseError(f"TensorRT failed to build an engine for {onnx_path.name} (see the TensorRT log above)")
    plan_path.write_bytes(bytes(plan))
    if timing_cache is not None:
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {"plan": plan_path.name, "profiles": [{k: [list(s) for s in v] for k, v in p.items()} for p in profiles]}


def build_engines(folder: Path, record: dict, layout: C.GraphLayout, max_batch: int, max_prompt_len: int,
                  timing_cache: Path | None = None, strip_weights: bool = True, log=None) -> dict:
    """Plans for every engine of the manifest's "tensorrt_graphs" record in `folder`; returns the manifest's
    "tensorrt" record and the plan file names ({engine: plan})."""
    trt = import_tensorrt()
    local_cache = folder / "timing.cache"
    if timing_cache is not None and timing_cache.is_file() and timing_cache.resolve() != local_cache.resolve():
        local_cache.write_bytes(timing_cache.read_bytes())
    plans, profiles = {}, {}
    for engine, entry in record["engines"].items():
        shapes = engine_profiles(layout, engine, int(record["cache_len"]), max_batch, max_prompt_len)
        info = build_engine(folder / entry["onnx"], folder / C.TENSORRT_PLAN_FILES[engine], shapes, local_cache,
                            strip_weights, log=log)
        plans[engine] = info["plan"]
        profiles[engine] = info["profiles"]
    if timing_cache is not None and local_cache.is_file():
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        timing_cache.write_bytes(local_cache.read_bytes())
    return {"version": str(trt.__version__), "compute_capability": compute_capability(), "profiles": profiles,
            "strongly_typed": True, "weights_stripped": bool(strip_weights), "plans": plans,
            "timing_cache": local_cache.name if local_cache.is_file() else None}
