"""`caprese run ENGINE_DIR -p TEXT`: one generation on an engine folder from `caprese-export` (caprese.runtime).

Also holds what `caprese chat` shares with it: opening the Generator, describing it for --json.
"""

from __future__ import annotations

import json
import sys

import click

from caprese.cli.options import engine_options, prompt_options, sampling_options

def open_generator(engine_dir: str, backend: str, threads: int | None, device: str | None,
                   cuda_graph: bool | None = None, full_head: bool = False):
    from caprese.errors import CapreseError
    from caprese.runtime.generator import Generator

    options = {} if device is None or backend == "tensorrt" else {"device": device}
    if cuda_graph is not None and backend == "torch":
        options["cuda_graph"] = cuda_graph
    if full_head:
        if backend != "native":
            raise CapreseError("--full-head applies to --backend native (the other backends compute every logit)")
        options["head"] = "full"
    return Generator.load(engine_dir, backend=backend, threads=threads, **options)


def describe(g, engine_dir: str) -> dict:
    """The fields `caprese generate --json` prints besides the result, plus the backend's own."""
    return {"model_dir": str(engine_dir), "engine_dir": str(engine_dir), "method": g.label,
            "backend": g.backend.name, "device": g.backend.device, "precision": g.manifest.data["precision"],
            **g.backend.describe()}


@click.command("run", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("engine_dir", type=click.Path(path_type=str))
@prompt_options
@engine_options
@sampling_options
@click.option("--ignore-eos", is_flag=True, help="Always generate --max-new-tokens tokens (benchmarks).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (text + latency) instead of streaming.")
def run_command(engine_dir, prompt, chat, system, max_new_tokens, backend, threads, device, cuda_graph, full_head,
                temperature, top_k, top_p, seed, reselect_every, ignore_eos, as_json) -> None:
    """Generate a reply with an engine folder from `caprese-export`.

    Text streams to stdout; the latency report (time to first token, ms per output token, achieved GB/s,
    peak memory) goes to stderr. With --json, stdout gets one object with the fields of
    `caprese generate --json` plus bytes_per_step, gb_per_s, peak_rss_mb, kv_slots and the backend's own.
    """
    run_engine(engine_dir, prompt, chat, system, max_new_tokens, backend, threads, device, cuda_graph, temperature,
               top_k, top_p, seed, reselect_every, ignore_eos, as_json, full_head)


def run_engine(engine_dir, prompt, chat, system, max_new_tokens, backend, threads, device, cuda_graph, temperature,
               top_k, top_p, seed, reselect_every, ignore_eos, as_json, full_head=False) -> None:
    """`caprese run`'s body; `caprese generate ENGINE_DIR` comes here too."""
    from caprese.runtime.generator import sampling_from

    g = open_generator(engine_dir, backend, threads, device, cuda_graph, full_head)
    stream = None if as_json else (lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
    result = g.generate(prompt, max_new_tokens, sampling_from(temperature, top_k, top_p, seed), chat, system,
                        reselect_every, stream, ignore_eos=ignore_eos)
    if as_json:
        click.echo(json.dumps({**result.to_dict(), **describe(g, engine_dir)}))
        return
    click.echo("")
    click.echo(f"[caprese] {result.stats.report()} ({result.stop_reason})", err=True)
