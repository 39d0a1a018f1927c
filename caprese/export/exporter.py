"""`export(SRC, OUT)`: a HF folder (dense) or a calibration artifact (method + folded bypass) to an engine folder.

ENGINE_DIR holds prefill.onnx + decode.onnx (one shared weights.bin), the tokenizer files, manifest.json, for
target "tensorrt" (the default) the graphs TensorRT parses (tensorrt_graphs: static-cache copies, one shared
graph unless GRIFFIN) and, with engine=True on a machine with TensorRT, their plans (+ timing.cache). Output is
atomic: it is built in a temporary sibling folder and renamed into place; an existing OUT is replaced only with
force=True. Every export runs onnx's checker on every graph and the static TensorRT check (tensorrt_ops) on the
graphs TensorRT parses. target "onnxruntime" swaps attention and norms for ONNX Runtime's contrib ops
(ort_graph.OrtGraph); same I/O contract, batch 1, parity-tested against the standard graphs. The engine spec
(engine_spec.EngineSpec: recipe, layout, every weight's name / shape / dtype) is built before the graphs and
written into manifest.json. weights="int4" | "int8": block-quantized weights (export_quantization.py; the
export README's "Quantized weights").
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import onnx

from caprese.atomic_output import check_writable, temp_sibling
from caprese.errors import CapreseError
from caprese.export import contract as C
from caprese.export.engine_spec import EngineSpec, Recipe, method_kind
from caprese.export.export_options import ExportOptions
from caprese.export.export_quantization import QuantRequest, quantize_for_export
from caprese.export.manifest import MANIFEST, FORMAT, VERSION, load_manifest, write_manifest
from caprese.export.onnx_graph import ExportModel, build_graphs
from caprese.export.tensorrt_graphs import MANIFEST_KEY as TRT_GRAPHS, manifest_record, tensorrt_models
from caprese.export.tensorrt_ops import TENSORRT_TABLE_VERSION, check_model, format_violations
from caprese.export.weights import WeightsWriter

DEFAULT_MAX_SEQ_LEN = 4096
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json", "config.json")


@dataclasses.dataclass
class ExportResult:
    out: Path
    manifest: dict
    engines_built: bool


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("caprese")
    except Exception:
        return "unknown"


def _resolve_source(src: Path, base_model: str | None):
    """(base model folder, artifact or None)."""
    from caprese.calibration.artifact import is_artifact, load_artifact

    if not src.exists():
        raise CapreseError(f"source not found: {src}")
    if not src.is_dir():
        raise CapreseError(f"expected a model folder or a calibration artifact folder, got a file: {src}")
    if is_artifact(src):
        art = load_artifact(src, base_model)
        return Path(art.base_model), art
    if base_model:
        raise CapreseError("--base-model only applies to a calibration artifact; SRC is a plain model folder")
    return src, None


def _check_lengths(spec, max_seq_len: int | None, max_prompt_len: int | None) -> tuple[int, int]:
    ctx = spec.max_position_embeddings
    seq = min(ctx, DEFAULT_MAX_SEQ_LEN) if max_seq_len is None else int(max_seq_len)
    if not 2 <= seq <= ctx:
        raise CapreseError(f"--max-seq-len must be between 2 and the model's context ({ctx}); got {seq}")
    prompt = seq - 1 if max_prompt_len is None else int(max_prompt_len)
    if not 1 <= prompt < seq:
        raise CapreseError(f"--max-prompt-len must be at least 1 and below --max-seq-len ({seq}); got {prompt}")
    return seq, prompt


def _check_out(out: Path, src: Path, base: Path, force: bool) -> None:
    for p in {src.resolve(), base.resolve()}:
        o = out.resolve()
        if o == p or o in p.parents:
            raise CapreseError(f"-o {out} would overwrite the source {p}; choose another output folder")
    if out.exists() or out.is_symlink():
        if not force:
            raise CapreseError(f"{out} already exists; pass --force to overwrite it or choose another -o")
        if not out.is_dir() or out.is_symlink():
            raise CapreseError(f"{out} exists and is not a folder; remove it or choose another -o")
        if any(out.iterdir()) and not (out / MANIFEST).is_file():
            raise CapreseError(f"{out} is a non-empty folder without {MANIFEST} (not an engine folder); "
                               "refusing to replace it, even with --force")


def default_kv_dtype(spec, target: str, precision: str) -> str:
    """The KV cache's dtype when --kv-dtype is not given: fp16 for an fp32 --target onnxruntime engine whose
    head_dim is a multiple of 16 (as llama.cpp's default f16 cache: half the cache's bytes a step, 0.83x the step
    at 1,024 tokens on the native backend; the same accuracy on 1,000 problems, docs/quantization.md), else the
    precision's own."""
    if target == C.TARGET_ONNXRUNTIME and precision == "fp32" and spec.head_dim % 16 == 0:
        return "fp16"
    return precision


