"""`caprese run ENGINE_DIR -p TEXT`: one generation on an engine folder from `caprese-export` (caprese.runtime).

Also holds the options `caprese chat` shares (backend, sampling).
"""

from __future__ import annotations

import json
import sys

import click

BACKEND_CHOICES = ["onnxruntime", "torch", "tensorrt"]


def engine_options(f):
    """--backend, --threads, --device, --cuda-graph."""
    for opt in reversed([
        click.option("--backend", default="onnxruntime", show_default=True, type=click.Choice(BACKEND_CHOICES),
                     help="What runs the engine: the ONNX graphs on ONNX Runtime, TensorRT plans, or the PyTorch "
                          "reference decoder of the exported model."),
        click.option("--threads", default=None, type=click.IntRange(min=1),
                     help="Intra-op threads (ONNX Runtime / torch). Default: the backend's own choice."),
        click.option("--device", default=None, type=click.Choice(["cpu", "cuda"]),
                     help="onnxruntime / torch device. Default: cuda where the backend can use it, else cpu."),
        click.option("--cuda-graph/--no-cuda-graph", default=None,
                     help="torch on cuda: capture the decode step once as a CUDA graph and replay it (default on)."),
    ]):
        f = opt(f)
    return f


def sampling_options(f):
    """-n, --temperature, --top-k, --top-p, --seed, --reselect-every."""
    for opt in reversed([
        click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0), help="0 = greedy."),
        click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0), help="0 = off."),
        click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True),
                     help="1 = off."),
        click.option("--seed", default=None, type=int, help="Seed for sampling (reproducible output)."),
        click.option("--reselect-every", default=0, show_default=True, type=click.IntRange(min=0),
                     help="GRIFFIN: every N decode steps, run the last N tokens through the dense prefill graph and "
                          "re-select the neurons (0 = never)."),
    ]):
        f = opt(f)
    return f


def open_generator(engine_dir: str, backend: str, threads: int | None, device: str | None,
                   cuda_graph: bool | None = None):
    from caprese.runtime.generator import Generator

    options = {} if device is None or backend == "tensorrt" else {"device": device}
    if cuda_graph is not None and backend == "torch":
        options["cuda_graph"] = cuda_graph
    return Generator.load(engine_dir, backend=backend, threads=threads, **options)


def describe(g, engine_dir: str) -> dict:
    """The fields `caprese generate --json` prints besides the result, plus the backend's own."""
    return {"model_dir": str(engine_dir), "engine_dir": str(engine_dir), "method": g.label,
            "backend": g.backend.name, "device": g.backend.device, "precision": g.manifest.data["precision"],
            **g.backend.describe()}


@click.command("run", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("engine_dir", type=click.Path(path_type=str))
@click.option("-p", "--prompt", required=True, help="Prompt text.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the tokenizer's chat template (one user turn).")
@click.option("--system", default=None, help="System message for --chat.")
@click.option("-n", "--max-new-tokens", default=256, show_default=True, type=click.IntRange(min=1),
              help="Stop after this many new tokens (EOS stops earlier).")
@engine_options
@sampling_options
@click.option("--ignore-eos", is_flag=True, help="Always generate --max-new-tokens tokens (benchmarks).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (text + latency) instead of streaming.")
def run_command(engine_dir, prompt, chat, system, max_new_tokens, backend, threads, device, cuda_graph, temperature,
                top_k, top_p, seed, reselect_every, ignore_eos, as_json) -> None:
    """Generate a reply with an engine folder from `caprese-export`.

    Text streams to stdout; the latency report (time to first token, ms per output token, achieved GB/s,
    peak memory) goes to stderr. With --json, stdout gets one object with the fields of
    `caprese generate --json` plus bytes_per_step, gb_per_s, peak_rss_mb, kv_slots and the backend's own.
    """
    from caprese.runtime.generator import sampling_from

    g = open_generator(engine_dir, backend, threads, device, cuda_graph)
    stream = None if as_json else (lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
    result = g.generate(prompt, max_new_tokens, sampling_from(temperature, top_k, top_p, seed), chat, system,
                        reselect_every, stream, ignore_eos=ignore_eos)
    if as_json:
        click.echo(json.dumps({**result.to_dict(), **describe(g, engine_dir)}))
        return
    click.echo("")
    click.echo(f"[caprese] {result.stats.report()} ({result.stop_reason})", err=True)
