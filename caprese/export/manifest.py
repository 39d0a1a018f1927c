"""ENGINE_DIR/manifest.json: what an engine folder holds, and the checks a runtime runs before trusting it.

Keys (format "caprese-engine", version FORMAT_VERSION):
  format, version, created_by
  the engine spec (engine_spec.EngineSpec.to_dict(); returned as Manifest.spec, rebuilt and checked on load):
    model         ModelSpec.to_dict() of the base model
    recipe        {"method": dense | griffin | cats, "density", "layers", "k", "rank", "cats_quantile",
                   "weights": null (quantization, issue 15)}
    target        "tensorrt" (the standard-domain graphs) | "onnxruntime" (com.microsoft contrib ops, batch 1)
    precision     fp32 | fp16 | bf16
    max_seq_len, max_prompt_len, max_batch
    layout        contract.GraphLayout.to_dict() (derived from model, recipe and precision)
    tensors       every weight by role: {"embed", "head", "final_norm", "rope_cos", "rope_sin": WeightRef,
                   "layers": [{"kind", role: WeightRef, ..., "fold": {role: WeightRef} (GRIFFIN)}]},
                   WeightRef = {"name", "shape", "dtype", "storage"[, "quant"]}
  source        {"kind": "hf" | "artifact", "path", "base_model", "fingerprint"}
  dtypes        {"weights", "kv_cache", "logits", "selection"}
  io            layout.io_dict();  in_place: [[past, present], ...]
  files         {"prefill", "decode", "weights", "tokenizer": [...], "engines": {engine: plan} (engines only),
                 "timing_cache" (engines only)}: names relative to ENGINE_DIR, which must stay inside it
  weights       {tensor name: {"offset", "length", "shape", "dtype"}} of files.weights: where each tensor the
                spec names is stored (every entry named by the spec, with the spec's shape, dtype and length)
  tensorrt_graphs  null (target onnxruntime), or the graphs TensorRT parses (export.tensorrt_graphs):
                {"cache_len": max_seq_len (static), "engines": {engine: {"onnx": file, "roles": [prefill, decode]
                 in profile order, "io": {"inputs", "outputs"}}}, "memory": {"weights_bytes": {engine: n},
                 "duplicated_weights_bytes", "per_prompt_bytes", "kv_cache_bytes", "max_batch"}}
  tensorrt_check  {"table", "violations", "files"}: the static check the export ran on those files
  tensorrt      null, or {"version", "compute_capability", "profiles": {engine: [{input: [min, opt, max]}] per
                role}, "strongly_typed", "weights_stripped"}
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from caprese.errors import CapreseError
from caprese.export import contract as C
from caprese.export.engine_spec import EngineSpec, WeightRef
from caprese.model.spec import ModelSpec, read_json

MANIFEST = "manifest.json"
FORMAT = "caprese-engine"
VERSION = C.FORMAT_VERSION
REQUIRED = ("format", "version", "model", "recipe", "target", "precision", "max_seq_len", "max_prompt_len",
            "max_batch", "layout", "tensors", "io", "files", "weights")


@dataclasses.dataclass
class Manifest:
    folder: Path
    data: dict
    spec: EngineSpec  # model, recipe, target, precision, lengths, layout, every weight by role

    @property
    def model(self) -> ModelSpec:
        return self.spec.model

    @property
    def layout(self) -> C.GraphLayout:
        return self.spec.layout

    def entry(self, ref: WeightRef) -> dict:
        """Where `ref` is stored in weights.bin: {"offset", "length", "shape", "dtype"} (checked on load)."""
        return self.data["weights"][ref.name]

    def file(self, key: str) -> Path:
        return self.folder / self.data["files"][key]

    @property
    def engines(self) -> dict[str, Path]:
        return {g: self.folder / name for g, name in (self.data["files"].get("engines") or {}).items()}

    @property
    def tensorrt_graphs(self) -> dict[str, Path]:
        """{engine: the ONNX file TensorRT parses for it}; empty for folders without TensorRT graphs."""
        record = self.data.get("tensorrt_graphs") or {}
        return {e: self.folder / r["onnx"] for e, r in (record.get("engines") or {}).items()}

    @property
    def method(self) -> str:
        return self.spec.recipe.method


def write_manifest(folder: str | Path, data: dict) -> Path:
    path = Path(folder) / MANIFEST
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def safe_member(folder: Path, name, what: str) -> Path:
    """folder / name, refusing absolute names and anything (.., symlinks) that resolves outside folder."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise CapreseError(f"{MANIFEST} in {folder} names an invalid file for {what}: {name!r}")
    if os.path.isabs(name) or Path(name).is_absolute() or name.startswith(("/", "\\")):
        raise CapreseError(f"{MANIFEST} in {folder} names a file outside the engine folder for {what}: {name}")
    root = folder.resolve()
    target = (folder / name).resolve()
    if target != root and root not in target.parents:
        raise CapreseError(f"{MANIFEST} in {folder} names a file outside the engine folder for {what}: {name}")
    return folder / name