def export(src: str | Path, out: str | Path, options: ExportOptions | None = None, *, base_model: str | None = None,
           force: bool = False, log: Callable[[str], None] | None = None, **fields) -> ExportResult:
    """Export SRC to OUT as `options` say (an ExportOptions, or its fields as keywords: export(src, out,
    target="onnxruntime", weights="int4")); see the module docstring. Raises CapreseError (one line) for anything a
    user can fix. base_model: an artifact's base model folder where it moved; force: replace an existing engine
    folder; log: progress lines.

    weights "int4" | "int8": block-quantized weights (export_quantization.py): the artifact's own codes when SRC
    carries them, else round-to-nearest at export time. kv_dtype None: default_kv_dtype (fp16 for an fp32
    --target onnxruntime engine where head_dim allows it, else the precision's). ExportOptions says what each field
    does.

    With engine=True and no TensorRT, the ONNX engine folder is still written completely, then
    TensorRTUnavailable (a CapreseError) says so.
    """
    from caprese.calibration.methods import efficient_layers
    from caprese.model.loading import load_decoder
    from caprese.model.spec import load_spec

    if options is not None and fields:
        raise TypeError(f"export: give an ExportOptions or its fields as keywords, not both ({', '.join(fields)})")
    o = options if options is not None else ExportOptions(**fields)  # an unknown keyword: TypeError naming it
    if not isinstance(o, ExportOptions):
        raise TypeError(f"export: options must be an ExportOptions; got {type(o).__name__}")
    precision, target = o.precision, o.target
    log = log or (lambda msg: None)
    src, out = Path(src), Path(out)
    base, art = _resolve_source(src, base_model)
    spec = load_spec(base)
    seq, prompt = _check_lengths(spec, o.max_seq_len, o.max_prompt_len)
    if target == C.TARGET_ONNXRUNTIME and spec.qk_norm:
        raise CapreseError(f"--target onnxruntime cannot normalise q/k per head ({spec.model_type}); use the "
                           "default --target tensorrt, which runs on ONNX Runtime too")
    _check_out(out, src, base, force)
    check_writable(out)  # before the model loads
    kv_dtype = o.kv_dtype if o.kv_dtype is not None else default_kv_dtype(spec, target, precision)
    kv16 = kv_dtype == "fp16" and precision == "fp32"
    if kv16 and target != C.TARGET_ONNXRUNTIME:
        raise CapreseError("--kv-dtype fp16 on an fp32 engine is built for --target onnxruntime (GroupQueryAttention "
                           "in fp16); add --target onnxruntime, or export --precision fp16")
    if o.fp16_bypass and (art is None or not getattr(art, "rank", 0)):
        raise CapreseError(f"--fp16-bypass: {src} has no bypass (L, R) to store; export a calibrated artifact with a "
                           "rank, or drop --fp16-bypass")

    log(f"loading {base}")
    decoder = load_decoder(base, "fp32", "cpu", spec=spec)
    request = QuantRequest(o.weights, o.block_size, o.quantize_head, o.int8_activations, o.float_selection,
                           o.fp16_bypass)
    if request == QuantRequest():
        request = None
    quant = quantize_for_export(decoder, art, request, target, log)  # before the method is installed
    if art is not None:
        if method_kind(art.method) not in (C.GRIFFIN, C.CATS, C.BYPASS):
            raise CapreseError(f"exporting method {art.method!r} is not supported yet (griffin, cats and none are)")
        try:
            art.apply(decoder)
        except (ValueError, RuntimeError) as e:
            raise CapreseError(f"cannot apply the artifact {src}: {e}") from None
    ffns = efficient_layers(decoder)
    try:
        recipe = recipe_for(ffns)
        if quant is not None:
            recipe = dataclasses.replace(recipe, weights=quant.recipe)
        engine_spec = EngineSpec.build(spec, recipe, target, precision, seq, prompt, o.max_batch,
                                       kv_dtype="float16" if kv16 else "")
    except ValueError as e:
        raise CapreseError(str(e)) from None
    em = ExportModel(decoder, engine_spec, ffns, quant, float_selection=bool(quant and quant.recipe.float_selection))
    layout = engine_spec.layout

    tmp = temp_sibling(out)
    try:
        kv = {dt: name for name, dt in C.PRECISIONS.items()}[layout.cache_dtype]  # bf16 engines: bf16
        note = " (--target onnxruntime's default; --kv-dtype fp32 keeps fp32)" if kv16 and o.kv_dtype is None else ""
        log(f"building graphs ({precision}, {len(ffns)} approximated layers); KV cache {kv}{note}")
        manifest = _write_folder(tmp, em, art, src, base)
        engines_error = None
        if o.engine:
            from caprese.export.tensorrt_build import TensorRTUnavailable, build_engines

            try:
                info = build_engines(tmp, manifest[TRT_GRAPHS], layout, o.max_batch, prompt,
                                     Path(o.timing_cache) if o.timing_cache else None, log=log)
            except TensorRTUnavailable as e:
                engines_error = e
            else:
                manifest["tensorrt"] = {k: v for k, v in info.items() if k not in ("plans", "timing_cache")}
                manifest["files"]["engines"] = info["plans"]
                if info.get("timing_cache"):
                    manifest["files"]["timing_cache"] = info["timing_cache"]
                write_manifest(tmp, manifest)
        load_manifest(tmp)  # what a runtime will check, checked before the folder becomes visible
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out}")
    if engines_error is not None:
        raise type(engines_error)(f"{engines_error} (the ONNX engine folder {out} is complete and runs on ONNX Runtime)")
    return ExportResult(out, manifest, o.engine)


