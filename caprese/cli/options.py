"""Options shared by the commands that generate text (`generate`, `run`, `chat`) or evaluate (`eval`): one
definition each, so the flags, defaults and help read the same everywhere. The generation and engine flags
reach the command as the objects the Python API takes: `run` (caprese.model.run_options.RunOptions) and
`engine` (caprese.runtime.engine_options.EngineOptions)."""

from __future__ import annotations

import functools

import click

from caprese.calibration.recipe import DEFAULT_DENSITY, METHODS, layers_default_help


def _apply(f, options):
    for opt in reversed(options):
        f = opt(f)
    return f


BACKEND_CHOICES = ["auto", "onnxruntime", "native", "torch", "tensorrt"]
BACKEND_HELP = ("What runs the engine: auto (default) picks the fastest this engine and machine allow (CPU: native "
                "where it runs the engine, else onnxruntime; CUDA: tensorrt where the folder has plans, else torch) "
                "and the report says which; the ONNX graphs on ONNX Runtime; native (CPU, fp32: prefill on ONNX "
                "Runtime, each decode step in caprese's C kernel, compiled at first use); TensorRT plans; or the "
                "PyTorch reference decoder of the exported model.")


def _collect(f, build):
    """Wrap command callback f: build(kwargs) pops the flags it owns from kwargs and adds the objects it makes."""
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        build(kwargs)
        return f(*args, **kwargs)
    return wrapper


INT8_DOWN_OPTION = click.option(
    "--int8-down", is_flag=True,
    help="native, an engine exported with --int8-activations: multiply GRIFFIN's down rows with int8 coefficients "
         "(~0.95x the step; their error, ~0.9% of the down's output, is the largest; its accuracy cost measured "
         "within noise, docs/quantization.md). Off: 16-bit coefficients (ONNX Runtime computes them in fp32).")


def engine_options(f):
    """--backend, --threads, --device, --cuda-graph, --full-head, --int8-down (`run`, `chat`) -> `engine`:
    EngineOptions."""
    def build(kw):
        from caprese.runtime.engine_options import EngineOptions

        kw["engine"] = EngineOptions(kw.pop("backend"), kw.pop("threads"), kw.pop("device"), kw.pop("cuda_graph"),
                                     "full" if kw.pop("full_head") else None, int8_down=kw.pop("int8_down"))

    return _apply(_collect(f, build), [
        click.option("--backend", default="auto", show_default=True, type=click.Choice(BACKEND_CHOICES),
                     help=BACKEND_HELP),
        click.option("--threads", default=None, type=click.IntRange(min=1),
                     help="Intra-op threads (ONNX Runtime / native / torch). Default: one per CPU not busy with "
                          "other work (native and torch re-read it every second as they decode)."),
        click.option("--device", default=None, type=click.Choice(["cpu", "cuda"]),
                     help="onnxruntime / torch device. Default: cuda where the backend can use it, else cpu."),
        click.option("--cuda-graph/--no-cuda-graph", default=None,
                     help="torch on cuda: capture the decode step once as a CUDA graph and replay it (default on)."),
        click.option("--full-head", is_flag=True,
                     help="native: compute every logit of the LM head in fp32 on every step. By default greedy "
                          "and top-k (k <= 256) steps screen the head with an int8 copy where a probe at load "
                          "found that faster on this CPU, recomputing in fp32 only the rows that can be among the "
                          "k largest: the same tokens (and samples), a quarter of the head's bytes."),
        INT8_DOWN_OPTION,
    ])


def generation_options(prompt: bool = True, max_new_tokens: int = 256, ignore_eos: bool = False,
                       system_help: str = "System message for --chat.",
                       new_tokens_help: str = "Stop after this many new tokens (EOS stops earlier)."):
    """-p/--prompt and --chat (with `prompt`), --system, -n/--max-new-tokens, the sampling flags, --reselect-every
    (and --ignore-eos) -> `run`: RunOptions (and `prompt`, the text)."""
    def build(kw):  # imported here: `--help` does not load torch
        from caprese.model.run_options import RunOptions
        from caprese.model.sampling import Sampling

        sampling = Sampling(kw.pop("temperature"), kw.pop("top_k"), kw.pop("top_p"), kw.pop("seed"))
        kw["run"] = RunOptions(kw.pop("max_new_tokens"), sampling, kw.pop("chat", False), kw.pop("system"),
                               kw.pop("reselect_every"), kw.pop("ignore_eos", False))

    def decorate(f):
        opts = []
        if prompt:
            opts += [click.option("-p", "--prompt", required=True, help="Prompt text."),
                     click.option("--chat", is_flag=True,
                                  help="Wrap the prompt in the tokenizer's chat template (one user turn).")]
        opts += [click.option("--system", default=None, help=system_help),
                 click.option("-n", "--max-new-tokens", default=max_new_tokens, show_default=True,
                              type=click.IntRange(min=1), help=new_tokens_help)]
        if ignore_eos:
            opts_tail = [click.option("--ignore-eos", is_flag=True,
                                      help="Always generate --max-new-tokens tokens (benchmarks).")]
        else:
            opts_tail = []
        return _apply(_collect(f, build), opts + _sampling_flags() + opts_tail)

    return decorate


