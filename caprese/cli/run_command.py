"""`caprese run ENGINE_DIR -p TEXT`: one generation on an engine folder from `caprese-export` (caprese.runtime).

Also holds what `caprese chat` and `caprese generate ENGINE_DIR` share with it: opening the Generator from
EngineOptions, describing it for --json.
"""

from __future__ import annotations

import json
import sys

import click

from caprese.cli.options import engine_options, generation_options


def open_generator(engine_dir: str, engine):
    """The Generator of ENGINE_DIR on EngineOptions `engine` (backend "auto" resolved there)."""
    from caprese.runtime.generator import Generator

    return Generator.open(engine_dir, engine)


def describe(g, engine_dir: str) -> dict:
    """The fields `caprese generate --json` prints besides the result, plus the backend's own."""
    d = {"model_dir": str(engine_dir), "engine_dir": str(engine_dir), "method": g.label,
         "backend": g.backend.name, "backend_requested": g.backend_requested, "device": g.backend.device,
         "precision": g.manifest.spec.precision}
    if g.backend_reason:
        d["backend_reason"] = g.backend_reason
    return {**d, **g.backend.describe()}


@click.command("run", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("engine_dir", type=click.Path(path_type=str))
@generation_options(ignore_eos=True)
@engine_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (text + latency) instead of streaming.")
def run_command(engine_dir, prompt, run, engine, as_json) -> None:
    """Generate a reply with an engine folder from `caprese-export`.

    Text streams to stdout; the latency report (time to first token, ms per output token, achieved GB/s,
    peak memory, the backend that ran) goes to stderr. With --json, stdout gets one object with the fields of
    `caprese generate --json` plus bytes_per_step, gb_per_s, peak_rss_mb, kv_slots and the backend's own.
    """
    run_engine(engine_dir, prompt, run, engine, as_json)


def run_engine(engine_dir: str, prompt: str, run, engine, as_json: bool = False) -> None:
    """`caprese run`'s body (RunOptions `run`, EngineOptions `engine`); `caprese generate ENGINE_DIR` comes here
    too."""
    g = open_generator(engine_dir, engine)
    stream = None if as_json else (lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
    result = g.run(prompt, run, on_text=stream)
    if as_json:
        click.echo(json.dumps({**result.to_dict(), **describe(g, engine_dir)}))
        return
    click.echo("")
    click.echo(f"[caprese] {result.report()}", err=True)