def recipe_for(ffns: dict) -> Recipe:
    """The recipe of a decoder whose efficient FFNs are `ffns` (layer -> GriffinFFN / CatsFFN / PlainFFN)."""
    if not ffns:
        return Recipe()
    methods = {method_kind(f.method) for f in ffns.values()}
    if len(methods) > 1 or not methods <= {C.GRIFFIN, C.CATS, C.BYPASS}:
        raise ValueError(f"method {', '.join(sorted(methods))} has no export (griffin, cats and none do, one per "
                         "model)")
    method = methods.pop()
    ks = {f.k for f in ffns.values()} if method == C.GRIFFIN else {0}
    ranks = {f.bypass.rank if f.bypass is not None else 0 for f in ffns.values()}
    densities = {f.density for f in ffns.values()}
    if len(ks) > 1 or len(ranks) > 1 or len(densities) > 1:
        raise ValueError("every approximated layer must share one density and one bypass rank")
    return Recipe(method, densities.pop(), tuple(sorted(ffns)), k=ks.pop(), rank=ranks.pop())


def _write_folder(tmp: Path, em: ExportModel, art, src: Path, base: Path) -> dict:
    spec = em.spec
    with WeightsWriter(tmp) as weights:
        graphs = build_graphs(em, weights)
        trt_models = tensorrt_models(em, graphs, weights) if em.target == C.TARGET_TENSORRT else {}
        for t in spec.layers:  # runtime-only tensors: the bypass of GRIFFIN layers (their folding sources)
            if t.fold is not None and t.fold.L is not None:
                bypass = em.ffns[t.index].bypass
                for ref, value in ((t.fold.L, bypass.L), (t.fold.R, bypass.R)):
                    if tuple(value.shape) != ref.shape:
                        raise ValueError(f"{ref.name}: shape {list(value.shape)}, the engine spec {list(ref.shape)}")
                    weights.add(ref.name, value, ref.dtype)
    files = [(C.GRAPH_FILES[g], m, False) for g, m in graphs.items()]
    files += [(C.TENSORRT_GRAPH_FILES[e], m, True) for e, m in trt_models.items()]
    for name, model, for_tensorrt in files:
        path = tmp / name
        path.write_bytes(model.SerializeToString())
        try:
            onnx.checker.check_model(str(path))
        except onnx.checker.ValidationError as e:  # a bug in the exporter, not in the user's input
            raise RuntimeError(f"the exported graph {name} fails onnx's checker: {str(e).splitlines()[0]}") from None
        violations = check_model(model) if for_tensorrt else []  # TensorRT parses these files, not the others
        if violations:
            raise CapreseError(f"{name} fails the static TensorRT {TENSORRT_TABLE_VERSION} check: "
                               f"{format_violations(violations, 5)}")
    tokenizer = []
    for name in TOKENIZER_FILES:
        f = base / name
        if f.is_file():
            shutil.copyfile(f, tmp / name)
            tokenizer.append(name)
    from caprese.calibration.artifact import fingerprint

    layout = spec.layout
    manifest = {
        "format": FORMAT, "version": VERSION, "created_by": f"caprese {_version()}",
        # the engine spec: model, recipe, target, precision, max lengths / batch, layout, tensors (by role)
        **spec.to_dict(),
        "source": {"kind": "artifact" if art is not None else "hf", "path": str(src), "base_model": str(base),
                   "fingerprint": art.fingerprint if art is not None else fingerprint(base)},
        "dtypes": {"weights": layout.dtype, "kv_cache": layout.cache_dtype, "logits": "float32",
                   "selection": "float32"},
        "io": layout.io_dict(), "in_place": [list(p) for p in layout.in_place_pairs()],
        "opset": C.OPSET,
        "files": {"prefill": C.GRAPH_FILES[C.PREFILL], "decode": C.GRAPH_FILES[C.DECODE], "weights": C.WEIGHTS_FILE,
                  "tokenizer": tokenizer,
                  # each graph's size: a truncated one is refused at load even by backends that never parse it
                  "graph_bytes": {name: (tmp / name).stat().st_size for name, _, _ in files}},
        "weights": weights.table,  # where each tensor the spec names sits in weights.bin
        # the files TensorRT parses (static cache length) and their engines' GPU memory; None: not a TensorRT export
        TRT_GRAPHS: manifest_record(trt_models, weights.table, layout, spec.max_batch, spec.max_seq_len)
        if trt_models else None,
        "tensorrt_check": {"table": TENSORRT_TABLE_VERSION, "violations": 0,
                           "files": [C.TENSORRT_GRAPH_FILES[e] for e in trt_models]} if trt_models
        else None,  # com.microsoft ops: not a TensorRT graph
        "tensorrt": None,
    }
    write_manifest(tmp, manifest)
    return manifest


