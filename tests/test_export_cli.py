"""`caprese-export`: a working export, --check, --force, atomic output, and one-line errors for bad input."""

from __future__ import annotations

import json
import sys

import onnx
import pytest
from onnx import TensorProto, helper

import cli_helpers
from caprese.cli.export_command import main as export_main
from caprese.export.manifest import load_manifest


def run_cli(args, monkeypatch, capsys):
    return cli_helpers.run_cli(export_main, args, monkeypatch, capsys, prog="caprese-export")


def assert_one_line_error(rc, err, *needles):
    cli_helpers.assert_one_line_error(rc, err, *needles, code=2, log_prefix="[caprese-export]")


def leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}-")]


def test_help_lists_options(monkeypatch, capsys):
    rc, out, _ = run_cli(["--help"], monkeypatch, capsys)
    assert rc == 0
    for opt in ("SRC", "--output", "--precision", "--max-seq-len", "--max-prompt-len", "--engine / --no-engine",
                "--check", "--force", "--target"):
        assert opt in out, opt


def test_export_check_and_force(tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "engine"
    args = [tiny_model_dir("llama"), "-o", out, "--max-seq-len", "64"]
    rc, stdout, err = run_cli(args + ["--check"], monkeypatch, capsys)
    assert rc == 0, err
    assert stdout.strip().splitlines()[-1] == str(out)
    assert "tensorrt_model.onnx: passes the static TensorRT" in stdout  # the file TensorRT parses
    m = load_manifest(out)
    assert m.data["max_seq_len"] == 64 and m.data["max_prompt_len"] == 63
    rc, _, err = run_cli(args, monkeypatch, capsys)
    assert_one_line_error(rc, err, "already exists", "--force")
    marker = out / "stale.txt"
    marker.write_text("old")
    rc, _, err = run_cli(args + ["--force", "--max-prompt-len", "16"], monkeypatch, capsys)
    assert rc == 0, err
    assert not marker.exists() and load_manifest(out).data["max_prompt_len"] == 16
    assert leftovers(tmp_path, "engine") == []
    rc, stdout, err = run_cli([out, "--check"], monkeypatch, capsys)
    assert rc == 0 and "tensorrt_model.onnx: passes" in stdout and "decode.onnx" not in stdout, err


def test_check_alone_lists_violations(tmp_path, monkeypatch, capsys):
    node = helper.make_node("SkipSimplifiedLayerNormalization", ["x", "s", "g"], ["y"], name="/model/norm/Skip",
                            domain="com.microsoft")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    g = helper.make_graph([node], "g", [x, helper.make_tensor_value_info("s", TensorProto.FLOAT, [1, 4]),
                                        helper.make_tensor_value_info("g", TensorProto.FLOAT, [4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 24), helper.make_opsetid("com.microsoft", 1)],
                                ir_version=11), str(path))
    rc, out, err = run_cli([path, "--check"], monkeypatch, capsys)
    assert "/model/norm/Skip" in out and "com.microsoft" in out
    assert_one_line_error(rc, err, "1 TensorRT violation")


def test_engine_without_tensorrt_keeps_onnx_output(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    out = tmp_path / "engine"
    rc, _, err = run_cli([tiny_model_dir("llama"), "-o", out, "--max-seq-len", "32", "--engine"], monkeypatch, capsys)
    assert_one_line_error(rc, err, "TensorRT is not available", str(out), "ONNX Runtime")
    m = load_manifest(out)  # complete and valid, without engines
    assert m.data["tensorrt"] is None and not m.engines


@pytest.mark.parametrize("extra,needles", [
    (["--max-seq-len", "100000"], ["--max-seq-len", "context"]),
    (["--max-seq-len", "32", "--max-prompt-len", "32"], ["--max-prompt-len", "below"]),
])
def test_bad_lengths(extra, needles, tiny_model_dir, tmp_path, monkeypatch, capsys):
    rc, _, err = run_cli([tiny_model_dir("llama"), "-o", tmp_path / "e", *extra], monkeypatch, capsys)
    assert_one_line_error(rc, err, *needles)
    assert not (tmp_path / "e").exists()


def test_bad_sources(tmp_path, tiny_model_dir, monkeypatch, capsys):
    rc, _, err = run_cli([tmp_path / "nope", "-o", tmp_path / "e"], monkeypatch, capsys)
    assert_one_line_error(rc, err, "not found")
    f = tmp_path / "file.txt"
    f.write_text("x")
    rc, _, err = run_cli([f, "-o", tmp_path / "e"], monkeypatch, capsys)
    assert_one_line_error(rc, err, "got a file")
    bad = tmp_path / "bert"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "bert"}))
    rc, _, err = run_cli([bad, "-o", tmp_path / "e"], monkeypatch, capsys)
    assert_one_line_error(rc, err, "unsupported model_type")
    rc, _, err = run_cli([tmp_path, "-o", tmp_path / "e"], monkeypatch, capsys)  # an empty folder
    assert_one_line_error(rc, err, "config.json")
    assert not (tmp_path / "e").exists()


