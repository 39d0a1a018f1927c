"""`caprese run` and `caprese chat` on engine folders: JSON fields and text against `caprese generate`, the
streaming report, chat commands from stdin, Ctrl-C during a reply, one-line errors, and one chat driven through
a pseudo-terminal in a real process.

The commands are called through caprese.cli.entry.run (the wrapper the `caprese` script uses), so these tests
do not depend on the commands being registered in caprese.cli.main."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from caprese.cli.chat_command import chat_command
from caprese.cli.entry import run
from caprese.cli.main import main as caprese_main
from cli_helpers import assert_one_line_error, run_cli
from export_helpers import get_export

REPO = Path(__file__).resolve().parents[1]


def run_main():
    from caprese.cli.run_command import run_command

    run(run_command)


def chat_main():
    run(chat_command)


def test_run_json_has_generate_fields_and_same_text(tmp_path_factory, tiny_model_dir, monkeypatch, capsys):
    """A dense engine on ONNX Runtime writes the same greedy text as `caprese generate` on its source folder,
    with every field `caprese generate --json` has, plus the engine's own."""
    engine, src = get_export(tmp_path_factory, tiny_model_dir, "llama", "dense")
    args = ["--chat", "-p", "the cat sat", "-n", "12", "--json"]
    rc, out, err = run_cli(caprese_main, ["generate", src, *args], monkeypatch, capsys)
    assert rc == 0, err
    ref = json.loads(out)
    rc, out, err = run_cli(run_main, [engine, *args, "--threads", "1", "--backend", "onnxruntime"], monkeypatch,
                           capsys, prog="caprese run")
    assert rc == 0, err
    got = json.loads(out)
    assert set(ref) <= set(got), set(ref) - set(got)
    assert got["text"] == ref["text"] and got["tokens_generated"] == ref["tokens_generated"]
    assert got["backend"] == "onnxruntime" and got["method"] == ref["method"] == "dense"
    assert got["model_dir"] == got["engine_dir"] == str(engine) and got["precision"] == "fp32"
    for key in ("bytes_per_step", "gb_per_s", "peak_rss_mb", "kv_slots", "providers", "threads"):
        assert key in got, key
    assert got["threads"] == 1 and got["providers"] == ["CPUExecutionProvider"]


def test_generate_takes_an_engine_folder(tmp_path_factory, tiny_model_dir, monkeypatch, capsys):
    """`caprese generate ENGINE_DIR` runs the engine as `caprese run` does (same JSON, --backend auto by default:
    native for this fp32 engine on the CPU; --backend torch too); method flags on an engine folder, and --backend
    on a model folder, are one-line errors."""
    engine, src = get_export(tmp_path_factory, tiny_model_dir, "llama", "griffin")
    args = ["--chat", "-p", "the cat sat", "-n", "12", "--json"]
    rc, out, err = run_cli(run_main, [engine, *args], monkeypatch, capsys, prog="caprese run")
    assert rc == 0, err
    ref = json.loads(out)
    assert ref["backend"] == "native" and ref["backend_requested"] == "auto" and ref["backend_reason"]
    for extra, backend in (([], "native"), (["--backend", "torch"], "torch")):
        rc, out, err = run_cli(caprese_main, ["generate", engine, *args, *extra], monkeypatch, capsys)
        assert rc == 0, err
        got = json.loads(out)
        assert got["backend"] == backend and got["engine_dir"] == str(engine)
        assert got["backend_requested"] == ("auto" if not extra else backend)
        assert got["text"] == ref["text"] and got["method"] == ref["method"]
    rc, _, err = run_cli(caprese_main, ["generate", engine, "-p", "x", "--method", "cats"], monkeypatch, capsys)
    assert_one_line_error(rc, err, "is an engine folder", "drop --method")
    for flag, value in (("--density", "0.3"), ("--layers", "0")):  # fixed at export too: refused, not ignored
        rc, _, err = run_cli(caprese_main, ["generate", engine, "-p", "x", flag, value], monkeypatch, capsys)
        assert_one_line_error(rc, err, "is an engine folder", flag)
    rc, _, err = run_cli(caprese_main, ["generate", src, "-p", "x", "--backend", "torch"], monkeypatch, capsys)
    assert_one_line_error(rc, err, "--backend applies to engine folders")


