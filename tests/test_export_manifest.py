"""ENGINE_DIR/manifest.json: what the exporter records, and one-line errors for every way it can be wrong."""

from __future__ import annotations

import json
import os

import pytest

from caprese.errors import CapreseError
from caprese.export import contract as C
from caprese.export.manifest import MANIFEST, VERSION, load_manifest
from caprese.model.spec import load_spec
from export_helpers import DENSITY, MAX_SEQ, copy_engine, get_export


@pytest.fixture
def engine(tmp_path, tmp_path_factory, tiny_model_dir):
    """A private copy of the tiny llama GRIFFIN engine folder, free to break."""
    src, _ = get_export(tmp_path_factory, tiny_model_dir, "llama", "griffin")
    return copy_engine(src, tmp_path / "engine")


def edit(engine, fn):
    path = engine / MANIFEST
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def expect_error(engine, *needles):
    with pytest.raises(CapreseError) as e:
        load_manifest(engine)
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg
    return msg


def test_manifest_records_the_export(engine, tiny_model_dir):
    m = load_manifest(engine)
    d = m.data
    assert d["format"] == "caprese-engine" and d["version"] == VERSION
    assert m.model == load_spec(tiny_model_dir("llama"))
    assert d["recipe"]["method"] == "griffin" and d["recipe"]["density"] == DENSITY
    assert d["recipe"]["layers"] == [0, 1] and d["recipe"]["rank"] == 8
    assert d["recipe"]["k"] == int(m.model.intermediate_size * DENSITY) == m.layout.k
    assert d["max_seq_len"] == MAX_SEQ and d["max_prompt_len"] == MAX_SEQ - 1
    assert d["precision"] == "fp32" and d["dtypes"]["logits"] == "float32"
    assert d["source"]["kind"] == "artifact" and d["tensorrt"] is None
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert f in d["files"]["tokenizer"] and (engine / f).is_file()
    folds = [t.get("fold") for t in d["tensors"]["layers"]]
    assert all(f is not None and set(f) == {"gate_up", "down", "gate_up_bias", "L", "R"} for f in folds)


def test_dense_manifest(tmp_path_factory, tiny_model_dir):
    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "qwen2")
    m = load_manifest(engine)
    assert m.method == "dense" and all(t.fold is None for t in m.spec.layers)
    assert m.layout.layer_kinds == (C.DENSE, C.DENSE)
    assert m.data["source"]["kind"] == "hf"


def test_unknown_version(engine):
    edit(engine, lambda d: d.update(version=VERSION + 1))
    expect_error(engine, f"version {VERSION + 1}", "not supported")


@pytest.mark.parametrize("files, needle", [
    (None, "'files' must be a JSON object, not NoneType"), ("x", "'files' must be a JSON object, not str"),
    ([], "'files' must be a JSON object, not list"),
    ({"tokenizer": 5}, "'files.tokenizer' must be a JSON list, not int"),
    ({"engines": ["model.plan"]}, "'files.engines' must be a JSON object, not list"),
])
def test_malformed_files_field(engine, files, needle):
    """A hand-edited 'files' is one line, not an AttributeError from the consistency checks that read it."""
    edit(engine, lambda d: d.update(files=files if not isinstance(files, dict) else {**d["files"], **files}))
    expect_error(engine, needle, "export again")


