"""The `caprese` CLI: help, JSON output against transformers' greedy tokens, and one-line errors for bad input.

Most cases call the console entry point in-process (`caprese.cli.main.main`, the same wrapper the installed
script runs) to stay fast; two run the real installed scripts in a subprocess to check exit codes end to end.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from caprese.cli.main import main as caprese_main
from cli_helpers import assert_one_line_error, run_cli

BIN = Path(sys.executable).parent


def test_help_explains_commands(monkeypatch, capsys):
    rc, out, _ = run_cli(caprese_main, ["--help"], monkeypatch, capsys)
    assert rc == 0 and "generate" in out and "fetch-default" in out
    rc, out, _ = run_cli(caprese_main, ["generate", "--help"], monkeypatch, capsys)
    assert rc == 0
    for opt in ("--prompt", "--chat", "--max-new-tokens", "--json", "--temperature", "--top-p", "--seed"):
        assert opt in out


def test_generate_json_matches_transformers_greedy(tiny_model_dir, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_model_dir("llama")
    rc, out, err = run_cli(caprese_main, ["generate", folder, "--chat", "-p", "the cat sat", "-n", "12", "--json"],
                           monkeypatch, capsys)
    assert rc == 0, err
    obj = json.loads(out)
    for key in ("text", "tokens_generated", "prompt_tokens", "ttft_ms", "ms_per_token", "tokens_per_s"):
        assert key in obj
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok.apply_chat_template([{"role": "user", "content": "the cat sat"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    hf = AutoModelForCausalLM.from_pretrained(folder)
    ref = hf.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
    stops = {2, 4}
    cut = next((i for i, t in enumerate(ref) if t in stops), len(ref))
    assert obj["prompt_tokens"] == ids.shape[1]
    assert obj["tokens_generated"] == min(len(ref), cut + 1)
    assert obj["text"] == tok.decode(ref[:cut], skip_special_tokens=True)


def test_generate_streams_text_and_reports_latency(tiny_model_dir, monkeypatch, capsys):
    rc, out, err = run_cli(caprese_main, ["generate", tiny_model_dir("qwen2"), "-p", "a b c", "-n", "5",
                                          "--temperature", "0.8", "--top-p", "0.9", "--seed", "3"],
                           monkeypatch, capsys)
    assert rc == 0, err
    assert "ms/token" in err and "TTFT" in err
    rc2, out2, _ = run_cli(caprese_main, ["generate", tiny_model_dir("qwen2"), "-p", "a b c", "-n", "5",
                                          "--temperature", "0.8", "--top-p", "0.9", "--seed", "3"],
                           monkeypatch, capsys)
    assert out2 == out  # same seed, same text


@pytest.fixture
def broken_dirs(tiny_model_dir, tmp_path):
    good = tiny_model_dir("llama")

    def copy(name):
        d = tmp_path / name
        shutil.copytree(good, d)
        return d

    gpt2 = copy("gpt2")
    cfg = json.loads((gpt2 / "config.json").read_text())
    (gpt2 / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    corrupt = copy("corrupt")
    w = corrupt / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    notemplate = copy("notemplate")
    tc = json.loads((notemplate / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (notemplate / "tokenizer_config.json").write_text(json.dumps(tc))
    for f in notemplate.glob("chat_template.*"):
        f.unlink()
    afile = tmp_path / "afile.txt"
    afile.write_text("x")
    return {"gpt2": gpt2, "corrupt": corrupt, "notemplate": notemplate, "afile": afile, "good": good}


@pytest.mark.parametrize("case, extra, needles", [
    ("missing", [], ["not found"]),
    ("afile", [], ["got a file"]),
    ("gpt2", [], ["unsupported model_type", "gpt2"]),
    ("corrupt", [], ["corrupt weights", "model.safetensors"]),
    ("notemplate", ["--chat"], ["no chat template"]),
    ("good", ["-n", "100000"], ["exceeds the model's context"]),
])
def test_generate_bad_input_is_one_line(case, extra, needles, broken_dirs, tmp_path, monkeypatch, capsys):
    folder = broken_dirs.get(case, tmp_path / "does-not-exist")
    rc, out, err = run_cli(caprese_main, ["generate", folder, "-p", "hi", *extra], monkeypatch, capsys)
    assert_one_line_error(rc, err, *needles)
    assert out == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when no GPU is present")
def test_generate_cuda_without_gpu(broken_dirs, monkeypatch, capsys):
    rc, _, err = run_cli(caprese_main, ["generate", broken_dirs["good"], "-p", "hi", "--device", "cuda"],
                         monkeypatch, capsys)
    assert_one_line_error(rc, err, "no CUDA GPU")


@pytest.mark.parametrize("extra", [["--precision", "fp8"], ["-n", "0"], ["--top-p", "0"]])
def test_generate_bad_options_use_click_usage_errors(extra, broken_dirs, monkeypatch, capsys):
    rc, _, err = run_cli(caprese_main, ["generate", broken_dirs["good"], "-p", "hi", *extra], monkeypatch, capsys)
    assert rc == 2 and "Traceback" not in err and "Invalid value" in err


@pytest.mark.parametrize("args, needles", [
    (["generate", "M", "-p", "hi", "--no-such-flag"], ["No such option", "--no-such-flag", "caprese generate --help"]),
    (["generate"], ["Missing argument 'MODEL_DIR'", "caprese generate --help"]),
    (["generate", "M", "-p", "hi", "--precision", "fp8"], ["Invalid value for '--precision'", "'fp8'"]),
    (["eval", "M", "--limit", "0"], ["Invalid value for '--limit'", "caprese eval --help"]),
    (["eval", "M", "--method", "sparse"], ["Invalid value for '--method'"]),
    (["run"], ["Missing argument 'ENGINE_DIR'"]),
    (["run", "E", "-p", "hi", "--backend", "tpu"], ["Invalid value for '--backend'"]),
    (["calibrate", "M", "-o", "out", "--bogus"], ["No such option", "--bogus", "caprese calibrate --help"]),
    (["no-such-command"], ["No such command 'no-such-command'", "caprese --help"]),
])
def test_flag_errors_are_one_error_line_exit_2(args, needles, monkeypatch, capsys):
    """click's usage errors (bad option, missing argument, bad choice) read like every other error: one line."""
    rc, out, err = run_cli(caprese_main, args, monkeypatch, capsys)
    assert_one_line_error(rc, err, *needles, code=2)
    assert len(err.strip().splitlines()) == 1 and "Usage:" not in err and out == "", err


def test_installed_scripts_exit_codes(tmp_path):
    """The real console scripts: a user error exits 2 with one line, no traceback; --help exits 0."""
    p = subprocess.run([BIN / "caprese", "generate", tmp_path / "nope", "-p", "hi"], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "not found" in p.stderr, p.stderr
    p = subprocess.run([BIN / "caprese-export", "--help"], capture_output=True, text=True)
    assert p.returncode == 0 and "SRC" in p.stdout
    for script, args in (("caprese", ["eval", "M", "--nope"]), ("caprese-export", ["M", "--precision", "int3"])):
        p = subprocess.run([BIN / script, *args], capture_output=True, text=True)
        assert p.returncode == 2 and p.stderr.startswith("error: ") and p.stderr.count("\n") == 1, p.stderr
