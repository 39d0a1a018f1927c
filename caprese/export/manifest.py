"""ENGINE_DIR/manifest.json: what an engine folder holds, and the checks a runtime runs before trusting it.

Keys (format "caprese-engine", version FORMAT_VERSION):
  format, version, created_by
  model         ModelSpec.to_dict() of the base model
  source        {"kind": "hf" | "artifact", "path", "base_model", "fingerprint"}
  method        {"name": dense | griffin | cats, "density", "layers", "k", "rank", "cats_quantile",
                 "cats_bisection_steps"}
  precision     fp32 | fp16 | bf16;  dtypes {"weights", "kv_cache", "logits", "selection"}
  max_seq_len, max_prompt_len, max_batch
  layout        contract.GraphLayout.to_dict();  io: layout.io_dict();  in_place: [[past, present], ...]
  files         {"prefill", "decode", "weights", "tokenizer": [...], "engines": {graph: plan} (engines only),
                 "timing_cache" (engines only)}: names relative to ENGINE_DIR, which must stay inside it
  weights       {tensor name: {"offset", "length", "shape", "dtype"}} of files.weights
  folding       {layer: contract.fold_tensors(...)} for GRIFFIN layers: the weights.bin tensors a runtime
                slices and concatenates into w_gul / w_dr / b_gul
  target        "tensorrt" (the standard-domain graphs) | "onnxruntime" (com.microsoft contrib ops, batch 1)
  tensorrt      null, or {"version", "compute_capability", "profiles", "strongly_typed", "weights_stripped"}
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from caprese.errors import CapreseError
from caprese.export import contract as C
from caprese.model.spec import ModelSpec, read_json

MANIFEST = "manifest.json"
FORMAT = "caprese-engine"
VERSION = C.FORMAT_VERSION
REQUIRED = ("format", "version", "model", "method", "precision", "max_seq_len", "max_prompt_len", "layout", "io",
            "files", "weights")


@dataclasses.dataclass
class Manifest:
    folder: Path
    data: dict
    spec: ModelSpec
    layout: C.GraphLayout

    def file(self, key: str) -> Path:
        return self.folder / self.data["files"][key]

    @property
    def engines(self) -> dict[str, Path]:
        return {g: self.folder / name for g, name in (self.data["files"].get("engines") or {}).items()}

    @property
    def method(self) -> str:
        return self.data["method"]["name"]


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
    if any((folder / n).is_file() for n in ("decode.onnx", "prefill.onnx", "weights.bin")):
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
        spec = ModelSpec.from_dict(data["model"])
        layout = C.GraphLayout.from_dict(data["layout"])
    except (TypeError, ValueError, KeyError) as e:
        raise CapreseError(f"{folder / MANIFEST} has an invalid model or layout record ({e}); export again") from None
    _check_consistency(folder, data, spec, layout)
    files = data["files"]
    if not isinstance(files, dict):
        raise CapreseError(f"{folder / MANIFEST}: 'files' must be an object")
    names = [(files.get(k), k) for k in ("prefill", "decode", "weights")]
    names += [(n, "tokenizer") for n in files.get("tokenizer") or []]
    names += [(n, f"{g} engine") for g, n in (files.get("engines") or {}).items()]
    if files.get("timing_cache"):
        names.append((files["timing_cache"], "timing cache"))
    for name, what in names:
        path = safe_member(folder, name, what)
        if check_files and not path.is_file():
            raise CapreseError(f"the {what} file {name} listed in {MANIFEST} is missing from {folder}; export again")
    if check_files:
        _check_weights(folder, data)
    return Manifest(folder, data, spec, layout)


def _check_consistency(folder: Path, data: dict, spec: ModelSpec, layout: C.GraphLayout) -> None:
    where = folder / MANIFEST
    pairs = (("num_layers", spec.num_layers), ("hidden_size", spec.hidden_size),
             ("intermediate_size", spec.intermediate_size), ("num_kv_heads", spec.num_kv_heads),
             ("head_dim", spec.head_dim), ("vocab_size", spec.vocab_size))
    for key, value in pairs:
        if getattr(layout, key) != value:
            raise CapreseError(f"{where}: layout {key} = {getattr(layout, key)} does not match the model's {value}")
    if data["precision"] != layout.precision:
        raise CapreseError(f"{where}: precision {data['precision']!r} does not match the layout's {layout.precision!r}")
    if data["io"] != layout.io_dict():
        raise CapreseError(f"{where}: the recorded graph I/O does not match contract format {VERSION} for this "
                           "layout; export again with this caprese")
    try:
        seq, prompt = int(data["max_seq_len"]), int(data["max_prompt_len"])
    except (TypeError, ValueError):
        raise CapreseError(f"{where}: max_seq_len and max_prompt_len must be integers") from None
    if not 1 <= prompt <= seq <= spec.max_position_embeddings:
        raise CapreseError(f"{where}: need 1 <= max_prompt_len ({prompt}) <= max_seq_len ({seq}) <= the model's "
                           f"context ({spec.max_position_embeddings})")
    if data.get("target", C.TARGET_TENSORRT) not in C.TARGETS:
        raise CapreseError(f"{where}: unknown target {data.get('target')!r} (this caprese knows {', '.join(C.TARGETS)})")
    trt = data.get("tensorrt")
    if data["files"].get("engines") and not (isinstance(trt, dict) and trt.get("version")
                                             and trt.get("compute_capability")):
        raise CapreseError(f"{where} lists engines but not the TensorRT version and GPU compute capability")


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