def test_output_may_not_overwrite_the_source(tiny_model_dir, monkeypatch, capsys):
    src = tiny_model_dir("llama")
    for out in (src, src.parent):
        rc, _, err = run_cli([src, "-o", out, "--force"], monkeypatch, capsys)
        assert_one_line_error(rc, err, "would overwrite the source")
    assert (src / "config.json").is_file()


def test_force_refuses_a_foreign_folder(tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    rc, _, err = run_cli([tiny_model_dir("llama"), "-o", out, "--force"], monkeypatch, capsys)
    assert_one_line_error(rc, err, "not an engine folder")
    assert (out / "notes.txt").read_text() == "keep me"


def test_usage_errors(tiny_model_dir, tmp_path, monkeypatch, capsys):
    rc, _, err = run_cli([tiny_model_dir("llama")], monkeypatch, capsys)
    assert rc == 2 and "missing -o/--output" in err and "Traceback" not in err
    # click's own flag errors: one `error:` line naming the fix, exit 2, no usage block
    for args, needle in (([tiny_model_dir("llama"), "-o", tmp_path / "e", "--precision", "int4"],
                          "Invalid value for '--precision'"),
                         ([], "Missing argument 'SRC'"),
                         ([tiny_model_dir("llama"), "--frobnicate"], "--frobnicate")):
        rc, _, err = run_cli(args, monkeypatch, capsys)
        cli_helpers.assert_one_line_error(rc, err, needle, "caprese-export --help", code=2)
        assert len(err.strip().splitlines()) == 1 and "Usage:" not in err, err
    rc, _, err = run_cli([tmp_path, "--check"], monkeypatch, capsys)
    assert_one_line_error(rc, err, "--check alone needs an engine folder or an .onnx file")


def test_failed_export_leaves_nothing(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import caprese.export.exporter as exporter

    def boom(*a, **k):
        raise RuntimeError("simulated failure while writing the graphs")

    monkeypatch.setattr(exporter, "build_graphs", boom)
    with pytest.raises(RuntimeError):
        exporter.export(tiny_model_dir("llama"), tmp_path / "engine", max_seq_len=32)
    assert not (tmp_path / "engine").exists() and leftovers(tmp_path, "engine") == []


def test_magnitude_artifact_is_refused(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from export_helpers import method_artifact

    art = method_artifact(tiny_model_dir("llama"), tmp_path / "art", "magnitude", rank=0, layers="first-half")
    rc, _, err = run_cli([art, "-o", tmp_path / "e"], monkeypatch, capsys)
    assert_one_line_error(rc, err, "magnitude", "not supported yet")


def test_onnxruntime_target_cli(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """--target onnxruntime: written with its target in the manifest; refused where it cannot serve (TensorRT
    plans, the TensorRT check, per-head q/k norms, batch > 1); an unknown target in a manifest is refused too."""
    out = tmp_path / "ort"
    rc, stdout, err = run_cli([tiny_model_dir("qwen2"), "-o", out, "--max-seq-len", "48", "--target", "onnxruntime"],
                              monkeypatch, capsys)
    assert rc == 0, err
    m = load_manifest(out)
    assert m.data["target"] == "onnxruntime" and m.data["tensorrt_check"] is None
    for extra, needles in ((["--engine"], ("--engine", "drop --target onnxruntime")),
                           (["--max-batch", "2"], ("batch 1", "--max-batch 1"))):
        rc, _, err = run_cli([tiny_model_dir("qwen2"), "-o", tmp_path / "x", "--target", "onnxruntime"] + extra,
                             monkeypatch, capsys)
        assert_one_line_error(rc, err, *needles)
    rc, _, err = run_cli([tiny_model_dir("qwen3"), "-o", tmp_path / "x", "--target", "onnxruntime"], monkeypatch,
                         capsys)
    assert_one_line_error(rc, err, "q/k per head", "--target tensorrt")
    rc, _, err = run_cli([tiny_model_dir("qwen2"), "-o", tmp_path / "x", "--target", "onnxruntime", "--check"],
                         monkeypatch, capsys)
    assert rc == 2 and "--check is the TensorRT operator check" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()

    from caprese.errors import CapreseError
    from caprese.runtime.tensorrt_backend import TensorRTBackend

    with pytest.raises(CapreseError, match="ONNX Runtime-only graphs"):
        TensorRTBackend(m)
    data = json.loads((out / "manifest.json").read_text())
    data["target"] = "openvino"
    (out / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(CapreseError, match="unknown target 'openvino'"):
        load_manifest(out)