def _sampling_flags() -> list:
    """--temperature, --top-k, --top-p, --seed, --reselect-every."""
    return [
        click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0), help="0 = greedy."),
        click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0), help="0 = off."),
        click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True),
                     help="1 = off."),
        click.option("--seed", default=None, type=int, help="Seed for sampling (reproducible output)."),
        click.option("--reselect-every", default=0, show_default=True, type=click.IntRange(min=0),
                     help="GRIFFIN: every N decode steps, run the last N tokens through a dense (prefill) pass and "
                          "re-select the neurons (0 = never)."),
    ]


METHOD_CHOICES = ["dense", *METHODS]


def method_options(f):
    """--method, --density, --layers: a plain model folder run with an efficient FFN method, no adapters
    (`generate`, `eval`). The layers default to the method's own (recipe.METHOD_LAYERS)."""
    return _apply(f, [
        click.option("--method", type=click.Choice(METHOD_CHOICES), default=None,
                     help="For a plain model folder: decode with this efficient FFN method, without adapters (the "
                          "baseline). An artifact brings its own method.  [default: dense]"),
        click.option("--density", default=None, type=click.FloatRange(0, 1, min_open=True),
                     help="With --method: share of FFN neurons kept (GRIFFIN/magnitude) or of activations kept "
                          f"(CATS).  [default: {DEFAULT_DENSITY}]"),
        click.option("--layers", default=None,
                     help="Layers that get --method: all, first-half, second-half, or a list like 0,2,5-9.  "
                          f"[default: the method's ({layers_default_help()})]"),
    ])


def weight_options(f):
    """--weights, --block-size, --quant, --quantize-head, --quantize-embed, --scale-dtype: block-quantized weights
    (`calibrate`, `eval`, `generate`); caprese.calibration.weights_choice.weights_choice() turns them into a
    WeightsChoice (None without --weights)."""
    return _apply(f, [
        click.option("--weights", default=None, metavar="int4|int8",
                     help="Block-quantized weights (symmetric, fp16 scales) for every decoder linear layer: what the "
                          "int4 / int8 graphs run. On a plain folder: the quantized baseline (no bypass); on an "
                          "artifact: must be the bit width it was calibrated at.  [default: unquantized]"),
        click.option("--block-size", default=None, metavar="32|64|128|row",
                     help="Elements per scale along the input features (row: one scale per row).  "
                          "[default: 32 for int4, row for int8]"),
        click.option("--quant", default=None, type=click.Choice(["rtn", "gptq"]),
                     help="How codes are chosen: rtn (round to nearest) or gptq (activation-aware, on calibration "
                          "samples; eval / generate use cached synthetic ones).  [default: rtn]"),
        click.option("--quantize-head", is_flag=True,
                     help="Quantize the LM head too (with tied embeddings: the embedding as well)."),
        click.option("--quantize-embed", is_flag=True, help="Quantize the token embedding too."),
        click.option("--scale-dtype", default=None, type=click.Choice(["fp16", "fp32"]),
                     help="Dtype of the block scales.  [default: fp16]"),
    ])


def weights_from_flags(flags: dict):
    """The WeightsChoice of weight_options' flags in `flags` (None without --weights; a one-line error for
    --block-size and friends alone)."""
    from caprese.calibration.weights_choice import weights_choice

    return weights_choice(flags.get("weights"), flags.get("block_size"), flags.get("quant"),
                          flags.get("quantize_head", False), flags.get("quantize_embed", False),
                          flags.get("scale_dtype"))