def _not_an_engine(folder: Path) -> None:
    """No manifest.json: say what the folder is instead, and the command that makes an engine of it."""
    from caprese.calibration.artifact import MANIFEST as ARTIFACT

    fix = f"export it first: caprese-export {folder} -o ENGINE_DIR, then run ENGINE_DIR"
    if any((folder / n).is_file() for n in (*C.GRAPH_FILES.values(), C.WEIGHTS_FILE)):
        raise CapreseError(f"{MANIFEST} not found in {folder}: the engine folder is incomplete; export again")
    if (folder / ARTIFACT).is_file():
        raise CapreseError(f"{folder} is a calibration artifact, not an engine folder; {fix}")
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        raise CapreseError(f"{folder} is a Hugging Face model folder, not an engine folder; {fix}")
    raise CapreseError(f"{MANIFEST} not found in {folder}: not an engine folder from caprese-export")


def load_manifest(engine_dir: str | Path, check_files: bool = True) -> Manifest:
    """Read and validate ENGINE_DIR/manifest.json; every problem is one CapreseError line."""
    folder = Path(engine_dir)
    if not folder.is_dir():
        if folder.exists():
            raise CapreseError(f"{folder} is a file; give the engine folder caprese-export wrote (ENGINE_DIR)")
        raise CapreseError(f"engine folder not found: {folder}")
    if not (folder / MANIFEST).is_file():
        _not_an_engine(folder)
    data = read_json(folder / MANIFEST, MANIFEST, fix=f"export again (caprese-export SRC -o {folder} --force)")
    if data.get("format") != FORMAT:
        raise CapreseError(f"{folder / MANIFEST} is not a caprese engine manifest (format {data.get('format')!r})")
    version = data.get("version")
    if version != VERSION:
        raise CapreseError(f"engine format version {version!r} in {folder / MANIFEST} is not supported by this caprese "
                           f"(reads version {VERSION}); export the model again with this caprese, or upgrade caprese")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise CapreseError(f"{folder / MANIFEST} lacks {', '.join(missing)}; export the model again")
    try:
        spec = EngineSpec.from_dict(data)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise CapreseError(f"{folder / MANIFEST} does not hold a valid engine spec ({e}); export again") from None
    files = data["files"]
    if not isinstance(files, dict):
        raise CapreseError(f"{folder / MANIFEST}: 'files' must be a JSON object, not {type(files).__name__}; "
                           "export again")
    for key, value, kind in (("tokenizer", files.get("tokenizer"), list), ("engines", files.get("engines") or {}, dict),
                             ("graph_bytes", files.get("graph_bytes") or {}, dict)):
        if not isinstance(value, kind):
            json_kind = "object" if kind is dict else "list"
            raise CapreseError(f"{folder / MANIFEST}: 'files.{key}' must be a JSON {json_kind}, not "
                               f"{type(value).__name__}; export again")
    _check_consistency(folder, data, spec)
    names = [(files.get(k), k) for k in ("prefill", "decode", "weights")]
    names += [(n, "tokenizer") for n in files.get("tokenizer") or []]
    names += [(n, f"{g} engine") for g, n in (files.get("engines") or {}).items()]
    names += [(r.get("onnx"), f"TensorRT {e} graph") for e, r in _trt_engines(folder, data).items()]
    if files.get("timing_cache"):
        names.append((files["timing_cache"], "timing cache"))
    for name, what in names:
        path = safe_member(folder, name, what)
        if check_files and not path.is_file():
            raise CapreseError(f"the {what} file {name} listed in {MANIFEST} is missing from {folder}; export again")
    _check_tensors(folder, data, spec)
    if check_files:
        _check_weights(folder, data)
        for name, size in (files.get("graph_bytes") or {}).items():  # absent in folders exported before it
            path = safe_member(folder, name, "graph")
            if not path.is_file() or path.stat().st_size != size:
                got = f"{path.stat().st_size} bytes" if path.is_file() else "missing"
                raise CapreseError(f"{name} in {folder} is {got}, not the {size} bytes the export wrote (truncated "
                                   "or replaced); export again")
    return Manifest(folder, data, spec)


