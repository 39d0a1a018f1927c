"""caprese.evaluation and `caprese eval`: answer extraction, task loading, scoring on tiny models, the command.

The scoring checks are independent of the evaluation pipeline: golds are taken from TextModel.generate's own
unbatched replies, so the dense model must score exactly 1.0 on them (and 0.0 on shifted golds).
"""

from __future__ import annotations

import json
import re
import sys

import click
import pytest
import torch

from caprese.calibration.methods import apply_method
from caprese.calibration.problems import eval_prompt, problems
from caprese.calibration.source import open_source
from caprese.cli.entry import run
from caprese.cli.eval_command import eval_command
from caprese.errors import CapreseError
from caprese.evaluation import Task, evaluate, extra_parameter_share, extract_answer, is_correct, load_task
from caprese.model.text_model import TextModel


# ---------------------------------------------------------------- answers

@pytest.mark.parametrize("text, expected", [
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
    ("#### 1,234", "1234"),
    ("first 3 then 5\n####  -7 \nmore 9", "-7"),
    ("####", None),
    ("the sum is 5 and \\boxed{12} then 99", "12"),
    ("\\boxed{1} and later \\boxed{2}", "2"),
    ("\\boxed{\\$1,234.00}", "1234"),
    ("\\boxed{18 \\text{ apples}}", "18"),
    ("\\boxed{\\frac{3}{4}}", "3/4"),
    ("\\boxed{x^{2}+1}", "x^{2}+1"),
    ("So 12 + 30 = 42.", "42"),
    ("She pays $1,234.50 in total.", "1234.50"),
    ("That is 2,000,000 people", "2000000"),
    ("It is 42.0", "42"),
    ("It is 42.00.", "42"),
    ("The temperature is -5 degrees", "-5"),
    ("60-12 = 48", "48"),
    ("x = -2.5", "-2.5"),
    ("items 3, 4, 5", "5"),
    ("no numbers here", None),
    ("", None),
    (None, None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("pred, gold, ok", [
    ("42", "42", True), ("42.0", "42", True), ("42", 42, True), ("1,234", "1234", True), ("$5", "5", True),
    ("0.50", "0.5", True), ("3/4", "0.75", True), ("-3", "3", False), ("41", "42", False), (None, "42", False),
    ("42", None, False), ("Yes", "yes", True), ("x+1", "x+2", False),
])
def test_is_correct(pred, gold, ok):
    assert is_correct(pred, gold) is ok


# ---------------------------------------------------------------- tasks

def test_arithmetic_task_is_the_builtin_test_split():
    task = load_task("arithmetic", 7)
    assert task.name == "arithmetic" and len(task) == 7
    tail = " Give the final answer as a number at the end."
    assert task.items[:4] == [  # literal: the eval set is pinned (problems.PROBLEM_SET_VERSION 2)
        ("Mia buys 3 bags with 3 stickers in each bag. How many stickers does Mia have?" + tail, "9"),
        ("What is 26 + 36?" + tail, "62"),
        ("What is 11 times 5?" + tail, "55"),
        ("What is 39 - 17?" + tail, "22")]
    full = load_task("arithmetic", None)
    assert len(full) == 200 and full.items[:7] == task.items
    for prompt, gold in full.items:  # every gold is the arithmetic its prompt asks for, computed here
        assert prompt.endswith(tail)
        a, b = (int(x) for x in re.findall(r"\d+", prompt))
        want = a + b if (" + " in prompt or "more" in prompt) else a - b if (" - " in prompt or "gave" in prompt) \
            else a * b
        assert gold == str(want), prompt


def test_jsonl_task_reads_gsm8k_and_prompt_lines(tmp_path):
    f = tmp_path / "t.jsonl"
    lines = [json.dumps({"question": "Ann has 3 cats and gets 2. How many?", "answer": "3+2=5\n#### 5"}), "",
             json.dumps({"prompt": "What is 6*7?", "answer": 42}),
             json.dumps({"prompt": "Price?", "answer": "$1,200"}),
             json.dumps({"text": "no prompt here", "answer": "1"}),
             json.dumps({"prompt": "no answer"}),
             json.dumps({"question": "Last one?", "answer": "#### -2"})]
    f.write_text("\n".join(lines) + "\n")
    task = load_task(f"jsonl:{f}", None)
    assert task.name == "jsonl:t.jsonl"
    assert [g for _, g in task.items] == ["5", "42", "1200", "-2"]
    assert task.items[0][0].startswith("Ann has 3 cats and gets 2. How many?")
    assert task.items[1][0] == "What is 6*7?"  # a prompt is sent verbatim
    assert len(load_task(f"jsonl:{f}", 2)) == 2


def test_task_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "answer": "1"}) + "\n{not json\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"foo": 1}) + "\n\n")
    arr = tmp_path / "arr.jsonl"
    arr.write_text("[1, 2]\n")
    cases = [(f"jsonl:{tmp_path / 'missing.jsonl'}", "does not exist"), (f"jsonl:{bad}", "line 2"),
             (f"jsonl:{empty}", "no usable items"), (f"jsonl:{arr}", "line 1"), ("gsm9k", "unknown task"),
             ("jsonl:", "needs a file")]
    for spec, needle in cases:
        with pytest.raises(CapreseError) as e:
            load_task(spec, 10)
        assert needle in str(e.value) and "\n" not in str(e.value), (spec, str(e.value))
    with pytest.raises(CapreseError):
        load_task("arithmetic", 0)


# ---------------------------------------------------------------- evaluate

def _prompts() -> list[str]:
    words = ["the cat counts three apples", "What is 7 + 5?", "It is 42 out of 100!", "my friend reads a long book",
             "the robot computes the final answer", "How many numbers does the teacher write?"]
    return words + [eval_prompt(p) for p in problems("test", 10)]


def test_evaluate_scores_exactly_against_the_models_own_replies(tiny_model_dir):
    tm = TextModel.load(tiny_model_dir("llama"))
    ref = {p: tm.generate(p, chat=True, max_new_tokens=20) for p in _prompts()}
    answered = {p: extract_answer(r.text) for p, r in ref.items() if extract_answer(r.text) is not None}
    assert len(answered) >= 3, "the tiny model should put a number in some replies"
    right = Task("own", [(p, a) for p, a in answered.items()])
    res = evaluate(tm, right, max_new_tokens=20, batch_size=4, progress=False)
    assert (res.accuracy, res.correct, res.total) == (1.0, len(answered), len(answered))
    for rec, (p, _) in zip(res.records, right.items):
        assert rec.prompt == p and rec.text == ref[p].text and rec.token_ids == ref[p].tokens
        assert rec.tokens == len(ref[p].tokens) and rec.stop_reason == ref[p].stop_reason
    assert res.mean_generated_tokens == pytest.approx(sum(len(ref[p].tokens) for p in answered) / len(answered))
    assert res.extra_params_pct == 0.0 and res.label == "dense" and res.wall_s > 0

    wrong = Task("shifted", [(p, a + "1") for p, a in answered.items()]
                 + [(p, "0") for p in ref if p not in answered])
    res = evaluate(tm, wrong, max_new_tokens=20, batch_size=3, progress=False)
    assert (res.accuracy, res.correct, res.total) == (0.0, 0, len(ref))
    d = res.to_dict()
    assert set(d) >= {"accuracy", "correct", "total", "mean_generated_tokens", "extra_params_pct", "label"}


def test_progress_ticks_once_per_problem_as_its_reply_ends(tiny_model_dir, monkeypatch):
    """The bar moves by one problem when that problem's reply ends, inside its batch (not once per batch)."""
    import collections

    import tqdm

    from caprese.model.generation import generate

    ev = sys.modules["caprese.evaluation.evaluate"]  # the module (the package's `evaluate` is the function)

    tm = TextModel.load(tiny_model_dir("llama"))
    prompts = _prompts()[:8]
    ids = [tm.encode(p, chat=True) for p in prompts]
    free = [generate(tm.decoder, x, 16, eos_ids=()).tokens[0] for x in ids]
    # a stop id that ends the replies at different steps: the most common token among steps 1..10
    stop = collections.Counter(t for f in free for t in f[1:10]).most_common(1)[0][0]
    ends = sorted({f.index(stop) for f in free if stop in f})
    assert len(ends) >= 2, "the replies should stop at different steps"
    monkeypatch.setattr(tm, "eos_ids", (stop,))

    # generate()'s own report: rows in the order their replies end, each once
    done: list[int] = []
    res = generate(tm.decoder, ids, 16, eos_ids=(stop,), on_row_done=done.append)
    stop_step = [len(t) if r == "eos" else 16 for t, r in zip(res.tokens, res.stop_reason)]
    assert done == sorted(range(len(ids)), key=lambda i: (stop_step[i], i))

    inside = {"generate": False}
    real_generate = ev.generate

    def tracked(*a, **k):
        inside["generate"] = True
        try:
            return real_generate(*a, **k)
        finally:
            inside["generate"] = False

    ticks = []

    class Bar:
        def __init__(self, total, **kw):
            self.total, self.kw = total, kw

        def update(self, n):
            ticks.append((n, inside["generate"]))

        def close(self):
            pass

    monkeypatch.setattr(ev, "generate", tracked)
    monkeypatch.setattr(tqdm, "tqdm", Bar)
    out = evaluate(tm, Task("t", [(p, "0") for p in prompts]), max_new_tokens=16, batch_size=8)
    assert out.total == len(prompts)
    assert ticks == [(1, True)] * len(prompts)  # one per problem, each while its batch is still running


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma2"])
def test_batched_equals_unbatched_dense(tiny_model_dir, kind):
    tm = TextModel.load(tiny_model_dir(kind))
    task = Task("mix", [(p, "0") for p in _prompts()])
    one = evaluate(tm, task, max_new_tokens=16, batch_size=1, progress=False)
    assert len({len(tm.encode(p, chat=True)) for p, _ in task.items}) > 3  # real left padding happens
    for bs in (3, 16):
        many = evaluate(tm, task, max_new_tokens=16, batch_size=bs, progress=False)
        assert [r.token_ids for r in many.records] == [r.token_ids for r in one.records], (kind, bs)


@pytest.mark.parametrize("method", ["griffin", "cats"])
def test_batched_equals_unbatched_prompt_adaptive(tiny_model_dir, method):
    """GRIFFIN / CATS statistics must ignore the pad slots (FFNContext.valid) or batching would change answers."""
    tm = open_source(tiny_model_dir("llama"), method, 0.5, "all")
    task = Task("mix", [(p, "0") for p in _prompts()])
    one = evaluate(tm, task, max_new_tokens=12, batch_size=1, progress=False)
    many = evaluate(tm, task, max_new_tokens=12, batch_size=16, progress=False)
    assert [r.token_ids for r in many.records] == [r.token_ids for r in one.records]


def _hand_count_llama3() -> int:
    # tests/tiny_models.py "llama3": D 64, D_FF 128, 2 layers, 4 heads x 16, 1 KV head, vocab 384, tied, no biases
    d, f, hd, heads, kv, vocab = 64, 128, 16, 4, 1, 384
    per_layer = d * heads * hd + 2 * d * kv * hd + heads * hd * d + 3 * d * f + 2 * d
    return vocab * d + 2 * per_layer + d


def test_extra_parameter_share(tiny_model_dir):
    tm = TextModel.load(tiny_model_dir("llama3"))
    assert extra_parameter_share(tm) == 0.0
    apply_method(tm.decoder, "griffin", 0.5, "all")  # no adapters: plain GRIFFIN adds nothing
    assert extra_parameter_share(tm) == 0.0
    apply_method(tm.decoder, "griffin", 0.5, [0], rank=4)
    assert extra_parameter_share(tm) == pytest.approx(100 * 2 * 64 * 4 / _hand_count_llama3())
    apply_method(tm.decoder, "cats", 0.5, "all", rank=8)
    assert extra_parameter_share(tm) == pytest.approx(100 * 2 * (2 * 64 * 8) / _hand_count_llama3())


def test_evaluate_rejects_too_long_requests(tiny_model_dir):
    tm = TextModel.load(tiny_model_dir("llama"))
    with pytest.raises(CapreseError, match="context"):
        evaluate(tm, Task("t", [("hi", "1")]), max_new_tokens=1000, progress=False)


# ---------------------------------------------------------------- the command

@click.group()
def _cli() -> None:
    pass


_cli.add_command(eval_command, "eval")


def run_eval(args, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["caprese", "eval", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        run(_cli)
        raise SystemExit(0)
    out = capsys.readouterr()
    return exc.value.code or 0, out.out, out.err


FIELDS = ("accuracy", "correct", "total", "mean_generated_tokens", "extra_params_pct", "label", "wall_s")


def test_eval_json_plain_folder(tiny_model_dir, monkeypatch, capsys):
    folder = tiny_model_dir("llama")
    common = ["--limit", 5, "-n", 10, "--batch-size", 2, "--json"]
    rc, out, err = run_eval([folder, "--method", "griffin", *common], monkeypatch, capsys)
    assert rc == 0, err
    obj = json.loads(out)
    for key in FIELDS:
        assert key in obj and key in obj["dense"]
    assert obj["label"].startswith("griffin") and obj["dense"]["label"] == "dense"
    assert obj["total"] == obj["dense"]["total"] == 5 and 0 <= obj["accuracy"] <= 1
    assert obj["extra_params_pct"] == 0.0

    rc, out, err = run_eval([folder, *common], monkeypatch, capsys)  # dense SRC: evaluated once, reused
    obj = json.loads(out)
    assert rc == 0 and obj["label"] == "dense" and obj["dense"]["correct"] == obj["correct"]
    rc, out, err = run_eval([folder, "--method", "cats", "--no-dense", *common], monkeypatch, capsys)
    assert rc == 0 and json.loads(out)["dense"] is None

    rc, out, err = run_eval([folder, "--method", "magnitude", "--limit", 3, "-n", 6, "--quiet"], monkeypatch, capsys)
    assert rc == 0, err
    rows = out.strip().splitlines()
    assert "accuracy %" in rows[1] and rows[3].startswith("dense") and rows[4].startswith("magnitude")


def test_eval_artifact_against_its_base(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from caprese.calibration.artifact import Artifact, collect_adapters, fingerprint, save_artifact

    base = tiny_model_dir("llama3")
    tm = TextModel.load(base)
    layers = apply_method(tm.decoder, "griffin", 0.5, [0, 1], rank=4)
    for f in (tm.decoder.layers[i].mlp for i in layers):
        torch.nn.init.normal_(f.bypass.R, std=0.05)
    art = Artifact(None, str(base), fingerprint(base), "griffin", 0.5, layers, 4,
                   adapters=collect_adapters(tm.decoder))
    out_dir = save_artifact(art, tmp_path / "art")
    save = tmp_path / "records.jsonl"
    rc, out, err = run_eval([out_dir, "--limit", 4, "-n", 8, "--json", "--save", save], monkeypatch, capsys)
    assert rc == 0, err
    obj = json.loads(out)
    assert obj["label"].startswith("caprese(griffin")
    assert obj["extra_params_pct"] == pytest.approx(100 * 2 * (2 * 64 * 4) / _hand_count_llama3())
    assert obj["dense"]["label"] == "dense" and obj["dense"]["extra_params_pct"] == 0.0
    recs = [json.loads(ln) for ln in save.read_text().splitlines()]
    assert len(recs) == 8 and {"prompt", "gold", "prediction", "text", "tokens"} <= set(recs[0])


def test_eval_help_and_one_line_errors(tiny_model_dir, tmp_path, monkeypatch, capsys):
    rc, out, _ = run_eval(["--help"], monkeypatch, capsys)
    assert rc == 0
    for opt in ("--task", "--limit", "--method", "--density", "--layers", "--base-model", "--reselect-every",
                "--max-new-tokens", "--batch-size", "--precision", "--no-dense", "--json"):
        assert opt in out
    folder = tiny_model_dir("llama")
    cases = [([tmp_path / "nope"], "does not exist"), ([folder, "--task", "mmlu"], "unknown task"),
             ([folder, "--density", "0"], "--density"), ([folder, "--density", "1.5"], "--density"),
             ([folder, "--task", f"jsonl:{tmp_path / 'x.jsonl'}"], "does not exist"),
             ([folder, "--base-model", folder], "artifact"),
             ([folder, "--method", "griffin", "--layers", "7"], "outside"),
             ([folder, "-n", 5000, "--limit", 2], "context"),
             # what --method would prune, without --method: refused, not silently dense
             ([folder, "--density", "0.3"], "--density and --layers choose what --method prunes"),
             ([folder, "--layers", "0"], "--density and --layers choose what --method prunes"),
             ([folder, "--limit", 1, "--save", tmp_path / "afile" / "x.jsonl"], "afile is a file, not a folder")]
    (tmp_path / "afile").write_text("")
    for args, needle in cases:
        rc, out, err = run_eval(args, monkeypatch, capsys)
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        assert rc == 2 and "Traceback" not in err, (args, err)
        assert lines[-1].startswith(("error:", "Error:")) and needle in err, (args, err)


def test_one_reply_budget_for_cli_api_and_the_readme_table(monkeypatch, capsys):
    """`caprese eval`, evaluate() and tools/calibration_table.py (the README's accuracy table) share one default."""
    import inspect
    import subprocess
    from pathlib import Path

    from caprese.calibration.problems import EVAL_MAX_NEW_TOKENS
    from caprese.cli.main import main as caprese_main
    from cli_helpers import run_cli

    assert EVAL_MAX_NEW_TOKENS == 128  # the README's accuracy tables were measured with 128 new tokens
    assert inspect.signature(evaluate).parameters["max_new_tokens"].default == EVAL_MAX_NEW_TOKENS
    opt = next(p for p in eval_command.params if p.name == "max_new_tokens")
    assert opt.default == EVAL_MAX_NEW_TOKENS
    rc, out, _ = run_cli(caprese_main, ["eval", "--help"], monkeypatch, capsys)
    assert rc == 0 and f"earlier). [default: {EVAL_MAX_NEW_TOKENS};" in " ".join(out.split()), out
    tool = Path(__file__).resolve().parent.parent / "tools" / "calibration_table.py"
    p = subprocess.run([sys.executable, str(tool), "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and f"(default {EVAL_MAX_NEW_TOKENS}," in " ".join(p.stdout.split()), p.stdout + p.stderr

