"""`caprese eval ENGINE_DIR` / `evaluate_engine`: an exported engine scored on its runtime.

Reference: the PyTorch model the engine came from, scored by `evaluate` (transformers-parity decoder). fp32 tiny
models give the same greedy tokens on ONNX Runtime and in PyTorch (the export parity tests hold logits to 1e-4),
so every record must match exactly: same reply ids, text, answer, stop reason.
"""

from __future__ import annotations

import json

import pytest

from caprese.calibration.source import open_source
from caprese.cli.main import main
from caprese.evaluation import Task, evaluate, evaluate_engine
from cli_helpers import assert_one_line_error, run_cli
from export_helpers import get_export


def _task(n: int = 6) -> Task:
    """Short prompts (the tiny tokenizer spends ~100 tokens on a built-in problem; the test engines hold 96)."""
    prompts = ["the cat counts three apples", "What is 7 + 5?", "It is 42 out of 100!", "my friend reads a book",
               "the robot computes the final answer", "How many numbers does the teacher write?"]
    return Task("short", [(p, str(i)) for i, p in enumerate(prompts[:n])])


@pytest.mark.parametrize("method", ["dense", "griffin"])
def test_engine_scores_equal_its_source_models(method, tmp_path_factory, tiny_model_dir):
    from caprese.runtime import Generator

    engine, src = get_export(tmp_path_factory, tiny_model_dir, "llama", method)
    task = _task()
    ref = evaluate(open_source(src), task, max_new_tokens=12, batch_size=1, progress=False)
    got = evaluate_engine(Generator.load(engine, backend="onnxruntime"), task, max_new_tokens=12, progress=False)
    assert (got.correct, got.total) == (ref.correct, ref.total)
    for a, b in zip(got.records, ref.records):
        assert (a.prompt, a.token_ids, a.text, a.prediction, a.stop_reason) == \
               (b.prompt, b.token_ids, b.text, b.prediction, b.stop_reason)
    assert got.extra_params_pct == pytest.approx(ref.extra_params_pct, rel=1e-9)
    assert (got.extra_params_pct > 0) == (method != "dense")
    assert got.label.endswith("[onnxruntime]")


def test_engine_eval_counts_right_and_wrong_answers(tmp_path_factory, tiny_model_dir):
    """Golds taken from the engine's own replies score 100%, shifted golds 0%: the scoring cannot pass blindly."""
    from caprese.runtime import Generator

    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "llama", "dense")
    g = Generator.load(engine, backend="onnxruntime")
    first = evaluate_engine(g, _task(6), max_new_tokens=12, progress=False)
    answered = [(r.prompt, r.prediction) for r in first.records if r.prediction is not None]
    assert answered, "the tiny model should put a number in some replies"
    right = evaluate_engine(g, Task("own", answered), max_new_tokens=12, progress=False)
    wrong = evaluate_engine(g, Task("shifted", [(p, a + "1") for p, a in answered]), max_new_tokens=12,
                            progress=False)
    assert (right.correct, wrong.correct) == (len(answered), 0)


def test_eval_cli_on_an_engine_folder(tmp_path_factory, tiny_model_dir, tmp_path, monkeypatch, capsys):
    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "llama", "dense")
    save = tmp_path / "records.jsonl"
    task = tmp_path / "short.jsonl"
    task.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in _task(3).items))
    rc, out, err = run_cli(main, ["eval", engine, "--task", f"jsonl:{task}", "-n", 8, "--json", "--quiet", "--save",
                                 save], monkeypatch, capsys)
    assert rc == 0, err
    d = json.loads(out)
    from caprese.export.manifest import load_manifest
    from caprese.runtime.engine_options import choose_backend

    auto = choose_backend(load_manifest(engine), "cpu")[0]  # native where its C kernel builds, else onnxruntime
    assert (d["total"], d["backend"], d["dense"], d["label"]) == (3, auto, None, f"dense [{auto}]")
    assert d["backend_requested"] == "auto"
    assert len(save.read_text().splitlines()) == 3

    rc, out, err = run_cli(main, ["eval", engine, "--method", "griffin"], monkeypatch, capsys)
    assert_one_line_error(rc, err, "exported engine", "--method")
    rc, out, err = run_cli(main, ["eval", tiny_model_dir("llama"), "--backend", "native"], monkeypatch, capsys)
    assert_one_line_error(rc, err, "--backend applies to an exported engine folder")


def test_a_quantized_engine_is_labelled_with_its_weights(tmp_path_factory, tiny_model_dir):
    """An int4 engine's score must not read as the fp32 model's: the label names the weight width and block."""
    from caprese.export.manifest import load_manifest
    from caprese.runtime.generator import method_label
    from quantized_export_helpers import q_export

    engine, _ = q_export(tmp_path_factory, tiny_model_dir, "llama3", "dense", "int4", 32, target="onnxruntime")
    assert method_label(load_manifest(engine)) == "dense int4/32"
    engine, _ = q_export(tmp_path_factory, tiny_model_dir, "llama3", "griffin", "int8", target="onnxruntime")
    assert method_label(load_manifest(engine)).endswith(" int8/row")
    engine, _ = q_export(tmp_path_factory, tiny_model_dir, "llama3", "dense", "int4", 32, target="onnxruntime",
                         int8_activations=True)
    assert method_label(load_manifest(engine)) == "dense int4/32+a8"  # int8 activations: another computation