def test_run_streams_and_reports(tmp_path_factory, tiny_model_dir, monkeypatch, capsys):
    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "qwen2", "griffin")
    rc, out, err = run_cli(run_main, [engine, "-p", "the cat", "-n", "8", "--backend", "torch", "--threads", "1",
                                      "--reselect-every", "4", "--ignore-eos"], monkeypatch, capsys)
    assert rc == 0, err
    assert out.endswith("\n") and out.strip()
    report = err.strip().splitlines()[-1]
    assert report.startswith("[caprese] prompt") and "generated 8" in report and "ms/token" in report
    assert "GB/s" in report and "peak RSS" in report and report.endswith("| backend: torch (length)")
    rc, out, err = run_cli(run_main, [engine, "-p", "the cat", "-n", "4", "--threads", "1"], monkeypatch, capsys)
    assert rc == 0, err
    assert "| backend: native (auto) (" in err.strip().splitlines()[-1]  # the default, --backend auto, says so


@pytest.fixture()
def broken_engines(tmp_path_factory, tiny_model_dir, tmp_path):
    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "llama", "griffin")
    bad = shutil.copytree(engine, tmp_path / "bad_version")
    data = json.loads((bad / "manifest.json").read_text())
    data["version"] = 99
    (bad / "manifest.json").write_text(json.dumps(data))
    moved = shutil.copytree(engine, tmp_path / "moved_source")
    data = json.loads((moved / "manifest.json").read_text())
    data["source"]["path"] = str(tmp_path / "gone")
    (moved / "manifest.json").write_text(json.dumps(data))
    return {"ok": engine, "bad_version": bad, "moved": moved, "missing": tmp_path / "nope",
            "model_folder": tiny_model_dir("llama"), "artifact": source_artifact(tmp_path_factory, tiny_model_dir)}


def source_artifact(tmp_path_factory, tiny_model_dir):
    _, src = get_export(tmp_path_factory, tiny_model_dir, "llama", "griffin")
    return src


@pytest.mark.parametrize("main", [run_main, chat_main], ids=["run", "chat"])
@pytest.mark.parametrize("case,extra,needles", [
    ("missing", [], ["engine folder not found"]),
    ("bad_version", [], ["engine format version 99", "export the model again"]),
    ("ok", ["--backend", "tensorrt"], ["TensorRT is not available"]),
    ("moved", ["--backend", "torch"], ["is missing", "--backend onnxruntime"]),
    ("model_folder", [], ["is a Hugging Face model folder, not an engine folder", "caprese-export ", "-o ENGINE_DIR"]),
    ("artifact", [], ["is a calibration artifact, not an engine folder", "caprese-export ", "-o ENGINE_DIR"]),
])
def test_errors_are_one_line(main, case, extra, needles, broken_engines, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    args = [broken_engines[case], *extra] + (["-p", "hi"] if main is run_main else [])
    monkeypatch.setattr(sys, "stdin", _Lines([]))
    rc, _, err = run_cli(main, args, monkeypatch, capsys)
    assert_one_line_error(rc, err, *needles, code=2)


class _Lines:
    """A non-tty stdin that input() reads line by line."""

    def __init__(self, lines):
        self._lines = [f"{ln}\n" for ln in lines]

    def readline(self):
        return self._lines.pop(0) if self._lines else ""

    def isatty(self):
        return False


def test_chat_from_stdin_lines(tmp_path_factory, tiny_model_dir, monkeypatch, capsys):
    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "llama", "griffin")
    lines = ["/stats", "the cat sat", "/stats", "and then", "/reset", "/stats", "/bogus", "", "the cat sat"]
    monkeypatch.setattr(sys, "stdin", _Lines(lines))
    rc, out, err = run_cli(chat_main, [engine, "-n", "6", "--threads", "1", "--json", "--system", "be brief",
                                       "--backend", "onnxruntime"], monkeypatch, capsys)
    assert rc == 0, err
    replies = [json.loads(line) for line in out.strip().splitlines()]
    assert [r["turn"] for r in replies] == [1, 2, 3]
    assert replies[1]["reused_tokens"] == replies[0]["prompt_tokens"] and replies[1]["context_tokens"] > \
        replies[0]["context_tokens"]
    assert replies[2]["text"] == replies[0]["text"] and replies[2]["reused_tokens"] == 0  # after /reset
    assert replies[0]["method"].startswith("caprese(griffin") and replies[0]["backend"] == "onnxruntime"
    notes = err.strip().splitlines()
    assert notes[0].startswith("[caprese] chat with") and "/reset" in notes[0]
    assert "no reply yet | context 0 of 96 tokens" in notes[1]
    assert "ms/token" in notes[2] and f"context {replies[0]['context_tokens']} of 96" in notes[2]
    assert notes[3] == "[caprese] new conversation" and "no reply yet | context 0" in notes[4]
    assert "unknown command /bogus" in notes[5]