def _check_consistency(folder: Path, data: dict, spec: EngineSpec) -> None:
    where = folder / MANIFEST
    layout = spec.layout
    if data["io"] != layout.io_dict():
        raise CapreseError(f"{where}: the recorded graph I/O does not match contract format {VERSION} for this "
                           "layout; export again with this caprese")
    seq, prompt = spec.max_seq_len, spec.max_prompt_len
    if seq > spec.model.max_position_embeddings:
        raise CapreseError(f"{where}: max_seq_len ({seq}) exceeds the model's context "
                           f"({spec.model.max_position_embeddings}); export again")
    record = data.get("tensorrt_graphs")
    if record is not None:
        engines = _trt_engines(folder, data)
        if record.get("cache_len") != seq:
            raise CapreseError(f"{where}: the TensorRT graphs' cache length {record.get('cache_len')} is not "
                               f"max_seq_len ({seq}); export again")
        want = layout.tensorrt_engines()
        if {e: tuple(r.get("roles") or ()) for e, r in engines.items()} != want:
            raise CapreseError(f"{where}: the TensorRT engines {sorted(engines)} do not match this layout's "
                               f"{sorted(want)}; export again with this caprese")
        for e, r in engines.items():
            io = {k: [t.to_dict() for t in v] for k, v in layout.tensorrt_io(e, seq).items()}
            if r.get("io") != io:
                raise CapreseError(f"{where}: the recorded I/O of the TensorRT {e} graph does not match contract "
                                   f"format {VERSION}; export again with this caprese")
    trt = data.get("tensorrt")
    if data["files"].get("engines") and not (isinstance(trt, dict) and trt.get("version")
                                             and trt.get("compute_capability")):
        raise CapreseError(f"{where} lists engines but not the TensorRT version and GPU compute capability")


def _trt_engines(folder: Path, data: dict) -> dict:
    record = data.get("tensorrt_graphs")
    if record is None:
        return {}
    if not isinstance(record, dict) or not isinstance(record.get("engines"), dict) or not all(
            isinstance(r, dict) for r in record["engines"].values()):
        raise CapreseError(f"{folder / MANIFEST}: 'tensorrt_graphs' is malformed; export again")
    return record["engines"]


def _check_tensors(folder: Path, data: dict, spec: EngineSpec) -> None:
    """Every tensor the spec names is in the weights table with the spec's shape, dtype and length, and the table
    holds nothing the spec does not name."""
    table, where, wfile = data["weights"], folder / MANIFEST, data["files"].get("weights")
    if not isinstance(table, dict) or not all(isinstance(e, dict) for e in table.values()):
        raise CapreseError(f"{where}: 'weights' must map tensor names to entries; export again")
    named = set()
    for path, ref in spec.refs():
        e = table.get(ref.name)
        if e is None:
            raise CapreseError(f"{wfile} in {folder} has no {ref.name} (the engine spec's {path}); export again")
        got = (e.get("shape"), e.get("dtype"), e.get("length"))
        if got != (list(ref.shape), ref.dtype, ref.nbytes):
            raise CapreseError(f"{where}: weights entry {ref.name} has shape/dtype/length {got}, the engine spec's "
                               f"{path} says {(list(ref.shape), ref.dtype, ref.nbytes)}; export again")
        named.add(ref.name)
    extra = sorted(set(table) - named)
    if extra:
        raise CapreseError(f"{where}: weights.bin holds {extra[0]}, which the engine spec does not name; export again")


def _check_weights(folder: Path, data: dict) -> None:
    size = (folder / data["files"]["weights"]).stat().st_size
    for name, e in data["weights"].items():
        try:
            end = int(e["offset"]) + int(e["length"])
        except (KeyError, TypeError, ValueError):
            raise CapreseError(f"{folder / MANIFEST}: weights entry {name!r} is malformed") from None
        if end > size:
            raise CapreseError(f"{data['files']['weights']} in {folder} is truncated (tensor {name} ends at byte "
                               f"{end}, the file has {size}); export again")
