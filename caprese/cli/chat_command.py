"""`caprese chat ENGINE_DIR`: an interactive, multi-turn chat on an engine folder (caprese.runtime.Conversation).

Replies stream as they are generated; the KV cache is kept between turns. Lines starting with / are commands:
/reset (new conversation), /stats (the last reply's latency report and the context used), /exit. Ctrl-C
stops the reply being written and keeps the chat going; Ctrl-D (end of input) or /exit leaves.
"""

from __future__ import annotations

import json
import signal
import sys

import click

from caprese.cli.options import engine_options, generation_options
from caprese.cli.run_command import describe, open_generator

HELP = "/reset starts over, /stats reports, /exit quits; Ctrl-C stops a reply"


def _note(msg: str) -> None:
    click.echo(f"[caprese] {msg}", err=True)


def _read(prompt: str) -> str | None:
    """One input line; None at end of input. Ctrl-C at the prompt clears the line and asks again."""
    while True:
        try:
            return input(prompt)
        except EOFError:
            return None
        except KeyboardInterrupt:
            click.echo("")
            _note("(Ctrl-D or /exit to quit)")


def _reply(conv, text: str, run, as_json: bool):
    """Stream one reply (RunOptions `run`); SIGINT ends it after the current step instead of raising."""
    stream = conv.say(text, run.max_new_tokens, run.sampling, run.reselect_every)
    old = signal.signal(signal.SIGINT, lambda *_: stream.stop()) if _main_thread() else None
    try:
        for piece in stream:
            if not as_json:
                sys.stdout.write(piece)
                sys.stdout.flush()
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)
        result = stream.close()
    return result


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


@click.command("chat", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("engine_dir", type=click.Path(path_type=str))
@generation_options(prompt=False, max_new_tokens=512, system_help="System message of the conversation.",
                    new_tokens_help="Longest reply per turn (EOS stops earlier; the engine's max_seq_len bounds the "
                                    "conversation).")
@engine_options
@click.option("--json", "as_json", is_flag=True,
              help="Print each reply as one JSON object (text + latency) instead of streaming it.")
def chat_command(engine_dir, run, engine, as_json) -> None:
    """Chat with an engine folder from `caprese-export` (reads your turns from stdin).

    \b
    /reset   start a new conversation (the system message stays)
    /stats   latency report of the last reply, and how much of the context is used
    /exit    quit (so does Ctrl-D); Ctrl-C stops the reply being written
    """
    from caprese.runtime.conversation import ContextFull, Conversation

    g = open_generator(engine_dir, engine)
    conv = Conversation(g, run.system)
    tty = sys.stdin.isatty()
    if tty:
        try:
            import readline  # noqa: F401  (line editing for input())
        except ImportError:
            pass
    auto = " (auto)" if g.backend_requested == "auto" else ""
    _note(f"chat with {engine_dir} ({g.label}, {g.backend.name}{auto}, context {g.max_seq_len} tokens); {HELP}")
    turn = 0
    while True:
        line = _read("> " if tty else "")
        if line is None:
            if tty:
                click.echo("")
            return
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd = text.split()[0].lower()
            if cmd in ("/exit", "/quit"):
                return
            if cmd == "/reset":
                conv.reset()
                _note("new conversation")
            elif cmd == "/stats":
                used = f"context {conv.context_tokens} of {g.max_seq_len} tokens"
                _note(f"{conv.last.report()} | {used}" if conv.last else
                      f"no reply yet | {used}")
            else:
                _note(f"unknown command {cmd}; {HELP}")
            continue
        try:
            result = _reply(conv, line, run, as_json)
        except ContextFull as e:
            _note(str(e))
            continue
        turn += 1
        if as_json:
            click.echo(json.dumps({"turn": turn, **result.to_dict(), "context_tokens": conv.context_tokens,
                                   **describe(g, engine_dir)}))
        else:
            click.echo("")
        if result.stop_reason == "interrupted":
            _note("reply stopped")
        elif result.stop_reason == "context":
            _note(f"context full: the reply stopped at the engine's limit of {g.max_seq_len} tokens; "
                  "/reset to start a new conversation")