def test_chat_context_full_message(tmp_path_factory, tiny_model_dir, monkeypatch, capsys):
    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "llama", "dense")
    monkeypatch.setattr("caprese.runtime.generator.stop_ids", lambda *a: ())  # replies run to their limit
    monkeypatch.setattr(sys, "stdin", _Lines(["the cat sat", "and then", "/reset", "/stats"]))
    rc, out, err = run_cli(chat_main, [engine, "-n", "200", "--threads", "1"], monkeypatch, capsys)
    assert rc == 0, err
    notes = err.strip().splitlines()[1:]
    assert notes[0] == ("[caprese] context full: the reply stopped at the engine's limit of 96 tokens; /reset to "
                        "start a new conversation")
    assert notes[1].startswith("[caprese] context full: this turn would bring the conversation to")
    assert notes[1].endswith("the engine holds 96; /reset to start a new conversation")
    assert notes[2:] == ["[caprese] new conversation", "[caprese] no reply yet | context 0 of 96 tokens"]


def test_chat_ctrl_c_stops_the_reply_not_the_chat(tmp_path_factory, tiny_model_dir, monkeypatch, capsys):
    """A real SIGINT during a reply: the reply ends after the current step, the chat goes on."""
    from caprese.runtime.conversation import Conversation

    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "llama", "dense")
    monkeypatch.setattr("caprese.runtime.generator.stop_ids", lambda *a: ())
    say = Conversation.say

    def say_and_interrupt(self, *a, **k):
        stream = say(self, *a, **k)
        inner = stream._tokens

        def tokens():
            for i, t in enumerate(inner):
                if i == 2 and len(self.messages) == 0:  # first turn only
                    os.kill(os.getpid(), signal.SIGINT)
                yield t

        stream._tokens = tokens()
        return stream

    monkeypatch.setattr(Conversation, "say", say_and_interrupt)
    monkeypatch.setattr(sys, "stdin", _Lines(["the cat sat", "and then"]))
    before = signal.getsignal(signal.SIGINT)  # Python's default handler; SIG_IGN where started in the background
    rc, out, err = run_cli(chat_main, [engine, "-n", "20", "--threads", "1", "--json"], monkeypatch, capsys)
    assert rc == 0, err
    first, second = [json.loads(line) for line in out.strip().splitlines()]
    assert first["stop_reason"] == "interrupted" and 3 <= first["tokens_generated"] <= 5
    assert second["stop_reason"] == "length" and second["tokens_generated"] == 20
    assert "[caprese] reply stopped" in err
    assert signal.getsignal(signal.SIGINT) is before  # restored


def _read_until(fd: int, needle: bytes, buf: bytearray, timeout: float = 60.0) -> bytes:
    end = time.monotonic() + timeout
    while needle not in buf:
        left = end - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out waiting for {needle!r}; got {bytes(buf)[-500:]!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                chunk = b""
            if not chunk:
                raise AssertionError(f"the chat ended while waiting for {needle!r}; got {bytes(buf)[-500:]!r}")
            buf += chunk
    i = buf.index(needle) + len(needle)
    out = bytes(buf[:i])
    del buf[:i]
    return out


def test_chat_in_a_pseudo_terminal(tmp_path_factory, tiny_model_dir):
    """`caprese chat` in its own process on a pty: prompt, a streamed reply, Ctrl-C at the prompt (the chat
    stays), /stats, Ctrl-D to leave with exit code 0."""
    import pty

    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "llama", "griffin")
    code = "from caprese.cli.entry import run; from caprese.cli.chat_command import chat_command; run(chat_command)"
    argv = [sys.executable, "-c", code, str(engine), "-n", "8", "--threads", "1"]
    pid, fd = pty.fork()
    if pid == 0:  # child: the pty is its controlling terminal
        try:
            os.chdir(REPO)
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # a background test run may have inherited SIG_IGN
            os.execv(sys.executable, argv)
        finally:
            os._exit(127)
    buf = bytearray()
    try:
        _read_until(fd, b"> ", buf)
        os.write(fd, b"the cat sat\n")
        reply = _read_until(fd, b"> ", buf)
        assert reply.startswith(b"the cat sat\r\n")  # the terminal echo, then the streamed reply
        time.sleep(1.0)  # readline sets the terminal up after printing the prompt; a ^C sent before that is lost
        os.write(fd, b"\x03")  # Ctrl-C at the prompt
        note = _read_until(fd, b"> ", buf)
        assert b"Ctrl-D or /exit to quit" in note
        os.write(fd, b"/stats\n")
        stats = _read_until(fd, b"> ", buf)
        assert b"ms/token" in stats and b"context" in stats
        os.write(fd, b"\x04")  # Ctrl-D on an empty line: end of input
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