def test_not_an_engine_manifest(engine):
    edit(engine, lambda d: d.update(format="something-else"))
    expect_error(engine, "not a caprese engine manifest")
    full = (engine / MANIFEST).read_text()
    (engine / MANIFEST).write_text(full[:len(full) // 2])  # truncated: the fix is to export again, not to re-download
    msg = expect_error(engine, "not valid JSON", "export again", "caprese-export")
    assert "re-download" not in msg
    (engine / MANIFEST).unlink()
    expect_error(engine, "manifest.json not found", "engine folder is incomplete", "export again")
    for f in engine.iterdir():
        if f.suffix in (".onnx", ".bin"):
            f.unlink()
    expect_error(engine, "manifest.json not found", "not an engine folder from caprese-export")


def test_missing_files(engine):
    (engine / "decode.onnx").unlink()
    expect_error(engine, "decode.onnx", "missing")
    with pytest.raises(CapreseError, match="manifest.json is a file; give the engine folder"):
        load_manifest(engine / MANIFEST)


def test_missing_tokenizer_file(engine):
    (engine / "tokenizer.json").unlink()
    expect_error(engine, "tokenizer.json", "missing")


@pytest.mark.parametrize("bad", ["../prefill.onnx", "/etc/passwd", "sub/../../x.onnx"])
def test_paths_must_stay_inside(engine, bad):
    edit(engine, lambda d: d["files"].update(prefill=bad))
    expect_error(engine, "outside the engine folder")


def test_symlink_escaping_the_folder(engine, tmp_path):
    outside = tmp_path / "outside.onnx"
    outside.write_bytes((engine / "prefill.onnx").read_bytes())
    os.symlink(outside, engine / "link.onnx")
    edit(engine, lambda d: d["files"].update(prefill="link.onnx"))
    expect_error(engine, "outside the engine folder")


def test_truncated_graph(engine):
    """A cut decode.onnx is refused at load, by every backend (native and torch never parse it)."""
    path = engine / C.GRAPH_FILES[C.DECODE]
    path.write_bytes(path.read_bytes()[:3000])
    expect_error(engine, "decode.onnx", "is 3000 bytes, not the", "export again")


def test_truncated_weights(engine):
    w = engine / "weights.bin"
    w.write_bytes(w.read_bytes()[:1000])
    expect_error(engine, "truncated")


def test_io_contract_mismatch(engine):
    edit(engine, lambda d: d["io"]["decode"]["inputs"].pop())
    expect_error(engine, "I/O does not match")


def test_layout_mismatch_with_model(engine):
    edit(engine, lambda d: d["layout"].update(hidden_size=1 + d["layout"]["hidden_size"]))
    expect_error(engine, "hidden_size")


def test_lengths_inconsistent(engine):
    edit(engine, lambda d: d.update(max_prompt_len=d["max_seq_len"] + 1))
    expect_error(engine, "max_prompt_len")


def test_engines_need_tensorrt_facts(engine):
    (engine / "prefill.plan").write_bytes(b"plan")
    edit(engine, lambda d: d["files"].update(engines={"prefill": "prefill.plan"}))
    expect_error(engine, "TensorRT version", "compute capability")
    edit(engine, lambda d: d.update(tensorrt={"version": "10.15.1", "compute_capability": "8.9"}))
    assert load_manifest(engine).engines == {"prefill": engine / "prefill.plan"}


def test_export_takes_options_or_their_fields(tmp_path, tiny_model_dir):
    """export(src, out, ExportOptions(...)) and export(src, out, **fields) write the same engine spec; mixing the
    two, an unknown field or a wrong options type is a TypeError; a bad value is refused before anything loads."""
    from caprese.export.export_options import ExportOptions
    from caprese.export.exporter import export

    src = tiny_model_dir("llama")
    opts = ExportOptions(target="onnxruntime", max_seq_len=MAX_SEQ, weights="int8")
    a = export(src, tmp_path / "a", opts).manifest
    b = export(src, tmp_path / "b", target="onnxruntime", max_seq_len=MAX_SEQ, weights="int8").manifest
    keys = ("recipe", "target", "precision", "max_seq_len", "max_prompt_len", "layout", "tensors")
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys} and a["target"] == "onnxruntime"
    assert a["recipe"]["weights"]["bits"] == 8
    with pytest.raises(TypeError, match="not both"):
        export(src, tmp_path / "c", opts, precision="fp16")
    with pytest.raises(TypeError, match="max_seqlen"):
        export(src, tmp_path / "c", max_seqlen=64)
    with pytest.raises(TypeError, match="must be an ExportOptions; got dict"):
        export(src, tmp_path / "c", {"target": "onnxruntime"})
    for fields, needle in ((dict(target="trt"), "unknown --target 'trt'"), (dict(precision="fp8"), "precision"),
                           (dict(max_batch=0), "max batch"), (dict(engine=True, target="onnxruntime"), "--engine"),
                           (dict(kv_dtype="int8"), "--kv-dtype"), (dict(timing_cache="t.cache"), "add --engine"),
                           (dict(precision="fp16", fp16_bypass=True), "fp16")):
        with pytest.raises(CapreseError, match=needle):
            export(tmp_path / "missing", tmp_path / "c", **fields)  # the options fail first: the source is missing
    assert not (tmp_path / "c").exists()