def _replace(tmp: Path, out: Path) -> None:
    """Move tmp to out; an existing out is moved aside first and removed only after the rename succeeded."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}-old-", dir=out.parent))
        old.rmdir()
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_folder(path: str | Path) -> dict[str, list]:
    """Static TensorRT check of an engine folder (its graphs) or of one .onnx file: {file: [Violation, ...]}."""
    path = Path(path)
    if path.is_file():
        try:
            return {path.name: check_model(path)}
        except Exception as e:  # not an ONNX file (DecodeError, ...)
            raise CapreseError(f"cannot read {path} as an ONNX graph ({str(e).splitlines()[0] if str(e) else e})"
                               ) from None
    if (path / MANIFEST).is_file():
        m = load_manifest(path)
        trt = m.tensorrt_graphs  # the files TensorRT parses; folders from before they existed: the two graphs
        files = {p.name: p for p in trt.values()} if trt else {m.data["files"][g]: m.file(g) for g in C.GRAPHS}
        return {name: check_model(p) for name, p in files.items()}
    if path.is_dir():
        files = sorted(path.glob("*.onnx"))
        if files:
            return {f.name: check_model(f) for f in files}
    raise CapreseError(f"--check alone needs an engine folder or an .onnx file; {path} is neither (to check a model "
                       f"or an artifact, export it: caprese-export {path} -o ENGINE_DIR --check)")
